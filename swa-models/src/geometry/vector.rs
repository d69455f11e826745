//! Points of weight space: a network's trained parameters as one flat vector, and the vector arithmetic
//! the surveys need.
//!
//! Only parameters ([`TensorRole::Parameter`]: weights, biases, BatchNorm's scale and shift) are
//! coordinates. BatchNorm's running statistics are not: they are a function of the weights and the data,
//! recomputed at every point ([`crate::bn::update_bn`]), as the paper does.

use std::collections::BTreeSet;
use std::fmt;
use std::path::Path;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use swa_core::backend::Backend;
use swa_core::params::TensorRole;

use crate::checkpoint::{StateDict, StoredTensor};
use crate::error::TrainError;
use crate::geometry::GeometryError;
use crate::module::{read_tensors, write_tensors, Module};

/// The parameters of a network in visit order: their names, shapes and places in a [`WeightVector`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParameterLayout {
    entries: Vec<LayoutEntry>,
    len: usize,
    /// The network's tensors that are not coordinates (BatchNorm statistics and batch counters): a weight
    /// file may hold them, but no other tensor.
    other_tensors: BTreeSet<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct LayoutEntry {
    name: String,
    shape: Vec<usize>,
    offset: usize,
    len: usize,
}

impl ParameterLayout {
    /// The layout of `model`'s parameters.
    pub fn of<B: Backend, M: Module<B> + ?Sized>(model: &M) -> Self {
        let mut entries = Vec::new();
        let mut len = 0;
        let mut other_tensors = BTreeSet::new();
        model.visit_batch_counters(&mut |name, _| {
            other_tensors.insert(name.to_string());
        });
        model.visit_tensors(&mut |name, role, tensor| {
            if role != TensorRole::Parameter {
                other_tensors.insert(name.to_string());
                return;
            }
            use swa_core::backend::HasShape;
            let shape = tensor.dims().to_vec();
            let count = shape.iter().product::<usize>();
            entries.push(LayoutEntry {
                name: name.to_string(),
                shape,
                offset: len,
                len: count,
            });
            len += count;
        });
        Self {
            entries,
            len,
            other_tensors,
        }
    }

    /// The number of coordinates (the network's parameter count).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the network has no parameter at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The number of parameter tensors.
    pub fn tensors(&self) -> usize {
        self.entries.len()
    }

    /// The origin of weight space.
    pub fn zeros(&self) -> WeightVector {
        WeightVector(vec![0.0; self.len])
    }

    /// The parameters of a state dict (a checkpoint's weights), in this layout. Tensors that are not
    /// parameters (BatchNorm statistics, batch counters) are ignored; a missing parameter, one of another
    /// shape or type, or a non-finite value is an error naming the tensor and the file.
    pub fn vector_of(&self, dict: &StateDict) -> Result<WeightVector, GeometryError> {
        let unexpected = dict.iter().map(|(name, _)| name).find(|name| {
            !self.other_tensors.contains(*name) && !self.entries.iter().any(|e| e.name == *name)
        });
        if let Some(name) = unexpected {
            return Err(GeometryError::UnexpectedTensor {
                origin: dict.origin().to_string(),
                name: name.to_string(),
            });
        }
        let mut values = Vec::with_capacity(self.len);
        for entry in &self.entries {
            match dict.get(&entry.name) {
                None => {
                    return Err(GeometryError::MissingParameter {
                        origin: dict.origin().to_string(),
                        name: entry.name.clone(),
                    })
                }
                Some(StoredTensor::F32 { shape, values: v }) if *shape == entry.shape => {
                    if let Some(bad) = v.iter().find(|x| !x.is_finite()) {
                        return Err(GeometryError::NotFinite {
                            origin: dict.origin().to_string(),
                            name: entry.name.clone(),
                            value: *bad,
                        });
                    }
                    values.extend_from_slice(v);
                }
                Some(other) => {
                    return Err(GeometryError::WrongParameter {
                        origin: dict.origin().to_string(),
                        name: entry.name.clone(),
                        expected: entry.shape.clone(),
                        found: format!("{} {:?}", other.dtype_name(), other.shape()),
                    })
                }
            }
        }
        Ok(WeightVector(values))
    }

    /// The parameters stored in a safetensors file (a run's `final.safetensors`, `swa.safetensors`, or a
    /// checkpoint's `model.safetensors`).
    pub fn load(&self, path: &Path) -> Result<WeightVector, GeometryError> {
        let dict = StateDict::load(path).map_err(TrainError::from)?;
        self.vector_of(&dict)
    }

    /// The parameters `model` holds now.
    pub fn vector_from<B: Backend>(
        &self,
        backend: &B,
        model: &dyn Module<B>,
    ) -> Result<WeightVector, TrainError> {
        self.check_model(model)?;
        Ok(WeightVector(read_tensors(
            backend,
            model,
            TensorRole::Parameter,
        )?))
    }

