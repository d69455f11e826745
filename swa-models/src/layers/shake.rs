//! Shake-Shake's two-branch residual block (Gastaldi, "Shake-Shake regularization", 2017).
//!
//! A block computes `shortcut(x) + α·branch1(x) + (1 − α)·branch2(x)` with a coefficient `α` per image
//! drawn from U(0, 1) at every training pass, and back-propagates with an independent `β` from U(0, 1) in
//! place of `α` ("Shake-Shake-Image"); evaluation uses `α = 0.5`. The paper's other variants (the even
//! mix `0.5`, and `β = α`) are [`ShakeMix`] settings; `β = α` makes the backward pass the true gradient
//! of the forward pass, which is what a finite-difference check needs.
//!
//! The coefficients are a pure function of the pass's seed, the block's id and the image's index in the
//! batch (see [`shake_coefficients`]), so a resumed run draws exactly what the uninterrupted one drew.
//!
//! The per-image mix is the backend's `scale_per_image`. The backend has no channel concatenation or
//! pixel shift; the shortcut composes them from a convolution and matrix products that every backend
//! has (see [`ShakeShortcut`]).

use rand::Rng;
use swa_core::backend::{Backend, BackendError, BackendResult, Conv2dSpec, HasShape};
use swa_core::params::{NamedTensors, TensorRole};
use swa_core::seed::fold_words;

use super::init::normal;
use super::{
    mix_seed, BatchNorm2d, Conv2d, Conv2dConfig, ConvInit, ForwardCache, ReLU, Sequential,
};
use crate::module::{child_name, ForwardInput, ForwardMode, Module, Param};

/// How the forward pass mixes the branches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShakeForward {
    /// `α ~ U(0, 1)` per image in training and BatchNorm recomputation, `0.5` in evaluation.
    Shake,
    /// `α = 0.5` always.
    Even,
}

/// Which coefficient the backward pass scales the branches' gradients with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShakeBackward {
    /// An independent `β ~ U(0, 1)` per image.
    Shake,
    /// `β = 0.5`.
    Even,
    /// `β = α`: the exact gradient of the forward pass.
    Keep,
}

/// A block's mixing rule: the paper's `<forward>-<backward>-Image` variants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShakeMix {
    /// The forward coefficient.
    pub forward: ShakeForward,
    /// The backward coefficient.
    pub backward: ShakeBackward,
}

impl ShakeMix {
    /// Shake-Shake-Image, the paper's CIFAR-10 setting.
    pub const SHAKE_SHAKE: Self = Self {
        forward: ShakeForward::Shake,
        backward: ShakeBackward::Shake,
    };
    /// Shake-Keep-Image: the same forward pass, back-propagated with the forward coefficient.
    pub const SHAKE_KEEP: Self = Self {
        forward: ShakeForward::Shake,
        backward: ShakeBackward::Keep,
    };
}

impl Default for ShakeMix {
    fn default() -> Self {
        Self::SHAKE_SHAKE
    }
}

/// The coefficients `(α, β)` of each image of a batch of `batch` images, for a pass seeded with `seed`
/// through the block `block_id`: `α_n` and `β_n` are the top 24 bits of
/// `fold_words(mix_seed(seed, block_id), [0, n])` and `[1, n]` over 2²⁴, uniform in `[0, 1)`.
pub fn shake_coefficients(seed: u64, block_id: u64, batch: usize) -> (Vec<f32>, Vec<f32>) {
    let stream = mix_seed(seed, block_id);
    let draw = |which: u64| -> Vec<f32> {
        (0..batch as u64)
            .map(|n| (fold_words(stream, &[which, n]) >> 40) as f32 / (1u64 << 24) as f32)
            .collect()
    };
    (draw(0), draw(1))
}

/// `(a ⊙ s, b ⊙ (1 − s))` with `s[n]` the coefficient of image `n`.
fn mix_per_image<B: Backend>(
    backend: &B,
    a: &B::Tensor,
    b: &B::Tensor,
    s: &[f32],
) -> BackendResult<(B::Tensor, B::Tensor)> {
    let complement: Vec<f32> = s.iter().map(|v| 1.0 - v).collect();
    let first = backend.scale_per_image(a, &backend.from_host(s, &[s.len()])?)?;
    let second = backend.scale_per_image(b, &backend.from_host(&complement, &[s.len()])?)?;
    Ok((first, second))
}

