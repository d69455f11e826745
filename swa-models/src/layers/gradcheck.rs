//! Finite-difference checks of a module's backward pass, for any backend.
//!
//! The loss is `L = Σ y ⊙ r` for the module's output `y` and a fixed random `r`, so `dL/dy = r`. Each
//! sampled input element and parameter element is moved by `±ε` and the central difference
//! `(L(+ε) − L(−ε)) / 2ε` is compared with the analytic gradient that `backward(r)` produced. Every
//! evaluation runs in [`ForwardMode::Train`] with the same seed, so dropout masks are identical and
//! BatchNorm uses batch statistics throughout; the loss is summed in `f64` to keep rounding out of the
//! differences.
//!
//! ReLU and max pooling are not differentiable everywhere: a step of `ε` can carry an activation across
//! zero (or change a window's maximum), and the difference then measures a mix of two slopes. An element
//! that disagrees is therefore measured again with steps `ε / 8` and then `ε / 64`, and agrees when one of
//! the measurements does; a wrong gradient disagrees at every step, while a kink at distance `δ` stops
//! mattering once the step is below `δ`. The report counts the elements that needed a smaller step.

use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use swa_core::backend::{Backend, BackendError, BackendResult, HasShape};

use crate::module::{ForwardMode, Module};

/// The smaller steps, as fractions of `ε`, for elements that disagree at `ε`.
const FINE_STEP_DIVISORS: [f32; 2] = [8.0, 64.0];

/// How many elements to check, and how closely.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GradCheckConfig {
    /// Step of the central differences.
    pub epsilon: f32,
    /// Input elements to check (all of them when the input is smaller).
    pub input_samples: usize,
    /// Elements to check in each parameter tensor (all of them when the tensor is smaller).
    pub param_samples: usize,
    /// Relative tolerance, on the larger of the two gradients' magnitudes.
    pub rtol: f64,
    /// Absolute tolerance.
    pub atol: f64,
    /// Seed of `r` and of the sampled positions.
    pub seed: u64,
    /// Dropout seed of the training-mode passes.
    pub dropout_seed: u64,
}

impl Default for GradCheckConfig {
    fn default() -> Self {
        Self {
            epsilon: 2e-3,
            input_samples: 24,
            param_samples: 6,
            rtol: 2e-2,
            atol: 2e-3,
            seed: 0,
            dropout_seed: 7,
        }
    }
}

/// One compared element.
#[derive(Clone, Debug, PartialEq)]
pub struct GradCheckEntry {
    /// `input` or the parameter's name.
    pub tensor: String,
    /// The flat index within the tensor.
    pub index: usize,
    /// The gradient `backward` produced.
    pub analytic: f64,
    /// The central difference with step `ε`.
    pub numeric: f64,
    /// The central differences with steps `ε / 8`, `ε / 64`, measured one after the other only while the
    /// previous ones disagreed.
    pub numeric_fine: Vec<f64>,
}

impl GradCheckEntry {
    /// Whether the two gradients agree within `rtol` and `atol`.
    pub fn agrees(&self, rtol: f64, atol: f64) -> bool {
        let close = |numeric: f64| {
            let scale = self.analytic.abs().max(numeric.abs());
            (self.analytic - numeric).abs() <= atol + rtol * scale
        };
        close(self.numeric) || self.numeric_fine.iter().copied().any(close)
    }
}

/// Every compared element and the tolerances they were held to.
#[derive(Clone, Debug, PartialEq)]
pub struct GradCheckReport {
    /// The compared elements, inputs first.
    pub entries: Vec<GradCheckEntry>,
    /// The relative tolerance.
    pub rtol: f64,
    /// The absolute tolerance.
    pub atol: f64,
}

impl GradCheckReport {
    /// The elements whose gradients disagree.
    pub fn failures(&self) -> Vec<&GradCheckEntry> {
        self.entries
            .iter()
            .filter(|e| !e.agrees(self.rtol, self.atol))
            .collect()
    }

    /// The number of compared elements of `tensor`.
    pub fn count(&self, tensor: &str) -> usize {
        self.entries.iter().filter(|e| e.tensor == tensor).count()
    }

    /// The number of elements that needed the smaller step to agree.
    pub fn refined(&self) -> usize {
        self.entries
            .iter()
            .filter(|e| !e.numeric_fine.is_empty())
            .count()
    }

    /// The largest absolute difference between analytic and numeric gradients (with step `ε`).
    pub fn max_abs_error(&self) -> f64 {
        self.entries
            .iter()
            .map(|e| (e.analytic - e.numeric).abs())
            .fold(0.0, f64::max)
    }
}

/// `Σ y ⊙ r` in `f64`.
fn weighted_sum<B: Backend>(backend: &B, y: &B::Tensor, r: &[f32]) -> BackendResult<f64> {
    let values = backend.to_host(y)?;
    if values.len() != r.len() {
        return Err(BackendError::ShapeMismatch {
            op: "gradcheck",
            expected: format!("an output of {} elements on every pass", r.len()),
            got: y.dims().to_vec(),
        });
    }
    Ok(values
        .iter()
        .zip(r)
        .map(|(&a, &b)| f64::from(a) * f64::from(b))
        .sum())
}

