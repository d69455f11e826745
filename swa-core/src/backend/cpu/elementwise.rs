//! Element-wise kernels: averaging, the fused SGD step, dropout masks.

use std::mem::MaybeUninit;

use ndarray::{ArrayD, IxDyn, Zip};
use rayon::prelude::*;

use super::{same_shape, CpuBackend, CpuTensor};
use crate::backend::{
    dropout_keeps, per_image_extent, AxisSlice, BackendError, BackendResult, ElementwiseOps,
    HasShape, SgdStep,
};

/// Elements per task of the in-place updates: 64 KiB of each operand, large enough to stream and small
/// enough to balance the threads.
pub(super) const CHUNK_LEN: usize = 1 << 14;

/// Whether an update of `len` elements is worth handing to the thread pool: below
/// [`PARALLEL_MIN_LEN`] the hand-over costs more than the work, which matters for the many small
/// tensors of a network (BatchNorm's scales, biases) that the optimiser and the averages visit one by one.
pub(super) fn worth_parallel(len: usize) -> bool {
    len >= PARALLEL_MIN_LEN
}

/// `dst += weight · (src − dst)` element by element over two slices of one length.
pub(super) fn lerp_slice(dst: &mut [f32], src: &[f32], weight: f32) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d += weight * (s - *d);
    }
}

/// `dst += weight · (src − dst)` (the shapes were checked to agree). Every element is the same
/// expression on every path, so results do not depend on the thread count.
pub(super) fn lerp(dst: &mut CpuTensor, src: &CpuTensor, weight: f32) {
    let update = |d: &mut [f32], s: &[f32]| lerp_slice(d, s, weight);
    if let (Some(d), Some(s)) = (dst.as_slice_mut(), src.as_slice()) {
        if worth_parallel(d.len()) {
            d.par_chunks_mut(CHUNK_LEN)
                .zip(s.par_chunks(CHUNK_LEN))
                .for_each(|(d, s)| update(d, s));
        } else {
            update(d, s);
        }
        return;
    }
    Zip::from(dst)
        .and(src)
        .par_for_each(|d, &s| *d += weight * (s - *d));
}

/// One SGD step on a parameter, its gradient and its momentum buffer (the shapes were checked to agree).
pub(super) fn sgd_step(param: &mut CpuTensor, grad: &CpuTensor, buf: &mut CpuTensor, h: &SgdStep) {
    let SgdStep {
        lr,
        momentum,
        weight_decay,
        dampening,
        nesterov,
    } = *h;
    let update = |p: &mut f32, g: f32, b: &mut f32| {
        let d = g + weight_decay * *p;
        *b = momentum * *b + (1.0 - dampening) * d;
        let step = if nesterov { d + momentum * *b } else { *b };
        *p -= lr * step;
    };
    let chunk = |p: &mut [f32], g: &[f32], b: &mut [f32]| {
        for ((p, &g), b) in p.iter_mut().zip(g).zip(b) {
            update(p, g, b);
        }
    };
    if let (Some(p), Some(g), Some(b)) = (param.as_slice_mut(), grad.as_slice(), buf.as_slice_mut())
    {
        if worth_parallel(p.len()) {
            p.par_chunks_mut(CHUNK_LEN)
                .zip(g.par_chunks(CHUNK_LEN))
                .zip(b.par_chunks_mut(CHUNK_LEN))
                .for_each(|((p, g), b)| chunk(p, g, b));
        } else {
            chunk(p, g, b);
        }
        return;
    }
    Zip::from(param)
        .and(grad)
        .and(buf)
        .par_for_each(|p, &g, b| update(p, g, b));
}

/// Below this many elements a single thread beats the cost of splitting the work.
const PARALLEL_MIN_LEN: usize = 1 << 15;

/// `f(a, b)` element by element into a new tensor of `a`'s shape (the shapes were checked to agree).
fn zip_map(a: &CpuTensor, b: &CpuTensor, f: impl Fn(f32, f32) -> f32 + Sync + Send) -> CpuTensor {
    if let (Some(a_values), Some(b_values), true) =
        (a.as_slice(), b.as_slice(), a.len() >= PARALLEL_MIN_LEN)
    {
        // Written once, in parallel: no zeroing pass and no page faults on a single thread.
        let mut values = Vec::with_capacity(a.len());
        a_values
            .par_iter()
            .zip(b_values)
            .with_min_len(PARALLEL_MIN_LEN / 4)
            .map(|(&a, &b)| f(a, b))
            .collect_into_vec(&mut values);
        return ArrayD::from_shape_vec(a.raw_dim(), values)
            .expect("one value per element of a standard-layout array");
    }
    let mut out = CpuTensor::zeros(a.raw_dim());
    let zip = Zip::from(&mut out).and(a).and(b);
    if a.len() >= PARALLEL_MIN_LEN {
        zip.par_for_each(|o, &a, &b| *o = f(a, b));
    } else {
        zip.for_each(|o, &a, &b| *o = f(a, b));
    }
    out
}

