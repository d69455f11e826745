//! 2-D convolution as matrix products.
//!
//! The batch is cut into chunks of a few images. For each chunk the input is unrolled (`im2col`) into a
//! `[Cin·K·K, images·Ho·Wo]` matrix, so the forward pass is one GEMM `W · col`, the weight gradient one GEMM
//! `dY · colᵀ` and the input gradient one GEMM `Wᵀ · dY` folded back by `col2im`. Small images are grouped
//! so that every GEMM has enough columns to run near the GEMM kernel's peak; a 1×1 stride-1 convolution
//! without padding uses the images themselves and skips the unrolling.
//!
//! Chunks run in parallel on the backend's rayon pool, each GEMM single-threaded; when there are fewer
//! chunks than threads the GEMM splits itself instead. The weight gradient sums over the batch in a fixed
//! order (fixed segments of chunks, each summed in order, then the segments in order), so results are
//! bit-identical for a given thread count.
//!
//! Wide layers on small planes take one of two other paths, chosen per geometry by measurement on the
//! paper's networks:
//! - [`winograd`]: 3×3 stride-1 convolutions with padding 1 and at least 128 channels on planes of at
//!   most 64 pixels with enough tiles (the 8×8 layers of VGG-16, WRN and Shake-Shake at batch 128) by
//!   Winograd's F(2×2, 3×3), with 2.25× fewer multiplications, before any other path; so are
//!   the weight gradients of such convolutions with many channels on planes of 4×4 to 16×16;
//! - [`shifted`]: other stride-1 convolutions on such planes (VGG-16's 4×4 and 2×2 layers) as one GEMM per
//!   kernel position over pixel-major activations, which skips the products with padding that `im2col`
//!   makes (31% of them at 4×4, 56% at 2×2).
//!
//! 3×3 stride-1 convolutions with padding 1 and at most 128 channels, on rows a whole number of vectors
//! long or half a vector long, take a third path, [`direct`]: each output tile is accumulated in vector
//! registers straight from zero-padded copies of the images, with no unrolled input at all (the three
//! stages of PreResNet and PyramidNet, the first two of Shake-Shake and WRN, VGG-16's first four
//! layers).
//! That path computes the forward pass and the input gradient; the weight gradient only for up to 16
//! channels (32 on 32×32 planes), `im2col` or Winograd's algorithm being faster with more.
//!
//! Other tiny output planes (at most 16 pixels, fewer channels) unroll the whole batch and run each
//! product as one GEMM split over the pool by `gemm` itself, which divides the output into tiles and keeps
//! every element's summation order, so these results are bit-identical for a given thread count too.

use std::cell::RefCell;

use rayon::prelude::*;

use gemm::Parallelism;

mod direct;
mod shifted;
mod winograd;

pub use direct::VECTOR_VARIABLE;

use super::matrix::{
    contiguous, gemm_into, gemm_into_col_major, gemm_into_rows, into_tensor, parallelism, zeroed,
    MatRef,
};
use super::{CpuBackend, CpuTensor};
use crate::backend::{BackendError, BackendResult, Conv2dGrads, Conv2dSpec, ConvOps};

/// Columns a chunk's GEMM should have at least: below this the GEMM's packing and edge handling dominate.
const TARGET_COLUMNS: usize = 256;

/// Output planes up to this many pixels are convolved over the whole batch at once (see
/// [`Geometry::whole_batch`]).
const WHOLE_BATCH_MAX_PLANE: usize = 16;

/// Stride-1 convolutions whose output planes have at most this many pixels, and whose input and output
/// have at least [`SHIFTED_MIN_CHANNELS`] channels, run as shifted GEMMs (see [`shifted`]).
const SHIFTED_MAX_PLANE: usize = 64;

/// See [`SHIFTED_MAX_PLANE`]: with fewer channels the per-position GEMMs are too short to run at speed.
const SHIFTED_MIN_CHANNELS: usize = 128;

/// 3×3 convolutions that [`winograd::fits`] run as F(2×2, 3×3) when both channel counts are at least this,
/// there are at least [`WINOGRAD_MIN_TILES`] output tiles and the output plane has at most
/// [`WINOGRAD_MAX_PLANE`] pixels. With fewer channels the 16 GEMMs are too thin to pay for the transforms.
const WINOGRAD_MIN_CHANNELS: usize = 128;

/// See [`WINOGRAD_MIN_CHANNELS`]: the weights are transformed once per call, which needs enough tiles to
/// pay for itself; below this (VGG-16's 4×4 layers at batch 128) the shifted GEMMs were measured faster.
const WINOGRAD_MIN_TILES: usize = 1024;

/// See [`WINOGRAD_MIN_CHANNELS`]: the transformed input and the products are four times the size of the
/// activations; on larger planes they no longer stay in cache and `im2col` was measured faster.
const WINOGRAD_MAX_PLANE: usize = 64;

/// See [`Geometry::winograd_weight_gradient`]. Measured at batch 128 (both gradients, 2 threads): 1.8×
/// faster than the shifted GEMMs at 640 channels on 8×8, 1.15–1.35× at 128–320 channels on 8×8 and
/// 16×16, 1.05× at 512 channels on 4×4; on 32×32 (160 channels) no faster than `im2col`, which computes
/// both gradients in one pass, and on 2×2 (a single tile per image) no faster than the shifted GEMMs.
const WINOGRAD_GRADIENT_MAX_PLANE: usize = 256;

