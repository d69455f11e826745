//! Wide ResNet for 32×32 images, as in the original SWA code (`models/wide_resnet.py`).

use rand::Rng;
use swa_core::backend::{Backend, BackendResult};

use crate::layers::{
    AvgPool2d, BatchNorm2d, Conv2d, Conv2dConfig, Flatten, Linear, ReLU, Residual, Sequential,
};

/// The momentum of the final BatchNorm in the original code (`nn.BatchNorm2d(w, momentum=0.9)`), kept so
/// that running statistics evolve as they do there.
const FINAL_BN_MOMENTUM: f32 = 0.9;

/// `conv1` (3×3, 3→16, biased), `layer1..3` of `(depth − 4) / 6` wide basic blocks (widths 16k, 32k, 64k;
/// strides 1, 2, 2), then `bn1`, ReLU, 8×8 average pooling and `linear`.
pub(super) fn build<B: Backend, R: Rng + ?Sized>(
    backend: &B,
    classes: usize,
    depth: usize,
    widen_factor: usize,
    dropout_rate: f32,
    rng: &mut R,
) -> BackendResult<Sequential<B>> {
    let blocks = depth.saturating_sub(4) / 6;
    let mut body = Sequential::new();
    body.push_named(
        "conv1",
        Conv2d::new(backend, Conv2dConfig::new(3, 16, 3).padding(1), rng)?,
    );
    let mut in_channels = 16;
    let mut dropout_id = 0;
    for (stage, (width, stride)) in [(16, 1), (32, 2), (64, 2)].into_iter().enumerate() {
        let width = width * widen_factor;
        let mut layer = Sequential::new();
        for block in 0..blocks {
            let stride = if block == 0 { stride } else { 1 };
            layer.push(Residual::wide_basic(
                backend,
                in_channels,
                width,
                stride,
                dropout_rate,
                dropout_id,
                rng,
            )?);
            dropout_id += 1;
            in_channels = width;
        }
        body.push_named(format!("layer{}", stage + 1), layer);
    }
    let bn1 = BatchNorm2d::new(backend, in_channels)?.with_momentum(FINAL_BN_MOMENTUM);
    body.push_named("bn1", bn1);
    body.push_named("relu", ReLU::new());
    body.push_named("avgpool", AvgPool2d::new(8)?);
    body.push_named("flatten", Flatten::new());
    body.push_named("linear", Linear::new(backend, in_channels, classes, rng)?);
    Ok(body)
}
