//! Stride-1 convolutions on small planes as a sum of shifted matrix products, one per kernel position.
//!
//! With the activations laid out pixel-major, `[C, H, W, N]` (the batch innermost), kernel position
//! `(kh, kw)` contributes `W[:, :, kh, kw] · X` to every output pixel whose input pixel
//! `(oh + kh − p, ow + kw − p)` lies inside the image, and for one output row those pixels are one
//! contiguous block of columns in both `X` and `Y`. So the convolution is a handful of GEMMs on views of
//! `X` and `Y`, with no unrolled copy and, unlike `im2col`, no multiplications by padding: on VGG-16's
//! 512-channel layers at 4×4 and 2×2 pixels, 31% and 56% of `im2col`'s products are with padding zeros.
//! The input gradient is the same sum with `Wᵀ`, and the weight gradient of each kernel position is a
//! GEMM over the same blocks.
//!
//! Work is split over channel blocks (output channels for the forward pass and the weight gradient,
//! input channels for the input gradient), one block per worker, each running its GEMMs in a fixed order
//! on one thread, so results are bit-identical for a given thread count.

use rayon::prelude::*;

use gemm::Parallelism;

use super::super::matrix::{gemm_into_strided, MatRef};
use super::{padded_pitch, resized, Geometry, Scratch};

/// A block of columns shared by one kernel position's output and input: `len` values starting at `output`
/// in an output channel's `[Ho, Wo, N]` plane and at `input` in an input channel's `[H, W, N]` plane.
#[derive(Clone, Copy, Debug)]
struct Segment {
    output: usize,
    input: usize,
    len: usize,
}

/// The column blocks of one kernel position `tap = kh·K + kw`.
struct Tap {
    tap: usize,
    segments: Vec<Segment>,
}

/// Every kernel position with at least one output pixel inside the image, with its column blocks.
fn taps(g: &Geometry) -> Vec<Tap> {
    let (k, p, n) = (g.kernel, g.padding, g.batch);
    let mut taps = Vec::with_capacity(k * k);
    for kh in 0..k {
        // Output rows whose input row `oh + kh − p` is inside the image.
        let oh_lo = p.saturating_sub(kh).min(g.out_height);
        let oh_hi = (g.height + p).saturating_sub(kh).clamp(oh_lo, g.out_height);
        for kw in 0..k {
            let (lo, hi) = g.valid_out_columns(kw);
            if oh_lo == oh_hi || lo == hi {
                continue;
            }
            let input_at = |oh: usize| ((oh + kh - p) * g.width + lo + kw - p) * n;
            let whole_rows = lo == 0 && hi == g.out_width && g.out_width == g.width;
            let segments = if whole_rows {
                // Consecutive rows are contiguous in both planes: one block.
                vec![Segment {
                    output: oh_lo * g.out_width * n,
                    input: input_at(oh_lo),
                    len: (oh_hi - oh_lo) * g.out_width * n,
                }]
            } else {
                (oh_lo..oh_hi)
                    .map(|oh| Segment {
                        output: (oh * g.out_width + lo) * n,
                        input: input_at(oh),
                        len: (hi - lo) * n,
                    })
                    .collect()
            };
            taps.push(Tap {
                tap: kh * k + kw,
                segments,
            });
        }
    }
    taps
}

/// Side of the square blocks [`transpose_block`] moves at a time.
const BLOCK: usize = 16;

/// `dst[j·dst_stride + i] = src[i·src_stride + j]` for `i < rows`, `j < cols`, both at most [`BLOCK`].
///
/// The pixel-major layouts are transposes of the batch's: element by element, one of the two sides is
/// written or read a whole row apart, which on 8×8 planes of 128 images was measured at under 3 GB/s.
/// Through a block held in registers and L1, both sides move in runs of [`BLOCK`] values.
#[inline(always)]
fn transpose_block(
    src: &[f32],
    src_stride: usize,
    dst: &mut [f32],
    dst_stride: usize,
    rows: usize,
    cols: usize,
) {
    if rows == BLOCK && cols == BLOCK {
        let mut block = [[0.0f32; BLOCK]; BLOCK];
        for (i, row) in block.iter_mut().enumerate() {
            row.copy_from_slice(&src[i * src_stride..][..BLOCK]);
        }
        for j in 0..BLOCK {
            let to: &mut [f32; BLOCK] = (&mut dst[j * dst_stride..][..BLOCK])
                .try_into()
                .expect("a slice of BLOCK values");
            for (i, t) in to.iter_mut().enumerate() {
                *t = block[i][j];
            }
        }
        return;
    }
    for i in 0..rows {
        for j in 0..cols {
            dst[j * dst_stride + i] = src[i * src_stride + j];
        }
    }
}

