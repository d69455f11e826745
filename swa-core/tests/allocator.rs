//! The training allocator's setting: purging freed memory is off after `keep_freed_memory`, unless the
//! user set mimalloc's environment variable, which then wins.

use swa_core::allocator::{keep_freed_memory, purge_delay_ms, PURGE_DELAY_VARIABLE};

#[global_allocator]
static ALLOCATOR: swa_core::allocator::MiMalloc = swa_core::allocator::MiMalloc;

#[test]
fn freed_memory_is_kept_unless_the_environment_says_otherwise() {
    let user_setting = std::env::var(PURGE_DELAY_VARIABLE).ok();
    let before = purge_delay_ms();
    let changed = keep_freed_memory();
    match user_setting {
        None => {
            assert!(
                changed,
                "nothing in the environment, so the setting must be applied"
            );
            assert_ne!(
                before, -1,
                "mimalloc purges by default; the test would prove nothing"
            );
            assert_eq!(purge_delay_ms(), -1, "purging must be off");
        }
        Some(value) => {
            assert!(!changed, "{PURGE_DELAY_VARIABLE}={value} must win");
            assert_eq!(
                purge_delay_ms(),
                before,
                "the user's setting must be left alone"
            );
        }
    }
}
