//! An ordered container of named children.

use swa_core::backend::{Backend, BackendResult};
use swa_core::params::{NamedTensors, TensorRole};

use super::Conv2d;
use crate::module::{child_name, ForwardInput, ForwardMode, Module, Param};

/// Children run one after the other, PyTorch's `nn.Sequential`: a child's tensors are named
/// `<child name>.<tensor name>`. Children added with [`Sequential::push`] are named by their position
/// (`features.0.weight`), as in PyTorch; [`Sequential::push_named`] gives a child a name of its own
/// (`layer1`, `fc`), which is how networks name their top-level parts.
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
        let rectified = children.get(at + 1).is_some_and(|(_, next)| next.is_relu());
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
        let mut children = self.children.iter_mut();
        let Some((_, first)) = children.next() else {
            return x.into_owned(backend);
        };
        let mut y = first.forward_input(backend, x, mode)?;
        for (_, child) in children {
            y = child.forward_owned(backend, y, mode)?;
        }
        Ok(y)
    }

    fn backward(&mut self, backend: &B, dy: &B::Tensor) -> BackendResult<B::Tensor> {
        self.folded = None;
        let mut children = self.children.iter_mut().rev();
        let Some((_, last)) = children.next() else {
            return backend.duplicate(dy);
        };
        let mut d = last.backward(backend, dy)?;
        for (_, child) in children {
            d = child.backward(backend, &d)?;
        }
        Ok(d)
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
        /// The inputs of evaluation-mode BatchNorms run with the ReLU after them.
        rectified_inputs: Arc<Mutex<Vec<Vec<usize>>>>,
    }

    impl NormLog {
        fn new() -> Self {
            Self {
                inner: CpuBackend::with_threads(2),
                eval_inputs: Arc::default(),
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
