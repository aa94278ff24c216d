//! The report's picture, hand-written SVG: grouped bars of throughput (MiB/s) and of
//! rate (ops/s) per scenario for the disk (fio) and each target, then latency
//! percentiles of the many-op scenarios on a log scale. A bar that was not measured
//! is drawn as `n/a`, never as zero.

use std::fmt::Write as _;

use super::{DiskJob, Metric, Row};

const WIDTH: f64 = 1000.0;
const MARGIN_LEFT: f64 = 80.0;
const MARGIN_RIGHT: f64 = 20.0;
const TITLE_HEIGHT: f64 = 40.0;
const PLOT_HEIGHT: f64 = 240.0;
const LABEL_HEIGHT: f64 = 110.0;
const COLORS: [&str; 6] = [
    "#8c8c8c", "#4c78a8", "#f58518", "#54a24b", "#b279a2", "#e45756",
];

struct Group {
    label: String,
    /// Set on the first group of a section: the name written under the section.
    section: Option<String>,
    /// One value per series.
    values: Vec<Option<f64>>,
}

/// The whole picture for a report.
pub fn render(disk: &[DiskJob], targets: &[String], rows: &[Row]) -> String {
    let mut series = vec!["disk (fio)".to_string()];
    series.extend(targets.iter().cloned());
    let figure_groups = |metric: Metric| -> Vec<Group> {
        rows.iter()
            .filter(|row| row.metric == metric)
            .map(|row| Group {
                label: row.name.clone(),
                section: None,
                values: std::iter::once(row.disk)
                    .chain(targets.iter().map(|t| row.value.get(t).copied()))
                    .collect(),
            })
            .collect()
    };
    let mut panels = Vec::new();
    for (metric, title) in [
        (Metric::Throughput, "Throughput, MiB/s (higher is better)"),
        (Metric::Rate, "Operations per second (higher is better)"),
    ] {
        let groups = figure_groups(metric);
        if !groups.is_empty() {
            panels.push(panel(title, &series, &groups, Axis::Linear));
        }
    }
    let latency = latency_groups(disk, targets, rows);
    if !latency.is_empty() {
        panels.push(panel(
            "Latency, microseconds, log scale (lower is better)",
            &series,
            &latency,
            Axis::Log,
        ));
    }
    let height: f64 = panels.iter().map(|(_, h)| h).sum::<f64>() + 10.0;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height}\" viewBox=\"0 0 {WIDTH} {height}\" font-family=\"sans-serif\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    let mut y = 0.0;
    for (body, h) in panels {
        let _ = writeln!(out, "<g transform=\"translate(0,{y})\">\n{body}</g>");
        y += h;
    }
    out.push_str("</svg>\n");
    out
}

/// p50, p99, p99.9 of every many-op scenario; the disk's where fio measured the same
/// thing (random reads; the fsync job's write latency leaves out the fsync).
fn latency_groups(disk: &[DiskJob], targets: &[String], rows: &[Row]) -> Vec<Group> {
    let mut groups = Vec::new();
    for row in rows.iter().filter(|row| row.metric == Metric::Rate) {
        let disk_latency = row
            .disk_job
            .as_deref()
            .filter(|job| *job == "rand-read")
            .and_then(|job| disk.iter().find(|j| j.job == job))
            .and_then(|job| job.latency_us);
        for (index, percentile) in ["p50", "p99", "p99.9"].iter().enumerate() {
            let mut values = vec![disk_latency.map(|l| l[index])];
            for target in targets {
                values.push(row.results.get(target).map(|r| {
                    let l = &r.figures.latency_us;
                    [l.p50, l.p99, l.p999][index] as f64
                }));
            }
            groups.push(Group {
                label: percentile.to_string(),
                section: (index == 0).then(|| row.name.clone()),
                values,
            });
        }
    }
    groups
}

#[derive(Clone, Copy, PartialEq)]
enum Axis {
    Linear,
    Log,
}

