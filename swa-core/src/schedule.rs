//! Learning-rate schedules as pure functions of training time.
//!
//! Every schedule answers `lr(epoch, step, steps_per_epoch)`: the learning rate of optimiser step `step`
//! (0-based) of epoch `epoch` (0-based) when an epoch has `steps_per_epoch` steps. Nothing is stepped or
//! mutated, so a resumed run only needs the epoch and step it stopped at, and a configuration is plain data
//! ([`Schedule`] is `serde`-serialisable).
//!
//! The variants and where their formulas come from:
//!
//! | variant | source | evaluated |
//! |---|---|---|
//! | [`Schedule::Constant`] | | |
//! | [`Schedule::Original`] | `schedule(epoch)` in `train.py` of the original SWA code (github.com/timgaripov/swa) | per epoch |
//! | [`Schedule::Cyclic`] | the SWA paper's cyclical schedule, eq. (1) of Izmailov et al. 2018 | per iteration |
//! | [`Schedule::Triangular`] | FGE's cycle (Garipov et al. 2018, `cyclic_learning_rate` in timgaripov/dnn-mode-connectivity) | per iteration |
//! | [`Schedule::SwaAnneal`] | PyTorch's `torch.optim.swa_utils.SWALR` | per epoch |
//! | [`Schedule::Cosine`] | PyTorch's `CosineAnnealingLR` (closed form) | per epoch or per step |
//! | [`Schedule::StepDecay`] | PyTorch's `MultiStepLR` | per epoch |
//! | [`Schedule::Then`] | switches from one schedule to another at an epoch | |
//!
//! All arithmetic is done in `f64` and rounded to `f32` once, and interpolations are written as convex
//! combinations `(1 − s)·a + s·b`, so every schedule returns its end points bit-exactly (`s = 0` gives `a`,
//! `s = 1` gives `b`) and never leaves `[min(a, b), max(a, b)]` (see [`Schedule::bounds`]).
//!
//! ```
//! use swa_core::schedule::{LrSchedule, Period, Schedule};
//!
//! // The paper's cyclical schedule from 0.05 down to 0.0005 over cycles of 4 iterations.
//! let cyclic = Schedule::cyclic(0.05, 0.0005, Period::Iterations(4)).unwrap();
//! // Iterations 1..=4 (epoch 0, steps 0..=3): t = 1/4, 2/4, 3/4, 1.
//! assert_eq!(cyclic.lr(0, 3, 100), 0.0005); // the cycle's last iteration hits α2 exactly
//! assert_eq!(cyclic.lr(0, 4, 100), (0.75 * 0.05 + 0.25 * 0.0005) as f32); // a new cycle
//! ```

use serde::{Deserialize, Serialize};

/// Errors in a schedule or policy configuration. Messages name the field and the value given.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ScheduleError {
    /// A learning rate that is negative, infinite or NaN.
    #[error("{field}: learning rate {value} must be finite and non-negative")]
    InvalidLearningRate {
        /// The configuration field, e.g. `cyclic.alpha1`.
        field: &'static str,
        /// The value given.
        value: f32,
    },
    /// A length (epochs, iterations) that must be at least 1.
    #[error("{field}: must be at least 1, got 0")]
    ZeroLength {
        /// The configuration field, e.g. `cyclic.cycle`.
        field: &'static str,
    },
    /// A multiplicative factor that is negative, infinite or NaN.
    #[error("{field}: factor {value} must be finite and non-negative")]
    InvalidFactor {
        /// The configuration field, e.g. `step_decay.gamma`.
        field: &'static str,
        /// The value given.
        value: f32,
    },
}

/// A learning-rate schedule: a pure function of the training time.
pub trait LrSchedule {
    /// The learning rate of step `step` (0-based, `< steps_per_epoch`) of epoch `epoch` (0-based).
    ///
    /// `steps_per_epoch` is the number of optimiser steps in an epoch (`len(loader)` in PyTorch); a value of
    /// 0 is treated as 1. Never panics.
    fn lr(&self, epoch: usize, step: usize, steps_per_epoch: usize) -> f32;
}

