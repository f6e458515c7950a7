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
    let series = |f: fn(&CurvePoint) -> f64| -> Vec<(f64, f64)> {
        points.iter().map(|s| (s.hours, f(s))).collect()
    };
    let credits = Panel {
        caption: Some(title),
        x: x0..x1,
        y: 0.0..max_credits,
        x_desc,
        y_desc: "credits (vCPU-minutes)",
    };
    credits
        .draw(
            &top,
            &[
                (series(|s| s.balance), BLUE.stroke_width(2), "balance"),
                (series(|s| s.surplus), RED.stroke_width(2), "surplus"),
            ],
        )
        .map_err(|e| fail(&e))?;
    let cpu = Panel {
        caption: None,
        x: x0..x1,
        y: 0.0..105.0,
        x_desc,
        y_desc: "CPU (% of all vCPUs)",
    };
    let green = RGBColor(0, 140, 0);
    let grey = RGBColor(140, 140, 140);
    cpu.draw(
        &bottom,
        &[
            (series(|s| s.baseline_pct), grey.stroke_width(1), "baseline"),
            (series(|s| s.usage_pct), BLACK.stroke_width(1), usage_label),
            (series(|s| s.grant_pct), green.stroke_width(2), "granted"),
        ],
    )
    .map_err(|e| fail(&e))?;
    root.present().map_err(|e| fail(&e))?;
    Ok(())
}

/// One labelled line: its points (hours, value), its style and its legend.
type Series<'a> = (Vec<(f64, f64)>, ShapeStyle, &'a str);

/// One panel of the picture: its axes, and the lines drawn on them with a legend.
struct Panel<'a> {
    caption: Option<&'a str>,
    x: std::ops::Range<f64>,
    y: std::ops::Range<f64>,
    x_desc: &'a str,
    y_desc: &'a str,
}

impl Panel<'_> {
    fn draw(
        &self,
        area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
        lines: &[Series<'_>],
    ) -> Result<(), DrawingAreaErrorKind<std::io::Error>> {
        let mut builder = ChartBuilder::on(area);
        if let Some(caption) = self.caption {
            builder.caption(caption, ("sans-serif", 20));
        }
        let mut chart = builder
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(60)
            .build_cartesian_2d(self.x.clone(), self.y.clone())?;
        chart
            .configure_mesh()
            .x_desc(self.x_desc)
            .y_desc(self.y_desc)
            .draw()?;
        for (data, style, label) in lines {
            line(&mut chart, data.iter().copied(), *style, label)?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
    }
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
