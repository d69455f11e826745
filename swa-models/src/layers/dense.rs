//! DenseNet's dense block (Huang et al. 2017, the "-BC" variant torchvision builds), without copying the
//! concatenation a layer reads.
//!
//! Layer `l` of a block reads the concatenation of the block's input and of the `l` feature maps the
//! layers before it produced, `[x₀, x₁, …, x_l]`, through `conv1(relu(norm1(·)))` (a 1×1 convolution),
//! and adds its own `growth` channels, `conv2(relu(norm2(·)))` (3×3). torchvision concatenates the
//! pieces again for every layer: block 3 of DenseNet-161 (36 layers) copies its growing input 36 times,
//! a number of copies quadratic in the depth.
//!
//! Here no layer concatenates anything. BatchNorm and ReLU act on each channel alone, and a 1×1
//! convolution of a concatenation is the sum of the convolutions of its pieces with the matching input
//! columns of the weight. So a layer takes the list of pieces and, for each piece, normalises it with the
//! slice of `norm1`'s scale, shift and running statistics for its channels, applies the ReLU and
//! convolves it with the slice of `conv1`'s weight, summing into one bottleneck output. The backward
//! pass mirrors it: each piece's input gradient is added to that piece's gradient, which collects the
//! contributions of every later layer that read it (and of the block's output) before the layer that
//! made the piece runs its own backward pass; the parameter gradients are assembled slice by slice.
//! The slices are [`ElementwiseOps::narrow`](swa_core::backend::ElementwiseOps::narrow) and
//! [`narrow_add_`](swa_core::backend::ElementwiseOps::narrow_add_), so the block is written once over the
//! backend trait and runs on every backend.
//!
//! What it costs:
//! - copies of activations: one per block, the block's output (the transition after it, or `norm5`,
//!   needs the whole concatenation once), written piece by piece into a preallocated tensor: linear in
//!   the depth;
//! - copies of parameters: each layer slices `norm1`'s vectors and `conv1`'s weight per piece and pass,
//!   in total the size of those parameters once per forward and once per backward pass, small next to
//!   the activations of a batch;
//! - memory kept for the backward pass: the pieces themselves (the size of the block's output, linear),
//!   and each layer's ReLU output of every piece it read (the input of `conv1`, which its weight
//!   gradient needs). That last part is quadratic in the depth, as the concatenated input is in
//!   torchvision; torchvision keeps the concatenation *and* its normalised copy, this block the one
//!   activation. Recomputing it in the backward pass (torchvision's `memory_efficient`) would make
//!   the memory linear at the cost of a second normalisation per piece; it is not done here;
//! - arithmetic: the same as over the concatenation, in more, smaller operations (one BatchNorm and
//!   one 1×1 convolution per piece instead of one per layer).
//!
//! The sums of the pieces' convolutions round differently from one convolution over the concatenation,
//! by a few units in the last place; the results agree with torchvision's to that rounding.

use rand::Rng;
use swa_core::backend::{Backend, BackendError, BackendResult, BatchNormSaved, HasShape};
use swa_core::params::{NamedTensors, TensorRole};

use super::{BatchNorm2d, Conv2d, Conv2dConfig, ConvInit, ForwardCache, ReLU, Sequential};
use crate::module::{child_name, ForwardInput, ForwardMode, Module, Param};

/// What a dense layer keeps of each piece it read, for its backward pass: the ReLU's output (the
/// input of the piece's term of `conv1`, whose sign is also the ReLU's gradient mask) and the piece's
/// batch statistics in `norm1`.
type PieceActivation<B> = (
    <B as Backend>::Tensor,
    BatchNormSaved<<B as Backend>::Tensor>,
);

/// torchvision's `_DenseLayer`: `norm1`, `relu1`, `conv1` (1×1 to `bn_size · growth`), `norm2`, `relu2`,
/// `conv2` (3×3 to `growth`), convolutions without bias, read piece by piece (see the module
/// documentation).
#[derive(Debug)]
struct DenseLayer<B: Backend> {
    norm1: BatchNorm2d<B>,
    conv1: Conv2d<B>,
    /// `norm2`, `relu2`, `conv2`, named as torchvision names them.
    tail: Sequential<B>,
    pieces: ForwardCache<Vec<PieceActivation<B>>>,
}

