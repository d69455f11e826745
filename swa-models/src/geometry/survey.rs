//! A survey: many points of weight space, each a linear combination of a few anchor vectors, evaluated in
//! parallel, with every finished point cached so that a killed survey resumes where it stopped.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;

use serde::{Deserialize, Serialize};
use swa_core::backend::Backend;
use swa_core::seed::{fold_words, splitmix64_mix};

use crate::distributed::Communicator;
use crate::error::TrainError;
use crate::geometry::probe::{PointMetrics, SurfaceData, SurfaceProbe};
use crate::geometry::vector::WeightVector;
use crate::geometry::GeometryError;

/// One point of a survey.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SurveyPoint {
    /// Which curve or surface of the survey the point belongs to (`swa/ray-3`, `line`, `plane`).
    pub series: String,
    /// The point's coordinates in the survey's terms, in weight-space distance units (a ray's distance
    /// from its start, the line's signed distance from SWA, a plane's `(x, y)`).
    pub coordinates: Vec<f64>,
    /// The point as `Σ coefficient · anchor`: (anchor index, coefficient) pairs.
    pub terms: Vec<(usize, f64)>,
}

/// Points defined over a list of anchor vectors (solutions, directions, plane bases).
#[derive(Clone, Debug)]
pub struct Survey {
    /// The survey's name (`rays`, `line`, `plane-sgd-swa-start`, …).
    pub name: String,
    /// The vectors the points combine.
    pub anchors: Vec<WeightVector>,
    /// The points, in order.
    pub points: Vec<SurveyPoint>,
}

impl Survey {
    /// Writes point `index` into `buffer` (which must have the anchors' length).
    pub fn point_into(&self, index: usize, buffer: &mut WeightVector) {
        let terms: Vec<(f64, &WeightVector)> = self.points[index]
            .terms
            .iter()
            .map(|&(anchor, c)| (c, &self.anchors[anchor]))
            .collect();
        buffer.set_combination(&terms);
    }

    /// Point `index` as a new vector.
    pub fn point(&self, index: usize) -> WeightVector {
        let len = self.anchors.first().map_or(0, WeightVector::len);
        let mut buffer = WeightVector(vec![0.0; len]);
        self.point_into(index, &mut buffer);
        buffer
    }

    /// A fingerprint of everything a point's metrics depend on besides the network: the anchors' bits, the
    /// points' definitions and `context` (the data and the weight decay). A cache written for another
    /// fingerprint is not reused.
    pub fn fingerprint(&self, context: &[u64]) -> u64 {
        let mut words: Vec<u64> = context.to_vec();
        for anchor in &self.anchors {
            words.push(anchor.len() as u64);
            // Two coordinates a word, a chunk at a time, so that a vector of tens of millions of
            // coordinates is hashed without a copy of it.
            let mut state = 0;
            for chunk in anchor.0.chunks(4096) {
                let chunk_words: Vec<u64> = chunk
                    .chunks(2)
                    .map(|pair| {
                        let high = pair.get(1).map_or(0, |v| v.to_bits() as u64);
                        (high << 32) | pair[0].to_bits() as u64
                    })
                    .collect();
                state = fold_words(state, &chunk_words);
            }
            words.push(state);
        }
        for point in &self.points {
            words.push(point.terms.len() as u64);
            for &(anchor, c) in &point.terms {
                words.push(anchor as u64);
                words.push(c.to_bits());
            }
        }
        splitmix64_mix(fold_words(0, &words))
    }
}

/// The cache of a survey's finished points: a JSON-lines file whose first line names the survey and its
/// fingerprint, and every further line one finished point. A line cut short by a kill is dropped on
/// reading, and the point evaluated again.
#[derive(Debug)]
pub struct PointCache {
    path: PathBuf,
    file: File,
    done: Vec<Option<PointMetrics>>,
}

#[derive(Serialize, Deserialize, PartialEq, Debug)]
struct CacheHeader {
    survey: String,
    fingerprint: String,
    points: usize,
}

#[derive(Serialize, Deserialize)]
struct CachedPoint {
    index: usize,
    metrics: PointMetrics,
}

