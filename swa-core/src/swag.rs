//! SWA-Gaussian (SWAG): a Gaussian posterior over a network's trained parameters, fitted to the first two
//! moments of the SGD iterates that SWA averages (Maddox, Garipov, Izmailov, Vetrov and Wilson, *A Simple
//! Baseline for Bayesian Uncertainty in Deep Learning*, NeurIPS 2019).
//!
//! [`SwagMoments`] collects, from snapshots `θ_1 … θ_n` of the same model:
//!
//! - the first moment `θ̄ = (1/n) Σ θ_i` (the SWA solution) and the second moment `θ²‾ = (1/n) Σ θ_i²`,
//!   element-wise, as running means;
//! - the deviation columns `D_i = θ_i − θ̄_i` of the last `K` snapshots ([`SwagMoments::max_rank`]), where
//!   `θ̄_i` is the running mean *after* `θ_i` was included, as the authors' `collect_model` computes them.
//!   The first snapshot's column is therefore zero, and it is kept like any other, as theirs is.
//!
//! From them SWAG defines the diagonal covariance `Σ_diag = diag(θ²‾ − θ̄²)` (clamped below at
//! [`VARIANCE_CLAMP`], the authors' `var_clamp`), the low-rank covariance `Σ_lr = D̂D̂ᵀ/(K − 1)` of the
//! deviation matrix `D̂` (one column per held deviation), and the posterior `N(θ̄, ½(Σ_diag + Σ_lr))`.
//!
//! # Sampling
//!
//! [`SwagMoments::sample_into`] writes one draw into a model. With `σ = sqrt(Σ_diag)` element-wise,
//! `z₁ ~ N(0, I_d)` over all `d` parameters and `z₂ ~ N(0, I_K)` over the `K` held columns:
//!
//! | [`Covariance`] | sample | covariance of the sample |
//! |---|---|---|
//! | [`LowRankPlusDiagonal`](Covariance::LowRankPlusDiagonal) | `θ̄ + √scale · ( σ⊙z₁/√2 + D̂z₂/√(2(K − 1)) )` | `scale · ½(Σ_diag + D̂D̂ᵀ/(K − 1))` |
//! | [`Diagonal`](Covariance::Diagonal) | `θ̄ + √scale · σ⊙z₁` | `scale · Σ_diag` |
//!
//! At `scale = 1` the first row is the paper's sampling identity (subsection *SWAG: Low Rank plus
//! Diagonal Covariance Structure*), `θ̃ = θ_SWA + (1/√2)·Σ_diag^{1/2} z₁ + (1/√(2(K − 1)))·D̂ z₂`, and
//! the second is SWAG-Diagonal's `N(θ_SWA, Σ_diag)` (subsection *SWAG-Diagonal*). `scale` multiplies
//! the *covariance*, so it enters the draw as `√scale`, as in the authors' `SWAG.sample(scale, cov)`
//! (`sample_fullrank`: `mean + scale**0.5 * (var_sample + cov_sample)`). Their code leaves out the two
//! `1/√2` factors of the paper, so their `sample(s, cov=True)` is this crate's low-rank draw at
//! `scale = 2s` (their `s = 0.5` is the paper's identity), and their `sample(s, cov=False)` is this
//! crate's diagonal draw at `scale = s`.
//!
//! `K` in `√(2(K − 1))` is the number of columns held ([`SwagMoments::rank`]), which is the maximum rank
//! once `n ≥ K` snapshots were collected: `D̂D̂ᵀ/(K − 1)` is then the sample covariance of the held
//! deviations. (The authors divide by `max_num_models − 1` even while fewer columns are held.)
//!
//! ## Noise, and the same draw on every backend
//!
//! The noise is drawn on the host from ChaCha8 seeded with [`SeedableRng::seed_from_u64`] and converted
//! to standard normals by `rand_distr`'s [`StandardNormal`] (as `f32`), in a fixed order:
//!
//! - `z₁` from stream 0 of the generator: one value per parameter element, tensors in visiting order,
//!   elements row-major;
//! - `z₂` from stream 1 of the same seed: one value per held column, oldest column first
//!   ([`SwagMoments::deviations`] order).
//!
//! So a seed gives the same sample on every backend, a diagonal and a low-rank draw of one seed share
//! `z₁`, and the draw does not depend on where the ring of columns currently starts.
//! [`SwagMoments::draw_noise`] returns these vectors and [`SwagMoments::sample_with_noise`] takes any
//! given `z₁, z₂`, so the formula can be checked exactly.
//!
//! # BatchNorm statistics
//!
//! SWAG's posterior is over trained parameters only ([`TensorRole::Parameter`]); the authors' code, too,
//! registers its moments for `parameters()` alone. BatchNorm running statistics of a sampled network must
//! be recomputed on training data for every sample (the authors' `bn_update`, PyTorch's `update_bn`), so
//! [`SwagMoments`] does not hold them: updates ignore them, and [`SwagMoments::sample_into`] and
//! [`SwagMoments::copy_mean_into`] leave the model's untouched.
//!
//! # Memory
//!
//! The moments hold `2 + K` tensors the size of the parameters (first moment, second moment and `K`
//! columns) on the backend: [`SwagMoments::bytes_needed`] says how many bytes. With the paper's `K = 20`
//! that is 22 copies of the network: 24 MB for PreResNet-20's 0.27M parameters, 3.2 GB for
//! WRN-28-10's 36.5M. [`SwagMoments::new`] refuses, before allocating anything, moments that would not
//! fit in what the backend reports available ([`SwagMoments::check_fits`],
//! [`Backend::memory_available`]: the host's available memory on the CPU), with
//! [`SwagError::DoesNotFit`] naming both sizes.
//!
//! # Checkpoints
//!
//! [`SwagMoments::to_state`] reads the moments back to the host as a [`SwagState`] (the count, the
//! maximum rank, the columns in ring order and the ring's next position) that `serde` can write, and
//! [`SwagMoments::from_state`] restores it; a restored set of moments continues bit-identically to one
//! that was never saved.
//!
//! # Example
//!
//! ```
//! # // The example needs the CPU backend, the default feature `cpu`.
//! # #[cfg(feature = "cpu")]
//! # mod example {
//! use swa_core::swag::{Covariance, SwagMoments};
//! use swa_core::{Backend, CpuBackend, CpuTensor, NamedTensors, TensorRole};
//!
//! struct Toy {
//!     weight: CpuTensor,
//!     running_mean: CpuTensor,
//! }
//!
//! impl NamedTensors<CpuBackend> for Toy {
//!     fn visit_tensors(&self, f: &mut dyn FnMut(&str, TensorRole, &CpuTensor)) {
//!         f("fc.weight", TensorRole::Parameter, &self.weight);
//!         f("bn.running_mean", TensorRole::BatchNormStatistic, &self.running_mean);
//!     }
//!     fn visit_tensors_mut(&mut self, f: &mut dyn FnMut(&str, TensorRole, &mut CpuTensor)) {
//!         f("fc.weight", TensorRole::Parameter, &mut self.weight);
//!         f("bn.running_mean", TensorRole::BatchNormStatistic, &mut self.running_mean);
//!     }
//! }
//!
//! # pub fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let backend = CpuBackend::with_threads(1);
//! let snapshot = |w: f32| -> Result<Toy, swa_core::BackendError> {
//!     Ok(Toy {
//!         weight: backend.from_host(&[w, -w], &[2])?,
//!         running_mean: backend.from_host(&[0.0], &[1])?,
//!     })
//! };
//!
//! // Snapshots with w = 1, 2, 6: mean 3, population variance (4 + 1 + 9)/3.
//! let mut swag = SwagMoments::new(&backend, &snapshot(1.0)?, 2)?;
//! swag.update(&backend, &snapshot(2.0)?)?;
//! swag.update(&backend, &snapshot(6.0)?)?;
//! assert_eq!((swag.count(), swag.rank()), (3, 2)); // the last two deviations are held
//! let variance = backend.to_host(&swag.diagonal_variance(&backend, "fc.weight")?)?;
//! assert!((variance[0] - 14.0 / 3.0).abs() < 1e-5);
//!
//! // A low-rank-plus-diagonal draw; BN statistics are left for the caller to recompute.
//! let mut model = snapshot(0.0)?;
//! swag.sample_into(&backend, &mut model, 1.0, Covariance::LowRankPlusDiagonal, 7)?;
//! // Scale 0 writes the mean itself.
//! swag.sample_into(&backend, &mut model, 0.0, Covariance::LowRankPlusDiagonal, 7)?;
//! assert_eq!(backend.to_host(&model.weight)?, vec![3.0, -3.0]);
//! # Ok(())
//! # }
//! # }
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # #[cfg(feature = "cpu")]
//! # example::run()?;
//! # Ok(())
//! # }
//! ```

