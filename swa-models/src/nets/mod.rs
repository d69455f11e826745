//! The paper's networks, built exactly as the original SWA code defines them (same layers, order, tensor
//! names, shapes and initialisation), so that checkpoints load in PyTorch and parameter counts agree.
//!
//! - VGG-16, with or without BatchNorm (`vgg16`, `vgg16bn`);
//! - PreResNet-`depth` (`preresnet20`, `preresnet164`, …): basic blocks below depth 44, bottlenecks from 44;
//! - WideResNet-`depth`-`k` (`wrn28x10`, `wrn16x4`, …);
//! - Shake-Shake-`depth` 2×`width`d (`shakeshake26-2x64d`, `shakeshake26-2x32d`), defined in PyTorch by
//!   `xtask/torch/cifar_networks.py`;
//! - PyramidNet-`depth` with growth `alpha` (`pyramidnet110a48`, `pyramidnet272a200-bottleneck`), defined
//!   in PyTorch in the same file;
//! - for ImageNet, torchvision's ResNet-`depth` with bottleneck blocks (`resnet50`, `resnet152`), with
//!   torchvision's tensor names, so that its checkpoints load as they are;
//! - for ImageNet, torchvision's DenseNet-BC-`depth` (`densenet161`; also 121, 169, 201), with its tensor
//!   names, and dense blocks that read their growing input piece by piece instead of concatenating it
//!   for every layer ([`DenseBlock`](crate::layers::DenseBlock)).
//!
//! Every network is a [`Network`], a [`Module`] whose first convolution skips its input gradient (call
//! [`Module::require_input_grad`] with `true` to get it back).

mod architecture;
mod densenet;
mod preresnet;
mod pyramidnet;
mod resnet;
mod shake_shake;
mod vgg;
mod wide_resnet;

pub use architecture::{Architecture, ModelError};

use rand::rngs::StdRng;
use rand::SeedableRng;
use swa_core::backend::{Backend, BackendResult};
use swa_core::params::{NamedTensors, TensorRole};

use crate::layers::{BatchNorm2d, Sequential};
use crate::module::{ForwardInput, ForwardMode, Module, Param};

/// What to build: an architecture and the number of classes it predicts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NetworkConfig {
    /// The architecture.
    pub architecture: Architecture,
    /// The number of output classes (10 for CIFAR-10, 100 for CIFAR-100).
    pub classes: usize,
}

/// One of the paper's networks, initialised from a seed.
#[derive(Debug)]
pub struct Network<B: Backend> {
    config: NetworkConfig,
    body: Sequential<B>,
}

impl<B: Backend> Network<B> {
    /// Builds and initialises the network on the host with a generator seeded by `seed` (the same seed
    /// gives the same weights on every machine), then uploads it to `backend`.
    pub fn new(backend: &B, config: &NetworkConfig, seed: u64) -> Result<Self, ModelError> {
        config.architecture.validate()?;
        if config.classes == 0 {
            return Err(ModelError::InvalidConfig {
                architecture: config.architecture.to_string(),
                message: "the class count must be positive".into(),
            });
        }
        let mut rng = StdRng::seed_from_u64(seed);
        let classes = config.classes;
        let mut body = match config.architecture {
            Architecture::Vgg16 => vgg::build(backend, classes, false, &mut rng)?,
            Architecture::Vgg16Bn => vgg::build(backend, classes, true, &mut rng)?,
            Architecture::PreResNet { depth } => {
                preresnet::build(backend, classes, depth, &mut rng)?
            }
            Architecture::WideResNet {
                depth,
                widen_factor,
                dropout_rate,
            } => wide_resnet::build(
                backend,
                classes,
                depth,
                widen_factor,
                dropout_rate,
                &mut rng,
            )?,
            Architecture::ShakeShake { depth, width } => shake_shake::build(
                backend,
                classes,
                depth,
                width,
                crate::layers::ShakeMix::SHAKE_SHAKE,
                &mut rng,
            )?,
            Architecture::PyramidNet {
                depth,
                alpha,
                bottleneck,
            } => pyramidnet::build(backend, classes, depth, alpha, bottleneck, &mut rng)?,
            Architecture::ResNet { depth, width } => {
                let blocks =
                    resnet::blocks_per_stage(depth).ok_or_else(|| ModelError::InvalidConfig {
                        architecture: config.architecture.to_string(),
                        message: format!("no stage sizes for depth {depth}"),
                    })?;
                resnet::build(backend, classes, blocks, width, &mut rng)?
            }
            Architecture::DenseNet { depth, growth } => {
                let blocks =
                    densenet::blocks_per_depth(depth).ok_or_else(|| ModelError::InvalidConfig {
                        architecture: config.architecture.to_string(),
                        message: format!("no block sizes for depth {depth}"),
                    })?;
                let shape = densenet::DenseNetShape {
                    blocks,
                    growth,
                    init_features: 2 * growth,
                };
                densenet::build(backend, classes, shape, &mut rng)?
            }
        };
        body.require_input_grad(false);
        Ok(Self {
            config: *config,
            body,
        })
    }

    /// The configuration the network was built from.
    pub fn config(&self) -> &NetworkConfig {
        &self.config
    }

    /// The layers, in order.
    pub fn body(&self) -> &Sequential<B> {
        &self.body
    }
}

impl<B: Backend> NamedTensors<B> for Network<B> {
    fn visit_tensors(&self, f: &mut dyn FnMut(&str, TensorRole, &B::Tensor)) {
        self.body.visit_tensors(f);
    }

    fn visit_tensors_mut(&mut self, f: &mut dyn FnMut(&str, TensorRole, &mut B::Tensor)) {
        self.body.visit_tensors_mut(f);
    }
}

impl<B: Backend> Module<B> for Network<B> {
    fn forward_input(
        &mut self,
        backend: &B,
        x: ForwardInput<'_, B>,
        mode: ForwardMode,
    ) -> BackendResult<B::Tensor> {
        self.body.forward_input(backend, x, mode)
    }

    fn backward(&mut self, backend: &B, dy: &B::Tensor) -> BackendResult<B::Tensor> {
        self.body.backward(backend, dy)
    }

    fn visit_params_mut(&mut self, f: &mut dyn FnMut(&str, &mut Param<B>)) {
        self.body.visit_params_mut(f);
    }

    fn zero_grads(&mut self) {
        self.body.zero_grads();
    }

    fn require_input_grad(&mut self, required: bool) {
        self.body.require_input_grad(required);
    }

    fn visit_batch_counters(&self, f: &mut dyn FnMut(&str, u64)) {
        self.body.visit_batch_counters(f);
    }

    fn visit_batch_counters_mut(&mut self, f: &mut dyn FnMut(&str, &mut u64)) {
        self.body.visit_batch_counters_mut(f);
    }

    fn visit_batch_norms_mut(&mut self, f: &mut dyn FnMut(&mut BatchNorm2d<B>)) {
        self.body.visit_batch_norms_mut(f);
    }
}