    /// Sets `model`'s parameters to `point`. BatchNorm statistics are left as they are: a survey
    /// recomputes them for the point next.
    pub fn write_into<B: Backend>(
        &self,
        backend: &B,
        point: &WeightVector,
        model: &mut dyn Module<B>,
    ) -> Result<(), TrainError> {
        self.check_model(model)?;
        if point.len() != self.len {
            return Err(TrainError::StateMismatch(format!(
                "a point of {} coordinates set into a network of {} parameters",
                point.len(),
                self.len
            )));
        }
        write_tensors(backend, model, TensorRole::Parameter, &point.0)
    }

    /// Whether `model` has exactly this layout's parameters, in order.
    fn check_model<B: Backend>(&self, model: &dyn Module<B>) -> Result<(), TrainError> {
        let found = Self::of(model);
        if found != *self {
            let first = self
                .entries
                .iter()
                .zip(&found.entries)
                .find(|(a, b)| a != b)
                .map(|(a, b)| {
                    format!(
                        ": `{}` {:?} against `{}` {:?}",
                        a.name, a.shape, b.name, b.shape
                    )
                })
                .unwrap_or_default();
            return Err(TrainError::StateMismatch(format!(
                "the network's parameters ({} tensors, {} values) are not the layout's ({} tensors, {} values){first}",
                found.tensors(),
                found.len(),
                self.tensors(),
                self.len()
            )));
        }
        Ok(())
    }
}

/// A point (or a direction) of weight space, in a [`ParameterLayout`]'s order.
///
/// Arithmetic between two vectors requires the same length, which vectors of one layout have; products
/// accumulate in `f64`, so that a norm over tens of millions of coordinates keeps its digits.
#[derive(Clone, PartialEq)]
pub struct WeightVector(pub Vec<f32>);

impl fmt::Debug for WeightVector {
    /// The size and norm: the coordinates of a network would fill pages.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "WeightVector({} coordinates, norm {})",
            self.len(),
            self.norm()
        )
    }
}

impl WeightVector {
    /// The number of coordinates.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the vector has no coordinate.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The coordinates.
    pub fn as_slice(&self) -> &[f32] {
        &self.0
    }

    /// The inner product `⟨self, other⟩`.
    ///
    /// # Panics
    /// When the lengths differ.
    pub fn dot(&self, other: &WeightVector) -> f64 {
        assert_same_len(self, other);
        self.0
            .iter()
            .zip(&other.0)
            .map(|(&a, &b)| a as f64 * b as f64)
            .sum()
    }

    /// The Euclidean norm.
    pub fn norm(&self) -> f64 {
        self.dot(self).sqrt()
    }

    /// `self − other`.
    ///
    /// # Panics
    /// When the lengths differ.
    pub fn minus(&self, other: &WeightVector) -> WeightVector {
        assert_same_len(self, other);
        WeightVector(self.0.iter().zip(&other.0).map(|(a, b)| a - b).collect())
    }

    /// The Euclidean distance to `other`.
    pub fn distance(&self, other: &WeightVector) -> f64 {
        assert_same_len(self, other);
        self.0
            .iter()
            .zip(&other.0)
            .map(|(&a, &b)| {
                let d = a as f64 - b as f64;
                d * d
            })
            .sum::<f64>()
            .sqrt()
    }

    /// `self += alpha · x`, computed in `f64` and rounded once.
    ///
    /// # Panics
    /// When the lengths differ.
    pub fn add_scaled(&mut self, alpha: f64, x: &WeightVector) {
        assert_same_len(self, x);
        for (a, &b) in self.0.iter_mut().zip(&x.0) {
            *a = (*a as f64 + alpha * b as f64) as f32;
        }
    }

    /// `self` scaled to unit norm; `None` for the zero vector, which has no direction.
    pub fn normalized(&self) -> Option<WeightVector> {
        let norm = self.norm();
        (norm > 0.0 && norm.is_finite())
            .then(|| WeightVector(self.0.iter().map(|&a| (a as f64 / norm) as f32).collect()))
    }

    /// Sets `self` to `Σ cᵢ·vᵢ` over `terms`, each coordinate summed in `f64` and rounded once, so that a
    /// point is the same whichever order its terms come in and its buffer is reused across points.
    ///
    /// # Panics
    /// When a term's length differs from `self`'s.
    pub fn set_combination(&mut self, terms: &[(f64, &WeightVector)]) {
        for (_, v) in terms {
            assert_same_len(self, v);
        }
        for (i, out) in self.0.iter_mut().enumerate() {
            let sum: f64 = terms.iter().map(|(c, v)| c * v.0[i] as f64).sum();
            *out = sum as f32;
        }
    }

    /// A direction drawn uniformly from the unit sphere of a `len`-dimensional space: a vector of
    /// independent standard normal coordinates (ChaCha8 seeded with `seed`, rand_distr's
    /// `StandardNormal`), normalised. The same seed gives the same direction on every machine.
    pub fn random_direction(len: usize, seed: u64) -> Option<WeightVector> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let raw = WeightVector(
            (0..len)
                .map(|_| {
                    let z: f64 = StandardNormal.sample(&mut rng);
                    z as f32
                })
                .collect(),
        );
        raw.normalized()
    }
}

fn assert_same_len(a: &WeightVector, b: &WeightVector) {
    assert_eq!(
        a.len(),
        b.len(),
        "weight vectors of different networks: {} and {} coordinates",
        a.len(),
        b.len()
    );
}
