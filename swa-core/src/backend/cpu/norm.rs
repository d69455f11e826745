//! Batch norm over `[N, C, H, W]` (or `[N, C]`), per channel, in PyTorch's formulation.
//!
//! Every pass walks the batch in memory order, image by image, so that it streams through contiguous
//! memory (a channel's rows lie a whole image apart: walking one channel at a time would jump a page
//! or more per row, which defeats the hardware prefetcher). Statistics are summed per fixed group of
//! images, in parallel, each row in f32 with eight lanes and the rows in f64; the groups' sums are then
//! added in order. The groups do not depend on the thread count, so results are bit-identical whatever
//! the threads, and accurate for large batches. Outputs are written `H·W` row by row, each value once.

use rayon::prelude::*;

use super::matrix::{contiguous, into_tensor};
use super::{CpuBackend, CpuTensor};
use crate::backend::{BackendError, BackendResult, BatchNormGrads, BatchNormSaved, NormOps};

/// `[N, C, H·W]`: the batch, the channels, and the values per channel and image.
#[derive(Clone, Copy, Debug)]
struct Layout {
    batch: usize,
    channels: usize,
    plane: usize,
}

impl Layout {
    fn of(op: &'static str, x: &CpuTensor) -> BackendResult<Self> {
        match *x.shape() {
            [batch, channels] => Ok(Self {
                batch,
                channels,
                plane: 1,
            }),
            [batch, channels, h, w] => Ok(Self {
                batch,
                channels,
                plane: h * w,
            }),
            _ => Err(BackendError::ShapeMismatch {
                op,
                expected: "an input of rank 2 [N, C] or 4 [N, C, H, W]".into(),
                got: x.shape().to_vec(),
            }),
        }
    }

    /// Values per channel over the batch.
    fn count(&self) -> usize {
        self.batch * self.plane
    }

    /// Channel `c`'s row of image `n`.
    fn row<'a>(&self, data: &'a [f32], n: usize, c: usize) -> &'a [f32] {
        &data[(n * self.channels + c) * self.plane..][..self.plane]
    }
}

fn check_per_channel(
    op: &'static str,
    what: &str,
    t: &CpuTensor,
    layout: &Layout,
) -> BackendResult<()> {
    if t.shape() == [layout.channels] {
        Ok(())
    } else {
        Err(BackendError::ShapeMismatch {
            op,
            expected: format!(
                "{what} of shape [{}], one value per channel",
                layout.channels
            ),
            got: t.shape().to_vec(),
        })
    }
}

/// Sums of `x − shift` and of its square over eight lanes.
fn shifted_sums(row: &[f32], shift: f32) -> (f32, f32) {
    let mut sum = [0.0f32; 8];
    let mut squares = [0.0f32; 8];
    let mut chunks = row.chunks_exact(8);
    for chunk in &mut chunks {
        for i in 0..8 {
            let d = chunk[i] - shift;
            sum[i] += d;
            squares[i] += d * d;
        }
    }
    let (mut s, mut q) = (sum.iter().sum::<f32>(), squares.iter().sum::<f32>());
    for &v in chunks.remainder() {
        let d = v - shift;
        s += d;
        q += d * d;
    }
    (s, q)
}

/// Sums of `dy` and of `dy · (x − mean)` over eight lanes.
fn gradient_sums(dy: &[f32], x: &[f32], mean: f32) -> (f32, f32) {
    let mut sum = [0.0f32; 8];
    let mut dot = [0.0f32; 8];
    let mut dy_chunks = dy.chunks_exact(8);
    let mut x_chunks = x.chunks_exact(8);
    for (d, v) in (&mut dy_chunks).zip(&mut x_chunks) {
        for i in 0..8 {
            sum[i] += d[i];
            dot[i] += d[i] * (v[i] - mean);
        }
    }
    let (mut s, mut p) = (sum.iter().sum::<f32>(), dot.iter().sum::<f32>());
    for (&d, &v) in dy_chunks.remainder().iter().zip(x_chunks.remainder()) {
        s += d;
        p += d * (v - mean);
    }
    (s, p)
}

