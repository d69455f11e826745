//! 3×3 stride-1 convolutions with padding 1 by Winograd's minimal filtering F(2×2, 3×3) (Lavin and Gray,
//! "Fast Algorithms for Convolutional Neural Networks", CVPR 2016).
//!
//! Each 2×2 block of outputs is computed from the 4×4 block of inputs around it with 16 products per
//! channel pair instead of 36: the weights and the input blocks are transformed (`U = G g Gᵀ`,
//! `V = Bᵀ d B`), multiplied element-wise at each of the 16 positions and summed over input channels
//! (one GEMM `U_ξ · V_ξ` per position ξ), and transformed back (`Y = Aᵀ M A`). The GEMMs do 2.25× fewer
//! multiplications than `im2col`'s. The input gradient of such a convolution is again one (the weight
//! flipped and transposed, see [`Geometry::input_gradient_as_convolution`]), so it takes this path too,
//! and so does the weight gradient: one GEMM per position of the transformed output gradient by the
//! transformed input over the batch's tiles (see [`weight_gradient`]).
//!
//! The transforms' coefficients are 0, ±1 and ±½, so the only rounding beyond a direct convolution's
//! comes from the few extra additions of the transforms.
//!
//! The transformed activations are four times the size of the activations, so the batch is worked
//! through in fixed groups of images, one task each (the forward pass: [`FORWARD_GROUP_IMAGES`]; the
//! weight gradient: parts with partial sums, see [`weight_gradient`]), whose transforms the GEMMs read
//! back from cache: in a training step, transforming the whole batch first streamed them through memory
//! and made the forward pass no faster than the direct kernel's. Every GEMM runs on one thread and the
//! groups depend only on the geometry: no sum depends on the scheduling, so results are bit-identical
//! whatever the thread count.

use rayon::prelude::*;

use gemm::Parallelism;

use super::super::matrix::{gemm_into_strided, MatRef};
use super::shifted::{from_pixel_major, to_pixel_major};
use super::{padded_pitch, resized, with_scratch, Geometry, Scratch};

/// Positions of a transformed 4×4 block.
const POSITIONS: usize = 16;

/// Whether `g` can run as F(2×2, 3×3): a 3×3 stride-1 convolution with padding 1 on even planes.
pub(super) fn fits(g: &Geometry) -> bool {
    g.kernel == 3
        && g.stride == 1
        && g.padding == 1
        && g.height.is_multiple_of(2)
        && g.width.is_multiple_of(2)
}

/// The rows of a position-major buffer `[16][channels][pitch]` grouped by channel: entry `c` holds channel
/// `c`'s row at each of the 16 positions, so that one task can fill all of a channel's rows.
fn rows_by_channel(buffer: &mut [f32], channels: usize, pitch: usize) -> Vec<Vec<&mut [f32]>> {
    let mut rows: Vec<Vec<&mut [f32]>> = (0..channels).map(|_| Vec::new()).collect();
    for position in buffer.chunks_mut(channels * pitch) {
        for (c, row) in position.chunks_mut(pitch).enumerate() {
            rows[c].push(row);
        }
    }
    rows
}

