//! Layers keep an input handed over by `forward_owned` for their backward pass instead of copying it: a
//! backend that counts `Backend::duplicate` calls shows where a training forward pass copies.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use swa_core::backend::{
    BatchNormGrads, BatchNormSaved, Conv2dGrads, Conv2dSpec, ConvOps, CrossEntropy, DenseOps,
    ElementwiseOps, LossOps, NormOps, PoolOps, SgdStep,
};
use swa_core::{Backend, BackendResult, CpuBackend, CpuTensor, HasShape};
use swa_models::layers::{
    AvgPool2d, BatchNorm2d, Conv2d, Conv2dConfig, DenseBlock, Dropout, Flatten, Linear, MaxPool2d,
    ReLU,
};
use swa_models::{Architecture, ForwardMode, Module, Network, NetworkConfig};

/// The CPU backend, counting the copies made by [`Backend::duplicate`], and the elements of feature maps
/// copied into or out of slices (shared by clones).
#[derive(Clone, Debug)]
struct CopyCounter {
    inner: CpuBackend,
    copies: Arc<AtomicUsize>,
    sliced: Arc<AtomicUsize>,
}

impl CopyCounter {
    fn new() -> Self {
        Self {
            inner: CpuBackend::with_threads(2),
            copies: Arc::new(AtomicUsize::new(0)),
            sliced: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// The elements of feature maps copied into or out of slices since the last call.
    fn take_sliced(&self) -> usize {
        self.sliced.swap(0, Ordering::Relaxed)
    }

    /// Counts a slice copy of `copied` when it moves a feature map's elements: a four-dimensional tensor
    /// whose planes are wider than the 3×3 kernels of the tests' weights (which are sliced too).
    fn count_slice(&self, copied: &CpuTensor) {
        if copied.ndim() == 4 && copied.shape()[3] > 3 {
            self.sliced.fetch_add(copied.len(), Ordering::Relaxed);
        }
    }

    /// The copies made since the last call.
    fn take_copies(&self) -> usize {
        self.copies.swap(0, Ordering::Relaxed)
    }
}

/// Implements backend methods by calling the inner backend's.
macro_rules! delegate {
    ($($name:ident(&self $(, $arg:ident: $ty:ty)*) -> $ret:ty;)*) => {
        $(fn $name(&self $(, $arg: $ty)*) -> $ret {
            self.inner.$name($($arg),*)
        })*
    };
}

impl Backend for CopyCounter {
    type Tensor = CpuTensor;

    fn duplicate(&self, tensor: &CpuTensor) -> BackendResult<CpuTensor> {
        self.copies.fetch_add(1, Ordering::Relaxed);
        self.inner.duplicate(tensor)
    }

    delegate! {
        name(&self) -> String;
        from_host(&self, data: &[f32], shape: &[usize]) -> BackendResult<CpuTensor>;
        zeros(&self, shape: &[usize]) -> BackendResult<CpuTensor>;
        to_host(&self, tensor: &CpuTensor) -> BackendResult<Vec<f32>>;
        reshape(&self, tensor: CpuTensor, shape: &[usize]) -> BackendResult<CpuTensor>;
        synchronize(&self) -> BackendResult<()>;
        fill_(&self, tensor: &mut CpuTensor, value: f32) -> BackendResult<()>;
        copy_(&self, dst: &mut CpuTensor, src: &CpuTensor) -> BackendResult<()>;
        lerp_(&self, dst: &mut CpuTensor, src: &CpuTensor, weight: f32) -> BackendResult<()>;
        lerp_many_(&self, dsts: &mut [&mut CpuTensor], srcs: &[&CpuTensor], weight: f32)
            -> BackendResult<()>;
        axpy_(&self, dst: &mut CpuTensor, alpha: f32, x: &CpuTensor) -> BackendResult<()>;
        scale_(&self, tensor: &mut CpuTensor, factor: f32) -> BackendResult<()>;
        sgd_step_(&self, param: &mut CpuTensor, grad: &CpuTensor, momentum: &mut CpuTensor,
            step: &SgdStep) -> BackendResult<()>;
    }
}

// `swa_core::backend::Decorator` forwards `duplicate` unconditionally, so this counter forwards the
// operation families itself.
impl ElementwiseOps<CpuTensor> for CopyCounter {
    delegate! {
        add(&self, a: &CpuTensor, b: &CpuTensor) -> BackendResult<CpuTensor>;
        mul(&self, a: &CpuTensor, b: &CpuTensor) -> BackendResult<CpuTensor>;
        scale_per_image(&self, x: &CpuTensor, scales: &CpuTensor) -> BackendResult<CpuTensor>;
        relu(&self, x: &CpuTensor) -> BackendResult<CpuTensor>;
        relu_(&self, x: &mut CpuTensor) -> BackendResult<()>;
        relu_backward(&self, y: &CpuTensor, dy: &CpuTensor) -> BackendResult<CpuTensor>;
        dropout_mask(&self, shape: &[usize], p: f32, seed: u64) -> BackendResult<CpuTensor>;
    }

    fn narrow(
        &self,
        x: &CpuTensor,
        axis: usize,
        start: usize,
        len: usize,
    ) -> BackendResult<CpuTensor> {
        let out = self.inner.narrow(x, axis, start, len)?;
        self.count_slice(&out);
        Ok(out)
    }

    fn narrow_assign_(
        &self,
        dst: &mut CpuTensor,
        axis: usize,
        start: usize,
        src: &CpuTensor,
    ) -> BackendResult<()> {
        self.count_slice(src);
        self.inner.narrow_assign_(dst, axis, start, src)
    }

    fn narrow_add_(
        &self,
        dst: &mut CpuTensor,
        axis: usize,
        start: usize,
        src: &CpuTensor,
    ) -> BackendResult<()> {
        self.count_slice(src);
        self.inner.narrow_add_(dst, axis, start, src)
    }
}

impl DenseOps<CpuTensor> for CopyCounter {
    delegate! {
        matmul(&self, a: &CpuTensor, b: &CpuTensor, transpose_a: bool, transpose_b: bool)
            -> BackendResult<CpuTensor>;
        add_row_bias_(&self, x: &mut CpuTensor, bias: &CpuTensor) -> BackendResult<()>;
        sum_rows(&self, x: &CpuTensor) -> BackendResult<CpuTensor>;
    }
}

impl ConvOps<CpuTensor> for CopyCounter {
    delegate! {
        conv2d(&self, x: &CpuTensor, weight: &CpuTensor, bias: Option<&CpuTensor>,
            spec: Conv2dSpec) -> BackendResult<CpuTensor>;
        conv2d_backward(&self, x: &CpuTensor, weight: &CpuTensor, dy: &CpuTensor, spec: Conv2dSpec,
            need_input_grad: bool, need_bias_grad: bool) -> BackendResult<Conv2dGrads<CpuTensor>>;
    }
}

impl NormOps<CpuTensor> for CopyCounter {
    delegate! {
        batch_norm_train(&self, x: &CpuTensor, gamma: &CpuTensor, beta: &CpuTensor,
            running_mean: &mut CpuTensor, running_var: &mut CpuTensor, momentum: f32, eps: f32)
            -> BackendResult<(CpuTensor, BatchNormSaved<CpuTensor>)>;
        batch_norm_eval(&self, x: &CpuTensor, gamma: &CpuTensor, beta: &CpuTensor,
            running_mean: &CpuTensor, running_var: &CpuTensor, eps: f32) -> BackendResult<CpuTensor>;
        batch_norm_relu_eval(&self, x: &CpuTensor, gamma: &CpuTensor, beta: &CpuTensor,
            running_mean: &CpuTensor, running_var: &CpuTensor, eps: f32) -> BackendResult<CpuTensor>;
        batch_norm_backward(&self, x: &CpuTensor, gamma: &CpuTensor,
            saved: &BatchNormSaved<CpuTensor>, dy: &CpuTensor)
            -> BackendResult<BatchNormGrads<CpuTensor>>;
        batch_norm_relu_train(&self, x: &CpuTensor, gamma: &CpuTensor, beta: &CpuTensor,
            running_mean: &mut CpuTensor, running_var: &mut CpuTensor, momentum: f32, eps: f32)
            -> BackendResult<(CpuTensor, BatchNormSaved<CpuTensor>)>;
        batch_norm_relu_backward(&self, x: &CpuTensor, gamma: &CpuTensor, beta: &CpuTensor,
            saved: &BatchNormSaved<CpuTensor>, dz: &CpuTensor)
            -> BackendResult<BatchNormGrads<CpuTensor>>;
    }
}

impl PoolOps<CpuTensor> for CopyCounter {
    delegate! {
        max_pool2d(&self, x: &CpuTensor, kernel: usize, stride: usize, padding: usize)
            -> BackendResult<CpuTensor>;
        max_pool2d_backward(&self, x: &CpuTensor, dy: &CpuTensor, kernel: usize, stride: usize,
            padding: usize) -> BackendResult<CpuTensor>;
        avg_pool2d(&self, x: &CpuTensor, kernel: usize) -> BackendResult<CpuTensor>;
        avg_pool2d_backward(&self, dy: &CpuTensor, kernel: usize, input_shape: &[usize])
            -> BackendResult<CpuTensor>;
    }
}

impl LossOps<CpuTensor> for CopyCounter {
    delegate! {
        softmax_cross_entropy(&self, logits: &CpuTensor, labels: &[u32])
            -> BackendResult<CrossEntropy<CpuTensor>>;
        softmax(&self, logits: &CpuTensor) -> BackendResult<CpuTensor>;
    }
}

const TRAIN: ForwardMode = ForwardMode::Train { seed: 3 };

fn random_tensor(b: &CopyCounter, seed: u64, shape: &[usize]) -> CpuTensor {
    let mut rng = StdRng::seed_from_u64(seed);
    let values: Vec<f32> = (0..shape.iter().product::<usize>())
        .map(|_| rng.random::<f32>() * 2.0 - 1.0)
        .collect();
    b.from_host(&values, shape).unwrap()
}

/// The copies of a training forward pass on an owned input and on a borrowed one, checking that both give
/// the same output and the same input gradient.
fn train_copies(
    b: &CopyCounter,
    layer: &mut dyn Module<CopyCounter>,
    shape: &[usize],
) -> (usize, usize) {
    let x = random_tensor(b, 1, shape);
    b.take_copies();
    let y_borrowed = layer.forward(b, &x, TRAIN).unwrap();
    let borrowed = b.take_copies();
    let dy = random_tensor(b, 2, y_borrowed.dims());
    let dx_borrowed = b.to_host(&layer.backward(b, &dy).unwrap()).unwrap();
    layer.zero_grads();

    let x_owned = b.duplicate(&x).unwrap();
    b.take_copies();
    let y_owned = layer.forward_owned(b, x_owned, TRAIN).unwrap();
    let owned = b.take_copies();
    let dx_owned = b.to_host(&layer.backward(b, &dy).unwrap()).unwrap();
    layer.zero_grads();

    assert_eq!(
        b.to_host(&y_owned).unwrap(),
        b.to_host(&y_borrowed).unwrap()
    );
    assert_eq!(dx_owned, dx_borrowed);
    (owned, borrowed)
}

#[test]
fn linear_and_max_pool_keep_an_owned_input_without_copying_it() {
    let b = CopyCounter::new();
    let mut rng = StdRng::seed_from_u64(0);
    let mut linear = Linear::new(&b, 6, 4, &mut rng).unwrap();
    assert_eq!(
        train_copies(&b, &mut linear, &[3, 6]),
        (0, 1),
        "Linear: copies on an owned input, on a borrowed one"
    );
    let mut pool = MaxPool2d::new(2, 2).unwrap();
    assert_eq!(
        train_copies(&b, &mut pool, &[2, 3, 4, 4]),
        (0, 1),
        "MaxPool2d: copies on an owned input, on a borrowed one"
    );
}

#[test]
fn every_layer_keeps_an_owned_input_without_copying_it() {
    let b = CopyCounter::new();
    let mut rng = StdRng::seed_from_u64(0);
    let image = [2, 3, 4, 4];
    let mut layers: Vec<(&str, Box<dyn Module<CopyCounter>>)> = vec![
        ("ReLU", Box::new(ReLU::new())),
        (
            "Conv2d",
            Box::new(Conv2d::new(&b, Conv2dConfig::new(3, 2, 3).padding(1), &mut rng).unwrap()),
        ),
        ("BatchNorm2d", Box::new(BatchNorm2d::new(&b, 3).unwrap())),
        ("AvgPool2d", Box::new(AvgPool2d::new(2).unwrap())),
        ("Flatten", Box::new(Flatten::new())),
        ("Dropout", Box::new(Dropout::new(0.5, 0).unwrap())),
    ];
    for (name, layer) in &mut layers {
        let (owned, _) = train_copies(&b, layer.as_mut(), &image);
        assert_eq!(owned, 0, "{name} copied an owned input");
    }
}

#[test]
fn a_network_copies_only_the_batch_its_first_layer_keeps() {
    let b = CopyCounter::new();
    let config = NetworkConfig {
        architecture: Architecture::Vgg16,
        classes: 10,
    };
    let mut vgg = Network::new(&b, &config, 0).unwrap();
    let x = random_tensor(&b, 1, &[2, 3, 32, 32]);
    b.take_copies();
    vgg.forward(&b, &x, TRAIN).unwrap();
    assert_eq!(
        b.take_copies(),
        1,
        "copies in a VGG-16 training forward pass"
    );

    // Each residual block's main path and shortcut both need the block's input: its first BatchNorm keeps
    // a copy, the shortcut (identity or projection) the input itself.
    let config = NetworkConfig {
        architecture: Architecture::PreResNet { depth: 20 },
        classes: 10,
    };
    let mut preresnet = Network::new(&b, &config, 0).unwrap();
    b.take_copies();
    preresnet.forward(&b, &x, TRAIN).unwrap();
    assert_eq!(
        b.take_copies(),
        1 + 9,
        "copies in a PreResNet-20 training forward pass"
    );
}

/// A dense block copies feature maps once a pass, however deep it is: the forward pass writes each piece
/// into the block's output, the backward pass cuts the output's gradient into the pieces' gradients, and
/// no layer concatenates the pieces it reads (torchvision copies every layer's whole input, a number of
/// elements quadratic in the depth). It keeps an owned input without copying it.
#[test]
fn a_dense_block_copies_its_feature_maps_once_a_pass() {
    let b = CopyCounter::new();
    let mut rng = StdRng::seed_from_u64(0);
    for layers in [2, 6, 12] {
        let mut block = DenseBlock::new(&b, layers, 4, 3, 2, &mut rng).unwrap();
        let x = random_tensor(&b, 1, &[2, 4, 5, 5]);
        b.take_copies();
        b.take_sliced();
        let y = block.forward_owned(&b, x, TRAIN).unwrap();
        let output = y.len();
        assert_eq!(output, 2 * (4 + 3 * layers) * 25);
        assert_eq!(b.take_copies(), 0, "{layers} layers: copies of the input");
        assert_eq!(b.take_sliced(), output, "{layers} layers: forward");
        block.backward(&b, &random_tensor(&b, 2, y.dims())).unwrap();
        assert_eq!(b.take_sliced(), output, "{layers} layers: backward");
        block
            .forward(
                &b,
                &y.slice_axis(ndarray::Axis(1), (0..4).into()).to_owned(),
                ForwardMode::Eval,
            )
            .unwrap();
        assert_eq!(b.take_sliced(), output, "{layers} layers: evaluation");
    }
}
