//! Stochastic gradient descent with momentum and weight decay, as PyTorch's `torch.optim.SGD`.
//!
//! The update of each parameter is one fused backend call ([`Backend::sgd_step_`]); the optimiser only owns
//! the momentum buffers, keyed by parameter name so that a checkpoint can restore them.
//!
//! As in PyTorch, a parameter's first step sets its buffer to the gradient itself (no dampening), and
//! without momentum the step is the gradient (dampening does not apply): the backend op computes
//! `buf = momentum·buf + (1 − dampening)·d`, so the optimiser passes dampening 0 in those cases, which
//! on a zero buffer gives `buf = d` exactly.

use serde::{Deserialize, Serialize};
use swa_core::backend::{Backend, HasShape, SgdStep};

use crate::checkpoint::{CheckpointError, StateDict, StoredTensor};
use crate::error::TrainError;
use crate::module::Module;

/// SGD hyper-parameters other than the learning rate (which the schedule sets each step).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct SgdConfig {
    /// Momentum factor (0.9 in the paper).
    pub momentum: f32,
    /// L2 penalty applied to every parameter, BatchNorm's included, as the original SWA code does.
    pub weight_decay: f32,
    /// Dampening of the momentum update (not applied on a parameter's first step, as in PyTorch).
    pub dampening: f32,
    /// Nesterov momentum (needs a positive momentum and no dampening).
    pub nesterov: bool,
}

impl SgdConfig {
    /// Checks what PyTorch checks: finite, non-negative momentum and weight decay, a finite dampening,
    /// and Nesterov momentum only with a positive momentum and zero dampening.
    pub fn validate(&self) -> Result<(), TrainError> {
        let invalid = |message: String| Err(TrainError::InvalidConfig(format!("SGD: {message}")));
        for (name, value) in [
            ("momentum", self.momentum),
            ("weight decay", self.weight_decay),
        ] {
            if !(value.is_finite() && value >= 0.0) {
                return invalid(format!("{name} {value}: expected a finite value ≥ 0"));
            }
        }
        if !self.dampening.is_finite() {
            return invalid(format!(
                "dampening {}: expected a finite value",
                self.dampening
            ));
        }
        if self.nesterov && (self.momentum <= 0.0 || self.dampening != 0.0) {
            return invalid(format!(
                "Nesterov momentum needs a positive momentum and zero dampening (momentum {}, dampening {})",
                self.momentum, self.dampening
            ));
        }
        Ok(())
    }

    /// Momentum 0.9 with the given weight decay: the paper's setting.
    pub fn momentum(weight_decay: f32) -> Self {
        Self {
            momentum: 0.9,
            weight_decay,
            dampening: 0.0,
            nesterov: false,
        }
    }
}

/// SGD over a module's parameters.
#[derive(Debug)]
pub struct Sgd<B: Backend> {
    config: SgdConfig,
    /// One buffer per parameter in visiting order, created at the parameter's first update.
    buffers: Vec<(String, Option<B::Tensor>)>,
}

impl<B: Backend> Sgd<B> {
    /// An optimiser with empty momentum buffers.
    pub fn new(config: SgdConfig) -> Self {
        Self {
            config,
            buffers: Vec::new(),
        }
    }

    /// The hyper-parameters.
    pub fn config(&self) -> SgdConfig {
        self.config
    }