/// `U[ξ][co][ci] = (G g Gᵀ)[ξ]` for `w` `[Cout, Cin, 3, 3]`, position-major with rows `pitch` apart.
fn transform_weights(
    w: &[f32],
    out_channels: usize,
    in_channels: usize,
    pitch: usize,
    u: &mut [f32],
) {
    let mut rows = rows_by_channel(u, out_channels, pitch);
    rows.par_iter_mut().enumerate().for_each(|(co, out)| {
        // LANES input channels at a time, each of the 9 taps gathered into a run of its own, so that the
        // transform runs on whole vectors and each position's row is written in runs.
        for c0 in (0..in_channels).step_by(LANES) {
            let len = LANES.min(in_channels - c0);
            let mut g = [[0.0f32; LANES]; 9];
            for lane in 0..len {
                let weights = &w[(co * in_channels + c0 + lane) * 9..][..9];
                for (tap, g) in g.iter_mut().enumerate() {
                    g[lane] = weights[tap];
                }
            }
            // t = G g (4×3), then u = t Gᵀ (4×4), lane by lane.
            let mut u = [[0.0f32; LANES]; POSITIONS];
            for k in 0..LANES {
                let mut t = [[0.0f32; 3]; 4];
                for c in 0..3 {
                    let (g0, g1, g2) = (g[c][k], g[3 + c][k], g[6 + c][k]);
                    t[0][c] = g0;
                    t[1][c] = 0.5 * (g0 + g1 + g2);
                    t[2][c] = 0.5 * (g0 - g1 + g2);
                    t[3][c] = g2;
                }
                for (r, t) in t.iter().enumerate() {
                    u[r * 4][k] = t[0];
                    u[r * 4 + 1][k] = 0.5 * (t[0] + t[1] + t[2]);
                    u[r * 4 + 2][k] = 0.5 * (t[0] - t[1] + t[2]);
                    u[r * 4 + 3][k] = t[2];
                }
            }
            for (row, u) in out.iter_mut().zip(&u) {
                copy_lanes(&mut row[c0..], u, len);
            }
        }
    });
}

/// Values of a tile position handled at once: the batch is innermost, so each of a tile's 16 inputs is a
/// run of consecutive images, and the transforms run on fixed-size arrays that the compiler vectorises.
const LANES: usize = 16;

/// `dst[..len] = src[..len]` for `len` at most [`LANES`]: a whole run of [`LANES`] (every run when the batch
/// is a multiple of it) as a copy of known length, which compiles to a few vector moves rather than a
/// call to `memmove` (measured at a tenth of the weight gradient's time on 8×8 planes).
#[inline(always)]
fn copy_lanes(dst: &mut [f32], src: &[f32], len: usize) {
    if len == LANES {
        dst[..LANES].copy_from_slice(&src[..LANES]);
    } else {
        dst[..len].copy_from_slice(&src[..len]);
    }
}

/// `V[ξ][ci][t] = (Bᵀ d B)[ξ]` for every 4×4 input block `d`, from the pixel-major input `xt`
/// `[Cin, H, W, N]` (channels `in_pitch` apart); tile `t` = (tile row, tile column, image), position-major
/// with rows `pitch` apart.
fn transform_input(g: &Geometry, xt: &[f32], in_pitch: usize, pitch: usize, v: &mut [f32]) {
    let (tiles_h, tiles_w, n) = (g.height / 2, g.width / 2, g.batch);
    let mut rows = rows_by_channel(v, g.in_channels, pitch);
    rows.par_iter_mut().enumerate().for_each(|(ci, out)| {
        let channel = &xt[ci * in_pitch..];
        for i in 0..tiles_h {
            for j in 0..tiles_w {
                let tile = (i * tiles_w + j) * n;
                for k0 in (0..n).step_by(LANES) {
                    let len = LANES.min(n - k0);
                    let mut d = [[[0.0f32; LANES]; 4]; 4];
                    for (r, d) in d.iter_mut().enumerate() {
                        let Some(ih) = (2 * i + r).checked_sub(1).filter(|&h| h < g.height) else {
                            continue;
                        };
                        for (c, d) in d.iter_mut().enumerate() {
                            let Some(iw) = (2 * j + c).checked_sub(1).filter(|&w| w < g.width)
                            else {
                                continue;
                            };
                            copy_lanes(d, &channel[(ih * g.width + iw) * n + k0..], len);
                        }
                    }
                    // s = Bᵀ d, then v = s B, lane by lane.
                    let mut v = [[0.0f32; LANES]; POSITIONS];
                    for k in 0..LANES {
                        let mut s = [[0.0f32; 4]; 4];
                        for c in 0..4 {
                            s[0][c] = d[0][c][k] - d[2][c][k];
                            s[1][c] = d[1][c][k] + d[2][c][k];
                            s[2][c] = d[2][c][k] - d[1][c][k];
                            s[3][c] = d[1][c][k] - d[3][c][k];
                        }
                        for (r, s) in s.iter().enumerate() {
                            v[r * 4][k] = s[0] - s[2];
                            v[r * 4 + 1][k] = s[1] + s[2];
                            v[r * 4 + 2][k] = s[2] - s[1];
                            v[r * 4 + 3][k] = s[1] - s[3];
                        }
                    }
                    for (row, v) in out.iter_mut().zip(&v) {
                        copy_lanes(&mut row[tile + k0..], v, len);
                    }
                }
            }
        }
    });
}

