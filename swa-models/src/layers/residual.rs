//! Residual blocks: `main(x) + shortcut(x)`.

use rand::Rng;
use swa_core::backend::{Backend, BackendResult};
use swa_core::params::{NamedTensors, TensorRole};

use super::{BatchNorm2d, Conv2d, Conv2dConfig, ConvInit, Dropout, ReLU, Sequential};
use crate::module::{child_name, ForwardInput, ForwardMode, Module, Param};

/// A residual block, `main(x) + shortcut(x)`, with the shortcut the identity when there is none, and
/// optionally a ReLU after the sum (the post-activation blocks of torchvision's ResNets).
///
/// The main path's children are named directly under the block (`bn1`, `conv1`, …), and the shortcut's
/// under its own name (`downsample.0` in PreResNet, `shortcut.0` in WideResNet), as in the original code.
/// Both paths take the block's raw input.
#[derive(Debug)]
pub struct Residual<B: Backend> {
    main: Sequential<B>,
    shortcut: Option<(String, Sequential<B>)>,
    /// `relu(main(x) + shortcut(x))` when present.
    output_relu: Option<ReLU<B>>,
}

impl<B: Backend> Residual<B> {
    /// A block from its main path and an optional named shortcut.
    pub fn new(main: Sequential<B>, shortcut: Option<(String, Sequential<B>)>) -> Self {
        Self {
            main,
            shortcut,
            output_relu: None,
        }
    }

    /// The same block with a ReLU applied to the sum.
    pub fn with_output_relu(mut self) -> Self {
        self.output_relu = Some(ReLU::new());
        self
    }

    /// torchvision's ResNet bottleneck (expansion 4), post-activation:
    /// `relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x))))))) + downsample(x))`, with 1×1 → 3×3 (with
    /// `stride`, as torchvision's "ResNet v1.5") → 1×1 to `4·channels`, convolutions without bias, and
    /// `downsample.0` (a strided 1×1 convolution) with `downsample.1` (its BatchNorm) when the shape
    /// changes. Convolutions are He-normal with fan-out, as torchvision initialises them.
    pub fn bottleneck<R: Rng + ?Sized>(
        backend: &B,
        in_channels: usize,
        channels: usize,
        stride: usize,
        rng: &mut R,
    ) -> BackendResult<Self> {
        let out_channels = channels * 4;
        let mut main = Sequential::new();
        for (index, conv) in (1..).zip(bottleneck_convs(in_channels, channels, stride)) {
            let out = conv.out_channels;
            main.push_named(format!("conv{index}"), Conv2d::new(backend, conv, rng)?);
            main.push_named(format!("bn{index}"), BatchNorm2d::new(backend, out)?);
            if index < 3 {
                main.push_named(format!("relu{index}"), ReLU::new());
            }
        }
        let down = preact_conv(in_channels, out_channels, 1, stride);
        let shortcut = match projection(backend, "downsample", down, rng)? {
            Some((name, mut path)) => {
                path.push(BatchNorm2d::new(backend, out_channels)?);
                Some((name, path))
            }
            None => None,
        };
        Ok(Self::new(main, shortcut).with_output_relu())
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
        let mut main = Sequential::new();
        let conv1 = preact_conv(in_channels, channels, 3, stride);
        push_preactivated(backend, &mut main, 1, conv1, rng)?;
        push_preactivated(
            backend,
            &mut main,
            2,
            preact_conv(channels, channels, 3, 1),
            rng,
        )?;
        let down = preact_conv(in_channels, channels, 1, stride);
        let shortcut = projection(backend, "downsample", down, rng)?;
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
        let out_channels = channels * 4;
        let mut main = Sequential::new();
        for (index, conv) in (1..).zip(bottleneck_convs(in_channels, channels, stride)) {
            push_preactivated(backend, &mut main, index, conv, rng)?;
        }
        let down = preact_conv(in_channels, out_channels, 1, stride);
        let shortcut = projection(backend, "downsample", down, rng)?;
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
        let mut main = Sequential::new();
        push_preactivated(
            backend,
            &mut main,
            1,
            wide_conv(in_channels, channels, 3, 1),
            rng,
        )?;
        if dropout_rate > 0.0 {
            main.push_named("dropout", Dropout::new(dropout_rate, dropout_id)?);
        }
        push_preactivated(
            backend,
            &mut main,
            2,
            wide_conv(channels, channels, 3, stride),
            rng,
        )?;
        let short = wide_conv(in_channels, channels, 1, stride);
        let shortcut = projection(backend, "shortcut", short, rng)?;
        Ok(Self::new(main, shortcut))
    }

