//! When to retry a postback: the delay schedule, jitter and `Retry-After`.
//!
//! Everything here is a pure function of its inputs, so the caller supplies
//! the random jitter and the current time.

use std::fmt;
use std::time::{Duration, SystemTime};

use chrono::{NaiveDateTime, TimeZone, Utc};

/// Maximum sum of all delays in a schedule, because a delivery that has
/// failed for a week is unlikely to succeed.
pub const MAX_TOTAL_DELAY: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// Maximum number of delays in a schedule, which bounds the attempt counter
/// and the delivery log of one postback.
pub const MAX_DELAYS: usize = 100;

/// Maximum delay that a receiver's `Retry-After` can request. A longer value
/// is cut to this, so that one response cannot park a delivery for days.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60 * 60);

/// Fraction by which a scheduled delay is randomly shortened or lengthened,
/// so that postbacks that failed together do not retry together.
pub const JITTER_FRACTION: f64 = 0.2;

/// The delays between postback attempts. A schedule of `n` delays allows
/// `n + 1` attempts.
///
/// The default is 5s, 1m, 5m, 30m, 2h, 6h, 12h: 8 attempts, the last about
/// 20 hours 36 minutes after the first (before jitter and `Retry-After`).
/// The short first delays cover a receiver restart, and the long tail covers
/// an outage of most of a day.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetrySchedule(Vec<Duration>);

impl Default for RetrySchedule {
    fn default() -> Self {
        const MINUTE: u64 = 60;
        const HOUR: u64 = 60 * MINUTE;
        Self(
            [
                5,
                MINUTE,
                5 * MINUTE,
                30 * MINUTE,
                2 * HOUR,
                6 * HOUR,
                12 * HOUR,
            ]
            .into_iter()
            .map(Duration::from_secs)
            .collect(),
        )
    }
}

impl RetrySchedule {
    /// Parses a comma-separated list of delays in humantime form, such as
    /// `1s,5s,30s` or `5m, 1h 30m`. Every delay must be positive, there may be
    /// at most [`MAX_DELAYS`], and their sum must not exceed
    /// [`MAX_TOTAL_DELAY`]. The error names the bad entry.
    pub fn parse(list: &str) -> Result<Self, String> {
        if list.trim().is_empty() {
            return Err(
                "postback retry delay list is empty; give at least one delay, such as 5s,1m,5m"
                    .to_owned(),
            );
        }

        let mut delays = Vec::new();
        for (index, entry) in list.split(',').enumerate() {
            let entry = entry.trim();
            if entry.is_empty() {
                return Err(format!(
                    "postback retry delay {} in {list:?} is empty; remove the extra comma",
                    index + 1
                ));
            }
            let delay = humantime::parse_duration(entry).map_err(|error| {
                format!(
                    "postback retry delay {entry:?} is invalid ({error}); use a duration such as 30s, 5m or 2h"
                )
            })?;
            if delay.is_zero() {
                return Err(format!(
                    "postback retry delay {entry:?} is zero; every delay must be positive"
                ));
            }
            delays.push(delay);
        }
        Self::new(delays)
    }

    /// Builds a schedule from delays, with the same limits as [`Self::parse`]
    /// except that an empty list is allowed and means a single attempt.
    pub fn new(delays: Vec<Duration>) -> Result<Self, String> {
        if delays.len() > MAX_DELAYS {
            return Err(format!(
                "postback retry schedule has {} delays, the maximum is {MAX_DELAYS}",
                delays.len()
            ));
        }
        if let Some(zero) = delays.iter().position(|delay| delay.is_zero()) {
            return Err(format!(
                "postback retry delay {} is zero; every delay must be positive",
                zero + 1
            ));
        }
        let total = delays
            .iter()
            .try_fold(Duration::ZERO, |sum, delay| sum.checked_add(*delay))
            .unwrap_or(Duration::MAX);
        if total > MAX_TOTAL_DELAY {
            return Err(format!(
                "postback retry delays add up to {}, the maximum is {}; shorten or remove delays",
                humantime::format_duration(total),
                humantime::format_duration(MAX_TOTAL_DELAY)
            ));
        }
        Ok(Self(delays))
    }

    pub fn delays(&self) -> &[Duration] {
        &self.0
    }

    /// Returns the number of attempts the schedule allows, the first included.
    pub fn max_attempts(&self) -> u32 {
        // MAX_DELAYS keeps this far below u32::MAX.
        self.0.len() as u32 + 1
    }