/// Images per group of the per-channel sums: fixed, so that the sums do not depend on the thread count;
/// small, so that the groups keep both threads busy on a batch of 128.
const IMAGES_PER_GROUP: usize = 4;

/// Two sums per channel over the batch: `row_sums(n, c, scratch)` gives image `n`'s two f32 sums for
/// channel `c` (`scratch` is a buffer of the task's, for a row derived on the fly), added up in f64 per
/// group of [`IMAGES_PER_GROUP`] images in parallel, and the groups in order.
fn channel_sums<F>(layout: &Layout, row_sums: F) -> Vec<(f64, f64)>
where
    F: Fn(usize, usize, &mut Vec<f32>) -> (f32, f32) + Sync,
{
    let groups = layout.batch.div_ceil(IMAGES_PER_GROUP);
    let partials: Vec<Vec<(f64, f64)>> = (0..groups)
        .into_par_iter()
        .map(|group| {
            let mut sums = vec![(0.0f64, 0.0f64); layout.channels];
            let mut scratch = Vec::new();
            let first = group * IMAGES_PER_GROUP;
            for n in first..(first + IMAGES_PER_GROUP).min(layout.batch) {
                for (c, sum) in sums.iter_mut().enumerate() {
                    let (a, b) = row_sums(n, c, &mut scratch);
                    sum.0 += f64::from(a);
                    sum.1 += f64::from(b);
                }
            }
            sums
        })
        .collect();
    let mut total = vec![(0.0f64, 0.0f64); layout.channels];
    for partial in partials {
        for (t, p) in total.iter_mut().zip(partial) {
            t.0 += p.0;
            t.1 += p.1;
        }
    }
    total
}

/// Channel statistics of a training batch.
struct Moments {
    mean: f64,
    biased_var: f64,
}

/// Mean and biased variance of every channel, each shifted by the channel's first value so that a large
/// mean does not cancel the variance away.
fn moments(layout: &Layout, x: &[f32]) -> Vec<Moments> {
    let shifts: Vec<f32> = (0..layout.channels)
        .map(|c| layout.row(x, 0, c)[0])
        .collect();
    let count = layout.count() as f64;
    channel_sums(layout, |n, c, _| {
        shifted_sums(layout.row(x, n, c), shifts[c])
    })
    .into_iter()
    .zip(&shifts)
    .map(|((sum, squares), &shift)| {
        let shifted_mean = sum / count;
        Moments {
            mean: f64::from(shift) + shifted_mean,
            biased_var: (squares / count - shifted_mean * shifted_mean).max(0.0),
        }
    })
    .collect()
}

/// Each channel's `(scale, shift)` of an evaluation-mode batch norm, after checking that every
/// per-channel tensor has one value per channel of `layout`.
fn eval_coefficients(
    op: &'static str,
    layout: &Layout,
    gamma: &CpuTensor,
    beta: &CpuTensor,
    running_mean: &CpuTensor,
    running_var: &CpuTensor,
    eps: f32,
) -> BackendResult<Vec<(f32, f32)>> {
    check_per_channel(op, "gamma", gamma, layout)?;
    check_per_channel(op, "beta", beta, layout)?;
    check_per_channel(op, "running_mean", running_mean, layout)?;
    check_per_channel(op, "running_var", running_var, layout)?;
    let (gamma, beta) = (contiguous(gamma), contiguous(beta));
    let (mean, var) = (contiguous(running_mean), contiguous(running_var));
    Ok((0..layout.channels)
        .map(|c| {
            let scale = gamma[c] / (var[c] + eps).sqrt();
            (scale, beta[c] - mean[c] * scale)
        })
        .collect())
}

/// Below this many values a thread takes the rows of [`affine_rows`] alone.
const AFFINE_ROWS_MIN_LEN: usize = 1 << 14;

