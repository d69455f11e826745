//! Convolution and GEMM throughput at the shapes of the paper's networks, against the machine's GEMM
//! peak.
//!
//! For each convolution: the forward pass, the weight gradient alone (what the first layer needs), and
//! the input and weight gradients together (what every other layer needs), each counted as
//! `2·N·Cout·Ho·Wo·Cin·K²` FLOPs per pass; the input gradient alone is derived as the difference of the
//! last two. Next to it, the GEMM a convolution lowers to (`[Cout, Cin·K²] · [Cin·K², N·Ho·Wo]`) through
//! the backend's `matmul`, which shows how much the convolution loses to its data movement.
//!
//! The peak is a 2048³ single-precision GEMM from the `gemm` crate with the same threads: what the
//! machine's cores sustain on the best-shaped problem.

use std::time::{Duration, Instant};

use swa_core::backend::Conv2dSpec;

use crate::flops::{conv2d_flops, matmul_flops};
use crate::report::Figure;
use crate::stats::Summary;
use crate::timing::{repeat, TimedBackend};
use crate::workload::seeded_values;
use crate::{rates, BenchError, Recorder};

/// A convolution layer of one of the paper's networks.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ConvShape {
    /// Which network and layer.
    pub name: &'static str,
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Input height and width.
    pub size: usize,
    /// Kernel height and width.
    pub kernel: usize,
}

impl ConvShape {
    /// Stride 1 with "same" padding, as every layer listed here has.
    pub fn spec(&self) -> Conv2dSpec {
        Conv2dSpec {
            stride: 1,
            padding: self.kernel / 2,
        }
    }

    /// FLOPs of one pass at `batch`.
    pub fn flops(&self, batch: usize) -> u64 {
        conv2d_flops(
            batch,
            self.in_channels,
            self.out_channels,
            self.size,
            self.size,
            self.kernel,
            self.spec(),
        )
        .unwrap_or(0)
    }
}

const fn conv(
    name: &'static str,
    in_channels: usize,
    out_channels: usize,
    size: usize,
    kernel: usize,
) -> ConvShape {
    ConvShape {
        name,
        in_channels,
        out_channels,
        size,
        kernel,
    }
}

/// The layers measured: PreResNet-20's 3×3 convolutions at its three widths, PreResNet-164's 1×1
/// bottleneck convolutions (its 3×3 ones are PreResNet-20's), and VGG-16's 3×3 convolutions at each width.
pub const PAPER_SHAPES: [ConvShape; 13] = [
    conv("PreResNet-20 3×3 16→16 @32px", 16, 16, 32, 3),
    conv("PreResNet-20 3×3 32→32 @16px", 32, 32, 16, 3),
    conv("PreResNet-20 3×3 64→64 @8px", 64, 64, 8, 3),
    conv("PreResNet-164 1×1 64→16 @32px", 64, 16, 32, 1),
    conv("PreResNet-164 1×1 16→64 @32px", 16, 64, 32, 1),
    conv("PreResNet-164 1×1 128→32 @16px", 128, 32, 16, 1),
    conv("PreResNet-164 1×1 256→64 @8px", 256, 64, 8, 1),
    conv("PreResNet-164 1×1 64→256 @8px", 64, 256, 8, 1),
    conv("VGG-16 3×3 64→64 @32px", 64, 64, 32, 3),
    conv("VGG-16 3×3 128→128 @16px", 128, 128, 16, 3),
    conv("VGG-16 3×3 256→256 @8px", 256, 256, 8, 3),
    conv("VGG-16 3×3 512→512 @4px", 512, 512, 4, 3),
    conv("VGG-16 3×3 512→512 @2px", 512, 512, 2, 3),
];

/// Side of the square GEMM that measures the peak.
pub const PEAK_SIDE: usize = 2048;

