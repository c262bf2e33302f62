//! The results: rows of the table, curves of the chart, and how they are
//! written (Markdown, JSON, SVG).

use std::fmt::Write as _;

use serde::Serialize;

use crate::stats::Summary;

/// One line of the results table.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// What was measured.
    pub scenario: String,
    /// Usher's figure, formatted with its unit.
    pub figure: String,
    /// The figure as a number (in `unit`).
    pub value: f64,
    /// The unit of `value`.
    pub unit: String,
    /// The floor measured in the same run, formatted; empty when none.
    pub floor: String,
    /// figure ÷ floor (or the quantity the goal is stated in); `None` when
    /// there is no floor.
    pub ratio: Option<f64>,
    /// The goal from PERFORMANCE.md.
    pub goal: String,
    /// Whether the goal is met; `None` for reference rows.
    pub met: Option<bool>,
}

impl Row {
    /// A row without floor or goal (a floor itself, or a reference figure).
    pub fn info(scenario: &str, value: f64, unit: &str) -> Self {
        Self {
            scenario: scenario.to_owned(),
            figure: format_value(value, unit),
            value,
            unit: unit.to_owned(),
            floor: String::new(),
            ratio: None,
            goal: String::new(),
            met: None,
        }
    }

    /// Adds the floor (formatted) and the ratio.
    pub fn floor(mut self, floor: String, ratio: f64) -> Self {
        self.floor = floor;
        self.ratio = Some(ratio);
        self
    }

    /// Adds the goal and whether it is met.
    pub fn goal(mut self, goal: &str, met: bool) -> Self {
        self.goal = goal.to_owned();
        self.met = Some(met);
        self
    }

    /// Adds a goal that is only stated (not judged here).
    pub fn goal_text(mut self, goal: &str) -> Self {
        self.goal = goal.to_owned();
        self
    }
}

/// `value` with its unit, rounded for reading.
pub fn format_value(value: f64, unit: &str) -> String {
    let number = if value.abs() >= 100.0 {
        format!("{value:.0}")
    } else if value.abs() >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    };
    if unit.is_empty() {
        number
    } else {
        format!("{number} {unit}")
    }
}

/// One point of a throughput/latency curve.
#[derive(Clone, Debug, Serialize)]
pub struct Point {
    /// Workers calling at once.
    pub concurrency: usize,
    /// Successful calls per second.
    pub throughput: f64,
    /// 99th-percentile latency, ms.
    pub p99_ms: f64,
}

/// Throughput and p99 against concurrency for one scenario.
#[derive(Clone, Debug, Serialize)]
pub struct Curve {
    /// The scenario.
    pub name: String,
    /// Whether the chart shows it (floors far above the scenarios would
    /// flatten them, so they stay in the JSON only).
    pub chart: bool,
    /// By increasing concurrency.
    pub points: Vec<Point>,
}

/// A load run kept in the JSON with its full summary.
#[derive(Clone, Debug, Serialize)]
pub struct Run {
    /// Scenario and settings.
    pub name: String,
    /// Workers.
    pub concurrency: usize,
    /// What it measured.
    pub summary: Summary,
}

/// Everything one benchmark run produced.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// CPU, cores and memory.
    pub machine: String,
    /// UTC date and time of the run.
    pub date: String,
    /// `full` or `quick`.
    pub mode: String,
    /// Wall time of the whole run, seconds.
    pub wall_s: f64,
    /// The table.
    pub rows: Vec<Row>,
    /// The chart's data.
    pub curves: Vec<Curve>,
    /// Every load run.
    pub runs: Vec<Run>,
    /// Notes on how figures were obtained and what went wrong.
    pub notes: Vec<String>,
}

