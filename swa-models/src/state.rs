//! Host-side copies of tensors, for checkpoints of training state.

use serde::{Deserialize, Serialize};
use swa_core::backend::{Backend, HasShape};

use crate::error::TrainError;

/// A tensor's shape and values on the host.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HostTensor {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// Row-major values.
    pub values: Vec<f32>,
}

impl HostTensor {
    /// Reads a backend tensor back.
    pub fn download<B: Backend>(backend: &B, tensor: &B::Tensor) -> Result<Self, TrainError> {
        let values = backend
            .to_host(tensor)
            .map_err(|source| TrainError::Backend {
                context: "reading a tensor back".into(),
                source,
            })?;
        Ok(Self {
            shape: tensor.dims().to_vec(),
            values,
        })
    }

    /// Uploads to a backend.
    pub fn upload<B: Backend>(&self, backend: &B) -> Result<B::Tensor, TrainError> {
        backend
            .from_host(&self.values, &self.shape)
            .map_err(|source| TrainError::Backend {
                context: "uploading a saved tensor".into(),
                source,
            })
    }
}