/// A length of training time, in whole epochs or in optimiser iterations: the length of a learning-rate
/// cycle, or how often the SWA policy averages.
#[doc(alias = "SnapshotEvery")]
#[doc(alias = "CycleLength")]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Period {
    /// Every `n` epochs (`swa_c_epochs` in the original SWA code).
    Epochs(usize),
    /// Every `n` optimiser iterations (the paper's cycle length `c`).
    Iterations(usize),
}

impl Period {
    /// The length in iterations for epochs of `steps_per_epoch` steps (0 is treated as 1), saturating at
    /// `u64::MAX`.
    pub fn iterations(self, steps_per_epoch: usize) -> u64 {
        match self {
            Period::Epochs(n) => (n as u64).saturating_mul(steps_per_epoch.max(1) as u64),
            Period::Iterations(n) => n as u64,
        }
    }

    fn validate(self, field: &'static str) -> Result<(), ScheduleError> {
        match self {
            Period::Epochs(0) | Period::Iterations(0) => Err(ScheduleError::ZeroLength { field }),
            _ => Ok(()),
        }
    }
}

/// How [`Schedule::SwaAnneal`] moves from its start to `swa_lr`, as in PyTorch's `SWALR(anneal_strategy=…)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnnealStrategy {
    /// `α(t) = (1 − cos(π t)) / 2` (PyTorch's `"cos"`, its default).
    Cos,
    /// `α(t) = t` (PyTorch's `"linear"`).
    Linear,
}

impl AnnealStrategy {
    /// The fraction `α(t) ∈ [0, 1]` of the way to the target at progress `t ∈ [0, 1]`; exact at both ends.
    pub fn progress(self, t: f64) -> f64 {
        let t = t.clamp(0.0, 1.0);
        match self {
            AnnealStrategy::Cos => (1.0 - (std::f64::consts::PI * t).cos()) / 2.0,
            AnnealStrategy::Linear => t,
        }
    }
}