impl PointCache {
    /// Opens (or creates) the cache of `survey` at `path`. A cache of another survey or fingerprint is an
    /// error that names the file, never silently overwritten.
    pub fn open(path: &Path, survey: &Survey, fingerprint: u64) -> Result<Self, GeometryError> {
        let header = CacheHeader {
            survey: survey.name.clone(),
            fingerprint: format!("{fingerprint:016x}"),
            points: survey.points.len(),
        };
        let io = |source| GeometryError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut done = vec![None; survey.points.len()];
        let text = match std::fs::read(path) {
            Ok(text) => Some(text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io(e)),
        };
        // Everything after the last newline is a line a kill cut short; a file without a complete line
        // (killed before its header was written) is started anew.
        let complete = text
            .as_ref()
            .and_then(|t| t.iter().rposition(|&b| b == b'\n'))
            .map(|end| end + 1);
        if let (Some(text), Some(complete)) = (text, complete) {
            let reader = BufReader::new(&text[..complete]);
            let mut lines = reader.lines();
            let first = lines.next().transpose().map_err(io)?;
            let found: Option<CacheHeader> =
                first.as_deref().and_then(|l| serde_json::from_str(l).ok());
            if found.as_ref() != Some(&header) {
                return Err(GeometryError::CacheMismatch {
                    path: path.to_path_buf(),
                    expected: format!(
                        "{} ({} points, {})",
                        header.survey, header.points, header.fingerprint
                    ),
                });
            }
            for (number, line) in lines.enumerate() {
                let line = line.map_err(io)?;
                let point: CachedPoint =
                    serde_json::from_str(&line).map_err(|source| GeometryError::CacheLine {
                        path: path.to_path_buf(),
                        line: number + 2,
                        source,
                    })?;
                let slot =
                    done.get_mut(point.index)
                        .ok_or_else(|| GeometryError::CacheMismatch {
                            path: path.to_path_buf(),
                            expected: format!("point indices below {}", header.points),
                        })?;
                *slot = Some(point.metrics);
            }
            if complete < text.len() {
                let file = OpenOptions::new().write(true).open(path).map_err(io)?;
                file.set_len(complete as u64).map_err(io)?;
            }
            let file = OpenOptions::new().append(true).open(path).map_err(io)?;
            return Ok(Self {
                path: path.to_path_buf(),
                file,
                done,
            });
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        let mut file = File::create(path).map_err(io)?;
        let line = serde_json::to_string(&header).map_err(|source| GeometryError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        writeln!(file, "{line}").map_err(io)?;
        file.sync_data().map_err(io)?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            done,
        })
    }

    /// The metrics of every point, `None` where not yet evaluated.
    pub fn results(&self) -> &[Option<PointMetrics>] {
        &self.done
    }

    /// The points still to evaluate.
    pub fn pending(&self) -> Vec<usize> {
        (0..self.done.len())
            .filter(|&i| self.done[i].is_none())
            .collect()
    }

    /// Records a finished point, on disk first.
    pub fn record(&mut self, index: usize, metrics: PointMetrics) -> Result<(), GeometryError> {
        let line = serde_json::to_string(&CachedPoint { index, metrics }).map_err(|source| {
            GeometryError::Json {
                path: self.path.clone(),
                source,
            }
        })?;
        let io = |source| GeometryError::Io {
            path: self.path.clone(),
            source,
        };
        writeln!(self.file, "{line}").map_err(io)?;
        self.file.flush().map_err(io)?;
        if let Some(slot) = self.done.get_mut(index) {
            *slot = Some(metrics);
        }
        Ok(())
    }
}

