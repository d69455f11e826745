//! torchvision's ResNet with bottleneck blocks (ResNet-50, -101, -152), for ImageNet-sized inputs.

use rand::Rng;
use swa_core::backend::{Backend, BackendResult};

use crate::layers::{
    AvgPool2d, BatchNorm2d, Conv2d, Conv2dConfig, ConvInit, Flatten, Linear, MaxPool2d, ReLU,
    Residual, Sequential,
};

/// Bottleneck blocks per stage for a depth: torchvision's for 50, 101 and 152, and `n` in every stage
/// for other depths `12n + 2` (the reduced networks of tests and fixtures).
pub(super) fn blocks_per_stage(depth: usize) -> Option<[usize; 4]> {
    match depth {
        50 => Some([3, 4, 6, 3]),
        101 => Some([3, 4, 23, 3]),
        152 => Some([3, 8, 36, 3]),
        _ if depth >= 14 && (depth - 2).is_multiple_of(12) => Some([(depth - 2) / 12; 4]),
        _ => None,
    }
}

/// `conv1` (7×7, stride 2, 3→`width`), `bn1`, ReLU, 3×3 max pooling with stride 2 and padding 1, then
/// `layer1..4` of bottlenecks (widths `width`, 2, 4 and 8 times that, the last three strided), global
/// average pooling and `fc` from `32·width` features, with torchvision's tensor names and initialisation.
pub(super) fn build<B: Backend, R: Rng + ?Sized>(
    backend: &B,
    classes: usize,
    blocks: [usize; 4],
    width: usize,
    rng: &mut R,
) -> BackendResult<Sequential<B>> {
    let mut body = Sequential::new();
    let stem = Conv2dConfig::new(3, width, 7)
        .stride(2)
        .padding(3)
        .bias(false)
        .init(ConvInit::HeNormalFanOut);
    body.push_named("conv1", Conv2d::new(backend, stem, rng)?);
    body.push_named("bn1", BatchNorm2d::new(backend, width)?);
    body.push_named("relu", ReLU::new());
    body.push_named("maxpool", MaxPool2d::padded(3, 2, 1)?);
    let mut in_channels = width;
    for (stage, &count) in blocks.iter().enumerate() {
        let channels = width << stage;
        let mut layer = Sequential::new();
        for block in 0..count {
            let stride = if stage > 0 && block == 0 { 2 } else { 1 };
            layer.push(Residual::bottleneck(
                backend,
                in_channels,
                channels,
                stride,
                rng,
            )?);
            in_channels = channels * 4;
        }
        body.push_named(format!("layer{}", stage + 1), layer);
    }
    body.push_named("avgpool", AvgPool2d::global());
    body.push_named("flatten", Flatten::new());
    body.push_named("fc", Linear::new(backend, in_channels, classes, rng)?);
    Ok(body)
}
