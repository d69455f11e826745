//! The SWA policy: one object a training loop asks "what is the learning rate now, and do I average now?".
//!
//! A [`SwaPolicy`] holds the whole run's [`Schedule`], the epoch at which the SWA phase starts and how often
//! to average. Epochs and steps are 0-based; "completed" counts are 1-based:
//!
//! - the SWA phase starts once `swa_start_epoch` epochs are completed (the original code's `--swa_start`,
//!   "the number of epochs after which SWA starts to average");
//! - snapshots are taken whenever the time completed since that point, `k`, is a multiple of the period:
//!   `k = 0, c, 2c, …`. The `k = 0` snapshot is the model at the end of epoch `swa_start_epoch − 1`: the
//!   original code's first average, and the paper's Algorithm 1, which initialises `w_SWA` with the
//!   pre-trained weights before the first cycle. With `swa_start_epoch = 0` that point is the initial model,
//!   which the policy never reports, as the original code never averages it.
//!
//! With [`Period::Epochs`] the loop averages after an epoch ([`SwaPolicy::average_after_epoch`]); with
//! [`Period::Iterations`] after an optimiser step ([`SwaPolicy::average_after_step`]). The other method is
//! then always `false`, so a loop may simply call both:
//!
//! ```
//! use swa_core::policy::SwaPolicy;
//!
//! // VGG-16 on CIFAR with the original code's preset: lr_init 0.05, swa_start 161, swa_lr 0.01, every epoch.
//! let policy = SwaPolicy::original(0.05, 0.01, 161, 1).unwrap();
//! let (epochs, steps_per_epoch) = (300, 391);
//! let mut snapshots = 0;
//! for epoch in 0..epochs {
//!     for step in 0..steps_per_epoch {
//!         let _lr = policy.lr(epoch, step, steps_per_epoch); // set the optimiser's lr, take a step
//!         if policy.average_after_step(epoch, step, steps_per_epoch) {
//!             snapshots += 1;
//!         }
//!     }
//!     if policy.average_after_epoch(epoch) {
//!         snapshots += 1; // average.update(&backend, &model)
//!     }
//! }
//! // Epoch indices 160..=299 are averaged: 140 snapshots.
//! assert_eq!(snapshots, 140);
//! assert_eq!(policy.snapshots_by_end(epochs, steps_per_epoch), 140);
//! ```

use serde::{Deserialize, Serialize};

use crate::schedule::{AnnealStrategy, LrSchedule, Period, Schedule, ScheduleError};

/// When to average and at which learning rate: the whole SWA recipe of a run.
#[doc(alias = "SWALR")]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SwaPolicy {
    /// The learning rate of every step of the run, before and during the SWA phase.
    pub schedule: Schedule,
    /// The number of completed epochs at which the SWA phase starts (`--swa_start`).
    pub swa_start_epoch: usize,
    /// How often to average from the start of the SWA phase (`--swa_c_epochs`, or the cycle length).
    pub every: Period,
}

impl SwaPolicy {
    /// A policy from its parts, validated.
    pub fn new(
        schedule: Schedule,
        swa_start_epoch: usize,
        every: Period,
    ) -> Result<Self, ScheduleError> {
        let policy = SwaPolicy {
            schedule,
            swa_start_epoch,
            every,
        };
        policy.validate()?;
        Ok(policy)
    }

    /// The original SWA code's recipe (`train.py --swa --lr_init … --swa_start … --swa_lr …
    /// --swa_c_epochs …`): [`Schedule::original_swa`], averaging after epoch index `e` when
    /// `e + 1 ≥ swa_start` and `(e + 1 − swa_start) mod swa_c_epochs = 0`.
    pub fn original(
        lr_init: f32,
        swa_lr: f32,
        swa_start: usize,
        swa_c_epochs: usize,
    ) -> Result<Self, ScheduleError> {
        let schedule = Schedule::original_swa(lr_init, swa_lr, swa_start)?;
        SwaPolicy::new(schedule, swa_start, Period::Epochs(swa_c_epochs))
    }

    /// The paper's cyclical recipe: `pretrain` until `swa_start` epochs are completed, then the cyclical
    /// schedule from `alpha1` to `alpha2` with cycles of `cycle`, averaging at the end of every cycle (its
    /// last iteration runs at `alpha2`), after averaging the pre-trained model itself (`k = 0`).
    pub fn cyclic(
        pretrain: Schedule,
        swa_start: usize,
        alpha1: f32,
        alpha2: f32,
        cycle: Period,
    ) -> Result<Self, ScheduleError> {
        let cyclic = Schedule::cyclic(alpha1, alpha2, cycle)?;
        SwaPolicy::new(pretrain.then(swa_start, cyclic), swa_start, cycle)
    }

