//! The cost model of data-parallel training: how much of each step a node spends computing and how much
//! exchanging gradients, and so how well training scales with the number of nodes on a given network.
//!
//! A step on `N` nodes computes the gradients of each node's `b` images (`b / throughput` seconds, the
//! throughput a node reaches alone at batch `b`) and then sums the gradients, `S = 4·P` bytes for `P`
//! f32 parameters, over the nodes. Without overlap of the two, the step takes their sum, and the
//! efficiency (the speed-up over one node divided by `N`) is `compute / (compute + communication)`.
//!
//! Two ways of summing are modelled, each as the bytes that cross the busiest node's link and the
//! messages it waits for (`latency` each):
//!
//! - [`AllReduce::Ring`], the bandwidth-optimal ring all-reduce of NCCL and Horovod: a reduce-scatter and
//!   an all-gather, `2(N−1)/N·S` bytes sent and received per node in `2(N−1)` messages;
//! - [`AllReduce::GatherBroadcast`], what `distributed::mpi::MpiCommunicator` does so that the sum is added
//!   in rank order and the same on every rank: rank 0 gathers every rank's gradients, `(N−1)·S` bytes
//!   into its link in `N−1` messages, and broadcasts the sum, modelled as a scatter and an all-gather
//!   (`2(N−1)/N·S` bytes, `2·⌈log₂ N⌉` messages), as MPI libraries broadcast large messages.
//!
//! ```
//! use swa_models::distributed::scaling::{projected_step, AllReduce, Link};
//!
//! // 25.6 M parameters, a node training 400 images/s at batch 128, 16 nodes on 10 Gbit/s.
//! let step = projected_step(25_557_032, 400.0, 128, 16, Link::gigabits(10.0), AllReduce::Ring);
//! assert!((step.compute_seconds - 0.32).abs() < 1e-12);
//! assert!(step.efficiency() > 0.6 && step.efficiency() < 0.7);
//! ```

/// A node's network link.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Link {
    /// Bits per second in each direction.
    pub bits_per_second: f64,
    /// Seconds from sending a message to its start arriving.
    pub latency_seconds: f64,
}

impl Link {
    /// The latency assumed for Ethernet between nodes (TCP through the kernel): 20 µs.
    pub const ETHERNET_LATENCY: f64 = 20e-6;

    /// A link of `gigabits` Gbit/s with [`Link::ETHERNET_LATENCY`].
    pub fn gigabits(gigabits: f64) -> Self {
        Self {
            bits_per_second: gigabits * 1e9,
            latency_seconds: Self::ETHERNET_LATENCY,
        }
    }
}

/// How the gradients are summed over the nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllReduce {
    /// Reduce-scatter and all-gather around a ring.
    Ring,
    /// Gather at rank 0, add in rank order, broadcast: `distributed::mpi::MpiCommunicator`'s sum.
    GatherBroadcast,
}

impl AllReduce {
    /// The bytes that cross the busiest node's link, in its busier direction, to sum `bytes` over `nodes`.
    pub fn bytes_on_busiest_link(self, bytes: f64, nodes: usize) -> f64 {
        if nodes < 2 {
            return 0.0;
        }
        let n = nodes as f64;
        let ring = 2.0 * (n - 1.0) / n * bytes;
        match self {
            Self::Ring => ring,
            // Rank 0 receives every other rank's gradients, then sends its share of the broadcast.
            Self::GatherBroadcast => (n - 1.0) * bytes + ring,
        }
    }

    /// The messages a node waits for one after the other.
    pub fn messages(self, nodes: usize) -> usize {
        if nodes < 2 {
            return 0;
        }
        let rounds = usize::BITS - (nodes - 1).leading_zeros();
        match self {
            Self::Ring => 2 * (nodes - 1),
            Self::GatherBroadcast => nodes - 1 + 2 * rounds as usize,
        }
    }

    /// Seconds to sum `bytes` over `nodes` linked by `link`.
    pub fn seconds(self, bytes: f64, nodes: usize, link: Link) -> f64 {
        self.bytes_on_busiest_link(bytes, nodes) * 8.0 / link.bits_per_second
            + self.messages(nodes) as f64 * link.latency_seconds
    }
}

/// One projected training step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProjectedStep {
    /// Seconds computing a node's share of the batch.
    pub compute_seconds: f64,
    /// Seconds summing the gradients.
    pub communication_seconds: f64,
}

impl ProjectedStep {
    /// The speed-up over one node divided by the number of nodes: the share of the step spent computing.
    pub fn efficiency(&self) -> f64 {
        self.compute_seconds / (self.compute_seconds + self.communication_seconds)
    }
}

