//! A small network's worth of named tensors for the averaging tests: a convolution, a batch norm with its
//! two running statistics, and a linear layer, all of different shapes.

#![allow(dead_code)]

use std::sync::OnceLock;

use swa_core::{Backend, CpuBackend, CpuTensor, NamedTensors, TensorRole};

/// Names, roles and shapes in visiting order (PyTorch `state_dict` keys).
pub const LAYOUT: [(&str, TensorRole, &[usize]); 8] = [
    ("conv.weight", TensorRole::Parameter, &[2, 1, 3, 3]),
    ("conv.bias", TensorRole::Parameter, &[2]),
    ("bn.weight", TensorRole::Parameter, &[2]),
    ("bn.bias", TensorRole::Parameter, &[2]),
    ("bn.running_mean", TensorRole::BatchNormStatistic, &[2]),
    ("bn.running_var", TensorRole::BatchNormStatistic, &[2]),
    ("fc.weight", TensorRole::Parameter, &[3, 4]),
    ("fc.bias", TensorRole::Parameter, &[3]),
];

/// The number of values in one snapshot of [`ToyNet`].
pub const NUMEL: usize = 18 + 2 + 2 + 2 + 2 + 2 + 12 + 3;

/// One backend for every test: building a thread pool per case would dominate the run time.
pub fn backend() -> &'static CpuBackend {
    static BACKEND: OnceLock<CpuBackend> = OnceLock::new();
    BACKEND.get_or_init(|| CpuBackend::with_threads(1))
}

/// Whether flat index `i` of a snapshot belongs to a BN statistic.
pub fn is_statistic(i: usize) -> bool {
    let mut start = 0;
    for (_, role, shape) in LAYOUT {
        let end = start + shape.iter().product::<usize>();
        if (start..end).contains(&i) {
            return role == TensorRole::BatchNormStatistic;
        }
        start = end;
    }
    false
}

/// The toy network: one field per tensor of [`LAYOUT`].
#[derive(Debug)]
pub struct ToyNet {
    pub tensors: Vec<CpuTensor>,
}

impl ToyNet {
    /// A network whose tensors, concatenated in visiting order, are `values` (`NUMEL` of them).
    pub fn from_flat(values: &[f32]) -> ToyNet {
        assert_eq!(values.len(), NUMEL, "a snapshot has {NUMEL} values");
        let mut start = 0;
        let tensors = LAYOUT
            .iter()
            .map(|(_, _, shape)| {
                let n: usize = shape.iter().product();
                let t = backend()
                    .from_host(&values[start..start + n], shape)
                    .expect("the layout's shapes hold these values");
                start += n;
                t
            })
            .collect();
        ToyNet { tensors }
    }

    /// The tensors concatenated in visiting order.
    pub fn to_flat(&self) -> Vec<f32> {
        self.tensors
            .iter()
            .flat_map(|t| backend().to_host(t).expect("CPU reads cannot fail"))
            .collect()
    }
}

impl NamedTensors<CpuBackend> for ToyNet {
    fn visit_tensors(&self, f: &mut dyn FnMut(&str, TensorRole, &CpuTensor)) {
        for ((name, role, _), t) in LAYOUT.iter().zip(&self.tensors) {
            f(name, *role, t);
        }
    }

    fn visit_tensors_mut(&mut self, f: &mut dyn FnMut(&str, TensorRole, &mut CpuTensor)) {
        for ((name, role, _), t) in LAYOUT.iter().zip(&mut self.tensors) {
            f(name, *role, t);
        }
    }
}

/// A set of named tensors with any names, roles and shapes, to build mismatching snapshots.
#[derive(Debug)]
pub struct Loose {
    pub entries: Vec<(String, TensorRole, CpuTensor)>,
}

impl Loose {
    /// The tensors of [`LAYOUT`] filled with `value`.
    pub fn like_toy(value: f32) -> Loose {
        let entries = LAYOUT
            .iter()
            .map(|(name, role, shape)| {
                let n: usize = shape.iter().product();
                let t = backend()
                    .from_host(&vec![value; n], shape)
                    .expect("the layout's shapes hold these values");
                (name.to_string(), *role, t)
            })
            .collect();
        Loose { entries }
    }
}

impl NamedTensors<CpuBackend> for Loose {
    fn visit_tensors(&self, f: &mut dyn FnMut(&str, TensorRole, &CpuTensor)) {
        for (name, role, t) in &self.entries {
            f(name, *role, t);
        }
    }

    fn visit_tensors_mut(&mut self, f: &mut dyn FnMut(&str, TensorRole, &mut CpuTensor)) {
        for (name, role, t) in &mut self.entries {
            f(name, *role, t);
        }
    }
}