/// `yt[co, 2i + a, 2j + b, n] = (Aᵀ m A)[a][b]` (plus the bias) for the products `m[ξ][co][t]`, into the
/// pixel-major `yt` `[Cout, H, W, N]` (channels `out_pitch` apart).
fn transform_output(
    g: &Geometry,
    m: &[f32],
    pitch: usize,
    bias: Option<&[f32]>,
    out_pitch: usize,
    yt: &mut [f32],
) {
    let (tiles_h, tiles_w, n) = (g.height / 2, g.width / 2, g.batch);
    let position_len = g.out_channels * pitch;
    yt.par_chunks_mut(out_pitch)
        .enumerate()
        .for_each(|(co, channel)| {
            let b = bias.map_or(0.0, |b| b[co]);
            for i in 0..tiles_h {
                for j in 0..tiles_w {
                    let tile = (i * tiles_w + j) * n;
                    for k0 in (0..n).step_by(LANES) {
                        let len = LANES.min(n - k0);
                        let mut p = [[0.0f32; LANES]; POSITIONS];
                        for (position, p) in p.iter_mut().enumerate() {
                            copy_lanes(
                                p,
                                &m[position * position_len + co * pitch + tile + k0..],
                                len,
                            );
                        }
                        // s = Aᵀ m (2×4), then y = s A (2×2), lane by lane.
                        let mut y = [[0.0f32; LANES]; 4];
                        for k in 0..LANES {
                            let mut s = [[0.0f32; 4]; 2];
                            for c in 0..4 {
                                let (m0, m1, m2, m3) =
                                    (p[c][k], p[4 + c][k], p[8 + c][k], p[12 + c][k]);
                                s[0][c] = m0 + m1 + m2;
                                s[1][c] = m1 - m2 - m3;
                            }
                            for (a, s) in s.iter().enumerate() {
                                y[2 * a][k] = s[0] + s[1] + s[2] + b;
                                y[2 * a + 1][k] = s[1] - s[2] - s[3] + b;
                            }
                        }
                        for (q, y) in y.iter().enumerate() {
                            let (a, c) = (q / 2, q % 2);
                            let pixel = (2 * i + a) * g.width + 2 * j + c;
                            copy_lanes(&mut channel[pixel * n + k0..], y, len);
                        }
                    }
                }
            }
        });
}

/// Images [`forward`] runs through the transforms and products at a time, one group per task: the
/// transformed input and the products of a group (16 positions × channels × tiles each) stay small
/// enough to be read back from cache, where whole-batch buffers four times the activations' size
/// streamed through memory between the passes.
const FORWARD_GROUP_IMAGES: usize = LANES;

/// `y = conv(x, w) + bias` for a convolution that [`fits`], `y` `[N, Cout, H, W]`.
///
/// The weights are transformed once; then each group of [`FORWARD_GROUP_IMAGES`] images is a task of
/// its own. Each output depends only on its group's products, in a fixed order, so results are
/// bit-identical whatever the thread count.
pub(super) fn forward(g: &Geometry, w: &[f32], x: &[f32], bias: Option<&[f32]>, y: &mut [f32]) {
    let channel_pitch = padded_pitch(g.in_channels);
    let mut u = vec![0.0f32; POSITIONS * g.out_channels * channel_pitch];
    transform_weights(w, g.out_channels, g.in_channels, channel_pitch, &mut u);
    let u = &u[..];
    let images = FORWARD_GROUP_IMAGES.min(g.batch).max(1);
    y.par_chunks_mut(images * g.out_image())
        .zip(x.par_chunks(images * g.in_image()))
        .for_each(|(y, x)| {
            let part = Geometry {
                batch: x.len() / g.in_image(),
                ..*g
            };
            with_scratch(|scratch| forward_group(&part, u, channel_pitch, x, bias, y, scratch));
        });
}

