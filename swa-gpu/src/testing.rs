//! Test support: one shared backend per test binary, or a skip when the machine has no GPU.

use std::sync::OnceLock;

use crate::backend::GpuBackend;

/// Set to `1` to make [`backend_or_skip`] fail instead of skipping when no adapter exists (CI sets it).
pub const REQUIRE_GPU_ENV: &str = "SWA_REQUIRE_GPU";

/// The backend shared by a test binary (opened once, from [`GpuBackend::from_env`]), or `None` after
/// printing `skipped: <reason>` when no adapter exists.
///
/// # Panics
///
/// When no backend can be opened and `SWA_REQUIRE_GPU=1`: a required GPU that is missing is a failure.
pub fn backend_or_skip() -> Option<GpuBackend> {
    static SHARED: OnceLock<Result<GpuBackend, String>> = OnceLock::new();
    let shared = SHARED.get_or_init(|| GpuBackend::from_env().map_err(|e| e.to_string()));
    match shared {
        Ok(backend) => Some(backend.clone()),
        Err(reason) => {
            let required = std::env::var(REQUIRE_GPU_ENV).is_ok_and(|v| v.trim() == "1");
            assert!(
                !required,
                "{REQUIRE_GPU_ENV}=1 but no GPU backend: {reason}"
            );
            eprintln!("skipped: {reason}");
            None
        }
    }
}
