//! SVG plots of the measured figures (plotters, SVG backend only). Every plot carries the
//! measurement's date, machine and commit in its footer.

use std::path::Path;

use plotters::prelude::*;

/// Plot size in px: readable embedded in a README at GitHub's content width.
const SIZE: (u32, u32) = (900, 520);
/// One colour per series, in order; distinguishable in print and for most colour vision.
const PALETTE: [RGBColor; 6] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x8c, 0x56, 0x4b),
];
/// Room under the chart for the footer line.
const FOOTER: u32 = 30;
const OK: RGBColor = RGBColor(0x2c, 0xa0, 0x2c);
const FAILED: RGBColor = RGBColor(0xd6, 0x27, 0x28);

fn err(e: impl std::fmt::Debug) -> String {
    format!("plot: {e:?}")
}

/// The footer line under every plot.
fn footer(root: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>, text: &str) -> Result<(), String> {
    let y = root.dim_in_pixel().1 as i32 - 14;
    root.draw(&Text::new(text.to_owned(), (10, y), ("sans-serif", 12).into_font().color(&BLACK.mix(0.7)))).map_err(err)
}

/// Cumulative distribution of each series' latencies (µs), log-scaled x.
pub fn latency_cdf(path: &Path, title: &str, foot: &str, series: &[(&str, Vec<u32>)]) -> Result<(), String> {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let all = series.iter().flat_map(|(_, v)| v.iter().copied());
    let (lo, hi) = all.fold((u32::MAX, 0), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (lo, hi) = (f64::from(lo.max(1)) * 0.8, f64::from(hi.max(2)) * 1.2);
    let area = root.margin(0, FOOTER, 0, 0);
    let mut chart = ChartBuilder::on(&area)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d((lo..hi).log_scale(), 0f64..1f64)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("request latency, µs (log scale)")
        .y_desc("fraction of requests")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(err)?;
    for (i, (name, values)) in series.iter().enumerate() {
        let mut v = values.clone();
        v.sort_unstable();
        let n = v.len().max(1) as f64;
        // At most ~1000 points per curve: the SVG stays small, the curve looks the same.
        let step = (v.len() / 1000).max(1);
        let points: Vec<(f64, f64)> =
            v.iter().enumerate().step_by(step).map(|(k, &x)| (f64::from(x.max(1)), (k + 1) as f64 / n)).collect();
        let color = PALETTE[i % PALETTE.len()];
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(err)?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    footer(&root, foot)?;
    root.present().map_err(err)
}

/// One bar per (name, value), value printed above it.
pub fn bars(path: &Path, title: &str, y_desc: &str, foot: &str, bars: &[(&str, f64)]) -> Result<(), String> {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let top = bars.iter().map(|(_, v)| *v).fold(1.0, f64::max) * 1.15;
    let area = root.margin(0, FOOTER, 0, 0);
    let n = bars.len() as f64;
    let mut chart = ChartBuilder::on(&area)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5f64..n - 0.5, 0f64..top)
        .map_err(err)?;
    let names: Vec<String> = bars.iter().map(|(name, _)| name.to_string()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(bars.len())
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 {
                names.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc(y_desc)
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(err)?;
    for (i, (_, v)) in bars.iter().enumerate() {
        let x = i as f64;
        let color = PALETTE[i % PALETTE.len()];
        chart.draw_series([Rectangle::new([(x - 0.3, 0.0), (x + 0.3, *v)], color.filled())]).map_err(err)?;
        chart
            .draw_series([Text::new(format!("{v:.0}"), (x - 0.12, *v + top * 0.02), ("sans-serif", 14))])
            .map_err(err)?;
    }
    footer(&root, foot)?;
    root.present().map_err(err)
}

/// One row per (label, timeline): every request as a tick at its start (ms from the
/// event), green if it succeeded, red if it failed; consecutive equal outcomes are drawn
/// as one span.
pub fn timelines(path: &Path, title: &str, foot: &str, rows: &[(String, Vec<(i64, bool)>)]) -> Result<(), String> {
    let height = 120 + 48 * rows.len() as u32;
    let root = SVGBackend::new(path, (SIZE.0, height)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (lo, hi) = rows
        .iter()
        .flat_map(|(_, t)| t.iter().map(|(ms, _)| *ms))
        .fold((0i64, 1i64), |(lo, hi), ms| (lo.min(ms), hi.max(ms)));
    let area = root.margin(0, FOOTER, 0, 0);
    let mut chart = ChartBuilder::on(&area)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(170)
        .build_cartesian_2d(lo as f64..hi as f64 + 50.0, -0.5f64..rows.len() as f64 - 0.5)
        .map_err(err)?;
    let labels: Vec<String> = rows.iter().map(|(l, _)| l.clone()).collect();
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(rows.len())
        .y_label_formatter(&|y| {
            let i = y.round();
            if (y - i).abs() < 1e-6 && i >= 0.0 {
                labels.get(labels.len().saturating_sub(1 + i as usize)).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .x_desc("ms from the event (requests by start time; green answered, red failed)")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(err)?;
    for (r, (_, timeline)) in rows.iter().enumerate() {
        // Top row first.
        let y = (rows.len() - 1 - r) as f64;
        let spans = spans(timeline);
        chart
            .draw_series(spans.into_iter().map(|(a, b, ok)| {
                let color = if ok { OK } else { FAILED };
                Rectangle::new([(a as f64, y - 0.3), (b as f64 + 5.0, y + 0.3)], color.filled())
            }))
            .map_err(err)?;
    }
    chart.draw_series([PathElement::new(vec![(0.0, -0.5), (0.0, rows.len() as f64 - 0.5)], BLACK)]).map_err(err)?;
    footer(&root, foot)?;
    root.present().map_err(err)
}

/// Runs of equal outcome: (first start, last start, ok).
fn spans(timeline: &[(i64, bool)]) -> Vec<(i64, i64, bool)> {
    let mut out: Vec<(i64, i64, bool)> = Vec::new();
    for &(ms, ok) in timeline {
        match out.last_mut() {
            Some(last) if last.2 == ok => last.1 = ms,
            _ => out.push((ms, ms, ok)),
        }
    }
    out
}
