//! Measures CPU training throughput of a network (PreResNet-20 at batch 128 on random CIFAR-sized data by
//! default).
//!
//! `cargo run --release -p swa-models --example train_speed -- [steps] [threads] [network] [batch]
//! [size]` runs two warm-up steps, then `steps` timed SGD steps (forward in training mode, softmax
//! cross-entropy, backward, update), and prints images per second with the time of each phase, so that
//! changes to the CPU kernels can be compared on the exact workload of a training run; then `steps`
//! timed evaluation passes. The images are `size × size` (32 by default); ImageNet networks predict
//! 1000 classes, the others 10. `-- 3 2 densenet161 2 224` times DenseNet-161 on two 224×224 images.

use std::time::{Duration, Instant};

use rand::{rngs::StdRng, Rng, SeedableRng};
use swa_core::backend::prelude::*;
use swa_core::CpuBackend;
use swa_models::optim::{Sgd, SgdConfig};
use swa_models::{Architecture, ForwardMode};

// The training binaries' allocator and setting (`swa_core::allocator`); measuring with another would time
// page faults.
#[global_allocator]
static GLOBAL: swa_core::allocator::MiMalloc = swa_core::allocator::MiMalloc;

const WARM_UP_STEPS: usize = 2;

/// Time spent in each phase of the timed steps.
#[derive(Default)]
struct Phases {
    forward: Duration,
    loss: Duration,
    backward: Duration,
    update: Duration,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    swa_core::allocator::keep_freed_memory();
    let mut args = std::env::args().skip(1);
    let steps: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(10);
    let threads: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(2);
    let architecture: Architecture = args
        .next()
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(Architecture::PreResNet { depth: 20 });
    let batch: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(128);
    let size: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(32);
    let classes: usize = if architecture.is_imagenet() { 1000 } else { 10 };

    let backend = CpuBackend::with_threads(threads);
    let mut model = architecture.build(&backend, classes, 0)?;
    let mut optimiser = Sgd::new(SgdConfig::momentum(3e-4));

    let mut rng = StdRng::seed_from_u64(1);
    let images: Vec<f32> = (0..batch * 3 * size * size)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    let labels: Vec<u32> = (0..batch)
        .map(|_| rng.random_range(0..classes as u32))
        .collect();
    let x = backend.from_host(&images, &[batch, 3, size, size])?;

    let mut phases = Phases::default();
    let mut cpu_at_start = None;
    let mut last_loss = f32::NAN;
    for step in 0..WARM_UP_STEPS + steps {
        let timed = step >= WARM_UP_STEPS;
        if step == WARM_UP_STEPS {
            cpu_at_start = process_cpu_seconds();
        }
        let t0 = Instant::now();
        let logits = model.forward(&backend, &x, ForwardMode::Train { seed: step as u64 })?;
        let t1 = Instant::now();
        let ce = backend.softmax_cross_entropy(&logits, &labels)?;
        let t2 = Instant::now();
        model.backward(&backend, &ce.grad)?;
        let t3 = Instant::now();
        optimiser.step(&backend, model.as_mut(), 0.05)?;
        let t4 = Instant::now();
        last_loss = backend.to_host(&ce.loss)?[0];
        if timed {
            phases.forward += t1 - t0;
            phases.loss += t2 - t1;
            phases.backward += t3 - t2;
            phases.update += t4 - t3;
        }
    }
    let cpu_per_step = cpu_at_start
        .zip(process_cpu_seconds())
        .map(|(start, end)| (end - start) * 1e3 / steps.max(1) as f64);
    let total = phases.forward + phases.loss + phases.backward + phases.update;
    let per_step = |d: Duration| d.as_secs_f64() * 1e3 / steps.max(1) as f64;
    println!(
        "{architecture} batch {batch} at {size}x{size}, {} threads, {steps} steps: {:.1} img/s ({:.1} \
         ms/step; forward {:.1}, loss {:.2}, backward {:.1}, update {:.2} ms); final loss {last_loss:.4}",
        backend.threads(),
        (steps * batch) as f64 / total.as_secs_f64(),
        per_step(total),
        per_step(phases.forward),
        per_step(phases.loss),
        per_step(phases.backward),
        per_step(phases.update),
    );
    // On a shared machine the wall time depends on the other load; the CPU time spent per step does not.
    if let Some(cpu) = cpu_per_step {
        println!("process CPU time: {cpu:.1} ms/step (user + system, all threads)");
    }

    let start = Instant::now();
    for _ in 0..steps {
        let logits = model.forward(&backend, &x, ForwardMode::Eval)?;
        backend.to_host(&logits)?;
    }
    let eval = start.elapsed();
    println!(
        "evaluation: {:.1} img/s ({:.1} ms/pass)",
        (steps * batch) as f64 / eval.as_secs_f64(),
        eval.as_secs_f64() * 1e3 / steps.max(1) as f64
    );
    Ok(())
}

/// User plus system CPU time of this process, from `/proc/self/stat` (Linux only; `None` elsewhere).
fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th fields overall.
    let after_name = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // Linux reports these in clock ticks of 1/100 s on every mainstream configuration.
    Some((utime + stime) / 100.0)
}