/// [`forward`] for the images of `g`, with the transformed weights `u` (rows `channel_pitch` apart).
fn forward_group(
    g: &Geometry,
    u: &[f32],
    channel_pitch: usize,
    x: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
    scratch: &mut Scratch,
) {
    let tiles = g.batch * (g.height / 2) * (g.width / 2);
    let tile_pitch = padded_pitch(tiles);
    let (in_pitch, out_pitch) = (
        padded_pitch(g.in_plane() * g.batch),
        padded_pitch(g.out_plane() * g.batch),
    );
    let xt = resized(&mut scratch.output_gradient, g.in_channels * in_pitch);
    to_pixel_major(x, g.batch, g.in_channels, g.in_plane(), in_pitch, xt);
    let v = resized(&mut scratch.col, POSITIONS * g.in_channels * tile_pitch);
    transform_input(g, xt, in_pitch, tile_pitch, v);
    let v = &*v;

    let m = resized(
        &mut scratch.grouped,
        POSITIONS * g.out_channels * tile_pitch,
    );
    for (position, product) in m.chunks_mut(g.out_channels * tile_pitch).enumerate() {
        let weight = MatRef {
            data: &u[position * g.out_channels * channel_pitch..],
            rows: g.out_channels,
            cols: g.in_channels,
            row_stride: channel_pitch,
            col_stride: 1,
        };
        let input = MatRef {
            data: &v[position * g.in_channels * tile_pitch..],
            rows: g.in_channels,
            cols: tiles,
            row_stride: tile_pitch,
            col_stride: 1,
        };
        gemm_into_strided(
            product,
            tile_pitch,
            1,
            weight,
            input,
            false,
            Parallelism::None,
        );
    }
    // The pixel-major input is no longer needed: its buffer receives the pixel-major output.
    let yt = resized(&mut scratch.output_gradient, g.out_channels * out_pitch);
    transform_output(g, m, tile_pitch, bias, out_pitch, yt);
    from_pixel_major(yt, g.batch, g.out_channels, g.out_plane(), out_pitch, y);
}

/// `dM[ξ][co][t] = (A dy_t Aᵀ)[ξ]` for every 2×2 block `dy_t` of the pixel-major output gradient `dyt`
/// `[Cout, H, W, N]` (channels `in_pitch` apart): the gradient of the products `m` of [`forward`], whose
/// outputs are `y = Aᵀ m A`. Position-major with rows `pitch` apart, tiles ordered as in
/// [`transform_input`].
fn transform_output_gradient(
    g: &Geometry,
    dyt: &[f32],
    in_pitch: usize,
    pitch: usize,
    dm: &mut [f32],
) {
    let (tiles_h, tiles_w, n) = (g.height / 2, g.width / 2, g.batch);
    let mut rows = rows_by_channel(dm, g.out_channels, pitch);
    rows.par_iter_mut().enumerate().for_each(|(co, out)| {
        let channel = &dyt[co * in_pitch..];
        for i in 0..tiles_h {
            for j in 0..tiles_w {
                let tile = (i * tiles_w + j) * n;
                for k0 in (0..n).step_by(LANES) {
                    let len = LANES.min(n - k0);
                    let mut d = [[[0.0f32; LANES]; 2]; 2];
                    for (a, d) in d.iter_mut().enumerate() {
                        for (b, d) in d.iter_mut().enumerate() {
                            let pixel = (2 * i + a) * g.width + 2 * j + b;
                            copy_lanes(d, &channel[pixel * n + k0..], len);
                        }
                    }
                    // s = A d (4×2), then v = s Aᵀ (4×4), lane by lane.
                    let mut v = [[0.0f32; LANES]; POSITIONS];
                    for k in 0..LANES {
                        let mut s = [[0.0f32; 2]; 4];
                        for c in 0..2 {
                            let (d0, d1) = (d[0][c][k], d[1][c][k]);
                            s[0][c] = d0;
                            s[1][c] = d0 + d1;
                            s[2][c] = d0 - d1;
                            s[3][c] = -d1;
                        }
                        for (r, s) in s.iter().enumerate() {
                            v[r * 4][k] = s[0];
                            v[r * 4 + 1][k] = s[0] + s[1];
                            v[r * 4 + 2][k] = s[0] - s[1];
                            v[r * 4 + 3][k] = -s[1];
                        }
                    }
                    for (row, v) in out.iter_mut().zip(&v) {
                        copy_lanes(&mut row[tile + k0..], v, len);
                    }
                }
            }
        }
    });
}

