//! Data-parallel training over several processes ("ranks"), as PyTorch's `DistributedDataParallel` does
//! it, through the few collectives a [`Communicator`] offers.
//!
//! Every rank holds the whole network and a shard of every global batch ([`ShardedBatches`]: all ranks
//! draw the same shuffled batches from the same seed and each keeps its slice). A step
//! ([`crate::step::sgd_step_synchronized`] with [`DataParallel`]) agrees on the global batch's loss,
//! all-reduces the gradients weighted by each rank's share of the batch, and broadcasts rank 0's
//! BatchNorm running statistics; every rank then applies the same update to the same weights, so the
//! weights, the SWA average and the evaluations stay identical on every rank without being exchanged.
//! BatchNorm normalises each rank's shard with that shard's statistics, as in PyTorch's DDP, or, with
//! [`BatchNormMode::Synchronized`] (PyTorch's `SyncBatchNorm`, [`crate::layers::BatchNormSync`]), with the
//! statistics of the global batch, so that networks with BatchNorm too train as one process would.
//!
//! Sums over ranks are taken in rank order ([`Communicator::all_reduce_sum_f32`]), so a run gives the
//! same result every time for a given number of ranks, and on every rank. Compared with one process
//! training on the global batch, only the order of floating-point additions differs (for networks without
//! BatchNorm, whose result does not depend on how a batch is split).
//!
//! [`update_bn_across_ranks`] recomputes BatchNorm statistics with each rank passing its shard and the
//! ranks' statistics combined by their image counts: the result is what one process passing all the
//! ranks' batches would compute.
//!
//! [`evaluate_across_ranks`] and [`add_ensemble_member_across_ranks`] (Fast Geometric Ensembling) share
//! the test set between the ranks, batch by batch, and give every rank the metrics and ensemble
//! probabilities one process computes, to the bit; the trainer evaluates through them.
//! [`crate::geometry::run_survey_across_ranks`] shares a loss-surface survey's points.
//!
//! [`merge_averages_across_ranks`] averages the ranks' weights (or their own averages) by count into one
//! held by every rank: the last phase of SWAP ([`crate::protocol::run_swap`]).
//!
//! [`SingleProcess`] is the communicator of one process; behind the feature `mpi`,
//! `distributed::mpi::MpiCommunicator` is one over MPI (OpenMPI through the `mpi` crate), for runs started
//! with `mpirun`.

mod evaluation;
#[cfg(feature = "mpi")]
pub mod mpi;
pub mod scaling;

use std::borrow::Borrow;
use std::sync::Arc;
use std::time::Duration;

use swa_core::averaging::{AverageState, WeightAverage, WeightAveraging};
use swa_core::backend::{Backend, HasShape};
use swa_core::params::TensorRole;
use swa_core::seed::splitmix64_mix;

use crate::batch::{BatchResult, BatchSource, HostBatch};
use crate::bn::{has_batch_norm, update_bn};
use crate::error::TrainError;
use crate::evaluate::MetricsAccumulator;
use crate::layers::BatchNormSync;
use crate::module::{read_tensors, write_tensors, Module};
use crate::step::StepSync;

pub use evaluation::{add_ensemble_member_across_ranks, evaluate_across_ranks};

/// Why a collective operation between the ranks failed. Each names the rank that saw it and what it was
/// doing.
#[derive(Debug, thiserror::Error)]
pub enum DistributedError {
    /// A collective waited longer than its timeout for the other ranks: one has died or stalled. The
    /// watchdog of `distributed::mpi::MpiCommunicator` prints this and aborts the whole run.
    #[error(
        "rank {rank} of {ranks}: {operation} waited {waited:.1?} for the other ranks (timeout \
         {timeout:?}); a rank has died or stalled, so the run stops"
    )]
    Stalled {
        /// The rank that waited.
        rank: usize,
        /// The number of ranks.
        ranks: usize,
        /// What it was waiting in.
        operation: String,
        /// How long it waited.
        waited: Duration,
        /// The timeout of collectives.
        timeout: Duration,
    },
    /// The ranks disagree about something they must share (the shape of a buffer, the checkpoint to
    /// resume from).
    #[error("rank {rank} of {ranks}: {operation}: {detail}")]
    Mismatch {
        /// The rank that noticed.
        rank: usize,
        /// The number of ranks.
        ranks: usize,
        /// What it was doing.
        operation: String,
        /// What differs.
        detail: String,
    },
    /// The message-passing library could not be started.
    #[error("starting MPI: {0}")]
    Initialisation(String),
}

