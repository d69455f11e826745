//! torchvision's ImageNet transforms on decoded RGB images: `RandomResizedCrop` (its crop sampler
//! and Pillow's bilinear resampling) for training, and `Resize` of the shorter side followed by
//! `CenterCrop` for evaluation.
//!
//! torchvision applies these transforms to PIL images, so the resampling here is Pillow's
//! (`Image.resize` with `BILINEAR`, as in `libImaging/Resample.c`): a triangle filter whose support
//! widens with the reduction factor (so downscaling averages every source pixel, i.e. it
//! antialiases), separable, horizontal pass first, with Pillow's 22-bit fixed-point weights and a
//! rounding to bytes after each pass. The same weights and rounding give the same bytes as Pillow.

use image::RgbImage;
use rand::Rng;

use crate::error::{DataError, Result};

/// A rectangle of an image, in pixels: rows `top..top + height`, columns `left..left + width`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropBox {
    /// First row.
    pub top: u32,
    /// First column.
    pub left: u32,
    /// Rows.
    pub height: u32,
    /// Columns.
    pub width: u32,
}

impl CropBox {
    /// The whole of an image `width × height`.
    pub fn full(width: u32, height: u32) -> Self {
        CropBox {
            top: 0,
            left: 0,
            height,
            width,
        }
    }

    /// Whether the box is non-empty and lies inside an image `width × height`.
    pub fn fits_in(&self, width: u32, height: u32) -> bool {
        self.width > 0
            && self.height > 0
            && u64::from(self.left) + u64::from(self.width) <= u64::from(width)
            && u64::from(self.top) + u64::from(self.height) <= u64::from(height)
    }
}

/// torchvision's `RandomResizedCrop` crop sampler (`RandomResizedCrop.get_params`): up to
/// [`RandomResizedCrop::ATTEMPTS`] draws of an area fraction (uniform in `scale`) and an aspect
/// ratio (log-uniform in `ratio`), the first that fits placed uniformly; otherwise the central crop
/// of the whole image clamped to the ratio range.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RandomResizedCrop {
    /// Range of the crop's area as a fraction of the image's, `(min, max)`.
    pub scale: (f64, f64),
    /// Range of the crop's aspect ratio (width / height), `(min, max)`.
    pub ratio: (f64, f64),
}

impl RandomResizedCrop {
    /// Draws tried before the central-crop fallback, as torchvision.
    pub const ATTEMPTS: usize = 10;

    /// torchvision's defaults: scale (0.08, 1.0), ratio (3/4, 4/3).
    pub const IMAGENET: RandomResizedCrop = RandomResizedCrop {
        scale: (0.08, 1.0),
        ratio: (3.0 / 4.0, 4.0 / 3.0),
    };

    /// Checks that both ranges are finite, positive (scale may start at 0) and ordered, and that
    /// the area fraction is at most 1.
    pub fn validate(&self) -> Result<()> {
        let (s0, s1) = self.scale;
        let (r0, r1) = self.ratio;
        let ordered = |a: f64, b: f64| a.is_finite() && b.is_finite() && a <= b;
        if !(ordered(s0, s1) && s0 >= 0.0 && s1 > 0.0 && s1 <= 1.0) {
            return Err(DataError::InvalidConfig(format!(
                "random resized crop scale ({s0}, {s1}): expected 0 <= min <= max <= 1 and max > 0"
            )));
        }
        if !(ordered(r0, r1) && r0 > 0.0) {
            return Err(DataError::InvalidConfig(format!(
                "random resized crop ratio ({r0}, {r1}): expected 0 < min <= max"
            )));
        }
        Ok(())
    }

    /// The crop of an image `width × height` (both ≥ 1) drawn from `rng`; always inside the image
    /// and at least one pixel wide and high.
    ///
    /// torchvision draws in single precision with `torch`'s generator; here the same
    /// distributions are drawn in double precision, and Python's `round` (half to even) is kept.
    pub fn sample<R: Rng + ?Sized>(&self, width: u32, height: u32, rng: &mut R) -> CropBox {
        let (w_img, h_img) = (f64::from(width), f64::from(height));
        let area = w_img * h_img;
        let (log_r0, log_r1) = (self.ratio.0.ln(), self.ratio.1.ln());
        for _ in 0..Self::ATTEMPTS {
            let target_area = area * uniform(rng, self.scale.0, self.scale.1);
            let aspect_ratio = uniform(rng, log_r0, log_r1).exp();
            let w = (target_area * aspect_ratio).sqrt().round_ties_even();
            let h = (target_area / aspect_ratio).sqrt().round_ties_even();
            if 0.0 < w && w <= w_img && 0.0 < h && h <= h_img {
                // Both are whole numbers in 1..=width (height), so the casts are exact.
                let (w, h) = (w as u32, h as u32);
                let top = rng.random_range(0..=height - h);
                let left = rng.random_range(0..=width - w);
                return CropBox {
                    top,
                    left,
                    height: h,
                    width: w,
                };
            }
        }
        self.fallback(width, height)
    }

