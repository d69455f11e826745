//! An ordered container of named children.

use swa_core::backend::{Backend, BackendResult};
use swa_core::params::{NamedTensors, TensorRole};

use super::{BatchNorm2d, Conv2d};
use crate::module::{child_name, ForwardInput, ForwardMode, Module, Param};

/// Children run one after the other, PyTorch's `nn.Sequential`: a child's tensors are named
/// `<child name>.<tensor name>`. Children added with [`Sequential::push`] are named by their position
/// (`features.0.weight`), as in PyTorch; [`Sequential::push_named`] gives a child a name of its own
/// (`layer1`, `fc`), which is how networks name their top-level parts.
///
/// In training and BatchNorm recomputation, a [`BatchNorm2d`](super::BatchNorm2d) directly followed by
/// a [`ReLU`](super::ReLU) runs as one pass that keeps one activation for the backward pass instead of
/// two ([`BatchNorm2d::forward_relu`](super::BatchNorm2d::forward_relu)), with the same results bit for
/// bit.
///
/// In [`ForwardMode::Eval`], a [`Conv2d`] directly followed by a [`BatchNorm2d`](super::BatchNorm2d)
/// runs as one convolution with the BatchNorm folded into its weights ([`Conv2d::fold_batch_norm`]),
/// which saves the BatchNorm's pass over the activations; any other BatchNorm directly followed by a
/// [`ReLU`](super::ReLU) runs with it as one pass. The folded convolutions are made on the first evaluation pass and kept
/// for the next ones until the weights or statistics may change: every way to change them goes through
/// this container (`visit_tensors_mut`, `visit_params_mut`, a training or recomputation pass, a
/// backward pass), and each drops them.
pub struct Sequential<B: Backend> {
    children: Vec<(String, Box<dyn Module<B>>)>,
    /// The folded convolutions of evaluation, with the index of the convolution each replaces (the
    /// BatchNorm after it is skipped); `None` when they must be made again.
    folded: Option<Vec<(usize, Conv2d<B>)>>,
}

impl<B: Backend> std::fmt::Debug for Sequential<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.children.iter().map(|(name, _)| name))
            .finish()
    }
}

impl<B: Backend> Default for Sequential<B> {
    fn default() -> Self {
        Self::new()
    }
}

impl<B: Backend> Sequential<B> {
    /// An empty container (the identity).
    pub fn new() -> Self {
        Self {
            children: Vec::new(),
            folded: None,
        }
    }

    /// Appends a child named by its position.
    pub fn push(&mut self, module: impl Module<B> + 'static) {
        let name = self.children.len().to_string();
        self.push_boxed(name, Box::new(module));
    }

    /// Appends a child with its own name.
    pub fn push_named(&mut self, name: impl Into<String>, module: impl Module<B> + 'static) {
        self.push_boxed(name, Box::new(module));
    }

    /// Appends a boxed child with its own name.
    pub fn push_boxed(&mut self, name: impl Into<String>, module: Box<dyn Module<B>>) {
        self.folded = None;
        self.children.push((name.into(), module));
    }

    /// The same container with a child appended, named by its position.
    pub fn with(mut self, module: impl Module<B> + 'static) -> Self {
        self.push(module);
        self
    }

    /// The same container with a named child appended.
    pub fn with_named(mut self, name: impl Into<String>, module: impl Module<B> + 'static) -> Self {
        self.push_named(name, module);
        self
    }

    /// The number of children.
    pub fn len(&self) -> usize {
        self.children.len()
    }

    /// Whether the container has no children.
    pub fn is_empty(&self) -> bool {
        self.children.is_empty()
    }

    /// The children's names, in order.
    pub fn child_names(&self) -> impl Iterator<Item = &str> {
        self.children.iter().map(|(name, _)| name.as_str())
    }
}

/// Whether the child at `index` is a BatchNorm directly followed by a ReLU, which training runs as one
/// fused pass ([`BatchNorm2d::forward_relu`](super::BatchNorm2d::forward_relu)) and evaluation too
/// ([`BatchNorm2d::forward_eval_relu`](super::BatchNorm2d::forward_eval_relu)). A BatchNorm
/// synchronised over ranks normalises through its own collectives, and runs alone.
fn relu_fused_after<B: Backend>(children: &[(String, Box<dyn Module<B>>)], index: usize) -> bool {
    children[index]
        .1
        .as_batch_norm()
        .is_some_and(|norm| !norm.is_synchronized())
        && children
            .get(index + 1)
            .is_some_and(|(_, next)| next.is_relu())
}

