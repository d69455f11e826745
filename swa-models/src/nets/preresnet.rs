//! Pre-activation ResNet for 32×32 images, as in the original SWA code (`models/preresnet.py`).

use rand::Rng;
use swa_core::backend::{Backend, BackendResult};

use crate::layers::{
    AvgPool2d, BatchNorm2d, Conv2d, Conv2dConfig, ConvInit, Flatten, Linear, ReLU, Residual,
    Sequential,
};

/// Whether a depth uses bottleneck blocks, and how many blocks each of the three stages has.
pub(super) fn blocks_per_stage(depth: usize) -> (bool, usize) {
    if depth >= 44 {
        (true, depth.saturating_sub(2) / 9)
    } else {
        (false, depth.saturating_sub(2) / 6)
    }
}

/// `conv1` (3×3, 3→16), `layer1..3` (widths 16, 32, 64; strides 1, 2, 2), then `bn`, ReLU, 8×8 average
/// pooling and `fc`.
pub(super) fn build<B: Backend, R: Rng + ?Sized>(
    backend: &B,
    classes: usize,
    depth: usize,
    rng: &mut R,
) -> BackendResult<Sequential<B>> {
    let (bottleneck, blocks) = blocks_per_stage(depth);
    let expansion = if bottleneck { 4 } else { 1 };
    let mut body = Sequential::new();
    let conv1 = Conv2dConfig::new(3, 16, 3)
        .padding(1)
        .bias(false)
        .init(ConvInit::HeNormalFanOut);
    body.push_named("conv1", Conv2d::new(backend, conv1, rng)?);
    let mut in_channels = 16;
    for (stage, (width, stride)) in [(16, 1), (32, 2), (64, 2)].into_iter().enumerate() {
        let mut layer = Sequential::new();
        for block in 0..blocks {
            let stride = if block == 0 { stride } else { 1 };
            let residual = if bottleneck {
                Residual::preact_bottleneck(backend, in_channels, width, stride, rng)?
            } else {
                Residual::preact_basic(backend, in_channels, width, stride, rng)?
            };
            layer.push(residual);
            in_channels = width * expansion;
        }
        body.push_named(format!("layer{}", stage + 1), layer);
    }
    body.push_named("bn", BatchNorm2d::new(backend, in_channels)?);
    body.push_named("relu", ReLU::new());
    body.push_named("avgpool", AvgPool2d::new(8)?);
    body.push_named("flatten", Flatten::new());
    body.push_named("fc", Linear::new(backend, in_channels, classes, rng)?);
    Ok(body)
}
