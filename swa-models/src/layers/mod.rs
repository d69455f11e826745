//! Layers of the paper's networks, each a [`Module`](crate::Module) with PyTorch's tensor names.
//!
//! Every layer keeps in a [`ForwardCache`], during a [`ForwardMode::Train`] pass only, exactly what its
//! backward pass needs (its input, BatchNorm's batch statistics, a dropout mask or an input shape) and
//! releases it in `backward` or [`Module::zero_grads`](crate::Module::zero_grads). Evaluation and BatchNorm
//! recomputation keep nothing.

mod activation;
mod channel_pad;
mod conv;
mod dense;
pub mod gradcheck;
mod init;
mod linear;
mod norm;
mod norm_sync;
mod pool;
mod residual;
mod sequential;
mod shake;

pub use activation::{Dropout, ReLU};
pub use channel_pad::ZeroPadChannels;
pub use conv::{Conv2d, Conv2dConfig};
pub use dense::DenseBlock;
pub use init::ConvInit;
pub use linear::Linear;
pub use norm::BatchNorm2d;
pub use norm_sync::BatchNormSync;
pub use pool::{AvgPool2d, Flatten, MaxPool2d};
pub use residual::Residual;
pub use sequential::Sequential;
pub use shake::{
    shake_coefficients, ShakeBackward, ShakeBlock, ShakeForward, ShakeMix, ShakeShortcut,
};

use swa_core::backend::{Backend, BackendError, BackendResult};

use crate::module::{ForwardInput, ForwardMode};

/// What a layer keeps from a [`ForwardMode::Train`] pass for its backward pass: its input, a dropout mask,
/// an input shape. Other modes keep nothing, and `backward` takes what the last training pass kept.
#[derive(Debug)]
pub struct ForwardCache<T> {
    kept: Option<T>,
}

impl<T> Default for ForwardCache<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> ForwardCache<T> {
    /// An empty cache.
    pub const fn new() -> Self {
        Self { kept: None }
    }

    /// In [`ForwardMode::Train`], keeps what `make` returns; in other modes does not call it.
    pub fn keep_with(&mut self, mode: ForwardMode, make: impl FnOnce() -> T) {
        if let ForwardMode::Train { .. } = mode {
            self.kept = Some(make());
        }
    }

    /// [`ForwardCache::keep_with`] for a value whose making can fail.
    pub fn try_keep_with(
        &mut self,
        mode: ForwardMode,
        make: impl FnOnce() -> BackendResult<T>,
    ) -> BackendResult<()> {
        if let ForwardMode::Train { .. } = mode {
            self.kept = Some(make()?);
        }
        Ok(())
    }

    /// In [`ForwardMode::Train`], keeps the forward pass's input: an owned input as it is, a borrowed one
    /// copied.
    pub fn keep_input<B: Backend<Tensor = T>>(
        &mut self,
        backend: &B,
        x: ForwardInput<'_, B>,
        mode: ForwardMode,
    ) -> BackendResult<()> {
        self.try_keep_with(mode, || x.into_owned(backend))
    }

    /// Takes what the last training pass kept, for the backward pass `op`; an error when nothing is kept
    /// (no training forward pass since the last backward pass or [`ForwardCache::clear`]).
    pub fn take(&mut self, op: &'static str) -> BackendResult<T> {
        self.kept
            .take()
            .ok_or_else(|| BackendError::InvalidArgument {
                op,
                message: "backward called without a preceding forward pass in ForwardMode::Train"
                    .into(),
            })
    }

    /// Drops what is kept.
    pub fn clear(&mut self) {
        self.kept = None;
    }
}

/// Mixes a step's dropout seed with a layer's id, so that every dropout layer draws its own mask and the
/// masks of one layer differ from step to step (a SplitMix64 step on both words).
pub fn mix_seed(seed: u64, layer_id: u64) -> u64 {
    use swa_core::seed::splitmix64;
    splitmix64(seed ^ splitmix64(layer_id))
}