/// `dw[co][ci] = Gᵀ dU[·][co][ci] G` (3×3) for the transformed weight gradient `du[ξ][co][ci]`
/// (position-major, rows `pitch` apart): the gradient of `w` through `U = G g Gᵀ`.
fn inverse_transform_weights(
    du: &[f32],
    out_channels: usize,
    in_channels: usize,
    pitch: usize,
    dw: &mut [f32],
) {
    let position_len = out_channels * pitch;
    dw.par_chunks_mut(in_channels * 9)
        .enumerate()
        .for_each(|(co, out)| {
            for (ci, dg) in out.chunks_exact_mut(9).enumerate() {
                let p = |position: usize| du[position * position_len + co * pitch + ci];
                // q = Gᵀ P (3×4) column by column, then dg = q G (3×3) row by row.
                let columns: [[f32; 3]; 4] = std::array::from_fn(|c| {
                    let (p0, p1, p2, p3) = (p(c), p(4 + c), p(8 + c), p(12 + c));
                    [p0 + 0.5 * (p1 + p2), 0.5 * (p1 - p2), 0.5 * (p1 + p2) + p3]
                });
                for r in 0..3 {
                    let q = columns.map(|column| column[r]);
                    dg[r * 3] = q[0] + 0.5 * (q[1] + q[2]);
                    dg[r * 3 + 1] = 0.5 * (q[1] - q[2]);
                    dg[r * 3 + 2] = 0.5 * (q[1] + q[2]) + q[3];
                }
            }
        });
}

/// Output tiles [`weight_gradient`] transforms at a time when it works through the batch alone: the
/// transformed input and output gradient of this many tiles (16 positions × channels × tiles each) stay
/// the size of a batch of 128 8×8 images, however large the planes.
const GRADIENT_TILES: usize = 2048;

/// Values (f32) of the partial sums of `dU` that [`weight_gradient`] may hold at once: with narrow
/// layers the batch is split into up to [`GRADIENT_MAX_PARTS`] parts, each a task adding its own
/// partial sum, so that each part's transforms are read back by its GEMMs from cache.
const GRADIENT_PARTIALS: usize = 1 << 22;

/// See [`GRADIENT_PARTIALS`].
const GRADIENT_MAX_PARTS: usize = 8;

/// The largest power of two at most `n` (`n` ≥ 1).
fn prev_power_of_two(n: usize) -> usize {
    1 << (usize::BITS - 1 - n.max(1).leading_zeros())
}

