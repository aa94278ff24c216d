//! Measurement: latency histograms (hdrhistogram, microseconds, 3 significant digits)
//! per kind of operation, byte and op counts, and their summary as figures.
//!
//! Each worker records into its own `Recorder`; recorders are merged once the phase
//! is over, so recording takes no lock.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

const LATENCY_US_MAX: u64 = 3_600_000_000;

/// Op latencies and bytes of one kind (`"upload"`, `"read"`, `"write"`, …).
#[derive(Clone)]
pub struct Kind {
    histogram: Histogram<u64>,
    bytes: u64,
}

impl Kind {
    fn new() -> Kind {
        Kind {
            histogram: Histogram::new_with_bounds(1, LATENCY_US_MAX, 3)
                .expect("static histogram bounds are valid"),
            bytes: 0,
        }
    }
}

/// Everything one worker measured in a phase.
#[derive(Clone, Default)]
pub struct Recorder {
    kinds: BTreeMap<&'static str, Kind>,
}

impl Recorder {
    pub fn record(&mut self, kind: &'static str, latency: Duration, bytes: u64) {
        let entry = self.kinds.entry(kind).or_insert_with(Kind::new);
        let micros = (latency.as_micros() as u64).clamp(1, LATENCY_US_MAX);
        entry
            .histogram
            .record(micros)
            .expect("value is clamped into the histogram's bounds");
        entry.bytes += bytes;
    }

    pub fn merge(&mut self, other: &Recorder) {
        for (name, kind) in &other.kinds {
            let entry = self.kinds.entry(name).or_insert_with(Kind::new);
            entry
                .histogram
                .add(&kind.histogram)
                .expect("histograms share their bounds");
            entry.bytes += kind.bytes;
        }
    }

    /// Figures over `elapsed`: all kinds together, and each kind on its own when there is
    /// more than one.
    pub fn summarise(&self, elapsed: Duration) -> (Figures, BTreeMap<String, Figures>) {
        let mut all = Kind::new();
        for kind in self.kinds.values() {
            all.histogram
                .add(&kind.histogram)
                .expect("histograms share their bounds");
            all.bytes += kind.bytes;
        }
        let by_kind = if self.kinds.len() > 1 {
            self.kinds
                .iter()
                .map(|(name, kind)| (name.to_string(), Figures::of(kind, elapsed)))
                .collect()
        } else {
            BTreeMap::new()
        };
        (Figures::of(&all, elapsed), by_kind)
    }
}

/// Throughput, rate and latency of a set of operations over a wall-clock interval.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Figures {
    pub ops: u64,
    pub bytes: u64,
    pub elapsed_s: f64,
    pub throughput_mib_s: f64,
    pub ops_per_s: f64,
    pub latency_us: Latency,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Latency {
    pub p50: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub mean: f64,
}

impl Figures {
    fn of(kind: &Kind, elapsed: Duration) -> Figures {
        let seconds = elapsed.as_secs_f64().max(f64::MIN_POSITIVE);
        let h = &kind.histogram;
        let ops = h.len();
        let quantile = |q: f64| if ops == 0 { 0 } else { h.value_at_quantile(q) };
        Figures {
            ops,
            bytes: kind.bytes,
            elapsed_s: elapsed.as_secs_f64(),
            throughput_mib_s: kind.bytes as f64 / (1024.0 * 1024.0) / seconds,
            ops_per_s: ops as f64 / seconds,
            latency_us: Latency {
                p50: quantile(0.50),
                p99: quantile(0.99),
                p999: quantile(0.999),
                max: if ops == 0 { 0 } else { h.max() },
                mean: if ops == 0 { 0.0 } else { h.mean() },
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_from_known_samples() {
        let mut a = Recorder::default();
        let mut b = Recorder::default();
        for i in 1..=500 {
            a.record("read", Duration::from_micros(i), 4096);
            b.record("read", Duration::from_micros(500 + i), 4096);
        }
        b.record("write", Duration::from_micros(10_000), 4096);
        a.merge(&b);
        let (all, by_kind) = a.summarise(Duration::from_secs(2));
        assert_eq!(all.ops, 1001);
        assert_eq!(all.bytes, 1001 * 4096);
        assert!((all.ops_per_s - 500.5).abs() < 1e-9);
        assert!((all.latency_us.p50 as i64 - 500).abs() <= 1);
        assert!(all.latency_us.max >= 10_000 && all.latency_us.max <= 10_010);
        assert_eq!(by_kind["read"].ops, 1000);
        assert_eq!(by_kind["write"].ops, 1);
    }

    #[test]
    fn empty_recorder_gives_zeroes() {
        let (all, by_kind) = Recorder::default().summarise(Duration::from_secs(1));
        assert_eq!(all.ops, 0);
        assert_eq!(all.latency_us.p99, 0);
        assert!(by_kind.is_empty());
    }
}