use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

use crate::backend::{Backend, BackendError};
use crate::params::{LayoutEntry, LayoutError, NamedTensors, RoleFilter, TensorLayout, TensorRole};

/// The paper's maximum rank `K = 20`: the number of deviation columns kept.
pub const DEFAULT_MAX_RANK: usize = 20;

/// The floor of the diagonal variance, the authors' `var_clamp` default: `θ²‾ − θ̄²` can round to zero or
/// below for parameters that barely move, and its square root must stay real.
pub const VARIANCE_CLAMP: f32 = 1e-30;

/// The ChaCha8 stream of `z₁`, one value per parameter element.
const DIAGONAL_STREAM: u64 = 0;
/// The ChaCha8 stream of `z₂`, one value per held deviation column.
const LOW_RANK_STREAM: u64 = 1;

/// Which covariance a SWAG sample is drawn with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Covariance {
    /// SWAG-Diagonal: `θ̄ + √scale · σ⊙z₁`, covariance `scale · Σ_diag` (the authors' `cov=False`).
    Diagonal,
    /// Full SWAG: `θ̄ + √scale · (σ⊙z₁/√2 + D̂z₂/√(2(K − 1)))`, covariance
    /// `scale · ½(Σ_diag + D̂D̂ᵀ/(K − 1))`. Needs at least two deviation columns.
    LowRankPlusDiagonal,
}

