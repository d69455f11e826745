//! 3×3 stride-1 convolutions with padding 1 on up to 128 channels, computed directly in registers.
//!
//! With 16 or 32 channels, `im2col` writes nine copies of every input value and the GEMM then reads
//! them back, and its short dimension (the output channels) is too small for the GEMM kernel's
//! register tile: PreResNet's first stages spent more time unrolling than multiplying. Here each image
//! is copied once into zero-padded planes, and an output tile (a few output channels × a few rows ×
//! one vector of columns) is accumulated in vector registers over every input channel and the nine
//! kernel positions, reading the padded rows in place.
//!
//! - Forward: `y[co, oh, ow] = Σ_{ci, kh, kw} w[co, ci, kh, kw] · x̃[ci, oh + kh, ow + kw]`, with `x̃` the
//!   padded input; the weights are repacked so that a tile's output channels are adjacent.
//! - Input gradient: the forward pass of the transposed convolution (the weight flipped in space and
//!   transposed in channels, [`Geometry::input_gradient_as_convolution`]), on the same kernel.
//! - Weight gradient: `dW[co, ci, kh, kw] = Σ_{n, oh, ow} dy[n, co, oh, ow] · x̃[n, ci, oh + kh, ow + kw]`,
//!   accumulated per vector lane over a segment of the batch, the lanes and then the segments summed in
//!   a fixed order, so the result is bit-identical for a given thread count (used for few channels:
//!   see [`computes_weight_gradient`]).
//!
//! Rows a whole number of vectors long are read in place from the padded planes. Rows half a vector
//! long (8×8 planes on AVX-512) are read from three copies of each padded plane shifted by one column
//! each ([`Layout::RowPairs`]), in which two rows are one vector.
//!
//! The kernels are written once over a small [`Vector`] trait (load, store, broadcast, fused
//! multiply-add), with the tile's accumulators in fixed-size arrays the compiler keeps in registers, and
//! compiled for AVX-512 (16 lanes) and for AVX2 with FMA (8 lanes); which one runs is decided from the
//! processor's features at run time. Without either, or for other shapes, the caller uses `im2col`.

use std::mem::MaybeUninit;
use std::sync::OnceLock;

use rayon::prelude::*;

use super::{resized, with_scratch, Geometry};

/// Convolutions with more channels than this on either side use `im2col` (or Winograd's algorithm):
/// measured no slower there up to 128 channels (64 and 128 on 32×32 and 16×16 planes), and untried
/// beyond.
pub(super) const MAX_CHANNELS: usize = 128;

/// The vector instructions a kernel is compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Isa {
    /// 16 lanes of f32, 32 vector registers.
    Avx512,
    /// 8 lanes of f32, 16 vector registers, fused multiply-add.
    Avx2,
}

/// The environment variable that caps the vector instructions the direct kernels use: `avx2` runs the
/// AVX2 kernels on a processor with AVX-512 (to check or compare them on one machine), `none` turns the
/// direct kernels off (every convolution then takes `im2col`).
pub const VECTOR_VARIABLE: &str = "SWA_CPU_VECTOR";

impl Isa {
    /// The best the processor this runs on has, capped by [`VECTOR_VARIABLE`], decided once.
    fn detected() -> Option<Isa> {
        static DETECTED: OnceLock<Option<Isa>> = OnceLock::new();
        *DETECTED.get_or_init(|| {
            let cap = std::env::var(VECTOR_VARIABLE).ok();
            let best = Isa::best_available();
            match cap.as_deref().map(str::trim) {
                Some("none") => None,
                Some("avx2") => best.map(|_| Isa::Avx2),
                _ => best,
            }
        })
    }

    fn best_available() -> Option<Isa> {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma");
            if std::arch::is_x86_feature_detected!("avx512f") && avx2 {
                return Some(Isa::Avx512);
            }
            if avx2 {
                return Some(Isa::Avx2);
            }
        }
        None
    }

    fn lanes(self) -> usize {
        match self {
            Isa::Avx512 => 16,
            Isa::Avx2 => 8,
        }
    }
}