/// The weight gradient `[Cout, Cin, 3, 3]` of a convolution that [`fits`], from its input `x` and output
/// gradient `dy`: since `m[ξ] = U[ξ] · V[ξ]` and `y = Aᵀ m A`, the gradient of `U[ξ]` is one GEMM
/// `dM[ξ] · V[ξ]ᵀ` over the tiles per position ξ (`dM = A dy Aᵀ` tile by tile), with 2.25× fewer
/// multiplications than the direct sums, and the weights' gradient is `Gᵀ dU G`.
///
/// The batch is split into equal parts (as many as [`GRADIENT_PARTIALS`] allows, a power of two up to
/// [`GRADIENT_MAX_PARTS`], each of at least [`LANES`] images), each a task that works through its images
/// in fixed groups of about [`GRADIENT_TILES`] / parts tiles (at least [`LANES`] images), each group's
/// GEMMs adding into the part's `dU` in order; the parts' sums are then added in order. The parts and
/// groups depend only on the geometry and each GEMM runs on one thread, so no sum's order depends on
/// the scheduling or the thread count.
pub(super) fn weight_gradient(g: &Geometry, x: &[f32], dy: &[f32]) -> Vec<f32> {
    let tiles_per_image = ((g.height / 2) * (g.width / 2)).max(1);
    let channel_pitch = padded_pitch(g.in_channels);
    let du_len = POSITIONS * g.out_channels * channel_pitch;
    // A power of two, so that the parts share out evenly over the usual thread counts, and at least
    // a run of lanes of images each.
    let parts = prev_power_of_two(
        (GRADIENT_PARTIALS / du_len.max(1))
            .min(g.batch / LANES)
            .clamp(1, GRADIENT_MAX_PARTS),
    );
    let images_per_part = g.batch.div_ceil(parts).max(1);
    let images_per_group = (GRADIENT_TILES / parts / tiles_per_image)
        .max(LANES)
        .min(images_per_part);
    let mut partials: Vec<Vec<f32>> = (0..g.batch.div_ceil(images_per_part).max(1))
        .into_par_iter()
        .map(|part| {
            let first = part * images_per_part;
            let last = (first + images_per_part).min(g.batch);
            let mut du = vec![0.0f32; du_len];
            with_scratch(|scratch| {
                for (i, first) in (first..last).step_by(images_per_group).enumerate() {
                    let images = images_per_group.min(last - first);
                    let group = Geometry {
                        batch: images,
                        ..*g
                    };
                    let x = &x[first * g.in_image()..][..images * g.in_image()];
                    let dy = &dy[first * g.out_image()..][..images * g.out_image()];
                    add_transformed_weight_gradient(&group, x, dy, i > 0, &mut du, scratch);
                }
            });
            du
        })
        .collect();
    let mut du = partials.remove(0);
    for partial in &partials {
        du.iter_mut().zip(partial).for_each(|(d, p)| *d += p);
    }
    let mut dw = vec![0.0; g.out_channels * g.patch()];
    inverse_transform_weights(&du, g.out_channels, g.in_channels, channel_pitch, &mut dw);
    dw
}

/// `dU[ξ] (+)= dM[ξ] · V[ξ]ᵀ` for the images of `g` (see [`weight_gradient`]), into `du`
/// `[16][Cout][pitch]` with `pitch = padded_pitch(Cin)`; overwritten unless `accumulate`.
fn add_transformed_weight_gradient(
    g: &Geometry,
    x: &[f32],
    dy: &[f32],
    accumulate: bool,
    du: &mut [f32],
    scratch: &mut Scratch,
) {
    let tiles = g.batch * (g.height / 2) * (g.width / 2);
    let tile_pitch = padded_pitch(tiles);
    let channel_pitch = padded_pitch(g.in_channels);
    let pixel_pitch = padded_pitch(g.in_plane() * g.batch);

    let xt = resized(&mut scratch.output_gradient, g.in_channels * pixel_pitch);
    to_pixel_major(x, g.batch, g.in_channels, g.in_plane(), pixel_pitch, xt);
    let v = resized(&mut scratch.col, POSITIONS * g.in_channels * tile_pitch);
    transform_input(g, xt, pixel_pitch, tile_pitch, v);
    let v = &*v;
    // The pixel-major input is no longer needed: its buffer receives the pixel-major output gradient.
    let dyt = resized(&mut scratch.output_gradient, g.out_channels * pixel_pitch);
    to_pixel_major(dy, g.batch, g.out_channels, g.out_plane(), pixel_pitch, dyt);
    let dm = resized(
        &mut scratch.grouped,
        POSITIONS * g.out_channels * tile_pitch,
    );
    transform_output_gradient(g, dyt, pixel_pitch, tile_pitch, dm);
    let dm = &*dm;

    du.par_chunks_mut(g.out_channels * channel_pitch)
        .enumerate()
        .for_each(|(position, product)| {
            let output_gradient = MatRef {
                data: &dm[position * g.out_channels * tile_pitch..],
                rows: g.out_channels,
                cols: tiles,
                row_stride: tile_pitch,
                col_stride: 1,
            };
            let input_transposed = MatRef {
                data: &v[position * g.in_channels * tile_pitch..],
                rows: tiles,
                cols: g.in_channels,
                row_stride: 1,
                col_stride: tile_pitch,
            };
            gemm_into_strided(
                product,
                channel_pitch,
                1,
                output_gradient,
                input_transposed,
                accumulate,
                Parallelism::None,
            );
        });
}