/// See [`WINOGRAD_GRADIENT_MAX_PLANE`].
const WINOGRAD_GRADIENT_MIN_PLANE: usize = 16;

/// Columns of the unrolled input handled at once for a large image.
const TILE_COLUMNS: usize = 256;

/// The validated geometry of one convolution.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    batch: usize,
    in_channels: usize,
    height: usize,
    width: usize,
    out_channels: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    out_height: usize,
    out_width: usize,
}

impl Geometry {
    fn new(op: &'static str, x: &[usize], w: &[usize], spec: Conv2dSpec) -> BackendResult<Self> {
        let &[batch, in_channels, height, width] = x else {
            return Err(BackendError::ShapeMismatch {
                op,
                expected: "an input of rank 4 [N, Cin, H, W]".into(),
                got: x.to_vec(),
            });
        };
        let &[out_channels, w_in, kernel, kernel_w] = w else {
            return Err(BackendError::ShapeMismatch {
                op,
                expected: "a weight of rank 4 [Cout, Cin, K, K]".into(),
                got: w.to_vec(),
            });
        };
        if w_in != in_channels || kernel != kernel_w || kernel == 0 {
            return Err(BackendError::ShapeMismatch {
                op,
                expected: format!(
                    "a weight [Cout, {in_channels}, K, K] with a square non-empty kernel for the input {x:?}"
                ),
                got: w.to_vec(),
            });
        }
        if in_channels == 0 || out_channels == 0 || height == 0 || width == 0 {
            return Err(BackendError::ShapeMismatch {
                op,
                expected: "non-empty channel and spatial dimensions".into(),
                got: [x, w].concat(),
            });
        }
        if spec.stride == 0 {
            return Err(BackendError::InvalidArgument {
                op,
                message: "stride 0; the stride must be at least 1".into(),
            });
        }
        let (Some(out_height), Some(out_width)) = (
            spec.output_extent(height, kernel),
            spec.output_extent(width, kernel),
        ) else {
            return Err(BackendError::InvalidArgument {
                op,
                message: format!(
                    "kernel {kernel} does not fit the input {height}×{width} with padding {}",
                    spec.padding
                ),
            });
        };
        Ok(Self {
            batch,
            in_channels,
            height,
            width,
            out_channels,
            kernel,
            stride: spec.stride,
            padding: spec.padding,
            out_height,
            out_width,
        })
    }

    fn in_plane(&self) -> usize {
        self.height * self.width
    }
    fn in_image(&self) -> usize {
        self.in_channels * self.in_plane()
    }
    fn out_plane(&self) -> usize {
        self.out_height * self.out_width
    }
    fn out_image(&self) -> usize {
        self.out_channels * self.out_plane()
    }
    /// Rows of the unrolled input, also the columns of the weight viewed as a matrix.
    fn patch(&self) -> usize {
        self.in_channels * self.kernel * self.kernel
    }
    /// A stride-1 convolution whose output has the input's height and width.
    fn preserves_extent(&self) -> bool {
        self.stride == 1 && self.out_height == self.height && self.out_width == self.width
    }
    /// A 1×1 stride-1 unpadded convolution: each image already is its own unrolled input.
    fn is_pointwise(&self) -> bool {
        self.kernel == 1 && self.stride == 1 && self.padding == 0
    }
    fn output_shape(&self) -> [usize; 4] {
        [
            self.batch,
            self.out_channels,
            self.out_height,
            self.out_width,
        ]
    }

    /// Images per chunk: enough for [`TARGET_COLUMNS`] GEMM columns, but never so many that some thread
    /// would be left without a chunk.
    fn images_per_chunk(&self, threads: usize) -> usize {
        let for_columns = TARGET_COLUMNS.div_ceil(self.out_plane().max(1));
        let for_threads = self.batch.div_ceil(threads.max(1));
        for_columns.min(for_threads).max(1)
    }

    /// Whether to unroll the whole batch into one matrix and run one GEMM split over the pool. For tiny
    /// planes with many channels, per-chunk GEMMs are short in one dimension and the weight gradient's
    /// per-chunk partial sums rewrite the large weight matrix once per chunk; one GEMM over the batch
    /// avoids both. `gemm` splits over output tiles and keeps each element's summation order, so the
    /// result is the same for a given thread count.
    fn whole_batch(&self) -> bool {
        self.out_plane() <= WHOLE_BATCH_MAX_PLANE && !self.is_pointwise() && self.batch > 1
    }

    /// Whether to run as one GEMM per kernel position on pixel-major activations ([`shifted`]): for small
    /// planes, where padding makes up much of `im2col`'s unrolled input, with enough channels that each
    /// kernel position's GEMM runs at speed.
    fn shifted(&self) -> bool {
        self.stride == 1
            && self.kernel > 1
            && self.out_plane() <= SHIFTED_MAX_PLANE
            && self.in_channels.min(self.out_channels) >= SHIFTED_MIN_CHANNELS
    }