/// One titled bar chart; returns its SVG and height. Groups with sections get short
/// horizontal labels and the section's name beneath; others get slanted labels.
fn panel(title: &str, series: &[String], groups: &[Group], axis: Axis) -> (String, f64) {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "<text x=\"{MARGIN_LEFT}\" y=\"24\" font-size=\"16\" font-weight=\"bold\">{}</text>",
        escape(title)
    );
    for (index, name) in series.iter().enumerate() {
        let x = WIDTH - MARGIN_RIGHT - 130.0 * (series.len() - index) as f64;
        let _ = writeln!(
            out,
            "<rect x=\"{x}\" y=\"12\" width=\"12\" height=\"12\" fill=\"{}\"/><text x=\"{}\" y=\"22\" font-size=\"12\">{}</text>",
            COLORS[index % COLORS.len()],
            x + 16.0,
            escape(name)
        );
    }
    let values: Vec<f64> = groups
        .iter()
        .flat_map(|g| g.values.iter().flatten().copied())
        .filter(|v| v.is_finite() && *v > 0.0)
        .collect();
    let scale = Scale::new(&values, axis == Axis::Log);
    let (top, bottom) = (TITLE_HEIGHT, TITLE_HEIGHT + PLOT_HEIGHT);
    for tick in scale.ticks() {
        let y = bottom - scale.fraction(tick) * PLOT_HEIGHT;
        let _ = writeln!(
            out,
            "<line x1=\"{MARGIN_LEFT}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#e0e0e0\"/><text x=\"{}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"end\">{}</text>",
            WIDTH - MARGIN_RIGHT,
            MARGIN_LEFT - 6.0,
            y + 4.0,
            number(tick)
        );
    }
    let _ = writeln!(out, "<line x1=\"{MARGIN_LEFT}\" x2=\"{MARGIN_LEFT}\" y1=\"{top}\" y2=\"{bottom}\" stroke=\"black\"/>");
    let _ = writeln!(
        out,
        "<line x1=\"{MARGIN_LEFT}\" x2=\"{}\" y1=\"{bottom}\" y2=\"{bottom}\" stroke=\"black\"/>",
        WIDTH - MARGIN_RIGHT
    );
    let group_width = (WIDTH - MARGIN_LEFT - MARGIN_RIGHT) / groups.len().max(1) as f64;
    let bar_width = group_width * 0.8 / series.len().max(1) as f64;
    for (g, group) in groups.iter().enumerate() {
        let group_x = MARGIN_LEFT + g as f64 * group_width + group_width * 0.1;
        for (s, value) in group.values.iter().enumerate() {
            let x = group_x + s as f64 * bar_width;
            let center = x + bar_width / 2.0;
            match value.filter(|v| v.is_finite() && *v > 0.0) {
                Some(v) => {
                    let h = scale.fraction(v).clamp(0.0, 1.0) * PLOT_HEIGHT;
                    let _ = writeln!(
                        out,
                        "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"{}\"><title>{}: {}</title></rect>",
                        bottom - h,
                        (bar_width - 1.0).max(1.0),
                        COLORS[s % COLORS.len()],
                        escape(&series[s]),
                        number(v)
                    );
                    let _ = writeln!(out, "<text x=\"{center:.1}\" y=\"{:.1}\" font-size=\"9\" text-anchor=\"middle\">{}</text>", bottom - h - 3.0, number(v));
                }
                None => {
                    let _ = writeln!(out, "<text x=\"{center:.1}\" y=\"{:.1}\" font-size=\"9\" text-anchor=\"middle\" fill=\"#999\">n/a</text>", bottom - 3.0);
                }
            }
        }
        label(&mut out, group, g, groups, group_x, group_width, bottom);
    }
    (out, TITLE_HEIGHT + PLOT_HEIGHT + LABEL_HEIGHT)
}