/// The step of a network of `parameters` f32 parameters on `nodes` nodes, each training
/// `batch_per_node` images at `images_per_second` (its throughput alone at that batch), the gradients
/// summed by `all_reduce` over `link`.
pub fn projected_step(
    parameters: usize,
    images_per_second: f64,
    batch_per_node: usize,
    nodes: usize,
    link: Link,
    all_reduce: AllReduce,
) -> ProjectedStep {
    let bytes = 4.0 * parameters as f64;
    ProjectedStep {
        compute_seconds: batch_per_node as f64 / images_per_second,
        communication_seconds: all_reduce.seconds(bytes, nodes, link),
    }
}

/// A network in a scaling table: its name, parameter count and a node's training throughput alone.
#[derive(Clone, Debug, PartialEq)]
pub struct Workload {
    /// The network's name.
    pub name: String,
    /// Its parameters.
    pub parameters: usize,
    /// Images per second a node trains at the table's batch per node.
    pub images_per_second: f64,
}

/// A Markdown table of the projected efficiency of each workload at each node count over each link
/// (columns: node counts within links), its gradients summed by `all_reduce`, `batch_per_node` images
/// per node and step. Percentages are rounded to whole numbers.
pub fn efficiency_table(
    workloads: &[Workload],
    batch_per_node: usize,
    nodes: &[usize],
    links: &[(&str, Link)],
    all_reduce: AllReduce,
) -> String {
    let mut header = String::from("| network | parameters | gradients (MB) | img/s per node |");
    let mut rule = String::from("|---|---:|---:|---:|");
    for (label, _) in links {
        for n in nodes {
            header.push_str(&format!(" {n} × {label} |"));
            rule.push_str("---:|");
        }
    }
    let mut table = format!("{header}\n{rule}\n");
    for workload in workloads {
        table.push_str(&format!(
            "| {} | {:.1} M | {:.0} | {:.0} |",
            workload.name,
            workload.parameters as f64 / 1e6,
            4.0 * workload.parameters as f64 / 1e6,
            workload.images_per_second
        ));
        for (_, link) in links {
            for &n in nodes {
                let step = projected_step(
                    workload.parameters,
                    workload.images_per_second,
                    batch_per_node,
                    n,
                    *link,
                    all_reduce,
                );
                table.push_str(&format!(" {:.0}% |", 100.0 * step.efficiency()));
            }
        }
        table.push('\n');
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ring_moves_twice_the_gradients_less_one_share() {
        let bytes = 1000.0;
        assert_eq!(AllReduce::Ring.bytes_on_busiest_link(bytes, 1), 0.0);
        assert_eq!(AllReduce::Ring.bytes_on_busiest_link(bytes, 2), 1000.0);
        assert_eq!(AllReduce::Ring.bytes_on_busiest_link(bytes, 8), 1750.0);
        assert_eq!(AllReduce::Ring.messages(8), 14);
    }

    #[test]
    fn gathering_at_rank_zero_loads_its_link_with_every_other_rank() {
        let bytes = 1000.0;
        assert_eq!(
            AllReduce::GatherBroadcast.bytes_on_busiest_link(bytes, 8),
            7000.0 + 1750.0
        );
        // 7 gathered messages and 3 rounds of scatter and of all-gather.
        assert_eq!(AllReduce::GatherBroadcast.messages(8), 7 + 6);
        assert_eq!(AllReduce::GatherBroadcast.messages(9), 8 + 8);
    }

    #[test]
    fn efficiency_is_the_share_of_the_step_spent_computing() {
        // 1 M parameters (4 MB) on 2 nodes at 8 Mbit/s without latency: 4 MB in 4 s; 100 images at 50
        // img/s: 2 s computing, so a third of the step.
        let link = Link {
            bits_per_second: 8e6,
            latency_seconds: 0.0,
        };
        let step = projected_step(1_000_000, 50.0, 100, 2, link, AllReduce::Ring);
        assert_eq!(step.compute_seconds, 2.0);
        assert_eq!(step.communication_seconds, 4.0);
        assert!((step.efficiency() - 1.0 / 3.0).abs() < 1e-15);
        let alone = projected_step(1_000_000, 50.0, 100, 1, link, AllReduce::Ring);
        assert_eq!(alone.efficiency(), 1.0);
    }

    #[test]
    fn the_table_has_a_column_per_link_and_node_count() {
        let workloads = [Workload {
            name: "net".into(),
            parameters: 1_000_000,
            images_per_second: 50.0,
        }];
        let link = Link {
            bits_per_second: 8e6,
            latency_seconds: 0.0,
        };
        let table = efficiency_table(&workloads, 100, &[2], &[("slow", link)], AllReduce::Ring);
        assert_eq!(
            table,
            "| network | parameters | gradients (MB) | img/s per node | 2 × slow |\n\
             |---|---:|---:|---:|---:|\n\
             | net | 1.0 M | 4 | 50 | 33% |\n"
        );
    }
}
