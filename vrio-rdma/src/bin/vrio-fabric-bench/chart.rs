//! Grouped bar charts as SVG, for the benchmarks (`vrio-fabric-bench`, and
//! `vrio-bench`, which includes this file): one group of bars per load
//! point on x, one bar per series (model or fabric) in each group, with a
//! legend below. A bar may carry a paler value behind it (p99 behind p50, a
//! total behind one role's share). Plotters' SVG backend writes text as
//! `<text>` elements, so no font files or system libraries are needed.

use std::path::{Path, PathBuf};

use std::ops::Range;

use plotters::coord::ranged1d::{KeyPointHint, NoDefaultFormatting, ValueFormatter};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

/// One chart: `groups` on x, one bar per series in each group.
#[derive(Debug, Clone)]
pub struct Chart {
    pub title: String,
    pub y_label: String,
    /// A log10 y axis (values that are not positive are left out).
    pub log_y: bool,
    /// The x groups (load points), in order.
    pub groups: Vec<String>,
    pub series: Vec<Series>,
    /// A line under the legend saying what the shades mean ("" for none).
    pub note: String,
}

/// One model's (or fabric's) bars, one per group (None: not measured).
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub bars: Vec<Option<Bar>>,
}

/// A bar: `solid` in the series' colour, and `pale` (if any) behind it, in
/// a paler shade of the same colour, from the axis to its own value.
#[derive(Debug, Clone, Copy)]
pub struct Bar {
    pub solid: f64,
    pub pale: Option<f64>,
}

/// Where the chart `what` of a run whose JSON goes to `json` is written:
/// `out.json` -> `out-{what}.svg`, in the same directory.
pub fn path_beside(json: &Path, what: &str) -> PathBuf {
    let stem = json
        .file_stem()
        .map_or_else(|| "bench".into(), |s| s.to_string_lossy().into_owned());
    json.with_file_name(format!("{stem}-{what}.svg"))
}

const COLOURS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

const WIDTH: u32 = 960;
const PLOT_HEIGHT: u32 = 420;
const LEGEND_ROW: u32 = 20;
const LEGEND_COLUMNS: usize = 3;

/// A number as an axis label: 1.5k, 2M, 0.25.
fn short(v: f64) -> String {
    let (v, unit) = match v.abs() {
        a if a >= 1e6 => (v / 1e6, "M"),
        a if a >= 1e3 => (v / 1e3, "k"),
        _ => (v, ""),
    };
    let s = match v.abs() {
        a if a >= 100.0 => format!("{v:.0}"),
        a if a >= 10.0 => format!("{v:.1}"),
        a if a >= 1.0 => format!("{v:.2}"),
        _ => format!("{v:.3}"),
    };
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    };
    format!("{s}{unit}")
}

/// Ticks from 0 past `max` in steps of 1, 2 or 5 times a power of ten.
fn linear_ticks(max: f64) -> Vec<f64> {
    let raw = (max / 5.0).max(f64::MIN_POSITIVE);
    let p = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * p)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * p);
    let n = (max / step).ceil().max(1.0) as usize;
    (0..=n).map(|i| i as f64 * step).collect()
}

/// An f64 axis with its ticks where we put them (group centres, decades).
/// Plotters' own `WithKeyPoints` over f64 cannot take a label formatter.
struct Keyed {
    inner: RangedCoordf64,
    keys: Vec<f64>,
}

impl Keyed {
    fn new(range: Range<f64>, keys: Vec<f64>) -> Self {
        Self {
            inner: range.into(),
            keys,
        }
    }
}

impl Ranged for Keyed {
    type ValueType = f64;
    type FormatOption = NoDefaultFormatting;

    fn range(&self) -> Range<f64> {
        self.inner.range()
    }

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        self.inner.map(value, limit)
    }

    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            self.keys.clone()
        }
    }
}

impl ValueFormatter<f64> for Keyed {
    fn format_ext(&self, value: &f64) -> String {
        short(*value)
    }
}

/// Writes `c` to `path` as SVG. The error names the file.
pub fn render(path: &Path, c: &Chart) -> Result<(), String> {
    draw(path, c).map_err(|e| format!("chart {}: {e}", path.display()))
}