/// Output channels of a forward tile, for each instruction set: with two rows of one vector each, the
/// accumulators take 16 of AVX-512's 32 registers and 8 of AVX2's 16.
const FORWARD_CHANNELS_512: usize = 8;
const FORWARD_CHANNELS_256: usize = 4;
/// Output rows of a forward tile.
const FORWARD_ROWS: usize = 2;
/// Pixels a weight-gradient tile covers (in whole images) between loading and storing its sums.
const GRADIENT_GROUP_PIXELS: usize = 1024;
/// Output channels of a weight-gradient tile: nine accumulators (one per kernel position) each.
const GRADIENT_CHANNELS_512: usize = 2;
const GRADIENT_CHANNELS_256: usize = 1;

/// The instruction set to run `g` with, when it runs here: a 3×3 stride-1 convolution with padding 1,
/// at most [`MAX_CHANNELS`] channels on either side, on a processor with AVX-512 or AVX2, with rows a
/// whole number of vectors long or half a vector long in pairs (an even height: see
/// [`Layout::RowPairs`]).
pub(super) fn fits(g: &Geometry) -> Option<Isa> {
    let isa = Isa::detected()?;
    (g.kernel == 3
        && g.stride == 1
        && g.padding == 1
        && g.in_channels.max(g.out_channels) <= MAX_CHANNELS
        && Layout::for_geometry(isa, g).is_some())
    .then_some(isa)
}

/// Whether [`weight_gradient`] should compute the weight gradient of `g` (which [`fits`] with `isa`):
/// on rows a whole number of vectors long with few channels, at most [`GRADIENT_MAX_CHANNELS`], or
/// [`GRADIENT_MAX_CHANNELS_LARGE_PLANE`] on planes of [`GRADIENT_LARGE_PLANE`] pixels or more. With
/// more channels `im2col`'s GEMM was measured faster (batch 128, 2 threads, AVX-512, dW only: 32
/// channels on 16×16 3.6 against 4.6 ms, 64 on 16×16 12 against 20 ms, 64 on 32×32 46 against 72 ms;
/// both gradients, 40→41 on 16×16 11.3 against 12.0 ms), although the forward pass and the input
/// gradient stay faster here; with fewer, this kernel (both gradients, 16 channels on 32×32 7.4 against
/// 11.1 ms, 24→25 on 32×32 15.9 against 19.5 ms, 30→31 23.3 against 28.8 ms).
pub(super) fn computes_weight_gradient(isa: Isa, g: &Geometry) -> bool {
    let channels = g.in_channels.max(g.out_channels);
    Layout::for_geometry(isa, g) == Some(Layout::Padded)
        && (channels <= GRADIENT_MAX_CHANNELS
            || (channels <= GRADIENT_MAX_CHANNELS_LARGE_PLANE
                && g.height * g.width >= GRADIENT_LARGE_PLANE))
}

/// See [`computes_weight_gradient`].
const GRADIENT_MAX_CHANNELS: usize = 16;
/// See [`computes_weight_gradient`].
const GRADIENT_MAX_CHANNELS_LARGE_PLANE: usize = 32;
/// See [`computes_weight_gradient`]: 32×32, CIFAR's full resolution.
const GRADIENT_LARGE_PLANE: usize = 1024;

/// How the kernels see one image's input planes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    /// Zero-padded planes `[H + 2 + extra][W + 2]`, the image at row 1, column 1: for rows a whole
    /// number of vectors long, each vector a piece of one row.
    Padded,
    /// For rows half a vector long (8 columns on AVX-512, PreResNet's 8×8 stage):
    /// per channel, the zero-padded plane three times, shifted left by kernel column 0, 1 and 2 and cut
    /// to `W` columns, `[3][H + 2 + extra][W]`. Two consecutive rows are then one contiguous vector, so
    /// a vector holds two output rows and, for each kernel position, its inputs are one load.
    RowPairs,
}

impl Layout {
    fn for_geometry(isa: Isa, g: &Geometry) -> Option<Layout> {
        if g.width.is_multiple_of(isa.lanes()) {
            Some(Layout::Padded)
        } else if 2 * g.width == isa.lanes() && g.height.is_multiple_of(2) {
            Some(Layout::RowPairs)
        } else {
            None
        }
    }

