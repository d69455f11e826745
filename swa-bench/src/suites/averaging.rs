//! Weight-averaging bandwidth: SWA and EMA updates through swa-core's public API, against a plain copy.
//!
//! An update reads the average and the weights and writes the average: 12 bytes per f32 parameter. A
//! copy reads and writes once: 8 bytes. Both are memory-bound, so the copy's GB/s, measured on the same
//! sizes with the same threads, is what an update can hope for; the target is 90% of it on the CPU and
//! 80% on a GPU, whose copy is a DMA transfer that kernels rarely match.

use swa_core::averaging::{BufferPolicy, WeightAverage, WeightAveraging};

use crate::report::{Figure, Target};
use crate::timing::TimedBackend;
use crate::workload::{seeded_values, ParameterBlock};
use crate::{rates, BenchError, Recorder};

/// Parameter counts of the paper's smallest and largest networks: PreResNet-164 and WRN-28-10.
pub const PAPER_SIZES: [(&str, usize); 2] = [
    ("1.7M (PreResNet-164)", 1_700_000),
    ("36.5M (WRN-28-10)", 36_500_000),
];

/// Tensors the parameters are split into: a few, large, so the figure is memory traffic and not
/// per-tensor dispatch.
pub const PIECES: usize = 4;

/// The update's share of the copy bandwidth the project aims for on the CPU.
pub const TARGET: f64 = 0.9;

/// The same on a GPU.
pub const GPU_TARGET: f64 = 0.8;

/// Bytes an averaging update moves per parameter: read the average, read the weight, write the average.
pub const UPDATE_BYTES: f64 = 12.0;

/// Bytes a copy moves per element: read the source, write the destination.
pub const COPY_BYTES: f64 = 8.0;

/// Measures copy, SWA and EMA bandwidth for each `(label, parameters)` size, `runs` times each, the
/// three interleaved so that a change in the machine's load affects them alike; `target` is the
/// update's wanted share of the copy.
pub fn run<B: TimedBackend>(
    backend: &B,
    suite: &str,
    sizes: &[(String, usize)],
    runs: usize,
    target: f64,
    recorder: &mut Recorder,
) -> Result<(), BenchError> {
    for (label, params) in sizes {
        let params = *params;
        let block = ParameterBlock::new(backend, params, PIECES, 1)?;
        let mut swa = WeightAverage::swa(backend, &block, BufferPolicy::Average)?;
        let mut ema = WeightAverage::ema(backend, &block, 0.999, BufferPolicy::Average)?;
        let source = backend.from_host(&seeded_values(params, 9), &[params])?;
        let mut destination = backend.zeros(&[params])?;

        // One untimed round touches every page of every buffer.
        backend.timed_copy(&mut destination, &source)?;
        swa.update(backend, &block)?;
        ema.update(backend, &block)?;
        let (mut copy, mut swa_times, mut ema_times) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..runs {
            copy.push(backend.timed_copy(&mut destination, &source)?);
            swa_times.push(backend.time(&mut |b| Ok(swa.update(b, &block)?))?);
            ema_times.push(backend.time(&mut |b| Ok(ema.update(b, &block)?))?);
        }

        let copy = rates(COPY_BYTES * params as f64 / 1e9, &copy, "memory copy")?;
        recorder.push(
            Figure::new(
                suite,
                format!("memory copy, {label} f32 (8 B/elem)"),
                "GB/s",
                copy,
            )
            .note(COPY_NOTE),
        );
        let update_gb = UPDATE_BYTES * params as f64 / 1e9;
        for (name, times) in [("equal weights", &swa_times), ("EMA", &ema_times)] {
            recorder.push(
                Figure::new(
                    suite,
                    format!("WeightAverage::update ({name}), {label} params (12 B/param)"),
                    "GB/s",
                    rates(update_gb, times, "averaging update")?,
                )
                .against("copy", copy.median, Some(Target::MinRatio(target))),
            );
        }
    }
    Ok(())
}

/// Why an update can read above 100% of the copy.
const COPY_NOTE: &str =
    "faster of memcpy and a loop per run; counts 8 B/elem, but ordinary stores \
     first read the destination into cache, so the hardware moves up to 12";