impl<B: Backend> DenseLayer<B> {
    fn new<R: Rng + ?Sized>(
        backend: &B,
        in_channels: usize,
        growth: usize,
        bottleneck: usize,
        rng: &mut R,
    ) -> BackendResult<Self> {
        let conv = |cin, cout, k, padding| {
            Conv2dConfig::new(cin, cout, k)
                .padding(padding)
                .bias(false)
                .init(ConvInit::HeNormalFanIn)
        };
        let mut tail = Sequential::new();
        tail.push_named("norm2", BatchNorm2d::new(backend, bottleneck)?);
        tail.push_named("relu2", ReLU::new());
        tail.push_named(
            "conv2",
            Conv2d::new(backend, conv(bottleneck, growth, 3, 1), rng)?,
        );
        Ok(Self {
            norm1: BatchNorm2d::new(backend, in_channels)?,
            conv1: Conv2d::new(backend, conv(in_channels, bottleneck, 1, 0), rng)?,
            tail,
            pieces: ForwardCache::new(),
        })
    }

    /// The input channels: the sum of the channels of the pieces the layer reads.
    fn in_channels(&self) -> usize {
        self.norm1.running_mean().dims()[0]
    }

    /// The layer's new features from the pieces of its input, in order.
    fn forward(
        &mut self,
        backend: &B,
        pieces: &[&B::Tensor],
        mode: ForwardMode,
    ) -> BackendResult<B::Tensor> {
        let channels: usize = pieces.iter().map(|p| channels_of(*p)).sum();
        if channels != self.in_channels() {
            return Err(BackendError::ShapeMismatch {
                op: "DenseBlock::forward",
                expected: format!("pieces of {} channels in all", self.in_channels()),
                got: pieces.iter().map(|p| channels_of(*p)).collect(),
            });
        }
        let mut bottleneck: Option<B::Tensor> = None;
        let mut kept = Vec::new();
        let mut start = 0;
        for piece in pieces {
            let (normalised, saved) = self.norm1.normalise_channels(backend, piece, start, mode)?;
            let activated = backend.relu(&normalised)?;
            drop(normalised);
            let term = self.conv1.convolve_channels(backend, &activated, start)?;
            match &mut bottleneck {
                Some(sum) => backend.axpy_(sum, 1.0, &term)?,
                None => bottleneck = Some(term),
            }
            if let (ForwardMode::Train { .. }, Some(saved)) = (mode, saved) {
                kept.push((activated, saved));
            }
            start += channels_of(*piece);
        }
        self.norm1.count_batch(mode);
        self.pieces.keep_with(mode, || kept);
        let bottleneck = bottleneck.ok_or_else(|| BackendError::InvalidArgument {
            op: "DenseBlock::forward",
            message: "a dense layer needs at least one piece of input".into(),
        })?;
        self.tail.forward_owned(backend, bottleneck, mode)
    }

    /// Back-propagates `dy`, the gradient of the layer's new features, and adds the gradient of each
    /// piece it read (the same `pieces` as the forward pass) to `piece_grads`.
    fn backward(
        &mut self,
        backend: &B,
        pieces: &[&B::Tensor],
        dy: &B::Tensor,
        piece_grads: &mut [B::Tensor],
    ) -> BackendResult<()> {
        let d_bottleneck = self.tail.backward(backend, dy)?;
        let kept = self.pieces.take("DenseBlock::backward")?;
        if kept.len() != pieces.len() || piece_grads.len() != pieces.len() {
            return Err(BackendError::InvalidArgument {
                op: "DenseBlock::backward",
                message: format!(
                    "{} pieces with {} gradients, but the forward pass read {}",
                    pieces.len(),
                    piece_grads.len(),
                    kept.len()
                ),
            });
        }
        let mut start = 0;
        for ((piece, (activated, saved)), grad) in pieces.iter().zip(&kept).zip(piece_grads) {
            let d_activated =
                self.conv1
                    .backward_channels(backend, activated, start, &d_bottleneck)?;
            let d_normalised = backend.relu_backward(activated, &d_activated)?;
            let d_piece =
                self.norm1
                    .backward_channels(backend, piece, start, saved, &d_normalised)?;
            backend.axpy_(grad, 1.0, &d_piece)?;
            start += channels_of(*piece);
        }
        Ok(())
    }

    fn visit_tensors(&self, f: &mut dyn FnMut(&str, TensorRole, &B::Tensor)) {
        self.norm1
            .visit_tensors(&mut |n, role, t| f(&child_name("norm1", n), role, t));
        self.conv1
            .visit_tensors(&mut |n, role, t| f(&child_name("conv1", n), role, t));
        self.tail.visit_tensors(f);
    }