    /// Whether to compute the weight gradient by Winograd's F(2×2, 3×3) ([`winograd::weight_gradient`]),
    /// the input gradient then being a convolution of its own: with enough channels for the 16 GEMMs to
    /// run at speed, on planes of [`WINOGRAD_GRADIENT_MIN_PLANE`] to [`WINOGRAD_GRADIENT_MAX_PLANE`] pixels
    /// (it works through the batch a bounded number of tiles at a time, so its buffers do not grow with the
    /// plane).
    fn winograd_weight_gradient(&self) -> bool {
        winograd::fits(self)
            && self.in_channels.min(self.out_channels) >= WINOGRAD_MIN_CHANNELS
            && (WINOGRAD_GRADIENT_MIN_PLANE..=WINOGRAD_GRADIENT_MAX_PLANE)
                .contains(&self.out_plane())
    }

    /// Whether to run by Winograd's F(2×2, 3×3) ([`winograd`]).
    fn winograd(&self) -> bool {
        winograd::fits(self)
            && self.in_channels.min(self.out_channels) >= WINOGRAD_MIN_CHANNELS
            && self.batch * self.out_plane() / 4 >= WINOGRAD_MIN_TILES
            && self.out_plane() <= WINOGRAD_MAX_PLANE
    }

    /// This convolution restricted to a single input channel, used to unroll one channel's rows.
    fn single_channel(&self) -> Self {
        Self {
            in_channels: 1,
            ..*self
        }
    }

    /// For output column `ow` and kernel column `kw`, the input column is `ow·stride + kw − padding`; this
    /// is the range of `ow` for which it lies inside the image.
    fn valid_out_columns(&self, kw: usize) -> (usize, usize) {
        let (s, p) = (self.stride, self.padding);
        let lo = p.saturating_sub(kw).div_ceil(s).min(self.out_width);
        let hi = if self.width + p > kw {
            (self.width + p - kw).div_ceil(s).min(self.out_width)
        } else {
            0
        };
        (lo, hi.max(lo))
    }

    /// The convolution whose forward pass is this one's input gradient, when the stride is 1: `dy` padded
    /// by `K − 1 − padding` and correlated with the weight flipped in space and transposed in channels.
    fn input_gradient_as_convolution(&self) -> Option<Self> {
        if self.stride != 1 || self.padding >= self.kernel || self.is_pointwise() {
            return None;
        }
        Some(Self {
            batch: self.batch,
            in_channels: self.out_channels,
            height: self.out_height,
            width: self.out_width,
            out_channels: self.in_channels,
            kernel: self.kernel,
            stride: 1,
            padding: self.kernel - 1 - self.padding,
            out_height: self.height,
            out_width: self.width,
        })
    }

    /// `W'[ci, co, a, b] = W[co, ci, K−1−a, K−1−b]`, the weight of [`Self::input_gradient_as_convolution`].
    fn flipped_weight(&self, w: &[f32]) -> Vec<f32> {
        let k = self.kernel;
        let mut flipped = vec![0.0; w.len()];
        for co in 0..self.out_channels {
            for ci in 0..self.in_channels {
                let from = &w[(co * self.in_channels + ci) * k * k..][..k * k];
                let to = &mut flipped[(ci * self.out_channels + co) * k * k..][..k * k];
                for (t, f) in to.iter_mut().zip(from.iter().rev()) {
                    *t = *f;
                }
            }
        }
        flipped
    }

    /// Whether the weight gradient `dY · colᵀ` should be accumulated column-major: measured faster when
    /// `dY` has few rows, both fewer than the unrolled input's and at most 64, because the GEMM then
    /// repacks the small `dY` instead of the unrolled input; for wide layers the row-major order wins.
    fn prefers_column_major_weight_gradient(&self) -> bool {
        self.out_channels <= 64 && self.out_channels <= self.patch()
    }

    /// The input row for output row `oh` and kernel row `kh`, if it is not padding.
    fn input_row(&self, oh: usize, kh: usize) -> Option<usize> {
        (oh * self.stride + kh)
            .checked_sub(self.padding)
            .filter(|&ih| ih < self.height)
    }
}

/// Unrolls one image into `col`'s columns `offset .. offset + Ho·Wo`, where `col` has row stride `ld`.
fn im2col(g: &Geometry, image: &[f32], col: &mut [f32], ld: usize, offset: usize) {
    im2col_rows(g, image, col, ld, offset, 0..g.out_height);
}