impl<B: Backend> Sequential<B> {
    /// Each convolution directly followed by a BatchNorm, folded, with the convolution's index.
    fn fold(&self, backend: &B) -> BackendResult<Vec<(usize, Conv2d<B>)>> {
        let mut folded = Vec::new();
        for (index, pair) in self.children.windows(2).enumerate() {
            if let (Some(conv), Some(norm)) = (pair[0].1.as_conv2d(), pair[1].1.as_batch_norm()) {
                folded.push((index, conv.fold_batch_norm(backend, norm)?));
            }
        }
        Ok(folded)
    }

    /// The evaluation pass: the children in order, each folded pair as its one convolution.
    fn forward_eval(&mut self, backend: &B, x: ForwardInput<'_, B>) -> BackendResult<B::Tensor> {
        let mut folded = match self.folded.take() {
            Some(folded) => folded,
            None => self.fold(backend)?,
        };
        let result = run_folded(&mut self.children, &mut folded, backend, x);
        self.folded = Some(folded);
        result
    }
}

/// Runs `children` in evaluation mode on `x`, replacing each convolution listed in `folded` and the
/// BatchNorm after it by the folded convolution, and each other BatchNorm directly followed by a ReLU
/// by one pass of both ([`BatchNorm2d::forward_eval_relu`](super::BatchNorm2d::forward_eval_relu)).
fn run_folded<B: Backend>(
    children: &mut [(String, Box<dyn Module<B>>)],
    folded: &mut [(usize, Conv2d<B>)],
    backend: &B,
    x: ForwardInput<'_, B>,
) -> BackendResult<B::Tensor> {
    if children.is_empty() {
        return x.into_owned(backend);
    }
    let steps = children.len();
    let mut folded = folded.iter_mut().peekable();
    let mut index = 0;
    // Runs the step at `index` (one child, a folded pair, or a BatchNorm with its ReLU) and moves
    // `index` past it.
    let mut step = |index: &mut usize, x: ForwardInput<'_, B>| {
        let at = *index;
        if let Some((_, conv)) = folded.next_if(|(folded_at, _)| *folded_at == at) {
            *index += 2;
            return conv.forward_input(backend, x, ForwardMode::Eval);
        }
        let rectified = relu_fused_after(children, at);
        if let (Some(norm), true) = (children[at].1.as_batch_norm(), rectified) {
            *index += 2;
            return norm.forward_eval_relu(backend, x.tensor());
        }
        *index += 1;
        children[at].1.forward_input(backend, x, ForwardMode::Eval)
    };
    let mut y = step(&mut index, x)?;
    while index < steps {
        y = step(&mut index, ForwardInput::Owned(y))?;
    }
    Ok(y)
}

impl<B: Backend> NamedTensors<B> for Sequential<B> {
    fn visit_tensors(&self, f: &mut dyn FnMut(&str, TensorRole, &B::Tensor)) {
        for (name, child) in &self.children {
            child.visit_tensors(&mut |n, role, t| f(&child_name(name, n), role, t));
        }
    }

    fn visit_tensors_mut(&mut self, f: &mut dyn FnMut(&str, TensorRole, &mut B::Tensor)) {
        self.folded = None;
        for (name, child) in &mut self.children {
            child.visit_tensors_mut(&mut |n, role, t| f(&child_name(name, n), role, t));
        }
    }
}

impl<B: Backend> Module<B> for Sequential<B> {
    /// Each child's output is handed to the next child as an owned input.
    fn forward_input(
        &mut self,
        backend: &B,
        x: ForwardInput<'_, B>,
        mode: ForwardMode,
    ) -> BackendResult<B::Tensor> {
        if mode == ForwardMode::Eval {
            return self.forward_eval(backend, x);
        }
        // Training changes the weights next, recomputation the running statistics now.
        self.folded = None;
        let steps = self.children.len();
        if steps == 0 {
            return x.into_owned(backend);
        }
        let mut index = 0;
        let mut input = x;
        loop {
            let fused = relu_fused_after(&self.children, index);
            let child = &mut self.children[index].1;
            let y = match child.as_batch_norm_mut() {
                Some(norm) if fused => norm.forward_relu(backend, input, mode)?,
                _ => child.forward_input(backend, input, mode)?,
            };
            index += if fused { 2 } else { 1 };
            if index >= steps {
                return Ok(y);
            }
            input = ForwardInput::Owned(y);
        }
    }