#[cfg(test)]
mod tests {
    //! The public tests reach this path only at full-network sizes (see `Geometry::winograd`), too large
    //! for a direct-sum reference; these call it directly on small odd shapes.

    use super::*;
    use crate::backend::Conv2dSpec;

    /// `y[n, co, oh, ow] = Σ x[n, ci, oh + kh − 1, ow + kw − 1] · w[co, ci, kh, kw]`, in f64.
    fn direct(g: &Geometry, x: &[f32], w: &[f32]) -> Vec<f64> {
        let (h, wd) = (g.height as isize, g.width as isize);
        let mut y = vec![0.0f64; g.batch * g.out_image()];
        for n in 0..g.batch {
            for co in 0..g.out_channels {
                for oh in 0..h {
                    for ow in 0..wd {
                        let mut sum = 0.0;
                        for ci in 0..g.in_channels {
                            for kh in 0..3isize {
                                for kw in 0..3isize {
                                    let (ih, iw) = (oh + kh - 1, ow + kw - 1);
                                    if ih < 0 || iw < 0 || ih >= h || iw >= wd {
                                        continue;
                                    }
                                    let xi = ((n * g.in_channels + ci) as isize * h + ih) * wd + iw;
                                    let wi = ((co * g.in_channels + ci) * 3 + kh as usize) * 3
                                        + kw as usize;
                                    sum += f64::from(x[xi as usize]) * f64::from(w[wi]);
                                }
                            }
                        }
                        y[((n * g.out_channels + co) as isize * h + oh) as usize * g.width
                            + ow as usize] = sum;
                    }
                }
            }
        }
        y
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len as u32)
            .map(|i| {
                let v = i
                    .wrapping_mul(2_654_435_761)
                    .wrapping_add(seed.wrapping_mul(40_503));
                (v >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0
            })
            .collect()
    }

    fn geometry(n: usize, cin: usize, cout: usize, h: usize, w: usize) -> Geometry {
        let spec = Conv2dSpec {
            stride: 1,
            padding: 1,
        };
        Geometry::new("test", &[n, cin, h, w], &[cout, cin, 3, 3], spec).expect("valid geometry")
    }

