//! The comparison report of one results directory, as written by `scripts/bench`:
//!
//! - `fio.json`: fio's own JSON output, jobs named `seq-write`, `seq-read`,
//!   `rand-read`, `fsync-write` (absent if fio was skipped);
//! - `*.jsonl`: scenario results, one `ScenarioResult` per line, the server under test
//!   in `target` (`null` is the transport ceiling; any other target is compared with
//!   it);
//! - `meta.json`: what the script knows of the run (mode, host, page-cache drops, the
//!   `targets` meant to run, why one is missing), copied into the summary as is.
//!
//! It writes `summary.json`, `summary.txt` (the table, also returned) and `summary.svg`
//! (throughput and latency bars). Every ratio is between figures of this directory,
//! that is, of the same run on the same machine; a figure that was not measured is
//! absent (`null` in JSON, `n/a` in the table), never estimated.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::scenario::ScenarioResult;
use crate::stats::Figures;

/// The target every other one is set against.
pub const CEILING: &str = "null";

/// Column heads of `result_lines`; `load` is the 1-minute load average as timing began,
/// and a `*` after the target marks a result checked with `--verify` (slower).
pub const TABLE_HEADER: &str = "scenario                          target      ops        MiB/s       ops/s    p50 us    p99 us  p99.9 us   load";

/// One scenario result as table lines: the result, then each kind of op in it.
pub fn result_lines(result: &ScenarioResult) -> Vec<String> {
    let load = result
        .loadavg_1m_start
        .map_or("n/a".into(), |l| format!("{l:.2}"));
    // A `*` marks results checked with --verify: their figures include the checking.
    let target = format!(
        "{}{}",
        result.target,
        if result.verified { "*" } else { "" }
    );
    let row = table_row(&result.name, &target, &result.figures);
    let mut lines = vec![format!("{row} {load:>6}")];
    for (kind, figures) in &result.by_kind {
        lines.push(table_row(&format!("  {kind}"), &result.target, figures));
    }
    lines
}

fn table_row(name: &str, target: &str, f: &Figures) -> String {
    format!(
        "{name:<33} {target:<9} {:>6} {:>12.1} {:>11.1} {:>9} {:>9} {:>9}",
        f.ops,
        f.throughput_mib_s,
        f.ops_per_s,
        f.latency_us.p50,
        f.latency_us.p99,
        f.latency_us.p999
    )
}

/// One fio job's figures.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct DiskJob {
    pub job: String,
    pub ioengine: String,
    pub iodepth: String,
    pub throughput_mib_s: f64,
    pub ops_per_s: f64,
    /// Completion latency of the job's reads or writes (submission to completion).
    pub latency_us: Option<[f64; 3]>,
    /// For `fsync-write`: latency of the fsync that follows each write.
    pub fsync_latency_us: Option<[f64; 3]>,
}

/// Which figure of a scenario is compared, and with which fio job.
#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
pub enum Metric {
    #[serde(rename = "MiB/s")]
    Throughput,
    #[serde(rename = "ops/s")]
    Rate,
}

impl Metric {
    fn of(self, figures: &Figures) -> f64 {
        match self {
            Metric::Throughput => figures.throughput_mib_s,
            Metric::Rate => figures.ops_per_s,
        }
    }

    fn of_disk(self, job: &DiskJob) -> f64 {
        match self {
            Metric::Throughput => job.throughput_mib_s,
            Metric::Rate => job.ops_per_s,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Metric::Throughput => "MiB/s",
            Metric::Rate => "ops/s",
        }
    }
}

/// The compared figure and the disk baseline of a kind of scenario.
fn comparison(scenario: &str) -> (Metric, Option<&'static str>) {
    match scenario {
        "upload" => (Metric::Throughput, Some("seq-write")),
        "download" => (Metric::Throughput, Some("seq-read")),
        "put-small" => (Metric::Rate, Some("fsync-write")),
        "get-small" | "ranged" => (Metric::Rate, Some("rand-read")),
        _ => (Metric::Rate, None),
    }
}

