//! Shake-Shake's mixing: the coefficient draws and which rule uses which. The network's tensors and sizes
//! are checked in `nets_params.rs`, its gradients in `nets_gradients.rs`, and its forward and backward
//! passes against PyTorch in `golden_forward.rs`.

use rand::rngs::StdRng;
use rand::SeedableRng;
use swa_core::CpuBackend;
use swa_models::layers::{shake_coefficients, ShakeBackward, ShakeBlock, ShakeForward, ShakeMix};
use swa_models::ForwardMode;

#[test]
fn shake_coefficients_are_uniform_independent_and_reproducible() {
    let (alpha, beta) = shake_coefficients(3, 5, 4096);
    assert_eq!((alpha.len(), beta.len()), (4096, 4096));
    assert_eq!(
        shake_coefficients(3, 5, 4096),
        (alpha.clone(), beta.clone())
    );
    // The first images of a larger batch draw what a smaller batch draws.
    assert_eq!(shake_coefficients(3, 5, 3).0, alpha[..3]);
    assert_ne!(shake_coefficients(4, 5, 4096).0, alpha, "another step");
    assert_ne!(shake_coefficients(3, 6, 4096).0, alpha, "another block");
    for values in [&alpha, &beta] {
        assert!(values.iter().all(|v| (0.0..1.0).contains(v)));
        let mean = values.iter().sum::<f32>() / values.len() as f32;
        assert!((mean - 0.5).abs() < 0.02, "mean {mean}");
    }
    let correlation = alpha
        .iter()
        .zip(&beta)
        .map(|(a, b)| (a - 0.5) * (b - 0.5))
        .sum::<f32>()
        / alpha.len() as f32
        * 12.0;
    assert!(correlation.abs() < 0.05, "α and β correlate: {correlation}");
}

#[test]
fn each_mixing_rule_picks_its_coefficients() {
    let backend = CpuBackend::with_threads(1);
    let mut rng = StdRng::seed_from_u64(1);
    let train = ForwardMode::Train { seed: 9 };
    let (alpha, beta) = shake_coefficients(9, 2, 3);
    let even = vec![0.5; 3];
    for (forward, backward, want) in [
        (ShakeForward::Shake, ShakeBackward::Shake, (&alpha, &beta)),
        (ShakeForward::Shake, ShakeBackward::Keep, (&alpha, &alpha)),
        (ShakeForward::Shake, ShakeBackward::Even, (&alpha, &even)),
        (ShakeForward::Even, ShakeBackward::Keep, (&even, &even)),
    ] {
        let mix = ShakeMix { forward, backward };
        let block = ShakeBlock::new(&backend, 2, 2, 1, mix, 2, &mut rng).unwrap();
        assert_eq!(
            block.coefficients(train, 3),
            (want.0.clone(), want.1.clone())
        );
        // Evaluation mixes evenly whatever the rule.
        assert_eq!(block.coefficients(ForwardMode::Eval, 3).0, even);
    }
}
