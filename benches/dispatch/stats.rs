//! Latency percentiles and rates.

use std::fmt;
use std::time::Duration;

/// Nearest-rank percentiles of a set of latencies.
#[derive(Clone, Copy, Debug, Default)]
pub struct Latency {
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

impl Latency {
    pub fn of(mut samples: Vec<Duration>) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        samples.sort_unstable();
        Self {
            p50: nearest_rank(&samples, 0.50),
            p99: nearest_rank(&samples, 0.99),
            max: samples[samples.len() - 1],
        }
    }
}

fn nearest_rank(sorted: &[Duration], quantile: f64) -> Duration {
    // Nearest rank: the smallest sample with at least `quantile` of all
    // samples at or below it.
    let rank = (quantile * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

impl fmt::Display for Latency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "p50 {} / p99 {} / max {} ms",
            millis(self.p50),
            millis(self.p99),
            millis(self.max)
        )
    }
}

/// Formats a duration in milliseconds with two decimals, the unit of every
/// printed latency.
pub fn millis(duration: Duration) -> String {
    format!("{:.2}", duration.as_secs_f64() * 1000.0)
}

/// Events per second; zero when no time passed.
pub fn rate(count: usize, elapsed: Duration) -> f64 {
    if elapsed.is_zero() {
        0.0
    } else {
        count as f64 / elapsed.as_secs_f64()
    }
}

/// `part / whole` as a percentage, or "n/a" without a limit to compare with.
pub fn percent_of(part: f64, whole: f64) -> String {
    if whole > 0.0 {
        format!("{:.1}%", 100.0 * part / whole)
    } else {
        "n/a".to_owned()
    }
}