    /// Computes the wait before attempt number `next_attempt`, counted from 1
    /// for the first attempt, or returns `None` when the schedule allows no
    /// such attempt.
    ///
    /// Attempt 1 (and 0, treated as 1) goes out at once. Later attempts wait
    /// the scheduled delay scaled by a factor between 0.8 and 1.2, picked by
    /// `jitter` in [0, 1). A value outside that range is clamped, and NaN
    /// counts as 0.5. A `retry_after` from the receiver can only lengthen the
    /// wait, and only up to [`MAX_RETRY_AFTER`]. So the wait is
    /// `max(jittered delay, min(retry_after, MAX_RETRY_AFTER))`, and a
    /// receiver can neither make retries come faster than the schedule nor
    /// stretch one wait beyond an hour.
    pub fn delay_before_attempt(
        &self,
        next_attempt: u32,
        retry_after: Option<Duration>,
        jitter: f64,
    ) -> Option<Duration> {
        if next_attempt <= 1 {
            return Some(Duration::ZERO);
        }

        let index = usize::try_from(next_attempt - 2).ok()?;
        let scheduled = *self.0.get(index)?;
        let jitter = if jitter.is_nan() {
            0.5
        } else {
            jitter.clamp(0.0, 1.0)
        };
        let factor = 1.0 - JITTER_FRACTION + 2.0 * JITTER_FRACTION * jitter;
        let jittered = scheduled.mul_f64(factor);

        let requested = retry_after.unwrap_or(Duration::ZERO).min(MAX_RETRY_AFTER);
        Some(jittered.max(requested))
    }
}

/// Writes the delays in the form that [`RetrySchedule::parse`] reads.
impl fmt::Display for RetrySchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, delay) in self.0.iter().enumerate() {
            if index > 0 {
                f.write_str(",")?;
            }
            write!(f, "{}", humantime::format_duration(*delay))?;
        }
        Ok(())
    }
}

/// Parses a `Retry-After` header value (RFC 9110, section 10.2.3) into the
/// wait it requests from `now`. Accepts delay-seconds and the three HTTP-date
/// formats. A date in the past gives zero. Returns `None` for anything else,
/// including negative or overflowing numbers.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|byte| byte.is_ascii_digit()) {
        return value.parse::<u64>().ok().map(Duration::from_secs);
    }

    let date = parse_http_date(value)?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

