//! The loss-surface constructions and their evaluation: the plane's basis, points that coincide with
//! checkpoints, resumed surveys, and the exactly quadratic part of the loss along rays.

use swa_core::CpuBackend;
use swa_models::checkpoint::StateDict;
use swa_models::geometry::{
    line, plane, rays, run_survey, GeometryError, ParameterLayout, Plane, PointCache, PointMetrics,
    SurfaceData, SurfaceProbe, Survey, WeightVector,
};
use swa_models::{update_bn, Architecture, HostBatch};

const CLASSES: usize = 10;
const WEIGHT_DECAY: f32 = 5e-4;

fn architecture() -> Architecture {
    "preresnet8".parse().unwrap()
}

/// A batch of `n` pseudo-random images in [-1, 1) with labels, the same for the same `seed`.
fn batch(n: usize, seed: u64) -> HostBatch {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    HostBatch {
        images: (0..n * 3 * 32 * 32)
            .map(|_| (next() % 2000) as f32 / 1000.0 - 1.0)
            .collect(),
        shape: [n, 3, 32, 32],
        labels: (0..n).map(|_| (next() % CLASSES as u64) as u32).collect(),
    }
}

struct Fixture {
    backend: CpuBackend,
    train: Vec<HostBatch>,
    test: Vec<HostBatch>,
    weights: Vec<WeightVector>,
}

fn fixture() -> Fixture {
    let backend = CpuBackend::with_threads(1);
    let layout = ParameterLayout::of(architecture().build(&backend, CLASSES, 0).unwrap().as_ref());
    let weights = (1..=3)
        .map(|seed| {
            let net = architecture().build(&backend, CLASSES, seed).unwrap();
            layout.vector_from(&backend, net.as_ref()).unwrap()
        })
        .collect();
    Fixture {
        backend,
        train: vec![batch(8, 1), batch(8, 2), batch(5, 3)],
        test: vec![batch(6, 4)],
        weights,
    }
}

impl Fixture {
    fn data(&self) -> SurfaceData<'_> {
        SurfaceData {
            train: &self.train,
            test: &self.test,
        }
    }

    fn probe(&self) -> SurfaceProbe<CpuBackend> {
        let net = architecture().build(&self.backend, CLASSES, 0).unwrap();
        SurfaceProbe::new(self.backend.clone(), net, WEIGHT_DECAY)
    }
}

#[test]
fn the_plane_basis_is_orthonormal_and_puts_the_three_points_at_their_coordinates() {
    let f = fixture();
    let [w1, w2, w3] = [&f.weights[0], &f.weights[1], &f.weights[2]];
    let plane = Plane::through(w1, w2, w3).unwrap();
    assert!(
        (plane.u.norm() - 1.0).abs() < 1e-6,
        "|u| = {}",
        plane.u.norm()
    );
    assert!(
        (plane.v.norm() - 1.0).abs() < 1e-6,
        "|v| = {}",
        plane.v.norm()
    );
    assert!(
        plane.u.dot(&plane.v).abs() < 1e-6,
        "u·v = {}",
        plane.u.dot(&plane.v)
    );

    let scale = w1.norm().max(w2.norm()).max(w3.norm());
    for w in [w1, w2, w3] {
        let at = plane.project(w);
        // Every defining point lies in the plane, and the plane's point at its coordinates is itself.
        assert!(
            at.off_plane < 1e-3 * scale,
            "{} off the plane",
            at.off_plane
        );
        let rebuilt = plane.point(at.x, at.y);
        assert!(
            rebuilt.distance(w) < 1e-5 * scale,
            "{}",
            rebuilt.distance(w)
        );
    }
    let at2 = plane.project(w2);
    assert!((at2.x - w2.distance(w1)).abs() < 1e-4 * scale && at2.y.abs() < 1e-4 * scale);
    assert!(plane.project(w3).y > 0.0);

    // Collinear points span no plane.
    let mut midpoint = w1.clone();
    midpoint.set_combination(&[(0.5, w1), (0.5, w2)]);
    assert!(matches!(
        Plane::through(w1, w2, &midpoint),
        Err(GeometryError::Degenerate(_))
    ));
    assert!(matches!(
        Plane::through(w1, w1, w3),
        Err(GeometryError::Degenerate(_))
    ));
}