/// The collectives data-parallel training needs. Every rank must call the same operations in the same
/// order with buffers of the same length; `operation` names the call in errors and in the watchdog's
/// message.
pub trait Communicator: Send + Sync {
    /// This process's rank, from 0.
    fn rank(&self) -> usize;

    /// The number of ranks.
    fn size(&self) -> usize;

    /// Replaces `values` on every rank by their element-wise sum over the ranks, added in rank order
    /// (rank 0's, plus rank 1's, plus …): the same on every rank, and from run to run for a given number
    /// of ranks.
    fn all_reduce_sum_f32(
        &self,
        operation: &str,
        values: &mut [f32],
    ) -> Result<(), DistributedError>;

    /// [`Communicator::all_reduce_sum_f32`] in double precision, for statistics and counts.
    fn all_reduce_sum_f64(
        &self,
        operation: &str,
        values: &mut [f64],
    ) -> Result<(), DistributedError>;

    /// Rank 0 receives every rank's `values`, one after the other in rank order (`Some`); the other ranks
    /// receive nothing (`None`). Every rank must pass the same number of values.
    fn gather_f32(
        &self,
        operation: &str,
        values: &[f32],
    ) -> Result<Option<Vec<f32>>, DistributedError>;

    /// Replaces `values` on every rank by rank 0's.
    fn broadcast_f32(&self, operation: &str, values: &mut [f32]) -> Result<(), DistributedError>;

    /// Replaces `values` on every rank by rank 0's.
    fn broadcast_u64(&self, operation: &str, values: &mut [u64]) -> Result<(), DistributedError>;

    /// Returns once every rank has called it.
    fn barrier(&self, operation: &str) -> Result<(), DistributedError>;
}

/// The communicator of a process that trains alone: rank 0 of 1, every collective a no-op.
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleProcess;

impl Communicator for SingleProcess {
    fn rank(&self) -> usize {
        0
    }

    fn size(&self) -> usize {
        1
    }

    fn all_reduce_sum_f32(&self, _: &str, _: &mut [f32]) -> Result<(), DistributedError> {
        Ok(())
    }

    fn all_reduce_sum_f64(&self, _: &str, _: &mut [f64]) -> Result<(), DistributedError> {
        Ok(())
    }

    fn gather_f32(&self, _: &str, values: &[f32]) -> Result<Option<Vec<f32>>, DistributedError> {
        Ok(Some(values.to_vec()))
    }

    fn broadcast_f32(&self, _: &str, _: &mut [f32]) -> Result<(), DistributedError> {
        Ok(())
    }

    fn broadcast_u64(&self, _: &str, _: &mut [u64]) -> Result<(), DistributedError> {
        Ok(())
    }

    fn barrier(&self, _: &str) -> Result<(), DistributedError> {
        Ok(())
    }
}

/// The seed a rank draws its dropout masks from, for a step or pass seeded `seed`: each rank's images get
/// masks of their own. Rank 0 keeps `seed`, so that one process trains as it always did.
pub fn rank_seed(seed: u64, rank: usize) -> u64 {
    if rank == 0 {
        seed
    } else {
        splitmix64_mix(seed ^ (rank as u64).rotate_left(32))
    }
}

