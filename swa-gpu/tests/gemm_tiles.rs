//! GEMM tile sizes: reading and checking them, and every candidate shape computing the same matrix
//! products and convolutions as the CPU reference (the tolerances of `ops.rs`).

mod common;

use common::*;
use swa_core::backend::BackendError;
use swa_gpu::{GemmTiles, GpuBackend, GpuOptions};

#[test]
fn tiles_read_and_print_as_bm_x_bn_x_bk_x_tm_x_tn() {
    let tiles: GemmTiles = "128x128x8x8x8".parse().unwrap();
    assert_eq!(tiles, GemmTiles::new(128, 128, 8, 8, 8));
    assert_eq!(tiles.to_string(), "128x128x8x8x8");
    assert_eq!(
        " 64 X 32 × 16 x 4 x 2 ".parse::<GemmTiles>().unwrap(),
        GemmTiles::new(64, 32, 16, 4, 2)
    );
    for bad in [
        "",
        "64x64x16x4",
        "64x64x16x4x4x4",
        "64x64x0x4x4",
        "64xx64x16x4x4",
        "a x b",
        "-8x8x8x4x4",
    ] {
        let error = bad.parse::<GemmTiles>().unwrap_err().to_string();
        assert!(
            error.contains(&format!("{bad:?}")) && error.contains("BMxBNxBKxTMxTN"),
            "{error}"
        );
    }
}

#[test]
fn tiles_are_checked_against_the_kernel_and_the_device() {
    // WebGPU's default limits: 256 invocations, 16 KiB of workgroup memory.
    let limits = wgpu::Limits::default();
    for tiles in GemmTiles::CANDIDATES {
        tiles
            .validate(&limits)
            .unwrap_or_else(|e| panic!("{tiles}: {e}"));
    }
    let refused = [
        ("64x64x16x3x4", "divide"),
        ("64x64x18x4x4", "multiples of 4"),
        ("64x64x16x16x8", "registers"),
        ("256x256x8x4x4", "4096 threads"),
        ("128x128x32x8x8", "34816 bytes"),
    ];
    for (text, why) in refused {
        let tiles: GemmTiles = text.parse().unwrap();
        match tiles.validate(&limits) {
            Err(BackendError::InvalidArgument { message, .. }) => {
                assert!(
                    message.contains(text) && message.contains(why),
                    "{text}: {message}"
                );
            }
            other => panic!("{text}: expected a refusal mentioning {why:?}, got {other:?}"),
        }
    }
}

/// The backend with the given tiles on the adapter the tests use.
fn with_tiles(tiles: GemmTiles) -> GpuBackend {
    let options = GpuOptions {
        gemm_tiles: Some(tiles),
        ..GpuOptions::from_env().expect("GPU options from the environment")
    };
    let backend = GpuBackend::new(options).unwrap_or_else(|e| panic!("{tiles}: {e}"));
    assert_eq!(backend.gemm_tiles(), tiles);
    backend
}

#[test]
fn every_candidate_computes_what_the_cpu_computes() {
    let Some(shared) = gpu() else { return };
    for tiles in GemmTiles::CANDIDATES {
        if tiles.validate(&shared.limits()).is_err() {
            eprintln!("{tiles}: beyond this adapter's limits, not run");
            continue;
        }
        let g = with_tiles(tiles);
        check_matmul(&g);
        check_conv2d(&g);
    }
}

#[test]
fn tiles_the_device_cannot_run_are_refused_when_opening_it() {
    let Some(shared) = gpu() else { return };
    let limits = shared.limits();
    let side = limits.max_compute_invocations_per_workgroup * 8;
    let options = GpuOptions {
        gemm_tiles: Some(GemmTiles::new(side, side, 8, 4, 4)),
        ..GpuOptions::from_env().expect("GPU options from the environment")
    };
    match GpuBackend::new(options) {
        Err(BackendError::InvalidArgument { op, message }) => {
            assert_eq!(op, "GEMM tiles");
            assert!(message.contains("threads"), "{message}");
        }
        other => panic!(
            "expected a refusal of {side}×{side} tiles, got {:?}",
            other.map(|g| g.gemm_tiles())
        ),
    }
}