/// `y = x · scale[c] + shift[c]` (then `max(y, 0)` when `rectify`) into a new buffer, one `H·W` row at a
/// time. The buffer is written once, not zeroed first: an evaluation pass is bound by memory traffic, and
/// zeroing would add a third of it.
fn affine_rows(layout: &Layout, x: &[f32], coefficients: &[(f32, f32)], rectify: bool) -> Vec<f32> {
    let len = x.len();
    let mut y = Vec::with_capacity(len);
    if len == 0 || coefficients.is_empty() {
        return y;
    }
    let plane = layout.plane;
    y.spare_capacity_mut()[..len]
        .par_chunks_mut(plane)
        .zip(x.par_chunks(plane))
        .enumerate()
        .with_min_len((AFFINE_ROWS_MIN_LEN / plane).max(1))
        .for_each(|(row, (out, input))| {
            let (scale, shift) = coefficients[row % coefficients.len()];
            if rectify {
                for (o, &v) in out.iter_mut().zip(input) {
                    o.write((v * scale + shift).max(0.0));
                }
            } else {
                for (o, &v) in out.iter_mut().zip(input) {
                    o.write(v * scale + shift);
                }
            }
        });
    // SAFETY: `len` is a multiple of `plane` (`x` holds `batch · channels` rows of it), so the chunks of
    // `plane` cover the first `len` spare elements exactly, and each chunk's loop wrote every element of
    // it, since `input` is as long as `out`.
    unsafe { y.set_len(len) };
    y
}

/// The gradient a ReLU passes back given its input `y` and output gradient `dz`, as the ReLU backward op
/// computes it: nothing where `y ≤ 0`.
#[inline(always)]
fn relu_mask(y: f32, dz: f32) -> f32 {
    if y <= 0.0 {
        0.0
    } else {
        dz
    }
}

/// The scale and shift that normalise channel `c` with batch statistics: `x̂·γ + β = x·scale + shift`.
#[inline(always)]
fn batch_coefficients(gamma: f32, beta: f32, mean: f32, inv_std: f32) -> (f32, f32) {
    let scale = gamma * inv_std;
    (scale, beta - mean * scale)
}

impl CpuBackend {
    /// Training-mode batch norm, followed by a ReLU when `relu`.
    #[allow(clippy::too_many_arguments)]
    fn batch_norm_train_with(
        &self,
        op: &'static str,
        x: &CpuTensor,
        gamma: &CpuTensor,
        beta: &CpuTensor,
        running_mean: &mut CpuTensor,
        running_var: &mut CpuTensor,
        momentum: f32,
        eps: f32,
        relu: bool,
    ) -> BackendResult<(CpuTensor, BatchNormSaved<CpuTensor>)> {
        self.install(|| {
            let layout = Layout::of(op, x)?;
            check_per_channel(op, "gamma", gamma, &layout)?;
            check_per_channel(op, "beta", beta, &layout)?;
            check_per_channel(op, "running_mean", running_mean, &layout)?;
            check_per_channel(op, "running_var", running_var, &layout)?;
            if layout.count() < 2 {
                return Err(BackendError::InvalidArgument {
                    op,
                    message: format!(
                        "training needs more than one value per channel, got input {:?}",
                        x.shape()
                    ),
                });
            }
            if eps.is_nan() || eps < 0.0 {
                return Err(BackendError::InvalidArgument {
                    op,
                    message: format!("eps {eps} must be non-negative"),
                });
            }
            let xs = contiguous(x);
            let gamma = contiguous(gamma);
            let beta = contiguous(beta);

            let stats = moments(&layout, &xs);
            let inv_std: Vec<f32> = stats
                .iter()
                .map(|m| (1.0 / (m.biased_var + f64::from(eps)).sqrt()) as f32)
                .collect();
            let mean: Vec<f32> = stats.iter().map(|m| m.mean as f32).collect();

            let coefficients: Vec<(f32, f32)> = (0..layout.channels)
                .map(|c| batch_coefficients(gamma[c], beta[c], mean[c], inv_std[c]))
                .collect();
            let y = affine_rows(&layout, &xs, &coefficients, relu);

            let unbias = layout.count() as f64 / (layout.count() - 1) as f64;
            let keep = 1.0 - momentum;
            for ((rm, rv), m) in running_mean
                .iter_mut()
                .zip(running_var.iter_mut())
                .zip(&stats)
            {
                *rm = keep * *rm + momentum * m.mean as f32;
                *rv = keep * *rv + momentum * (m.biased_var * unbias) as f32;
            }

            let c = layout.channels;
            Ok((
                into_tensor(op, x.shape(), y)?,
                BatchNormSaved {
                    mean: into_tensor(op, &[c], mean)?,
                    inv_std: into_tensor(op, &[c], inv_std)?,
                },
            ))
        })
    }