    /// Output rows one vector covers.
    fn rows_per_vector(self) -> usize {
        match self {
            Layout::Padded => 1,
            Layout::RowPairs => 2,
        }
    }

    /// The plan of one image of `height × width` with `extra` rows of zeros below the padding.
    fn plan(
        self,
        in_channels: usize,
        out_channels: usize,
        height: usize,
        width: usize,
        extra_rows: usize,
    ) -> Plan {
        let rows = height + 2 + extra_rows;
        let (pitch, kw_step, padded_plane) = match self {
            Layout::Padded => (width + 2, 1, rows * (width + 2)),
            Layout::RowPairs => (width, rows * width, 3 * rows * width),
        };
        Plan {
            in_channels,
            out_channels,
            height,
            width,
            layout: self,
            pitch,
            kw_step,
            extra_rows,
            padded_plane,
            weight_stride: 0,
        }
    }
}

/// The zero-padded planes of one image: `[channels][height + 2 + extra][width + 2]`, the image at row 1,
/// column 1. `extra` rows of zeros below let a tile of several rows run past the last row.
fn pad_image(
    image: &[f32],
    channels: usize,
    height: usize,
    width: usize,
    extra: usize,
    out: &mut [f32],
) {
    let pitch = width + 2;
    let rows = height + 2 + extra;
    for (c, padded) in out
        .chunks_exact_mut(rows * pitch)
        .take(channels)
        .enumerate()
    {
        let plane = &image[c * height * width..][..height * width];
        padded[..pitch].fill(0.0);
        for (row, src) in padded[pitch..]
            .chunks_exact_mut(pitch)
            .zip(plane.chunks_exact(width))
        {
            row[0] = 0.0;
            // Eight values at a time: the width is a whole number of vectors, and a copy of a fixed
            // size compiles to vector moves where a row-long `copy_from_slice` would call `memmove`
            // once per row (a third of a small plane's padding time).
            for (to, from) in row[1..=width].chunks_exact_mut(8).zip(src.chunks_exact(8)) {
                to.copy_from_slice(from);
            }
            row[width + 1] = 0.0;
        }
        padded[(height + 1) * pitch..].fill(0.0);
    }
}

/// One image's input planes in the plan's layout, into `out` (`Cin` planes of `padded_plane` values).
fn lay_out_image(p: &Plan, image: &[f32], out: &mut [f32]) {
    match p.layout {
        Layout::Padded => pad_image(image, p.in_channels, p.height, p.width, p.extra_rows, out),
        Layout::RowPairs => shift_image(p, image, out),
    }
}

/// [`Layout::RowPairs`]: `out[c][kw][h][w]` = the padded plane's `[h][w + kw]`.
fn shift_image(p: &Plan, image: &[f32], out: &mut [f32]) {
    let (height, width) = (p.height, p.width);
    for (c, planes) in out
        .chunks_exact_mut(p.padded_plane)
        .take(p.in_channels)
        .enumerate()
    {
        let plane = &image[c * height * width..][..height * width];
        for (kw, shifted) in planes.chunks_exact_mut(p.kw_step).enumerate() {
            shifted[..width].fill(0.0);
            for (row, src) in shifted[width..]
                .chunks_exact_mut(width)
                .zip(plane.chunks_exact(width))
            {
                // Padded column `w + kw` is image column `w + kw − 1`, zero outside the image.
                match kw {
                    0 => {
                        row[0] = 0.0;
                        row[1..].copy_from_slice(&src[..width - 1]);
                    }
                    1 => row.copy_from_slice(src),
                    _ => {
                        row[..width - 1].copy_from_slice(&src[1..]);
                        row[width - 1] = 0.0;
                    }
                }
            }
            shifted[(height + 1) * width..].fill(0.0);
        }
    }
}

