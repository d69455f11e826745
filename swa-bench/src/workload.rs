//! What the benchmarks run: seeded values, a block of parameters to average, random batches, and one
//! SGD training step through swa-models' trainer's own step.

use swa_core::backend::pcg_hash;
use swa_core::backend::prelude::*;
use swa_core::params::{NamedTensors, TensorRole};
use swa_models::evaluate::MetricsAccumulator;
use swa_models::optim::{Sgd, SgdConfig};
use swa_models::{sgd_step, Architecture, ForwardMode, HostBatch, Module};

use crate::BenchError;

/// `n` values in `[-1, 1)` drawn from `seed` by a counter-based hash (cheap, and identical everywhere).
pub fn seeded_values(n: usize, seed: u32) -> Vec<f32> {
    let stream = pcg_hash(seed);
    (0..n)
        .map(|i| {
            let h = pcg_hash((i as u32) ^ stream);
            (h >> 8) as f32 * (2.0 / 16_777_216.0) - 1.0
        })
        .collect()
}

/// A model-sized set of parameters held in a few large tensors, for averaging benchmarks that should
/// measure memory traffic rather than per-tensor dispatch.
#[derive(Debug)]
pub struct ParameterBlock<B: Backend> {
    tensors: Vec<(String, B::Tensor)>,
}

impl<B: Backend> ParameterBlock<B> {
    /// `total` parameters split into `pieces` tensors of about equal size, filled from `seed`.
    pub fn new(backend: &B, total: usize, pieces: usize, seed: u32) -> Result<Self, BenchError> {
        let pieces = pieces.clamp(1, total.max(1));
        let mut tensors = Vec::with_capacity(pieces);
        let mut left = total;
        for piece in 0..pieces {
            let size = left.div_ceil(pieces - piece);
            left -= size;
            let values = seeded_values(size, seed.wrapping_add(piece as u32));
            tensors.push((
                format!("block{piece}.weight"),
                backend.from_host(&values, &[size])?,
            ));
        }
        Ok(Self { tensors })
    }

    /// The number of parameters.
    pub fn len(&self) -> usize {
        use swa_core::HasShape;
        self.tensors.iter().map(|(_, t)| t.numel()).sum()
    }

    /// Whether the block holds no parameter.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<B: Backend> NamedTensors<B> for ParameterBlock<B> {
    fn visit_tensors(&self, f: &mut dyn FnMut(&str, TensorRole, &B::Tensor)) {
        for (name, tensor) in &self.tensors {
            f(name, TensorRole::Parameter, tensor);
        }
    }

    fn visit_tensors_mut(&mut self, f: &mut dyn FnMut(&str, TensorRole, &mut B::Tensor)) {
        for (name, tensor) in &mut self.tensors {
            f(name, TensorRole::Parameter, tensor);
        }
    }
}

/// A batch of `batch` random 32×32 RGB images (values in `[-1, 1)`) with labels below `classes`.
pub fn random_batch(batch: usize, classes: usize, seed: u32) -> HostBatch {
    random_batch_of_side(batch, 32, classes, seed)
}

/// The side of the images a network is measured on: 224 for torchvision's ImageNet networks, as users
/// train them, and CIFAR's 32 for the rest.
pub fn image_side(architecture: Architecture) -> usize {
    if architecture.is_imagenet() {
        224
    } else {
        32
    }
}

/// A batch of `batch` random `side`×`side` RGB images (values in `[-1, 1)`) with labels below `classes`.
pub fn random_batch_of_side(batch: usize, side: usize, classes: usize, seed: u32) -> HostBatch {
    let classes = classes.max(1) as u32;
    HostBatch {
        images: seeded_values(batch * 3 * side * side, seed),
        shape: [batch, 3, side, side],
        labels: (0..batch as u32)
            .map(|i| pcg_hash(i ^ seed.rotate_left(16)) % classes)
            .collect(),
    }
}

/// A network with its optimiser, stepping on one batch through the trainer's own step
/// ([`swa_models::sgd_step`]).
pub struct TrainingStep<B: Backend> {
    /// The network being trained.
    pub model: Box<dyn Module<B>>,
    optimizer: Sgd<B>,
    metrics: MetricsAccumulator,
    step: u64,
}

impl<B: Backend> TrainingStep<B> {
    /// SGD with momentum 0.9 and weight decay 5·10⁻⁴ (the paper's) on `model`.
    pub fn new(model: Box<dyn Module<B>>) -> Self {
        Self {
            model,
            optimizer: Sgd::new(SgdConfig::momentum(5e-4)),
            metrics: MetricsAccumulator::default(),
            step: 0,
        }
    }

    /// One step exactly as the trainer takes it: upload, training forward pass, loss and logits read
    /// back, backward pass, SGD update. Returns the loss.
    pub fn run(&mut self, backend: &B, batch: &HostBatch) -> Result<f32, BenchError> {
        let loss = sgd_step(
            backend,
            self.model.as_mut(),
            &mut self.optimizer,
            batch,
            0.05,
            self.step,
            &mut self.metrics,
        )?;
        self.step += 1;
        Ok(loss)
    }

    /// A forward pass in evaluation mode (nothing cached, running statistics untouched).
    pub fn forward_eval(&mut self, backend: &B, batch: &HostBatch) -> Result<(), BenchError> {
        let x = backend.from_host(&batch.images, &batch.shape)?;
        self.model.forward(backend, &x, ForwardMode::Eval)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use swa_core::CpuBackend;

    #[test]
    fn a_block_splits_its_parameters_without_losing_any() -> Result<(), BenchError> {
        let backend = CpuBackend::with_threads(1);
        let block = ParameterBlock::new(&backend, 10, 4, 1)?;
        let mut sizes = Vec::new();
        block.visit_tensors(&mut |_, _, t| sizes.push(t.len()));
        assert_eq!(sizes, vec![3, 3, 2, 2]);
        assert_eq!(block.len(), 10);
        Ok(())
    }

    #[test]
    fn seeded_values_lie_in_range_and_differ_between_seeds() {
        let a = seeded_values(1000, 1);
        assert!(a.iter().all(|v| (-1.0..1.0).contains(v)));
        assert_ne!(a, seeded_values(1000, 2));
        assert_eq!(a, seeded_values(1000, 1));
    }
}