/// Writes a group's label, and its section's name if it starts one.
fn label(
    out: &mut String,
    group: &Group,
    index: usize,
    groups: &[Group],
    x: f64,
    width: f64,
    bottom: f64,
) {
    let y = bottom + 14.0;
    if groups.iter().all(|g| g.section.is_none()) {
        let x = x + width * 0.4;
        let _ = writeln!(
            out,
            "<text x=\"{x:.1}\" y=\"{y:.1}\" font-size=\"11\" text-anchor=\"end\" transform=\"rotate(-30 {x:.1} {y:.1})\">{}</text>",
            escape(&group.label)
        );
        return;
    }
    let center = x + width * 0.4;
    let _ = writeln!(
        out,
        "<text x=\"{center:.1}\" y=\"{y:.1}\" font-size=\"10\" text-anchor=\"middle\">{}</text>",
        escape(&group.label)
    );
    if let Some(section) = &group.section {
        let span = groups[index + 1..]
            .iter()
            .take_while(|g| g.section.is_none())
            .count()
            + 1;
        let middle = x - width * 0.1 + span as f64 * width / 2.0;
        let _ = writeln!(
            out,
            "<text x=\"{middle:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"middle\">{}</text>",
            y + 16.0,
            escape(section)
        );
        if index > 0 {
            let edge = x - width * 0.1;
            let _ = writeln!(out, "<line x1=\"{edge:.1}\" x2=\"{edge:.1}\" y1=\"{TITLE_HEIGHT}\" y2=\"{:.1}\" stroke=\"#bbbbbb\"/>", y + 20.0);
        }
    }
}

/// Maps values onto [0, 1] of the plot height.
struct Scale {
    log: bool,
    min: f64,
    max: f64,
}

impl Scale {
    fn new(values: &[f64], log: bool) -> Scale {
        let high = values.iter().copied().fold(0.0, f64::max);
        if log {
            let low = values.iter().copied().fold(f64::INFINITY, f64::min);
            let min = if low.is_finite() {
                10f64.powf(low.log10().floor())
            } else {
                1.0
            };
            let max = if high > 0.0 {
                10f64.powf(high.log10().ceil())
            } else {
                10.0
            };
            Scale {
                log,
                min,
                max: if max > min { max } else { min * 10.0 },
            }
        } else {
            let step = nice_step(if high > 0.0 { high * 1.1 / 5.0 } else { 1.0 });
            Scale {
                log,
                min: 0.0,
                max: (high * 1.1 / step).ceil().max(1.0) * step,
            }
        }
    }

    fn fraction(&self, value: f64) -> f64 {
        if self.log {
            (value.max(self.min).log10() - self.min.log10()) / (self.max.log10() - self.min.log10())
        } else {
            value / self.max
        }
    }

    fn ticks(&self) -> Vec<f64> {
        if self.log {
            let (low, high) = (
                self.min.log10().round() as i32,
                self.max.log10().round() as i32,
            );
            (low..=high).map(|e| 10f64.powi(e)).collect()
        } else {
            let step = nice_step(self.max / 5.0);
            (0..=((self.max / step).round() as u32))
                .map(|i| i as f64 * step)
                .collect()
        }
    }
}

/// 1, 2 or 5 times a power of ten, at least `raw`.
fn nice_step(raw: f64) -> f64 {
    let magnitude = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|step| *step >= raw)
        .unwrap_or(10.0 * magnitude)
}

fn number(value: f64) -> String {
    if value == 0.0 {
        "0".to_string()
    } else if value >= 100.0 {
        format!("{value:.0}")
    } else if value >= 1.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.3}")
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_nice() {
        assert_eq!(nice_step(0.7), 1.0);
        assert_eq!(nice_step(1.3), 2.0);
        assert_eq!(nice_step(3.0), 5.0);
        assert_eq!(nice_step(700.0), 1000.0);
    }

    #[test]
    fn log_scale_spans_decades() {
        let scale = Scale::new(&[35.0, 4200.0], true);
        assert_eq!(scale.ticks(), vec![10.0, 100.0, 1000.0, 10000.0]);
        assert!((scale.fraction(100.0) - 1.0 / 3.0).abs() < 1e-9);
    }
}
