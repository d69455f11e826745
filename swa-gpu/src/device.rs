//! Adapter selection and device creation.

use std::fmt;

use swa_core::backend::{BackendError, BackendResult};

use crate::tiles::{GemmTiles, GEMM_TILES_ENV};

/// The environment variable that picks an adapter: a substring of the adapter's name (case-insensitive),
/// or one of the kinds `discrete`, `integrated`, `cpu`.
pub const ADAPTER_ENV: &str = "SWA_GPU_ADAPTER";

/// A kind of adapter, as the driver reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdapterKind {
    /// A discrete GPU with its own memory.
    Discrete,
    /// A GPU sharing memory with the CPU.
    Integrated,
    /// A software rasteriser on the CPU (llvmpipe, WARP, SwiftShader).
    Cpu,
}

impl AdapterKind {
    fn matches(self, device_type: wgpu::DeviceType) -> bool {
        matches!(
            (self, device_type),
            (AdapterKind::Discrete, wgpu::DeviceType::DiscreteGpu)
                | (AdapterKind::Integrated, wgpu::DeviceType::IntegratedGpu)
                | (AdapterKind::Cpu, wgpu::DeviceType::Cpu)
        )
    }
}

/// Which adapter to use when the machine has several.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdapterSelector {
    /// The first adapter whose name contains this text (case-insensitive).
    NameContains(String),
    /// The first adapter of this kind.
    Kind(AdapterKind),
}

impl AdapterSelector {
    /// Reads `discrete`, `integrated` or `cpu` as a kind, anything else as part of an adapter's name.
    pub fn parse(text: &str) -> Self {
        match text.trim().to_ascii_lowercase().as_str() {
            "discrete" => Self::Kind(AdapterKind::Discrete),
            "integrated" => Self::Kind(AdapterKind::Integrated),
            "cpu" => Self::Kind(AdapterKind::Cpu),
            _ => Self::NameContains(text.trim().to_string()),
        }
    }

    fn matches(&self, info: &wgpu::AdapterInfo) -> bool {
        match self {
            Self::NameContains(part) => info
                .name
                .to_ascii_lowercase()
                .contains(&part.to_ascii_lowercase()),
            Self::Kind(kind) => kind.matches(info.device_type),
        }
    }
}

impl fmt::Display for AdapterSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NameContains(part) => write!(f, "name containing {part:?}"),
            Self::Kind(kind) => write!(f, "kind {kind:?}"),
        }
    }
}

/// How [`GpuBackend::new`](crate::GpuBackend::new) chooses and configures its device.
#[derive(Clone, Debug)]
pub struct GpuOptions {
    /// A specific adapter; `None` takes the best by `power_preference`.
    pub adapter: Option<AdapterSelector>,
    /// Preference among adapters when none is named: high performance (discrete first) by default.
    pub power_preference: wgpu::PowerPreference,
    /// The graphics APIs to look on (Vulkan, Metal, DX12 by default; `WGPU_BACKEND` overrides).
    pub backends: wgpu::Backends,
    /// Tile sizes of the matrix products; `None` takes [`GemmTiles::for_adapter`].
    pub gemm_tiles: Option<GemmTiles>,
}

impl Default for GpuOptions {
    fn default() -> Self {
        Self {
            adapter: None,
            power_preference: wgpu::PowerPreference::HighPerformance,
            backends: wgpu::Backends::from_env().unwrap_or(wgpu::Backends::PRIMARY),
            gemm_tiles: None,
        }
    }
}

