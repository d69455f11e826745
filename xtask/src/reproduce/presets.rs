//! The paper's protocol as presets, and the paper's results to compare with.

use std::fmt;

use anyhow::Result;
use swa_core::swag::DEFAULT_MAX_RANK;
use swa_data::{DatasetKind, Normalization};
pub use swa_models::protocol::{Recipe, RunKind};
use swa_models::Architecture;

/// How much of the protocol to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// The original code's hyper-parameters per model, exactly (days of GPU time for the three networks).
    Paper,
    /// A budget of 16 epochs: about 80 minutes on a 2-core CPU for one seed of PreResNet-20, the default;
    /// the CPU-sized Shake-Shake and PyramidNet (`shakeshake26-2x32d`, `pyramidnet110a48`) take about 11
    /// and 13 hours (with `--budget` and `--train-limit` for a shorter comparison).
    Quick,
    /// A few minutes on a subset of the data, to try the command.
    Smoke,
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Preset::Paper => "paper",
            Preset::Quick => "quick",
            Preset::Smoke => "smoke",
        })
    }
}

/// The networks a preset trains when `--model` is not given.
pub fn default_models(preset: Preset) -> Vec<&'static str> {
    match preset {
        Preset::Paper => vec!["vgg16", "preresnet164", "wrn28x10"],
        Preset::Quick => vec!["preresnet20"],
        Preset::Smoke => vec!["preresnet8"],
    }
}

