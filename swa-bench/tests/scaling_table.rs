//! The projected scaling tables of docs/DISTRIBUTED.md, computed here from the networks as swa-models
//! builds them (their parameter counts and forward FLOPs) and the cost model of
//! `swa_models::distributed::scaling`: the test fails when the document no longer says what the code
//! computes. `SWA_UPDATE_DOCS=1 cargo test -p swa-bench --test scaling_table` rewrites the tables.

use std::path::PathBuf;

use swa_bench::flops::forward_flops_per_image;
use swa_core::CpuBackend;
use swa_models::distributed::scaling::{efficiency_table, AllReduce, Link, Workload};
use swa_models::module::parameter_count;
use swa_models::Architecture;

/// The FLOP rate a node is assumed to sustain on a training step's convolutions and matrix products:
/// about two thirds of an NVIDIA V100's 15.7 TFLOP/s f32 peak.
const SUSTAINED_FLOPS: f64 = 10e12;
/// Images per node and step.
const BATCH_PER_NODE: usize = 128;
const NODES: [usize; 4] = [8, 16, 32, 64];

/// The paper's networks, CIFAR-100 ones with 100 classes, ImageNet ones with 1000.
const NETWORKS: [&str; 7] = [
    "vgg16",
    "preresnet164",
    "wrn28x10",
    "shakeshake26-2x64d",
    "pyramidnet272a200-bottleneck",
    "resnet50",
    "densenet161",
];

fn workloads() -> Vec<Workload> {
    let backend = CpuBackend::with_threads(1);
    NETWORKS
        .iter()
        .map(|name| {
            let architecture: Architecture = name.parse().expect("a network of the paper");
            let classes = if architecture.is_imagenet() {
                1000
            } else {
                100
            };
            let network = architecture
                .build(&backend, classes, 0)
                .expect("building the network");
            let forward =
                forward_flops_per_image(architecture, classes).expect("counting FLOPs") as f64;
            // A training step costs about three forward passes: forward, input and weight gradients.
            Workload {
                name: (*name).to_owned(),
                parameters: parameter_count(network.as_ref()),
                images_per_second: SUSTAINED_FLOPS / (3.0 * forward),
            }
        })
        .collect()
}

/// The text between `<!-- name -->` and `<!-- /name -->`.
fn section<'a>(document: &'a str, name: &str) -> Option<(usize, usize, &'a str)> {
    let open = format!("<!-- {name} -->\n");
    let close = format!("<!-- /{name} -->");
    let start = document.find(&open)? + open.len();
    let end = start + document[start..].find(&close)?;
    Some((start, end, &document[start..end]))
}

#[test]
fn the_documented_scaling_tables_are_the_computed_ones() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/DISTRIBUTED.md");
    let mut document = std::fs::read_to_string(&path).expect("docs/DISTRIBUTED.md");
    let workloads = workloads();
    let links = [
        ("10G", Link::gigabits(10.0)),
        ("100G", Link::gigabits(100.0)),
    ];
    let tables = [
        ("scaling-table-ring", AllReduce::Ring),
        ("scaling-table-gather-broadcast", AllReduce::GatherBroadcast),
    ];
    let update = std::env::var_os("SWA_UPDATE_DOCS").is_some();
    for (name, all_reduce) in tables {
        let computed = efficiency_table(&workloads, BATCH_PER_NODE, &NODES, &links, all_reduce);
        let (start, end, written) = section(&document, name)
            .unwrap_or_else(|| panic!("{}: no section `{name}`", path.display()));
        if update {
            document.replace_range(start..end, &computed);
        } else {
            assert_eq!(
                written,
                computed,
                "{}: the table `{name}` is out of date; rerun with SWA_UPDATE_DOCS=1",
                path.display()
            );
        }
    }
    if update {
        std::fs::write(&path, document).expect("writing docs/DISTRIBUTED.md");
    }
}
