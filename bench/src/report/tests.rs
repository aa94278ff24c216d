use std::collections::BTreeMap;

use serde_json::json;

use super::*;
use crate::stats::Latency;

fn result(name: &str, scenario: &str, target: &str, mib_s: f64, ops_s: f64) -> ScenarioResult {
    ScenarioResult {
        name: name.into(),
        scenario: scenario.into(),
        target: target.into(),
        addr: "127.0.0.1:1".into(),
        params: BTreeMap::new(),
        figures: Figures {
            ops: 10,
            bytes: 10,
            elapsed_s: 1.0,
            throughput_mib_s: mib_s,
            ops_per_s: ops_s,
            latency_us: Latency {
                p50: 100,
                p99: 900,
                p999: 2000,
                max: 3000,
                mean: 150.0,
            },
        },
        by_kind: BTreeMap::new(),
        server_memory: None,
        drop_caches: "not requested".into(),
        verified: false,
        seed: 1,
        connections: 1,
        setup_s: 0.0,
        loadavg_1m_start: None,
        unix_time_s: 0,
    }
}

fn fio_job(name: &str, direction: &str, bw_bytes: f64, iops: f64) -> Value {
    let side = json!({
        "io_bytes": 1000,
        "bw_bytes": bw_bytes,
        "iops": iops,
        "lat_ns": {"percentile": {"50.000000": 50000.0, "99.000000": 90000.0, "99.900000": 150000.0}}
    });
    let idle = json!({"io_bytes": 0, "bw_bytes": 0, "iops": 0});
    let (read, write) = if direction == "read" {
        (side, idle)
    } else {
        (idle, side)
    };
    json!({"jobname": name, "job options": {"ioengine": "io_uring", "iodepth": "64"}, "read": read, "write": write})
}

#[test]
fn ratios_come_from_the_same_directory() {
    let dir = std::env::temp_dir().join(format!("graviton-bench-report-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fio = json!({"jobs": [
        fio_job("seq-write", "write", 1000.0 * 1048576.0, 1000.0),
        fio_job("rand-read", "read", 0.0, 50_000.0),
    ]});
    std::fs::write(dir.join("fio.json"), fio.to_string()).unwrap();
    std::fs::write(
        dir.join("meta.json"),
        json!({"mode": "smoke", "notes": ["a note"], "targets": ["null", "graviton", "other"]})
            .to_string(),
    )
    .unwrap();
    let lines = [
        result("upload-1x1GiB", "upload", "null", 2000.0, 2.0),
        result("upload-1x1GiB", "upload", "graviton", 500.0, 0.5),
        result("get-small-4KiB-c64", "get-small", "null", 100.0, 40_000.0),
        result(
            "get-small-4KiB-c64",
            "get-small",
            "graviton",
            50.0,
            10_000.0,
        ),
        result("mixed-r90-4KiB-c64", "mixed", "null", 1.0, 100.0),
    ]
    .iter()
    .map(|r| serde_json::to_string(r).unwrap())
    .collect::<Vec<_>>()
    .join("\n");
    std::fs::write(dir.join("results.jsonl"), lines).unwrap();

    let text = write(&dir).unwrap();
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap();
    let svg = std::fs::read_to_string(dir.join("summary.svg")).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();

    assert_eq!(summary["targets"], json!(["null", "graviton", "other"]));
    let rows = summary["rows"].as_array().unwrap();
    assert_eq!(rows[0]["ratio_to_null"]["graviton"], json!(0.25));
    assert_eq!(rows[0]["ratio_to_disk"]["graviton"], json!(0.5));
    assert_eq!(rows[1]["disk_job"], json!("rand-read"));
    assert_eq!(rows[1]["ratio_to_disk"]["null"], json!(0.8));
    assert_eq!(rows[2]["disk"], Value::Null);
    assert!(rows[2]["ratio_to_null"].as_object().unwrap().is_empty());
    assert!(
        text.contains("0.25x") && text.contains("note: a note"),
        "{text}"
    );
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert!(svg.contains("n/a"), "unmeasured bars are marked");
}

#[test]
fn fio_without_jobs_gives_no_disk() {
    assert!(parse_fio(&json!({"fio version": "fio-3.33"})).is_empty());
}
