//! Evaluating a network at one point of weight space, as the paper's figures plot it.

use serde::{Deserialize, Serialize};
use swa_core::backend::Backend;

use crate::batch::HostBatch;
use crate::bn::update_bn;
use crate::error::TrainError;
use crate::evaluate::evaluate;
use crate::geometry::vector::{ParameterLayout, WeightVector};
use crate::module::Module;

/// The data a survey evaluates every point on.
#[derive(Clone, Copy, Debug)]
pub struct SurfaceData<'a> {
    /// Training images without augmentation: BatchNorm's statistics are recomputed on them, and the train
    /// loss and error are measured on them.
    pub train: &'a [HostBatch],
    /// Test images.
    pub test: &'a [HostBatch],
}

impl SurfaceData<'_> {
    /// The number of training images.
    pub fn train_images(&self) -> usize {
        self.train.iter().map(HostBatch::len).sum()
    }

    /// The number of test images.
    pub fn test_images(&self) -> usize {
        self.test.iter().map(HostBatch::len).sum()
    }
}

/// A network's loss and error at one point of weight space.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PointMetrics {
    /// The paper's train loss: `train_nll + l2_term`.
    pub train_loss: f64,
    /// Mean cross-entropy on the training images.
    pub train_nll: f64,
    /// `weight_decay / 2 · ‖w‖²` over all parameters, the regulariser SGD's weight decay minimises.
    pub l2_term: f64,
    /// Training images misclassified, in percent.
    pub train_error: f64,
    /// Mean cross-entropy on the test images.
    pub test_loss: f64,
    /// Test images misclassified, in percent.
    pub test_error: f64,
}

impl PointMetrics {
    /// The value of a metric by name (as [`Metric`] names them).
    pub fn get(&self, metric: Metric) -> f64 {
        match metric {
            Metric::TrainLoss => self.train_loss,
            Metric::TrainError => self.train_error,
            Metric::TestLoss => self.test_loss,
            Metric::TestError => self.test_error,
        }
    }
}

/// The quantities a survey plots.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// L2-regularised cross-entropy on the training images.
    TrainLoss,
    /// Training error, percent.
    TrainError,
    /// Cross-entropy on the test images.
    TestLoss,
    /// Test error, percent.
    TestError,
}

impl Metric {
    /// Every metric, in the order tables show them.
    pub const ALL: [Metric; 4] = [
        Metric::TrainLoss,
        Metric::TrainError,
        Metric::TestLoss,
        Metric::TestError,
    ];

    /// The name in files and tables.
    pub fn name(self) -> &'static str {
        match self {
            Metric::TrainLoss => "train_loss",
            Metric::TrainError => "train_error",
            Metric::TestLoss => "test_loss",
            Metric::TestError => "test_error",
        }
    }

    /// A label with the unit, for figures.
    pub fn label(self) -> &'static str {
        match self {
            Metric::TrainLoss => "train loss (cross-entropy + L2)",
            Metric::TrainError => "train error (%)",
            Metric::TestLoss => "test loss (cross-entropy)",
            Metric::TestError => "test error (%)",
        }
    }
}

/// One network on one backend, evaluated at any point: the parameters are set to the point, BatchNorm's
/// statistics recomputed on the training images (exactly [`update_bn`]), and the train and test sets
/// evaluated in eval mode.
pub struct SurfaceProbe<B: Backend> {
    backend: B,
    model: Box<dyn Module<B>>,
    layout: ParameterLayout,
    weight_decay: f64,
}

/// The seed of dropout masks during the BatchNorm pass. Fixed, so that a point's metrics are a function
/// of the point alone and a resumed survey repeats an uninterrupted one.
const BN_SEED: u64 = 0;

impl<B: Backend> SurfaceProbe<B> {
    /// A probe of `model` (any weights: every evaluation sets its own), with the run's weight decay for
    /// the L2 term of the train loss.
    pub fn new(backend: B, model: Box<dyn Module<B>>, weight_decay: f32) -> Self {
        let layout = ParameterLayout::of(model.as_ref());
        Self {
            backend,
            model,
            layout,
            weight_decay: weight_decay as f64,
        }
    }

    /// The network's parameter layout.
    pub fn layout(&self) -> &ParameterLayout {
        &self.layout
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The metrics at `point`.
    pub fn evaluate(
        &mut self,
        point: &WeightVector,
        data: SurfaceData<'_>,
    ) -> Result<PointMetrics, TrainError> {
        self.layout
            .write_into(&self.backend, point, self.model.as_mut())?;
        update_bn(&self.backend, self.model.as_mut(), data.train, BN_SEED)?;
        let train = evaluate(&self.backend, self.model.as_mut(), data.train)?;
        let test = evaluate(&self.backend, self.model.as_mut(), data.test)?;
        let l2_term = 0.5 * self.weight_decay * point.dot(point);
        Ok(PointMetrics {
            train_loss: train.loss + l2_term,
            train_nll: train.loss,
            l2_term,
            train_error: 100.0 - train.accuracy,
            test_loss: test.loss,
            test_error: 100.0 - test.accuracy,
        })
    }
}