    /// Evaluation-mode batch norm, followed by a ReLU when `rectify`: one pass writing each output once.
    /// [`eval_coefficients`] checks every per-channel tensor against the input's channels.
    #[allow(clippy::too_many_arguments)]
    fn batch_norm_eval_with(
        &self,
        op: &'static str,
        x: &CpuTensor,
        gamma: &CpuTensor,
        beta: &CpuTensor,
        running_mean: &CpuTensor,
        running_var: &CpuTensor,
        eps: f32,
        rectify: bool,
    ) -> BackendResult<CpuTensor> {
        self.install(|| {
            let layout = Layout::of(op, x)?;
            let coefficients =
                eval_coefficients(op, &layout, gamma, beta, running_mean, running_var, eps)?;
            let y = affine_rows(&layout, &contiguous(x), &coefficients, rectify);
            into_tensor(op, x.shape(), y)
        })
    }

    /// Gradients of training-mode batch norm from the gradient `dy` of its output, or with `relu_beta`
    /// from the gradient of `max(bn(x), 0)`, the ReLU's mask recomputed from `x` and the shift β.
    fn batch_norm_backward_with(
        &self,
        op: &'static str,
        x: &CpuTensor,
        gamma: &CpuTensor,
        relu_beta: Option<&CpuTensor>,
        saved: &BatchNormSaved<CpuTensor>,
        dy: &CpuTensor,
    ) -> BackendResult<BatchNormGrads<CpuTensor>> {
        self.install(|| {
            let layout = Layout::of(op, x)?;
            check_per_channel(op, "gamma", gamma, &layout)?;
            if let Some(beta) = relu_beta {
                check_per_channel(op, "beta", beta, &layout)?;
            }
            check_per_channel(op, "saved mean", &saved.mean, &layout)?;
            check_per_channel(op, "saved inv_std", &saved.inv_std, &layout)?;
            if dy.shape() != x.shape() {
                return Err(BackendError::ShapeMismatch {
                    op,
                    expected: format!("an output gradient of the input's shape {:?}", x.shape()),
                    got: dy.shape().to_vec(),
                });
            }
            let xs = contiguous(x);
            let dys = contiguous(dy);
            let gamma = contiguous(gamma);
            let beta = relu_beta.map(contiguous);
            let mean = contiguous(&saved.mean);
            let inv_std = contiguous(&saved.inv_std);
            let count = layout.count() as f64;

            // The ReLU's input is the forward pass's `x·scale + shift`, recomputed (no mask without β).
            let relu_coefficients: Option<Vec<(f32, f32)>> = beta.as_ref().map(|beta| {
                (0..layout.channels)
                    .map(|c| batch_coefficients(gamma[c], beta[c], mean[c], inv_std[c]))
                    .collect()
            });
            let masked = |n: usize, c: usize, buffer: &mut Vec<f32>| {
                let Some(coefficients) = &relu_coefficients else {
                    return;
                };
                let (scale_y, shift_y) = coefficients[c];
                buffer.clear();
                buffer.extend(
                    layout
                        .row(&dys, n, c)
                        .iter()
                        .zip(layout.row(&xs, n, c))
                        .map(|(&dz, &x)| relu_mask(x * scale_y + shift_y, dz)),
                );
            };
            let sums = channel_sums(&layout, |n, c, buffer| {
                masked(n, c, buffer);
                let dy_row = match &relu_coefficients {
                    Some(_) => &buffer[..],
                    None => layout.row(&dys, n, c),
                };
                gradient_sums(dy_row, layout.row(&xs, n, c), mean[c])
            });
            // dx = γ·σ⁻¹·(dy − mean(dy) − x̂·mean(dy·x̂)), with x̂ = (x − μ)·σ⁻¹: per channel
            // `dx = scale·(dy − mean_dy − (x − μ)·slope)`.
            let terms: Vec<(f32, f32, f32, f32)> = sums
                .iter()
                .enumerate()
                .map(|(c, &(dbeta, dot))| {
                    let dgamma = dot * f64::from(inv_std[c]);
                    (
                        gamma[c] * inv_std[c],
                        (dbeta / count) as f32,
                        (dgamma / count) as f32 * inv_std[c],
                        mean[c],
                    )
                })
                .collect();
            let len = xs.len();
            let plane = layout.plane;
            let mut dx = Vec::with_capacity(len);
            dx.spare_capacity_mut()[..len]
                .par_chunks_mut(plane)
                .zip(dys.par_chunks(plane).zip(xs.par_chunks(plane)))
                .enumerate()
                .with_min_len((AFFINE_ROWS_MIN_LEN / plane).max(1))
                .for_each(|(row, (out, (dy, x)))| {
                    let c = row % layout.channels;
                    let (scale, mean_dy, slope, mu) = terms[c];
                    match &relu_coefficients {
                        Some(coefficients) => {
                            let (scale_y, shift_y) = coefficients[c];
                            for ((o, &dz), &x) in out.iter_mut().zip(dy).zip(x) {
                                let dy = relu_mask(x * scale_y + shift_y, dz);
                                o.write(scale * (dy - mean_dy - (x - mu) * slope));
                            }
                        }
                        None => {
                            for ((o, &dy), &x) in out.iter_mut().zip(dy).zip(x) {
                                o.write(scale * (dy - mean_dy - (x - mu) * slope));
                            }
                        }
                    }
                });
            // SAFETY: `len` is `batch · channels · plane`, so the chunks of `plane` cover the first `len`
            // spare elements exactly, and each chunk's loop wrote every element of it, since `dy` and `x`
            // are as long as `out` (all three have the input's shape, checked above).
            unsafe { dx.set_len(len) };
            let sums: Vec<(f32, f32)> = sums
                .iter()
                .zip(&inv_std[..])
                .map(|(&(dbeta, dot), &inv_std)| ((dot * f64::from(inv_std)) as f32, dbeta as f32))
                .collect();
            let c = layout.channels;
            Ok(BatchNormGrads {
                input: into_tensor(op, x.shape(), dx)?,
                gamma: into_tensor(op, &[c], sums.iter().map(|s| s.0).collect())?,
                beta: into_tensor(op, &[c], sums.iter().map(|s| s.1).collect())?,
            })
        })
    }
}

