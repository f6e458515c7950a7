//! The credit-curve picture shared by `simulate --plot` and `plot`: balance and surplus
//! (credits) above; usage (or demand), grant and the baseline (percent of all vCPUs) below.

use std::path::{Path, PathBuf};

use plotters::prelude::*;
use thiserror::Error;

/// One point of the curve.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CurvePoint {
    /// Position on the time axis, hours.
    pub hours: f64,
    /// Spendable balance, credits.
    pub balance: f64,
    /// Surplus outstanding, credits.
    pub surplus: f64,
    /// CPU used (or demanded), percent of all vCPUs.
    pub usage_pct: f64,
    /// The grant, percent of all vCPUs.
    pub grant_pct: f64,
    /// The baseline, percent of all vCPUs.
    pub baseline_pct: f64,
}

/// The plot could not be written.
#[derive(Debug, Error)]
#[error("{flag} {path}: {message}", path = .path.display())]
pub struct PlotError {
    /// The option that named the file.
    pub flag: &'static str,
    /// The plot's path.
    pub path: PathBuf,
    /// Why.
    pub message: String,
}

/// Draws `points` as SVG at `path`; `usage_label` names the lower black line ("demand" for a
/// simulation, "usage" for a real VM) and `x_desc` the time axis.
// One drawing: the two panels share the axis ranges and series computed at its top, and
// splitting it would pass a dozen locals around.
pub fn credit_curve(
    path: &Path,
    title: &str,
    points: &[CurvePoint],
    usage_label: &str,
    x_desc: &str,
) -> Result<(), PlotError> {
    let fail = |e: &dyn std::fmt::Display| PlotError {
        flag: "--plot",
        path: path.to_owned(),
        message: e.to_string(),
    };
    // Create the file first so an unwritable path fails with the OS's own reason.
    std::fs::File::create(path).map_err(|e| fail(&e))?;
    let root = SVGBackend::new(path, (1000, 700)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let (top, bottom) = root.split_vertically(370);
    let x0 = points.first().map_or(0.0, |s| s.hours.min(0.0));
    let x1 = points.last().map_or(1.0, |s| s.hours).max(x0 + 1.0 / 60.0);
    let max_credits = points
        .iter()
        .map(|s| s.balance.max(s.surplus))
        .fold(1.0, f64::max)
        * 1.05;

    let mut chart = ChartBuilder::on(&top)
        .caption(title, ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, 0.0..max_credits)
        .map_err(|e| fail(&e))?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc("credits (vCPU-minutes)")
        .draw()
        .map_err(|e| fail(&e))?;
    line(
        &mut chart,
        points.iter().map(|s| (s.hours, s.balance)),
        BLUE.stroke_width(2),
        "balance",
    )
    .map_err(|e| fail(&e))?;
    line(
        &mut chart,
        points.iter().map(|s| (s.hours, s.surplus)),
        RED.stroke_width(2),
        "surplus",
    )
    .map_err(|e| fail(&e))?;
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| fail(&e))?;

    let mut chart = ChartBuilder::on(&bottom)
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, 0.0..105.0)
        .map_err(|e| fail(&e))?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc("CPU (% of all vCPUs)")
        .draw()
        .map_err(|e| fail(&e))?;
    let green = RGBColor(0, 140, 0);
    let grey = RGBColor(140, 140, 140);
    line(
        &mut chart,
        points.iter().map(|s| (s.hours, s.baseline_pct)),
        grey.stroke_width(1),
        "baseline",
    )
    .map_err(|e| fail(&e))?;
    line(
        &mut chart,
        points.iter().map(|s| (s.hours, s.usage_pct)),
        BLACK.stroke_width(1),
        usage_label,
    )
    .map_err(|e| fail(&e))?;
    line(
        &mut chart,
        points.iter().map(|s| (s.hours, s.grant_pct)),
        green.stroke_width(2),
        "granted",
    )
    .map_err(|e| fail(&e))?;
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| fail(&e))?;
    root.present().map_err(|e| fail(&e))?;
    Ok(())
}

/// One labelled line of the chart, with its legend entry in the same style.
fn line<'a>(
    chart: &mut ChartContext<
        'a,
        SVGBackend<'a>,
        Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
    >,
    data: impl Iterator<Item = (f64, f64)>,
    style: ShapeStyle,
    label: &str,
) -> Result<(), DrawingAreaErrorKind<std::io::Error>> {
    chart
        .draw_series(LineSeries::new(data, style))?
        .label(label)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
    Ok(())
}