/// A learning-rate schedule configuration. Evaluate it with [`LrSchedule::lr`].
///
/// Build variants with the constructors (`Schedule::cyclic`, …), which validate their arguments; a
/// configuration read with `serde` can be checked with [`Schedule::validate`]. Evaluating an invalid
/// configuration does not panic (zero lengths are treated as 1) but its values are meaningless.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Schedule {
    /// The same learning rate at every step.
    Constant {
        /// The learning rate.
        lr: f32,
    },
    /// The schedule of the original SWA code (`schedule(epoch)` in timgaripov/swa `train.py`), evaluated
    /// once per epoch at the epoch index:
    ///
    /// ```text
    /// t = epoch / horizon_epochs
    /// lr = lr_init                                   if t ≤ 0.5
    ///    = lr_init + (final_lr − lr_init)(t − 0.5)/0.4  if 0.5 < t ≤ 0.9
    ///    = final_lr                                  if t > 0.9
    /// ```
    ///
    /// The original writes this as `lr_init · factor` with `lr_ratio = final_lr / lr_init`; with SWA
    /// (`--swa`) `horizon_epochs = swa_start` and `final_lr = swa_lr`, without it `horizon_epochs` is the
    /// budget (`--epochs`) and `final_lr = 0.01 · lr_init`. See [`Schedule::original_swa`] and
    /// [`Schedule::original_sgd`].
    Original {
        /// The learning rate of the first half (`--lr_init`).
        lr_init: f32,
        /// The learning rate from 90 % of the horizon on (`--swa_lr`, or `0.01 · lr_init` for SGD).
        final_lr: f32,
        /// The epoch count that `t` is measured against (`--swa_start`, or `--epochs` for SGD).
        horizon_epochs: usize,
    },
    /// The SWA paper's cyclical schedule (Izmailov et al. 2018, eq. 1), per iteration `i = 1, 2, …`:
    /// `α(i) = (1 − t(i))·α1 + t(i)·α2` with `t(i) = (mod(i − 1, c) + 1) / c`.
    ///
    /// Iteration `i` is `epoch · steps_per_epoch + step + 1`, so each cycle starts just below `α1` and its
    /// last iteration runs at exactly `α2`, the point where SWA averages.
    Cyclic {
        /// The learning rate the cycle starts from (the maximum when `α1 > α2`).
        alpha1: f32,
        /// The learning rate of each cycle's last iteration.
        alpha2: f32,
        /// The cycle length `c`.
        cycle: Period,
    },
    /// The triangular cycle of Fast Geometric Ensembling (Garipov et al. 2018), per iteration: with
    /// `t(i) = (mod(i − 1, c) + 1) / c`,
    /// `α(i) = (1 − 2t)·α1 + 2t·α2` for `t ≤ 1/2` and `(2 − 2t)·α2 + (2t − 1)·α1` after, so `α2` is reached at
    /// the middle of the cycle (exactly when `c` is even: FGE's snapshot point) and `α1` at its end.
    ///
    /// FGE's code (`cyclic_learning_rate` in timgaripov/dnn-mode-connectivity `utils.py`) measures `t` from
    /// 0 at a cycle's first iteration, one iteration behind the paper's formula used here.
    Triangular {
        /// The learning rate at the cycle's ends.
        alpha1: f32,
        /// The learning rate at the cycle's middle.
        alpha2: f32,
        /// The cycle length `c`.
        cycle: Period,
    },
    /// PyTorch's `SWALR`: anneals from `from_lr` to `swa_lr` over `anneal_epochs` epochs, then stays at
    /// `swa_lr`. At epoch `k` (counted from this schedule's start):
    /// `lr = (1 − α)·from_lr + α·swa_lr` with `α = strategy(min(1, k / anneal_epochs))`, and `α = 1` when
    /// `anneal_epochs = 0`.
    ///
    /// SWALR derives its start from the optimiser's learning rate when it first steps; here it is the
    /// explicit `from_lr` (see [`Schedule::then_anneal_to`], which takes it from the preceding schedule).
    /// Epoch `k = 0` is the epoch at whose end PyTorch's loop first calls `swa_scheduler.step()`.
    SwaAnneal {
        /// The learning rate at `k = 0`.
        from_lr: f32,
        /// The learning rate reached after `anneal_epochs` epochs (`swa_lr`).
        swa_lr: f32,
        /// The length of the annealing phase in epochs (`anneal_epochs`).
        anneal_epochs: usize,
        /// Cosine or linear annealing (`anneal_strategy`).
        strategy: AnnealStrategy,
    },
    /// Cosine annealing from `lr_max` to `lr_min` over `epochs` epochs, then `lr_min`:
    /// `lr = lr_min + (lr_max − lr_min)·(1 + cos(π p))/2`, with progress `p = epoch / epochs` (PyTorch's
    /// `CosineAnnealingLR` stepped per epoch) or `p = (epoch + step / steps_per_epoch) / epochs` when
    /// `per_step` is set.
    Cosine {
        /// The learning rate at the start.
        lr_max: f32,
        /// The learning rate at the end and after.
        lr_min: f32,
        /// The length of the decay in epochs (`T_max`).
        epochs: usize,
        /// Whether the progress advances every step rather than every epoch.
        #[serde(default)]
        per_step: bool,
    },
    /// Step decay: `lr_init · gamma^m`, `m` the number of milestones `≤ epoch` (PyTorch's `MultiStepLR`).
    StepDecay {
        /// The learning rate before the first milestone.
        lr_init: f32,
        /// The factor applied at every milestone.
        gamma: f32,
        /// The epochs at which the learning rate is multiplied by `gamma`.
        milestones: Vec<usize>,
    },
    /// `first` for epochs before `switch_epoch`, then `then` evaluated with epochs counted from
    /// `switch_epoch` (so a cyclic schedule's first cycle starts at `switch_epoch`).
    Then {
        /// The schedule before the switch.
        first: Box<Schedule>,
        /// The first epoch of `then`.
        switch_epoch: usize,
        /// The schedule from the switch on.
        then: Box<Schedule>,
    },
}

fn check_lr(field: &'static str, value: f32) -> Result<(), ScheduleError> {
    if value.is_finite() && value >= 0.0 {
        Ok(())
    } else {
        Err(ScheduleError::InvalidLearningRate { field, value })
    }
}