/// Shake-Shake's shortcut where a block changes the shape: on the block's rectified input (the ReLU is
/// the block's, shared with its branches), two 1×1 convolutions `conv1` and `conv2` of `out/2` channels
/// each, the second reading the input shifted by one pixel right and down (zero-filled), both subsampled
/// by the stride, concatenated in channels and batch-normalised (`bn`).
///
/// The subsampling, the shift and the concatenation are one 3×3 convolution with padding 1 and the
/// block's stride, whose weight holds `conv1` at the kernel's centre for the first `out/2` output
/// channels and `conv2` at its bottom-right corner for the others: the centre reads pixel `(s·i, s·j)`
/// and the corner `(s·i + 1, s·j + 1)`, zero past the border. That weight is formed on the device from
/// the two parameters by matrix products with constant selection matrices, and its gradient is split
/// back the same way.
#[derive(Debug)]
pub struct ShakeShortcut<B: Backend> {
    conv1: Param<B>,
    conv2: Param<B>,
    bn: BatchNorm2d<B>,
    stride: usize,
    in_channels: usize,
    out_channels: usize,
    /// `[out, out/2]`: the identity on the first `out/2` rows, zero below.
    upper: B::Tensor,
    /// `[out, out/2]`: zero above, the identity on the last `out/2` rows.
    lower: B::Tensor,
    /// `[1, 9]`: the kernel's centre tap.
    centre: B::Tensor,
    /// `[1, 9]`: the kernel's bottom-right tap.
    corner: B::Tensor,
    /// The (rectified) input and the combined weight of the last training pass.
    kept: ForwardCache<(B::Tensor, B::Tensor)>,
}

impl<B: Backend> ShakeShortcut<B> {
    /// A shortcut from `in_channels` to `out_channels` (even) with `stride`, its convolutions initialised
    /// He-normal (fan-out).
    pub fn new<R: Rng + ?Sized>(
        backend: &B,
        in_channels: usize,
        out_channels: usize,
        stride: usize,
        rng: &mut R,
    ) -> BackendResult<Self> {
        if in_channels == 0 || out_channels == 0 || !out_channels.is_multiple_of(2) || stride == 0 {
            return Err(BackendError::InvalidArgument {
                op: "ShakeShortcut::new",
                message: format!(
                    "needs positive channels, an even output width and a positive stride, got \
                     {in_channels} → {out_channels} with stride {stride}"
                ),
            });
        }
        let half = out_channels / 2;
        let std = (2.0 / half as f32).sqrt();
        let mut conv = || {
            backend.from_host(
                &normal(rng, half * in_channels, std),
                &[half, in_channels, 1, 1],
            )
        };
        let (conv1, conv2) = (conv()?, conv()?);
        let selection = |offset: usize| {
            let mut m = vec![0.0; out_channels * half];
            for i in 0..half {
                m[(i + offset) * half + i] = 1.0;
            }
            backend.from_host(&m, &[out_channels, half])
        };
        let tap = |index: usize| {
            let mut t = [0.0; 9];
            t[index] = 1.0;
            backend.from_host(&t, &[1, 9])
        };
        Ok(Self {
            conv1: Param::new(conv1),
            conv2: Param::new(conv2),
            bn: BatchNorm2d::new(backend, out_channels)?,
            stride,
            in_channels,
            out_channels,
            upper: selection(0)?,
            lower: selection(half)?,
            centre: tap(4)?,
            corner: tap(8)?,
            kept: ForwardCache::new(),
        })
    }

    fn spec(&self) -> Conv2dSpec {
        Conv2dSpec {
            stride: self.stride,
            padding: 1,
        }
    }

    /// The 3×3 weight `[out, in, 3, 3]` holding both 1×1 convolutions (see the type's documentation).
    fn combined_weight(&self, backend: &B) -> BackendResult<B::Tensor> {
        let (out, input) = (self.out_channels, self.in_channels);
        let place = |param: &Param<B>, rows: &B::Tensor, tap: &B::Tensor| {
            let w = backend.reshape(backend.duplicate(&param.value)?, &[out / 2, input])?;
            let spread =
                backend.reshape(backend.matmul(rows, &w, false, false)?, &[out * input, 1])?;
            backend.matmul(&spread, tap, false, false)
        };
        let mut weight = place(&self.conv1, &self.upper, &self.centre)?;
        backend.axpy_(
            &mut weight,
            1.0,
            &place(&self.conv2, &self.lower, &self.corner)?,
        )?;
        backend.reshape(weight, &[out, input, 3, 3])
    }