#[test]
fn the_point_at_a_checkpoint_evaluates_exactly_as_the_checkpoint_with_bn_recomputed() {
    let f = fixture();
    let backend = &f.backend;
    // The "checkpoint": weights of seed 2, BatchNorm statistics recomputed by update_bn, then evaluated.
    let mut net = architecture().build(backend, CLASSES, 2).unwrap();
    update_bn(backend, net.as_mut(), &f.train, 0).unwrap();
    let train = swa_models::evaluate::evaluate(backend, net.as_mut(), &f.train).unwrap();
    let test = swa_models::evaluate::evaluate(backend, net.as_mut(), &f.test).unwrap();

    // The line's t = 0 is SWA (here seed 2's weights) and t = 1 SGD (seed 1's).
    let survey = line(&f.weights[0], &f.weights[1], &[0.0, 1.0]).unwrap();
    assert_eq!(survey.point(0), f.weights[1]);
    assert_eq!(survey.point(1), f.weights[0]);
    let mut probe = f.probe();
    let at_swa = probe.evaluate(&survey.point(0), f.data()).unwrap();
    assert_eq!(at_swa.train_nll, train.loss);
    assert_eq!(at_swa.train_error, 100.0 - train.accuracy);
    assert_eq!(at_swa.test_loss, test.loss);
    assert_eq!(at_swa.test_error, 100.0 - test.accuracy);
    let l2 = 0.5 * WEIGHT_DECAY as f64 * f.weights[1].dot(&f.weights[1]);
    assert_eq!(at_swa.l2_term, l2);
    assert_eq!(at_swa.train_loss, train.loss + l2);

    // The probe left the network with the point's weights and statistics: a fresh evaluation agrees.
    let stored = StateDict::from_module(backend, net.as_ref()).unwrap();
    let vector = ParameterLayout::of(net.as_ref())
        .vector_of(&stored)
        .unwrap();
    assert_eq!(vector, f.weights[1]);
}

#[test]
fn a_resumed_survey_equals_an_uninterrupted_one() {
    let f = fixture();
    let built = plane(
        "plane",
        [
            ("a", &f.weights[0]),
            ("b", &f.weights[1]),
            ("c", &f.weights[2]),
        ],
        &[],
        (3, 2),
        0.1,
    )
    .unwrap();
    let survey = &built.survey;
    let dir = tempfile::tempdir().unwrap();
    let fingerprint = survey.fingerprint(&[1, 2]);

    let whole_path = dir.path().join("whole.jsonl");
    let mut whole = PointCache::open(&whole_path, survey, fingerprint).unwrap();
    let expected = run_survey(survey, f.data(), vec![f.probe()], &mut whole, |_, _| {}).unwrap();
    assert_eq!(expected.len(), 6);

    // A run killed after two points, in the middle of writing a third line.
    let cut_path = dir.path().join("cut.jsonl");
    let text = std::fs::read_to_string(&whole_path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let partial = format!(
        "{}\n{}\n{}\n{}",
        lines[0],
        lines[1],
        lines[2],
        &lines[3][..10]
    );
    std::fs::write(&cut_path, partial).unwrap();
    let mut cut = PointCache::open(&cut_path, survey, fingerprint).unwrap();
    assert_eq!(cut.pending().len(), 4, "two points were cached");
    let mut evaluated = Vec::new();
    let resumed = run_survey(
        survey,
        f.data(),
        vec![f.probe(), f.probe()],
        &mut cut,
        |i, _| evaluated.push(i),
    )
    .unwrap();
    evaluated.sort_unstable();
    assert_eq!(evaluated, cut_pending_of(&lines));
    assert_eq!(resumed, expected);
    // The cache now holds every point once, and opening it again evaluates nothing.
    let reopened = PointCache::open(&cut_path, survey, fingerprint).unwrap();
    assert!(reopened.pending().is_empty());
    let values: Vec<PointMetrics> = reopened.results().iter().map(|m| m.unwrap()).collect();
    assert_eq!(values, expected);

    // A cache killed before its header was complete starts anew.
    let headless = dir.path().join("headless.jsonl");
    std::fs::write(&headless, &lines[0][..5]).unwrap();
    let fresh = PointCache::open(&headless, survey, fingerprint).unwrap();
    assert_eq!(fresh.pending().len(), 6);
    drop(fresh);
    assert!(PointCache::open(&headless, survey, fingerprint).is_ok());

    // A cache of another survey is refused, naming the file.
    let other = PointCache::open(&cut_path, survey, fingerprint ^ 1).unwrap_err();
    assert!(matches!(other, GeometryError::CacheMismatch { .. }));
    assert!(other.to_string().contains("cut.jsonl"), "{other}");
}

/// The indices not among the first two cached lines (after the header) of a cache.
fn cut_pending_of(lines: &[&str]) -> Vec<usize> {
    let cached: Vec<usize> = lines[1..3]
        .iter()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["index"]
                .as_u64()
                .unwrap() as usize
        })
        .collect();
    (0..6).filter(|i| !cached.contains(i)).collect()
}