fn check_len(field: &'static str, value: usize) -> Result<(), ScheduleError> {
    if value == 0 {
        Err(ScheduleError::ZeroLength { field })
    } else {
        Ok(())
    }
}

/// `(1 − s)·a + s·b` in `f64`, exact at `s = 0` and `s = 1`.
fn mix(a: f32, b: f32, s: f64) -> f64 {
    (1.0 - s) * f64::from(a) + s * f64::from(b)
}

/// The 1-based iteration index `i` of step `step` of epoch `epoch`.
fn iteration(epoch: usize, step: usize, steps_per_epoch: usize) -> u64 {
    (epoch as u64)
        .saturating_mul(steps_per_epoch.max(1) as u64)
        .saturating_add(step as u64)
        .saturating_add(1)
}

/// `(mod(i − 1, c) + 1, c)`: the position of iteration `i` within its cycle, 1-based, and the cycle length.
fn cycle_position(cycle: Period, epoch: usize, step: usize, steps_per_epoch: usize) -> (u64, u64) {
    let c = cycle.iterations(steps_per_epoch).max(1);
    let i = iteration(epoch, step, steps_per_epoch);
    ((i - 1) % c + 1, c)
}

impl Schedule {
    /// A constant learning rate.
    pub fn constant(lr: f32) -> Result<Self, ScheduleError> {
        let s = Schedule::Constant { lr };
        s.validate()?;
        Ok(s)
    }

    /// The original SWA code's schedule with `--swa`: `lr_init` for the first half of `swa_start` epochs, a
    /// linear decay to `swa_lr` until 90 % of `swa_start`, then `swa_lr`.
    pub fn original_swa(
        lr_init: f32,
        swa_lr: f32,
        swa_start: usize,
    ) -> Result<Self, ScheduleError> {
        let s = Schedule::Original {
            lr_init,
            final_lr: swa_lr,
            horizon_epochs: swa_start,
        };
        s.validate()?;
        Ok(s)
    }

    /// The original SWA code's schedule without `--swa` (the SGD baseline): the same shape over the whole
    /// budget, ending at `0.01 · lr_init`.
    pub fn original_sgd(lr_init: f32, budget_epochs: usize) -> Result<Self, ScheduleError> {
        let s = Schedule::Original {
            lr_init,
            final_lr: (0.01 * f64::from(lr_init)) as f32,
            horizon_epochs: budget_epochs,
        };
        s.validate()?;
        Ok(s)
    }

    /// The SWA paper's cyclical schedule from `alpha1` to `alpha2` over cycles of `cycle`.
    pub fn cyclic(alpha1: f32, alpha2: f32, cycle: Period) -> Result<Self, ScheduleError> {
        let s = Schedule::Cyclic {
            alpha1,
            alpha2,
            cycle,
        };
        s.validate()?;
        Ok(s)
    }

    /// FGE's triangular cycle between `alpha1` (ends) and `alpha2` (middle).
    pub fn triangular(alpha1: f32, alpha2: f32, cycle: Period) -> Result<Self, ScheduleError> {
        let s = Schedule::Triangular {
            alpha1,
            alpha2,
            cycle,
        };
        s.validate()?;
        Ok(s)
    }

    /// SWALR-style annealing from `from_lr` to `swa_lr` over `anneal_epochs` epochs.
    #[doc(alias = "SWALR")]
    pub fn swa_anneal(
        from_lr: f32,
        swa_lr: f32,
        anneal_epochs: usize,
        strategy: AnnealStrategy,
    ) -> Result<Self, ScheduleError> {
        let s = Schedule::SwaAnneal {
            from_lr,
            swa_lr,
            anneal_epochs,
            strategy,
        };
        s.validate()?;
        Ok(s)
    }

    /// Cosine annealing from `lr_max` to `lr_min` over `epochs` epochs, per epoch or per step.
    #[doc(alias = "CosineAnnealingLR")]
    pub fn cosine(
        lr_max: f32,
        lr_min: f32,
        epochs: usize,
        per_step: bool,
    ) -> Result<Self, ScheduleError> {
        let s = Schedule::Cosine {
            lr_max,
            lr_min,
            epochs,
            per_step,
        };
        s.validate()?;
        Ok(s)
    }

