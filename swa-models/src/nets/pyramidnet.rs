//! PyramidNet for 32×32 images (Han, Kim and Kim, "Deep Pyramidal Residual Networks", 2017), with the
//! tensor names of `xtask/torch/cifar_networks.py`.

use rand::Rng;
use swa_core::backend::{Backend, BackendResult};

use crate::layers::{
    AvgPool2d, BatchNorm2d, Conv2d, Conv2dConfig, ConvInit, Flatten, Linear, ReLU, Residual,
    Sequential, ZeroPadChannels,
};

/// The number of blocks per stage: depth `6n + 2` with basic blocks, `9n + 2` with bottlenecks.
pub(super) fn blocks_per_stage(depth: usize, bottleneck: bool) -> usize {
    depth.saturating_sub(2) / if bottleneck { 9 } else { 6 }
}

/// The widths of the blocks, in order: the width grows by `alpha / (3n)` at every block from 16 and is
/// rounded down, as in the authors' Torch code (rounding to nearest gives PyramidNet-272 (α = 200)
/// 26.2M parameters instead of the published 26.0M). The sum is accumulated in `f64`, as Python does.
pub(super) fn block_widths(depth: usize, alpha: usize, bottleneck: bool) -> Vec<usize> {
    let blocks = 3 * blocks_per_stage(depth, bottleneck);
    let add_rate = alpha as f64 / blocks as f64;
    let mut width = 16.0f64;
    (0..blocks)
        .map(|_| {
            width += add_rate;
            width.floor() as usize
        })
        .collect()
}

fn conv(in_channels: usize, out_channels: usize, kernel: usize, stride: usize) -> Conv2dConfig {
    Conv2dConfig::new(in_channels, out_channels, kernel)
        .stride(stride)
        .padding(kernel / 2)
        .bias(false)
        .init(ConvInit::HeNormalFanOut)
}

/// A PyramidNet block: `bn1 → conv1 → bn2 → relu → conv2 → bn3` (basic, 3×3 convolutions, the first with
/// `stride`) or `bn1 → conv1 (1×1) → bn2 → relu2 → conv2 (3×3, stride) → bn3 → relu3 → conv3 (1×1, ×4)
/// → bn4` (bottleneck), plus the input 2×2 average-pooled when `stride` is 2 and zero-padded to the
/// output's channels.
fn block<B: Backend, R: Rng + ?Sized>(
    backend: &B,
    in_channels: usize,
    width: usize,
    stride: usize,
    bottleneck: bool,
    rng: &mut R,
) -> BackendResult<Residual<B>> {
    let mut main = Sequential::new();
    main.push_named("bn1", BatchNorm2d::new(backend, in_channels)?);
    let out_channels = if bottleneck {
        main.push_named(
            "conv1",
            Conv2d::new(backend, conv(in_channels, width, 1, 1), rng)?,
        );
        main.push_named("bn2", BatchNorm2d::new(backend, width)?);
        main.push_named("relu2", ReLU::new());
        main.push_named(
            "conv2",
            Conv2d::new(backend, conv(width, width, 3, stride), rng)?,
        );
        main.push_named("bn3", BatchNorm2d::new(backend, width)?);
        main.push_named("relu3", ReLU::new());
        main.push_named(
            "conv3",
            Conv2d::new(backend, conv(width, 4 * width, 1, 1), rng)?,
        );
        main.push_named("bn4", BatchNorm2d::new(backend, 4 * width)?);
        4 * width
    } else {
        main.push_named(
            "conv1",
            Conv2d::new(backend, conv(in_channels, width, 3, stride), rng)?,
        );
        main.push_named("bn2", BatchNorm2d::new(backend, width)?);
        main.push_named("relu", ReLU::new());
        main.push_named(
            "conv2",
            Conv2d::new(backend, conv(width, width, 3, 1), rng)?,
        );
        main.push_named("bn3", BatchNorm2d::new(backend, width)?);
        width
    };
    let mut shortcut = Sequential::new();
    if stride != 1 {
        shortcut.push_named("pool", AvgPool2d::new(stride)?);
    }
    if out_channels != in_channels {
        shortcut.push_named(
            "pad",
            ZeroPadChannels::new(backend, in_channels, out_channels)?,
        );
    }
    let shortcut = (!shortcut.is_empty()).then(|| ("shortcut".to_string(), shortcut));
    Ok(Residual::new(main, shortcut))
}

/// `conv1` (3×3, 3→16) and `bn1`, `layer1..3` of pyramidal blocks (strides 1, 2, 2), then `bn_final`,
/// ReLU, 8×8 average pooling and `fc`.
pub(super) fn build<B: Backend, R: Rng + ?Sized>(
    backend: &B,
    classes: usize,
    depth: usize,
    alpha: usize,
    bottleneck: bool,
    rng: &mut R,
) -> BackendResult<Sequential<B>> {
    let blocks = blocks_per_stage(depth, bottleneck);
    let widths = block_widths(depth, alpha, bottleneck);
    let mut body = Sequential::new();
    body.push_named("conv1", Conv2d::new(backend, conv(3, 16, 3, 1), rng)?);
    body.push_named("bn1", BatchNorm2d::new(backend, 16)?);
    let mut in_channels = 16;
    for (stage, (stage_widths, stride)) in widths.chunks(blocks.max(1)).zip([1, 2, 2]).enumerate() {
        let mut layer = Sequential::new();
        for (index, &width) in stage_widths.iter().enumerate() {
            let stride = if index == 0 { stride } else { 1 };
            layer.push(block(backend, in_channels, width, stride, bottleneck, rng)?);
            in_channels = if bottleneck { 4 * width } else { width };
        }
        body.push_named(format!("layer{}", stage + 1), layer);
    }
    body.push_named("bn_final", BatchNorm2d::new(backend, in_channels)?);
    body.push_named("relu", ReLU::new());
    body.push_named("avgpool", AvgPool2d::new(8)?);
    body.push_named("flatten", Flatten::new());
    body.push_named("fc", Linear::new(backend, in_channels, classes, rng)?);
    Ok(body)
}
