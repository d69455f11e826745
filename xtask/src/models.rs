//! `cargo xtask models`: every network of the paper with its class count and parameter count, built on the
//! CPU exactly as training builds it: the CIFAR networks for 10 and 100 classes, the ImageNet ones for
//! 1000.

use swa_core::CpuBackend;
use swa_models::module::parameter_count;
use swa_models::Architecture;

/// Prints one line per network and class count (CIFAR-10 and CIFAR-100, or ImageNet): name, classes,
/// parameters.
pub fn run() -> anyhow::Result<()> {
    let backend = CpuBackend::new();
    // The name column fits the longest name.
    let width = Architecture::NAMED
        .iter()
        .map(|a| a.to_string().len())
        .max()
        .unwrap_or(0)
        .max("network".len());
    println!(
        "{:<width$} {:>7} {:>12}",
        "network", "classes", "parameters"
    );
    for architecture in Architecture::NAMED {
        let name = architecture.to_string();
        let classes: &[usize] = if architecture.is_imagenet() {
            &[1000]
        } else {
            &[10, 100]
        };
        for &classes in classes {
            let net = architecture.build(&backend, classes, 0)?;
            println!(
                "{:<width$} {:>7} {:>12}",
                name,
                classes,
                parameter_count(net.as_ref())
            );
        }
    }
    Ok(())
}