    fn backward(&mut self, backend: &B, dy: &B::Tensor) -> BackendResult<B::Tensor> {
        self.folded = None;
        let Some(mut index) = self.children.len().checked_sub(1) else {
            return backend.duplicate(dy);
        };
        let mut d: Option<B::Tensor> = None;
        loop {
            // A ReLU fused into the BatchNorm before it ran in that BatchNorm's pass, whose backward
            // takes the ReLU's output gradient.
            if index > 0 && relu_fused_after(&self.children, index - 1) {
                index -= 1;
            }
            let gradient = d.as_ref().unwrap_or(dy);
            d = Some(self.children[index].1.backward(backend, gradient)?);
            match index.checked_sub(1) {
                Some(previous) => index = previous,
                None => break,
            }
        }
        match d {
            Some(d) => Ok(d),
            None => backend.duplicate(dy),
        }
    }

    fn visit_params_mut(&mut self, f: &mut dyn FnMut(&str, &mut Param<B>)) {
        self.folded = None;
        for (name, child) in &mut self.children {
            child.visit_params_mut(&mut |n, p| f(&child_name(name, n), p));
        }
    }

    fn zero_grads(&mut self) {
        for (_, child) in &mut self.children {
            child.zero_grads();
        }
    }

    /// Only the first child's input is this container's input; the others' are always needed.
    fn require_input_grad(&mut self, required: bool) {
        if let Some((_, first)) = self.children.first_mut() {
            first.require_input_grad(required);
        }
    }

    fn visit_batch_counters(&self, f: &mut dyn FnMut(&str, u64)) {
        for (name, child) in &self.children {
            child.visit_batch_counters(&mut |n, c| f(&child_name(name, n), c));
        }
    }

    fn visit_batch_counters_mut(&mut self, f: &mut dyn FnMut(&str, &mut u64)) {
        for (name, child) in &mut self.children {
            child.visit_batch_counters_mut(&mut |n, c| f(&child_name(name, n), c));
        }
    }

