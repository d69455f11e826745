//! The geometry figures as SVG: curves along rays and the line, filled contours on planes.

use std::path::Path;

use anyhow::Result;
use plotters::prelude::*;
use plotters::style::colors::colormaps::ViridisRGB;
use swa_models::geometry::{Metric, PlaneSurvey, PointMetrics, Survey};

use crate::charts::{curves_panel, drawing_error, Axes};

/// The paper's colours: SGD green, SWA blue.
const SGD_COLOUR: RGBColor = RGBColor(34, 139, 34);
const SWA_COLOUR: RGBColor = RGBColor(30, 90, 200);

fn colour_of(solution: &str) -> RGBColor {
    if solution == "SGD" {
        SGD_COLOUR
    } else {
        SWA_COLOUR
    }
}

/// Each ray of `solution` as (distances, values of `metric`), in the survey's order.
pub fn ray_curves(
    survey: &Survey,
    metrics: &[PointMetrics],
    solution: &str,
    metric: Metric,
) -> Vec<(Vec<f64>, Vec<f64>)> {
    let prefix = format!("{solution}/ray-");
    let mut curves: Vec<(String, Vec<f64>, Vec<f64>)> = Vec::new();
    for (point, m) in survey.points.iter().zip(metrics) {
        if !point.series.starts_with(&prefix) {
            continue;
        }
        let t = point.coordinates.first().copied().unwrap_or(0.0);
        match curves.last_mut() {
            Some((series, d, v)) if *series == point.series => {
                d.push(t);
                v.push(m.get(metric));
            }
            _ => curves.push((point.series.clone(), vec![t], vec![m.get(metric)])),
        }
    }
    curves.into_iter().map(|(_, d, v)| (d, v)).collect()
}