    /// The gradient of one 1×1 convolution from the combined weight's gradient `[out·in, 9]`.
    fn split_grad(
        &self,
        backend: &B,
        grad: &B::Tensor,
        rows: &B::Tensor,
        tap: &B::Tensor,
    ) -> BackendResult<B::Tensor> {
        let (out, input) = (self.out_channels, self.in_channels);
        let at_tap = backend.reshape(backend.matmul(grad, tap, false, true)?, &[out, input])?;
        let own = backend.matmul(rows, &at_tap, true, false)?;
        backend.reshape(own, &[out / 2, input, 1, 1])
    }
}

impl<B: Backend> NamedTensors<B> for ShakeShortcut<B> {
    fn visit_tensors(&self, f: &mut dyn FnMut(&str, TensorRole, &B::Tensor)) {
        f("conv1.weight", TensorRole::Parameter, &self.conv1.value);
        f("conv2.weight", TensorRole::Parameter, &self.conv2.value);
        self.bn
            .visit_tensors(&mut |n, role, t| f(&child_name("bn", n), role, t));
    }

    fn visit_tensors_mut(&mut self, f: &mut dyn FnMut(&str, TensorRole, &mut B::Tensor)) {
        f("conv1.weight", TensorRole::Parameter, &mut self.conv1.value);
        f("conv2.weight", TensorRole::Parameter, &mut self.conv2.value);
        self.bn
            .visit_tensors_mut(&mut |n, role, t| f(&child_name("bn", n), role, t));
    }
}

impl<B: Backend> Module<B> for ShakeShortcut<B> {
    /// `x` is the block's rectified input (the block rectifies once for its branches and this path).
    fn forward_input(
        &mut self,
        backend: &B,
        x: ForwardInput<'_, B>,
        mode: ForwardMode,
    ) -> BackendResult<B::Tensor> {
        let weight = self.combined_weight(backend)?;
        let z = backend.conv2d(x.tensor(), &weight, None, self.spec())?;
        self.kept
            .try_keep_with(mode, || Ok((x.into_owned(backend)?, weight)))?;
        self.bn.forward_owned(backend, z, mode)
    }

    /// The gradient with respect to the rectified input.
    fn backward(&mut self, backend: &B, dy: &B::Tensor) -> BackendResult<B::Tensor> {
        let (rectified, weight) = self.kept.take("ShakeShortcut::backward")?;
        let dz = self.bn.backward(backend, dy)?;
        let grads = backend.conv2d_backward(&rectified, &weight, &dz, self.spec(), true, false)?;
        let flat = [self.out_channels * self.in_channels, 9];
        let dw = backend.reshape(grads.weight, &flat)?;
        let d1 = self.split_grad(backend, &dw, &self.upper, &self.centre)?;
        let d2 = self.split_grad(backend, &dw, &self.lower, &self.corner)?;
        self.conv1.accumulate_grad(backend, d1)?;
        self.conv2.accumulate_grad(backend, d2)?;
        grads.input.ok_or(BackendError::InvalidArgument {
            op: "ShakeShortcut::backward",
            message: "the backend returned no input gradient".into(),
        })
    }

    fn visit_params_mut(&mut self, f: &mut dyn FnMut(&str, &mut Param<B>)) {
        f("conv1.weight", &mut self.conv1);
        f("conv2.weight", &mut self.conv2);
        self.bn
            .visit_params_mut(&mut |n, p| f(&child_name("bn", n), p));
    }

    fn zero_grads(&mut self) {
        self.conv1.grad = None;
        self.conv2.grad = None;
        self.bn.zero_grads();
        self.kept.clear();
    }

    fn visit_batch_counters(&self, f: &mut dyn FnMut(&str, u64)) {
        self.bn
            .visit_batch_counters(&mut |n, c| f(&child_name("bn", n), c));
    }

    fn visit_batch_counters_mut(&mut self, f: &mut dyn FnMut(&str, &mut u64)) {
        self.bn
            .visit_batch_counters_mut(&mut |n, c| f(&child_name("bn", n), c));
    }

    fn visit_batch_norms_mut(&mut self, f: &mut dyn FnMut(&mut BatchNorm2d<B>)) {
        self.bn.visit_batch_norms_mut(f);
    }
}

/// A Shake-Shake residual block: `branch1` and `branch2` (each ReLU → conv3×3 → BN → ReLU → conv3×3 → BN,
/// children named by position as in an `nn.Sequential`, the first convolution with the block's stride)
/// mixed per image, plus the identity or, where the shape changes, a [`ShakeShortcut`] named `shortcut`.
/// The ReLU that opens both branches and the shortcut runs once for all three, on the block's input.
#[derive(Debug)]
pub struct ShakeBlock<B: Backend> {
    branch1: Sequential<B>,
    branch2: Sequential<B>,
    shortcut: Option<ShakeShortcut<B>>,
    mix: ShakeMix,
    block_id: u64,
    /// The backward coefficient of each image of the last training pass.
    backward_coefficients: ForwardCache<Vec<f32>>,
    /// The block's input in the last training pass, whose sign the shared ReLU's gradient needs.
    input: ForwardCache<B::Tensor>,
}