/// One scenario shape across targets.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub name: String,
    pub scenario: String,
    pub metric: Metric,
    pub disk_job: Option<String>,
    pub disk: Option<f64>,
    /// The compared figure per target.
    pub value: BTreeMap<String, f64>,
    /// Per non-ceiling target: its figure over the null server's.
    pub ratio_to_null: BTreeMap<String, f64>,
    /// Per target: its figure over the disk's.
    pub ratio_to_disk: BTreeMap<String, f64>,
    pub results: BTreeMap<String, ScenarioResult>,
}

#[derive(Serialize)]
struct Summary<'a> {
    meta: Value,
    disk: &'a [DiskJob],
    targets: &'a [String],
    rows: &'a [Row],
}

/// Reads `dir`, writes the summary files into it, and returns the table.
pub fn write(dir: &Path) -> Result<String> {
    let meta = read_json(&dir.join("meta.json"))?.unwrap_or(Value::Null);
    let disk = match read_json(&dir.join("fio.json"))? {
        Some(fio) => parse_fio(&fio),
        None => Vec::new(),
    };
    let results = read_results(dir)?;
    let targets = targets(&results, &meta);
    let rows = rows(&results, &disk);
    let text = table(&meta, &disk, &targets, &rows);
    let summary = Summary {
        meta,
        disk: &disk,
        targets: &targets,
        rows: &rows,
    };
    let json = serde_json::to_string_pretty(&summary)
        .map_err(|e| Error::Usage(format!("cannot encode summary: {e}")))?;
    write_file(&dir.join("summary.json"), &json)?;
    write_file(&dir.join("summary.txt"), &text)?;
    write_file(
        &dir.join("summary.svg"),
        &crate::report::svg::render(&disk, &targets, &rows),
    )?;
    Ok(text)
}

fn write_file(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|e| Error::io(format!("write {}", path.display()), e))
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Error::Usage(format!("{} is not JSON: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(format!("read {}", path.display()), e)),
    }
}

/// Every result line of every `*.jsonl` file, in file-name order. A later result of the
/// same (target, name) replaces an earlier one.
fn read_results(dir: &Path) -> Result<Vec<ScenarioResult>> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| Error::io(format!("list {}", dir.display()), e))?;
    let mut paths: Vec<_> = entries
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "jsonl"))
        .collect();
    paths.sort();
    let mut results = Vec::new();
    for path in paths {
        let text = std::fs::read_to_string(&path)
            .map_err(|e| Error::io(format!("read {}", path.display()), e))?;
        for (number, line) in text
            .lines()
            .enumerate()
            .filter(|(_, line)| !line.trim().is_empty())
        {
            let result = serde_json::from_str(line).map_err(|e| {
                Error::Usage(format!(
                    "{}:{}: not a scenario result: {e}",
                    path.display(),
                    number + 1
                ))
            })?;
            results.push(result);
        }
    }
    Ok(results)
}

/// The targets with results and those `meta.json` says were meant to run (so a missing
/// one shows as `n/a`), the ceiling first.
fn targets(results: &[ScenarioResult], meta: &Value) -> Vec<String> {
    let meant = meta["targets"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str);
    let mut targets: Vec<String> = results
        .iter()
        .map(|r| r.target.clone())
        .chain(meant.map(String::from))
        .collect();
    targets.sort_by_key(|t| (t != CEILING, t.clone()));
    targets.dedup();
    targets
}