impl NormOps<CpuTensor> for CpuBackend {
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
        self.batch_norm_train_with(
            "batch_norm_train",
            x,
            gamma,
            beta,
            running_mean,
            running_var,
            momentum,
            eps,
            false,
        )
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
        self.batch_norm_train_with(
            "batch_norm_relu_train",
            x,
            gamma,
            beta,
            running_mean,
            running_var,
            momentum,
            eps,
            true,
        )
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
        self.batch_norm_eval_with(
            "batch_norm_eval",
            x,
            gamma,
            beta,
            running_mean,
            running_var,
            eps,
            false,
        )
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
        self.batch_norm_eval_with(
            "batch_norm_relu_eval",
            x,
            gamma,
            beta,
            running_mean,
            running_var,
            eps,
            true,
        )
    }

    fn batch_norm_backward(
        &self,
        x: &CpuTensor,
        gamma: &CpuTensor,
        saved: &BatchNormSaved<CpuTensor>,
        dy: &CpuTensor,
    ) -> BackendResult<BatchNormGrads<CpuTensor>> {
        self.batch_norm_backward_with("batch_norm_backward", x, gamma, None, saved, dy)
    }

    fn batch_norm_relu_backward(
        &self,
        x: &CpuTensor,
        gamma: &CpuTensor,
        beta: &CpuTensor,
        saved: &BatchNormSaved<CpuTensor>,
        dz: &CpuTensor,
    ) -> BackendResult<BatchNormGrads<CpuTensor>> {
        self.batch_norm_backward_with("batch_norm_relu_backward", x, gamma, Some(beta), saved, dz)
    }
}