/// `x` with each run of `per_image` elements (one image, in standard layout) multiplied by its image's
/// scale (the shapes were checked to agree). Every output element is written exactly once, so the
/// output is never zero-filled.
fn scale_per_image(x: &CpuTensor, scales: &CpuTensor, per_image: usize) -> CpuTensor {
    let x = x.as_standard_layout();
    let values = x.as_slice().expect("a standard-layout array is contiguous");
    let scales: Vec<f32> = scales.iter().copied().collect();
    let mut out = Vec::with_capacity(values.len());
    if per_image > 0 {
        let scale_image = |(out, image): (&mut [MaybeUninit<f32>], &[f32]), scale: f32| {
            for (o, &v) in out.iter_mut().zip(image) {
                o.write(v * scale);
            }
        };
        let spare = &mut out.spare_capacity_mut()[..values.len()];
        if values.len() >= PARALLEL_MIN_LEN {
            spare
                .par_chunks_mut(per_image)
                .zip(values.par_chunks(per_image))
                .zip(&scales)
                .with_min_len((PARALLEL_MIN_LEN / 4).div_ceil(per_image))
                .for_each(|(pair, &scale)| scale_image(pair, scale));
        } else {
            for (pair, &scale) in spare
                .chunks_mut(per_image)
                .zip(values.chunks(per_image))
                .zip(&scales)
            {
                scale_image(pair, scale);
            }
        }
    }
    // SAFETY: the chunks of `per_image` elements, one per scale, cover all `values.len()` elements of
    // the spare capacity (there are as many scales as images), and each was written above.
    unsafe { out.set_len(values.len()) };
    ArrayD::from_shape_vec(x.raw_dim(), out)
        .expect("one value per element of a standard-layout array")
}

/// `dst += alpha · x` (the shapes were checked to agree): residual sums and gradient accumulation.
pub(super) fn axpy(dst: &mut CpuTensor, alpha: f32, x: &CpuTensor) {
    let zip = Zip::from(dst).and(x);
    if x.len() >= PARALLEL_MIN_LEN {
        zip.par_for_each(|d, &x| *d += alpha * x);
    } else {
        zip.for_each(|d, &x| *d += alpha * x);
    }
}

/// A standard-layout copy; a large contiguous tensor is copied by all the pool's threads.
pub(super) fn duplicate(x: &CpuTensor) -> CpuTensor {
    if let (Some(values), true) = (x.as_slice(), x.len() >= PARALLEL_MIN_LEN) {
        let mut out = Vec::with_capacity(x.len());
        values
            .par_iter()
            .with_min_len(PARALLEL_MIN_LEN / 4)
            .copied()
            .collect_into_vec(&mut out);
        return ArrayD::from_shape_vec(x.raw_dim(), out)
            .expect("one value per element of a standard-layout array");
    }
    x.as_standard_layout().into_owned()
}

impl ElementwiseOps<CpuTensor> for CpuBackend {
    fn add(&self, a: &CpuTensor, b: &CpuTensor) -> BackendResult<CpuTensor> {
        same_shape("add", a, b)?;
        Ok(self.install(|| zip_map(a, b, |a, b| a + b)))
    }

    fn mul(&self, a: &CpuTensor, b: &CpuTensor) -> BackendResult<CpuTensor> {
        same_shape("mul", a, b)?;
        Ok(self.install(|| zip_map(a, b, |a, b| a * b)))
    }

    fn scale_per_image(&self, x: &CpuTensor, scales: &CpuTensor) -> BackendResult<CpuTensor> {
        let per_image = per_image_extent("scale_per_image", x.shape(), scales.shape())?;
        Ok(self.install(|| scale_per_image(x, scales, per_image)))
    }

    fn relu(&self, x: &CpuTensor) -> BackendResult<CpuTensor> {
        Ok(self.install(|| {
            if let (Some(values), true) = (x.as_slice(), x.len() >= PARALLEL_MIN_LEN) {
                let mut out = Vec::with_capacity(x.len());
                values
                    .par_iter()
                    .with_min_len(PARALLEL_MIN_LEN / 4)
                    .map(|&v| v.max(0.0))
                    .collect_into_vec(&mut out);
                return ArrayD::from_shape_vec(x.raw_dim(), out)
                    .expect("one value per element of a standard-layout array");
            }
            if x.len() >= PARALLEL_MIN_LEN {
                let mut out = CpuTensor::zeros(x.raw_dim());
                Zip::from(&mut out)
                    .and(x)
                    .par_for_each(|o, &v| *o = v.max(0.0));
                out
            } else {
                x.mapv(|v| v.max(0.0))
            }
        }))
    }

