//! Shake-Shake for 32×32 images (Gastaldi, "Shake-Shake regularization", 2017), with the tensor names of
//! `xtask/torch/cifar_networks.py`.

use rand::Rng;
use swa_core::backend::{Backend, BackendResult};

use crate::layers::{
    AvgPool2d, BatchNorm2d, Conv2d, Conv2dConfig, ConvInit, Flatten, Linear, ReLU, Sequential,
    ShakeBlock, ShakeMix,
};

/// `conv1` (3×3, 3→16) and `bn1`, `layer1..3` of `(depth − 2) / 6` Shake-Shake blocks (widths `width`,
/// `2·width`, `4·width`; strides 1, 2, 2), then ReLU, 8×8 average pooling and `fc`.
pub(super) fn build<B: Backend, R: Rng + ?Sized>(
    backend: &B,
    classes: usize,
    depth: usize,
    width: usize,
    mix: ShakeMix,
    rng: &mut R,
) -> BackendResult<Sequential<B>> {
    let blocks = depth.saturating_sub(2) / 6;
    let mut body = Sequential::new();
    let conv1 = Conv2dConfig::new(3, 16, 3)
        .padding(1)
        .bias(false)
        .init(ConvInit::HeNormalFanOut);
    body.push_named("conv1", Conv2d::new(backend, conv1, rng)?);
    body.push_named("bn1", BatchNorm2d::new(backend, 16)?);
    let mut in_channels = 16;
    let mut block_id = 0;
    for (stage, (channels, stride)) in [(width, 1), (2 * width, 2), (4 * width, 2)]
        .into_iter()
        .enumerate()
    {
        let mut layer = Sequential::new();
        for block in 0..blocks {
            let stride = if block == 0 { stride } else { 1 };
            let shake =
                ShakeBlock::new(backend, in_channels, channels, stride, mix, block_id, rng)?;
            layer.push(shake);
            block_id += 1;
            in_channels = channels;
        }
        body.push_named(format!("layer{}", stage + 1), layer);
    }
    body.push_named("relu", ReLU::new());
    body.push_named("avgpool", AvgPool2d::new(8)?);
    body.push_named("flatten", Flatten::new());
    body.push_named("fc", Linear::new(backend, in_channels, classes, rng)?);
    Ok(body)
}