#[test]
fn along_a_ray_the_l2_term_follows_its_parabola_and_the_directions_are_unit_and_reproducible() {
    let f = fixture();
    let w = &f.weights[0];
    let distances = [0.0, 0.5, 1.0, 2.0];
    let survey: Survey = rays(&[("SWA", w)], 2, &distances, 7).unwrap();
    assert_eq!(survey.points.len(), 8);
    let again = rays(&[("SWA", w)], 2, &distances, 7).unwrap();
    assert_eq!(
        survey.anchors, again.anchors,
        "the seed fixes the directions"
    );
    let other_seed = rays(&[("SWA", w)], 2, &distances, 8).unwrap();
    assert_ne!(survey.anchors[1], other_seed.anchors[1]);

    let mut probe = f.probe();
    for k in 0..2 {
        let d = &survey.anchors[1 + k];
        assert!((d.norm() - 1.0).abs() < 1e-6);
        let along = w.dot(d);
        for (i, &t) in distances.iter().enumerate() {
            let index = k * distances.len() + i;
            assert_eq!(survey.points[index].series, format!("SWA/ray-{k}"));
            let point = survey.point(index);
            assert!(
                (point.distance(w) - t).abs() < 1e-4,
                "{}",
                point.distance(w)
            );
            let metrics = probe.evaluate(&point, f.data()).unwrap();
            // wd/2·‖w + t·d‖² = wd/2·(‖w‖² + 2t⟨w, d⟩ + t²) for a unit d.
            let analytic = 0.5 * WEIGHT_DECAY as f64 * (w.dot(w) + 2.0 * t * along + t * t);
            let relative = (metrics.l2_term - analytic).abs() / analytic;
            assert!(
                relative < 1e-6,
                "t = {t}: {} against {analytic}",
                metrics.l2_term
            );
            assert_eq!(metrics.train_loss, metrics.train_nll + metrics.l2_term);
        }
    }
}

#[test]
fn weights_of_another_network_are_refused_naming_the_tensor() {
    let f = fixture();
    let backend = &f.backend;
    let layout = ParameterLayout::of(architecture().build(backend, CLASSES, 0).unwrap().as_ref());
    let wider: Architecture = "preresnet20".parse().unwrap();
    let other = wider.build(backend, CLASSES, 0).unwrap();
    let dict = StateDict::from_module(backend, other.as_ref()).unwrap();
    let error = layout.vector_of(&dict).unwrap_err().to_string();
    assert!(error.contains("another network"), "{error}");

    let mut dict = StateDict::from_module(
        backend,
        architecture().build(backend, CLASSES, 0).unwrap().as_ref(),
    )
    .unwrap();
    let name = dict.iter().next().map(|(n, _)| n.to_string()).unwrap();
    dict.remove(&name);
    let error = layout.vector_of(&dict).unwrap_err().to_string();
    assert!(error.contains(&name), "{error}");
}