/// `w` `[Cout, Cin, 3, 3]` as `[Cin][3][3][Cout rounded up to tile]`: a tile's output channels adjacent,
/// the rounding zero.
fn pack_weights(
    w: &[f32],
    out_channels: usize,
    in_channels: usize,
    tile: usize,
) -> (Vec<f32>, usize) {
    let stride = out_channels.div_ceil(tile) * tile;
    let mut packed = vec![0.0; in_channels * 9 * stride];
    for co in 0..out_channels {
        for ci in 0..in_channels {
            for k in 0..9 {
                packed[(ci * 9 + k) * stride + co] = w[(co * in_channels + ci) * 9 + k];
            }
        }
    }
    (packed, stride)
}

/// The shape of one image's pass and the layout of its input.
#[derive(Clone, Copy, Debug)]
struct Plan {
    in_channels: usize,
    out_channels: usize,
    height: usize,
    width: usize,
    /// How the input planes are laid out.
    layout: Layout,
    /// Distance between consecutive rows of the input planes.
    pitch: usize,
    /// Distance between the inputs of consecutive kernel columns (1, or a shifted plane's size).
    kw_step: usize,
    /// Rows of zeros below the bottom padding row, for tiles that run past the last row.
    extra_rows: usize,
    /// Values per channel of the laid-out input.
    padded_plane: usize,
    /// Row stride of the packed weights (output channels rounded up to the tile).
    weight_stride: usize,
}

impl Plan {
    /// Whether the plan's layout holds every value the kernels read: rows `rows_read` past the top
    /// padding row (the caller's tile shape sets that) and, per row, one vector from each kernel column.
    fn covers(&self, lanes: usize, rows_read: usize) -> bool {
        let rows = self.height + 2 + self.extra_rows;
        let layout_fits = match self.layout {
            Layout::Padded => {
                self.width.is_multiple_of(lanes)
                    && self.kw_step == 1
                    && self.pitch >= self.width + 2
                    && self.padded_plane >= rows * self.pitch
            }
            Layout::RowPairs => {
                2 * self.width == lanes
                    && self.height.is_multiple_of(2)
                    && self.pitch == self.width
                    && self.kw_step >= rows * self.width
                    && self.padded_plane >= 3 * self.kw_step
            }
        };
        layout_fits && rows_read <= rows
    }
}

/// Vector operations on `LANES` f32 values, for one instruction set. Every function is unsafe: it
/// may only run on a processor with that instruction set, and its pointers must be valid for `LANES`
/// values.
trait Vector: Copy {
    const LANES: usize;
    unsafe fn zero() -> Self;
    unsafe fn splat(value: f32) -> Self;
    unsafe fn load(from: *const f32) -> Self;
    unsafe fn store(self, to: *mut f32);
    /// `self + a · b`, rounded once.
    unsafe fn fma(self, a: Self, b: Self) -> Self;
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::Vector;

    /// 16 lanes in one AVX-512 register.
    #[derive(Clone, Copy)]
    pub(super) struct V512(__m512);

    impl Vector for V512 {
        const LANES: usize = 16;
        #[inline(always)]
        unsafe fn zero() -> Self {
            unsafe { V512(_mm512_setzero_ps()) }
        }
        #[inline(always)]
        unsafe fn splat(value: f32) -> Self {
            unsafe { V512(_mm512_set1_ps(value)) }
        }
        #[inline(always)]
        unsafe fn load(from: *const f32) -> Self {
            unsafe { V512(_mm512_loadu_ps(from)) }
        }
        #[inline(always)]
        unsafe fn store(self, to: *mut f32) {
            unsafe { _mm512_storeu_ps(to, self.0) }
        }
        #[inline(always)]
        unsafe fn fma(self, a: Self, b: Self) -> Self {
            unsafe { V512(_mm512_fmadd_ps(a.0, b.0, self.0)) }
        }
    }

    /// 8 lanes in one AVX2 register.
    #[derive(Clone, Copy)]
    pub(super) struct V256(__m256);

