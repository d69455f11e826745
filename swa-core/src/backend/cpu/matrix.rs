//! Strided matrix views over slices and the one place that calls into the `gemm` crate.
//!
//! Every GEMM of the backend goes through [`gemm_into`], which checks that each operand's extent lies inside
//! its slice before handing raw pointers to `gemm`, so the rest of the backend stays free of `unsafe`.

use std::borrow::Cow;

use gemm::Parallelism;
use rayon::prelude::*;

use super::CpuTensor;

/// A read-only matrix inside a slice: element `(i, j)` lives at `data[i * row_stride + j * col_stride]`.
#[derive(Clone, Copy, Debug)]
pub(super) struct MatRef<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A dense row-major `rows × cols` matrix at the start of `data`.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose, without moving any data.
    pub fn t(self) -> Self {
        Self {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }

    /// Whether every element of the view lies inside `data`.
    fn in_bounds(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride
                < self.data.len()
    }
}

/// How a GEMM may use threads: on its own when the caller already runs one GEMM per worker, or split over
/// the current rayon pool when it is the only work in flight.
pub(super) fn parallelism(split_inside: bool) -> Parallelism {
    if split_inside && rayon::current_num_threads() > 1 {
        Parallelism::Rayon(rayon::current_num_threads())
    } else {
        Parallelism::None
    }
}

/// `dst = a · b` (or `dst += a · b` when `accumulate`), with `dst` dense row-major `a.rows × b.cols`.
///
/// # Panics
/// When the operands do not fit each other or their slices: callers derive every extent from validated
/// shapes, so a panic here is a bug in the backend, never a user error.
pub(super) fn gemm_into(
    dst: &mut [f32],
    a: MatRef<'_>,
    b: MatRef<'_>,
    accumulate: bool,
    parallelism: Parallelism,
) {
    gemm_into_strided(dst, b.cols, 1, a, b, accumulate, parallelism);
}

/// [`gemm_into`] with a column-major destination (element `(i, j)` at `dst[i + j · a.rows]`), which lets
/// the GEMM kernel read a short, wide left operand without repacking a long right one.
pub(super) fn gemm_into_col_major(
    dst: &mut [f32],
    a: MatRef<'_>,
    b: MatRef<'_>,
    accumulate: bool,
    parallelism: Parallelism,
) {
    gemm_into_strided(dst, 1, a.rows, a, b, accumulate, parallelism);
}

/// [`gemm_into`] into the first `b.cols` columns of a row-major destination with row stride
/// `dst_row_stride`: a band of columns of a wider matrix.
pub(super) fn gemm_into_rows(
    dst: &mut [f32],
    dst_row_stride: usize,
    a: MatRef<'_>,
    b: MatRef<'_>,
    accumulate: bool,
    parallelism: Parallelism,
) {
    gemm_into_strided(dst, dst_row_stride, 1, a, b, accumulate, parallelism);
}

/// [`gemm_into`] into a destination with any strides: element `(i, j)` at
/// `dst[i · dst_row_stride + j · dst_col_stride]`.
pub(super) fn gemm_into_strided(
    dst: &mut [f32],
    dst_row_stride: usize,
    dst_col_stride: usize,
    a: MatRef<'_>,
    b: MatRef<'_>,
    accumulate: bool,
    parallelism: Parallelism,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "gemm: inner dimensions differ");
    assert!(
        a.in_bounds() && b.in_bounds(),
        "gemm: operand out of bounds"
    );
    let out = MatRef {
        data: dst,
        rows: m,
        cols: n,
        row_stride: dst_row_stride,
        col_stride: dst_col_stride,
    };
    assert!(out.in_bounds(), "gemm: destination too small");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    dst[i * dst_row_stride + j * dst_col_stride] = 0.0;
                }
            }
        }
        return;
    }
    // SAFETY: the asserts above show that every element gemm reads (`a`, `b`) or writes (`dst`) lies
    // inside its slice, and the slices cannot overlap since `dst` is borrowed mutably.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_col_stride as isize,
            dst_row_stride as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Below this many elements a buffer is zeroed by the calling thread alone.
const PARALLEL_ZEROING_MIN_LEN: usize = 1 << 16;

/// A zeroed buffer for a kernel's output. A large one is zeroed by all the pool's threads, because a fresh
/// allocation's first touch (page faults and the kernel's own zeroing) otherwise runs on one thread while
/// the others wait.
pub(super) fn zeroed(len: usize) -> Vec<f32> {
    if len < PARALLEL_ZEROING_MIN_LEN || rayon::current_num_threads() == 1 {
        return vec![0.0; len];
    }
    let mut buffer = Vec::with_capacity(len);
    (0..len)
        .into_par_iter()
        .with_min_len(PARALLEL_ZEROING_MIN_LEN / 4)
        .map(|_| 0.0f32)
        .collect_into_vec(&mut buffer);
    buffer
}

/// The tensor's values in row-major order, borrowed when the array already is in standard layout.
pub(super) fn contiguous(t: &CpuTensor) -> Cow<'_, [f32]> {
    match t.as_slice() {
        Some(s) => Cow::Borrowed(s),
        None => Cow::Owned(t.iter().copied().collect()),
    }
}

/// Wraps row-major values as a tensor of `shape`; the lengths agree by construction in every caller, and a
/// disagreement is reported rather than panicking.
pub(super) fn into_tensor(
    op: &'static str,
    shape: &[usize],
    data: Vec<f32>,
) -> super::BackendResult<CpuTensor> {
    let len = data.len();
    CpuTensor::from_shape_vec(ndarray::IxDyn(shape), data).map_err(|_| {
        super::BackendError::ShapeMismatch {
            op,
            expected: format!(
                "{} values for shape {shape:?}",
                shape.iter().product::<usize>()
            ),
            got: vec![len],
        }
    })
}
