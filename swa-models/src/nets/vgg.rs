//! VGG-16 for 32×32 images, as in the original SWA code (`models/vgg.py`).

use rand::Rng;
use swa_core::backend::{Backend, BackendResult};

use crate::layers::{
    BatchNorm2d, Conv2d, Conv2dConfig, ConvInit, Dropout, Flatten, Linear, MaxPool2d, ReLU,
    Sequential,
};

/// Output channels of each 3×3 convolution, `None` for a 2×2 max pooling.
const CONFIG: [Option<usize>; 18] = [
    Some(64),
    Some(64),
    None,
    Some(128),
    Some(128),
    None,
    Some(256),
    Some(256),
    Some(256),
    None,
    Some(512),
    Some(512),
    Some(512),
    None,
    Some(512),
    Some(512),
    Some(512),
    None,
];

/// `features` (13 convolutions with ReLU, optionally BatchNorm, and 5 max poolings, numbered as one
/// `nn.Sequential`), then `classifier`: Dropout → Linear 512→512 → ReLU → Dropout → Linear 512→512 → ReLU
/// → Linear 512→classes.
pub(super) fn build<B: Backend, R: Rng + ?Sized>(
    backend: &B,
    classes: usize,
    batch_norm: bool,
    rng: &mut R,
) -> BackendResult<Sequential<B>> {
    let mut features = Sequential::new();
    let mut channels = 3;
    for entry in CONFIG {
        match entry {
            None => features.push(MaxPool2d::new(2, 2)?),
            Some(out) => {
                let config = Conv2dConfig::new(channels, out, 3)
                    .padding(1)
                    .init(ConvInit::HeNormalFanOut);
                features.push(Conv2d::new(backend, config, rng)?);
                if batch_norm {
                    features.push(BatchNorm2d::new(backend, out)?);
                }
                features.push(ReLU::new());
                channels = out;
            }
        }
    }
    let mut classifier = Sequential::new();
    classifier.push(Dropout::new(0.5, 0)?);
    classifier.push(Linear::new(backend, 512, 512, rng)?);
    classifier.push(ReLU::new());
    classifier.push(Dropout::new(0.5, 1)?);
    classifier.push(Linear::new(backend, 512, 512, rng)?);
    classifier.push(ReLU::new());
    classifier.push(Linear::new(backend, 512, classes, rng)?);
    Ok(Sequential::new()
        .with_named("features", features)
        .with_named("flatten", Flatten::new())
        .with_named("classifier", classifier))
}