fn sample_indices(rng: &mut StdRng, len: usize, amount: usize) -> Vec<usize> {
    if amount >= len {
        (0..len).collect()
    } else {
        let mut indices = sample(rng, len, amount).into_vec();
        indices.sort_unstable();
        indices
    }
}

/// Compares the module's input gradient (unless `check_input` is false) and sampled parameter gradients
/// with central differences, on the input `x` of shape `shape`. The module's gradients are zeroed first
/// and left as `backward(r)` produced them; its parameters are restored exactly.
pub fn check_gradients<B: Backend, M: Module<B> + ?Sized>(
    backend: &B,
    module: &mut M,
    x: &[f32],
    shape: &[usize],
    check_input: bool,
    config: &GradCheckConfig,
) -> BackendResult<GradCheckReport> {
    let mut rng = StdRng::seed_from_u64(config.seed);
    let mode = ForwardMode::Train {
        seed: config.dropout_seed,
    };
    let loss_at = |module: &mut M, input: &[f32], r: &[f32]| -> BackendResult<f64> {
        let input = backend.from_host(input, shape)?;
        let y = module.forward(backend, &input, mode)?;
        weighted_sum(backend, &y, r)
    };

    module.zero_grads();
    let input = backend.from_host(x, shape)?;
    let y = module.forward(backend, &input, mode)?;
    let r: Vec<f32> = (0..y.numel())
        .map(|_| rng.random::<f32>() * 2.0 - 1.0)
        .collect();
    let dy = backend.from_host(&r, y.dims())?;
    let dx = module.backward(backend, &dy)?;

    let mut entries = Vec::new();
    if check_input {
        let dx = backend.to_host(&dx)?;
        let mut perturbed = x.to_vec();
        for index in sample_indices(&mut rng, x.len(), config.input_samples) {
            let analytic = f64::from(dx.get(index).copied().unwrap_or(f32::NAN));
            let entry = measure("input", index, analytic, config, |delta| {
                perturbed[index] = x[index] + delta;
                loss_at(module, &perturbed, &r)
            })?;
            perturbed[index] = x[index];
            entries.push(entry);
        }
    }

    // Analytic parameter gradients and original values, read before any perturbation.
    let mut params = Vec::new();
    let mut failure = None;
    module.visit_params_mut(&mut |name, p| {
        let read = || -> BackendResult<(Vec<f32>, Vec<usize>, Vec<f32>)> {
            let value = backend.to_host(&p.value)?;
            let grad = match &p.grad {
                Some(g) => backend.to_host(g)?,
                None => vec![f32::NAN; value.len()],
            };
            Ok((value, p.value.dims().to_vec(), grad))
        };
        match read() {
            Ok(read) => params.push((name.to_string(), read)),
            Err(e) => failure = Some(e),
        }
    });
    if let Some(e) = failure {
        return Err(e);
    }
    for (name, (value, dims, grad)) in &params {
        for index in sample_indices(&mut rng, value.len(), config.param_samples) {
            let entry = measure(name, index, f64::from(grad[index]), config, |delta| {
                let mut moved = value.clone();
                moved[index] += delta;
                set_param(backend, module, name, &moved, dims)?;
                loss_at(module, x, &r)
            })?;
            set_param(backend, module, name, value, dims)?;
            entries.push(entry);
        }
    }
    Ok(GradCheckReport {
        entries,
        rtol: config.rtol,
        atol: config.atol,
    })
}

/// Compares `analytic` with the central difference `(L(+ε) − L(−ε)) / 2ε` of `loss_moved_by` (the loss with
/// the element moved by the given amount), measured again with the finer steps while they disagree.
fn measure(
    tensor: &str,
    index: usize,
    analytic: f64,
    config: &GradCheckConfig,
    mut loss_moved_by: impl FnMut(f32) -> BackendResult<f64>,
) -> BackendResult<GradCheckEntry> {
    let mut difference = |eps: f32| -> BackendResult<f64> {
        let plus = loss_moved_by(eps)?;
        let minus = loss_moved_by(-eps)?;
        Ok((plus - minus) / (2.0 * f64::from(eps)))
    };
    let mut entry = GradCheckEntry {
        tensor: tensor.to_string(),
        index,
        analytic,
        numeric: difference(config.epsilon)?,
        numeric_fine: Vec::new(),
    };
    for divisor in FINE_STEP_DIVISORS {
        if entry.agrees(config.rtol, config.atol) {
            break;
        }
        entry
            .numeric_fine
            .push(difference(config.epsilon / divisor)?);
    }
    Ok(entry)
}

fn set_param<B: Backend, M: Module<B> + ?Sized>(
    backend: &B,
    module: &mut M,
    name: &str,
    values: &[f32],
    dims: &[usize],
) -> BackendResult<()> {
    let source = backend.from_host(values, dims)?;
    let mut result = Ok(());
    module.visit_params_mut(&mut |n, p| {
        if n == name {
            result = backend.copy_(&mut p.value, &source);
        }
    });
    result
}