/// The recipe of `model` under `preset` for a data set.
pub fn recipe(preset: Preset, model: &str, data: DatasetKind) -> Result<Recipe> {
    let architecture: Architecture = model.parse()?;
    let cifar100 = data == DatasetKind::Cifar100;
    // The original code (github.com/timgaripov/swa, README): SWA learning rates per model and data set.
    let base = match (preset, architecture) {
        (Preset::Paper, Architecture::Vgg16 | Architecture::Vgg16Bn) => Recipe {
            architecture,
            budget: 200,
            swa_epochs: 300,
            lr_init: 0.05,
            swa_start: 161,
            swa_lr: 0.01,
            weight_decay: 5e-4,
            batch_size: 128,
            fge_cycle: 4,
            fge_test_every: 0,
            swa_eval_every: 5,
            train_limit: None,
            test_limit: None,
            swag_max_rank: None,
            holdout: 0,
        },
        (Preset::Paper, Architecture::PreResNet { .. }) => Recipe {
            architecture,
            budget: 150,
            swa_epochs: 225,
            lr_init: 0.1,
            swa_start: 126,
            swa_lr: if cifar100 { 0.05 } else { 0.01 },
            weight_decay: 3e-4,
            batch_size: 128,
            fge_cycle: 4,
            fge_test_every: 0,
            swa_eval_every: 5,
            train_limit: None,
            test_limit: None,
            swag_max_rank: None,
            holdout: 0,
        },
        (Preset::Paper, Architecture::WideResNet { .. }) => Recipe {
            architecture,
            budget: 200,
            swa_epochs: 300,
            lr_init: 0.1,
            swa_start: 161,
            swa_lr: if cifar100 { 0.05 } else { 0.01 },
            weight_decay: 5e-4,
            batch_size: 128,
            fge_cycle: 4,
            fge_test_every: 0,
            swa_eval_every: 5,
            train_limit: None,
            test_limit: None,
            swag_max_rank: None,
            holdout: 0,
        },
        // Shake-Shake and PyramidNet have no command line in the original code. Their recipes keep the
        // protocol of the others (the original code's schedule shape, SWA after 80% of the budget
        // for 1.5 budgets, the SWA rate a tenth of the initial one on CIFAR-10 and half of it on
        // CIFAR-100) with each network's own training budget, initial rate, weight decay and batch from
        // its paper: Gastaldi (2017) trains Shake-Shake for 1800 epochs from 0.2 with weight decay 1e-4;
        // Han et al. (2017) train PyramidNet for 300 epochs from 0.1 (CIFAR-10) or 0.5 (CIFAR-100) with
        // weight decay 1e-4; both at batch 128.
        (Preset::Paper, Architecture::ShakeShake { .. }) => Recipe {
            architecture,
            budget: 1800,
            swa_epochs: 2700,
            lr_init: 0.2,
            swa_start: 1441,
            swa_lr: if cifar100 { 0.1 } else { 0.02 },
            weight_decay: 1e-4,
            batch_size: 128,
            fge_cycle: 4,
            fge_test_every: 0,
            swa_eval_every: 25,
            train_limit: None,
            test_limit: None,
            swag_max_rank: None,
            holdout: 0,
        },
        (Preset::Paper, Architecture::PyramidNet { .. }) => Recipe {
            architecture,
            budget: 300,
            swa_epochs: 450,
            lr_init: if cifar100 { 0.5 } else { 0.1 },
            swa_start: 241,
            swa_lr: if cifar100 { 0.25 } else { 0.01 },
            weight_decay: 1e-4,
            batch_size: 128,
            fge_cycle: 4,
            fge_test_every: 0,
            swa_eval_every: 5,
            train_limit: None,
            test_limit: None,
            swag_max_rank: None,
            holdout: 0,
        },
        (Preset::Paper, Architecture::ResNet { .. } | Architecture::DenseNet { .. }) => {
            anyhow::bail!(
                "the paper preset has no CIFAR recipe for {architecture}: use --preset quick or smoke"
            )
        }
        (Preset::Quick, _) => Recipe {
            architecture,
            budget: 16,
            swa_epochs: 24,
            lr_init: 0.1,
            // Epoch 11 rather than the paper's ~0.8 of the budget so that the FGE run's two-epoch cycles
            // fit three times before the budget (snapshots at epochs 11, 13 and 15): the loss-surface
            // planes through FGE snapshots and through a cyclical trajectory need three points.
            swa_start: 11,
            swa_lr: if cifar100 { 0.05 } else { 0.01 },
            weight_decay: 3e-4,
            batch_size: 128,
            fge_cycle: 2,
            fge_test_every: 0,
            swa_eval_every: 2,
            train_limit: None,
            test_limit: None,
            swag_max_rank: Some(DEFAULT_MAX_RANK),
            holdout: 0,
        },
        (Preset::Smoke, _) => Recipe {
            architecture,
            budget: 4,
            swa_epochs: 6,
            lr_init: 0.1,
            swa_start: 3,
            swa_lr: if cifar100 { 0.05 } else { 0.01 },
            weight_decay: 3e-4,
            batch_size: 64,
            fge_cycle: 2,
            fge_test_every: 0,
            swa_eval_every: 1,
            train_limit: Some(1024),
            test_limit: Some(512),
            swag_max_rank: Some(DEFAULT_MAX_RANK),
            holdout: 0,
        },
    };
    base.validate()?;
    Ok(base)
}

/// The input normalisation of the original code's transform for a network.
pub fn normalization_of(architecture: Architecture) -> Normalization {
    match architecture {
        Architecture::Vgg16 | Architecture::Vgg16Bn => Normalization::ImageNetStats,
        _ => Normalization::CifarStats,
    }
}

/// The runs a preset makes when `--runs` is not given.
pub fn default_runs(preset: Preset) -> Vec<RunKind> {
    match preset {
        // An hour on the CPU is spent on the two runs the table needs most.
        Preset::Quick => vec![RunKind::Sgd, RunKind::Swa],
        Preset::Paper | Preset::Smoke => vec![RunKind::Sgd, RunKind::Swa, RunKind::Fge],
    }
}

/// A published accuracy: mean and standard deviation over the paper's runs (`None` where it gives one run).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Published {
    /// Mean test accuracy, percent.
    pub mean: f64,
    /// Standard deviation, percent.
    pub std: Option<f64>,
}