/// Evaluates the survey's points that `cache` does not hold yet, one worker thread per probe (each its
/// own network and backend: on a CPU, probes of one thread each keep the cores busier on small networks
/// than one probe of all threads), recording each finished point in the cache as it comes. `on_point`
/// sees each newly finished point. Returns every point's metrics, in order.
pub fn run_survey<B: Backend + Send>(
    survey: &Survey,
    data: SurfaceData<'_>,
    probes: Vec<SurfaceProbe<B>>,
    cache: &mut PointCache,
    mut on_point: impl FnMut(usize, &PointMetrics),
) -> Result<Vec<PointMetrics>, GeometryError> {
    let pending = cache.pending();
    if probes.is_empty() && !pending.is_empty() {
        return Err(GeometryError::InvalidSetting(
            "a survey needs at least one probe to evaluate its points".into(),
        ));
    }
    let len = survey.anchors.first().map_or(0, WeightVector::len);
    if let Some(probe) = probes.first() {
        if probe.layout().len() != len {
            return Err(GeometryError::Train(TrainError::StateMismatch(format!(
                "the survey's points have {len} coordinates, the network {} parameters",
                probe.layout().len()
            ))));
        }
    }
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let (sender, receiver) = mpsc::channel::<(usize, Result<PointMetrics, TrainError>)>();
    let mut failure: Option<GeometryError> = None;
    std::thread::scope(|scope| {
        for mut probe in probes {
            let sender = sender.clone();
            let (next, stop, pending) = (&next, &stop, &pending);
            scope.spawn(move || {
                let mut buffer = WeightVector(vec![0.0; len]);
                while !stop.load(Ordering::Relaxed) {
                    let Some(&index) = pending.get(next.fetch_add(1, Ordering::Relaxed)) else {
                        break;
                    };
                    survey.point_into(index, &mut buffer);
                    let result = probe.evaluate(&buffer, data);
                    if sender.send((index, result)).is_err() {
                        break;
                    }
                }
            });
        }
        drop(sender);
        for (index, result) in receiver {
            let recorded = result
                .map_err(GeometryError::from)
                .and_then(|metrics| cache.record(index, metrics).map(|()| metrics));
            match recorded {
                Ok(metrics) => on_point(index, &metrics),
                Err(e) => {
                    stop.store(true, Ordering::Relaxed);
                    failure.get_or_insert(e);
                }
            }
        }
    });
    if let Some(e) = failure {
        return Err(e);
    }
    cache
        .results()
        .iter()
        .enumerate()
        .map(|(i, m)| {
            m.ok_or_else(|| {
                GeometryError::InvalidSetting(format!(
                    "point {i} of {} was not evaluated",
                    survey.name
                ))
            })
        })
        .collect()
}

/// The values of a [`PointMetrics`] in a row of a results table, then a status: 0 not evaluated, 1 done,
/// `r + 2` failed on rank `r`.
const ROW: usize = 7;

fn metrics_row(metrics: &PointMetrics) -> [f64; ROW - 1] {
    [
        metrics.train_loss,
        metrics.train_nll,
        metrics.l2_term,
        metrics.train_error,
        metrics.test_loss,
        metrics.test_error,
    ]
}

fn row_metrics(row: &[f64]) -> PointMetrics {
    PointMetrics {
        train_loss: row[0],
        train_nll: row[1],
        l2_term: row[2],
        train_error: row[3],
        test_loss: row[4],
        test_error: row[5],
    }
}