    /// torchvision's fallback: the whole image, cut to the nearest ratio bound when its own ratio
    /// lies outside the range, centred (rounding the offset down).
    pub fn fallback(&self, width: u32, height: u32) -> CropBox {
        let in_ratio = f64::from(width) / f64::from(height);
        let (w, h) = if in_ratio < self.ratio.0 {
            let h = (f64::from(width) / self.ratio.0).round_ties_even();
            (width, clamp_side(h, height))
        } else if in_ratio > self.ratio.1 {
            let w = (f64::from(height) * self.ratio.1).round_ties_even();
            (clamp_side(w, width), height)
        } else {
            (width, height)
        };
        CropBox {
            top: (height - h) / 2,
            left: (width - w) / 2,
            height: h,
            width: w,
        }
    }
}

/// A rounded side clamped to `1..=limit`: the rounding cannot exceed `limit` (the ratio test
/// bounds it), and clamping to 1 keeps a degenerate ratio range from giving an empty crop.
fn clamp_side(side: f64, limit: u32) -> u32 {
    side.clamp(1.0, f64::from(limit)) as u32
}

/// `torch.empty(1).uniform_(low, high)`: `low + (high - low) · u` with `u` uniform in [0, 1).
fn uniform<R: Rng + ?Sized>(rng: &mut R, low: f64, high: f64) -> f64 {
    low + (high - low) * rng.random::<f64>()
}

/// The size torchvision's `Resize(shorter)` gives an image `width × height`: the shorter side
/// becomes `shorter`, the longer `int(shorter · long / short)` (truncated, as Python's `int`).
pub fn shorter_side_size(width: u32, height: u32, shorter: u32) -> (u32, u32) {
    let (short, long) = if width <= height {
        (width, height)
    } else {
        (height, width)
    };
    let new_long = (f64::from(shorter) * f64::from(long) / f64::from(short)) as u32;
    if width <= height {
        (shorter, new_long)
    } else {
        (new_long, shorter)
    }
}

/// torchvision's `CenterCrop(size)` box in an image `width × height` at least `size` on each side:
/// offsets `int(round((side - size) / 2))`, Python's round (half to even).
pub fn center_crop_box(width: u32, height: u32, size: u32) -> CropBox {
    let offset = |side: u32| (f64::from(side - size) / 2.0).round_ties_even() as u32;
    CropBox {
        top: offset(height),
        left: offset(width),
        height: size,
        width: size,
    }
}

/// torchvision's training crop-and-resize: the `crop` of `image` resized to `size × size` with
/// Pillow's bilinear filter (`F.resized_crop`: crop, then `Image.resize`).
///
/// `crop` must lie inside the image (as [`RandomResizedCrop::sample`] guarantees).
pub fn resized_crop(image: &RgbImage, crop: CropBox, size: u32) -> RgbImage {
    resample(image, crop, (size, size), CropBox::full(size, size))
}

/// torchvision's evaluation transform: the shorter side resized to `resize` (Pillow's bilinear),
/// then the central `crop × crop` square. `crop` must not exceed `resize`.
///
/// Only the output pixels inside the central square are computed; each output pixel depends only
/// on its own filter weights, so the result equals resizing everything and cropping afterwards.
pub fn resize_center_crop(image: &RgbImage, resize: u32, crop: u32) -> RgbImage {
    let (width, height) = image.dimensions();
    let resized = shorter_side_size(width, height, resize);
    let window = center_crop_box(resized.0, resized.1, crop);
    resample(image, CropBox::full(width, height), resized, window)
}

/// Pillow's bits of fixed-point precision for 8-bit images (`PRECISION_BITS`).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Filter taps of one output pixel along one axis: the first source pixel and one fixed-point
/// weight per source pixel from there.
struct Taps {
    first: usize,
    weights: Vec<i32>,
}

