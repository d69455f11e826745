//! torchvision's DenseNet-BC (DenseNet-121, -161, -169, -201), for ImageNet-sized inputs, with dense blocks
//! that never copy the concatenation a layer reads ([`DenseBlock`]).

use rand::Rng;
use swa_core::backend::{Backend, BackendResult};

use crate::layers::{
    AvgPool2d, BatchNorm2d, Conv2d, Conv2dConfig, ConvInit, DenseBlock, Flatten, Linear, MaxPool2d,
    ReLU, Sequential,
};

/// The shape of a DenseNet: layers per block, the growth rate and the stem's width.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct DenseNetShape {
    /// Dense layers in each of the four blocks.
    pub blocks: [usize; 4],
    /// Channels each dense layer adds.
    pub growth: usize,
    /// Channels of the stem (torchvision's `num_init_features`).
    pub init_features: usize,
}

/// torchvision's bottleneck factor (`bn_size`): a dense layer's 1×1 convolution puts out this many
/// times the growth rate.
const BOTTLENECK_FACTOR: usize = 4;

/// The growth rate torchvision gives a depth: 48 for DenseNet-161, 32 for the others.
pub(super) fn default_growth(depth: usize) -> usize {
    if depth == 161 {
        48
    } else {
        32
    }
}

/// Dense layers per block for a depth: torchvision's for 121, 161, 169 and 201, and `n` in every block
/// for other depths `8n + 5` (the reduced networks of tests and fixtures). The depth counts two
/// convolutions per dense layer, the stem, the three transitions and the classifier.
pub(super) fn blocks_per_depth(depth: usize) -> Option<[usize; 4]> {
    match depth {
        121 => Some([6, 12, 24, 16]),
        161 => Some([6, 12, 36, 24]),
        169 => Some([6, 12, 32, 32]),
        201 => Some([6, 12, 48, 32]),
        _ if depth >= 13 && (depth - 5).is_multiple_of(8) => Some([(depth - 5) / 8; 4]),
        _ => None,
    }
}

/// `features` (`conv0`: 7×7, stride 2, 3→`init_features`; `norm0`; `relu0`; `pool0`: 3×3 max pooling
/// with stride 2 and padding 1; `denseblock1..4` with `transition1..3` between them, each a BatchNorm,
/// ReLU, 1×1 convolution halving the channels (rounded down) and 2×2 average pooling; `norm5`), then a
/// ReLU, global average pooling and `classifier`, with torchvision's tensor names and initialisation
/// (convolutions He-normal with fan-in, the classifier's bias zero).
pub(super) fn build<B: Backend, R: Rng + ?Sized>(
    backend: &B,
    classes: usize,
    shape: DenseNetShape,
    rng: &mut R,
) -> BackendResult<Sequential<B>> {
    let conv = |cin, cout, k| {
        Conv2dConfig::new(cin, cout, k)
            .bias(false)
            .init(ConvInit::HeNormalFanIn)
    };
    let mut features = Sequential::new();
    let stem = conv(3, shape.init_features, 7).stride(2).padding(3);
    features.push_named("conv0", Conv2d::new(backend, stem, rng)?);
    features.push_named("norm0", BatchNorm2d::new(backend, shape.init_features)?);
    features.push_named("relu0", ReLU::new());
    features.push_named("pool0", MaxPool2d::padded(3, 2, 1)?);
    let mut channels = shape.init_features;
    for (index, &layers) in shape.blocks.iter().enumerate() {
        let block = DenseBlock::new(
            backend,
            layers,
            channels,
            shape.growth,
            BOTTLENECK_FACTOR,
            rng,
        )?;
        channels = block.out_channels();
        features.push_named(format!("denseblock{}", index + 1), block);
        if index + 1 < shape.blocks.len() {
            let halved = channels / 2;
            let mut transition = Sequential::new();
            transition.push_named("norm", BatchNorm2d::new(backend, channels)?);
            transition.push_named("relu", ReLU::new());
            transition.push_named(
                "conv",
                Conv2d::new(backend, conv(channels, halved, 1), rng)?,
            );
            transition.push_named("pool", AvgPool2d::new(2)?);
            features.push_named(format!("transition{}", index + 1), transition);
            channels = halved;
        }
    }
    features.push_named("norm5", BatchNorm2d::new(backend, channels)?);
    let mut body = Sequential::new();
    body.push_named("features", features);
    body.push_named("relu", ReLU::new());
    body.push_named("avgpool", AvgPool2d::global());
    body.push_named("flatten", Flatten::new());
    body.push_named("classifier", classifier(backend, channels, classes, rng)?);
    Ok(body)
}

/// torchvision's classifier: PyTorch's default weights, and a zero bias.
fn classifier<B: Backend, R: Rng + ?Sized>(
    backend: &B,
    features: usize,
    classes: usize,
    rng: &mut R,
) -> BackendResult<Linear<B>> {
    let drawn = Linear::new(backend, features, classes, rng)?;
    let weight = backend.duplicate(&drawn.weight().value)?;
    Linear::from_tensors(weight, backend.zeros(&[classes])?)
}