/// GFLOP/s of a `side³` GEMM from the `gemm` crate with `threads` threads: the machine's practical
/// single-precision peak.
pub fn gemm_peak(threads: usize, side: usize, runs: usize) -> Result<Summary, BenchError> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| {
            BenchError::Setup(format!("a {threads}-thread pool for the GEMM peak: {e}"))
        })?;
    let a = seeded_values(side * side, 1);
    let b = seeded_values(side * side, 2);
    let mut c = vec![0f32; side * side];
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    let mut multiply = || {
        pool.install(|| {
            // SAFETY: a, b and c are dense row-major side×side matrices (row stride `side`, column
            // stride 1), so every element gemm touches lies inside its vector; c is borrowed mutably.
            unsafe {
                gemm::gemm(
                    side,
                    side,
                    side,
                    c.as_mut_ptr(),
                    1,
                    side as isize,
                    false,
                    a.as_ptr(),
                    1,
                    side as isize,
                    b.as_ptr(),
                    1,
                    side as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    parallelism,
                );
            }
        })
    };
    multiply();
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        multiply();
        times.push(start.elapsed());
    }
    std::hint::black_box(&c);
    rates(
        matmul_flops(side, side, side) as f64 / 1e9,
        &times,
        "GEMM peak",
    )
}

/// Measures each shape at `batch`: forward, weight gradient, both gradients, the derived input gradient
/// and the lowered GEMM, compared with `peak` (a GFLOP/s median and what it is) when given.
pub fn run<B: TimedBackend>(
    backend: &B,
    suite: &str,
    shapes: &[ConvShape],
    batch: usize,
    runs: usize,
    peak: Option<(&str, f64)>,
    recorder: &mut Recorder,
) -> Result<(), BenchError> {
    let compare = |figure: Figure| match peak {
        Some((what, gflops)) => figure.against(what, gflops, None),
        None => figure,
    };
    for shape in shapes {
        let spec = shape.spec();
        let (cin, cout, size, k) = (
            shape.in_channels,
            shape.out_channels,
            shape.size,
            shape.kernel,
        );
        let x = backend.from_host(
            &seeded_values(batch * cin * size * size, 1),
            &[batch, cin, size, size],
        )?;
        let w = backend.from_host(&seeded_values(cout * cin * k * k, 2), &[cout, cin, k, k])?;
        let dy = backend.from_host(
            &seeded_values(batch * cout * size * size, 3),
            &[batch, cout, size, size],
        )?;
        let gflop = shape.flops(batch) as f64 / 1e9;
        let label = |pass: &str| format!("{} b{batch} {pass}", shape.name);

        let forward = repeat(backend, 1, runs, |b| {
            b.conv2d(&x, &w, None, spec)?;
            Ok(())
        })?;
        recorder.push(compare(Figure::new(
            suite,
            label("forward"),
            "GFLOP/s",
            rates(gflop, &forward, "convolution forward")?,
        )));
        let weight_grad = repeat(backend, 1, runs, |b| {
            b.conv2d_backward(&x, &w, &dy, spec, false, false)?;
            Ok(())
        })?;
        recorder.push(compare(Figure::new(
            suite,
            label("weight grad"),
            "GFLOP/s",
            rates(gflop, &weight_grad, "convolution weight gradient")?,
        )));
        let both = repeat(backend, 1, runs, |b| {
            b.conv2d_backward(&x, &w, &dy, spec, true, false)?;
            Ok(())
        })?;
        recorder.push(compare(Figure::new(
            suite,
            label("input+weight grad"),
            "GFLOP/s",
            rates(2.0 * gflop, &both, "convolution gradients")?,
        )));
        // Run i of each measurement paired: the input gradient's time is what the second adds.
        let input_grad: Vec<Duration> = both
            .iter()
            .zip(&weight_grad)
            .filter(|(b, w)| b > w)
            .map(|(b, w)| *b - *w)
            .collect();
        if let Some(summary) = Summary::rates(gflop, &input_grad) {
            recorder.push(
                compare(Figure::new(suite, label("input grad"), "GFLOP/s", summary))
                    .note("derived: (input+weight) − weight-only time"),
            );
        }

        // The GEMM the forward pass lowers to.
        let (m, kk, n) = (cout, cin * k * k, batch * size * size);
        let a = backend.from_host(&seeded_values(m * kk, 4), &[m, kk])?;
        let bm = backend.from_host(&seeded_values(kk * n, 5), &[kk, n])?;
        let gemm = repeat(backend, 1, runs, |b| {
            b.matmul(&a, &bm, false, false)?;
            Ok(())
        })?;
        recorder.push(compare(Figure::new(
            suite,
            format!("{} b{batch} as GEMM {m}×{kk}·{kk}×{n}", shape.name),
            "GFLOP/s",
            rates(matmul_flops(m, kk, n) as f64 / 1e9, &gemm, "lowered GEMM")?,
        )));
    }
    Ok(())
}
