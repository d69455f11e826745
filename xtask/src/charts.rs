//! Line charts as SVG, shared by the reports of `reproduce` and `geometry`.

use std::path::Path;

use anyhow::Result;
use plotters::coord::Shift;
use plotters::prelude::*;

/// A named curve in one colour.
pub type Curve = (String, RGBColor, Vec<(f64, f64)>);

/// A vertical line at `x`, labelled at the top, in the label's colour.
pub type Mark = (String, RGBColor, f64);

/// The axes of a chart.
pub struct Axes<'a> {
    /// The caption.
    pub title: &'a str,
    /// The x axis' description, with its unit.
    pub x_label: &'a str,
    /// The y axis' description, with its unit.
    pub y_label: &'a str,
}

/// The error of a drawing operation on `path`.
pub fn drawing_error(path: &Path) -> impl Fn(&dyn std::fmt::Display) -> anyhow::Error + '_ {
    move |e| anyhow::anyhow!("drawing {}: {e}", path.display())
}

/// Draws `curves` into `area` (a whole figure or one of its panels) with a legend of each name once, a
/// dot at every point when `dots`, and the vertical `marks`. The axes span the data, the y axis with 5%
/// to spare.
pub fn curves_panel(
    area: &DrawingArea<SVGBackend, Shift>,
    path: &Path,
    axes: &Axes<'_>,
    curves: &[Curve],
    marks: &[Mark],
    dots: bool,
) -> Result<()> {
    let draw = drawing_error(path);
    let all = || curves.iter().flat_map(|c| c.2.iter());
    let (x0, x1) = all().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
        (a.min(p.0), b.max(p.0))
    });
    let (y0, y1) = all().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
        (a.min(p.1), b.max(p.1))
    });
    if !(x0.is_finite() && y0.is_finite()) {
        return Ok(());
    }
    let pad = ((y1 - y0) * 0.05).max(1e-6);
    let mut chart = ChartBuilder::on(area)
        .caption(axes.title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1.max(x0 + 1e-9), (y0 - pad)..(y1 + pad))
        .map_err(|e| draw(&e))?;
    chart
        .configure_mesh()
        .x_desc(axes.x_label)
        .y_desc(axes.y_label)
        .draw()
        .map_err(|e| draw(&e))?;
    let mut labelled = Vec::new();
    for (name, colour, points) in curves {
        let colour = *colour;
        let series = chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                colour.mix(0.8).stroke_width(2),
            ))
            .map_err(|e| draw(&e))?;
        if !labelled.contains(name) {
            labelled.push(name.clone());
            series.label(name.as_str()).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
            });
        }
        if dots {
            chart
                .draw_series(points.iter().map(|&p| Circle::new(p, 3, colour.filled())))
                .map_err(|e| draw(&e))?;
        }
    }
    for (label, colour, x) in marks {
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(*x, y0 - pad), (*x, y1 + pad)],
                colour.mix(0.5).stroke_width(1),
            )))
            .map_err(|e| draw(&e))?;
        chart
            .draw_series(std::iter::once(Text::new(
                label.clone(),
                (*x, y1),
                ("sans-serif", 16).into_font().color(colour),
            )))
            .map_err(|e| draw(&e))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| draw(&e))?;
    Ok(())
}

/// A figure of one chart: `curves` with a dot at every point.
pub fn line_chart(path: &Path, axes: &Axes<'_>, curves: &[Curve]) -> Result<()> {
    let draw = drawing_error(path);
    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| draw(&e))?;
    curves_panel(&root, path, axes, curves, &[], true)?;
    root.present().map_err(|e| draw(&e))?;
    Ok(())
}
