//! The allocator for programs that train on the CPU: mimalloc, set to keep the memory a training step frees.
//!
//! A CPU training step allocates its activations, gradients and im2col buffers (tens to hundreds of
//! megabytes) and frees them before the next step. By default mimalloc hands freed memory back to the
//! OS after a short delay ("purging"), so every step page-faults the same megabytes in again and the
//! kernel zeroes them: on PreResNet-20 at batch 128 on a 2-core Xeon that is about 2,000 page faults a
//! step and half the training speed. With purging off, the footprint stays at one step's peak and the
//! steady state faults nothing.
//!
//! A binary installs it and turns purging off first thing in `main`:
//!
//! ```no_run
//! #[global_allocator]
//! static ALLOCATOR: swa_core::allocator::MiMalloc = swa_core::allocator::MiMalloc;
//!
//! fn main() {
//!     swa_core::allocator::keep_freed_memory();
//!     // ... train
//! }
//! ```
//!
//! The environment variable `MIMALLOC_PURGE_DELAY`, when set, wins: [`keep_freed_memory`] leaves
//! mimalloc's own reading of it alone.

pub use mimalloc::MiMalloc;

/// The environment variable through which mimalloc's purge delay can be set by hand.
pub const PURGE_DELAY_VARIABLE: &str = "MIMALLOC_PURGE_DELAY";

/// `mi_option_purge_delay` in mimalloc's `mi_option_e` (the same position in its v2 and v3 headers);
/// libmimalloc-sys does not name it.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Tells mimalloc never to return freed memory to the OS, unless [`PURGE_DELAY_VARIABLE`] is set, and
/// returns whether it did. It only has an effect when mimalloc is the global allocator.
pub fn keep_freed_memory() -> bool {
    if std::env::var_os(PURGE_DELAY_VARIABLE).is_some() {
        return false;
    }
    // SAFETY: mi_option_set only stores the value in mimalloc's option table, which mimalloc reads
    // whenever it considers purging; options may be set at any time, from any thread.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    true
}

/// mimalloc's current purge delay in milliseconds (-1: never purge).
// C's `long` is 64 bits here but 32 on Windows, where the conversion is not useless.
#[allow(clippy::useless_conversion)]
pub fn purge_delay_ms() -> i64 {
    // SAFETY: mi_option_get reads mimalloc's option table (initialising it from the environment on the
    // first call); it has no preconditions.
    i64::from(unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) })
}
