//! Layers of the paper's networks, each a [`Module`](crate::Module) with PyTorch's tensor names.
//!
//! Every layer caches, during a [`ForwardMode::Train`](crate::ForwardMode::Train) pass only, exactly what
//! its backward pass needs (its input, its output, BatchNorm's batch statistics or a dropout mask) and
//! releases it in `backward` or [`Module::zero_grads`](crate::Module::zero_grads). Evaluation and BatchNorm
//! recomputation cache nothing.

mod activation;
mod conv;
pub mod gradcheck;
mod init;
mod linear;
mod norm;
mod pool;
mod residual;
mod sequential;

pub use activation::{Dropout, ReLU};
pub use conv::{Conv2d, Conv2dConfig};
pub use init::ConvInit;
pub use linear::Linear;
pub use norm::BatchNorm2d;
pub use pool::{AvgPool2d, Flatten, MaxPool2d};
pub use residual::Residual;
pub use sequential::Sequential;

use swa_core::backend::BackendError;

/// The error of a `backward` call with no training forward pass cached before it.
pub(crate) fn no_cached_forward(op: &'static str) -> BackendError {
    BackendError::InvalidArgument {
        op,
        message: "backward called without a preceding forward pass in ForwardMode::Train".into(),
    }
}

/// Mixes a step's dropout seed with a layer's id, so that every dropout layer draws its own mask and the
/// masks of one layer differ from step to step (SplitMix64's finaliser on both words).
pub fn mix_seed(seed: u64, layer_id: u64) -> u64 {
    fn splitmix64(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    splitmix64(seed ^ splitmix64(layer_id))
}