/// Errors of SWAG. Layout errors name the operation, the tensor or its position, and what was expected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SwagError {
    /// A maximum rank of 0: SWAG keeps at least one deviation column.
    #[error("max_rank is 0: SWAG keeps at least one deviation column (the paper keeps 20)")]
    ZeroMaxRank,
    /// A model without trained parameters, over which there is no posterior to fit.
    #[error("{op}: the model has no trained parameters (TensorRole::Parameter)")]
    NoParameters {
        /// The operation (`new`).
        op: &'static str,
    },
    /// A low-rank sample with fewer than two deviation columns: `D̂D̂ᵀ/(K − 1)` needs `K ≥ 2`.
    #[error(
        "a sample with the low-rank covariance needs at least 2 deviation columns (it divides by K − 1), \
         but {rank} are held; collect more snapshots or sample with Covariance::Diagonal"
    )]
    RankTooLow {
        /// The number of columns held.
        rank: usize,
    },
    /// A sampling scale that is negative, infinite or NaN.
    #[error("sampling scale {scale} is not a finite number ≥ 0")]
    InvalidScale {
        /// The scale given.
        scale: f32,
    },
    /// A model or set of moments whose parameter tensors are not the moments': other names or shapes,
    /// another order or another number of them, or, on creation, a parameter name visited twice.
    /// Positions and counts are among the parameters ([`TensorRole::Parameter`]) only.
    #[error("{op}: {source}")]
    Layout {
        /// The operation (`new`, `update`, `sample_into`, `sample_with_noise`, `copy_mean_into`,
        /// `merge`).
        op: &'static str,
        /// What differs, with the moments' value and the one given.
        #[source]
        source: LayoutError,
    },
    /// A name the moments do not hold.
    #[error("no parameter named `{name}` in the SWAG moments")]
    UnknownTensor {
        /// The name asked for.
        name: String,
    },
    /// Noise of the wrong length given to [`SwagMoments::sample_with_noise`].
    #[error("{which} has {got} values, expected {expected}")]
    NoiseLength {
        /// `z1` (one per parameter element) or `z2` (one per held column; none for a diagonal sample).
        which: &'static str,
        /// The length expected.
        expected: usize,
        /// The length given.
        got: usize,
    },
    /// Two sets of moments that cannot be merged.
    #[error("{op}: {message}")]
    Incompatible {
        /// The operation.
        op: &'static str,
        /// What differs.
        message: String,
    },
    /// A saved state that is inconsistent (count 0, values that do not fill a shape, …).
    #[error("from_state: `{name}`: {message}")]
    InvalidState {
        /// The tensor concerned, or the field of the state.
        name: String,
        /// What is wrong and what was expected.
        message: String,
    },
    /// More snapshots than a `u64` counts.
    #[error("{op}: the snapshot count overflows u64")]
    CountOverflow {
        /// The operation.
        op: &'static str,
    },
    /// Moments whose `K + 2` copies of the parameters need more memory than the backend has available.
    #[error(
        "SWAG moments of {parameters} parameters at maximum rank {max_rank} need {needed_bytes} bytes \
         ({max_rank} deviation columns, the mean and the second moment: {copies} copies of the \
         parameters, 4 bytes each), but the backend ({backend}) has {available_bytes} bytes available; \
         keep fewer deviation columns or use a device with more memory"
    )]
    DoesNotFit {
        /// Parameter elements of the model.
        parameters: usize,
        /// The maximum rank asked for.
        max_rank: usize,
        /// `max_rank + 2`.
        copies: u64,
        /// [`SwagMoments::bytes_needed`].
        needed_bytes: u64,
        /// [`Backend::memory_available`].
        available_bytes: u64,
        /// [`Backend::name`].
        backend: String,
    },
    /// A backend operation failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// One parameter tensor of saved SWAG moments, on the host.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SwagTensorState {
    /// The tensor's name (a PyTorch `state_dict` key).
    pub name: String,
    /// Its dimensions.
    pub shape: Vec<usize>,
    /// The first moment `θ̄`, row-major (the authors' `<name>_mean`).
    pub mean: Vec<f32>,
    /// The second moment `θ²‾`, row-major (the authors' `<name>_sq_mean`).
    pub sq_mean: Vec<f32>,
    /// The deviation columns in ring order (storage slots `0, 1, …`), not oldest first: the oldest is at
    /// [`SwagState::next_column`] once the ring is full.
    pub columns: Vec<Vec<f32>>,
}

/// SWAG moments read back to the host, for checkpoints: everything needed to continue collecting.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SwagState {
    /// The number of snapshots collected (the authors' `n_models`).
    pub n_models: u64,
    /// The maximum number of deviation columns `K`.
    pub max_rank: usize,
    /// The ring slot the next column is written to: the number of columns while fewer than `K` are held,
    /// then the slot of the oldest column.
    pub next_column: usize,
    /// The parameter tensors, in the model's visiting order.
    pub tensors: Vec<SwagTensorState>,
}

/// The tensors SWAG holds moments of: the trained parameters, never BatchNorm statistics.
const PARAMETERS: RoleFilter = RoleFilter::Only(TensorRole::Parameter);

/// Attributes a layout error to the operation that met it.
fn layout_error(op: &'static str) -> impl Fn(LayoutError) -> SwagError {
    move |source| SwagError::Layout { op, source }
}

/// The moments of one parameter tensor; its name and shape are the entry at the same position of the
/// moments' layout.
#[derive(Debug)]
struct SwagSlot<T> {
    mean: T,
    sq_mean: T,
    /// The ring of deviation columns, `rank` of them, in storage order.
    columns: Vec<T>,
}

/// The SWAG moments of a model's trained parameters: running first and second moments and a ring of the
/// last `K` deviation columns, on the model's backend.
///
/// See the [module documentation](self) for the formulas, the sampling order and the treatment of
/// BatchNorm statistics. The models passed to [`update`](Self::update), [`sample_into`](Self::sample_into)
/// and [`copy_mean_into`](Self::copy_mean_into) must visit the same parameter names and shapes in the
/// same order as the model the moments were created from; otherwise they fail with a typed error and
/// change nothing.
///
/// The moments are running means in the tensors' `f32`, with the rounding of
/// [`WeightAverage`](crate::averaging::WeightAverage)'s equal-weight mean. The diagonal variance
/// `θ²‾ − θ̄²` is the difference of two such means and loses relative precision where the variance is
/// small against `θ̄²` (by about `θ̄²/Var · 2⁻²⁴`), as the authors' `sq_mean - mean ** 2` does.
#[doc(alias = "SWAG")]
#[doc(alias = "SWA-Gaussian")]
#[derive(Debug)]
pub struct SwagMoments<B: Backend> {
    /// The names and shapes of the model's parameter tensors.
    layout: TensorLayout,
    /// One per entry of `layout`.
    slots: Vec<SwagSlot<B::Tensor>>,
    count: u64,
    max_rank: usize,
    /// Columns held by every slot: `min(count, max_rank)`.
    rank: usize,
    /// The ring slot of the next column (see [`SwagState::next_column`]); always `< max_rank`.
    next: usize,
}