    impl Vector for V256 {
        const LANES: usize = 8;
        #[inline(always)]
        unsafe fn zero() -> Self {
            unsafe { V256(_mm256_setzero_ps()) }
        }
        #[inline(always)]
        unsafe fn splat(value: f32) -> Self {
            unsafe { V256(_mm256_set1_ps(value)) }
        }
        #[inline(always)]
        unsafe fn load(from: *const f32) -> Self {
            unsafe { V256(_mm256_loadu_ps(from)) }
        }
        #[inline(always)]
        unsafe fn store(self, to: *mut f32) {
            unsafe { _mm256_storeu_ps(to, self.0) }
        }
        #[inline(always)]
        unsafe fn fma(self, a: Self, b: Self) -> Self {
            unsafe { V256(_mm256_fmadd_ps(a.0, b.0, self.0)) }
        }
    }
}

/// The forward pass of one laid-out image into `y` `[Cout, H, W]`, every element written: tiles of `C`
/// output channels × `R` vectors of `S` rows each (the plan's [`Layout::rows_per_vector`]) × one vector
/// of columns, accumulated in registers.
///
/// # Safety
/// The processor has `V`'s instruction set; `padded` holds `Cin` planes laid out by the plan with
/// `R · S − 1` extra rows, `packed` the weights packed for tiles of `C`, `bias` (when given) `Cout`
/// values and `y` `Cout · H · W` values (all checked by the caller, [`run_forward`]).
#[inline(always)]
#[allow(clippy::needless_range_loop)]
unsafe fn forward_image<V: Vector, const C: usize, const R: usize, const S: usize>(
    p: &Plan,
    padded: &[f32],
    packed: &[f32],
    bias: Option<&[f32]>,
    y: &mut [MaybeUninit<f32>],
) {
    let out_plane = p.height * p.width;
    let (x, w, y) = (
        padded.as_ptr(),
        packed.as_ptr(),
        y.as_mut_ptr().cast::<f32>(),
    );
    for co0 in (0..p.out_channels).step_by(C) {
        let channels = C.min(p.out_channels - co0);
        for oh0 in (0..p.height).step_by(R * S) {
            let rows = R.min((p.height - oh0).div_ceil(S));
            for col in (0..p.width).step_by(V::LANES) {
                // SAFETY: every offset below stays inside the slices, by the function's contract: input
                // rows `oh0 + r·S + kh + S − 1 ≤ H + 1 + (R·S − 1)` of each laid-out plane and, per row,
                // one vector from each kernel column's position; packed rows of `weight_stride ≥ co0 + C`
                // values; output channels below `Cout` and the `rows` vectors' rows below `H`.
                unsafe {
                    let mut acc = [[V::zero(); R]; C];
                    if let Some(bias) = bias {
                        for j in 0..channels {
                            acc[j] = [V::splat(bias[co0 + j]); R];
                        }
                    }
                    for ci in 0..p.in_channels {
                        let plane = x.add(ci * p.padded_plane + oh0 * p.pitch + col);
                        for kh in 0..3 {
                            for kw in 0..3 {
                                let weights = w.add((ci * 9 + kh * 3 + kw) * p.weight_stride + co0);
                                let mut xv = [V::zero(); R];
                                for r in 0..R {
                                    xv[r] =
                                        V::load(plane.add((r * S + kh) * p.pitch + kw * p.kw_step));
                                }
                                for j in 0..C {
                                    let wj = V::splat(*weights.add(j));
                                    for r in 0..R {
                                        acc[j][r] = acc[j][r].fma(wj, xv[r]);
                                    }
                                }
                            }
                        }
                    }
                    for j in 0..channels {
                        for r in 0..rows {
                            acc[j][r].store(
                                y.add((co0 + j) * out_plane + (oh0 + r * S) * p.width + col),
                            );
                        }
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn forward_image_avx512(
    p: &Plan,
    padded: &[f32],
    packed: &[f32],
    bias: Option<&[f32]>,
    y: &mut [MaybeUninit<f32>],
) {
    const C: usize = FORWARD_CHANNELS_512;
    // SAFETY: forwarded from the caller.
    unsafe {
        match p.layout {
            Layout::Padded => {
                forward_image::<x86::V512, C, FORWARD_ROWS, 1>(p, padded, packed, bias, y)
            }
            Layout::RowPairs => {
                forward_image::<x86::V512, C, FORWARD_ROWS, 2>(p, padded, packed, bias, y)
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn forward_image_avx2(
    p: &Plan,
    padded: &[f32],
    packed: &[f32],
    bias: Option<&[f32]>,
    y: &mut [MaybeUninit<f32>],
) {
    const C: usize = FORWARD_CHANNELS_256;
    // SAFETY: forwarded from the caller.
    unsafe {
        match p.layout {
            Layout::Padded => {
                forward_image::<x86::V256, C, FORWARD_ROWS, 1>(p, padded, packed, bias, y)
            }
            Layout::RowPairs => {
                forward_image::<x86::V256, C, FORWARD_ROWS, 2>(p, padded, packed, bias, y)
            }
        }
    }
}

/// `conv(x, w) + bias` `[N, Cout, H, W]` for a geometry that [`fits`] with `isa`. The output is
/// written once, never zeroed first: the tiles cover every element.
pub(super) fn forward(
    isa: Isa,
    g: &Geometry,
    w: &[f32],
    x: &[f32],
    bias: Option<&[f32]>,
) -> Vec<f32> {
    let len = g.batch * g.out_image();
    let mut output = Vec::with_capacity(len);
    let y = &mut output.spare_capacity_mut()[..len];
    let tile = match isa {
        Isa::Avx512 => FORWARD_CHANNELS_512,
        Isa::Avx2 => FORWARD_CHANNELS_256,
    };
    let (packed, weight_stride) = pack_weights(w, g.out_channels, g.in_channels, tile);
    let layout = Layout::for_geometry(isa, g).expect("the caller checked that the geometry fits");
    let plan = Plan {
        weight_stride,
        ..layout.plan(
            g.in_channels,
            g.out_channels,
            g.height,
            g.width,
            FORWARD_ROWS * layout.rows_per_vector() - 1,
        )
    };
    y.par_chunks_mut(g.out_image())
        .zip(x.par_chunks(g.in_image()))
        .for_each(|(y_image, x_image)| {
            with_scratch(|scratch| {
                let padded = resized(&mut scratch.col, g.in_channels * plan.padded_plane);
                lay_out_image(&plan, x_image, padded);
                run_forward(isa, &plan, padded, &packed, bias, y_image);
            })
        });
    // SAFETY: the images' chunks cover the `len` values, and `run_forward` wrote all of each chunk: its
    // tiles step over every output channel, every row and (the width being a whole number of vectors, or
    // half a vector with an even height) every column, storing each tile's channels below `Cout` and rows
    // below `H`.
    unsafe { output.set_len(len) };
    output
}

fn run_forward(
    isa: Isa,
    p: &Plan,
    padded: &[f32],
    packed: &[f32],
    bias: Option<&[f32]>,
    y: &mut [MaybeUninit<f32>],
) {
    let tile = match isa {
        Isa::Avx512 => FORWARD_CHANNELS_512,
        Isa::Avx2 => FORWARD_CHANNELS_256,
    };
    // The kernels' contract, which every caller meets by construction: checked once per image, so
    // that a mistake here cannot turn into an access outside the buffers.
    let s = p.layout.rows_per_vector();
    assert!(
        p.covers(isa.lanes(), p.height + 1 + FORWARD_ROWS * s)
            && padded.len() >= p.in_channels * p.padded_plane
            && p.weight_stride >= p.out_channels.div_ceil(tile) * tile
            && packed.len() >= p.in_channels * 9 * p.weight_stride
            && bias.is_none_or(|b| b.len() >= p.out_channels)
            && y.len() >= p.out_channels * p.height * p.width,
        "direct convolution: buffers do not match the plan {p:?}"
    );
    match isa {
        // SAFETY: `Isa::detected` returned this instruction set only after the processor reported the
        // features the function is compiled for.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { forward_image_avx512(p, padded, packed, bias, y) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { forward_image_avx2(p, padded, packed, bias, y) },
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!("no vector instruction set is detected off x86-64"),
    }
}

/// Adds `images` padded images' contributions to the per-lane weight-gradient sums `lanes`
/// `[Cout rounded up to C][Cin][9][LANES]`: tiles of `C` output channels × one input channel × the nine
/// kernel positions, accumulated in registers over the images' rows and columns.
///
/// # Safety
/// The processor has `V`'s instruction set; `padded` holds `images` images of `Cin` planes in the
/// [`Layout::Padded`] layout with one extra row, `dy` `images · Cout · H · W` values, `lanes` `Cout
/// rounded up to C · Cin · 9 · LANES` values and `zeros` at least `W` zeros (all checked by the caller,
/// [`weight_gradient`]).
#[inline(always)]
#[allow(clippy::needless_range_loop)]
unsafe fn gradient_image<V: Vector, const C: usize>(
    p: &Plan,
    images: usize,
    padded: &[f32],
    dy: &[f32],
    lanes: &mut [f32],
    zeros: &[f32],
) {
    let out_plane = p.height * p.width;
    let block = 9 * V::LANES;
    // Rows past the last (an odd height) and channels past the last (the tile's rounding) read the row
    // of `zeros`, so that every load of the inner loop is unconditional and the gradients stay in
    // registers.
    let (x, dy, lanes) = (padded.as_ptr(), dy.as_ptr(), lanes.as_mut_ptr());
    // Input channels outermost: one input channel's planes of the group stay in the first-level cache
    // while every tile of output channels reads them (the other way round, each tile re-read them from
    // the second level, whose bandwidth then bounded the kernel).
    for ci in 0..p.in_channels {
        for co0 in (0..p.out_channels).step_by(C) {
            let channels = C.min(p.out_channels - co0);
            // SAFETY: by the function's contract: images below `images`, input rows
            // `oh + t ≤ H + 2` and columns `col + kw + LANES ≤ W + 2` of each padded plane, output
            // gradient rows below `H` of channels below `Cout` (or the row of zeros, `W` long), and
            // sums of output channels below `Cout` rounded up to `C`.
            unsafe {
                let mut acc = [[V::zero(); 9]; C];
                for j in 0..C {
                    for k in 0..9 {
                        acc[j][k] = V::load(
                            lanes.add(((co0 + j) * p.in_channels + ci) * block + k * V::LANES),
                        );
                    }
                }
                for image in 0..images {
                    let plane = x.add((image * p.in_channels + ci) * p.padded_plane);
                    let dy = dy.add(image * p.out_channels * out_plane);
                    // Two output rows at a time: padded input rows `oh .. oh + 4` each serve both
                    // rows (the first with kernel rows `t`, the second with `t − 1`), so every input
                    // vector is loaded once for up to six products per output channel.
                    for oh in (0..p.height).step_by(2) {
                        let mut rows = [[zeros.as_ptr(); 2]; C];
                        for (j, rows) in rows.iter_mut().enumerate().take(channels) {
                            rows[0] = dy.add((co0 + j) * out_plane + oh * p.width);
                            if oh + 1 < p.height {
                                rows[1] = rows[0].add(p.width);
                            }
                        }
                        for col in (0..p.width).step_by(V::LANES) {
                            let mut dyv = [[V::zero(); 2]; C];
                            for j in 0..C {
                                dyv[j] =
                                    [V::load(rows[j][0].add(col)), V::load(rows[j][1].add(col))];
                            }
                            for t in 0..4 {
                                for kw in 0..3 {
                                    let xv = V::load(plane.add((oh + t) * p.pitch + col + kw));
                                    for j in 0..C {
                                        if t < 3 {
                                            acc[j][t * 3 + kw] =
                                                acc[j][t * 3 + kw].fma(dyv[j][0], xv);
                                        }
                                        if t > 0 {
                                            let k = (t - 1) * 3 + kw;
                                            acc[j][k] = acc[j][k].fma(dyv[j][1], xv);
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
                for j in 0..C {
                    for k in 0..9 {
                        acc[j][k].store(
                            lanes.add(((co0 + j) * p.in_channels + ci) * block + k * V::LANES),
                        );
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn gradient_image_avx512(
    p: &Plan,
    images: usize,
    padded: &[f32],
    dy: &[f32],
    lanes: &mut [f32],
    zeros: &[f32],
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        gradient_image::<x86::V512, GRADIENT_CHANNELS_512>(p, images, padded, dy, lanes, zeros)
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gradient_image_avx2(
    p: &Plan,
    images: usize,
    padded: &[f32],
    dy: &[f32],
    lanes: &mut [f32],
    zeros: &[f32],
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        gradient_image::<x86::V256, GRADIENT_CHANNELS_256>(p, images, padded, dy, lanes, zeros)
    }
}

/// The weight gradient `[Cout, Cin, 3, 3]` of a geometry for which [`computes_weight_gradient`] holds
/// with `isa`, from the input `x` and the output gradient `dy`.
pub(super) fn weight_gradient(isa: Isa, g: &Geometry, x: &[f32], dy: &[f32]) -> Vec<f32> {
    let (lanes_n, tile) = match isa {
        Isa::Avx512 => (16, GRADIENT_CHANNELS_512),
        Isa::Avx2 => (8, GRADIENT_CHANNELS_256),
    };
    let rounded = g.out_channels.div_ceil(tile) * tile;
    // One extra row of zeros: the last pair of output rows reads padded row `H + 2` when `H` is odd.
    let plan = Layout::Padded.plan(g.in_channels, g.out_channels, g.height, g.width, 1);
    let zeros = vec![0.0f32; g.width];
    let lanes_len = rounded * g.in_channels * 9 * lanes_n;
    // Fixed segments of the batch, each summed in order into its own lanes, then the segments in order.
    let threads = rayon::current_num_threads().max(1);
    let per_segment = g.batch.div_ceil(threads).max(1);
    let segments = g.batch.div_ceil(per_segment);
    let mut partials = vec![0.0f32; segments * lanes_len];
    // Images whose sums a tile accumulates in registers before storing them: on small planes one image
    // is too few pixels to pay for loading and storing a tile's sums.
    let group = (GRADIENT_GROUP_PIXELS / (g.height * g.width).max(1)).clamp(1, per_segment);
    // The kernels' contract (see `run_forward`), for the buffers this function sizes itself.
    assert!(
        plan.covers(isa.lanes(), g.height + 3)
            && x.len() >= g.batch * g.in_image()
            && dy.len() >= g.batch * g.out_image(),
        "direct convolution: buffers do not match the plan {plan:?}"
    );
    partials
        .par_chunks_mut(lanes_len)
        .enumerate()
        .for_each(|(s, lanes)| {
            with_scratch(|scratch| {
                let padded_image = g.in_channels * plan.padded_plane;
                let padded = resized(&mut scratch.col, group * padded_image);
                let first = s * per_segment;
                let last = (first + per_segment).min(g.batch);
                for n0 in (first..last).step_by(group) {
                    let images = group.min(last - n0);
                    let x_group = &x[n0 * g.in_image()..][..images * g.in_image()];
                    let dy_group = &dy[n0 * g.out_image()..][..images * g.out_image()];
                    for (image, into) in x_group
                        .chunks_exact(g.in_image())
                        .zip(padded.chunks_exact_mut(padded_image))
                    {
                        lay_out_image(&plan, image, into);
                    }
                    match isa {
                        // SAFETY: as in `run_forward`; the group's `images` padded images and output
                        // gradients are the slices' first.
                        #[cfg(target_arch = "x86_64")]
                        Isa::Avx512 => unsafe {
                            gradient_image_avx512(&plan, images, padded, dy_group, lanes, &zeros)
                        },
                        #[cfg(target_arch = "x86_64")]
                        Isa::Avx2 => unsafe {
                            gradient_image_avx2(&plan, images, padded, dy_group, lanes, &zeros)
                        },
                        #[cfg(not(target_arch = "x86_64"))]
                        _ => unreachable!("no vector instruction set is detected off x86-64"),
                    }
                }
            })
        });
    let (sum, rest) = partials.split_at_mut(lanes_len);
    for partial in rest.chunks_exact(lanes_len) {
        for (d, p) in sum.iter_mut().zip(partial) {
            *d += *p;
        }
    }
    let mut dw = Vec::with_capacity(g.out_channels * g.in_channels * 9);
    for lanes in sum
        .chunks_exact(lanes_n)
        .take(g.out_channels * g.in_channels * 9)
    {
        dw.push(lanes.iter().sum::<f32>());
    }
    dw
}
