//! The machine a report was measured on.

use serde::Serialize;

/// What the figures depend on: the CPU, its cores, the threads used, the memory, the GPU adapter, and
/// how busy the machine was.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Machine {
    /// The CPU's model name (`/proc/cpuinfo`), or `unknown`.
    pub cpu_model: String,
    /// Logical CPUs the process may run on.
    pub logical_cpus: usize,
    /// Physical cores (`/proc/cpuinfo`'s distinct core ids per package), when known.
    pub physical_cores: Option<usize>,
    /// SIMD extensions relevant to f32 GEMM that the CPU reports (`avx2`, `fma`, `avx512f`, …).
    pub simd: Vec<String>,
    /// Total memory in GiB (`/proc/meminfo`), when known.
    pub memory_gib: Option<f64>,
    /// Threads the CPU figures used (the backend's pool, the copy reference, the GEMM peak, PyTorch).
    pub threads: usize,
    /// The operating system (`/proc/sys/kernel/osrelease`), when known.
    pub os: String,
    /// The 1-minute load average when the run started and when it ended: a load above the thread count
    /// means other work shared the cores.
    pub load_average: LoadAverage,
    /// The GPU adapter of the gpu suite, when one was opened.
    pub adapter: Option<Adapter>,
}

/// The 1-minute load average at the start and end of a run.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct LoadAverage {
    /// When the run started.
    pub start: Option<f64>,
    /// When the run ended.
    pub end: Option<f64>,
}

/// A GPU adapter, as the driver describes it.
#[derive(Clone, Debug, Serialize)]
pub struct Adapter {
    /// The adapter's name.
    pub name: String,
    /// Discrete, integrated, virtual, or CPU (software rasteriser).
    pub device_type: String,
    /// The graphics API (Vulkan, Metal, DX12, …).
    pub api: String,
    /// The driver and its version.
    pub driver: String,
    /// Whether timings come from GPU timestamps (otherwise the wall clock).
    pub timestamp_queries: bool,
    /// Whether the adapter is a software renderer running on the CPU, whose figures only show that the
    /// path works.
    pub software: bool,
}

impl Machine {
    /// Reads what the operating system says about this machine.
    pub fn probe(threads: usize) -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let field = |line: &str, key: &str| {
            line.split_once(':')
                .filter(|(k, _)| k.trim() == key)
                .map(|(_, v)| v.trim().to_string())
        };
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| field(l, "model name"))
            .unwrap_or_else(|| "unknown".into());
        let mut cores = std::collections::BTreeSet::new();
        let mut package = String::new();
        for line in cpuinfo.lines() {
            if let Some(p) = field(line, "physical id") {
                package = p;
            }
            if let Some(core) = field(line, "core id") {
                cores.insert((package.clone(), core));
            }
        }
        let flags = cpuinfo
            .lines()
            .find_map(|l| field(l, "flags"))
            .unwrap_or_default();
        let simd = [
            "sse4_2",
            "avx",
            "avx2",
            "fma",
            "avx512f",
            "avx512_bf16",
            "amx_tile",
        ]
        .iter()
        .filter(|f| flags.split_whitespace().any(|g| g == **f))
        .map(|f| f.to_string())
        .collect();
        let memory_gib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            })
            .map(|kib| kib / 1024.0 / 1024.0);
        Machine {
            cpu_model,
            logical_cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            physical_cores: (!cores.is_empty()).then_some(cores.len()),
            simd,
            memory_gib,
            threads,
            os: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| format!("Linux {}", s.trim()))
                .unwrap_or_else(|_| std::env::consts::OS.to_string()),
            load_average: LoadAverage {
                start: load_average(),
                end: None,
            },
            adapter: None,
        }
    }
}

/// The 1-minute load average (`/proc/loadavg`), when the system reports one.
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