impl<B: Backend> SwagMoments<B> {
    /// Moments whose first snapshot is `model`'s trained parameters (count 1, one zero deviation column),
    /// keeping at most `max_rank` deviation columns ([`DEFAULT_MAX_RANK`] is the paper's 20).
    ///
    /// Fails with [`SwagError::ZeroMaxRank`] for `max_rank = 0`, [`SwagError::NoParameters`] for a model
    /// without parameters, [`SwagError::Layout`] with [`LayoutError::DuplicateName`] for a repeated
    /// parameter name, and [`SwagError::DoesNotFit`] when the moments at full rank would need more memory
    /// than the backend has available ([`check_fits`](Self::check_fits)); nothing is allocated then.
    pub fn new(
        backend: &B,
        model: &dyn NamedTensors<B>,
        max_rank: usize,
    ) -> Result<Self, SwagError> {
        if max_rank == 0 {
            return Err(SwagError::ZeroMaxRank);
        }
        // The layout is read first, so that a repeated name fails before anything is allocated.
        let layout = TensorLayout::of_model(model, PARAMETERS).map_err(layout_error("new"))?;
        if layout.is_empty() {
            return Err(SwagError::NoParameters { op: "new" });
        }
        Self::check_fits(backend, layout.numel(), max_rank)?;
        let mut slots = Vec::with_capacity(layout.len());
        // Nothing to pair the tensors with: the slots are what is built.
        layout.zip_visit(model, std::iter::repeat(()), |entry, (), theta| {
            // The first snapshot's moments are exact: θ̄ = θ, θ²‾ = θ², and its deviation θ − θ̄ = 0.
            slots.push(SwagSlot {
                mean: backend.duplicate(theta)?,
                sq_mean: backend.mul(theta, theta)?,
                columns: vec![backend.zeros(&entry.shape)?],
            });
            Ok::<_, BackendError>(())
        })?;
        Ok(SwagMoments {
            layout,
            slots,
            count: 1,
            max_rank,
            rank: 1,
            next: 1 % max_rank,
        })
    }

    /// Collects one more snapshot (the authors' `collect_model`): with `n` snapshots already collected,
    /// `θ̄ += (θ − θ̄)/(n + 1)`, `θ²‾ += (θ² − θ²‾)/(n + 1)`, then the column `θ − θ̄` (with the updated
    /// `θ̄`) is appended to the ring, replacing the oldest once `K` are held.
    ///
    /// Only a backend failure can leave the moments part-updated; their values are then unspecified (the
    /// structure stays consistent), and a checkpoint is the way back.
    #[doc(alias = "collect_model")]
    pub fn update(&mut self, backend: &B, model: &dyn NamedTensors<B>) -> Result<(), SwagError> {
        self.check_model("update", model)?;
        let next_count = self
            .count
            .checked_add(1)
            .ok_or(SwagError::CountOverflow { op: "update" })?;
        // 1/(n + 1) rounded once from f64, the weight of WeightRule::Equal.
        let weight = (1.0 / next_count as f64) as f32;
        let grow = self.rank < self.max_rank;
        // New columns are allocated before anything changes, so that a failed allocation changes nothing,
        // and every slot gets its column before any is written, so that all hold `rank` columns whatever
        // fails.
        if grow {
            let mut fresh = Vec::with_capacity(self.slots.len());
            for entry in self.layout.entries() {
                fresh.push(backend.zeros(&entry.shape)?);
            }
            for (slot, column) in self.slots.iter_mut().zip(fresh) {
                slot.columns.push(column);
            }
            self.rank += 1;
        }
        let target = self.next;
        let collected = self
            .layout
            .zip_visit(model, &mut self.slots, |entry, slot, theta| {
                collect_one(backend, &entry.name, slot, theta, weight, target)
            });
        self.next = (self.next + 1) % self.max_rank;
        self.count = next_count;
        Ok(collected?)
    }