impl Report {
    /// The results table and notes in Markdown.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "Machine: {} · date: {} · mode: {} · run took {:.0} s\n",
            self.machine, self.date, self.mode, self.wall_s
        );
        out.push_str("| scenario | Usher | floor (same run) | ratio | goal | met? |\n");
        out.push_str("|---|---|---|---|---|---|\n");
        for row in &self.rows {
            let ratio = row.ratio.map_or(String::new(), |r| format!("{r:.2}"));
            let met = match row.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "",
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} |",
                cell(&row.scenario),
                cell(&row.figure),
                cell(&row.floor),
                ratio,
                cell(&row.goal),
                met
            );
        }
        if !self.notes.is_empty() {
            out.push_str("\nNotes:\n\n");
            for note in &self.notes {
                let _ = writeln!(out, "- {note}");
            }
        }
        out
    }

    /// Throughput (left) and p99 latency (right) against concurrency, one
    /// line per charted curve, as a standalone SVG.
    pub fn svg(&self) -> String {
        let charted: Vec<Curve> = self.curves.iter().filter(|c| c.chart).cloned().collect();
        svg_chart(&charted)
    }
}

/// Escapes `|` so text stays in its table cell.
fn cell(text: &str) -> String {
    text.replace('|', "\\|")
}

const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
];

/// Two log-x panels: throughput (calls/s) and p99 (ms) against concurrency.
pub fn svg_chart(curves: &[Curve]) -> String {
    let (panel_w, panel_h, margin) = (420.0, 300.0, 60.0);
    let width = 2.0 * panel_w + 3.0 * margin;
    let legend_h = 22.0 * curves.len() as f64 + 10.0;
    let height = panel_h + 2.0 * margin + legend_h;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        out,
        r#"<rect width="{width}" height="{height}" fill="white"/>"#
    );
    let conc: Vec<f64> = curves
        .iter()
        .flat_map(|c| c.points.iter().map(|p| p.concurrency.max(1) as f64))
        .collect();
    let x_min = conc.iter().copied().fold(f64::INFINITY, f64::min).max(1.0);
    let x_max = conc.iter().copied().fold(1.0, f64::max).max(x_min * 2.0);
    type Metric = fn(&Point) -> f64;
    let panels: [(&str, Metric); 2] = [
        ("throughput (calls/s)", |p| p.throughput),
        ("p99 latency (ms)", |p| p.p99_ms),
    ];
    for (index, (title, metric)) in panels.into_iter().enumerate() {
        let left = margin + index as f64 * (panel_w + margin);
        let top = margin;
        let y_max = nice_max(
            curves
                .iter()
                .flat_map(|c| c.points.iter().map(metric))
                .fold(0.0, f64::max),
        );
        let x = |c: f64| left + (c.ln() - x_min.ln()) / (x_max.ln() - x_min.ln()) * panel_w;
        let y = |v: f64| top + panel_h - v / y_max * panel_h;
        let _ = writeln!(
            out,
            r##"<rect x="{left}" y="{top}" width="{panel_w}" height="{panel_h}" fill="none" stroke="#888"/>"##
        );
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{}" text-anchor="middle" font-size="14">{title}</text>"#,
            left + panel_w / 2.0,
            top - 12.0
        );
        for step in 0..=4 {
            let v = y_max * f64::from(step) / 4.0;
            let _ = writeln!(
                out,
                r##"<line x1="{left}" x2="{}" y1="{yy:.1}" y2="{yy:.1}" stroke="#eee"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
                left + panel_w,
                left - 4.0,
                y(v) + 4.0,
                axis_label(v),
                yy = y(v),
            );
        }
        let mut c = x_min;
        while c <= x_max * 1.0001 {
            let _ = writeln!(
                out,
                r#"<text x="{:.1}" y="{}" text-anchor="middle">{c}</text>"#,
                x(c),
                top + panel_h + 16.0
            );
            c *= 2.0;
        }
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{}" text-anchor="middle">concurrency (log scale)</text>"#,
            left + panel_w / 2.0,
            top + panel_h + 34.0
        );
        for (i, curve) in curves.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let points: Vec<String> = curve
                .points
                .iter()
                .map(|p| format!("{:.1},{:.1}", x(p.concurrency.max(1) as f64), y(metric(p))))
                .collect();
            let _ = writeln!(
                out,
                r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#,
                points.join(" ")
            );
            for p in &curve.points {
                let _ = writeln!(
                    out,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"/>"#,
                    x(p.concurrency.max(1) as f64),
                    y(metric(p))
                );
            }
        }
    }
    for (i, curve) in curves.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let yy = panel_h + 2.0 * margin + 22.0 * i as f64;
        let _ = writeln!(
            out,
            r#"<rect x="{margin}" y="{}" width="14" height="4" fill="{color}"/><text x="{}" y="{yy}">{}</text>"#,
            yy - 6.0,
            margin + 20.0,
            xml_escape(&curve.name)
        );
    }
    out.push_str("</svg>\n");
    out
}