    fn visit_batch_norms_mut(&mut self, f: &mut dyn FnMut(&mut BatchNorm2d<B>)) {
        for (_, child) in &mut self.children {
            child.visit_batch_norms_mut(f);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use swa_core::backend::{
        BatchNormGrads, BatchNormSaved, Decorator, ForwardConv, ForwardDense, ForwardElementwise,
        ForwardLoss, ForwardPool, HasShape, NormOps,
    };
    use swa_core::{CpuBackend, CpuTensor};

    use super::*;
    use crate::layers::{BatchNorm2d, Conv2dConfig, ReLU};

    /// The CPU backend, recording the shape of every evaluation-mode BatchNorm's input.
    #[derive(Clone, Debug)]
    struct NormLog {
        inner: CpuBackend,
        eval_inputs: Arc<Mutex<Vec<Vec<usize>>>>,
        /// Calls of the fused BatchNorm + ReLU ops, forward and backward.
        fused_passes: Arc<Mutex<usize>>,
        /// The inputs of evaluation-mode BatchNorms run with the ReLU after them.
        rectified_inputs: Arc<Mutex<Vec<Vec<usize>>>>,
    }

    impl NormLog {
        fn new() -> Self {
            Self {
                inner: CpuBackend::with_threads(2),
                eval_inputs: Arc::default(),
                fused_passes: Arc::default(),
                rectified_inputs: Arc::default(),
            }
        }

        /// The evaluation-mode BatchNorm inputs of rank 4 with more than one image: activations, not the
        /// weights or biases a fold normalises.
        fn activations_normalised(&self) -> usize {
            let inputs = self
                .eval_inputs
                .lock()
                .map(|v| v.clone())
                .unwrap_or_default();
            inputs
                .iter()
                .filter(|dims| dims.len() == 4 && dims[0] > 1)
                .count()
        }

        /// How many BatchNorms ran with their ReLU as one pass.
        fn normalised_with_relu(&self) -> usize {
            self.rectified_inputs.lock().map(|v| v.len()).unwrap_or(0)
        }

        fn clear(&self) {
            for log in [&self.eval_inputs, &self.rectified_inputs] {
                if let Ok(mut inputs) = log.lock() {
                    inputs.clear();
                }
            }
        }
    }

    impl Decorator for NormLog {
        type Inner = CpuBackend;
        const LABEL: &'static str = "norm log";
        fn inner(&self) -> &CpuBackend {
            &self.inner
        }
    }
    impl ForwardElementwise for NormLog {}
    impl ForwardDense for NormLog {}
    impl ForwardConv for NormLog {}
    impl ForwardPool for NormLog {}
    impl ForwardLoss for NormLog {}

    impl NormOps<CpuTensor> for NormLog {
        fn batch_norm_train(
            &self,
            x: &CpuTensor,
            gamma: &CpuTensor,
            beta: &CpuTensor,
            running_mean: &mut CpuTensor,
            running_var: &mut CpuTensor,
            momentum: f32,
            eps: f32,
        ) -> BackendResult<(CpuTensor, BatchNormSaved<CpuTensor>)> {
            self.inner
                .batch_norm_train(x, gamma, beta, running_mean, running_var, momentum, eps)
        }

        fn batch_norm_eval(
            &self,
            x: &CpuTensor,
            gamma: &CpuTensor,
            beta: &CpuTensor,
            running_mean: &CpuTensor,
            running_var: &CpuTensor,
            eps: f32,
        ) -> BackendResult<CpuTensor> {
            if let Ok(mut inputs) = self.eval_inputs.lock() {
                inputs.push(x.dims().to_vec());
            }
            self.inner
                .batch_norm_eval(x, gamma, beta, running_mean, running_var, eps)
        }

        fn batch_norm_relu_eval(
            &self,
            x: &CpuTensor,
            gamma: &CpuTensor,
            beta: &CpuTensor,
            running_mean: &CpuTensor,
            running_var: &CpuTensor,
            eps: f32,
        ) -> BackendResult<CpuTensor> {
            if let Ok(mut inputs) = self.rectified_inputs.lock() {
                inputs.push(x.dims().to_vec());
            }
            self.inner
                .batch_norm_relu_eval(x, gamma, beta, running_mean, running_var, eps)
        }

        fn batch_norm_backward(
            &self,
            x: &CpuTensor,
            gamma: &CpuTensor,
            saved: &BatchNormSaved<CpuTensor>,
            dy: &CpuTensor,
        ) -> BackendResult<BatchNormGrads<CpuTensor>> {
            self.inner.batch_norm_backward(x, gamma, saved, dy)
        }

        fn batch_norm_relu_train(
            &self,
            x: &CpuTensor,
            gamma: &CpuTensor,
            beta: &CpuTensor,
            running_mean: &mut CpuTensor,
            running_var: &mut CpuTensor,
            momentum: f32,
            eps: f32,
        ) -> BackendResult<(CpuTensor, BatchNormSaved<CpuTensor>)> {
            if let Ok(mut fused) = self.fused_passes.lock() {
                *fused += 1;
            }
            self.inner.batch_norm_relu_train(
                x,
                gamma,
                beta,
                running_mean,
                running_var,
                momentum,
                eps,
            )
        }

        fn batch_norm_relu_backward(
            &self,
            x: &CpuTensor,
            gamma: &CpuTensor,
            beta: &CpuTensor,
            saved: &BatchNormSaved<CpuTensor>,
            dz: &CpuTensor,
        ) -> BackendResult<BatchNormGrads<CpuTensor>> {
            if let Ok(mut fused) = self.fused_passes.lock() {
                *fused += 1;
            }
            self.inner
                .batch_norm_relu_backward(x, gamma, beta, saved, dz)
        }
    }

    /// conv(3→4, bias) → BN → ReLU → conv(4→5, stride 2, no bias) → BN: two foldable pairs, built
    /// from `seed`.
    fn layers<B: Backend>(backend: &B, seed: u64) -> Vec<Box<dyn Module<B>>> {
        let mut rng = StdRng::seed_from_u64(seed);
        let first = Conv2dConfig::new(3, 4, 3).padding(1);
        let second = Conv2dConfig::new(4, 5, 3).padding(1).stride(2).bias(false);
        vec![
            Box::new(Conv2d::new(backend, first, &mut rng).expect("a valid convolution")),
            Box::new(BatchNorm2d::new(backend, 4).expect("a valid BatchNorm")),
            Box::new(ReLU::new()),
            Box::new(Conv2d::new(backend, second, &mut rng).expect("a valid convolution")),
            Box::new(BatchNorm2d::new(backend, 5).expect("a valid BatchNorm")),
        ]
    }

    /// Sets every BatchNorm tensor of `module` to values drawn from `seed` (variances positive).
    fn perturb<B: Backend>(backend: &B, module: &mut dyn NamedTensors<B>, seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        module.visit_tensors_mut(&mut |name, _, tensor| {
            let values: Vec<f32> = (0..tensor.numel())
                .map(|_| {
                    if name.ends_with("running_var") {
                        rng.random_range(0.2..3.0)
                    } else {
                        rng.random_range(-1.0..1.0)
                    }
                })
                .collect();
            let fresh = backend
                .from_host(&values, tensor.dims())
                .expect("the tensor's own shape");
            *tensor = fresh;
        });
    }

    /// The children run one by one in evaluation mode: the reference the folded pass must match.
    fn unfolded<B: Backend>(
        backend: &B,
        sequential: &mut Sequential<B>,
        x: &B::Tensor,
    ) -> Vec<f32> {
        let mut y = backend.duplicate(x).expect("a copy");
        for (_, child) in &mut sequential.children {
            y = child
                .forward(backend, &y, ForwardMode::Eval)
                .expect("an evaluation pass");
        }
        backend.to_host(&y).expect("values")
    }

    fn folded<B: Backend>(backend: &B, sequential: &mut Sequential<B>, x: &B::Tensor) -> Vec<f32> {
        let y = sequential
            .forward(backend, x, ForwardMode::Eval)
            .expect("an evaluation pass");
        backend.to_host(&y).expect("values")
    }

    fn assert_close(what: &str, got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len(), "{what}: lengths");
        let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-5 * scale,
                "{what}: element {i} is {g}, unfolded {w}"
            );
        }
    }

    fn network(backend: &NormLog) -> Sequential<NormLog> {
        let mut sequential = Sequential::new();
        for (index, layer) in layers(backend, 3).into_iter().enumerate() {
            sequential.push_boxed(index.to_string(), layer);
        }
        perturb(backend, &mut sequential, 4);
        sequential
    }

    fn input(backend: &NormLog) -> CpuTensor {
        let mut rng = StdRng::seed_from_u64(5);
        let values: Vec<f32> = (0..2 * 3 * 6 * 6)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        backend
            .from_host(&values, &[2, 3, 6, 6])
            .expect("an image batch")
    }

    #[test]
    fn evaluation_folds_each_batch_norm_into_its_convolution_and_matches_the_layers_one_by_one() {
        let backend = NormLog::new();
        let mut sequential = network(&backend);
        let x = input(&backend);
        let want = unfolded(&backend, &mut sequential, &x);
        assert_eq!(
            backend.activations_normalised(),
            2,
            "the reference normalises twice"
        );
        backend.clear();
        let got = folded(&backend, &mut sequential, &x);
        assert_eq!(
            backend.activations_normalised(),
            0,
            "folded evaluation normalises no activations"
        );
        assert_close("first pass", &got, &want);
        // The second pass reuses the folded convolutions, and they give the same values.
        assert_eq!(folded(&backend, &mut sequential, &x), got);
    }

    #[test]
    fn folded_convolutions_follow_new_weights_statistics_and_recomputation() {
        let backend = NormLog::new();
        let mut sequential = network(&backend);
        let x = input(&backend);
        let before = folded(&backend, &mut sequential, &x);

        // New weights and statistics, set from outside as a checkpoint load or an SWA swap sets them.
        perturb(&backend, &mut sequential, 6);
        let want = unfolded(&backend, &mut sequential, &x);
        let got = folded(&backend, &mut sequential, &x);
        assert!(
            got.iter().zip(&before).any(|(a, b)| (a - b).abs() > 1e-3),
            "the new statistics change the output"
        );
        assert_close("after new tensors", &got, &want);

        // A recomputation pass moves the running statistics inside the BatchNorms.
        let mode = ForwardMode::RecomputeBatchNorm {
            momentum: 0.5,
            seed: 0,
        };
        sequential
            .forward(&backend, &x, mode)
            .expect("a recomputation pass");
        let want = unfolded(&backend, &mut sequential, &x);
        assert_close(
            "after recomputation",
            &folded(&backend, &mut sequential, &x),
            &want,
        );

        // An SGD-style update of the parameters alone.
        sequential.visit_params_mut(&mut |_, param| {
            param.value.mapv_inplace(|v| v * 0.5 + 0.1);
        });
        let want = unfolded(&backend, &mut sequential, &x);
        assert_close(
            "after a parameter update",
            &folded(&backend, &mut sequential, &x),
            &want,
        );
    }

    /// A ReLU a container cannot recognise, so that it runs as its own layer.
    struct SeparateReLU(ReLU<NormLog>);

    impl NamedTensors<NormLog> for SeparateReLU {
        fn visit_tensors(&self, _f: &mut dyn FnMut(&str, TensorRole, &CpuTensor)) {}
        fn visit_tensors_mut(&mut self, _f: &mut dyn FnMut(&str, TensorRole, &mut CpuTensor)) {}
    }

    impl Module<NormLog> for SeparateReLU {
        fn forward_input(
            &mut self,
            backend: &NormLog,
            x: ForwardInput<'_, NormLog>,
            mode: ForwardMode,
        ) -> BackendResult<CpuTensor> {
            self.0.forward_input(backend, x, mode)
        }

        fn backward(&mut self, backend: &NormLog, dy: &CpuTensor) -> BackendResult<CpuTensor> {
            self.0.backward(backend, dy)
        }

        fn visit_params_mut(&mut self, _f: &mut dyn FnMut(&str, &mut Param<NormLog>)) {}
    }

    /// One training step's output, input gradient, parameter gradients and running statistics, as bits.
    fn training_step(backend: &NormLog, sequential: &mut Sequential<NormLog>) -> Vec<u32> {
        let x = input(backend);
        let mode = ForwardMode::Train { seed: 1 };
        let y = sequential
            .forward(backend, &x, mode)
            .expect("a training pass");
        let dy = y.mapv(|v| (v * 3.0).sin());
        let dx = sequential.backward(backend, &dy).expect("a backward pass");
        let mut bits: Vec<u32> = y.iter().chain(dx.iter()).map(|v| v.to_bits()).collect();
        sequential.visit_params_mut(&mut |_, param| {
            let grad = param.grad.as_ref().expect("a gradient");
            bits.extend(grad.iter().map(|v| v.to_bits()));
        });
        sequential
            .visit_tensors(&mut |_, _, tensor| bits.extend(tensor.iter().map(|v| v.to_bits())));
        bits
    }

    #[test]
    fn training_fuses_each_relu_into_the_batch_norm_before_it_bit_for_bit() {
        let backend = NormLog::new();
        let mut fused = network(&backend);
        let mut separate = Sequential::new();
        for (index, layer) in layers(&backend, 3).into_iter().enumerate() {
            if layer.is_relu() {
                separate.push_boxed(index.to_string(), Box::new(SeparateReLU(ReLU::new())));
            } else {
                separate.push_boxed(index.to_string(), layer);
            }
        }
        perturb(&backend, &mut separate, 4);

        let want = training_step(&backend, &mut separate);
        let calls = |backend: &NormLog| backend.fused_passes.lock().map(|n| *n).unwrap_or(0);
        assert_eq!(calls(&backend), 0, "a ReLU of its own is not fused");
        assert_eq!(training_step(&backend, &mut fused), want);
        // The BatchNorm → ReLU pair ran as one op forward and one backward; the last BatchNorm alone.
        assert_eq!(calls(&backend), 2);
    }

    #[test]
    fn evaluation_runs_a_batch_norm_and_the_relu_after_it_as_one_pass_with_the_same_values() {
        let backend = NormLog::new();
        let mut rng = StdRng::seed_from_u64(7);
        let conv = Conv2dConfig::new(3, 4, 3).padding(1).bias(false);
        // Pre-activation order: BN → ReLU → conv → BN → ReLU, as in a PreResNet block.
        let mut sequential = Sequential::new()
            .with(BatchNorm2d::new(&backend, 3).expect("a valid BatchNorm"))
            .with(ReLU::new())
            .with(Conv2d::new(&backend, conv, &mut rng).expect("a valid convolution"))
            .with(BatchNorm2d::new(&backend, 4).expect("a valid BatchNorm"))
            .with(ReLU::new());
        perturb(&backend, &mut sequential, 8);
        let x = input(&backend);
        let want = unfolded(&backend, &mut sequential, &x);
        backend.clear();
        let got = folded(&backend, &mut sequential, &x);
        assert_eq!(
            backend.normalised_with_relu(),
            1,
            "the first BatchNorm runs with its ReLU; the second is folded"
        );
        assert_eq!(
            backend.activations_normalised(),
            0,
            "no BatchNorm runs alone"
        );
        assert_close("pre-activation pass", &got, &want);
    }
}