fn rows(results: &[ScenarioResult], disk: &[DiskJob]) -> Vec<Row> {
    let mut rows: Vec<Row> = Vec::new();
    for result in results {
        let index = match rows.iter().position(|row| row.name == result.name) {
            Some(index) => index,
            None => {
                let (metric, disk_job) = comparison(&result.scenario);
                let job = disk_job.and_then(|name| disk.iter().find(|job| job.job == name));
                rows.push(Row {
                    name: result.name.clone(),
                    scenario: result.scenario.clone(),
                    metric,
                    disk_job: job.map(|job| job.job.clone()),
                    disk: job.map(|job| metric.of_disk(job)),
                    value: BTreeMap::new(),
                    ratio_to_null: BTreeMap::new(),
                    ratio_to_disk: BTreeMap::new(),
                    results: BTreeMap::new(),
                });
                rows.len() - 1
            }
        };
        rows[index]
            .results
            .insert(result.target.clone(), result.clone());
    }
    for row in &mut rows {
        row.value = row
            .results
            .iter()
            .map(|(target, result)| (target.clone(), row.metric.of(&result.figures)))
            .collect();
        let ceiling = row.value.get(CEILING).copied();
        for (target, &value) in &row.value {
            if let (Some(ceiling), true) = (ceiling, target != CEILING) {
                row.ratio_to_null
                    .insert(target.clone(), ratio(value, ceiling));
            }
            if let Some(disk) = row.disk {
                row.ratio_to_disk.insert(target.clone(), ratio(value, disk));
            }
        }
    }
    rows
}

fn ratio(value: f64, base: f64) -> f64 {
    if base > 0.0 {
        value / base
    } else {
        f64::NAN
    }
}

/// The fio jobs of a `--output-format=json` run.
pub fn parse_fio(fio: &Value) -> Vec<DiskJob> {
    let Some(jobs) = fio["jobs"].as_array() else {
        return Vec::new();
    };
    jobs.iter()
        .filter_map(|job| {
            let name = job["jobname"].as_str()?.to_string();
            let direction = if job["write"]["io_bytes"].as_u64().unwrap_or(0) > 0 {
                "write"
            } else {
                "read"
            };
            let side = &job[direction];
            let option = |key: &str| {
                job["job options"][key]
                    .as_str()
                    .or_else(|| fio["global options"][key].as_str())
                    .unwrap_or("")
                    .to_string()
            };
            Some(DiskJob {
                ioengine: option("ioengine"),
                iodepth: option("iodepth"),
                throughput_mib_s: side["bw_bytes"].as_f64().unwrap_or(0.0) / (1024.0 * 1024.0),
                ops_per_s: side["iops"].as_f64().unwrap_or(0.0),
                latency_us: percentiles_us(&side["lat_ns"])
                    .or_else(|| percentiles_us(&side["clat_ns"])),
                fsync_latency_us: percentiles_us(&job["sync"]["lat_ns"]),
                job: name,
            })
        })
        .collect()
}

/// p50, p99, p99.9 of a fio latency object, in microseconds.
fn percentiles_us(latency: &Value) -> Option<[f64; 3]> {
    let percentile = &latency["percentile"];
    let at = |key: &str| percentile[key].as_f64().map(|ns| ns / 1000.0);
    Some([at("50.000000")?, at("99.000000")?, at("99.900000")?])
}

fn fmt_value(value: Option<f64>) -> String {
    match value {
        Some(v) if v.is_finite() => format!("{v:.1}"),
        _ => "n/a".to_string(),
    }
}

fn fmt_ratio(value: Option<f64>) -> String {
    match value {
        Some(v) if v.is_finite() => format!("{v:.2}x"),
        _ => "n/a".to_string(),
    }
}

fn table(meta: &Value, disk: &[DiskJob], targets: &[String], rows: &[Row]) -> String {
    let mode = meta["mode"].as_str().unwrap_or("?");
    let mut out = format!("== Graviton benchmark ({mode}) ==\n");
    for note in meta["notes"].as_array().into_iter().flatten() {
        let _ = writeln!(out, "note: {}", note.as_str().unwrap_or_default());
    }
    out.push_str("\n-- disk (fio, O_DIRECT) --\n");
    out.push_str(&disk_table(disk));
    out.push_str("\n-- scenarios: compared figure, ratios to the null server (transport ceiling) and to the disk --\n");
    out.push_str(&ratio_table(targets, rows));
    let in_order: Vec<&ScenarioResult> = rows
        .iter()
        .flat_map(|row| targets.iter().filter_map(|t| row.results.get(t)))
        .collect();
    let _ = writeln!(out, "\n-- every result --\n{TABLE_HEADER}");
    for line in in_order.iter().flat_map(|r| result_lines(r)) {
        let _ = writeln!(out, "{line}");
    }
    out.push_str(&memory_table(&in_order));
    out
}