/// How the BatchNorm layers of a data-parallel run normalise a training batch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BatchNormMode {
    /// Each rank normalises its shard with the shard's statistics, and after each step every rank takes
    /// rank 0's running statistics: PyTorch's `DistributedDataParallel` with `nn.BatchNorm2d`. The result
    /// depends on how the global batch is split.
    #[default]
    PerRank,
    /// Every rank normalises with the statistics of the global batch, and the backward pass is that of
    /// one process normalising the global batch ([`crate::layers::BatchNormSync`], PyTorch's
    /// `SyncBatchNorm`): the ranks train as one process on the global batch, at the cost of two small
    /// all-reduces per BatchNorm layer and step.
    Synchronized,
}

/// The [`StepSync`] of data-parallel training over `communicator`: the global loss, the gradients
/// averaged over the global batch, and BatchNorm as [`BatchNormMode`] says (by default rank 0's running
/// statistics on every rank). With one rank it exchanges nothing and changes nothing.
pub struct DataParallel {
    communicator: Arc<dyn Communicator>,
    batch_norm: BatchNormMode,
    /// The images of the global batch, known from [`StepSync::reduce_loss`].
    global_images: usize,
    /// The gradients of the step, flattened for the all-reduce (kept to reuse its allocation).
    buffer: Vec<f32>,
}

impl DataParallel {
    /// Steps synchronised over `communicator`, BatchNorm per rank.
    pub fn new(communicator: Arc<dyn Communicator>) -> Self {
        Self {
            communicator,
            batch_norm: BatchNormMode::PerRank,
            global_images: 0,
            buffer: Vec::new(),
        }
    }

    /// The same steps with BatchNorm as `mode` says.
    pub fn with_batch_norm(mut self, mode: BatchNormMode) -> Self {
        self.batch_norm = mode;
        self
    }

    /// The same steps with synchronised BatchNorm ([`BatchNormMode::Synchronized`]).
    pub fn with_synchronized_batch_norm(self) -> Self {
        self.with_batch_norm(BatchNormMode::Synchronized)
    }
}

impl<B: Backend> StepSync<B> for DataParallel {
    fn batch_norm_sync(&self) -> Option<BatchNormSync> {
        // One rank's batch is the global batch: its own statistics are the global ones.
        (self.batch_norm == BatchNormMode::Synchronized && self.communicator.size() > 1)
            .then(|| BatchNormSync::new(Arc::clone(&self.communicator)))
    }

    fn reduce_loss(&mut self, loss: f32, images: usize) -> Result<f32, TrainError> {
        if self.communicator.size() == 1 {
            self.global_images = images;
            return Ok(loss);
        }
        let mut sums = [f64::from(loss) * images as f64, images as f64];
        self.communicator
            .all_reduce_sum_f64("the loss all-reduce", &mut sums)?;
        self.global_images = sums[1] as usize;
        Ok((sums[0] / sums[1]) as f32)
    }

    fn reduce_gradients(
        &mut self,
        backend: &B,
        model: &mut dyn Module<B>,
        images: usize,
    ) -> Result<(), TrainError> {
        if self.communicator.size() == 1 {
            return Ok(());
        }
        // Each rank's gradient is the mean over its images: weighted by its share of the global batch, the
        // sum over ranks is the mean over the global batch.
        let share = images as f32 / self.global_images.max(1) as f32;
        self.buffer.clear();
        let mut failure = None;
        model.visit_params_mut(&mut |name, param| {
            if failure.is_some() {
                return;
            }
            let Some(grad) = &param.grad else { return };
            match backend.to_host(grad) {
                Ok(values) => self.buffer.extend(values.iter().map(|g| g * share)),
                Err(source) => {
                    failure = Some(TrainError::Backend {
                        context: format!("reading the gradient of `{name}`"),
                        source,
                    })
                }
            }
        });
        if let Some(failure) = failure {
            return Err(failure);
        }
        self.communicator
            .all_reduce_sum_f32("the gradient all-reduce", &mut self.buffer)?;
        let mut offset = 0;
        model.visit_params_mut(&mut |name, param| {
            if failure.is_some() {
                return;
            }
            let Some(grad) = &mut param.grad else { return };
            let len = grad.numel();
            let reduced = &self.buffer[offset..offset + len];
            offset += len;
            match backend.from_host(reduced, grad.dims()) {
                Ok(tensor) => *grad = tensor,
                Err(source) => {
                    failure = Some(TrainError::Backend {
                        context: format!("writing the reduced gradient of `{name}`"),
                        source,
                    })
                }
            }
        });
        if let Some(failure) = failure {
            return Err(failure);
        }
        if self.batch_norm == BatchNormMode::Synchronized {
            // Every rank moved its running statistics by the same global ones: they agree already.
            return Ok(());
        }
        // PyTorch's DDP gives every rank rank 0's buffers; they only serve evaluation and checkpoints, but
        // those must not depend on the rank.
        broadcast_tensors(
            self.communicator.as_ref(),
            backend,
            model,
            TensorRole::BatchNormStatistic,
        )
    }
}