/// [`im2col`] restricted to the output rows `rows`, whose columns start at `offset`.
fn im2col_rows(
    g: &Geometry,
    image: &[f32],
    col: &mut [f32],
    ld: usize,
    offset: usize,
    rows: std::ops::Range<usize>,
) {
    if g.preserves_extent() {
        im2col_rows_same(g, image, col, ld, offset, rows);
        return;
    }
    let (k, ow_n) = (g.kernel, g.out_width);
    let plane = rows.len() * ow_n;
    for c in 0..g.in_channels {
        let channel = &image[c * g.in_plane()..][..g.in_plane()];
        for kh in 0..k {
            for kw in 0..k {
                let row = (c * k + kh) * k + kw;
                let dst_row = &mut col[row * ld + offset..][..plane];
                let (lo, hi) = g.valid_out_columns(kw);
                for (oh, dst) in rows.clone().zip(dst_row.chunks_exact_mut(ow_n)) {
                    let Some(ih) = g.input_row(oh, kh) else {
                        dst.fill(0.0);
                        continue;
                    };
                    let src = &channel[ih * g.width..][..g.width];
                    dst[..lo].fill(0.0);
                    dst[hi..].fill(0.0);
                    if lo < hi {
                        let first = lo * g.stride + kw - g.padding;
                        if g.stride == 1 {
                            dst[lo..hi].copy_from_slice(&src[first..first + (hi - lo)]);
                        } else {
                            for (d, s) in dst[lo..hi]
                                .iter_mut()
                                .zip(src[first..].iter().step_by(g.stride))
                            {
                                *d = *s;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// [`im2col_rows`] for a stride-1 convolution whose output has the input's extent (`2·padding = K − 1`).
///
/// Each row of the unrolled input is then the image plane shifted by `(kh − padding)·W + kw − padding`
/// elements, so the valid output rows are one contiguous copy; only the few positions whose column falls
/// into the padding are zeroed afterwards. This replaces a short copy per output row, which dominated
/// small images, by one long copy per kernel position.
fn im2col_rows_same(
    g: &Geometry,
    image: &[f32],
    col: &mut [f32],
    ld: usize,
    offset: usize,
    rows: std::ops::Range<usize>,
) {
    let (k, w, p) = (g.kernel, g.width, g.padding);
    let in_plane = g.in_plane();
    let band = rows.len() * w;
    for c in 0..g.in_channels {
        let channel = &image[c * in_plane..][..in_plane];
        for kh in 0..k {
            // Output rows `oh` read input row `oh + kh − p`; those inside the image form a range.
            let oh_lo = p.saturating_sub(kh).clamp(rows.start, rows.end);
            let oh_hi = (g.height + p).saturating_sub(kh).clamp(oh_lo, rows.end);
            for kw in 0..k {
                let row = (c * k + kh) * k + kw;
                let dst = &mut col[row * ld + offset..][..band];
                let valid = (oh_lo - rows.start) * w..(oh_hi - rows.start) * w;
                dst[..valid.start].fill(0.0);
                dst[valid.end..].fill(0.0);
                if valid.is_empty() {
                    continue;
                }
                // Source index of the valid block's first element, possibly one row's shift below 0.
                let base = ((oh_lo + kh) * w + kw) as isize - (p * w + p) as isize;
                let skip = (-base).max(0) as usize;
                let end = (valid.len() as isize).min(in_plane as isize - base) as usize;
                let block = &mut dst[valid.clone()];
                block[..skip].fill(0.0);
                block[end..].fill(0.0);
                let from = (base + skip as isize) as usize;
                block[skip..end].copy_from_slice(&channel[from..from + (end - skip)]);
                let (lo, hi) = g.valid_out_columns(kw);
                // Column by column with a stride of one row: a fill per row would be a library call
                // for one or two elements.
                for column in (0..lo).chain(hi..w) {
                    block[column..].iter_mut().step_by(w).for_each(|v| *v = 0.0);
                }
            }
        }
    }
}

/// Adds `col`'s columns `offset .. offset + Ho·Wo` back onto the image positions they were read from: the
/// adjoint of [`im2col`]. `image` must start zeroed; rows are added in a fixed order.
fn col2im(g: &Geometry, col: &[f32], ld: usize, offset: usize, image: &mut [f32]) {
    let (k, ow_n, plane) = (g.kernel, g.out_width, g.out_plane());
    for c in 0..g.in_channels {
        let channel = &mut image[c * g.in_plane()..][..g.in_plane()];
        for kh in 0..k {
            for kw in 0..k {
                let row = (c * k + kh) * k + kw;
                let src_row = &col[row * ld + offset..][..plane];
                let (lo, hi) = g.valid_out_columns(kw);
                if lo >= hi {
                    continue;
                }
                for (oh, src) in src_row.chunks_exact(ow_n).enumerate() {
                    let Some(ih) = g.input_row(oh, kh) else {
                        continue;
                    };
                    let dst = &mut channel[ih * g.width..][..g.width];
                    let first = lo * g.stride + kw - g.padding;
                    if g.stride == 1 {
                        for (d, s) in dst[first..first + (hi - lo)].iter_mut().zip(&src[lo..hi]) {
                            *d += *s;
                        }
                    } else {
                        for (d, s) in dst[first..].iter_mut().step_by(g.stride).zip(&src[lo..hi]) {
                            *d += *s;
                        }
                    }
                }
            }
        }
    }
}

/// Copies a chunk of images `[images, rows, plane]` into one matrix `[rows, images·plane]`.
fn gather_planes(src: &[f32], rows: usize, plane: usize, dst: &mut [f32]) {
    let images = src.len() / (rows * plane);
    let ld = images * plane;
    for (i, image) in src.chunks_exact(rows * plane).enumerate() {
        for (r, from) in image.chunks_exact(plane).enumerate() {
            dst[r * ld + i * plane..][..plane].copy_from_slice(from);
        }
    }
}

/// The inverse of [`gather_planes`]: spreads a `[rows, images·plane]` matrix over `[images, rows, plane]`.
fn scatter_planes(src: &[f32], rows: usize, plane: usize, dst: &mut [f32]) {
    let images = dst.len() / (rows * plane);
    let ld = images * plane;
    for (i, image) in dst.chunks_exact_mut(rows * plane).enumerate() {
        for (r, to) in image.chunks_exact_mut(plane).enumerate() {
            to.copy_from_slice(&src[r * ld + i * plane..][..plane]);
        }
    }
}

/// Unrolls the whole batch `x` into `col` `[patch, batch·Ho·Wo]`, one input channel's rows per task.
fn im2col_batch(g: &Geometry, x: &[f32], col: &mut [f32]) {
    let ld = g.batch * g.out_plane();
    let one = g.single_channel();
    let rows_per_channel = g.kernel * g.kernel;
    col.par_chunks_mut(rows_per_channel * ld)
        .enumerate()
        .for_each(|(c, rows)| {
            for (n, image) in x.chunks_exact(g.in_image()).enumerate() {
                let channel = &image[c * g.in_plane()..][..g.in_plane()];
                im2col(&one, channel, rows, ld, n * g.out_plane());
            }
        });
}

/// [`gather_planes`] over the whole batch, one matrix row per task.
fn gather_planes_parallel(src: &[f32], rows: usize, plane: usize, dst: &mut [f32]) {
    let images = src.len() / (rows * plane);
    dst.par_chunks_mut(images * plane)
        .enumerate()
        .for_each(|(r, row)| {
            for (i, to) in row.chunks_exact_mut(plane).enumerate() {
                to.copy_from_slice(&src[(i * rows + r) * plane..][..plane]);
            }
        });
}

/// [`scatter_planes`] over the whole batch, one image per task.
fn scatter_planes_parallel(src: &[f32], rows: usize, plane: usize, dst: &mut [f32]) {
    let ld = dst.len() / rows;
    dst.par_chunks_mut(rows * plane)
        .enumerate()
        .for_each(|(i, image)| {
            for (r, to) in image.chunks_exact_mut(plane).enumerate() {
                to.copy_from_slice(&src[r * ld + i * plane..][..plane]);
            }
        });
}

/// The forward pass of a [`Geometry::whole_batch`] convolution: one unrolling, one GEMM split over the
/// pool, one scatter into `y`.
fn forward_whole_batch(
    g: &Geometry,
    weight: MatRef<'_>,
    x: &[f32],
    y: &mut [f32],
    scratch: &mut Scratch,
) {
    let columns = g.batch * g.out_plane();
    let col = resized(&mut scratch.col, g.patch() * columns);
    im2col_batch(g, x, col);
    let out = resized(&mut scratch.grouped, g.out_channels * columns);
    gemm_into(
        out,
        weight,
        MatRef::row_major(col, g.patch(), columns),
        false,
        parallelism(true),
    );
    scatter_planes_parallel(out, g.out_channels, g.out_plane(), y);
}

/// Both gradients of a [`Geometry::whole_batch`] convolution, each one GEMM over the batch.
fn gradients_whole_batch(
    g: &Geometry,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    need_input: bool,
    scratch: &mut Scratch,
) -> (Vec<f32>, Vec<f32>) {
    let columns = g.batch * g.out_plane();
    let par = parallelism(true);
    let dy_mat = resized(&mut scratch.output_gradient, g.out_channels * columns);
    gather_planes_parallel(dy, g.out_channels, g.out_plane(), dy_mat);
    let dy_mat = MatRef::row_major(dy_mat, g.out_channels, columns);
    let col = resized(&mut scratch.col, g.patch() * columns);
    im2col_batch(g, x, col);
    let mut dw = zeroed(g.out_channels * g.patch());
    gemm_into(
        &mut dw,
        dy_mat,
        MatRef::row_major(col, g.patch(), columns).t(),
        false,
        par,
    );
    if !need_input {
        return (Vec::new(), dw);
    }
    let mut dx = zeroed(g.batch * g.in_image());
    if let Some(t) = g.input_gradient_as_convolution() {
        let flipped = g.flipped_weight(w);
        let flipped = MatRef::row_major(&flipped, t.out_channels, t.patch());
        forward_whole_batch(&t, flipped, dy, &mut dx, scratch);
        return (dx, dw);
    }
    // `col` is no longer needed: it receives `Wᵀ · dY`, folded back image by image.
    gemm_into(
        col,
        MatRef::row_major(w, g.out_channels, g.patch()).t(),
        dy_mat,
        false,
        par,
    );
    let col = &*col;
    dx.par_chunks_mut(g.in_image())
        .enumerate()
        .for_each(|(i, image)| col2im(g, col, columns, i * g.out_plane(), image));
    (dx, dw)
}

/// Per-worker buffers, reused across the chunks a worker handles.
#[derive(Default)]
struct Scratch {
    col: Vec<f32>,
    grouped: Vec<f32>,
    output_gradient: Vec<f32>,
}

thread_local! {
    /// Each worker's buffers, kept between calls: allocating them afresh for every convolution made the
    /// kernel zero new pages on every call.
    static WORKER_SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Runs `f` with this thread's buffers, or with fresh ones when they are in use further up the stack (a
/// worker waiting inside a split GEMM may pick up another chunk of the same convolution).
fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    WORKER_SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut scratch) => f(&mut scratch),
        Err(_) => f(&mut Scratch::default()),
    })
}

/// `len` rounded up to an odd number of 64-byte cache lines: the row pitch of a scratch matrix, so that
/// walking down a column (as GEMM packing does) does not keep landing in the same cache sets, as it would
/// for the power-of-two rows of the paper's networks.
fn padded_pitch(len: usize) -> usize {
    const LINE: usize = 16;
    (len.div_ceil(LINE) | 1) * LINE
}

fn resized(buffer: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buffer.len() < len {
        buffer.resize(len, 0.0);
    }
    &mut buffer[..len]
}

/// The chunk's unrolled input `[patch, images·plane]`: the image itself for a single pointwise image, else
/// built in `scratch`.
fn unrolled<'a>(g: &Geometry, x_chunk: &'a [f32], scratch: &'a mut Vec<f32>) -> &'a [f32] {
    let images = x_chunk.len() / g.in_image();
    if g.is_pointwise() {
        if images == 1 {
            return x_chunk;
        }
        let col = resized(scratch, g.patch() * images * g.out_plane());
        gather_planes(x_chunk, g.in_channels, g.in_plane(), col);
        return col;
    }
    let ld = images * g.out_plane();
    let col = resized(scratch, g.patch() * ld);
    for (i, image) in x_chunk.chunks_exact(g.in_image()).enumerate() {
        im2col(g, image, col, ld, i * g.out_plane());
    }
    col
}

fn check_bias(g: &Geometry, bias: &CpuTensor) -> BackendResult<()> {
    if bias.shape() == [g.out_channels] {
        Ok(())
    } else {
        Err(BackendError::ShapeMismatch {
            op: "conv2d",
            expected: format!("a bias of shape [{}]", g.out_channels),
            got: bias.shape().to_vec(),
        })
    }
}

/// The convolution of a chunk of images: `y = W · col(x)` per chunk, written straight into `y_chunk` for a
/// single image and through a grouped buffer for several.
fn forward_chunk(
    g: &Geometry,
    weight: MatRef<'_>,
    x_chunk: &[f32],
    y_chunk: &mut [f32],
    scratch: &mut Scratch,
    par: Parallelism,
) {
    let images = x_chunk.len() / g.in_image();
    let columns = images * g.out_plane();
    if images == 1 && !g.is_pointwise() && columns >= 2 * TILE_COLUMNS {
        // A large image is unrolled a band of output rows at a time, so that the band's unrolled input
        // stays in cache between its writing and the GEMM's reading.
        let band = TILE_COLUMNS.div_ceil(g.out_width);
        for first in (0..g.out_height).step_by(band) {
            let rows = first..(first + band).min(g.out_height);
            let tile = rows.len() * g.out_width;
            let col = resized(&mut scratch.col, g.patch() * tile);
            im2col_rows(g, x_chunk, col, tile, 0, rows);
            let rhs = MatRef::row_major(col, g.patch(), tile);
            gemm_into_rows(
                &mut y_chunk[first * g.out_width..],
                g.out_plane(),
                weight,
                rhs,
                false,
                par,
            );
        }
        return;
    }
    let col = unrolled(g, x_chunk, &mut scratch.col);
    let rhs = MatRef::row_major(col, g.patch(), columns);
    if images == 1 {
        gemm_into(y_chunk, weight, rhs, false, par);
    } else {
        let out = resized(&mut scratch.grouped, g.out_channels * columns);
        gemm_into(out, weight, rhs, false, par);
        scatter_planes(out, g.out_channels, g.out_plane(), y_chunk);
    }
}

impl ConvOps<CpuTensor> for CpuBackend {
    fn conv2d(
        &self,
        x: &CpuTensor,
        w: &CpuTensor,
        bias: Option<&CpuTensor>,
        spec: Conv2dSpec,
    ) -> BackendResult<CpuTensor> {
        self.install(|| {
            let g = Geometry::new("conv2d", x.shape(), w.shape(), spec)?;
            if let Some(b) = bias {
                check_bias(&g, b)?;
            }
            let x = contiguous(x);
            let w = contiguous(w);
            let bias = bias.map(contiguous);
            if g.batch * g.out_image() == 0 {
                return into_tensor("conv2d", &g.output_shape(), Vec::new());
            }
            let y = forward(&g, &w, &x, bias.as_deref());
            into_tensor("conv2d", &g.output_shape(), y)
        })
    }

    fn conv2d_backward(
        &self,
        x: &CpuTensor,
        w: &CpuTensor,
        dy: &CpuTensor,
        spec: Conv2dSpec,
        need_input: bool,
        need_bias: bool,
    ) -> BackendResult<Conv2dGrads<CpuTensor>> {
        self.install(|| {
            let g = Geometry::new("conv2d_backward", x.shape(), w.shape(), spec)?;
            if dy.shape() != g.output_shape() {
                return Err(BackendError::ShapeMismatch {
                    op: "conv2d_backward",
                    expected: format!(
                        "an output gradient of shape {:?} for the input {:?} and weight {:?}",
                        g.output_shape(),
                        x.shape(),
                        w.shape()
                    ),
                    got: dy.shape().to_vec(),
                });
            }
            let x = contiguous(x);
            let w = contiguous(w);
            let dy = contiguous(dy);
            let weight_len = g.out_channels * g.patch();

            let bias = need_bias.then(|| bias_gradient(&g, &dy));
            let (dx, dw) = if g.batch == 0 || g.out_plane() == 0 {
                (vec![0.0; g.batch * g.in_image()], vec![0.0; weight_len])
            } else {
                gradients(&g, &x, &w, &dy, need_input)
            };

            let input = if need_input {
                Some(into_tensor(
                    "conv2d_backward",
                    &[g.batch, g.in_channels, g.height, g.width],
                    dx,
                )?)
            } else {
                None
            };
            let bias = bias
                .map(|b| into_tensor("conv2d_backward", &[g.out_channels], b))
                .transpose()?;
            Ok(Conv2dGrads {
                input,
                weight: into_tensor(
                    "conv2d_backward",
                    &[g.out_channels, g.in_channels, g.kernel, g.kernel],
                    dw,
                )?,
                bias,
            })
        })
    }
}

/// `y = conv(x, w) + bias` `[N, Cout, Ho, Wo]` for a non-empty batch and output, by the fastest method for
/// the geometry.
fn forward(g: &Geometry, w: &[f32], x: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    // Winograd's algorithm before the direct kernel: where both apply (128 channels on 8×8 planes) it
    // was measured faster, forward and as the input gradient (batch 128, 2 threads, AVX-512: forward
    // 8.8–9.4 against 10.3–11.1 ms, both gradients 19.4–21.0 against 22.2–23.6 ms, fastest of 15 runs
    // in five alternating pairs).
    if g.winograd() {
        let mut y = zeroed(g.batch * g.out_image());
        winograd::forward(g, w, x, bias, &mut y);
        return y;
    }
    if let Some(isa) = direct::fits(g) {
        return direct::forward(isa, g, w, x, bias);
    }
    let mut y = zeroed(g.batch * g.out_image());
    let weight = MatRef::row_major(w, g.out_channels, g.patch());
    if g.shifted() || g.whole_batch() {
        with_scratch(|scratch| {
            if g.shifted() {
                shifted::forward(g, w, x, &mut y, scratch);
            } else {
                forward_whole_batch(g, weight, x, &mut y, scratch);
            }
        });
        if let Some(b) = bias {
            y.par_chunks_mut(g.out_image()).for_each(|image| {
                for (plane, &b) in image.chunks_exact_mut(g.out_plane()).zip(b) {
                    plane.iter_mut().for_each(|v| *v += b);
                }
            });
        }
        return y;
    }
    let threads = rayon::current_num_threads();
    let per_chunk = g.images_per_chunk(threads);
    let par = parallelism(g.batch.div_ceil(per_chunk) < threads);
    y.par_chunks_mut(per_chunk * g.out_image())
        .zip(x.par_chunks(per_chunk * g.in_image()))
        .for_each(|(y_chunk, x_chunk)| {
            with_scratch(|scratch| forward_chunk(g, weight, x_chunk, y_chunk, scratch, par));
            if let Some(b) = bias {
                for (plane, &b) in y_chunk
                    .chunks_exact_mut(g.out_plane())
                    .zip(b.iter().cycle())
                {
                    plane.iter_mut().for_each(|v| *v += b);
                }
            }
        });
    y
}

/// The input gradient (when `need_input`, else empty) and the weight gradient, by the fastest method for
/// the geometry.
fn gradients(
    g: &Geometry,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    need_input: bool,
) -> (Vec<f32>, Vec<f32>) {
    let direct = direct::fits(g);
    if direct.is_some() || g.winograd_weight_gradient() {
        // The weight gradient by the fastest method for the geometry; the input gradient as the
        // transposed convolution, which `forward` sends to Winograd's algorithm or the direct kernel
        // as it does a forward pass of that geometry.
        let dw = if g.winograd_weight_gradient() {
            winograd::weight_gradient(g, x, dy)
        } else if let Some(isa) = direct.filter(|&isa| direct::computes_weight_gradient(isa, g)) {
            direct::weight_gradient(isa, g, x, dy)
        } else {
            input_and_weight_gradients(g, x, w, dy, false).1
        };
        let Some(t) = g.input_gradient_as_convolution().filter(|_| need_input) else {
            return (Vec::new(), dw);
        };
        return (forward(&t, &g.flipped_weight(w), dy, None), dw);
    }
    if g.shifted() {
        with_scratch(|scratch| shifted::gradients(g, x, w, dy, need_input, scratch))
    } else if g.whole_batch() {
        with_scratch(|scratch| gradients_whole_batch(g, x, w, dy, need_input, scratch))
    } else {
        input_and_weight_gradients(g, x, w, dy, need_input)
    }
}

/// Sums `dy` over the batch and the positions of each output channel: per image and channel in f32 with
/// several lanes, then over images in f64, always in the same order.
fn bias_gradient(g: &Geometry, dy: &[f32]) -> Vec<f32> {
    (0..g.out_channels)
        .into_par_iter()
        .map(|c| {
            let total: f64 = (0..g.batch)
                .map(|n| {
                    f64::from(lane_sum(
                        &dy[n * g.out_image() + c * g.out_plane()..][..g.out_plane()],
                    ))
                })
                .sum();
            total as f32
        })
        .collect()
}

/// A sum over eight interleaved accumulators, which the compiler keeps in one vector register.
pub(super) fn lane_sum(values: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let mut chunks = values.chunks_exact(8);
    for chunk in &mut chunks {
        for (l, v) in lanes.iter_mut().zip(chunk) {
            *l += *v;
        }
    }
    let tail: f32 = chunks.remainder().iter().sum();
    lanes.iter().sum::<f32>() + tail
}

/// Both gradients in one pass over the batch, so each chunk's `dy` is read while it is still in cache.
///
/// The weight gradient `dY · colᵀ` is accumulated column-major, so the GEMM repacks the short `dY` rather
/// than the long unrolled input. The batch's chunks are cut into a fixed number of contiguous segments;
/// each segment sums its chunks' weight gradients in order into its own buffer, and the buffers are added
/// in segment order.
///
/// With stride 1 the input gradient is itself a convolution of `dy` (see
/// [`Geometry::input_gradient_as_convolution`]), which writes `dx` directly; otherwise `Wᵀ · dY` is folded
/// back by [`col2im`].
fn input_and_weight_gradients(
    g: &Geometry,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    need_input: bool,
) -> (Vec<f32>, Vec<f32>) {
    let threads = rayon::current_num_threads();
    let per_chunk = g.images_per_chunk(threads);
    let chunks = g.batch.div_ceil(per_chunk);
    let segments = chunks.min(threads.max(4));
    let chunks_per_segment = chunks.div_ceil(segments);
    let segments = chunks.div_ceil(chunks_per_segment);
    let images_per_segment = chunks_per_segment * per_chunk;
    let par = parallelism(segments < threads);
    let weight_len = g.out_channels * g.patch();
    let weight_t = MatRef::row_major(w, g.out_channels, g.patch()).t();
    let transposed = g.input_gradient_as_convolution();
    let flipped = match (&transposed, need_input) {
        (Some(_), true) => g.flipped_weight(w),
        _ => Vec::new(),
    };
    let flipped = MatRef::row_major(
        &flipped,
        g.in_channels,
        g.out_channels * g.kernel * g.kernel,
    );

    let mut dx = zeroed(if need_input {
        g.batch * g.in_image()
    } else {
        0
    });
    let mut partials = vec![0.0f32; segments * weight_len];

    let segment_work = |(s, dw): (usize, &mut [f32]), mut dx_segment: Option<&mut [f32]>| {
        with_scratch(|scratch| {
            let first = s * images_per_segment;
            let last = (first + images_per_segment).min(g.batch);
            for (c, n0) in (first..last).step_by(per_chunk).enumerate() {
                let images = per_chunk.min(last - n0);
                let columns = images * g.out_plane();
                let dy_chunk = &dy[n0 * g.out_image()..][..images * g.out_image()];
                let dy_mat: &[f32] = if images == 1 {
                    dy_chunk
                } else {
                    let grouped = resized(&mut scratch.output_gradient, g.out_channels * columns);
                    gather_planes(dy_chunk, g.out_channels, g.out_plane(), grouped);
                    grouped
                };
                let dy_mat = MatRef::row_major(dy_mat, g.out_channels, columns);

                let x_chunk = &x[n0 * g.in_image()..][..images * g.in_image()];
                let col = unrolled(g, x_chunk, &mut scratch.col);
                let col_t = MatRef::row_major(col, g.patch(), columns).t();
                if g.prefers_column_major_weight_gradient() {
                    gemm_into_col_major(dw, dy_mat, col_t, c > 0, par);
                } else {
                    gemm_into(dw, dy_mat, col_t, c > 0, par);
                }

                let Some(dx_segment) = dx_segment.as_deref_mut() else {
                    continue;
                };
                let offset = (n0 - first) * g.in_image();
                let dx_chunk = &mut dx_segment[offset..][..images * g.in_image()];
                if let Some(t) = &transposed {
                    forward_chunk(t, flipped, dy_chunk, dx_chunk, scratch, par);
                } else if g.is_pointwise() && images == 1 {
                    gemm_into(dx_chunk, weight_t, dy_mat, false, par);
                } else if g.is_pointwise() {
                    let dcol = resized(&mut scratch.col, g.patch() * columns);
                    gemm_into(dcol, weight_t, dy_mat, false, par);
                    scatter_planes(dcol, g.in_channels, g.in_plane(), dx_chunk);
                } else {
                    let dcol = resized(&mut scratch.col, g.patch() * columns);
                    gemm_into(dcol, weight_t, dy_mat, false, par);
                    for (i, image) in dx_chunk.chunks_exact_mut(g.in_image()).enumerate() {
                        col2im(g, dcol, columns, i * g.out_plane(), image);
                    }
                }
            }
        })
    };

    if need_input {
        partials
            .par_chunks_mut(weight_len)
            .enumerate()
            .zip(dx.par_chunks_mut(images_per_segment * g.in_image()))
            .for_each(|(seg, dxs)| segment_work(seg, Some(dxs)));
    } else {
        partials
            .par_chunks_mut(weight_len)
            .enumerate()
            .for_each(|seg| segment_work(seg, None));
    }

    let (sum, rest) = partials.split_at_mut(weight_len);
    for partial in rest.chunks_exact(weight_len) {
        for (d, p) in sum.iter_mut().zip(partial) {
            *d += *p;
        }
    }
    if !g.prefers_column_major_weight_gradient() {
        partials.truncate(weight_len);
        return (dx, partials);
    }
    // The sum is column-major `[patch, Cout]`; the weight gradient is row-major `[Cout, patch]`.
    let mut dw = vec![0.0f32; weight_len];
    for (j, column) in sum.chunks_exact(g.out_channels).enumerate() {
        for (co, &v) in column.iter().enumerate() {
            dw[co * g.patch() + j] = v;
        }
    }
    (dx, dw)
}