/// Train loss and test error against the distance along every ray, SGD's and SWA's in one plot each.
pub fn rays(path: &Path, model: &str, survey: &Survey, metrics: &[PointMetrics]) -> Result<()> {
    let draw = drawing_error(path);
    let root = SVGBackend::new(path, (1400, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| draw(&e))?;
    let panels = root.split_evenly((1, 2));
    for (area, metric) in panels.iter().zip([Metric::TrainLoss, Metric::TestError]) {
        let mut curves = Vec::new();
        for solution in ["SGD", "SWA"] {
            for (d, v) in ray_curves(survey, metrics, solution, metric) {
                let points = d.into_iter().zip(v).collect();
                curves.push((solution.to_string(), colour_of(solution), points));
            }
        }
        let axes = Axes {
            title: &format!("{model}: random rays, {}", metric.label()),
            x_label: "distance from the solution along the ray",
            y_label: metric.label(),
        };
        curves_panel(area, path, &axes, &curves, &[], false)?;
    }
    root.present().map_err(|e| draw(&e))?;
    Ok(())
}

/// Train loss and test error along the line through SWA (distance 0) and SGD (distance `span`).
pub fn line(
    path: &Path,
    model: &str,
    span: f64,
    survey: &Survey,
    metrics: &[PointMetrics],
) -> Result<()> {
    let draw = drawing_error(path);
    let root = SVGBackend::new(path, (1400, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| draw(&e))?;
    let panels = root.split_evenly((1, 2));
    let marks = [
        ("SWA".to_string(), SWA_COLOUR, 0.0),
        ("SGD".to_string(), SGD_COLOUR, span),
    ];
    for (area, metric) in panels.iter().zip([Metric::TrainLoss, Metric::TestError]) {
        let points = survey
            .points
            .iter()
            .zip(metrics)
            .map(|(p, m)| (p.coordinates.get(1).copied().unwrap_or(0.0), m.get(metric)))
            .collect();
        let axes = Axes {
            title: &format!("{model}: SWA to SGD, {}", metric.label()),
            x_label: "signed distance from SWA towards SGD",
            y_label: metric.label(),
        };
        let curve = (metric.label().to_string(), RGBColor(60, 60, 60), points);
        curves_panel(area, path, &axes, &[curve], &marks, true)?;
    }
    root.present().map_err(|e| draw(&e))?;
    Ok(())
}

/// Levels of a filled contour: `LEVELS` bands, equally spaced in the logarithm of the value's rise above
/// its minimum, so that the low basin the figures are about gets most of the bands (as the paper's
/// figures, which space their levels logarithmically).
const LEVELS: usize = 14;

struct Levels {
    min: f64,
    offset: f64,
    log_low: f64,
    log_high: f64,
}

impl Levels {
    fn new(values: &[f64]) -> Self {
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let offset = ((max - min) * 0.01).max(1e-9);
        Self {
            min,
            offset,
            log_low: offset.ln(),
            log_high: (max - min + offset).ln(),
        }
    }

    /// The band of `value`, 0 (lowest) to `LEVELS − 1`.
    fn band(&self, value: f64) -> usize {
        let x = (value - self.min + self.offset).max(self.offset).ln();
        let f = (x - self.log_low) / (self.log_high - self.log_low).max(1e-12);
        ((f * LEVELS as f64) as usize).min(LEVELS - 1)
    }

    /// The lower edge of band `k`, in the value's units.
    fn edge(&self, k: usize) -> f64 {
        let x = self.log_low + (self.log_high - self.log_low) * k as f64 / LEVELS as f64;
        x.exp() - self.offset + self.min
    }

    fn colour(k: usize) -> RGBColor {
        ViridisRGB::get_color_normalized(k as f64, 0.0, (LEVELS - 1) as f64)
    }
}

/// A filled contour plot of `metric` over a plane grid, with the defining and projected points marked.
pub fn plane(
    path: &Path,
    title: &str,
    built: &PlaneSurvey,
    metrics: &[PointMetrics],
    metric: Metric,
) -> Result<()> {
    let draw = drawing_error(path);
    let (columns, rows) = built.grid;
    let values: Vec<f64> = metrics.iter().map(|m| m.get(metric)).collect();
    let coords: Vec<(f64, f64)> = built
        .survey
        .points
        .iter()
        .map(|p| (p.coordinates[0], p.coordinates[1]))
        .collect();
    let (x0, y0) = coords[0];
    let (x1, y1) = coords[columns * rows - 1];
    let levels = Levels::new(&values);

    let root = SVGBackend::new(path, (900, 760)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| draw(&e))?;
    let (main, legend) = root.split_horizontally(760);
    let mut chart = ChartBuilder::on(&main)
        .caption(format!("{title}: {}", metric.label()), ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| draw(&e))?;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc("distance along u")
        .y_desc("distance along v")
        .draw()
        .map_err(|e| draw(&e))?;

    // The grid's values interpolated bilinearly onto a finer raster, each raster row drawn as runs of one
    // band, so that the bands' edges follow the surface rather than the grid's cells.
    const RASTER: usize = 150;
    let value_at = |fx: f64, fy: f64| {
        let gx = fx * (columns - 1) as f64;
        let gy = fy * (rows - 1) as f64;
        let (cx, cy) = ((gx as usize).min(columns - 2), (gy as usize).min(rows - 2));
        let (tx, ty) = (gx - cx as f64, gy - cy as f64);
        let v = |c: usize, r: usize| values[r * columns + c];
        (1.0 - ty) * ((1.0 - tx) * v(cx, cy) + tx * v(cx + 1, cy))
            + ty * ((1.0 - tx) * v(cx, cy + 1) + tx * v(cx + 1, cy + 1))
    };
    let mut rectangles = Vec::new();
    for r in 0..RASTER {
        let (fy0, fy1) = (r as f64 / RASTER as f64, (r + 1) as f64 / RASTER as f64);
        let fy = (fy0 + fy1) / 2.0;
        let mut start = 0;
        let mut band = levels.band(value_at(0.5 / RASTER as f64, fy));
        for c in 1..=RASTER {
            let next =
                (c < RASTER).then(|| levels.band(value_at((c as f64 + 0.5) / RASTER as f64, fy)));
            if next != Some(band) {
                // Each run overlaps its neighbours by half a raster cell, so that no hairline of the
                // background shows between rows where the SVG renderer anti-aliases their edges.
                let half = 0.5 / RASTER as f64;
                let xa = x0 + (x1 - x0) * start as f64 / RASTER as f64;
                let xb = x0 + (x1 - x0) * (c as f64 / RASTER as f64 + half).min(1.0);
                let ya = y0 + (y1 - y0) * fy0;
                let yb = y0 + (y1 - y0) * (fy1 + half).min(1.0);
                rectangles.push(Rectangle::new(
                    [(xa, ya), (xb, yb)],
                    Levels::colour(band).filled(),
                ));
                start = c;
                if let Some(b) = next {
                    band = b;
                }
            }
        }
    }
    chart.draw_series(rectangles).map_err(|e| draw(&e))?;
    for mark in &built.marks {
        let at = (mark.at.x, mark.at.y);
        chart
            .draw_series([
                Cross::new(at, 7, WHITE.stroke_width(3)),
                Cross::new(at, 7, BLACK.stroke_width(1)),
            ])
            .map_err(|e| draw(&e))?;
        let label =
            if mark.at.off_plane > 0.0 && !built.marks[..3].iter().any(|m| m.label == mark.label) {
                format!(
                    "{} (projected, {:.2} off the plane)",
                    mark.label, mark.at.off_plane
                )
            } else {
                mark.label.clone()
            };
        chart
            .draw_series(std::iter::once(Text::new(
                label,
                (mark.at.x, mark.at.y),
                ("sans-serif", 15).into_font().color(&WHITE),
            )))
            .map_err(|e| draw(&e))?;
    }

    // The colour bar: each band with its lower edge.
    let mut bar = ChartBuilder::on(&legend)
        .margin_top(60)
        .margin_bottom(50)
        .margin_right(60)
        .build_cartesian_2d(0.0..1.0, 0.0..LEVELS as f64)
        .map_err(|e| draw(&e))?;
    bar.draw_series((0..LEVELS).map(|k| {
        Rectangle::new(
            [(0.0, k as f64), (1.0, (k + 1) as f64)],
            Levels::colour(k).filled(),
        )
    }))
    .map_err(|e| draw(&e))?;
    bar.draw_series((0..=LEVELS).map(|k| {
        let value = if k == LEVELS {
            values.iter().copied().fold(f64::NEG_INFINITY, f64::max)
        } else {
            levels.edge(k)
        };
        Text::new(
            format!("{value:.3}"),
            (1.05, k as f64),
            ("sans-serif", 12).into_font(),
        )
    }))
    .map_err(|e| draw(&e))?;
    root.present().map_err(|e| draw(&e))?;
    Ok(())
}
