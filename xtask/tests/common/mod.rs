//! What the end-to-end tests of the xtask binary share.

use std::process::Output;

/// The command's standard output, after asserting that it succeeded (both streams shown otherwise).
pub fn assert_success(output: &Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        output.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}
