//! Tile sizes of the matrix-product kernel (`gemm.wgsl`), chosen per adapter or by the user.
//!
//! A workgroup computes a `bm × bn` block of the output, stepping through K `bk` at a time; each thread
//! keeps `tm × tn` outputs in registers. Larger tiles reuse each value loaded from memory more often but
//! need more registers and fewer workgroups fill the device, so the best choice depends on the GPU:
//! [`GemmTiles::CANDIDATES`] are the shapes swa-bench's `gpu` suite compares, and `SWA_GPU_GEMM_TILES`
//! (or [`GpuOptions::gemm_tiles`](crate::GpuOptions::gemm_tiles)) replaces the default.

use std::fmt;
use std::str::FromStr;

use swa_core::backend::{BackendError, BackendResult};

/// The environment variable that sets the GEMM tiles, as `BMxBNxBKxTMxTN` (for example `128x128x8x8x8`).
pub const GEMM_TILES_ENV: &str = "SWA_GPU_GEMM_TILES";

/// Workgroup memory the kernel may use besides its two operand tiles.
const OTHER_WORKGROUP_BYTES: u32 = 2048;
/// Most outputs a thread may accumulate: beyond this the accumulators no longer fit in registers.
const MAX_OUTPUTS_PER_THREAD: u32 = 64;

/// Tile sizes of the GEMM kernels (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GemmTiles {
    /// Output rows per workgroup.
    pub bm: u32,
    /// Output columns per workgroup.
    pub bn: u32,
    /// Reduction depth loaded per step.
    pub bk: u32,
    /// Output rows per thread.
    pub tm: u32,
    /// Output columns per thread.
    pub tn: u32,
}

impl GemmTiles {
    /// 32×32 blocks, 4×4 per thread: the default of software adapters, which run one workgroup per core.
    pub const SMALL: Self = Self::new(32, 32, 16, 4, 4);
    /// 64×64 blocks, 4×4 per thread (256 threads): the default of hardware adapters.
    pub const MEDIUM: Self = Self::new(64, 64, 16, 4, 4);
    /// The shapes compared on hardware adapters, from fewest registers to most reuse.
    pub const CANDIDATES: [Self; 5] = [
        Self::SMALL,
        Self::MEDIUM,
        Self::new(64, 64, 16, 8, 8),
        Self::new(128, 64, 8, 8, 4),
        Self::new(128, 128, 8, 8, 8),
    ];

    /// Tiles of the given sizes; [`GemmTiles::validate`] checks them against a device.
    pub const fn new(bm: u32, bn: u32, bk: u32, tm: u32, tn: u32) -> Self {
        Self { bm, bn, bk, tm, tn }
    }

    /// The default for an adapter: [`GemmTiles::SMALL`] on a CPU rasteriser, where small tiles keep more
    /// cores busy, else [`GemmTiles::MEDIUM`] when the device's limits allow it.
    pub fn for_adapter(info: &wgpu::AdapterInfo, limits: &wgpu::Limits) -> Self {
        if info.device_type != wgpu::DeviceType::Cpu && Self::MEDIUM.validate(limits).is_ok() {
            Self::MEDIUM
        } else {
            Self::SMALL
        }
    }

    /// Threads per workgroup.
    pub fn threads(&self) -> u32 {
        (self.bm / self.tm.max(1)) * (self.bn / self.tn.max(1))
    }

    /// Bytes of workgroup memory the kernel declares.
    pub fn workgroup_bytes(&self) -> u32 {
        self.bk * (self.bm + self.bn) * 4 + OTHER_WORKGROUP_BYTES
    }

    /// Checks the shapes the kernel relies on and the device's limits, naming the value that fails.
    pub fn validate(&self, limits: &wgpu::Limits) -> BackendResult<()> {
        let invalid = |message: String| {
            Err(BackendError::InvalidArgument {
                op: "GEMM tiles",
                message: format!("{self}: {message}"),
            })
        };
        let Self { bm, bn, bk, tm, tn } = *self;
        if [bm, bn, bk, tm, tn].contains(&0) {
            return invalid("every size must be positive".into());
        }
        if bm % tm != 0 || bn % tn != 0 {
            return invalid(format!(
                "a thread's {tm}×{tn} outputs must divide the {bm}×{bn} block"
            ));
        }
        if bk % 4 != 0 || bn % 4 != 0 {
            return invalid(format!(
                "bk ({bk}) and bn ({bn}) must be multiples of 4 for vec4 loads"
            ));
        }
        if tm * tn > MAX_OUTPUTS_PER_THREAD {
            return invalid(format!(
                "{} outputs per thread; at most {MAX_OUTPUTS_PER_THREAD} fit in registers",
                tm * tn
            ));
        }
        let threads = self.threads();
        if threads > limits.max_compute_invocations_per_workgroup
            || bn / tn > limits.max_compute_workgroup_size_x
            || bm / tm > limits.max_compute_workgroup_size_y
        {
            return invalid(format!(
                "{}×{} = {threads} threads; the device allows {} per workgroup, {}×{} at most",
                bn / tn,
                bm / tm,
                limits.max_compute_invocations_per_workgroup,
                limits.max_compute_workgroup_size_x,
                limits.max_compute_workgroup_size_y
            ));
        }
        let bytes = self.workgroup_bytes();
        if bytes > limits.max_compute_workgroup_storage_size {
            return invalid(format!(
                "{bytes} bytes of workgroup memory; the device has {}",
                limits.max_compute_workgroup_storage_size
            ));
        }
        Ok(())
    }