/// [`run_survey`] with the points shared between the ranks of an MPI run: each rank evaluates its share of
/// the points with its own probes (round-robin, one point per probe and round, so that ranks with more
/// probes take more points), and after every round the ranks exchange the round's metrics, so that every
/// rank returns every point's metrics, identical to one process's (a point's metrics depend only on its
/// coordinates, and the exchange adds zeros, which is exact). `on_point` sees each newly finished point,
/// on every rank.
///
/// Only rank 0's `cache` is read and written: its finished points are not evaluated again, and each
/// round's points are recorded in it as they come, so that a killed survey resumes as [`run_survey`]'s
/// does. Other ranks pass `None`.
///
/// Every rank must call it with the same survey and data. A rank without probes, ranks with different
/// surveys, or a point that fails on one rank end the survey on every rank with an error, none waiting
/// for another.
pub fn run_survey_across_ranks<B: Backend + Send>(
    communicator: &dyn Communicator,
    survey: &Survey,
    data: SurfaceData<'_>,
    mut probes: Vec<SurfaceProbe<B>>,
    cache: Option<&mut PointCache>,
    mut on_point: impl FnMut(usize, &PointMetrics),
) -> Result<Vec<PointMetrics>, GeometryError> {
    let (rank, ranks) = (communicator.rank(), communicator.size());
    let points = survey.points.len();
    let len = survey.anchors.first().map_or(0, WeightVector::len);
    if let Some(probe) = probes.first() {
        if probe.layout().len() != len {
            return Err(GeometryError::Train(TrainError::StateMismatch(format!(
                "the survey's points have {len} coordinates, the network {} parameters",
                probe.layout().len()
            ))));
        }
    }
    // Every rank's probe count, and the sums of the point and coordinate counts, which must be the same
    // on every rank.
    let mut facts = vec![0.0f64; ranks + 2];
    facts[rank] = probes.len() as f64;
    facts[ranks] = points as f64;
    facts[ranks + 1] = len as f64;
    communicator
        .all_reduce_sum_f64("the survey's sizes all-reduce", &mut facts)
        .map_err(TrainError::from)?;
    if facts[ranks] != (points * ranks) as f64 || facts[ranks + 1] != (len * ranks) as f64 {
        return Err(GeometryError::InvalidSetting(format!(
            "rank {rank} of {ranks} surveys {points} points of {len} coordinates, not the same survey as \
             every rank ({} points, {} coordinates in all)",
            facts[ranks],
            facts[ranks + 1]
        )));
    }
    let workers: Vec<usize> = facts[..ranks].iter().map(|&n| n as usize).collect();
    if let Some(idle) = workers.iter().position(|&n| n == 0) {
        return Err(GeometryError::InvalidSetting(format!(
            "rank {idle} of {ranks} has no probe; every rank needs at least one to share the survey"
        )));
    }

    // Rank 0's cached points, for every rank.
    let mut table = vec![0.0f64; points * ROW];
    if rank == 0 {
        if let Some(cache) = &cache {
            for (index, done) in cache.results().iter().enumerate() {
                if let (Some(metrics), Some(row)) = (done, table.chunks_exact_mut(ROW).nth(index)) {
                    row[..ROW - 1].copy_from_slice(&metrics_row(metrics));
                    row[ROW - 1] = 1.0;
                }
            }
        }
    }
    communicator
        .all_reduce_sum_f64("the survey's cached points all-reduce", &mut table)
        .map_err(TrainError::from)?;
    let pending: Vec<usize> = (0..points)
        .filter(|&i| table[i * ROW + ROW - 1] == 0.0)
        .collect();

    // The owner of each slot of a round: ranks in turn, each as many times as it has probes.
    let most = workers.iter().copied().max().unwrap_or(0);
    let workers = &workers;
    let owners: Vec<usize> = (0..most)
        .flat_map(|turn| (0..ranks).filter(move |&r| turn < workers[r]))
        .collect();
    let mut cache = if rank == 0 { cache } else { None };
    let mut own_failure: Option<GeometryError> = None;
    let mut failed_elsewhere: Option<(usize, usize)> = None;
    for round in pending.chunks(owners.len()) {
        let mine: Vec<(usize, usize)> = round
            .iter()
            .enumerate()
            .filter(|&(slot, _)| owners[slot] == rank)
            .map(|(slot, &index)| (slot, index))
            .collect();
        let results = evaluate_points(survey, data, &mut probes, &mine);
        let mut exchanged = vec![0.0f64; round.len() * ROW];
        for ((slot, _), result) in mine.iter().zip(results) {
            let row = &mut exchanged[slot * ROW..(slot + 1) * ROW];
            match result {
                Ok(metrics) => {
                    row[..ROW - 1].copy_from_slice(&metrics_row(&metrics));
                    row[ROW - 1] = 1.0;
                }
                Err(e) => {
                    row[ROW - 1] = (rank + 2) as f64;
                    own_failure.get_or_insert(e.into());
                }
            }
        }
        communicator
            .all_reduce_sum_f64("the survey round's metrics all-reduce", &mut exchanged)
            .map_err(TrainError::from)?;
        for (&index, row) in round.iter().zip(exchanged.chunks_exact(ROW)) {
            let status = row[ROW - 1];
            if status != 1.0 {
                failed_elsewhere.get_or_insert((index, (status as usize).saturating_sub(2)));
                continue;
            }
            let metrics = row_metrics(row);
            table[index * ROW..(index + 1) * ROW].copy_from_slice(row);
            if let Some(cache) = cache.as_deref_mut() {
                cache.record(index, metrics)?;
            }
            on_point(index, &metrics);
        }
        if own_failure.is_some() || failed_elsewhere.is_some() {
            break;
        }
    }
    if let Some(e) = own_failure {
        return Err(e);
    }
    if let Some((point, failed_rank)) = failed_elsewhere {
        return Err(GeometryError::InvalidSetting(format!(
            "point {point} of {} failed on rank {failed_rank}, which reports why; rank {rank} stops \
             with it",
            survey.name
        )));
    }
    Ok(table.chunks_exact(ROW).map(row_metrics).collect())
}

/// Evaluates the points `(slot, index)` of `indices`, at most one per probe, each on a thread of its own.
fn evaluate_points<B: Backend + Send>(
    survey: &Survey,
    data: SurfaceData<'_>,
    probes: &mut [SurfaceProbe<B>],
    indices: &[(usize, usize)],
) -> Vec<Result<PointMetrics, TrainError>> {
    std::thread::scope(|scope| {
        let running: Vec<_> = probes
            .iter_mut()
            .zip(indices)
            .map(|(probe, &(_, index))| {
                scope.spawn(move || probe.evaluate(&survey.point(index), data))
            })
            .collect();
        running
            .into_iter()
            .map(|thread| {
                thread
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    })
}
