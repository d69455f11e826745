//! The averaging, kernel and training figures on the wgpu backend, when the machine has an adapter.
//!
//! Work is timed with GPU timestamp queries when the adapter has them, the wall clock otherwise. A
//! software adapter (llvmpipe, WARP, SwiftShader: the CPU pretending to be a GPU) runs tiny sizes only,
//! and its figures are labelled as such: they show that the path works, not how fast a GPU is.

use std::time::Duration;

use swa_core::backend::Backend;
use swa_gpu::{GpuBackend, GpuOptions, GpuTensor};
use swa_models::Architecture;

use crate::machine::Adapter;
use crate::suites::kernels::{self, ConvShape};
use crate::suites::{averaging, training};
use crate::timing::TimedBackend;
use crate::{BenchError, Recorder, Settings, BATCH};

impl TimedBackend for GpuBackend {
    fn time(
        &self,
        work: &mut dyn FnMut(&Self) -> Result<(), BenchError>,
    ) -> Result<Duration, BenchError> {
        let mut failure = None;
        let ((), timing) = self.time_gpu(|b| {
            failure = work(b).err();
            Ok(())
        })?;
        match failure {
            Some(e) => Err(e),
            None => Ok(timing.elapsed),
        }
    }

    fn timing_method(&self) -> String {
        if self.has_timestamp_queries() {
            "GPU timestamps (wall clock where the driver reports none)".into()
        } else {
            "wall clock".into()
        }
    }

    fn timed_copy(&self, dst: &mut GpuTensor, src: &GpuTensor) -> Result<Duration, BenchError> {
        self.time(&mut |b| {
            b.copy_(dst, src)?;
            Ok(())
        })
    }
}

/// Opens the adapter `SWA_GPU_ADAPTER` names (or the best one) and measures; records a note and
/// returns `None` when there is no adapter.
pub fn run(settings: &Settings, recorder: &mut Recorder) -> Result<Option<Adapter>, BenchError> {
    const SUITE: &str = "gpu";
    let backend = match GpuBackend::new(GpuOptions::from_env()) {
        Ok(backend) => backend,
        Err(e) => {
            recorder.note(SUITE, format!("skipped, no GPU adapter: {e}"));
            return Ok(None);
        }
    };
    let info = backend.adapter_info();
    let software = info.device_type == wgpu::DeviceType::Cpu;
    let adapter = Adapter {
        name: info.name.clone(),
        device_type: format!("{:?}", info.device_type),
        api: format!("{:?}", info.backend),
        driver: format!("{} {}", info.driver, info.driver_info)
            .trim()
            .to_string(),
        timestamp_queries: backend.has_timestamp_queries(),
        software,
    };
    let label = if software {
        format!("{} [SOFTWARE, CPU-emulated: path check only]", adapter.name)
    } else {
        adapter.name.clone()
    };
    recorder.note(
        SUITE,
        format!(
            "adapter {label} ({}, {}), timing: {}",
            adapter.device_type,
            adapter.api,
            backend.timing_method()
        ),
    );
    let suite = if software { "gpu(sw)" } else { SUITE };

    if software {
        // Sizes that take llvmpipe seconds, not minutes.
        let sizes = [("64K".to_string(), 65_536)];
        averaging::run(&backend, suite, &sizes, 3, recorder)?;
        let tiny = [ConvShape {
            name: "PreResNet-20 3×3 16→16 @32px",
            in_channels: 16,
            out_channels: 16,
            size: 32,
            kernel: 3,
        }];
        kernels::run(&backend, suite, &tiny, 2, 3, None, recorder)?;
        training::run_network(
            &backend,
            suite,
            Architecture::PreResNet { depth: 20 },
            4,
            training::Rounds {
                steps: 2,
                rounds: 1,
            },
            None,
            None,
            recorder,
        )?;
    } else {
        let sizes: Vec<(String, usize)> = averaging::PAPER_SIZES
            .iter()
            .map(|(l, n)| (l.to_string(), *n))
            .collect();
        averaging::run(&backend, suite, &sizes, settings.runs(15), recorder)?;
        kernels::run(
            &backend,
            suite,
            &kernels::PAPER_SHAPES,
            BATCH,
            settings.runs(5),
            None,
            recorder,
        )?;
        for &architecture in &settings.networks {
            training::run_network(
                &backend,
                suite,
                architecture,
                BATCH,
                training::Rounds {
                    steps: settings.train_steps.max(settings.runs(5)),
                    rounds: 1,
                },
                None,
                None,
                recorder,
            )?;
        }
    }
    Ok(Some(adapter))
}