fn parse_http_date(value: &str) -> Option<SystemTime> {
    // IMF-fixdate, then the obsolete RFC 850 and asctime forms, all in GMT.
    // NOTE: chrono reads an RFC 850 two-digit year of 70-99 as 19xx and 00-69
    // as 20xx, where RFC 9110 picks the century from the current date.
    const FORMATS: [&str; 3] = [
        "%a, %d %b %Y %H:%M:%S GMT",
        "%A, %d-%b-%y %H:%M:%S GMT",
        "%a %b %e %H:%M:%S %Y",
    ];
    let naive = FORMATS
        .iter()
        .find_map(|format| NaiveDateTime::parse_from_str(value, format).ok())?;
    Some(Utc.from_utc_datetime(&naive).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seconds(value: u64) -> Duration {
        Duration::from_secs(value)
    }

    fn schedule(list: &str) -> RetrySchedule {
        RetrySchedule::parse(list).unwrap()
    }

    #[test]
    fn default_schedule_spans_most_of_a_day() {
        let default = RetrySchedule::default();
        assert_eq!(default.max_attempts(), 8);
        let total: Duration = default.delays().iter().sum();
        assert_eq!(total, seconds(20 * 3600 + 36 * 60 + 5));
        assert_eq!(default.to_string(), "5s,1m,5m,30m,2h,6h,12h");
    }

    #[test]
    fn parse_reads_humantime_list() {
        let parsed = schedule(" 1s, 5s ,30s,1h 30m");
        assert_eq!(
            parsed.delays(),
            &[seconds(1), seconds(5), seconds(30), seconds(5400)]
        );
        assert_eq!(parsed.max_attempts(), 5);
    }

    #[test]
    fn parse_round_trips_display() {
        let default = RetrySchedule::default();
        assert_eq!(schedule(&default.to_string()), default);
    }

    #[test]
    fn parse_rejects_empty_list_and_entries() {
        let error = RetrySchedule::parse("").unwrap_err();
        assert!(error.contains("list is empty"), "{error}");

        let error = RetrySchedule::parse("1s,,5s").unwrap_err();
        assert!(error.contains("delay 2"), "{error}");
        assert!(error.contains("is empty"), "{error}");

        let error = RetrySchedule::parse("1s,").unwrap_err();
        assert!(error.contains("delay 2"), "{error}");
    }

    #[test]
    fn parse_rejects_zero_delay() {
        let error = RetrySchedule::parse("1s,0s").unwrap_err();
        assert!(error.contains("\"0s\" is zero"), "{error}");
    }

    #[test]
    fn parse_rejects_invalid_duration() {
        let error = RetrySchedule::parse("1s,soon").unwrap_err();
        assert!(error.contains("\"soon\" is invalid"), "{error}");

        let error = RetrySchedule::parse("5").unwrap_err();
        assert!(error.contains("\"5\" is invalid"), "{error}");
    }

    #[test]
    fn parse_rejects_total_over_a_week() {
        assert!(RetrySchedule::parse("3days,4days").is_ok());

        let error = RetrySchedule::parse("3days,4days,1s").unwrap_err();
        assert!(error.contains("add up to 7days 1s"), "{error}");
    }

    #[test]
    fn new_rejects_too_many_delays() {
        assert!(RetrySchedule::new(vec![seconds(1); MAX_DELAYS]).is_ok());

        let error = RetrySchedule::new(vec![seconds(1); MAX_DELAYS + 1]).unwrap_err();
        assert!(error.contains("101 delays"), "{error}");
    }

    #[test]
    fn new_rejects_overflowing_total() {
        let error = RetrySchedule::new(vec![Duration::MAX, Duration::MAX]).unwrap_err();
        assert!(error.contains("add up to"), "{error}");
    }

    #[test]
    fn first_attempt_goes_out_at_once() {
        let schedule = schedule("10s");
        assert_eq!(
            schedule.delay_before_attempt(1, None, 0.9),
            Some(Duration::ZERO)
        );
        assert_eq!(
            schedule.delay_before_attempt(0, None, 0.9),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn delay_follows_schedule_then_stops() {
        let schedule = schedule("10s,20s");
        assert_eq!(
            schedule.delay_before_attempt(2, None, 0.5),
            Some(seconds(10))
        );
        assert_eq!(
            schedule.delay_before_attempt(3, None, 0.5),
            Some(seconds(20))
        );
        assert_eq!(schedule.delay_before_attempt(4, None, 0.5), None);
        assert_eq!(schedule.delay_before_attempt(u32::MAX, None, 0.5), None);
    }

    #[test]
    fn jitter_spans_twenty_percent() {
        let schedule = schedule("100s");
        assert_eq!(
            schedule.delay_before_attempt(2, None, 0.0),
            Some(seconds(80))
        );
        assert_eq!(
            schedule.delay_before_attempt(2, None, 0.75),
            Some(seconds(110))
        );

        let near_top = schedule.delay_before_attempt(2, None, 0.999_999).unwrap();
        assert!(near_top < seconds(120), "{near_top:?}");
        assert!(near_top > seconds(119), "{near_top:?}");
    }

    #[test]
    fn jitter_out_of_range_is_clamped() {
        let schedule = schedule("100s");
        assert_eq!(
            schedule.delay_before_attempt(2, None, -3.0),
            Some(seconds(80))
        );
        assert_eq!(
            schedule.delay_before_attempt(2, None, 7.0),
            Some(seconds(120))
        );
        assert_eq!(
            schedule.delay_before_attempt(2, None, f64::NAN),
            Some(seconds(100))
        );
    }

    #[test]
    fn retry_after_lengthens_delay() {
        let schedule = schedule("10s");
        let delay = schedule.delay_before_attempt(2, Some(seconds(45)), 0.5);
        assert_eq!(delay, Some(seconds(45)));
    }

    #[test]
    fn retry_after_never_shortens_delay() {
        let schedule = schedule("10s");
        let delay = schedule.delay_before_attempt(2, Some(Duration::ZERO), 0.5);
        assert_eq!(delay, Some(seconds(10)));
    }

    #[test]
    fn retry_after_is_capped_at_an_hour() {
        let schedule = schedule("10s,3h");
        let delay = schedule.delay_before_attempt(2, Some(seconds(86_400)), 0.5);
        assert_eq!(delay, Some(MAX_RETRY_AFTER));

        // A scheduled delay longer than the cap still applies in full.
        let delay = schedule.delay_before_attempt(3, Some(seconds(86_400)), 0.5);
        assert_eq!(delay, Some(seconds(3 * 3600)));
    }

    #[test]
    fn retry_after_ignored_when_no_attempts_remain() {
        let schedule = schedule("10s");
        assert_eq!(
            schedule.delay_before_attempt(3, Some(seconds(5)), 0.5),
            None
        );
    }

    // 2024-01-01T00:00:00Z, a Monday.
    const NOW_SECONDS: u64 = 1_704_067_200;

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + seconds(NOW_SECONDS)
    }

    #[test]
    fn retry_after_reads_delay_seconds() {
        assert_eq!(parse_retry_after("120", now()), Some(seconds(120)));
        assert_eq!(parse_retry_after(" 0 ", now()), Some(Duration::ZERO));
    }

    #[test]
    fn retry_after_reads_http_dates() {
        let expected = Some(seconds(90));
        let imf = parse_retry_after("Mon, 01 Jan 2024 00:01:30 GMT", now());
        assert_eq!(imf, expected, "IMF-fixdate");
        let rfc850 = parse_retry_after("Monday, 01-Jan-24 00:01:30 GMT", now());
        assert_eq!(rfc850, expected, "RFC 850");
        let asctime = parse_retry_after("Mon Jan  1 00:01:30 2024", now());
        assert_eq!(asctime, expected, "asctime");
    }

    #[test]
    fn retry_after_past_date_is_zero() {
        let past = parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now());
        assert_eq!(past, Some(Duration::ZERO));
    }

    #[test]
    fn retry_after_rejects_other_values() {
        for value in [
            "",
            "-5",
            "1.5",
            "soon",
            "99999999999999999999999",
            "2024-01-01T00:01:30Z",
            "Mon, 01 Jan 2024 00:01:30 PST",
        ] {
            assert_eq!(parse_retry_after(value, now()), None, "{value:?}");
        }
    }
}