    /// The kernel's placeholders for a mode, a convolution's kernel size and vec4 loads of A and/or B,
    /// with the accumulators, their update and their stores unrolled for the tile shape.
    pub(crate) fn substitutions(
        &self,
        mode: u32,
        ksize: u32,
        vec_a: bool,
        vec_b: bool,
    ) -> Vec<(&'static str, String)> {
        let accessors = |name: &str, vectorised: bool| {
            if vectorised {
                format!(
                    "fn {name}_at(i: u32) -> f32 {{ return {name}[i / 4u][i % 4u]; }}\n\
                     fn {name}_vec4(i: u32) -> vec4<f32> {{ return {name}[i]; }}\n"
                )
            } else {
                format!(
                    "fn {name}_at(i: u32) -> f32 {{ return {name}[i]; }}\n\
                     fn {name}_vec4(i: u32) -> vec4<f32> {{\n\
                     \x20   return vec4<f32>({name}[4u * i], {name}[4u * i + 1u], {name}[4u * i + 2u], {name}[4u * i + 3u]);\n\
                     }}\n"
                )
            }
        };
        let element = |vectorised: bool| if vectorised { "vec4<f32>" } else { "f32" };
        let (tm, tn) = (self.tm, self.tn);
        let mut declarations = String::new();
        let mut update = String::new();
        let mut stores = String::new();
        for i in 0..tm {
            update.push_str(&format!(
                "            let a{i} = a_tile[a_base + {i}u * THREADS_M];\n"
            ));
        }
        for j in 0..tn {
            update.push_str(&format!(
                "            let b{j} = b_tile[b_base + {j}u * THREADS_N];\n"
            ));
        }
        for i in 0..tm {
            for j in 0..tn {
                declarations.push_str(&format!("    var acc_{i}_{j} = 0.0;\n"));
                update.push_str(&format!(
                    "            acc_{i}_{j} = acc_{i}_{j} + a{i} * b{j};\n"
                ));
                stores.push_str(&format!(
                    "    store_inside(wid.z, row0 + lid.y + {i}u * THREADS_M, \
                     col0 + lid.x + {j}u * THREADS_N, acc_{i}_{j});\n"
                ));
            }
        }
        vec![
            ("{{ACC_DECL}}", declarations),
            ("{{ACC_UPDATE}}", update),
            ("{{ACC_STORE}}", stores),
            ("{{VEC_A}}", vec_a.to_string()),
            ("{{VEC_B}}", vec_b.to_string()),
            ("{{LHS_ELEM}}", element(vec_a).to_string()),
            ("{{RHS_ELEM}}", element(vec_b).to_string()),
            (
                "{{ACCESSORS}}",
                accessors("lhs", vec_a) + &accessors("rhs", vec_b),
            ),
            ("{{BM}}", self.bm.to_string()),
            ("{{BN}}", self.bn.to_string()),
            ("{{BK}}", self.bk.to_string()),
            ("{{TM}}", self.tm.to_string()),
            ("{{TN}}", self.tn.to_string()),
            ("{{THREADS_N}}", (self.bn / self.tn).to_string()),
            ("{{THREADS_M}}", (self.bm / self.tm).to_string()),
            ("{{MODE}}", mode.to_string()),
            ("{{KSIZE}}", ksize.to_string()),
        ]
    }
}

impl fmt::Display for GemmTiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Self { bm, bn, bk, tm, tn } = self;
        write!(f, "{bm}x{bn}x{bk}x{tm}x{tn}")
    }
}

/// Why a tile specification could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "GEMM tiles {text:?}: expected five positive integers BMxBNxBKxTMxTN, e.g. \"128x128x8x8x8\""
)]
pub struct ParseGemmTilesError {
    text: String,
}

impl FromStr for GemmTiles {
    type Err = ParseGemmTilesError;

    /// Reads `BMxBNxBKxTMxTN`; the sizes are checked against a device by [`GemmTiles::validate`].
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let error = || ParseGemmTilesError {
            text: text.to_string(),
        };
        let sizes = text
            .trim()
            .split(['x', 'X', '×'])
            .map(|part| part.trim().parse::<u32>().ok().filter(|&v| v > 0))
            .collect::<Option<Vec<u32>>>()
            .ok_or_else(error)?;
        match sizes[..] {
            [bm, bn, bk, tm, tn] => Ok(Self::new(bm, bn, bk, tm, tn)),
            _ => Err(error()),
        }
    }
}
