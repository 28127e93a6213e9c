//! Capped exponential backoff with jitter, for reconnects and retries.

use std::time::Duration;

use rand::Rng;

/// Delay before retry number `attempt` (starting at 1): `base` doubled per
/// attempt, capped at `max`, then scaled by a random factor in [0.5, 1.0] so
/// that many clients recovering from one outage do not retry in lockstep.
pub fn backoff_delay(attempt: u32, base: Duration, max: Duration) -> Duration {
    jittered(
        capped(attempt, base, max),
        rand::rng().random_range(0.5..=1.0),
    )
}

fn capped(attempt: u32, base: Duration, max: Duration) -> Duration {
    let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(20));
    base.saturating_mul(factor).min(max)
}

fn jittered(delay: Duration, factor: f64) -> Duration {
    delay.mul_f64(factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_until_the_cap() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(1);
        assert_eq!(capped(1, base, max), Duration::from_millis(100));
        assert_eq!(capped(2, base, max), Duration::from_millis(200));
        assert_eq!(capped(4, base, max), Duration::from_millis(800));
        assert_eq!(capped(5, base, max), max);
        assert_eq!(capped(u32::MAX, base, max), max);
    }

    #[test]
    fn jitter_stays_within_half_and_full_delay() {
        for attempt in 1..10 {
            let delay = backoff_delay(attempt, Duration::from_millis(100), Duration::from_secs(5));
            let ceiling = capped(attempt, Duration::from_millis(100), Duration::from_secs(5));
            assert!(
                delay <= ceiling,
                "attempt {attempt}: {delay:?} > {ceiling:?}"
            );
            assert!(
                delay >= ceiling / 2,
                "attempt {attempt}: {delay:?} < half of {ceiling:?}"
            );
        }
    }
}