/// `[N, C, plane]` → `[C, plane, N]` with channels `pitch` apart, one channel per task.
pub(super) fn to_pixel_major(
    src: &[f32],
    batch: usize,
    channels: usize,
    plane: usize,
    pitch: usize,
    dst: &mut [f32],
) {
    let image = channels * plane;
    dst.par_chunks_mut(pitch)
        .enumerate()
        .for_each(|(c, channel)| {
            for n in (0..batch).step_by(BLOCK) {
                let rows = BLOCK.min(batch - n);
                for q in (0..plane).step_by(BLOCK) {
                    let cols = BLOCK.min(plane - q);
                    transpose_block(
                        &src[n * image + c * plane + q..],
                        image,
                        &mut channel[q * batch + n..],
                        batch,
                        rows,
                        cols,
                    );
                }
            }
        });
}

/// `[C, plane, N]` with channels `pitch` apart → `[N, C, plane]`, [`BLOCK`] images per task.
pub(super) fn from_pixel_major(
    src: &[f32],
    batch: usize,
    channels: usize,
    plane: usize,
    pitch: usize,
    dst: &mut [f32],
) {
    let image = channels * plane;
    dst.par_chunks_mut(BLOCK * image)
        .enumerate()
        .for_each(|(block, images)| {
            let n = block * BLOCK;
            let cols = BLOCK.min(batch - n);
            for c in 0..channels {
                for q in (0..plane).step_by(BLOCK) {
                    let rows = BLOCK.min(plane - q);
                    transpose_block(
                        &src[c * pitch + q * batch + n..],
                        batch,
                        &mut images[c * plane + q..],
                        image,
                        rows,
                        cols,
                    );
                }
            }
        });
}

/// Channels per worker's block: the channels split evenly over the pool's threads.
fn block_channels(channels: usize) -> usize {
    channels
        .div_ceil(rayon::current_num_threads().max(1))
        .max(1)
}

/// A pixel-major activation `[channels, H, W, N]` with channels `pitch` apart.
#[derive(Clone, Copy)]
struct Plane<'a> {
    data: &'a [f32],
    channels: usize,
    pitch: usize,
}

impl<'a> Plane<'a> {
    /// Columns `from .. from + len` of every channel, as a `[channels, len]` matrix.
    fn columns(self, from: usize, len: usize) -> MatRef<'a> {
        MatRef {
            data: &self.data[from..],
            rows: self.channels,
            cols: len,
            row_stride: self.pitch,
            col_stride: 1,
        }
    }

    /// The `count` channels from `first` on.
    fn channel_block(self, first: usize, count: usize) -> Plane<'a> {
        Plane {
            data: &self.data[first * self.pitch..],
            channels: count,
            pitch: self.pitch,
        }
    }
}

/// Which end of each [`Segment`] is read and which is written.
#[derive(Clone, Copy)]
enum Direction {
    /// Read the input block, write the output block (the forward pass).
    Forward,
    /// Read the output block, write the input block (the input gradient).
    Backward,
}

/// `dst[c, to] = Σ over taps and segments of weight(tap)[c, :] · source[:, from]`, one block of
/// destination channels per worker; `weight(first, channels, tap)` is the tap's matrix for the block's
/// channels.
fn accumulate_taps<'w>(
    taps: &[Tap],
    direction: Direction,
    weight: impl Fn(usize, usize, usize) -> MatRef<'w> + Sync,
    source: Plane<'_>,
    dst: &mut [f32],
    dst_pitch: usize,
) {
    let dst_channels = dst.len() / dst_pitch;
    let block = block_channels(dst_channels);
    dst.par_chunks_mut(block * dst_pitch)
        .enumerate()
        .for_each(|(b, dst_block)| {
            dst_block.fill(0.0);
            let channels = dst_block.len() / dst_pitch;
            for tap in taps {
                let a = weight(b * block, channels, tap.tap);
                for s in &tap.segments {
                    let (from, to) = match direction {
                        Direction::Forward => (s.input, s.output),
                        Direction::Backward => (s.output, s.input),
                    };
                    let rhs = source.columns(from, s.len);
                    let out = &mut dst_block[to..];
                    gemm_into_strided(out, dst_pitch, 1, a, rhs, true, Parallelism::None);
                }
            }
        });
}

