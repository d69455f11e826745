//! The paper's three constructions (Izmailov et al. 2018, Sections 3.2–3.4) as surveys: random rays from
//! solutions, the line through SGD and SWA, and planes through three points.

use serde::{Deserialize, Serialize};
use swa_core::seed::splitmix64_mix;

use crate::geometry::plane::{covering_grid, Plane, Projection};
use crate::geometry::survey::{Survey, SurveyPoint};
use crate::geometry::vector::WeightVector;
use crate::geometry::GeometryError;

/// `count` evenly spaced values from `start` to `end`, both included.
pub fn linspace(start: f64, end: f64, count: usize) -> Vec<f64> {
    match count {
        0 => Vec::new(),
        1 => vec![start],
        _ => (0..count)
            .map(|i| start + (end - start) * i as f64 / (count - 1) as f64)
            .collect(),
    }
}

/// The seed of ray `index`'s direction in a survey seeded with `seed`.
pub fn ray_seed(seed: u64, index: usize) -> u64 {
    splitmix64_mix(seed ^ splitmix64_mix(index as u64 + 1))
}

/// Rays `w + t·d` from each named solution, for every distance `t` in `distances` and `rays` directions
/// drawn uniformly from the unit sphere ([`WeightVector::random_direction`] with [`ray_seed`]). Every
/// solution is probed along the same directions, so that the comparison between solutions is paired:
/// the difference between two curves is the solutions', not the directions'.
///
/// Anchors: the solutions, then the directions. Series: `<solution>/ray-<k>`; coordinates: `[t]`.
pub fn rays(
    solutions: &[(&str, &WeightVector)],
    rays: usize,
    distances: &[f64],
    seed: u64,
) -> Result<Survey, GeometryError> {
    let len = solutions
        .first()
        .map(|(_, w)| w.len())
        .ok_or_else(|| GeometryError::InvalidSetting("rays need at least one solution".into()))?;
    if rays == 0 || distances.is_empty() {
        return Err(GeometryError::InvalidSetting(format!(
            "rays need at least one direction and one distance, got {rays} and {}",
            distances.len()
        )));
    }
    if let Some(bad) = distances.iter().find(|d| !d.is_finite()) {
        return Err(GeometryError::InvalidSetting(format!(
            "ray distances must be finite, got {bad}"
        )));
    }
    let mut anchors: Vec<WeightVector> = solutions.iter().map(|(_, w)| (*w).clone()).collect();
    for k in 0..rays {
        let direction = WeightVector::random_direction(len, ray_seed(seed, k)).ok_or(
            GeometryError::Degenerate("a network without parameters has no direction"),
        )?;
        anchors.push(direction);
    }
    let mut points = Vec::new();
    for (s, (name, _)) in solutions.iter().enumerate() {
        for k in 0..rays {
            for &t in distances {
                points.push(SurveyPoint {
                    series: format!("{name}/ray-{k}"),
                    coordinates: vec![t],
                    terms: vec![(s, 1.0), (solutions.len() + k, t)],
                });
            }
        }
    }
    Ok(Survey {
        name: "rays".into(),
        anchors,
        points,
    })
}

/// The line `w(t) = t·w_SGD + (1 − t)·w_SWA` at every `t` in `ts` (t = 0 is SWA, t = 1 is SGD; values
/// outside [0, 1] extend it beyond both). Anchors: SGD, SWA. Coordinates: `[t, t·‖w_SGD − w_SWA‖]`, the
/// second the signed distance from SWA.
pub fn line(sgd: &WeightVector, swa: &WeightVector, ts: &[f64]) -> Result<Survey, GeometryError> {
    let span = sgd.distance(swa);
    if span == 0.0 {
        return Err(GeometryError::Degenerate(
            "the SGD and SWA solutions are the same point",
        ));
    }
    let points = ts
        .iter()
        .map(|&t| SurveyPoint {
            series: "line".into(),
            coordinates: vec![t, t * span],
            terms: vec![(0, t), (1, 1.0 - t)],
        })
        .collect();
    Ok(Survey {
        name: "line".into(),
        anchors: vec![sgd.clone(), swa.clone()],
        points,
    })
}

/// A point marked on a plane figure: one of the three points that define it, or another one projected.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlaneMark {
    /// What the point is (`SGD`, `SWA`, `epoch 14`, …).
    pub label: String,
    /// Its projection.
    pub at: Projection,
}

/// A plane survey with its basis and marked points.
#[derive(Clone, Debug)]
pub struct PlaneSurvey {
    /// The points of the grid.
    pub survey: Survey,
    /// The basis.
    pub plane: Plane,
    /// The defining points and the projected ones, in plane coordinates.
    pub marks: Vec<PlaneMark>,
    /// Grid columns (x values) and rows (y values).
    pub grid: (usize, usize),
}

/// A `columns × rows` grid on the plane through the three `defining` points, covering them and the
/// projections of `projected` with `margin` times the extent added on each side. Anchors: the origin,
/// `u`, `v`. Series `plane`; coordinates `[x, y]`.
pub fn plane(
    name: &str,
    defining: [(&str, &WeightVector); 3],
    projected: &[(&str, &WeightVector)],
    (columns, rows): (usize, usize),
    margin: f64,
) -> Result<PlaneSurvey, GeometryError> {
    let plane = Plane::through(defining[0].1, defining[1].1, defining[2].1)?;
    let marks: Vec<PlaneMark> = defining
        .iter()
        .chain(projected)
        .map(|(label, w)| PlaneMark {
            label: label.to_string(),
            at: plane.project(w),
        })
        .collect();
    let extent: Vec<(f64, f64)> = marks.iter().map(|m| (m.at.x, m.at.y)).collect();
    let grid = covering_grid(&extent, columns, rows, margin)?;
    let points = grid
        .into_iter()
        .map(|(x, y)| SurveyPoint {
            series: "plane".into(),
            coordinates: vec![x, y],
            terms: vec![(0, 1.0), (1, x), (2, y)],
        })
        .collect();
    let survey = Survey {
        name: name.to_string(),
        anchors: vec![plane.origin.clone(), plane.u.clone(), plane.v.clone()],
        points,
    };
    Ok(PlaneSurvey {
        survey,
        plane,
        marks,
        grid: (columns, rows),
    })
}
