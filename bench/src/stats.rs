//! Latency histograms and the summary of one load run.

use std::{collections::BTreeMap, time::Duration};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Highest latency recorded, in microseconds (one minute); longer calls are
/// clamped to it.
const MAX_MICROS: u64 = 60_000_000;

/// Latencies of successful and failed calls, and failures by gRPC code.
#[derive(Clone, Debug)]
pub struct Recorder {
    histogram: Histogram<u64>,
    errors: BTreeMap<String, u64>,
    ok: u64,
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

impl Recorder {
    /// An empty recorder: microsecond resolution, 3 significant digits.
    pub fn new() -> Self {
        Self {
            histogram: new_histogram(),
            errors: BTreeMap::new(),
            ok: 0,
        }
    }

    /// Records one call that took `latency`; `error` is its gRPC code name
    /// when it failed. Every call's latency is in the histogram.
    pub fn record(&mut self, latency: Duration, error: Option<&str>) {
        let micros = u64::try_from(latency.as_micros())
            .unwrap_or(MAX_MICROS)
            .clamp(1, MAX_MICROS);
        self.histogram.saturating_record(micros);
        match error {
            None => self.ok += 1,
            Some(code) => *self.errors.entry(code.to_owned()).or_default() += 1,
        }
    }

    /// Adds every call of `other`.
    pub fn merge(&mut self, other: &Self) {
        // Both histograms share their bounds, so adding cannot fail.
        let _ = self.histogram.add(&other.histogram);
        self.ok += other.ok;
        for (code, count) in &other.errors {
            *self.errors.entry(code.clone()).or_default() += count;
        }
    }

    /// Calls recorded (successful and failed).
    pub fn calls(&self) -> u64 {
        self.ok + self.errors.values().sum::<u64>()
    }

    /// The summary of the calls recorded over `elapsed`.
    pub fn summary(&self, elapsed: Duration) -> Summary {
        let ms = |q: f64| {
            if self.histogram.is_empty() {
                0.0
            } else {
                self.histogram.value_at_quantile(q) as f64 / 1_000.0
            }
        };
        let seconds = elapsed.as_secs_f64();
        Summary {
            calls: self.calls(),
            ok: self.ok,
            errors: self.errors.clone(),
            seconds,
            throughput: if seconds > 0.0 {
                self.ok as f64 / seconds
            } else {
                0.0
            },
            p50_ms: ms(0.50),
            p90_ms: ms(0.90),
            p99_ms: ms(0.99),
            max_ms: if self.histogram.is_empty() {
                0.0
            } else {
                self.histogram.max() as f64 / 1_000.0
            },
        }
    }
}

/// 1 µs ..= 60 s with 3 significant digits: constant bounds that
/// hdrhistogram accepts (low ≥ 1, high ≥ 2 × low, sigfig ≤ 5), so this cannot
/// fail.
#[allow(clippy::expect_used)]
fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_MICROS, 3).expect("constant, valid bounds")
}

/// What one load run measured.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Summary {
    /// Calls made after the warm-up.
    pub calls: u64,
    /// Calls that succeeded.
    pub ok: u64,
    /// Failed calls by gRPC code name (e.g. `Unauthenticated`).
    pub errors: BTreeMap<String, u64>,
    /// Length of the measured part, in seconds.
    pub seconds: f64,
    /// Successful calls per second.
    pub throughput: f64,
    /// Median latency, ms.
    pub p50_ms: f64,
    /// 90th percentile, ms.
    pub p90_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// Slowest call, ms.
    pub max_ms: f64,
}

impl Summary {
    /// Failed calls, all codes together.
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// `code: n` pairs, or `none`.
    pub fn errors_text(&self) -> String {
        if self.errors.is_empty() {
            return "none".into();
        }
        self.errors
            .iter()
            .map(|(code, n)| format!("{code}: {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The median of `values` (0 when empty); NaNs sort last.
pub fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let mid = sorted.len() / 2;
    if sorted.len().is_multiple_of(2) {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    } else {
        sorted[mid]
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used, clippy::unwrap_used)]

    use super::*;

    #[test]
    fn percentiles_of_a_known_distribution() {
        let mut recorder = Recorder::new();
        // 1..=100 ms, one call each.
        for ms in 1..=100u64 {
            recorder.record(Duration::from_millis(ms), None);
        }
        let summary = recorder.summary(Duration::from_secs(2));
        assert_eq!(summary.calls, 100);
        assert_eq!(summary.ok, 100);
        assert!((summary.p50_ms - 50.0).abs() < 0.1, "{summary:?}");
        assert!((summary.p90_ms - 90.0).abs() < 0.1, "{summary:?}");
        assert!((summary.p99_ms - 99.0).abs() < 0.1, "{summary:?}");
        assert!((summary.max_ms - 100.0).abs() < 0.1, "{summary:?}");
        assert!((summary.throughput - 50.0).abs() < 1e-9);
    }

    #[test]
    fn errors_are_counted_by_code_and_not_in_throughput() {
        let mut recorder = Recorder::new();
        recorder.record(Duration::from_millis(1), None);
        recorder.record(Duration::from_millis(1), Some("Unauthenticated"));
        recorder.record(Duration::from_millis(1), Some("Unauthenticated"));
        recorder.record(Duration::from_millis(1), Some("Unavailable"));
        let summary = recorder.summary(Duration::from_secs(1));
        assert_eq!(summary.calls, 4);
        assert_eq!(summary.ok, 1);
        assert_eq!(summary.error_count(), 3);
        assert_eq!(summary.errors["Unauthenticated"], 2);
        assert_eq!(summary.errors_text(), "Unauthenticated: 2, Unavailable: 1");
        assert!((summary.throughput - 1.0).abs() < 1e-9);
    }

    #[test]
    fn merge_adds_calls_and_latencies() {
        let mut a = Recorder::new();
        let mut b = Recorder::new();
        a.record(Duration::from_millis(2), None);
        b.record(Duration::from_millis(8), Some("Internal"));
        a.merge(&b);
        let summary = a.summary(Duration::from_secs(1));
        assert_eq!(summary.calls, 2);
        assert_eq!(summary.errors["Internal"], 1);
        assert!((summary.max_ms - 8.0).abs() < 0.01, "{summary:?}");
    }

    #[test]
    fn extremes_are_clamped_not_lost() {
        let mut recorder = Recorder::new();
        recorder.record(Duration::ZERO, None);
        recorder.record(Duration::from_secs(3_600), None);
        let summary = recorder.summary(Duration::from_secs(1));
        assert_eq!(summary.calls, 2);
        assert!(
            (summary.max_ms - 60_000.0).abs() / 60_000.0 < 0.001,
            "{summary:?}"
        );
    }

    #[test]
    fn empty_summary_is_zero() {
        let summary = Recorder::new().summary(Duration::ZERO);
        assert_eq!(summary, Summary::default());
        assert_eq!(summary.errors_text(), "none");
    }

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }
}