/// Replaces `model`'s tensors of `role` on every rank by rank 0's.
pub fn broadcast_tensors<B: Backend>(
    communicator: &dyn Communicator,
    backend: &B,
    model: &mut dyn Module<B>,
    role: TensorRole,
) -> Result<(), TrainError> {
    if communicator.size() == 1 {
        return Ok(());
    }
    let mut values = read_tensors(backend, model, role)?;
    communicator.broadcast_f32(&format!("the broadcast of {role:?} tensors"), &mut values)?;
    write_tensors(backend, model, role, &values)
}

/// [`update_bn`] over the ranks: each rank passes `batches`, its shard of the training data, and every
/// rank ends with the statistics one process would compute from all the ranks' batches. Returns the
/// number of images of all ranks.
///
/// `update_bn` makes each statistic the image-weighted mean of the per-batch statistics; a rank's result
/// over its `n` images enters the combination with weight `n`, which is the same mean. The sums are taken
/// in double precision in rank order, so ranks agree bit for bit. Each rank draws its dropout masks
/// (networks with dropout) from [`rank_seed`].
pub fn update_bn_across_ranks<B: Backend, I>(
    communicator: &dyn Communicator,
    backend: &B,
    model: &mut dyn Module<B>,
    batches: I,
    seed: u64,
) -> Result<usize, TrainError>
where
    I: IntoIterator,
    I::Item: Borrow<HostBatch>,
{
    let seen = update_bn(
        backend,
        model,
        batches,
        rank_seed(seed, communicator.rank()),
    )?;
    if communicator.size() == 1 || !has_batch_norm(model) {
        return Ok(seen);
    }
    let statistics = read_tensors(backend, model, TensorRole::BatchNormStatistic)?;
    let mut counters = Vec::new();
    model.visit_batch_counters(&mut |_, count| counters.push(count as f64));
    let mut sums: Vec<f64> = statistics
        .iter()
        .map(|&s| f64::from(s) * seen as f64)
        .chain(counters.iter().copied())
        .chain(std::iter::once(seen as f64))
        .collect();
    communicator.all_reduce_sum_f64("the BatchNorm statistics all-reduce", &mut sums)?;
    let total = sums[sums.len() - 1];
    if total > 0.0 {
        let combined: Vec<f32> = sums[..statistics.len()]
            .iter()
            .map(|s| (s / total) as f32)
            .collect();
        write_tensors(backend, model, TensorRole::BatchNormStatistic, &combined)?;
    }
    let mut summed_counters = sums[statistics.len()..sums.len() - 1].iter();
    model.visit_batch_counters_mut(&mut |_, count| {
        if let Some(&sum) = summed_counters.next() {
            *count = sum as u64;
        }
    });
    Ok(total as usize)
}