    /// Whether the block has a projection shortcut (rather than the identity).
    pub fn has_projection(&self) -> bool {
        self.shortcut.is_some()
    }
}

/// A convolution of PreResNet's blocks: no bias, He-normal initialisation, and the padding that keeps a
/// stride-1 output the size of its input.
fn preact_conv(
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    stride: usize,
) -> Conv2dConfig {
    wide_conv(in_channels, out_channels, kernel, stride)
        .bias(false)
        .init(ConvInit::HeNormalFanOut)
}

/// The three convolutions of a bottleneck of expansion 4 (both ResNet families): 1×1 to `channels`, 3×3
/// with the stride, 1×1 to `4·channels`, without bias, He-normal with fan-out.
fn bottleneck_convs(in_channels: usize, channels: usize, stride: usize) -> [Conv2dConfig; 3] {
    [
        preact_conv(in_channels, channels, 1, 1),
        preact_conv(channels, channels, 3, stride),
        preact_conv(channels, channels * 4, 1, 1),
    ]
}

/// A convolution of WideResNet's blocks: a bias, PyTorch's default initialisation, and the padding that
/// keeps a stride-1 output the size of its input.
fn wide_conv(
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    stride: usize,
) -> Conv2dConfig {
    Conv2dConfig::new(in_channels, out_channels, kernel)
        .stride(stride)
        .padding(kernel / 2)
}

/// Appends the pre-activated convolution `index` of a main path: `bn<index>`, `relu<index>`, `conv<index>`.
fn push_preactivated<B: Backend, R: Rng + ?Sized>(
    backend: &B,
    main: &mut Sequential<B>,
    index: usize,
    conv: Conv2dConfig,
    rng: &mut R,
) -> BackendResult<()> {
    main.push_named(
        format!("bn{index}"),
        BatchNorm2d::new(backend, conv.in_channels)?,
    );
    main.push_named(format!("relu{index}"), ReLU::new());
    main.push_named(format!("conv{index}"), Conv2d::new(backend, conv, rng)?);
    Ok(())
}

/// The shortcut `name.0`, a projection by `conv`, when `conv` changes the shape; `None` (the identity)
/// when it would not.
fn projection<B: Backend, R: Rng + ?Sized>(
    backend: &B,
    name: &str,
    conv: Conv2dConfig,
    rng: &mut R,
) -> BackendResult<Option<(String, Sequential<B>)>> {
    if conv.stride == 1 && conv.in_channels == conv.out_channels {
        return Ok(None);
    }
    let projection = Conv2d::new(backend, conv, rng)?;
    Ok(Some((name.to_string(), Sequential::new().with(projection))))
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
    /// The main path reads the input; a projection shortcut then keeps an owned input itself for its
    /// backward pass rather than a copy.
    fn forward_input(
        &mut self,
        backend: &B,
        x: ForwardInput<'_, B>,
        mode: ForwardMode,
    ) -> BackendResult<B::Tensor> {
        let mut y = self.main.forward(backend, x.tensor(), mode)?;
        let projected;
        let shortcut = match &mut self.shortcut {
            Some((_, projection)) => {
                projected = projection.forward_input(backend, x, mode)?;
                &projected
            }
            None => x.tensor(),
        };
        backend.axpy_(&mut y, 1.0, shortcut)?;
        match &mut self.output_relu {
            Some(relu) => relu.forward_input(backend, ForwardInput::Owned(y), mode),
            None => Ok(y),
        }
    }

    fn backward(&mut self, backend: &B, dy: &B::Tensor) -> BackendResult<B::Tensor> {
        let activated;
        let dy = match &mut self.output_relu {
            Some(relu) => {
                activated = relu.backward(backend, dy)?;
                &activated
            }
            None => dy,
        };
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
        if let Some(relu) = &mut self.output_relu {
            relu.zero_grads();
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

    fn visit_batch_norms_mut(&mut self, f: &mut dyn FnMut(&mut BatchNorm2d<B>)) {
        self.main.visit_batch_norms_mut(f);
        if let Some((_, shortcut)) = &mut self.shortcut {
            shortcut.visit_batch_norms_mut(f);
        }
    }
}