    fn visit_tensors_mut(&mut self, f: &mut dyn FnMut(&str, TensorRole, &mut B::Tensor)) {
        self.norm1
            .visit_tensors_mut(&mut |n, role, t| f(&child_name("norm1", n), role, t));
        self.conv1
            .visit_tensors_mut(&mut |n, role, t| f(&child_name("conv1", n), role, t));
        self.tail.visit_tensors_mut(f);
    }

    fn visit_params_mut(&mut self, f: &mut dyn FnMut(&str, &mut Param<B>)) {
        self.norm1
            .visit_params_mut(&mut |n, p| f(&child_name("norm1", n), p));
        self.conv1
            .visit_params_mut(&mut |n, p| f(&child_name("conv1", n), p));
        self.tail.visit_params_mut(f);
    }

    fn zero_grads(&mut self) {
        self.norm1.zero_grads();
        self.conv1.zero_grads();
        self.tail.zero_grads();
        self.pieces.clear();
    }

    fn visit_batch_counters(&self, f: &mut dyn FnMut(&str, u64)) {
        self.norm1
            .visit_batch_counters(&mut |n, c| f(&child_name("norm1", n), c));
        self.tail.visit_batch_counters(f);
    }

    fn visit_batch_counters_mut(&mut self, f: &mut dyn FnMut(&str, &mut u64)) {
        self.norm1
            .visit_batch_counters_mut(&mut |n, c| f(&child_name("norm1", n), c));
        self.tail.visit_batch_counters_mut(f);
    }

    fn visit_batch_norms_mut(&mut self, f: &mut dyn FnMut(&mut BatchNorm2d<B>)) {
        f(&mut self.norm1);
        self.tail.visit_batch_norms_mut(f);
    }
}

/// The channel count of an `[N, C, H, W]` tensor (0 for tensors of lower rank, which the operations
/// then refuse with their shapes).
fn channels_of<T: HasShape + ?Sized>(x: &T) -> usize {
    x.dims().get(1).copied().unwrap_or(0)
}

/// torchvision's `_DenseBlock`: `layers` dense layers `denselayer1..`, layer `l` reading the block's
/// input and the `l − 1` feature maps before it, `growth` channels each; the output is their
/// concatenation, `in_channels + layers · growth` channels.
#[derive(Debug)]
pub struct DenseBlock<B: Backend> {
    layers: Vec<DenseLayer<B>>,
    in_channels: usize,
    growth: usize,
    /// The block's input and every layer's new features, from a training pass, for the backward pass.
    pieces: ForwardCache<Vec<B::Tensor>>,
}

impl<B: Backend> DenseBlock<B> {
    /// A block of `layers` layers on `in_channels` input channels, each adding `growth` channels through
    /// a bottleneck of `bottleneck_factor · growth` channels (torchvision's `bn_size`), with
    /// torchvision's initialisation (He-normal convolutions with fan-in, BatchNorm at 1 and 0).
    pub fn new<R: Rng + ?Sized>(
        backend: &B,
        layers: usize,
        in_channels: usize,
        growth: usize,
        bottleneck_factor: usize,
        rng: &mut R,
    ) -> BackendResult<Self> {
        if layers == 0 || in_channels == 0 || growth == 0 || bottleneck_factor == 0 {
            return Err(BackendError::InvalidArgument {
                op: "DenseBlock::new",
                message: format!(
                    "layers ({layers}), input channels ({in_channels}), growth ({growth}) and \
                     bottleneck factor ({bottleneck_factor}) must be positive"
                ),
            });
        }
        let layers = (0..layers)
            .map(|l| {
                DenseLayer::new(
                    backend,
                    in_channels + l * growth,
                    growth,
                    bottleneck_factor * growth,
                    rng,
                )
            })
            .collect::<BackendResult<Vec<_>>>()?;
        Ok(Self {
            layers,
            in_channels,
            growth,
            pieces: ForwardCache::new(),
        })
    }

    /// The channels of the block's output: its input's and `growth` more per layer.
    pub fn out_channels(&self) -> usize {
        self.in_channels + self.layers.len() * self.growth
    }

    /// The concatenation of `pieces` along the channels, written piece by piece into one tensor.
    fn concatenate(&self, backend: &B, pieces: &[&B::Tensor]) -> BackendResult<B::Tensor> {
        let mut shape = pieces[0].dims().to_vec();
        shape[1] = self.out_channels();
        let mut out = backend.zeros(&shape)?;
        let mut start = 0;
        for piece in pieces {
            backend.narrow_assign_(&mut out, 1, start, piece)?;
            start += channels_of(*piece);
        }
        Ok(out)
    }
}

/// Names layer `index` (from 0) as torchvision does.
fn layer_name(index: usize) -> String {
    format!("denselayer{}", index + 1)
}