impl<B: Backend> ShakeBlock<B> {
    /// A block from `in_channels` to `channels` with `stride`, mixing by `mix`; `block_id` must be unique
    /// in the network (it separates the blocks' coefficient streams). Convolutions are He-normal
    /// (fan-out) initialised.
    pub fn new<R: Rng + ?Sized>(
        backend: &B,
        in_channels: usize,
        channels: usize,
        stride: usize,
        mix: ShakeMix,
        block_id: u64,
        rng: &mut R,
    ) -> BackendResult<Self> {
        let mut branch = || -> BackendResult<Sequential<B>> {
            let conv = |cin, stride| {
                Conv2dConfig::new(cin, channels, 3)
                    .stride(stride)
                    .padding(1)
                    .bias(false)
                    .init(ConvInit::HeNormalFanOut)
            };
            // Child "0", the branch's ReLU, is the block's (see `ShakeBlock::forward_input`); the
            // others keep their positions in PyTorch's `nn.Sequential`, and so their names.
            let mut s = Sequential::new();
            s.push_named("1", Conv2d::new(backend, conv(in_channels, stride), rng)?);
            s.push_named("2", BatchNorm2d::new(backend, channels)?);
            s.push_named("3", ReLU::new());
            s.push_named("4", Conv2d::new(backend, conv(channels, 1), rng)?);
            s.push_named("5", BatchNorm2d::new(backend, channels)?);
            Ok(s)
        };
        let (branch1, branch2) = (branch()?, branch()?);
        let shortcut = if stride != 1 || in_channels != channels {
            Some(ShakeShortcut::new(
                backend,
                in_channels,
                channels,
                stride,
                rng,
            )?)
        } else {
            None
        };
        Ok(Self {
            branch1,
            branch2,
            shortcut,
            mix,
            block_id,
            backward_coefficients: ForwardCache::new(),
            input: ForwardCache::new(),
        })
    }

    /// Whether the block has a projection shortcut (rather than the identity).
    pub fn has_projection(&self) -> bool {
        self.shortcut.is_some()
    }

    /// The mixing rule.
    pub fn mix(&self) -> ShakeMix {
        self.mix
    }

    /// The forward and backward coefficients of each image of a batch of `batch` for a pass in `mode`.
    pub fn coefficients(&self, mode: ForwardMode, batch: usize) -> (Vec<f32>, Vec<f32>) {
        let even = vec![0.5; batch];
        let (alpha, beta) = match mode {
            ForwardMode::Train { seed } | ForwardMode::RecomputeBatchNorm { seed, .. } => {
                shake_coefficients(seed, self.block_id, batch)
            }
            ForwardMode::Eval => (even.clone(), even.clone()),
        };
        let forward = match (self.mix.forward, mode) {
            (ShakeForward::Shake, ForwardMode::Train { .. })
            | (ShakeForward::Shake, ForwardMode::RecomputeBatchNorm { .. }) => alpha,
            _ => even.clone(),
        };
        let backward = match self.mix.backward {
            ShakeBackward::Shake => beta,
            ShakeBackward::Even => even,
            ShakeBackward::Keep => forward.clone(),
        };
        (forward, backward)
    }
}

impl<B: Backend> NamedTensors<B> for ShakeBlock<B> {
    fn visit_tensors(&self, f: &mut dyn FnMut(&str, TensorRole, &B::Tensor)) {
        self.branch1
            .visit_tensors(&mut |n, role, t| f(&child_name("branch1", n), role, t));
        self.branch2
            .visit_tensors(&mut |n, role, t| f(&child_name("branch2", n), role, t));
        if let Some(shortcut) = &self.shortcut {
            shortcut.visit_tensors(&mut |n, role, t| f(&child_name("shortcut", n), role, t));
        }
    }

    fn visit_tensors_mut(&mut self, f: &mut dyn FnMut(&str, TensorRole, &mut B::Tensor)) {
        self.branch1
            .visit_tensors_mut(&mut |n, role, t| f(&child_name("branch1", n), role, t));
        self.branch2
            .visit_tensors_mut(&mut |n, role, t| f(&child_name("branch2", n), role, t));
        if let Some(shortcut) = &mut self.shortcut {
            shortcut.visit_tensors_mut(&mut |n, role, t| f(&child_name("shortcut", n), role, t));
        }
    }
}

