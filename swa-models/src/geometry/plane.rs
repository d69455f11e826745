//! The plane through three points of weight space, with the paper's orthonormal basis.

use serde::{Deserialize, Serialize};

use crate::geometry::vector::WeightVector;
use crate::geometry::GeometryError;

/// The plane through `w1`, `w2`, `w3` (Izmailov et al. 2018, Section 3; Garipov et al. 2018): origin `w1`,
/// `u = (w2 − w1)/‖w2 − w1‖`, and `v` the part of `w3 − w1` orthogonal to `u`, normalised. Coordinates are
/// distances in weight space: `w1` sits at (0, 0), `w2` at (‖w2 − w1‖, 0), `w3` above the x axis.
#[derive(Clone, Debug, PartialEq)]
pub struct Plane {
    /// `w1`.
    pub origin: WeightVector,
    /// The first unit basis vector.
    pub u: WeightVector,
    /// The second unit basis vector, orthogonal to `u`.
    pub v: WeightVector,
}

/// Where a point lies with respect to a [`Plane`].
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Projection {
    /// Coordinate along `u`.
    pub x: f64,
    /// Coordinate along `v`.
    pub y: f64,
    /// Distance from the point to the plane (0 for points in it).
    pub off_plane: f64,
}

impl Plane {
    /// The plane through three points; an error when they do not span one (two coincide, or the three lie
    /// on a line, to within the relative tolerance `1e-6` of the distances involved).
    pub fn through(
        w1: &WeightVector,
        w2: &WeightVector,
        w3: &WeightVector,
    ) -> Result<Plane, GeometryError> {
        let d2 = w2.minus(w1);
        let d3 = w3.minus(w1);
        let u = d2.normalized().ok_or(GeometryError::Degenerate(
            "the first two points of the plane coincide",
        ))?;
        let mut v = d3.clone();
        v.add_scaled(-d3.dot(&u), &u);
        // Gram–Schmidt in f32 leaves a component along u of about 1e-7 relative; a second pass removes it.
        let residual = v.dot(&u);
        v.add_scaled(-residual, &u);
        if v.norm() <= 1e-6 * d3.norm().max(d2.norm()) {
            return Err(GeometryError::Degenerate(
                "the three points of the plane lie on one line",
            ));
        }
        let v = v.normalized().ok_or(GeometryError::Degenerate(
            "the three points of the plane lie on one line",
        ))?;
        Ok(Plane {
            origin: w1.clone(),
            u,
            v,
        })
    }

    /// The coordinates of `w`'s orthogonal projection onto the plane, and its distance from the plane.
    pub fn project(&self, w: &WeightVector) -> Projection {
        let d = w.minus(&self.origin);
        let x = d.dot(&self.u);
        let y = d.dot(&self.v);
        let squared = (d.dot(&d) - x * x - y * y).max(0.0);
        Projection {
            x,
            y,
            off_plane: squared.sqrt(),
        }
    }

    /// The point at plane coordinates `(x, y)`: `origin + x·u + y·v`.
    pub fn point(&self, x: f64, y: f64) -> WeightVector {
        let mut out = self.origin.clone();
        out.set_combination(&[(1.0, &self.origin), (x, &self.u), (y, &self.v)]);
        out
    }
}

/// A `columns × rows` grid of plane coordinates covering `points` (their bounding box) with `margin` times
/// the box's width and height added on every side, as the original plane scripts lay out their figures.
/// Columns vary `x`, rows vary `y`; the result is row-major (`y` outer).
pub fn covering_grid(
    points: &[(f64, f64)],
    columns: usize,
    rows: usize,
    margin: f64,
) -> Result<Vec<(f64, f64)>, GeometryError> {
    if columns < 2 || rows < 2 {
        return Err(GeometryError::InvalidSetting(format!(
            "a plane grid needs at least 2×2 points, got {columns}×{rows}"
        )));
    }
    if !(margin.is_finite() && margin >= 0.0) {
        return Err(GeometryError::InvalidSetting(format!(
            "the plane margin must be a non-negative number, got {margin}"
        )));
    }
    let (x0, x1) = bounds(points.iter().map(|p| p.0));
    let (y0, y1) = bounds(points.iter().map(|p| p.1));
    let (wx, wy) = (x1 - x0, y1 - y0);
    let (x0, x1) = (x0 - margin * wx, x1 + margin * wx);
    let (y0, y1) = (y0 - margin * wy, y1 + margin * wy);
    let mut grid = Vec::with_capacity(columns * rows);
    for row in 0..rows {
        let y = y0 + (y1 - y0) * row as f64 / (rows - 1) as f64;
        for column in 0..columns {
            let x = x0 + (x1 - x0) * column as f64 / (columns - 1) as f64;
            grid.push((x, y));
        }
    }
    Ok(grid)
}

fn bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    })
}