    /// The number of snapshots collected, including the first (the authors' `n_models`).
    #[doc(alias = "n_models")]
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The number of deviation columns held, `min(count, max_rank)`: the `K` of the low-rank covariance.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The maximum number of deviation columns kept (the authors' `max_num_models`).
    #[doc(alias = "max_num_models")]
    pub fn max_rank(&self) -> usize {
        self.max_rank
    }

    /// The number of parameter elements `d`: the length of `z₁`.
    pub fn parameter_count(&self) -> usize {
        self.layout.numel()
    }

    /// The names of the parameter tensors, in visiting order.
    pub fn names(&self) -> Vec<&str> {
        self.layout.names()
    }

    /// The first moment `θ̄` (the SWA solution) of a parameter tensor.
    #[doc(alias = "swa_mean")]
    pub fn mean(&self, name: &str) -> Option<&B::Tensor> {
        self.slot(name).map(|(_, s)| &s.mean)
    }

    /// The second moment `θ²‾` (the running mean of the squares) of a parameter tensor.
    #[doc(alias = "sq_mean")]
    pub fn second_moment(&self, name: &str) -> Option<&B::Tensor> {
        self.slot(name).map(|(_, s)| &s.sq_mean)
    }

    /// The deviation columns of a parameter tensor, oldest first: `D_i = θ_i − θ̄_i` for the last
    /// [`rank`](Self::rank) snapshots collected (or, after a [`merge`](Self::merge), the order it
    /// documents). This is the order in which `z₂` multiplies them.
    pub fn deviations(&self, name: &str) -> Option<Vec<&B::Tensor>> {
        let (_, slot) = self.slot(name)?;
        self.chronological()
            .into_iter()
            .map(|i| slot.columns.get(i))
            .collect()
    }

    /// The diagonal variance `max(θ²‾ − θ̄², VARIANCE_CLAMP)` of a parameter tensor, as a new tensor.
    ///
    /// The difference runs on the backend; the clamp, which no backend operation provides, on the host.
    pub fn diagonal_variance(&self, backend: &B, name: &str) -> Result<B::Tensor, SwagError> {
        let (entry, slot) = self.slot(name).ok_or_else(|| SwagError::UnknownTensor {
            name: name.to_owned(),
        })?;
        let variance = clamped_variance(backend, slot)?;
        Ok(backend.from_host(&variance, &entry.shape)?)
    }

    /// Writes the first moment `θ̄` (the SWA solution) into the model's parameters; its BatchNorm
    /// statistics are left untouched, to be recomputed.
    pub fn copy_mean_into(
        &self,
        backend: &B,
        model: &mut dyn NamedTensors<B>,
    ) -> Result<(), SwagError> {
        self.check_model("copy_mean_into", model)?;
        self.for_each_parameter_mut(model, |_, slot, dst| backend.copy_(dst, &slot.mean))?;
        Ok(())
    }

    /// Writes one SWAG sample into the model's parameters, with the noise of `seed` (see the
    /// [module documentation](self) for the formula of each [`Covariance`] and the order of the draws).
    /// The model's BatchNorm statistics are left untouched: recompute them before evaluating the sample.
    ///
    /// `scale` multiplies the covariance; `scale = 0` writes `θ̄` bit-exactly. Fails with
    /// [`SwagError::InvalidScale`] for a negative or non-finite scale, [`SwagError::RankTooLow`] for a
    /// low-rank sample with fewer than two columns, and a mismatch error for a model of another layout;
    /// in all these cases the model is unchanged.
    #[doc(alias = "sample")]
    pub fn sample_into(
        &self,
        backend: &B,
        model: &mut dyn NamedTensors<B>,
        scale: f32,
        covariance: Covariance,
        seed: u64,
    ) -> Result<(), SwagError> {
        self.check_sample("sample_into", model, scale, covariance)?;
        let z2 = self.draw_low_rank_noise(covariance, seed);
        let mut z1 = DiagonalNoise::Seeded(Box::new(stream(seed, DIAGONAL_STREAM)));
        self.write_sample(backend, model, scale, covariance, &mut z1, &z2)
    }

    /// Writes the SWAG sample of given noise into the model's parameters: `z1` holds one value per
    /// parameter element (tensors in visiting order, row-major; [`parameter_count`](Self::parameter_count)
    /// of them) and `z2` one per held column, oldest first ([`rank`](Self::rank) of them for
    /// [`Covariance::LowRankPlusDiagonal`], none for [`Covariance::Diagonal`]).
    ///
    /// Per parameter tensor, in `f32` on the backend: `θ = θ̄ + t`, where the diagonal term
    /// `t = a·σ⊙z₁` is computed on the host in `f64` and rounded once (`a = √scale`, or `√scale/√2` for
    /// the low-rank covariance), then `θ += c_j·D_j` for every column, oldest first, with
    /// `c_j = √scale·z₂[j]/√(2(K − 1))` rounded to `f32`. [`sample_into`](Self::sample_into) is this
    /// function with the noise of [`draw_noise`](Self::draw_noise).
    pub fn sample_with_noise(
        &self,
        backend: &B,
        model: &mut dyn NamedTensors<B>,
        scale: f32,
        covariance: Covariance,
        z1: &[f32],
        z2: &[f32],
    ) -> Result<(), SwagError> {
        self.check_sample("sample_with_noise", model, scale, covariance)?;
        let expected_z1 = self.parameter_count();
        if z1.len() != expected_z1 {
            return Err(SwagError::NoiseLength {
                which: "z1",
                expected: expected_z1,
                got: z1.len(),
            });
        }
        let expected_z2 = self.low_rank_noise_len(covariance);
        if z2.len() != expected_z2 {
            return Err(SwagError::NoiseLength {
                which: "z2",
                expected: expected_z2,
                got: z2.len(),
            });
        }
        let mut noise = DiagonalNoise::Given { z1, offset: 0 };
        self.write_sample(backend, model, scale, covariance, &mut noise, z2)
    }

    /// The noise `(z₁, z₂)` that [`sample_into`](Self::sample_into) draws for `seed`: `z₁` from stream 0
    /// of ChaCha8, one standard normal per parameter element, and `z₂` from stream 1, one per held column
    /// for [`Covariance::LowRankPlusDiagonal`] (empty for [`Covariance::Diagonal`]).
    pub fn draw_noise(&self, covariance: Covariance, seed: u64) -> (Vec<f32>, Vec<f32>) {
        let mut rng = stream(seed, DIAGONAL_STREAM);
        let z1 = (0..self.parameter_count())
            .map(|_| StandardNormal.sample(&mut rng))
            .collect();
        (z1, self.draw_low_rank_noise(covariance, seed))
    }

    /// Merges the moments of another run of the same model into these: the first and second moments become
    /// the count-weighted means `x += n_b/(n_a + n_b)·(x_b − x)`, the moments of all `n_a + n_b` snapshots,
    /// and the count `n_a + n_b`.
    ///
    /// The deviation columns become this set's columns (oldest first) followed by `other`'s (oldest
    /// first), of which the most recent `K` are kept: `other` is taken as the later part of the trajectory.
    /// Columns are not recomputed against the merged mean (the snapshots are gone): each stays the
    /// deviation from the running mean of its own set when it was collected. Both sets must hold the same
    /// names and shapes and the same maximum rank.
    pub fn merge(&mut self, backend: &B, other: &SwagMoments<B>) -> Result<(), SwagError> {
        self.check_same_layout("merge", other)?;
        let total = self
            .count
            .checked_add(other.count)
            .ok_or(SwagError::CountOverflow { op: "merge" })?;
        let keep = (self.rank + other.rank).min(self.max_rank);
        // How many of each set's columns survive: other's newest first, then this set's newest.
        let keep_other = other.rank.min(keep);
        let keep_mine = keep - keep_other;
        // Copies of other's surviving columns before anything changes.
        let other_order = other.chronological();
        let mut copies = Vec::with_capacity(self.slots.len());
        for theirs in &other.slots {
            let mut columns = Vec::with_capacity(keep_other);
            for &i in &other_order[other_order.len() - keep_other..] {
                if let Some(column) = theirs.columns.get(i) {
                    columns.push(backend.duplicate(column)?);
                }
            }
            copies.push(columns);
        }
        // The columns first, which cannot fail, so that every slot holds `keep` of them whatever happens.
        let my_order = self.chronological();
        for (mine, their_columns) in self.slots.iter_mut().zip(copies) {
            let mut ring: Vec<Option<B::Tensor>> = std::mem::take(&mut mine.columns)
                .into_iter()
                .map(Some)
                .collect();
            let mut merged = Vec::with_capacity(keep);
            for &i in &my_order[my_order.len() - keep_mine..] {
                if let Some(column) = ring.get_mut(i).and_then(Option::take) {
                    merged.push(column);
                }
            }
            merged.extend(their_columns);
            mine.columns = merged;
        }
        self.rank = keep;
        self.next = keep % self.max_rank;
        self.count = total;
        let weight = (other.count as f64 / total as f64) as f32;
        for (mine, theirs) in self.slots.iter_mut().zip(&other.slots) {
            backend.lerp_(&mut mine.mean, &theirs.mean, weight)?;
            backend.lerp_(&mut mine.sq_mean, &theirs.sq_mean, weight)?;
        }
        Ok(())
    }

    /// Reads the moments back to the host for a checkpoint.
    pub fn to_state(&self, backend: &B) -> Result<SwagState, SwagError> {
        let mut tensors = Vec::with_capacity(self.slots.len());
        for (entry, slot) in self.layout.entries().iter().zip(&self.slots) {
            let mut columns = Vec::with_capacity(slot.columns.len());
            for column in &slot.columns {
                columns.push(backend.to_host(column)?);
            }
            tensors.push(SwagTensorState {
                name: entry.name.clone(),
                shape: entry.shape.clone(),
                mean: backend.to_host(&slot.mean)?,
                sq_mean: backend.to_host(&slot.sq_mean)?,
                columns,
            });
        }
        Ok(SwagState {
            n_models: self.count,
            max_rank: self.max_rank,
            next_column: self.next,
            tensors,
        })
    }

    /// Restores moments saved with [`to_state`](Self::to_state). Fails with [`SwagError::InvalidState`]
    /// for a state that [`to_state`](Self::to_state) cannot have written: a count of 0, a ring position
    /// outside `[0, max_rank)` or inconsistent with the columns held, a number of columns other than
    /// `min(n_models, max_rank)`, values that do not fill a shape or a repeated name; with
    /// [`SwagError::ZeroMaxRank`] for `max_rank = 0` and [`SwagError::NoParameters`] for no tensors.
    pub fn from_state(backend: &B, state: &SwagState) -> Result<Self, SwagError> {
        let invalid = |name: &str, message: String| SwagError::InvalidState {
            name: name.to_owned(),
            message,
        };
        if state.max_rank == 0 {
            return Err(SwagError::ZeroMaxRank);
        }
        if state.n_models == 0 {
            return Err(invalid(
                "n_models",
                "the count is 0, but SWAG moments hold at least their first snapshot".to_owned(),
            ));
        }
        // min(n, K) in u64, so that a count beyond usize does not wrap.
        let rank = state.n_models.min(state.max_rank as u64) as usize;
        if state.next_column >= state.max_rank
            || (rank < state.max_rank && state.next_column != rank)
        {
            return Err(invalid(
                "next_column",
                format!(
                    "ring position {} with {rank} of {} columns held: expected {}",
                    state.next_column,
                    state.max_rank,
                    if rank < state.max_rank {
                        format!("{rank}")
                    } else {
                        format!("a position below {}", state.max_rank)
                    }
                ),
            ));
        }
        if state.tensors.is_empty() {
            return Err(SwagError::NoParameters { op: "from_state" });
        }
        let mut layout = TensorLayout::new(PARAMETERS);
        let mut slots = Vec::with_capacity(state.tensors.len());
        for t in &state.tensors {
            let bad = |message: String| invalid(&t.name, message);
            // Every tensor of a state is a parameter, so the layout refuses only a repeated name.
            if layout
                .push(&t.name, TensorRole::Parameter, &t.shape)
                .is_err()
            {
                return Err(bad("the name appears more than once".to_owned()));
            }
            let numel = t.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
            let fills = |values: &[f32]| numel == Some(values.len());
            if !fills(&t.mean) || !fills(&t.sq_mean) {
                return Err(bad(format!(
                    "{} mean and {} second-moment values do not fill shape {:?}",
                    t.mean.len(),
                    t.sq_mean.len(),
                    t.shape
                )));
            }
            if t.columns.len() != rank {
                return Err(bad(format!(
                    "{} deviation columns, expected min(n_models, max_rank) = {rank}",
                    t.columns.len()
                )));
            }
            let mut columns = Vec::with_capacity(rank);
            for (j, column) in t.columns.iter().enumerate() {
                if !fills(column) {
                    return Err(bad(format!(
                        "deviation column {j} has {} values, which do not fill shape {:?}",
                        column.len(),
                        t.shape
                    )));
                }
                columns.push(backend.from_host(column, &t.shape)?);
            }
            slots.push(SwagSlot {
                mean: backend.from_host(&t.mean, &t.shape)?,
                sq_mean: backend.from_host(&t.sq_mean, &t.shape)?,
                columns,
            });
        }
        Ok(SwagMoments {
            layout,
            slots,
            count: state.n_models,
            max_rank: state.max_rank,
            rank,
            next: state.next_column,
        })
    }

    /// The backend memory the moments of `parameters` `f32` elements need at maximum rank `max_rank`:
    /// `(2 + max_rank) · parameters · 4` bytes, for the first moment (the mean), the second moment and the
    /// `max_rank` deviation columns (saturating at `u64::MAX`).
    ///
    /// This is what the moments hold once `max_rank` snapshots were collected. On top of it, an update
    /// allocates one temporary the size of the tensor it is at (`θ²`), and a sample or
    /// [`diagonal_variance`](Self::diagonal_variance) two (the variance and the diagonal term), besides
    /// the model itself; a caller refuses a rank whose `bytes_needed` does not fit with that margin.
    pub fn bytes_needed(parameters: usize, max_rank: usize) -> u64 {
        let copies = (max_rank as u64).saturating_add(2);
        copies
            .saturating_mul(parameters as u64)
            .saturating_mul(std::mem::size_of::<f32>() as u64)
    }

    /// Refuses, before anything is collected, moments of `parameters` elements at `max_rank` whose
    /// [`bytes_needed`](Self::bytes_needed) exceed what `backend` has available
    /// ([`Backend::memory_available`]): the host's available memory on the CPU. A backend that cannot tell
    /// (`None`) is not refused here; its allocations report running out. The memory the model and its
    /// other state already take is counted as used, since the check reads what is available now.
    pub fn check_fits(backend: &B, parameters: usize, max_rank: usize) -> Result<(), SwagError> {
        let needed_bytes = Self::bytes_needed(parameters, max_rank);
        match backend.memory_available() {
            Some(available_bytes) if needed_bytes > available_bytes => Err(SwagError::DoesNotFit {
                parameters,
                max_rank,
                copies: (max_rank as u64).saturating_add(2),
                needed_bytes,
                available_bytes,
                backend: backend.name(),
            }),
            _ => Ok(()),
        }
    }

    // ---------------------------------------------------------------- internals

    fn slot(&self, name: &str) -> Option<(&LayoutEntry, &SwagSlot<B::Tensor>)> {
        let position = self.layout.position(name)?;
        Some((
            self.layout.entries().get(position)?,
            self.slots.get(position)?,
        ))
    }

    /// Writes into the model's parameters, in visiting order: `f(entry, slot, tensor)` for each, with the
    /// moments' entry and slot at the same position, until the first error, which is returned. The
    /// model must have been checked.
    fn for_each_parameter_mut(
        &self,
        model: &mut dyn NamedTensors<B>,
        f: impl FnMut(&LayoutEntry, &SwagSlot<B::Tensor>, &mut B::Tensor) -> Result<(), BackendError>,
    ) -> Result<(), BackendError> {
        self.layout.zip_visit_mut(model, &self.slots, f)
    }

    /// Ring slots, oldest column first.
    fn chronological(&self) -> Vec<usize> {
        let oldest = (self.next + self.max_rank - self.rank) % self.max_rank;
        (0..self.rank)
            .map(|j| (oldest + j) % self.max_rank)
            .collect()
    }

    fn low_rank_noise_len(&self, covariance: Covariance) -> usize {
        match covariance {
            Covariance::Diagonal => 0,
            Covariance::LowRankPlusDiagonal => self.rank,
        }
    }

    fn draw_low_rank_noise(&self, covariance: Covariance, seed: u64) -> Vec<f32> {
        let mut rng = stream(seed, LOW_RANK_STREAM);
        (0..self.low_rank_noise_len(covariance))
            .map(|_| StandardNormal.sample(&mut rng))
            .collect()
    }

    /// The checks of a sample, before anything is drawn or written.
    fn check_sample(
        &self,
        op: &'static str,
        model: &dyn NamedTensors<B>,
        scale: f32,
        covariance: Covariance,
    ) -> Result<(), SwagError> {
        if !(scale.is_finite() && scale >= 0.0) {
            return Err(SwagError::InvalidScale { scale });
        }
        if covariance == Covariance::LowRankPlusDiagonal && self.rank < 2 {
            return Err(SwagError::RankTooLow { rank: self.rank });
        }
        self.check_model(op, model)
    }

    /// `θ = θ̄ + diagonal term + Σ_j c_j·D_j` into every parameter of a model already checked.
    fn write_sample(
        &self,
        backend: &B,
        model: &mut dyn NamedTensors<B>,
        scale: f32,
        covariance: Covariance,
        z1: &mut DiagonalNoise<'_>,
        z2: &[f32],
    ) -> Result<(), SwagError> {
        let sqrt_scale = f64::from(scale).sqrt();
        let (diagonal_factor, low_rank_factor) = match covariance {
            Covariance::Diagonal => (sqrt_scale, 0.0),
            Covariance::LowRankPlusDiagonal => (
                sqrt_scale / std::f64::consts::SQRT_2,
                // check_sample guarantees rank ≥ 2 here.
                sqrt_scale / (2.0 * (self.rank as f64 - 1.0)).sqrt(),
            ),
        };
        let coefficients: Vec<f32> = z2
            .iter()
            .map(|&z| (low_rank_factor * f64::from(z)) as f32)
            .collect();
        let order = self.chronological();
        self.for_each_parameter_mut(model, |entry, slot, dst| {
            backend.copy_(dst, &slot.mean)?;
            if scale == 0.0 {
                // Every term is zero: the mean itself, bit-exactly, and no noise needed.
                return Ok(());
            }
            let variance = clamped_variance(backend, slot)?;
            let mut term = vec![0.0f32; variance.len()];
            z1.fill(&mut term);
            for (t, &v) in term.iter_mut().zip(&variance) {
                *t = (diagonal_factor * f64::from(v).sqrt() * f64::from(*t)) as f32;
            }
            let term = backend.from_host(&term, &entry.shape)?;
            backend.axpy_(dst, 1.0, &term)?;
            for (&c, &i) in coefficients.iter().zip(&order) {
                if let Some(column) = slot.columns.get(i) {
                    backend.axpy_(dst, c, column)?;
                }
            }
            Ok(())
        })?;
        Ok(())
    }

    /// Checks that a model visits the moments' parameter names and shapes in order, before anything is
    /// written, so that a mismatch leaves both unchanged. BatchNorm statistics are not looked at.
    fn check_model(&self, op: &'static str, model: &dyn NamedTensors<B>) -> Result<(), SwagError> {
        self.layout.check_model(model).map_err(layout_error(op))
    }

    fn check_same_layout(&self, op: &'static str, other: &SwagMoments<B>) -> Result<(), SwagError> {
        if self.max_rank != other.max_rank {
            return Err(SwagError::Incompatible {
                op,
                message: format!(
                    "maximum ranks differ: {} and {}",
                    self.max_rank, other.max_rank
                ),
            });
        }
        self.layout
            .check_same(&other.layout)
            .map_err(layout_error(op))
    }
}

/// One snapshot `theta` into one slot: the running moments with `weight = 1/(n + 1)`, then the deviation
/// `θ − θ̄` (updated mean) into ring slot `target` (the slot just pushed when the ring grows).
fn collect_one<B: Backend>(
    backend: &B,
    name: &str,
    slot: &mut SwagSlot<B::Tensor>,
    theta: &B::Tensor,
    weight: f32,
    target: usize,
) -> Result<(), BackendError> {
    backend.lerp_(&mut slot.mean, theta, weight)?;
    let square = backend.mul(theta, theta)?;
    backend.lerp_(&mut slot.sq_mean, &square, weight)?;
    let Some(column) = slot.columns.get_mut(target) else {
        return Err(BackendError::InvalidArgument {
            op: "swag update",
            message: format!(
                "ring slot {target} of `{name}` is missing ({} held)",
                slot.columns.len()
            ),
        });
    };
    backend.copy_(column, theta)?;
    backend.axpy_(column, -1.0, &slot.mean)
}

/// `max(θ²‾ − θ̄², VARIANCE_CLAMP)` on the host. The difference is one `f32` rounding on the backend:
/// `−θ̄²` is exact, and adding `θ²‾` rounds once.
fn clamped_variance<B: Backend>(
    backend: &B,
    slot: &SwagSlot<B::Tensor>,
) -> Result<Vec<f32>, BackendError> {
    let mut difference = backend.mul(&slot.mean, &slot.mean)?;
    backend.scale_(&mut difference, -1.0)?;
    backend.axpy_(&mut difference, 1.0, &slot.sq_mean)?;
    let mut variance = backend.to_host(&difference)?;
    for v in &mut variance {
        // Written so that NaN stays NaN (as torch.clamp keeps it) instead of becoming the floor.
        if *v < VARIANCE_CLAMP {
            *v = VARIANCE_CLAMP;
        }
    }
    Ok(variance)
}

/// A ChaCha8 generator on stream `stream` of `seed`.
fn stream(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng
}

/// Where `z₁` comes from: a caller's vector, or the seeded stream.
enum DiagonalNoise<'a> {
    Given { z1: &'a [f32], offset: usize },
    // Boxed: the generator's state is 300-odd bytes against the slice's 24.
    Seeded(Box<ChaCha8Rng>),
}

impl DiagonalNoise<'_> {
    /// The next `out.len()` values of `z₁`. Given noise has been checked to hold every parameter's.
    fn fill(&mut self, out: &mut [f32]) {
        match self {
            DiagonalNoise::Given { z1, offset } => {
                let end = *offset + out.len();
                if let Some(values) = z1.get(*offset..end) {
                    out.copy_from_slice(values);
                }
                *offset = end;
            }
            DiagonalNoise::Seeded(rng) => {
                for z in out {
                    *z = StandardNormal.sample(rng.as_mut());
                }
            }
        }
    }
}