/// `y = conv(x, w)` (without bias) into `y`, `[N, Cout, Ho, Wo]`.
pub(super) fn forward(g: &Geometry, w: &[f32], x: &[f32], y: &mut [f32], scratch: &mut Scratch) {
    let n = g.batch;
    // Channels lie a padded pitch apart (see `padded_pitch`).
    let (in_len, out_len) = (
        padded_pitch(g.in_plane() * n),
        padded_pitch(g.out_plane() * n),
    );
    let xt = resized(&mut scratch.col, g.in_channels * in_len);
    to_pixel_major(x, n, g.in_channels, g.in_plane(), in_len, xt);
    let xt = &*xt;
    let yt = resized(&mut scratch.grouped, g.out_channels * out_len);
    let taps = taps(g);
    let (patch, k2) = (g.patch(), g.kernel * g.kernel);
    // `W[co, :, kh, kw]` for a block of output channels.
    let weight = |first: usize, channels: usize, tap: usize| MatRef {
        data: &w[first * patch + tap..],
        rows: channels,
        cols: g.in_channels,
        row_stride: patch,
        col_stride: k2,
    };
    let source = Plane {
        data: xt,
        channels: g.in_channels,
        pitch: in_len,
    };
    accumulate_taps(&taps, Direction::Forward, weight, source, yt, out_len);
    from_pixel_major(yt, n, g.out_channels, g.out_plane(), out_len, y);
}

/// The weight gradient and, when `need_input`, the input gradient, `(dx, dw)` in the layouts of `x`
/// and `w`.
pub(super) fn gradients(
    g: &Geometry,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    need_input: bool,
    scratch: &mut Scratch,
) -> (Vec<f32>, Vec<f32>) {
    let n = g.batch;
    // Channels lie a padded pitch apart (see `padded_pitch`).
    let (in_len, out_len) = (
        padded_pitch(g.in_plane() * n),
        padded_pitch(g.out_plane() * n),
    );
    let (patch, k2) = (g.patch(), g.kernel * g.kernel);
    let taps = taps(g);
    let xt = resized(&mut scratch.col, g.in_channels * in_len);
    to_pixel_major(x, n, g.in_channels, g.in_plane(), in_len, xt);
    let input = Plane {
        data: xt,
        channels: g.in_channels,
        pitch: in_len,
    };
    let dyt = resized(&mut scratch.output_gradient, g.out_channels * out_len);
    to_pixel_major(dy, n, g.out_channels, g.out_plane(), out_len, dyt);
    let output_gradient = Plane {
        data: dyt,
        channels: g.out_channels,
        pitch: out_len,
    };

    // dW[co, ci, kh, kw] = Σ over the tap's blocks of dY[co, block] · X[ci, block]ᵀ.
    let mut dw = vec![0.0f32; g.out_channels * patch];
    let block = block_channels(g.out_channels);
    dw.par_chunks_mut(block * patch)
        .enumerate()
        .for_each(|(b, dw_block)| {
            let channels = dw_block.len() / patch;
            let dy_block = output_gradient.channel_block(b * block, channels);
            for tap in &taps {
                for (i, s) in tap.segments.iter().enumerate() {
                    gemm_into_strided(
                        &mut dw_block[tap.tap..],
                        patch,
                        k2,
                        dy_block.columns(s.output, s.len),
                        input.columns(s.input, s.len).t(),
                        i > 0,
                        Parallelism::None,
                    );
                }
            }
        });
    if !need_input {
        return (Vec::new(), dw);
    }

    // dX[ci, in block] = Σ over taps of W[:, ci, kh, kw]ᵀ · dY[:, out block], pixel-major, in the buffer
    // that holds the forward pass's output and is unused by the weight gradient.
    let dxt = resized(&mut scratch.grouped, g.in_channels * in_len);
    // `W[:, ci, kh, kw]ᵀ` for a block of input channels.
    let weight_t = |first: usize, channels: usize, tap: usize| MatRef {
        data: &w[first * k2 + tap..],
        rows: channels,
        cols: g.out_channels,
        row_stride: k2,
        col_stride: patch,
    };
    accumulate_taps(
        &taps,
        Direction::Backward,
        weight_t,
        output_gradient,
        dxt,
        in_len,
    );
    let mut dx = vec![0.0f32; g.batch * g.in_image()];
    from_pixel_major(dxt, n, g.in_channels, g.in_plane(), in_len, &mut dx);
    (dx, dw)
}