/// A round axis maximum at or above `v` (1, 2 or 5 × a power of ten).
pub fn nice_max(v: f64) -> f64 {
    if v <= 0.0 || !v.is_finite() {
        return 1.0;
    }
    let power = 10f64.powf(v.log10().floor());
    for step in [1.0, 2.0, 5.0, 10.0] {
        if v <= step * power {
            return step * power;
        }
    }
    10.0 * power
}

fn axis_label(v: f64) -> String {
    if v >= 1_000.0 {
        format!("{:.0}k", v / 1_000.0)
    } else if v >= 10.0 || v == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used, clippy::unwrap_used)]

    use super::*;

    fn report() -> Report {
        Report {
            machine: "test".into(),
            date: "today".into(),
            mode: "quick".into(),
            wall_s: 1.0,
            rows: vec![
                Row::info("argon2 | floor", 110.0, "hashes/s"),
                Row::info("sign-in", 99.0, "calls/s")
                    .floor("110 hashes/s".into(), 0.9)
                    .goal("≥ 0.85", true),
                Row::info("accept", 50.0, "calls/s")
                    .floor("110 hashes/s".into(), 0.45)
                    .goal("≥ 0.85", false),
            ],
            curves: vec![Curve {
                name: "a <b>".into(),
                chart: true,
                points: vec![
                    Point {
                        concurrency: 1,
                        throughput: 100.0,
                        p99_ms: 2.0,
                    },
                    Point {
                        concurrency: 16,
                        throughput: 900.0,
                        p99_ms: 30.0,
                    },
                ],
            }],
            runs: Vec::new(),
            notes: vec!["a note".into()],
        }
    }

    #[test]
    fn markdown_has_a_line_per_row_and_escapes_pipes() {
        let text = report().markdown();
        assert!(
            text.contains("| argon2 \\| floor | 110 hashes/s |  |  |  |  |"),
            "{text}"
        );
        assert!(text.contains("| sign-in | 99.0 calls/s | 110 hashes/s | 0.90 | ≥ 0.85 | yes |"));
        assert!(text.contains("| 0.45 | ≥ 0.85 | **no** |"));
        assert!(text.contains("- a note"));
    }

    #[test]
    fn svg_draws_each_curve_in_both_panels() {
        let svg = report().svg();
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(svg.matches("<circle").count(), 4);
        assert!(svg.contains("a &lt;b&gt;"));
    }

    #[test]
    fn axis_maxima_are_round() {
        assert_eq!(nice_max(0.0), 1.0);
        assert_eq!(nice_max(7.0), 10.0);
        assert_eq!(nice_max(130.0), 200.0);
        assert_eq!(nice_max(4_100.0), 5_000.0);
        assert_eq!(nice_max(1_000.0), 1_000.0);
    }

    #[test]
    fn values_are_rounded_for_reading() {
        assert_eq!(format_value(1234.4, "calls/s"), "1234 calls/s");
        assert_eq!(format_value(12.345, "ms"), "12.3 ms");
        assert_eq!(format_value(0.1234, "ms"), "0.12 ms");
        assert_eq!(format_value(3.0, ""), "3.00");
    }
}