impl GpuOptions {
    /// The defaults, with the adapter taken from [`ADAPTER_ENV`] and the GEMM tiles from
    /// [`GEMM_TILES_ENV`] when they are set and not empty.
    ///
    /// Fails with [`BackendError::InvalidArgument`] naming the variable when the tiles cannot be read.
    pub fn from_env() -> BackendResult<Self> {
        let read = |name: &str| {
            std::env::var(name)
                .ok()
                .filter(|value| !value.trim().is_empty())
        };
        let adapter = read(ADAPTER_ENV).map(|value| AdapterSelector::parse(&value));
        let gemm_tiles = read(GEMM_TILES_ENV)
            .map(|value| value.parse::<GemmTiles>())
            .transpose()
            .map_err(|e| BackendError::InvalidArgument {
                op: GEMM_TILES_ENV,
                message: e.to_string(),
            })?;
        Ok(Self {
            adapter,
            gemm_tiles,
            ..Self::default()
        })
    }
}

/// Ranks an adapter for a power preference; lower is better.
fn preference_rank(device_type: wgpu::DeviceType, preference: wgpu::PowerPreference) -> u8 {
    use wgpu::DeviceType::*;
    let order: [wgpu::DeviceType; 5] = match preference {
        wgpu::PowerPreference::LowPower => [IntegratedGpu, DiscreteGpu, VirtualGpu, Other, Cpu],
        _ => [DiscreteGpu, IntegratedGpu, VirtualGpu, Other, Cpu],
    };
    order
        .iter()
        .position(|&t| t == device_type)
        .map_or(u8::MAX, |i| i as u8)
}

fn describe(info: &wgpu::AdapterInfo) -> String {
    format!("{} ({:?}, {:?})", info.name, info.device_type, info.backend)
}

/// Every adapter wgpu finds on `backends`.
pub fn available_adapters(backends: wgpu::Backends) -> Vec<wgpu::AdapterInfo> {
    let instance = make_instance(backends);
    pollster::block_on(instance.enumerate_adapters(backends))
        .iter()
        .map(wgpu::Adapter::get_info)
        .collect()
}

pub(crate) fn make_instance(backends: wgpu::Backends) -> wgpu::Instance {
    let mut descriptor = wgpu::InstanceDescriptor::new_without_display_handle();
    descriptor.backends = backends;
    wgpu::Instance::new(descriptor)
}

/// Picks the adapter the options ask for.
pub(crate) fn select_adapter(
    instance: &wgpu::Instance,
    options: &GpuOptions,
) -> BackendResult<wgpu::Adapter> {
    let adapters = pollster::block_on(instance.enumerate_adapters(options.backends));
    let found: Vec<String> = adapters.iter().map(|a| describe(&a.get_info())).collect();
    let mut candidates: Vec<wgpu::Adapter> = adapters
        .into_iter()
        .filter(|a| {
            options
                .adapter
                .as_ref()
                .is_none_or(|selector| selector.matches(&a.get_info()))
        })
        .collect();
    candidates.sort_by_key(|a| preference_rank(a.get_info().device_type, options.power_preference));
    candidates.into_iter().next().ok_or_else(|| {
        let wanted = options.adapter.as_ref().map_or_else(
            || "any adapter".to_string(),
            |s| format!("an adapter with {s}"),
        );
        let seen = if found.is_empty() {
            "none found (is a Vulkan, Metal or DX12 driver installed?)".to_string()
        } else {
            found.join("; ")
        };
        BackendError::NoDevice(format!(
            "wanted {wanted} on {:?}; adapters: {seen}",
            options.backends
        ))
    })
}

/// Opens a device with the adapter's own limits (large storage bindings, all its workgroup memory) and
/// timestamp queries when the adapter has them.
pub(crate) fn open_device(adapter: &wgpu::Adapter) -> BackendResult<(wgpu::Device, wgpu::Queue)> {
    let wanted = wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS;
    let descriptor = wgpu::DeviceDescriptor {
        label: Some("swa-gpu"),
        required_features: adapter.features() & wanted,
        required_limits: adapter.limits(),
        memory_hints: wgpu::MemoryHints::Performance,
        ..Default::default()
    };
    pollster::block_on(adapter.request_device(&descriptor)).map_err(|e| {
        BackendError::NoDevice(format!(
            "adapter {} refused a device: {e}",
            describe(&adapter.get_info())
        ))
    })
}