    fn assert_close(what: &str, got: &[f32], want: &[f64], terms: usize) {
        let tol = 1e-5 * (terms as f64 / 144.0).sqrt().max(1.0);
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            let err = (f64::from(g) - w).abs();
            assert!(
                err <= tol * (1.0 + w.abs()),
                "{what}: element {i}: got {g}, want {w}"
            );
        }
    }

    /// Odd channel counts, batches that are not a multiple of the lanes, planes from 2×2 to 6×8; the
    /// last shape has a whole run of lanes of images and of input channels (the weights' transform runs
    /// over input channels) and one partial run of each, and 16-pixel planes (whole blocks of the
    /// pixel-major transposes).
    const SHAPES: [(usize, usize, usize, usize, usize); 5] = [
        (3, 5, 7, 4, 6),
        (1, 2, 3, 2, 2),
        (37, 3, 2, 2, 4),
        (2, 9, 4, 6, 8),
        (33, 35, 3, 4, 4),
    ];

    #[test]
    fn forward_matches_the_direct_convolution() {
        for (n, cin, cout, h, w) in SHAPES {
            let g = geometry(n, cin, cout, h, w);
            assert!(fits(&g));
            let (x, wt) = (values(n * cin * h * w, 1), values(cout * cin * 9, 2));
            let bias = values(cout, 3);
            let mut y = vec![f32::NAN; n * cout * h * w];
            forward(&g, &wt, &x, Some(&bias), &mut y);
            let mut want = direct(&g, &x, &wt);
            for (i, v) in want.iter_mut().enumerate() {
                *v += f64::from(bias[(i / (h * w)) % cout]);
            }
            assert_close(&format!("{g:?}"), &y, &want, cin * 9);
        }
    }

    #[test]
    fn input_gradient_through_the_transposed_convolution_matches_the_direct_sum() {
        for (n, cin, cout, h, w) in SHAPES {
            let g = geometry(n, cin, cout, h, w);
            let t = g
                .input_gradient_as_convolution()
                .expect("stride 1 has a transposed convolution");
            assert!(fits(&t));
            let (wt, dy) = (values(cout * cin * 9, 4), values(n * cout * h * w, 5));
            let mut dx = vec![f32::NAN; n * cin * h * w];
            forward(&t, &g.flipped_weight(&wt), &dy, None, &mut dx);
            // dx[n, ci, ih, iw] = Σ dy[n, co, ih − kh + 1, iw − kw + 1] · w[co, ci, kh, kw].
            let mut want = vec![0.0f64; dx.len()];
            let (hi, wi) = (h as isize, w as isize);
            for b in 0..n {
                for co in 0..cout {
                    for oh in 0..hi {
                        for ow in 0..wi {
                            let d = f64::from(
                                dy[((b * cout + co) * h + oh as usize) * w + ow as usize],
                            );
                            for ci in 0..cin {
                                for kh in 0..3isize {
                                    for kw in 0..3isize {
                                        let (ih, iw) = (oh + kh - 1, ow + kw - 1);
                                        if ih < 0 || iw < 0 || ih >= hi || iw >= wi {
                                            continue;
                                        }
                                        let weight = wt
                                            [((co * cin + ci) * 3 + kh as usize) * 3 + kw as usize];
                                        want[((b * cin + ci) * h + ih as usize) * w
                                            + iw as usize] += d * f64::from(weight);
                                    }
                                }
                            }
                        }
                    }
                }
            }
            assert_close(&format!("dx {g:?}"), &dx, &want, cout * 9);
        }
    }

    #[test]
    fn weight_gradient_matches_the_direct_sum() {
        // The last shape is split into parts of more than one group: 70 images are four parts of 18,
        // 18, 18 and 16 images, each of a group of 16 images and one of the rest.
        for (n, cin, cout, h, w) in SHAPES.into_iter().chain([(70, 2, 3, 16, 16)]) {
            let g = geometry(n, cin, cout, h, w);
            let (x, dy) = (values(n * cin * h * w, 6), values(n * cout * h * w, 7));
            let dw = weight_gradient(&g, &x, &dy);
            // dw[co, ci, kh, kw] = Σ dy[n, co, oh, ow] · x[n, ci, oh + kh − 1, ow + kw − 1].
            let mut want = vec![0.0f64; cout * cin * 9];
            let (hi, wi) = (h as isize, w as isize);
            for b in 0..n {
                for co in 0..cout {
                    for ci in 0..cin {
                        for kh in 0..3isize {
                            for kw in 0..3isize {
                                let mut sum = 0.0;
                                for oh in 0..hi {
                                    for ow in 0..wi {
                                        let (ih, iw) = (oh + kh - 1, ow + kw - 1);
                                        if ih < 0 || iw < 0 || ih >= hi || iw >= wi {
                                            continue;
                                        }
                                        let d = dy
                                            [((b * cout + co) * h + oh as usize) * w + ow as usize];
                                        let v =
                                            x[((b * cin + ci) * h + ih as usize) * w + iw as usize];
                                        sum += f64::from(d) * f64::from(v);
                                    }
                                }
                                want[((co * cin + ci) * 3 + kh as usize) * 3 + kw as usize] += sum;
                            }
                        }
                    }
                }
            }
            assert_close(&format!("dw {g:?}"), &dw, &want, n * h * w);
        }
    }

    #[test]
    fn only_3x3_stride_1_padding_1_on_even_planes_fits() {
        let spec = |stride, padding| Conv2dSpec { stride, padding };
        let fits_with = |x: [usize; 4], k: usize, s: Conv2dSpec| {
            Geometry::new("test", &x, &[4, x[1], k, k], s).is_ok_and(|g| fits(&g))
        };
        assert!(fits_with([2, 3, 4, 6], 3, spec(1, 1)));
        assert!(!fits_with([2, 3, 5, 6], 3, spec(1, 1)));
        assert!(!fits_with([2, 3, 4, 6], 3, spec(2, 1)));
        assert!(!fits_with([2, 3, 4, 6], 3, spec(1, 0)));
        assert!(!fits_with([2, 3, 4, 6], 5, spec(1, 2)));
    }
}