    /// Step decay by `gamma` at each of `milestones`.
    #[doc(alias = "MultiStepLR")]
    pub fn step_decay(
        lr_init: f32,
        gamma: f32,
        milestones: Vec<usize>,
    ) -> Result<Self, ScheduleError> {
        let s = Schedule::StepDecay {
            lr_init,
            gamma,
            milestones,
        };
        s.validate()?;
        Ok(s)
    }

    /// This schedule before `switch_epoch`, `next` (with epochs counted from `switch_epoch`) after.
    pub fn then(self, switch_epoch: usize, next: Schedule) -> Schedule {
        Schedule::Then {
            first: Box::new(self),
            switch_epoch,
            then: Box::new(next),
        }
    }

    /// This schedule before `switch_epoch`, then SWALR-style annealing to `swa_lr` starting from the
    /// learning rate this schedule has at the start of `switch_epoch`, as PyTorch's `SWALR` starts from
    /// the optimiser's current learning rate. A per-iteration schedule is read at step 0 of
    /// `switch_epoch` with one step per epoch.
    #[doc(alias = "SWALR")]
    pub fn then_anneal_to(
        self,
        switch_epoch: usize,
        swa_lr: f32,
        anneal_epochs: usize,
        strategy: AnnealStrategy,
    ) -> Result<Schedule, ScheduleError> {
        let from_lr = self.lr(switch_epoch, 0, 1);
        let anneal = Schedule::swa_anneal(from_lr, swa_lr, anneal_epochs, strategy)?;
        Ok(self.then(switch_epoch, anneal))
    }

    /// Checks every field: learning rates finite and non-negative, lengths at least 1, `gamma` finite and
    /// non-negative.
    pub fn validate(&self) -> Result<(), ScheduleError> {
        match self {
            Schedule::Constant { lr } => check_lr("constant.lr", *lr),
            Schedule::Original {
                lr_init,
                final_lr,
                horizon_epochs,
            } => {
                check_lr("original.lr_init", *lr_init)?;
                check_lr("original.final_lr", *final_lr)?;
                check_len("original.horizon_epochs", *horizon_epochs)
            }
            Schedule::Cyclic {
                alpha1,
                alpha2,
                cycle,
            } => {
                check_lr("cyclic.alpha1", *alpha1)?;
                check_lr("cyclic.alpha2", *alpha2)?;
                cycle.validate("cyclic.cycle")
            }
            Schedule::Triangular {
                alpha1,
                alpha2,
                cycle,
            } => {
                check_lr("triangular.alpha1", *alpha1)?;
                check_lr("triangular.alpha2", *alpha2)?;
                cycle.validate("triangular.cycle")
            }
            Schedule::SwaAnneal {
                from_lr, swa_lr, ..
            } => {
                check_lr("swa_anneal.from_lr", *from_lr)?;
                check_lr("swa_anneal.swa_lr", *swa_lr)
            }
            Schedule::Cosine {
                lr_max,
                lr_min,
                epochs,
                ..
            } => {
                check_lr("cosine.lr_max", *lr_max)?;
                check_lr("cosine.lr_min", *lr_min)?;
                check_len("cosine.epochs", *epochs)
            }
            Schedule::StepDecay { lr_init, gamma, .. } => {
                check_lr("step_decay.lr_init", *lr_init)?;
                if gamma.is_finite() && *gamma >= 0.0 {
                    Ok(())
                } else {
                    Err(ScheduleError::InvalidFactor {
                        field: "step_decay.gamma",
                        value: *gamma,
                    })
                }
            }
            Schedule::Then { first, then, .. } => {
                first.validate()?;
                then.validate()
            }
        }
    }