    /// Applies one step with learning rate `lr` to every parameter that has a gradient, then clears the
    /// gradients. Parameters without a gradient are left alone, as in PyTorch.
    ///
    /// Fails with [`TrainError::InvalidConfig`] when the hyper-parameters are out of range
    /// ([`SgdConfig::validate`]).
    pub fn step(
        &mut self,
        backend: &B,
        model: &mut dyn Module<B>,
        lr: f32,
    ) -> Result<(), TrainError> {
        self.config.validate()?;
        let step = SgdStep {
            lr,
            momentum: self.config.momentum,
            weight_decay: self.config.weight_decay,
            dampening: self.config.dampening,
            nesterov: self.config.nesterov,
        };
        let buffers = &mut self.buffers;
        let mut index = 0;
        let mut failure = None;
        model.visit_params_mut(&mut |name, param| {
            if failure.is_some() {
                return;
            }
            let slot = index;
            index += 1;
            if buffers.len() <= slot {
                buffers.push((name.to_string(), None));
            } else if buffers[slot].0 != name {
                failure = Some(TrainError::StateMismatch(format!(
                    "optimiser buffer {slot} belongs to `{}` but the model's parameter {slot} is `{name}`",
                    buffers[slot].0
                )));
                return;
            }
            let Some(grad) = param.grad.take() else { return };
            let result = (|| {
                // A new buffer, or no momentum, takes buf = d as PyTorch does (see the module docs).
                let undamped = SgdStep {
                    dampening: 0.0,
                    ..step
                };
                let (buffer, step) = match &mut buffers[slot].1 {
                    Some(buffer) if step.momentum != 0.0 => (buffer, step),
                    Some(buffer) => {
                        backend.fill_(buffer, 0.0)?;
                        (buffer, undamped)
                    }
                    empty => (empty.insert(backend.zeros(param.value.dims())?), undamped),
                };
                backend.sgd_step_(&mut param.value, &grad, buffer, &step)
            })();
            if let Err(e) = result {
                failure = Some(TrainError::Backend { context: format!("SGD step of `{name}`"), source: e });
            }
        });
        failure.map_or(Ok(()), Err)
    }

    /// The momentum buffers read back to the host, for a checkpoint.
    pub fn state(&self, backend: &B) -> Result<SgdState, TrainError> {
        let mut parameters = Vec::with_capacity(self.buffers.len());
        let mut buffers = StateDict::new();
        for (name, buffer) in &self.buffers {
            if let Some(tensor) = buffer {
                let values = backend
                    .to_host(tensor)
                    .map_err(TrainError::backend(format!(
                        "reading the momentum of `{name}`"
                    )))?;
                let shape = tensor.dims().to_vec();
                buffers.insert(name.clone(), StoredTensor::F32 { shape, values });
            }
            parameters.push((name.clone(), buffer.is_some()));
        }
        Ok(SgdState {
            parameters,
            buffers,
        })
    }

    /// Restores momentum buffers saved by [`Sgd::state`]. Fails with [`CheckpointError::KeyMismatch`] when
    /// the stored buffers are not exactly those the parameter list announces, and with
    /// [`CheckpointError::DtypeMismatch`] for a buffer that is not `F32`; nothing changes then.
    pub fn load_state(&mut self, backend: &B, state: &SgdState) -> Result<(), TrainError> {
        let origin = || state.buffers.origin().to_owned();
        let announced: Vec<&str> = state
            .parameters
            .iter()
            .filter(|(_, has_buffer)| *has_buffer)
            .map(|(name, _)| name.as_str())
            .collect();
        let missing: Vec<String> = announced
            .iter()
            .filter(|name| state.buffers.get(name).is_none())
            .map(|name| name.to_string())
            .collect();
        let unexpected: Vec<String> = state
            .buffers
            .iter()
            .map(|(name, _)| name)
            .filter(|name| !announced.contains(name))
            .map(str::to_owned)
            .collect();
        if !missing.is_empty() || !unexpected.is_empty() {
            return Err(CheckpointError::KeyMismatch {
                origin: origin(),
                missing,
                unexpected,
            }
            .into());
        }
        let mut buffers = Vec::with_capacity(state.parameters.len());
        for (name, _) in &state.parameters {
            let buffer = match state.buffers.get(name) {
                None => None,
                Some(StoredTensor::F32 { shape, values }) => Some(
                    backend
                        .from_host(values, shape)
                        .map_err(TrainError::backend(format!(
                            "uploading the momentum of `{name}`"
                        )))?,
                ),
                Some(other) => {
                    return Err(CheckpointError::DtypeMismatch {
                        origin: origin(),
                        name: name.clone(),
                        expected: "F32",
                        got: other.dtype_name().to_owned(),
                    }
                    .into())
                }
            };
            buffers.push((name.clone(), buffer));
        }
        self.buffers = buffers;
        Ok(())
    }
}

/// The state of [`Sgd`] on the host: which parameters it has seen and their momentum buffers.
#[derive(Clone, Debug, PartialEq)]
pub struct SgdState {
    /// Every parameter the optimiser has seen, in visiting order, and whether it has a momentum buffer yet
    /// (a parameter gets one at its first update).
    pub parameters: Vec<(String, bool)>,
    /// The momentum buffers, keyed by parameter name.
    pub buffers: StateDict,
}
