//! Evaluation runs some layers together (a BatchNorm folded into the convolution before it, a BatchNorm
//! and the ReLU after it in one pass): the networks' logits must be those of the layers run one by one,
//! and must follow every change of the weights and statistics (a load, an average swapped in,
//! `update_bn`).

use swa_core::backend::HasShape;
use swa_core::backend::{
    Backend, BackendResult, BatchNormGrads, BatchNormSaved, Decorator, ElementwiseOps, ForwardConv,
    ForwardDense, ForwardElementwise, ForwardLoss, ForwardPool, NormOps,
};
use swa_core::params::TensorRole;
use swa_core::{CpuBackend, CpuTensor};
use swa_models::evaluate::predict_logits;
use swa_models::{update_bn, Architecture, HostBatch, Module};

/// The CPU backend with its one-pass BatchNorm-and-ReLU replaced by the two operations it stands for.
#[derive(Clone, Debug)]
struct Unfused {
    inner: CpuBackend,
}

impl Decorator for Unfused {
    type Inner = CpuBackend;
    const LABEL: &'static str = "unfused";
    fn inner(&self) -> &CpuBackend {
        &self.inner
    }
}
impl ForwardElementwise for Unfused {}
impl ForwardDense for Unfused {}
impl ForwardConv for Unfused {}
impl ForwardPool for Unfused {}
impl ForwardLoss for Unfused {}

impl NormOps<CpuTensor> for Unfused {
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
        let normalised =
            self.inner
                .batch_norm_eval(x, gamma, beta, running_mean, running_var, eps)?;
        self.inner.relu(&normalised)
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
        self.inner
            .batch_norm_relu_train(x, gamma, beta, running_mean, running_var, momentum, eps)
    }

    fn batch_norm_relu_backward(
        &self,
        x: &CpuTensor,
        gamma: &CpuTensor,
        beta: &CpuTensor,
        saved: &BatchNormSaved<CpuTensor>,
        dz: &CpuTensor,
    ) -> BackendResult<BatchNormGrads<CpuTensor>> {
        self.inner
            .batch_norm_relu_backward(x, gamma, beta, saved, dz)
    }
}

const CLASSES: usize = 10;

/// `n` images of 32×32 with values from a small integer hash, and labels.
fn batch(n: usize, seed: u32) -> HostBatch {
    let len = n * 3 * 32 * 32;
    let images = (0..len as u32)
        .map(|i| {
            let h = (i ^ seed.wrapping_mul(0x9e37_79b9)).wrapping_mul(0x85eb_ca6b);
            ((h >> 8) % 2001) as f32 / 1000.0 - 1.0
        })
        .collect();
    HostBatch {
        images,
        shape: [n, 3, 32, 32],
        labels: (0..n as u32).map(|i| i % CLASSES as u32).collect(),
    }
}

/// Copies every tensor of `from` into `to` by name, as an average is swapped into a network.
fn copy_tensors<B: Backend>(backend: &B, from: &dyn Module<B>, to: &mut dyn Module<B>) {
    let mut values = Vec::new();
    from.visit_tensors(&mut |name, _, t| {
        values.push((name.to_string(), backend.to_host(t).expect("values")));
    });
    let mut values = values.into_iter();
    to.visit_tensors_mut(&mut |name, _, t| {
        let (from_name, v) = values.next().expect("as many tensors");
        assert_eq!(from_name, name, "the same network");
        *t = backend.from_host(&v, t.dims()).expect("the same shape");
    });
}

fn logits<B: Backend>(backend: &B, model: &mut dyn Module<B>, batch: &HostBatch) -> Vec<f32> {
    predict_logits(backend, model, batch)
        .expect("an evaluation pass")
        .0
}

fn assert_relatively_close(what: &str, got: &[f32], want: &[f32], tolerance: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(scale > 0.0, "{what}: logits are all zero");
    let diff = got
        .iter()
        .zip(want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        diff <= tolerance * scale,
        "{what}: logits differ by {diff}, {} of the largest",
        diff / scale
    );
}