    /// The smallest and largest learning rates this schedule can return: every value of
    /// [`LrSchedule::lr`] lies in `[min, max]`.
    pub fn bounds(&self) -> (f32, f32) {
        fn pair(a: f32, b: f32) -> (f32, f32) {
            (a.min(b), a.max(b))
        }
        match self {
            Schedule::Constant { lr } => (*lr, *lr),
            Schedule::Original {
                lr_init, final_lr, ..
            } => pair(*lr_init, *final_lr),
            Schedule::Cyclic { alpha1, alpha2, .. }
            | Schedule::Triangular { alpha1, alpha2, .. } => pair(*alpha1, *alpha2),
            Schedule::SwaAnneal {
                from_lr, swa_lr, ..
            } => pair(*from_lr, *swa_lr),
            Schedule::Cosine { lr_max, lr_min, .. } => pair(*lr_max, *lr_min),
            Schedule::StepDecay {
                lr_init,
                gamma,
                milestones,
            } => {
                let last = step_decay_value(*lr_init, *gamma, milestones.len());
                pair(*lr_init, last)
            }
            Schedule::Then { first, then, .. } => {
                let (a, b) = first.bounds();
                let (c, d) = then.bounds();
                (a.min(c), b.max(d))
            }
        }
    }
}

fn step_decay_value(lr_init: f32, gamma: f32, decays: usize) -> f32 {
    let exponent = i32::try_from(decays).unwrap_or(i32::MAX);
    (f64::from(lr_init) * f64::from(gamma).powi(exponent)) as f32
}

impl LrSchedule for Schedule {
    fn lr(&self, epoch: usize, step: usize, steps_per_epoch: usize) -> f32 {
        let steps_per_epoch = steps_per_epoch.max(1);
        match self {
            Schedule::Constant { lr } => *lr,
            Schedule::Original {
                lr_init,
                final_lr,
                horizon_epochs,
            } => {
                let t = epoch as f64 / (*horizon_epochs).max(1) as f64;
                if t <= 0.5 {
                    *lr_init
                } else if t <= 0.9 {
                    mix(*lr_init, *final_lr, (t - 0.5) / 0.4) as f32
                } else {
                    *final_lr
                }
            }
            Schedule::Cyclic {
                alpha1,
                alpha2,
                cycle,
            } => {
                let (position, c) = cycle_position(*cycle, epoch, step, steps_per_epoch);
                if position == c {
                    return *alpha2;
                }
                mix(*alpha1, *alpha2, position as f64 / c as f64) as f32
            }
            Schedule::Triangular {
                alpha1,
                alpha2,
                cycle,
            } => {
                let (position, c) = cycle_position(*cycle, epoch, step, steps_per_epoch);
                // 2t = 2·position / c, compared in integers so that t = 1/2 is found exactly.
                let twice = 2 * position;
                if twice <= c {
                    mix(*alpha1, *alpha2, twice as f64 / c as f64) as f32
                } else {
                    mix(*alpha2, *alpha1, (twice - c) as f64 / c as f64) as f32
                }
            }
            Schedule::SwaAnneal {
                from_lr,
                swa_lr,
                anneal_epochs,
                strategy,
            } => {
                let t = if *anneal_epochs == 0 {
                    1.0
                } else {
                    epoch as f64 / *anneal_epochs as f64
                };
                if t >= 1.0 {
                    return *swa_lr;
                }
                mix(*from_lr, *swa_lr, strategy.progress(t)) as f32
            }
            Schedule::Cosine {
                lr_max,
                lr_min,
                epochs,
                per_step,
            } => {
                let elapsed = if *per_step {
                    epoch as f64 + step as f64 / steps_per_epoch as f64
                } else {
                    epoch as f64
                };
                let p = elapsed / (*epochs).max(1) as f64;
                if p >= 1.0 {
                    return *lr_min;
                }
                let keep = (1.0 + (std::f64::consts::PI * p).cos()) / 2.0;
                mix(*lr_min, *lr_max, keep) as f32
            }
            Schedule::StepDecay {
                lr_init,
                gamma,
                milestones,
            } => {
                let decays = milestones.iter().filter(|&&m| m <= epoch).count();
                if decays == 0 {
                    *lr_init
                } else {
                    step_decay_value(*lr_init, *gamma, decays)
                }
            }
            Schedule::Then {
                first,
                switch_epoch,
                then,
            } => {
                if epoch < *switch_epoch {
                    first.lr(epoch, step, steps_per_epoch)
                } else {
                    then.lr(epoch - switch_epoch, step, steps_per_epoch)
                }
            }
        }
    }
}
