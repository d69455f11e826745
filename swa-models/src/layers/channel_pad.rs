//! Zero-padding in channels, the shortcut of PyramidNet's blocks.

use swa_core::backend::{Backend, BackendError, BackendResult, Conv2dSpec, HasShape};
use swa_core::params::{NamedTensors, TensorRole};

use super::activation::no_tensors;
use super::ForwardCache;
use crate::module::{ForwardInput, ForwardMode, Module, Param};

/// Appends zero channels: `[N, in, H, W] → [N, out, H, W]` with the input in the first `in` channels
/// (PyTorch's `F.pad(x, (0, 0, 0, 0, 0, out − in))`).
///
/// The backend has no channel padding; a 1×1 convolution with a constant weight that embeds the input
/// channels is one (each output element is one product by 1 plus products by 0, so exact), and its
/// gradient, the first `in` channels of the output gradient, is the convolution with the transposed
/// embedding.
#[derive(Debug)]
pub struct ZeroPadChannels<B: Backend> {
    in_channels: usize,
    /// `[out, in, 1, 1]`: the identity on the first `in` output channels.
    embed: B::Tensor,
    /// `[in, out, 1, 1]`: the transpose, which keeps the first `in` channels.
    keep: B::Tensor,
    trained: ForwardCache<()>,
}

impl<B: Backend> ZeroPadChannels<B> {
    /// Pads `in_channels` channels to `out_channels` (at least as many).
    pub fn new(backend: &B, in_channels: usize, out_channels: usize) -> BackendResult<Self> {
        if in_channels == 0 || out_channels < in_channels {
            return Err(BackendError::InvalidArgument {
                op: "ZeroPadChannels::new",
                message: format!(
                    "cannot pad {in_channels} channels to {out_channels}: needs 0 < in ≤ out"
                ),
            });
        }
        let mut embed = vec![0.0; out_channels * in_channels];
        let mut keep = vec![0.0; out_channels * in_channels];
        for c in 0..in_channels {
            embed[c * in_channels + c] = 1.0;
            keep[c * out_channels + c] = 1.0;
        }
        Ok(Self {
            in_channels,
            embed: backend.from_host(&embed, &[out_channels, in_channels, 1, 1])?,
            keep: backend.from_host(&keep, &[in_channels, out_channels, 1, 1])?,
            trained: ForwardCache::new(),
        })
    }

    const SPEC: Conv2dSpec = Conv2dSpec {
        stride: 1,
        padding: 0,
    };
}

no_tensors!(ZeroPadChannels);

impl<B: Backend> Module<B> for ZeroPadChannels<B> {
    fn forward_input(
        &mut self,
        backend: &B,
        x: ForwardInput<'_, B>,
        mode: ForwardMode,
    ) -> BackendResult<B::Tensor> {
        let channels = x.tensor().dims().get(1).copied();
        if channels != Some(self.in_channels) {
            return Err(BackendError::ShapeMismatch {
                op: "ZeroPadChannels::forward",
                expected: format!("[N, {}, H, W]", self.in_channels),
                got: x.tensor().dims().to_vec(),
            });
        }
        let y = backend.conv2d(x.tensor(), &self.embed, None, Self::SPEC)?;
        self.trained.keep_with(mode, || ());
        Ok(y)
    }

    fn backward(&mut self, backend: &B, dy: &B::Tensor) -> BackendResult<B::Tensor> {
        self.trained.take("ZeroPadChannels::backward")?;
        backend.conv2d(dy, &self.keep, None, Self::SPEC)
    }

    fn visit_params_mut(&mut self, _f: &mut dyn FnMut(&str, &mut Param<B>)) {}

    fn zero_grads(&mut self) {
        self.trained.clear();
    }
}