    fn relu_(&self, x: &mut CpuTensor) -> BackendResult<()> {
        if x.len() < PARALLEL_MIN_LEN {
            x.mapv_inplace(|v| v.max(0.0));
            return Ok(());
        }
        self.install(|| match x.as_slice_mut() {
            Some(values) => values
                .par_iter_mut()
                .with_min_len(PARALLEL_MIN_LEN / 4)
                .for_each(|v| *v = v.max(0.0)),
            None => x.par_mapv_inplace(|v| v.max(0.0)),
        });
        Ok(())
    }

    /// `dy` where the ReLU's output `y` is positive, else 0.
    fn relu_backward(&self, y: &CpuTensor, dy: &CpuTensor) -> BackendResult<CpuTensor> {
        same_shape("relu_backward", y, dy)?;
        Ok(self.install(|| zip_map(y, dy, |y, dy| if y <= 0.0 { 0.0 } else { dy })))
    }

    fn dropout_mask(&self, shape: &[usize], p: f32, seed: u64) -> BackendResult<CpuTensor> {
        if !(0.0..1.0).contains(&p) {
            return Err(BackendError::InvalidArgument {
                op: "dropout_mask",
                message: format!("drop probability {p} is outside [0, 1)"),
            });
        }
        let n: usize = shape.iter().product();
        if n > u32::MAX as usize {
            return Err(BackendError::InvalidArgument {
                op: "dropout_mask",
                message: format!("{n} elements exceed the mask's 32-bit counter"),
            });
        }
        let keep = 1.0 / (1.0 - p);
        let values = (0..n as u32)
            .map(|i| if dropout_keeps(seed, i, p) { keep } else { 0.0 })
            .collect();
        Ok(
            ArrayD::from_shape_vec(IxDyn(shape), values)
                .expect("length equals the shape's product"),
        )
    }

    fn narrow(
        &self,
        x: &CpuTensor,
        axis: usize,
        start: usize,
        len: usize,
    ) -> BackendResult<CpuTensor> {
        let slice = AxisSlice::new("narrow", x.dims(), axis, start, len)?;
        let mut dims = x.dims().to_vec();
        dims[axis] = len;
        let x = x.as_standard_layout();
        let values = x.as_slice().expect("a standard-layout array is one slice");
        let mut out = Vec::with_capacity(slice.numel());
        for o in 0..slice.outer {
            out.extend_from_slice(&values[slice_range(&slice, o)]);
        }
        Ok(ArrayD::from_shape_vec(IxDyn(&dims), out).expect("one value per element of the slice"))
    }

    fn narrow_assign_(
        &self,
        dst: &mut CpuTensor,
        axis: usize,
        start: usize,
        src: &CpuTensor,
    ) -> BackendResult<()> {
        let slice = AxisSlice::filled_by("narrow_assign_", dst.dims(), axis, start, src.dims())?;
        write_slice(dst, src, &slice, |d, s| d.copy_from_slice(s));
        Ok(())
    }

    fn narrow_add_(
        &self,
        dst: &mut CpuTensor,
        axis: usize,
        start: usize,
        src: &CpuTensor,
    ) -> BackendResult<()> {
        let slice = AxisSlice::filled_by("narrow_add_", dst.dims(), axis, start, src.dims())?;
        write_slice(dst, src, &slice, |d, s| {
            d.iter_mut().zip(s).for_each(|(d, &s)| *d += s);
        });
        Ok(())
    }
}

/// The flat range of row `o` of `slice` in the standard layout of the tensor it slices: each of the
/// `outer` rows holds the slice's `len · inner` elements contiguously.
fn slice_range(slice: &AxisSlice, o: usize) -> std::ops::Range<usize> {
    let begin = (o * slice.extent + slice.start) * slice.inner;
    begin..begin + slice.len * slice.inner
}

/// Applies `write` to each row of the `slice` of `dst` and the matching row of `src` (which has exactly
/// the slice's shape), one contiguous run at a time.
fn write_slice(
    dst: &mut CpuTensor,
    src: &CpuTensor,
    slice: &AxisSlice,
    write: impl Fn(&mut [f32], &[f32]),
) {
    let src = src.as_standard_layout();
    let src = src
        .as_slice()
        .expect("a standard-layout array is one slice");
    let block = slice.len * slice.inner;
    if !dst.is_standard_layout() {
        *dst = dst.as_standard_layout().into_owned();
    }
    let dst = dst
        .as_slice_mut()
        .expect("a standard-layout array is one slice");
    for o in 0..slice.outer {
        write(&mut dst[slice_range(slice, o)], &src[o * block..][..block]);
    }
}