/// Merges the ranks' weight averages into one, the same on every rank: the last phase of SWAP (Gupta et al.,
/// *Stochastic Weight Averaging in Parallel*, 2020), where ranks that trained independently from the same
/// weights average what they reached. Each rank passes its `average` (of its own final weights, count 1,
/// or of its own snapshots); rank 0 merges the others' into its own in rank order with
/// [`WeightAverage::merge`] (weighted by their counts) and every rank receives the result, whose count is
/// the sum of the ranks'. Recompute BatchNorm for it next ([`update_bn_across_ranks`]).
///
/// Fails on every rank with [`DistributedError::Mismatch`] when the ranks' averages hold different numbers
/// of values, and with [`TrainError::Averaging`] for averages that do not merge by count (EMA).
pub fn merge_averages_across_ranks<B: Backend>(
    communicator: &dyn Communicator,
    backend: &B,
    average: &mut WeightAverage<B>,
) -> Result<(), TrainError> {
    let (rank, ranks) = (communicator.rank(), communicator.size());
    if ranks == 1 {
        return Ok(());
    }
    let mut state = average.to_state(backend)?;
    let values: Vec<f32> = state
        .tensors
        .iter()
        .filter_map(|tensor| tensor.values.as_deref())
        .flatten()
        .copied()
        .collect();
    // Every rank's count in its own slot, and the sum of the value counts to check that they agree.
    let mut counts = vec![0.0f64; ranks + 1];
    counts[rank] = state.n_averaged as f64;
    counts[ranks] = values.len() as f64;
    communicator.all_reduce_sum_f64("the averages' counts all-reduce", &mut counts)?;
    if counts[ranks] != (values.len() * ranks) as f64 {
        return Err(DistributedError::Mismatch {
            rank,
            ranks,
            operation: "merging the ranks' averages".into(),
            detail: format!(
                "this rank's average holds {} values, the ranks' {} together",
                values.len(),
                counts[ranks]
            ),
        }
        .into());
    }
    let gathered = communicator.gather_f32("the averages' gather", &values)?;
    let mut merged_values = vec![0.0; values.len()];
    if let Some(all) = gathered {
        for (other_rank, other_values) in all.chunks_exact(values.len().max(1)).enumerate().skip(1)
        {
            let mut other = state.clone();
            set_average_values(&mut other, other_values);
            other.n_averaged = counts[other_rank] as u64;
            average.merge(backend, &WeightAverage::from_state(backend, &other)?)?;
        }
        merged_values = average
            .to_state(backend)?
            .tensors
            .iter()
            .filter_map(|tensor| tensor.values.as_deref())
            .flatten()
            .copied()
            .collect();
    }
    communicator.broadcast_f32("the merged average's broadcast", &mut merged_values)?;
    set_average_values(&mut state, &merged_values);
    state.n_averaged = counts[..ranks].iter().sum::<f64>() as u64;
    *average = WeightAverage::from_state(backend, &state)?;
    Ok(())
}

/// Replaces the held values of an average's state by `values`, laid out tensor after tensor.
fn set_average_values(state: &mut AverageState, values: &[f32]) {
    let mut offset = 0;
    for held in state.tensors.iter_mut().filter_map(|t| t.values.as_mut()) {
        let len = held.len();
        held.copy_from_slice(&values[offset..offset + len]);
        offset += len;
    }
}

/// Adds the other ranks' images to `metrics`, so that every rank holds the metrics of the global batches.
pub fn combine_metrics(
    communicator: &dyn Communicator,
    metrics: &mut MetricsAccumulator,
) -> Result<(), TrainError> {
    if communicator.size() == 1 {
        return Ok(());
    }
    let mut sums = metrics.sums();
    communicator.all_reduce_sum_f64("the training metrics all-reduce", &mut sums)?;
    metrics.set_sums(sums);
    Ok(())
}

