//! Residual blocks: `main(x) + shortcut(x)`.

use rand::Rng;
use swa_core::backend::{Backend, BackendResult};
use swa_core::params::{NamedTensors, TensorRole};

use super::{BatchNorm2d, Conv2d, Conv2dConfig, ConvInit, Dropout, ReLU, Sequential};
use crate::module::{child_name, ForwardMode, Module, Param};

/// A residual block, `main(x) + shortcut(x)`, with the shortcut the identity when there is none.
///
/// The main path's children are named directly under the block (`bn1`, `conv1`, …), and the shortcut's
/// under its own name (`downsample.0` in PreResNet, `shortcut.0` in WideResNet), as in the original code.
/// Both paths take the block's raw input.
#[derive(Debug)]
pub struct Residual<B: Backend> {
    main: Sequential<B>,
    shortcut: Option<(String, Sequential<B>)>,
}

impl<B: Backend> Residual<B> {
    /// A block from its main path and an optional named shortcut.
    pub fn new(main: Sequential<B>, shortcut: Option<(String, Sequential<B>)>) -> Self {
        Self { main, shortcut }
    }

    /// PreResNet's pre-activation basic block: `conv2(relu(bn2(conv1(relu(bn1(x)))))) + shortcut(x)`, with
    /// 3×3 convolutions (the first with `stride`) and a 1×1 strided convolution `downsample.0` when the
    /// shape changes. Convolutions have no bias and the original code's He-normal initialisation.
    pub fn preact_basic<R: Rng + ?Sized>(
        backend: &B,
        in_channels: usize,
        channels: usize,
        stride: usize,
        rng: &mut R,
    ) -> BackendResult<Self> {
        let conv = |cin, cout, k, s, p| {
            Conv2dConfig::new(cin, cout, k)
                .stride(s)
                .padding(p)
                .bias(false)
                .init(ConvInit::HeNormalFanOut)
        };
        let mut main = Sequential::new();
        main.push_named("bn1", BatchNorm2d::new(backend, in_channels)?);
        main.push_named("relu1", ReLU::new());
        let conv1 = Conv2d::new(backend, conv(in_channels, channels, 3, stride, 1), rng)?;
        main.push_named("conv1", conv1);
        main.push_named("bn2", BatchNorm2d::new(backend, channels)?);
        main.push_named("relu2", ReLU::new());
        let conv2 = Conv2d::new(backend, conv(channels, channels, 3, 1, 1), rng)?;
        main.push_named("conv2", conv2);
        let shortcut = if stride != 1 || in_channels != channels {
            let down = Conv2d::new(backend, conv(in_channels, channels, 1, stride, 0), rng)?;
            Some(("downsample".to_string(), Sequential::new().with(down)))
        } else {
            None
        };
        Ok(Self::new(main, shortcut))
    }

    /// PreResNet's pre-activation bottleneck block (expansion 4): 1×1 → 3×3 (with `stride`) → 1×1 to
    /// `4·channels`, each after BN-ReLU, plus a 1×1 strided `downsample.0` when the shape changes.
    pub fn preact_bottleneck<R: Rng + ?Sized>(
        backend: &B,
        in_channels: usize,
        channels: usize,
        stride: usize,
        rng: &mut R,
    ) -> BackendResult<Self> {
        let conv = |cin, cout, k, s, p| {
            Conv2dConfig::new(cin, cout, k)
                .stride(s)
                .padding(p)
                .bias(false)
                .init(ConvInit::HeNormalFanOut)
        };
        let out_channels = channels * 4;
        let mut main = Sequential::new();
        main.push_named("bn1", BatchNorm2d::new(backend, in_channels)?);
        main.push_named("relu1", ReLU::new());
        let conv1 = Conv2d::new(backend, conv(in_channels, channels, 1, 1, 0), rng)?;
        main.push_named("conv1", conv1);
        main.push_named("bn2", BatchNorm2d::new(backend, channels)?);
        main.push_named("relu2", ReLU::new());
        let conv2 = Conv2d::new(backend, conv(channels, channels, 3, stride, 1), rng)?;
        main.push_named("conv2", conv2);
        main.push_named("bn3", BatchNorm2d::new(backend, channels)?);
        main.push_named("relu3", ReLU::new());
        let conv3 = Conv2d::new(backend, conv(channels, out_channels, 1, 1, 0), rng)?;
        main.push_named("conv3", conv3);
        let shortcut = if stride != 1 || in_channels != out_channels {
            let down = Conv2d::new(backend, conv(in_channels, out_channels, 1, stride, 0), rng)?;
            Some(("downsample".to_string(), Sequential::new().with(down)))
        } else {
            None
        };
        Ok(Self::new(main, shortcut))
    }

