//! Synchronised batch normalisation (PyTorch's `SyncBatchNorm`): in a training pass of a data-parallel
//! run, each BatchNorm layer normalises with the statistics of the global batch, all ranks' images
//! together, and its backward pass is that of one process normalising the global batch.
//!
//! Built from the backend's batch norm operations and two small all-reduces per layer and step (one of
//! per-channel counts, sums and squared deviations in the forward pass, one of the two per-channel
//! gradient sums in the backward pass), so that every backend runs it unchanged:
//!
//! - forward: this rank's per-channel mean and variance (a training-mode batch norm whose normalised
//!   output is dropped, which costs one pass over the activations), combined over the ranks by count
//!   (Chan et al.'s parallel variance), then the activations normalised with the global statistics
//!   through the evaluation-mode batch norm;
//! - backward: the backend's batch norm backward with the global statistics gives this rank's sums
//!   `Σ dy` and `Σ dy·x̂` (the shift's and the scale's gradients) and the input gradient of a batch of
//!   this rank's images alone; the sums are all-reduced and the input gradient corrected by a per-channel
//!   affine function of `x`, again through the evaluation-mode batch norm.
//!
//! Gradients follow the data-parallel convention of [`crate::distributed::DataParallel`]: each rank
//! returns the gradients of its own mean loss, which the gradient all-reduce weights by the rank's share
//! of the global batch. With `w_r = m_r / M` (this rank's values per channel over all ranks'), the input
//! gradient of rank `r` is `γ·σ⁻¹·(dy − A/m_r − x̂·B/m_r)` with `A = Σ_r w_r·Σ dy` and
//! `B = Σ_r w_r·Σ dy·x̂`: once weighted by `w_r` and summed, exactly the gradient of the global batch's
//! mean loss, also for shards of unequal size.

use std::sync::Arc;

use swa_core::backend::{Backend, BackendError, BackendResult, BatchNormGrads, BatchNormSaved};

use crate::distributed::Communicator;

/// The ranks a synchronised BatchNorm layer takes its statistics over.
#[derive(Clone)]
pub struct BatchNormSync {
    communicator: Arc<dyn Communicator>,
}

impl std::fmt::Debug for BatchNormSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchNormSync")
            .field("rank", &self.communicator.rank())
            .field("ranks", &self.communicator.size())
            .finish()
    }
}

impl BatchNormSync {
    /// Statistics over `communicator`'s ranks.
    pub fn new(communicator: Arc<dyn Communicator>) -> Self {
        Self { communicator }
    }

    /// Sums `values` over the ranks; a failed collective becomes a backend error of the pass it stopped.
    fn all_reduce(&self, operation: &str, values: &mut [f64]) -> BackendResult<()> {
        self.communicator
            .all_reduce_sum_f64(operation, values)
            .map_err(|e| BackendError::Device(format!("synchronised BatchNorm: {e}")))
    }