/// BatchNorm statistics away from their initial 0 and 1, so that folding them changes something.
fn recompute_statistics<B: Backend>(backend: &B, model: &mut dyn Module<B>) {
    let batches = [batch(8, 11), batch(8, 12)];
    update_bn(backend, model, &batches, 3).expect("a recomputation");
}

#[test]
fn one_pass_batch_norm_and_relu_give_the_logits_of_the_two_operations() {
    for name in ["preresnet20", "vgg16bn"] {
        let architecture: Architecture = name.parse().expect("a known network");
        let cpu = CpuBackend::with_threads(2);
        let unfused = Unfused {
            inner: CpuBackend::with_threads(2),
        };
        let mut fused_model = architecture.build(&cpu, CLASSES, 5).expect("a network");
        let mut reference = architecture.build(&unfused, CLASSES, 5).expect("a network");
        recompute_statistics(&cpu, fused_model.as_mut());
        recompute_statistics(&unfused, reference.as_mut());
        let x = batch(4, 21);
        let got = logits(&cpu, fused_model.as_mut(), &x);
        let want = logits(&unfused, reference.as_mut(), &x);
        assert_relatively_close(name, &got, &want, 1e-5);
    }
}

#[test]
fn evaluation_follows_loaded_weights_swapped_averages_and_recomputed_statistics() {
    let backend = CpuBackend::with_threads(2);
    for name in ["preresnet20", "vgg16bn"] {
        let architecture: Architecture = name.parse().expect("a known network");
        let x = batch(4, 31);
        let mut model = architecture.build(&backend, CLASSES, 1).expect("a network");
        recompute_statistics(&backend, model.as_mut());
        // The first evaluation makes and keeps the folded convolutions.
        let first = logits(&backend, model.as_mut(), &x);

        // Other weights and statistics written in, as a checkpoint load or an average swap writes them.
        let mut other = architecture.build(&backend, CLASSES, 2).expect("a network");
        recompute_statistics(&backend, other.as_mut());
        copy_tensors(&backend, other.as_ref(), model.as_mut());
        let mut fresh = architecture.build(&backend, CLASSES, 3).expect("a network");
        copy_tensors(&backend, other.as_ref(), fresh.as_mut());
        let swapped = logits(&backend, model.as_mut(), &x);
        assert_ne!(swapped, first, "{name}: the new weights change the logits");
        assert_eq!(
            swapped,
            logits(&backend, fresh.as_mut(), &x),
            "{name}: after a swap, the logits of a network never evaluated"
        );

        // Statistics recomputed on other data.
        update_bn(&backend, model.as_mut(), &[batch(8, 41)], 0).expect("a recomputation");
        let mut fresh = architecture.build(&backend, CLASSES, 4).expect("a network");
        copy_tensors(&backend, model.as_ref(), fresh.as_mut());
        let recomputed = logits(&backend, model.as_mut(), &x);
        assert_ne!(
            recomputed, swapped,
            "{name}: new statistics change the logits"
        );
        assert_eq!(
            recomputed,
            logits(&backend, fresh.as_mut(), &x),
            "{name}: after update_bn, the logits of a network never evaluated"
        );

        // A change of the statistics alone, through the tensors of that role.
        model.visit_tensors_mut(&mut |_, role, t| {
            if role == TensorRole::BatchNormStatistic {
                let v: Vec<f32> = backend
                    .to_host(t)
                    .expect("values")
                    .iter()
                    .map(|v| v * 0.5 + 0.25)
                    .collect();
                *t = backend.from_host(&v, t.dims()).expect("its shape");
            }
        });
        let mut fresh = architecture.build(&backend, CLASSES, 6).expect("a network");
        copy_tensors(&backend, model.as_ref(), fresh.as_mut());
        assert_eq!(
            logits(&backend, model.as_mut(), &x),
            logits(&backend, fresh.as_mut(), &x),
            "{name}: after new statistics, the logits of a network never evaluated"
        );
    }
}