    /// WideResNet's wide basic block: `conv2(relu(bn2(dropout(conv1(relu(bn1(x))))))) + shortcut(x)`, with
    /// biased 3×3 convolutions, the stride on `conv2`, dropout left out when `dropout_rate` is 0, and a 1×1
    /// biased strided `shortcut.0` when the shape changes. Convolutions keep PyTorch's default
    /// initialisation, as the original WideResNet code does. `dropout_id` must be unique in the network.
    pub fn wide_basic<R: Rng + ?Sized>(
        backend: &B,
        in_channels: usize,
        channels: usize,
        stride: usize,
        dropout_rate: f32,
        dropout_id: u64,
        rng: &mut R,
    ) -> BackendResult<Self> {
        let conv = |cin, cout, k, s, p| {
            Conv2dConfig::new(cin, cout, k)
                .stride(s)
                .padding(p)
                .bias(true)
                .init(ConvInit::TorchDefault)
        };
        let mut main = Sequential::new();
        main.push_named("bn1", BatchNorm2d::new(backend, in_channels)?);
        main.push_named("relu1", ReLU::new());
        let conv1 = Conv2d::new(backend, conv(in_channels, channels, 3, 1, 1), rng)?;
        main.push_named("conv1", conv1);
        if dropout_rate > 0.0 {
            main.push_named("dropout", Dropout::new(dropout_rate, dropout_id)?);
        }
        main.push_named("bn2", BatchNorm2d::new(backend, channels)?);
        main.push_named("relu2", ReLU::new());
        let conv2 = Conv2d::new(backend, conv(channels, channels, 3, stride, 1), rng)?;
        main.push_named("conv2", conv2);
        let shortcut = if stride != 1 || in_channels != channels {
            let short = Conv2d::new(backend, conv(in_channels, channels, 1, stride, 0), rng)?;
            Some(("shortcut".to_string(), Sequential::new().with(short)))
        } else {
            None
        };
        Ok(Self::new(main, shortcut))
    }

    /// Whether the block has a projection shortcut (rather than the identity).
    pub fn has_projection(&self) -> bool {
        self.shortcut.is_some()
    }
}

impl<B: Backend> NamedTensors<B> for Residual<B> {
    fn visit_tensors(&self, f: &mut dyn FnMut(&str, TensorRole, &B::Tensor)) {
        self.main.visit_tensors(f);
        if let Some((name, shortcut)) = &self.shortcut {
            shortcut.visit_tensors(&mut |n, role, t| f(&child_name(name, n), role, t));
        }
    }

    fn visit_tensors_mut(&mut self, f: &mut dyn FnMut(&str, TensorRole, &mut B::Tensor)) {
        self.main.visit_tensors_mut(f);
        if let Some((name, shortcut)) = &mut self.shortcut {
            shortcut.visit_tensors_mut(&mut |n, role, t| f(&child_name(name, n), role, t));
        }
    }
}

impl<B: Backend> Module<B> for Residual<B> {
    fn forward(
        &mut self,
        backend: &B,
        x: &B::Tensor,
        mode: ForwardMode,
    ) -> BackendResult<B::Tensor> {
        let mut y = self.main.forward(backend, x, mode)?;
        match &mut self.shortcut {
            Some((_, shortcut)) => {
                let s = shortcut.forward(backend, x, mode)?;
                backend.axpy_(&mut y, 1.0, &s)?;
            }
            None => backend.axpy_(&mut y, 1.0, x)?,
        }
        Ok(y)
    }

    /// A projection shortcut keeps the input itself for its backward pass rather than a copy.
    fn forward_owned(
        &mut self,
        backend: &B,
        x: B::Tensor,
        mode: ForwardMode,
    ) -> BackendResult<B::Tensor> {
        let Some((_, shortcut)) = &mut self.shortcut else {
            return self.forward(backend, &x, mode);
        };
        let mut y = self.main.forward(backend, &x, mode)?;
        let s = shortcut.forward_owned(backend, x, mode)?;
        backend.axpy_(&mut y, 1.0, &s)?;
        Ok(y)
    }

    fn backward(&mut self, backend: &B, dy: &B::Tensor) -> BackendResult<B::Tensor> {
        let mut dx = self.main.backward(backend, dy)?;
        match &mut self.shortcut {
            Some((_, shortcut)) => {
                let ds = shortcut.backward(backend, dy)?;
                backend.axpy_(&mut dx, 1.0, &ds)?;
            }
            None => backend.axpy_(&mut dx, 1.0, dy)?,
        }
        Ok(dx)
    }

    fn visit_params_mut(&mut self, f: &mut dyn FnMut(&str, &mut Param<B>)) {
        self.main.visit_params_mut(f);
        if let Some((name, shortcut)) = &mut self.shortcut {
            shortcut.visit_params_mut(&mut |n, p| f(&child_name(name, n), p));
        }
    }

    fn zero_grads(&mut self) {
        self.main.zero_grads();
        if let Some((_, shortcut)) = &mut self.shortcut {
            shortcut.zero_grads();
        }
    }

    fn visit_batch_counters(&self, f: &mut dyn FnMut(&str, u64)) {
        self.main.visit_batch_counters(f);
        if let Some((name, shortcut)) = &self.shortcut {
            shortcut.visit_batch_counters(&mut |n, c| f(&child_name(name, n), c));
        }
    }

    fn visit_batch_counters_mut(&mut self, f: &mut dyn FnMut(&str, &mut u64)) {
        self.main.visit_batch_counters_mut(f);
        if let Some((name, shortcut)) = &mut self.shortcut {
            shortcut.visit_batch_counters_mut(&mut |n, c| f(&child_name(name, n), c));
        }
    }
}