/// A [`BatchSource`] that gives each rank its shard of every training batch of `inner`: all ranks draw the
/// same batches (the same seed, the same order) and rank `r` of `n` keeps the images from `r·b/n` to
/// `(r+1)·b/n` of a batch of `b`. Test batches are not sharded: every rank passes the whole test set,
/// which [`evaluate_across_ranks`] and [`add_ensemble_member_across_ranks`] share out themselves.
///
/// A training batch with fewer images than ranks is an error ([`TrainError::BadBatch`]) on every rank at
/// once, rather than a rank without images.
pub struct ShardedBatches<S> {
    inner: S,
    rank: usize,
    ranks: usize,
}

impl<S: BatchSource> ShardedBatches<S> {
    /// The shard of `communicator`'s rank.
    pub fn new(inner: S, communicator: &dyn Communicator) -> Self {
        Self {
            inner,
            rank: communicator.rank(),
            ranks: communicator.size(),
        }
    }

    /// The source that is sharded.
    pub fn inner(&self) -> &S {
        &self.inner
    }
}

/// Rank `rank` of `ranks`'s slice of `batch`.
pub fn shard(batch: &HostBatch, rank: usize, ranks: usize) -> BatchResult {
    batch.validate()?;
    let images = batch.len();
    if images < ranks || rank >= ranks {
        return Err(TrainError::BadBatch(format!(
            "a batch of {images} images cannot give each of {ranks} ranks one (rank {rank}); use a \
             batch size of at least {ranks}"
        )));
    }
    let start = rank * images / ranks;
    let end = (rank + 1) * images / ranks;
    let per_image = batch.images.len() / images;
    let [_, channels, height, width] = batch.shape;
    Ok(HostBatch {
        images: batch.images[start * per_image..end * per_image].to_vec(),
        shape: [end - start, channels, height, width],
        labels: batch.labels[start..end].to_vec(),
    })
}

impl<S: BatchSource> BatchSource for ShardedBatches<S> {
    fn train_epoch(&self, epoch: usize) -> Box<dyn Iterator<Item = BatchResult> + '_> {
        let (rank, ranks) = (self.rank, self.ranks);
        Box::new(
            self.inner
                .train_epoch(epoch)
                .map(move |batch| batch.and_then(|batch| shard(&batch, rank, ranks))),
        )
    }

    fn train_batches_per_epoch(&self) -> usize {
        self.inner.train_batches_per_epoch()
    }

    fn test(&self) -> Box<dyn Iterator<Item = BatchResult> + '_> {
        self.inner.test()
    }

    fn test_len(&self) -> usize {
        self.inner.test_len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(images: usize) -> HostBatch {
        HostBatch {
            images: (0..images * 2).map(|v| v as f32).collect(),
            shape: [images, 2, 1, 1],
            labels: (0..images as u32).collect(),
        }
    }

    #[test]
    fn shards_cover_the_batch_once_in_order() {
        let whole = batch(7);
        let shards: Vec<HostBatch> = (0..3)
            .map(|rank| shard(&whole, rank, 3).expect("7 images for 3 ranks"))
            .collect();
        assert_eq!(
            shards.iter().map(HostBatch::len).collect::<Vec<_>>(),
            [2, 2, 3]
        );
        let labels: Vec<u32> = shards.iter().flat_map(|s| s.labels.clone()).collect();
        let images: Vec<f32> = shards.iter().flat_map(|s| s.images.clone()).collect();
        assert_eq!(labels, whole.labels);
        assert_eq!(images, whole.images);
        for s in &shards {
            s.validate().expect("a shard is a valid batch");
        }
    }

    #[test]
    fn a_batch_smaller_than_the_ranks_is_refused() {
        let error = shard(&batch(1), 0, 2).expect_err("one image for two ranks");
        assert!(
            error
                .to_string()
                .contains("1 images cannot give each of 2 ranks"),
            "{error}"
        );
    }

    #[test]
    fn rank_zero_keeps_the_seed_and_others_differ() {
        assert_eq!(rank_seed(42, 0), 42);
        assert_ne!(rank_seed(42, 1), 42);
        assert_ne!(rank_seed(42, 1), rank_seed(42, 2));
    }
}