fn draw(path: &Path, c: &Chart) -> Result<(), Box<dyn std::error::Error>> {
    // Bar values on the y axis's scale (log10 for a log axis).
    let scale = |v: f64| -> Option<f64> {
        match (c.log_y, v) {
            (true, v) if v > 0.0 => Some(v.log10()),
            (true, _) => None,
            (false, v) => Some(v.max(0.0)),
        }
    };
    let values: Vec<f64> = c
        .series
        .iter()
        .flat_map(|s| s.bars.iter().flatten())
        .flat_map(|b| [Some(b.solid), b.pale].into_iter().flatten())
        .filter_map(scale)
        .filter(|v| v.is_finite())
        .collect();
    let (y_ticks, y_lo) = if c.log_y {
        let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let (lo, hi) = if lo.is_finite() {
            (lo.floor(), hi.ceil().max(lo.floor() + 1.0))
        } else {
            (0.0, 1.0)
        };
        let ticks: Vec<f64> = (lo as i32..=hi as i32).map(f64::from).collect();
        (ticks, lo)
    } else {
        let max = values.iter().copied().fold(0.0, f64::max);
        (linear_ticks(if max > 0.0 { max } else { 1.0 }), 0.0)
    };
    let y_hi = *y_ticks.last().unwrap_or(&1.0);

    let legend_rows = c.series.len().div_ceil(LEGEND_COLUMNS) as u32;
    let note_rows = u32::from(!c.note.is_empty());
    let legend_h = 10 + (legend_rows + note_rows) * LEGEND_ROW;
    let root = SVGBackend::new(path, (WIDTH, PLOT_HEIGHT + legend_h)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(PLOT_HEIGHT);

    let groups = c.groups.len().max(1);
    let x_keys: Vec<f64> = (0..groups).map(|i| i as f64 + 0.5).collect();
    let mut chart = ChartBuilder::on(&top)
        .caption(&c.title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(
            Keyed::new(0f64..groups as f64, x_keys),
            Keyed::new(y_lo..y_hi, y_ticks),
        )?;
    let log = c.log_y;
    let y_fmt = move |y: &f64| short(if log { 10f64.powf(*y) } else { *y });
    let x_fmt = |x: &f64| {
        c.groups
            .get(x.floor() as usize)
            .cloned()
            .unwrap_or_default()
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_label_formatter(&x_fmt)
        .y_label_formatter(&y_fmt)
        .y_desc(c.y_label.as_str())
        .label_style(("sans-serif", 12))
        .axis_desc_style(("sans-serif", 13))
        .draw()?;

    // Each group is 1 wide: 10% gap on either side, the rest split evenly.
    let n = c.series.len().max(1) as f64;
    let width = 0.8 / n;
    for (k, s) in c.series.iter().enumerate() {
        let colour = COLOURS[k % COLOURS.len()];
        let mut rects = Vec::new();
        for (g, bar) in s.bars.iter().enumerate().take(groups) {
            let Some(bar) = bar else { continue };
            let x0 = g as f64 + 0.1 + k as f64 * width;
            let x1 = x0 + width * 0.9;
            if let Some(p) = bar.pale.and_then(scale) {
                rects.push(Rectangle::new(
                    [(x0, y_lo), (x1, p)],
                    colour.mix(0.35).filled(),
                ));
            }
            if let Some(v) = scale(bar.solid) {
                rects.push(Rectangle::new([(x0, y_lo), (x1, v)], colour.filled()));
            }
        }
        chart.draw_series(rects)?;
    }

    // The legend: a swatch and the name, LEGEND_COLUMNS to a row.
    let col_w = (WIDTH as i32 - 80) / LEGEND_COLUMNS as i32;
    let font = ("sans-serif", 13).into_font();
    for (k, s) in c.series.iter().enumerate() {
        let colour = COLOURS[k % COLOURS.len()];
        let x = 80 + (k % LEGEND_COLUMNS) as i32 * col_w;
        let y = 6 + (k / LEGEND_COLUMNS) as i32 * LEGEND_ROW as i32;
        bottom.draw(&Rectangle::new([(x, y), (x + 12, y + 12)], colour.filled()))?;
        bottom.draw(&Text::new(s.name.clone(), (x + 18, y), font.clone()))?;
    }
    if !c.note.is_empty() {
        let y = 6 + legend_rows as i32 * LEGEND_ROW as i32;
        bottom.draw(&Text::new(c.note.clone(), (80, y), font.clone()))?;
    }
    root.present()?;
    Ok(())
}