impl<B: Backend> Module<B> for ShakeBlock<B> {
    fn forward_input(
        &mut self,
        backend: &B,
        x: ForwardInput<'_, B>,
        mode: ForwardMode,
    ) -> BackendResult<B::Tensor> {
        // Both branches and the projection shortcut begin with a ReLU of the block's input: it runs
        // once, and its gradient once on the sum of the three paths' gradients.
        let rectified = backend.relu(x.tensor())?;
        let b = self
            .branch2
            .forward_input(backend, ForwardInput::Borrowed(&rectified), mode)?;
        let skip = match &mut self.shortcut {
            Some(shortcut) => {
                Some(shortcut.forward_input(backend, ForwardInput::Borrowed(&rectified), mode)?)
            }
            None => None,
        };
        let a = self
            .branch1
            .forward_input(backend, ForwardInput::Owned(rectified), mode)?;
        let batch = x.tensor().dims().first().copied().unwrap_or(0);
        let (forward, backward) = self.coefficients(mode, batch);
        // α·a + (1 − α)·b as PyTorch rounds it: two products, then their sum.
        let (mut y, second) = mix_per_image(backend, &a, &b, &forward)?;
        backend.axpy_(&mut y, 1.0, &second)?;
        backend.axpy_(&mut y, 1.0, skip.as_ref().unwrap_or(x.tensor()))?;
        self.backward_coefficients.keep_with(mode, || backward);
        self.input.keep_input(backend, x, mode)?;
        Ok(y)
    }

    fn backward(&mut self, backend: &B, dy: &B::Tensor) -> BackendResult<B::Tensor> {
        let beta = self.backward_coefficients.take("ShakeBlock::backward")?;
        let x = self.input.take("ShakeBlock::backward")?;
        let (da, db) = mix_per_image(backend, dy, dy, &beta)?;
        let mut d_rectified = self.branch1.backward(backend, &da)?;
        backend.axpy_(&mut d_rectified, 1.0, &self.branch2.backward(backend, &db)?)?;
        match &mut self.shortcut {
            Some(shortcut) => {
                backend.axpy_(&mut d_rectified, 1.0, &shortcut.backward(backend, dy)?)?;
                backend.relu_backward(&x, &d_rectified)
            }
            None => {
                let mut dx = backend.relu_backward(&x, &d_rectified)?;
                backend.axpy_(&mut dx, 1.0, dy)?;
                Ok(dx)
            }
        }
    }

    fn visit_params_mut(&mut self, f: &mut dyn FnMut(&str, &mut Param<B>)) {
        self.branch1
            .visit_params_mut(&mut |n, p| f(&child_name("branch1", n), p));
        self.branch2
            .visit_params_mut(&mut |n, p| f(&child_name("branch2", n), p));
        if let Some(shortcut) = &mut self.shortcut {
            shortcut.visit_params_mut(&mut |n, p| f(&child_name("shortcut", n), p));
        }
    }

    fn zero_grads(&mut self) {
        self.branch1.zero_grads();
        self.branch2.zero_grads();
        if let Some(shortcut) = &mut self.shortcut {
            shortcut.zero_grads();
        }
        self.backward_coefficients.clear();
        self.input.clear();
    }

    fn visit_batch_counters(&self, f: &mut dyn FnMut(&str, u64)) {
        self.branch1
            .visit_batch_counters(&mut |n, c| f(&child_name("branch1", n), c));
        self.branch2
            .visit_batch_counters(&mut |n, c| f(&child_name("branch2", n), c));
        if let Some(shortcut) = &self.shortcut {
            shortcut.visit_batch_counters(&mut |n, c| f(&child_name("shortcut", n), c));
        }
    }

    fn visit_batch_counters_mut(&mut self, f: &mut dyn FnMut(&str, &mut u64)) {
        self.branch1
            .visit_batch_counters_mut(&mut |n, c| f(&child_name("branch1", n), c));
        self.branch2
            .visit_batch_counters_mut(&mut |n, c| f(&child_name("branch2", n), c));
        if let Some(shortcut) = &mut self.shortcut {
            shortcut.visit_batch_counters_mut(&mut |n, c| f(&child_name("shortcut", n), c));
        }
    }

    fn visit_batch_norms_mut(&mut self, f: &mut dyn FnMut(&mut BatchNorm2d<B>)) {
        self.branch1.visit_batch_norms_mut(f);
        self.branch2.visit_batch_norms_mut(f);
        if let Some(shortcut) = &mut self.shortcut {
            shortcut.visit_batch_norms_mut(f);
        }
    }
}