/// Pillow's `precompute_coeffs` for the bilinear (triangle) filter, then
/// `normalize_coeffs_8bpc`: the taps of every output pixel when `in_size` source pixels become
/// `out_size`.
fn taps(in_size: u32, out_size: u32) -> Vec<Taps> {
    let scale = f64::from(in_size) / f64::from(out_size);
    let filter_scale = scale.max(1.0);
    // The triangle filter's support is 1; it widens with the reduction factor.
    let support = filter_scale;
    let triangle = |x: f64| (1.0 - x.abs()).max(0.0);
    (0..out_size)
        .map(|out| {
            let center = (f64::from(out) + 0.5) * scale;
            // C's `(int)` truncation, then clamped to the image.
            let first = ((center - support + 0.5) as i64).max(0);
            let end = ((center + support + 0.5) as i64).min(i64::from(in_size));
            let raw: Vec<f64> = (first..end)
                .map(|x| triangle((x as f64 - center + 0.5) / filter_scale))
                .collect();
            let total: f64 = raw.iter().sum();
            let one = f64::from(1u32 << PRECISION_BITS);
            let weights = raw
                .iter()
                .map(|&w| {
                    let w = if total != 0.0 { w / total } else { w };
                    // Rounds half away from zero, as Pillow's `(int)(±0.5 + w · 2²²)`.
                    (if w < 0.0 {
                        -0.5 + w * one
                    } else {
                        0.5 + w * one
                    }) as i32
                })
                .collect();
            Taps {
                first: first as usize,
                weights,
            }
        })
        .collect()
}

/// Pillow's `clip8`: a fixed-point sum back to a byte.
fn clip8(sum: i32) -> u8 {
    (sum >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Rounding offset every fixed-point sum starts from (one half).
const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// Pillow's two-pass bilinear `resize` of the `source` box of `image` to `out_size`, of which
/// only the `window` is computed and returned.
fn resample(image: &RgbImage, source: CropBox, out_size: (u32, u32), window: CropBox) -> RgbImage {
    const C: usize = 3;
    let stride = image.width() as usize * C;
    let pixels = image.as_raw();
    let h_taps = taps(source.width, out_size.0);
    let v_taps = taps(source.height, out_size.1);
    let columns = &h_taps[window.left as usize..(window.left + window.width) as usize];
    let rows = &v_taps[window.top as usize..(window.top + window.height) as usize];
    let out_row_len = window.width as usize * C;

    // Source rows (relative to the box) the vertical pass reads.
    let first_row = rows.first().map_or(0, |t| t.first);
    let end_row = rows
        .iter()
        .map(|t| t.first + t.weights.len())
        .max()
        .unwrap_or(first_row);

    // Horizontal pass (skipped when it would be the identity, as Pillow does).
    let horizontal_identity = source.width == out_size.0;
    let mut temp = vec![0u8; (end_row - first_row) * out_row_len];
    for (row, temp_row) in (first_row..end_row).zip(temp.chunks_exact_mut(out_row_len)) {
        let start = (source.top as usize + row) * stride + source.left as usize * C;
        let source_row = &pixels[start..start + source.width as usize * C];
        if horizontal_identity {
            let from = window.left as usize * C;
            temp_row.copy_from_slice(&source_row[from..from + out_row_len]);
            continue;
        }
        for (tap, out) in columns.iter().zip(temp_row.chunks_exact_mut(C)) {
            let mut sums = [HALF; C];
            let taps_source = &source_row[tap.first * C..(tap.first + tap.weights.len()) * C];
            for (&weight, pixel) in tap.weights.iter().zip(taps_source.chunks_exact(C)) {
                for (sum, &value) in sums.iter_mut().zip(pixel) {
                    *sum += i32::from(value) * weight;
                }
            }
            for (value, sum) in out.iter_mut().zip(sums) {
                *value = clip8(sum);
            }
        }
    }

    // Vertical pass over the rows of `temp`.
    let mut out = vec![0u8; window.height as usize * out_row_len];
    if source.height == out_size.1 {
        let from = (window.top as usize - first_row) * out_row_len;
        let len = out.len();
        out.copy_from_slice(&temp[from..from + len]);
    } else {
        let mut sums = vec![0i32; out_row_len];
        for (tap, out_row) in rows.iter().zip(out.chunks_exact_mut(out_row_len)) {
            sums.fill(HALF);
            for (offset, &weight) in tap.weights.iter().enumerate() {
                let row = tap.first + offset - first_row;
                let temp_row = &temp[row * out_row_len..(row + 1) * out_row_len];
                for (sum, &value) in sums.iter_mut().zip(temp_row) {
                    *sum += i32::from(value) * weight;
                }
            }
            for (value, &sum) in out_row.iter_mut().zip(&sums) {
                *value = clip8(sum);
            }
        }
    }
    // The buffer has exactly `window.width × window.height × 3` bytes.
    RgbImage::from_raw(window.width, window.height, out)
        .unwrap_or_else(|| RgbImage::new(window.width, window.height))
}
