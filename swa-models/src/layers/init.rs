//! Host-side initialisation, drawn from a seeded generator so that a network is a pure function of its
//! configuration and seed.

use rand::Rng;
use rand_distr::{Distribution, StandardNormal};

/// How a convolution's weights (and bias, when it has one) are initialised.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvInit {
    /// The original SWA code's `_conv_init` for VGG and PreResNet: weights from
    /// `N(0, sqrt(2 / (k·k·out_channels)))`, bias zero.
    HeNormalFanOut,
    /// PyTorch's `kaiming_normal_` with its defaults, which torchvision's DenseNets use: weights from
    /// `N(0, sqrt(2 / (k·k·in_channels)))`, bias zero.
    HeNormalFanIn,
    /// PyTorch's default `Conv2d` initialisation, `kaiming_uniform_(a = √5)`, which the WideResNet code keeps:
    /// weights and bias from `U(−1/√fan_in, 1/√fan_in)` with `fan_in = in_channels·k·k`.
    TorchDefault,
}

/// `n` samples of `N(0, std)`.
pub(crate) fn normal<R: Rng + ?Sized>(rng: &mut R, n: usize, std: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let z: f32 = StandardNormal.sample(rng);
            z * std
        })
        .collect()
}

/// `n` samples of `U(−bound, bound)`.
pub(crate) fn uniform<R: Rng + ?Sized>(rng: &mut R, n: usize, bound: f32) -> Vec<f32> {
    (0..n)
        .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * bound)
        .collect()
}

/// The bound of PyTorch's default `kaiming_uniform_(a = √5)` weights and of its default biases:
/// `gain · √(3 / fan_in)` with `gain = √(2 / (1 + 5))`, which is `1 / √fan_in`.
pub(crate) fn torch_default_bound(fan_in: usize) -> f32 {
    1.0 / (fan_in.max(1) as f32).sqrt()
}