    /// PyTorch's recipe (`AveragedModel` with `SWALR`): `base` until `swa_start` epochs are completed, then
    /// annealing from `base`'s learning rate at that point to `swa_lr` over `anneal_epochs` epochs, averaging
    /// every `every`.
    #[doc(alias = "SWALR")]
    pub fn swalr(
        base: Schedule,
        swa_start: usize,
        swa_lr: f32,
        anneal_epochs: usize,
        strategy: AnnealStrategy,
        every: Period,
    ) -> Result<Self, ScheduleError> {
        let schedule = base.then_anneal_to(swa_start, swa_lr, anneal_epochs, strategy)?;
        SwaPolicy::new(schedule, swa_start, every)
    }

    /// The learning rate of step `step` of epoch `epoch` (both 0-based): the schedule's, so that a loop needs
    /// only the policy. The same as [`LrSchedule::lr`].
    pub fn lr(&self, epoch: usize, step: usize, steps_per_epoch: usize) -> f32 {
        self.schedule.lr(epoch, step, steps_per_epoch)
    }

    /// Checks the schedule and that the period is at least 1.
    pub fn validate(&self) -> Result<(), ScheduleError> {
        self.schedule.validate()?;
        match self.every {
            Period::Epochs(0) | Period::Iterations(0) => Err(ScheduleError::ZeroLength {
                field: "policy.every",
            }),
            _ => Ok(()),
        }
    }

    /// Whether to average after finishing epoch `epoch` (0-based): with [`Period::Epochs`]`(c)`, when
    /// `epoch + 1 ≥ swa_start_epoch` and `(epoch + 1 − swa_start_epoch) mod c = 0` (exactly the original
    /// code's condition). Always `false` with [`Period::Iterations`].
    pub fn average_after_epoch(&self, epoch: usize) -> bool {
        match self.every {
            Period::Epochs(c) if c > 0 => {
                let completed = epoch as u64 + 1;
                let start = self.swa_start_epoch as u64;
                completed >= start && (completed - start).is_multiple_of(c as u64)
            }
            _ => false,
        }
    }

    /// Whether to average after optimiser step `step` (0-based) of epoch `epoch`: with
    /// [`Period::Iterations`]`(c)`, when the iterations completed since the end of epoch
    /// `swa_start_epoch − 1`, `k = epoch · steps_per_epoch + step + 1 − swa_start_epoch · steps_per_epoch`,
    /// satisfy `k ≥ 0` and `k mod c = 0`. Always `false` with [`Period::Epochs`].
    /// `steps_per_epoch = 0` is treated as 1.
    pub fn average_after_step(&self, epoch: usize, step: usize, steps_per_epoch: usize) -> bool {
        match self.every {
            Period::Iterations(c) if c > 0 => {
                let steps_per_epoch = steps_per_epoch.max(1) as u64;
                let completed = (epoch as u64)
                    .saturating_mul(steps_per_epoch)
                    .saturating_add(step as u64 + 1);
                let start = (self.swa_start_epoch as u64).saturating_mul(steps_per_epoch);
                completed >= start && (completed - start).is_multiple_of(c as u64)
            }
            _ => false,
        }
    }

    /// Whether epoch `epoch` (0-based) belongs to the SWA phase.
    pub fn in_swa_phase(&self, epoch: usize) -> bool {
        epoch >= self.swa_start_epoch
    }

    /// The number of snapshots this policy takes in a run of `epochs` epochs of `steps_per_epoch` steps:
    /// the number of `true` answers of [`SwaPolicy::average_after_epoch`] and
    /// [`SwaPolicy::average_after_step`] over the run. The average's count after the run equals it.
    pub fn snapshots_by_end(&self, epochs: usize, steps_per_epoch: usize) -> u64 {
        let (completed, start, c) = match self.every {
            Period::Epochs(c) => (epochs as u64, self.swa_start_epoch as u64, c as u64),
            Period::Iterations(c) => {
                let spe = steps_per_epoch.max(1) as u64;
                (
                    (epochs as u64).saturating_mul(spe),
                    (self.swa_start_epoch as u64).saturating_mul(spe),
                    c as u64,
                )
            }
        };
        if c == 0 || completed < start {
            return 0;
        }
        // Multiples k = 0, c, 2c, … of the period up to `completed − start`; k = 0 is a completed count of
        // `start`, which is no step's end when `start` is 0.
        let multiples = (completed - start) / c + 1;
        if start == 0 {
            multiples - 1
        } else {
            multiples
        }
    }
}

impl LrSchedule for SwaPolicy {
    fn lr(&self, epoch: usize, step: usize, steps_per_epoch: usize) -> f32 {
        self.schedule.lr(epoch, step, steps_per_epoch)
    }
}