    /// Training-mode batch norm of `x` (`[N, C, H, W]` or `[N, C]`) with the statistics of all ranks'
    /// batches: as [`swa_core::backend::NormOps::batch_norm_train`] on the concatenation of the ranks'
    /// `x`, the running statistics moved by `momentum` towards the global mean and unbiased variance.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn train<B: Backend>(
        &self,
        backend: &B,
        x: &B::Tensor,
        gamma: &B::Tensor,
        beta: &B::Tensor,
        running_mean: &mut B::Tensor,
        running_var: &mut B::Tensor,
        momentum: f32,
        eps: f32,
    ) -> BackendResult<(B::Tensor, BatchNormSaved<B::Tensor>)> {
        let channels = per_channel_len(gamma);
        let local_count = values_per_channel(x, channels);
        let (local_mean, local_squares) = local_moments(backend, x, gamma, beta, channels, eps)?;
        // Per channel: count·mean and the squared deviations from 0 (M2 + count·mean²), then the count.
        // Summing about 0 rather than a shift lets the ranks combine without first agreeing on one;
        // the sums are in f64, where the cancellation costs about 1e-16·mean²/variance.
        let count = local_count as f64;
        let mut sums: Vec<f64> = local_mean
            .iter()
            .map(|&mean| count * mean)
            .chain(
                local_mean
                    .iter()
                    .zip(&local_squares)
                    .map(|(&mean, &m2)| m2 + count * mean * mean),
            )
            .chain(std::iter::once(count))
            .collect();
        self.all_reduce(
            "the synchronised BatchNorm statistics all-reduce",
            &mut sums,
        )?;
        let total = sums[2 * channels];
        if total < 2.0 {
            return Err(BackendError::InvalidArgument {
                op: "synchronised batch_norm_train",
                message: format!(
                    "training needs more than one value per channel over all ranks, got {total}"
                ),
            });
        }
        let mean: Vec<f64> = sums[..channels].iter().map(|s| s / total).collect();
        let biased_var: Vec<f64> = sums[channels..2 * channels]
            .iter()
            .zip(&mean)
            .map(|(squares, mean)| (squares / total - mean * mean).max(0.0))
            .collect();

        let mean_f32: Vec<f32> = mean.iter().map(|&m| m as f32).collect();
        let var_f32: Vec<f32> = biased_var.iter().map(|&v| v as f32).collect();
        let mean_tensor = backend.from_host(&mean_f32, &[channels])?;
        let var_tensor = backend.from_host(&var_f32, &[channels])?;
        // The evaluation-mode batch norm with the batch's own statistics is the training-mode output.
        let y = backend.batch_norm_eval(x, gamma, beta, &mean_tensor, &var_tensor, eps)?;

        let unbias = total / (total - 1.0);
        let keep = 1.0 - momentum;
        let mut running: Vec<f32> = backend.to_host(running_mean)?;
        for (r, &m) in running.iter_mut().zip(&mean) {
            *r = keep * *r + momentum * m as f32;
        }
        *running_mean = backend.from_host(&running, &[channels])?;
        let mut running: Vec<f32> = backend.to_host(running_var)?;
        for (r, &v) in running.iter_mut().zip(&biased_var) {
            *r = keep * *r + momentum * (v * unbias) as f32;
        }
        *running_var = backend.from_host(&running, &[channels])?;

        let inv_std: Vec<f32> = biased_var
            .iter()
            .map(|&v| (1.0 / (v + f64::from(eps)).sqrt()) as f32)
            .collect();
        let saved = BatchNormSaved {
            mean: mean_tensor,
            inv_std: backend.from_host(&inv_std, &[channels])?,
        };
        Ok((y, saved))
    }

    /// The backward pass of [`BatchNormSync::train`]: the scale's and shift's gradients of this rank's
    /// images (the gradient all-reduce adds the ranks' up) and the input gradient described in the module
    /// documentation.
    pub(super) fn backward<B: Backend>(
        &self,
        backend: &B,
        x: &B::Tensor,
        gamma: &B::Tensor,
        saved: &BatchNormSaved<B::Tensor>,
        dy: &B::Tensor,
    ) -> BackendResult<BatchNormGrads<B::Tensor>> {
        let channels = per_channel_len(gamma);
        let local_count = values_per_channel(x, channels) as f64;
        // With the global statistics saved, the backend gives this rank's Σ dy·x̂ (the scale's gradient)
        // and Σ dy (the shift's), and the input gradient as if its images were the whole batch.
        let local = backend.batch_norm_backward(x, gamma, saved, dy)?;
        let dot: Vec<f64> = to_f64(&backend.to_host(&local.gamma)?);
        let sum: Vec<f64> = to_f64(&backend.to_host(&local.beta)?);
        let mut sums: Vec<f64> = sum
            .iter()
            .chain(&dot)
            .map(|s| s * local_count)
            .chain(std::iter::once(local_count))
            .collect();
        self.all_reduce("the synchronised BatchNorm gradient all-reduce", &mut sums)?;
        let total = sums[2 * channels];
        if total <= 0.0 || local_count <= 0.0 {
            return Ok(local);
        }
        let gammas = to_f64(&backend.to_host(gamma)?);
        let inv_std = to_f64(&backend.to_host(&saved.inv_std)?);
        // dx − dx_local = γ·σ⁻¹/m·((Σdy − A) + x̂·(Σdy·x̂ − B)), an affine function of x per channel:
        // scale k·(Σdy·x̂ − B)·σ⁻¹ around the mean, plus k·(Σdy − A), with k = γ·σ⁻¹/m.
        let mut slope = Vec::with_capacity(channels);
        let mut offset = Vec::with_capacity(channels);
        for c in 0..channels {
            let k = gammas[c] * inv_std[c] / local_count;
            let weighted_sum = sums[c] / total;
            let weighted_dot = sums[channels + c] / total;
            slope.push((k * (dot[c] - weighted_dot) * inv_std[c]) as f32);
            offset.push((k * (sum[c] - weighted_sum)) as f32);
        }
        let slope = backend.from_host(&slope, &[channels])?;
        let offset = backend.from_host(&offset, &[channels])?;
        let unit = backend.from_host(&vec![1.0; channels], &[channels])?;
        // batch_norm_eval(x, slope, offset, mean, 1, eps 0) = slope·(x − mean) + offset.
        let correction = backend.batch_norm_eval(x, &slope, &offset, &saved.mean, &unit, 0.0)?;
        Ok(BatchNormGrads {
            input: backend.add(&local.input, &correction)?,
            gamma: local.gamma,
            beta: local.beta,
        })
    }
}

fn to_f64(values: &[f32]) -> Vec<f64> {
    values.iter().map(|&v| f64::from(v)).collect()
}

/// The length of a per-channel tensor.
fn per_channel_len<T: swa_core::backend::HasShape>(t: &T) -> usize {
    t.numel()
}

/// The values of each channel in `x`: images times positions.
fn values_per_channel<T: swa_core::backend::HasShape>(x: &T, channels: usize) -> usize {
    x.numel().checked_div(channels).unwrap_or(0)
}

/// This rank's per-channel mean and sum of squared deviations from it (M2), in f64.
fn local_moments<B: Backend>(
    backend: &B,
    x: &B::Tensor,
    gamma: &B::Tensor,
    beta: &B::Tensor,
    channels: usize,
    eps: f32,
) -> BackendResult<(Vec<f64>, Vec<f64>)> {
    let count = values_per_channel(x, channels);
    if count < 2 {
        // One value per channel (or none): its mean is itself and it deviates from it by nothing; the
        // backend's batch norm refuses such a batch, so this is done on the host.
        let values = backend.to_host(x)?;
        let mut mean = vec![0.0; channels];
        if count == 1 {
            for (m, &v) in mean.iter_mut().zip(&values) {
                *m = f64::from(v);
            }
        }
        return Ok((mean, vec![0.0; channels]));
    }
    // A training-mode batch norm with momentum 1 replaces the running statistics by the batch's mean and
    // unbiased variance; its normalised output is not needed.
    let mut mean = backend.zeros(&[channels])?;
    let mut var = backend.zeros(&[channels])?;
    backend.batch_norm_train(x, gamma, beta, &mut mean, &mut var, 1.0, eps)?;
    let mean = to_f64(&backend.to_host(&mean)?);
    let squares = to_f64(&backend.to_host(&var)?)
        .into_iter()
        .map(|unbiased| unbiased * (count - 1) as f64)
        .collect();
    Ok((mean, squares))
}