impl<B: Backend> NamedTensors<B> for DenseBlock<B> {
    fn visit_tensors(&self, f: &mut dyn FnMut(&str, TensorRole, &B::Tensor)) {
        for (index, layer) in self.layers.iter().enumerate() {
            let prefix = layer_name(index);
            layer.visit_tensors(&mut |n, role, t| f(&child_name(&prefix, n), role, t));
        }
    }

    fn visit_tensors_mut(&mut self, f: &mut dyn FnMut(&str, TensorRole, &mut B::Tensor)) {
        for (index, layer) in self.layers.iter_mut().enumerate() {
            let prefix = layer_name(index);
            layer.visit_tensors_mut(&mut |n, role, t| f(&child_name(&prefix, n), role, t));
        }
    }
}

impl<B: Backend> Module<B> for DenseBlock<B> {
    fn forward_input(
        &mut self,
        backend: &B,
        x: ForwardInput<'_, B>,
        mode: ForwardMode,
    ) -> BackendResult<B::Tensor> {
        let dims = x.tensor().dims();
        if dims.len() != 4 || dims[1] != self.in_channels {
            return Err(BackendError::ShapeMismatch {
                op: "DenseBlock::forward",
                expected: format!("an input [N, {}, H, W]", self.in_channels),
                got: dims.to_vec(),
            });
        }
        let mut features: Vec<B::Tensor> = Vec::with_capacity(self.layers.len());
        for layer in &mut self.layers {
            let pieces: Vec<&B::Tensor> = std::iter::once(x.tensor()).chain(&features).collect();
            let new = layer.forward(backend, &pieces, mode)?;
            features.push(new);
        }
        let pieces: Vec<&B::Tensor> = std::iter::once(x.tensor()).chain(&features).collect();
        let out = self.concatenate(backend, &pieces)?;
        self.pieces.try_keep_with(mode, || {
            let mut kept = Vec::with_capacity(features.len() + 1);
            kept.push(x.into_owned(backend)?);
            kept.append(&mut features);
            Ok(kept)
        })?;
        Ok(out)
    }

    fn backward(&mut self, backend: &B, dy: &B::Tensor) -> BackendResult<B::Tensor> {
        let pieces = self.pieces.take("DenseBlock::backward")?;
        // Each piece's gradient starts as its slice of the output's and collects, layer by layer from
        // the last, what every later layer that read it sends back; it is complete when the layer that
        // made the piece runs its backward pass.
        let mut grads = Vec::with_capacity(pieces.len());
        let mut start = 0;
        for piece in &pieces {
            let channels = channels_of(piece);
            grads.push(backend.narrow(dy, 1, start, channels)?);
            start += channels;
        }
        let pieces: Vec<&B::Tensor> = pieces.iter().collect();
        for (index, layer) in self.layers.iter_mut().enumerate().rev() {
            let (read, made) = grads.split_at_mut(index + 1);
            layer.backward(backend, &pieces[..=index], &made[0], read)?;
        }
        grads.truncate(1);
        grads.pop().ok_or_else(|| BackendError::InvalidArgument {
            op: "DenseBlock::backward",
            message: "a block without layers has no input gradient".into(),
        })
    }

    fn visit_params_mut(&mut self, f: &mut dyn FnMut(&str, &mut Param<B>)) {
        for (index, layer) in self.layers.iter_mut().enumerate() {
            let prefix = layer_name(index);
            layer.visit_params_mut(&mut |n, p| f(&child_name(&prefix, n), p));
        }
    }

    fn zero_grads(&mut self) {
        for layer in &mut self.layers {
            layer.zero_grads();
        }
        self.pieces.clear();
    }

    fn visit_batch_counters(&self, f: &mut dyn FnMut(&str, u64)) {
        for (index, layer) in self.layers.iter().enumerate() {
            let prefix = layer_name(index);
            layer.visit_batch_counters(&mut |n, c| f(&child_name(&prefix, n), c));
        }
    }

    fn visit_batch_counters_mut(&mut self, f: &mut dyn FnMut(&str, &mut u64)) {
        for (index, layer) in self.layers.iter_mut().enumerate() {
            let prefix = layer_name(index);
            layer.visit_batch_counters_mut(&mut |n, c| f(&child_name(&prefix, n), c));
        }
    }

    fn visit_batch_norms_mut(&mut self, f: &mut dyn FnMut(&mut BatchNorm2d<B>)) {
        for layer in &mut self.layers {
            layer.visit_batch_norms_mut(f);
        }
    }
}