fn disk_table(disk: &[DiskJob]) -> String {
    if disk.is_empty() {
        return "no fio results\n".to_string();
    }
    let head = [
        "job", "engine", "qd", "MiB/s", "IOPS", "p50 us", "p99 us", "p99.9 us",
    ];
    let mut rows = Vec::new();
    for job in disk {
        let [p50, p99, p999] = job.latency_us.map_or([None; 3], |l| l.map(Some));
        rows.push(vec![
            job.job.clone(),
            job.ioengine.clone(),
            job.iodepth.clone(),
            format!("{:.1}", job.throughput_mib_s),
            format!("{:.0}", job.ops_per_s),
            fmt_value(p50),
            fmt_value(p99),
            fmt_value(p999),
        ]);
        if let Some(sync) = job.fsync_latency_us {
            let mut row = vec![
                "  (fsync)".to_string(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
            ];
            row.extend(sync.iter().map(|us| fmt_value(Some(*us))));
            rows.push(row);
        }
    }
    aligned(head.map(String::from).to_vec(), rows)
}

/// The compared figure per target and the ratios, one row per scenario shape.
fn ratio_table(targets: &[String], rows: &[Row]) -> String {
    let compared: Vec<&String> = targets.iter().filter(|t| *t != CEILING).collect();
    let mut head = vec!["scenario".to_string(), "unit".into(), "disk".into()];
    head.extend(targets.iter().cloned());
    head.extend(compared.iter().map(|t| format!("{t}/null")));
    head.extend(targets.iter().map(|t| format!("{t}/disk")));
    let cells = rows.iter().map(|row| {
        let mut cells = vec![
            row.name.clone(),
            row.metric.label().into(),
            fmt_value(row.disk),
        ];
        cells.extend(targets.iter().map(|t| fmt_value(row.value.get(t).copied())));
        cells.extend(
            compared
                .iter()
                .map(|t| fmt_ratio(row.ratio_to_null.get(*t).copied())),
        );
        cells.extend(
            targets
                .iter()
                .map(|t| fmt_ratio(row.ratio_to_disk.get(t).copied())),
        );
        cells
    });
    aligned(head, cells.collect())
}

fn memory_table(results: &[&ScenarioResult]) -> String {
    let mib = |kib: u64| format!("{:.1}", kib as f64 / 1024.0);
    let rows: Vec<Vec<String>> = results
        .iter()
        .filter_map(|r| {
            let m = r.server_memory.as_ref()?;
            let (start, peak, hwm) = (
                mib(m.vm_rss_start_kib),
                mib(m.vm_rss_peak_kib),
                mib(m.vm_hwm_kib),
            );
            Some(vec![r.name.clone(), r.target.clone(), start, peak, hwm])
        })
        .collect();
    if rows.is_empty() {
        return String::new();
    }
    let head = [
        "scenario",
        "target",
        "RSS start MiB",
        "RSS peak MiB",
        "VmHWM MiB",
    ];
    format!(
        "\n-- server memory (from /proc/PID/status) --\n{}",
        aligned(head.map(String::from).to_vec(), rows)
    )
}

/// Columns padded to their widest cell: the first left-aligned, the others right.
fn aligned(head: Vec<String>, rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = head.iter().map(String::len).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&head).chain(&rows) {
        for (index, (cell, width)) in row.iter().zip(&widths).enumerate() {
            let _ = match index {
                0 => write!(out, "{cell:<width$}"),
                _ => write!(out, "  {cell:>width$}"),
            };
        }
        out.push('\n');
    }
    out
}

pub mod svg;

#[cfg(test)]
mod tests;
