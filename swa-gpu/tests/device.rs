//! Device management, timing and the buffer pool.

mod common;

use common::*;
use swa_core::backend::prelude::*;
use swa_core::backend::{BackendError, SgdStep};
use swa_gpu::{AdapterKind, AdapterSelector, GpuBackend, GpuOptions, TimingSource};

#[test]
fn selectors_parse_kinds_and_names() {
    assert_eq!(
        AdapterSelector::parse("discrete"),
        AdapterSelector::Kind(AdapterKind::Discrete)
    );
    assert_eq!(
        AdapterSelector::parse(" CPU "),
        AdapterSelector::Kind(AdapterKind::Cpu)
    );
    assert_eq!(
        AdapterSelector::parse("integrated"),
        AdapterSelector::Kind(AdapterKind::Integrated)
    );
    assert_eq!(
        AdapterSelector::parse("llvmpipe"),
        AdapterSelector::NameContains("llvmpipe".into())
    );
}

/// Runs with or without a GPU: an adapter that cannot exist gives a typed error listing what was seen.
#[test]
fn missing_adapter_is_a_typed_error() {
    let options = GpuOptions {
        adapter: Some(AdapterSelector::NameContains(
            "no adapter is called this".into(),
        )),
        ..GpuOptions::default()
    };
    match GpuBackend::new(options) {
        Err(BackendError::NoDevice(message)) => {
            assert!(message.contains("no adapter is called this"), "{message}");
            assert!(message.contains("adapters:"), "{message}");
        }
        other => panic!("expected NoDevice, got {other:?}"),
    }
}

#[test]
fn names_its_adapter() {
    let Some(g) = gpu() else { return };
    let info = g.adapter_info();
    eprintln!(
        "adapter: {} ({:?}, {:?}); timestamps: {}",
        info.name,
        info.device_type,
        info.backend,
        g.has_timestamp_queries()
    );
    assert!(g.name().contains(info.name.trim()));
}

#[test]
fn timing_measures_queued_work() {
    let Some(g) = gpu() else { return };
    let mut t = g.zeros(&[1 << 16]).unwrap();
    let (value, timing) = g
        .time_gpu(|b| {
            for _ in 0..4 {
                b.fill_(&mut t, 2.0)?;
                b.scale_(&mut t, 0.5)?;
            }
            Ok(7)
        })
        .unwrap();
    assert_eq!(value, 7);
    assert!(timing.elapsed.as_nanos() > 0, "{timing:?}");
    if g.has_timestamp_queries() {
        eprintln!("timed with {:?}: {:?}", timing.source, timing.elapsed);
    } else {
        assert_eq!(timing.source, TimingSource::WallClock);
    }
    assert_eq!(g.to_host(&t).unwrap()[123], 1.0);

    let copy = g.measure_copy_bandwidth(1 << 20, 4).unwrap();
    assert_eq!(copy.bytes_moved, 2 * (1 << 20) * 4);
    let lerp = g
        .measure_lerp_many_bandwidth(&[1000, 50_000, 7], 3)
        .unwrap();
    assert_eq!(lerp.bytes_moved, 3 * 4 * 51_007 * 3);
    eprintln!(
        "copy {:.2} GB/s ({:?}), lerp_many_ {:.2} GB/s ({:?})",
        copy.gb_per_s(),
        copy.timing.source,
        lerp.gb_per_s(),
        lerp.timing.source
    );
    assert!(copy.gb_per_s() > 0.0 && lerp.gb_per_s() > 0.0);
}

/// Repeated steps of the same shapes reuse pooled buffers instead of allocating new ones.
#[test]
fn buffer_pool_reuses_allocations_across_steps() {
    if gpu().is_none() {
        return;
    }
    // A device of its own: the shared one serves this binary's other tests, whose concurrent allocations
    // would count as this test's growth.
    let g =
        GpuBackend::from_env().expect("the shared backend found an adapter, so a second one opens");
    let mut param = g.from_host(&random(5, 3000), &[30, 100]).unwrap();
    let mut momentum = g.zeros(&[30, 100]).unwrap();
    let x = g.from_host(&random(6, 800), &[8, 100]).unwrap();
    let sgd = SgdStep {
        lr: 0.01,
        momentum: 0.9,
        weight_decay: 0.0,
        dampening: 0.0,
        nesterov: false,
    };
    let step = |param: &mut _, momentum: &mut _| {
        let y = g.matmul(&x, param, false, true).unwrap();
        let grad = g.matmul(&y, &x, true, false).unwrap();
        g.sgd_step_(param, &grad, momentum, &sgd).unwrap();
        g.synchronize().unwrap();
    };
    step(&mut param, &mut momentum);
    step(&mut param, &mut momentum);
    let after_warmup = g.pool_stats().allocated_bytes;
    for _ in 0..5 {
        step(&mut param, &mut momentum);
    }
    // The steps after the warm-up need nothing new beyond what they used before, so growth must stay below
    // one step's temporaries.
    let growth = g.pool_stats().allocated_bytes - after_warmup;
    assert!(
        growth <= 2 * (30 * 8 + 30 * 100) as u64 * 4 + 4096,
        "pool grew by {growth} bytes"
    );
    assert!(g.to_host(&param).unwrap().iter().all(|v| v.is_finite()));
}

/// The throughput probe does the arithmetic it counts: every thread's result is the host's.
#[test]
fn fma_probe_computes_every_chain_and_counts_its_operations() {
    let Some(g) = gpu() else { return };
    let (threads, iterations) = (1000, 50);
    let (throughput, sums) = g.measure_fma_throughput(threads, iterations).unwrap();
    assert_eq!(
        throughput.flops,
        2 * swa_gpu::FMAS_PER_ITERATION * iterations as u64 * threads as u64
    );
    assert!(throughput.gflops() > 0.0 && throughput.gflops().is_finite());
    assert_eq!(sums.len(), threads);
    for (thread, &got) in sums.iter().enumerate() {
        let want = swa_gpu::fma_probe_expected(thread, iterations);
        // Fused or separate multiply-adds differ by one rounding per step: far below 1e-5 of the sum.
        assert!(
            (got - want).abs() <= 1e-5 * want.abs(),
            "thread {thread}: {got}, host {want}"
        );
    }
    assert!(matches!(
        g.measure_fma_throughput(0, 1),
        Err(BackendError::InvalidArgument { .. })
    ));
}