/// The paper's test accuracies (Izmailov et al., UAI 2018, Table 1), in the order SGD, FGE (1 budget),
/// SWA at 1, 1.25 and 1.5 budgets; `None` where the table has no figure for us to show.
pub fn published(data: DatasetKind, architecture: Architecture) -> Option<[Option<Published>; 5]> {
    let p = |mean, std| {
        Some(Published {
            mean,
            std: Some(std),
        })
    };
    let one = |mean| Some(Published { mean, std: None });
    let row = match (data, architecture) {
        // The abstract's Shake-Shake and PyramidNet results: SWA's accuracy at the end of its run.
        (
            DatasetKind::Cifar10,
            Architecture::ShakeShake {
                depth: 26,
                width: 64,
            },
        ) => [None, None, None, None, one(97.12)],
        (
            DatasetKind::Cifar100,
            Architecture::PyramidNet {
                depth: 272,
                alpha: 200,
                bottleneck: true,
            },
        ) => [None, None, None, None, one(84.16)],
        (DatasetKind::Cifar100, Architecture::Vgg16) => [
            p(72.55, 0.10),
            one(74.26),
            p(73.91, 0.12),
            p(74.17, 0.15),
            p(74.27, 0.25),
        ],
        (DatasetKind::Cifar100, Architecture::PreResNet { depth: 164 }) => [
            p(78.49, 0.36),
            one(79.84),
            p(79.77, 0.17),
            p(80.18, 0.23),
            p(80.35, 0.16),
        ],
        (
            DatasetKind::Cifar100,
            Architecture::WideResNet {
                depth: 28,
                widen_factor: 10,
                ..
            },
        ) => [
            p(80.82, 0.23),
            one(82.27),
            p(81.46, 0.23),
            p(81.91, 0.27),
            p(82.15, 0.27),
        ],
        (DatasetKind::Cifar10, Architecture::Vgg16) => [
            p(93.25, 0.16),
            one(93.52),
            p(93.59, 0.16),
            p(93.70, 0.22),
            p(93.64, 0.18),
        ],
        (DatasetKind::Cifar10, Architecture::PreResNet { depth: 164 }) => [
            p(95.28, 0.10),
            one(95.45),
            p(95.56, 0.11),
            p(95.77, 0.04),
            p(95.83, 0.03),
        ],
        (
            DatasetKind::Cifar10,
            Architecture::WideResNet {
                depth: 28,
                widen_factor: 10,
                ..
            },
        ) => [
            p(96.18, 0.11),
            one(96.36),
            p(96.45, 0.11),
            p(96.64, 0.08),
            p(96.79, 0.05),
        ],
        _ => return None,
    };
    Some(row)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paper_recipes_follow_the_original_command_lines() -> Result<()> {
        let vgg = recipe(Preset::Paper, "vgg16", DatasetKind::Cifar100)?;
        assert_eq!((vgg.budget, vgg.swa_epochs, vgg.swa_start), (200, 300, 161));
        assert_eq!(
            (vgg.lr_init, vgg.swa_lr, vgg.weight_decay),
            (0.05, 0.01, 5e-4)
        );
        let pre = recipe(Preset::Paper, "preresnet164", DatasetKind::Cifar100)?;
        assert_eq!(
            (pre.budget, pre.swa_epochs, pre.swa_start, pre.swa_lr),
            (150, 225, 126, 0.05)
        );
        let pre10 = recipe(Preset::Paper, "preresnet164", DatasetKind::Cifar10)?;
        assert_eq!(pre10.swa_lr, 0.01);
        let wrn = recipe(Preset::Paper, "wrn28x10", DatasetKind::Cifar100)?;
        assert_eq!(
            (
                wrn.budget,
                wrn.swa_start,
                wrn.lr_init,
                wrn.swa_lr,
                wrn.weight_decay
            ),
            (200, 161, 0.1, 0.05, 5e-4)
        );
        Ok(())
    }

    #[test]
    fn swa_is_reported_at_one_one_and_a_quarter_and_one_and_a_half_budgets() -> Result<()> {
        let quick = recipe(Preset::Quick, "preresnet20", DatasetKind::Cifar10)?;
        assert_eq!(quick.swa_report_epochs(), vec![16, 20, 24]);
        let vgg = recipe(Preset::Paper, "vgg16", DatasetKind::Cifar10)?;
        assert_eq!(vgg.swa_report_epochs(), vec![200, 250, 300]);
        Ok(())
    }

    #[test]
    fn fge_snapshots_fall_on_the_cycles_lowest_learning_rate() -> Result<()> {
        let quick = recipe(Preset::Quick, "preresnet20", DatasetKind::Cifar10)?;
        let config = quick.run_config(RunKind::Fge, 1)?;
        let policy = config
            .policy()
            .ok_or_else(|| anyhow::anyhow!("FGE takes snapshots"))?;
        let steps = 10;
        let snapshot_epochs: Vec<usize> = (0..config.epochs)
            .filter(|&e| policy.average_after_epoch(e))
            .collect();
        assert!(!snapshot_epochs.is_empty());
        let alpha2 = 0.5 * quick.lr_init / 100.0;
        for epoch in snapshot_epochs {
            let lr = policy.lr(epoch, steps - 1, steps);
            assert!(
                (lr - alpha2).abs() <= 1e-6 + alpha2 * 0.15,
                "epoch {epoch}: lr {lr}, α2 {alpha2}"
            );
        }
        Ok(())
    }

    #[test]
    fn the_quick_fge_run_takes_the_three_snapshots_a_plane_needs() -> Result<()> {
        let quick = recipe(Preset::Quick, "preresnet20", DatasetKind::Cifar10)?;
        let config = quick.run_config(RunKind::Fge, 1)?;
        assert_eq!(config.snapshot_epochs(), vec![11, 13, 15]);
        Ok(())
    }

    #[test]
    fn shake_shake_and_pyramidnet_train_on_their_papers_budgets() -> Result<()> {
        let shake = recipe(Preset::Paper, "shakeshake26-2x64d", DatasetKind::Cifar10)?;
        assert_eq!(
            (shake.budget, shake.swa_epochs, shake.lr_init, shake.swa_lr),
            (1800, 2700, 0.2, 0.02)
        );
        assert_eq!((shake.weight_decay, shake.batch_size), (1e-4, 128));
        let pyramid = recipe(Preset::Paper, "pyramidnet272", DatasetKind::Cifar100)?;
        assert_eq!(
            (
                pyramid.budget,
                pyramid.swa_epochs,
                pyramid.lr_init,
                pyramid.swa_lr
            ),
            (300, 450, 0.5, 0.25)
        );
        // SWA starts after 80% of the budget, as for the original code's VGG and WideResNet (161 of 200).
        for r in [&shake, &pyramid] {
            assert_eq!(5 * (r.swa_start - 1), 4 * r.budget, "{}", r.architecture);
        }
        let paper = |data, model: &str| -> Result<Option<f64>> {
            Ok(published(data, model.parse()?).and_then(|row| row[4].map(|p| p.mean)))
        };
        assert_eq!(
            paper(DatasetKind::Cifar10, "shakeshake26-2x64d")?,
            Some(97.12)
        );
        assert_eq!(paper(DatasetKind::Cifar100, "pyramidnet272")?, Some(84.16));
        assert_eq!(paper(DatasetKind::Cifar100, "shakeshake26-2x64d")?, None);
        Ok(())
    }

    #[test]
    fn unknown_models_name_the_valid_ones() {
        let error = recipe(Preset::Quick, "resnext50", DatasetKind::Cifar10)
            .err()
            .map(|e| e.to_string());
        let message = error.unwrap_or_default();
        assert!(message.contains("preresnet"), "{message}");
    }
}
