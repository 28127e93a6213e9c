//! Per-stage timings of a sample of commands, from the transitions that
//! `GET /commands/{id}/history` lists. The server stores each transition
//! time in whole milliseconds of the system clock, which the benchmark
//! shares, so the stages are exact to about a millisecond.

use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use serde::Deserialize;

use crate::load::Sample;
use crate::stats::Latency;

/// The stages of one command, in the order they happen, each ending at
/// the named event.
pub const STAGES: [&str; 5] = [
    "create sent -> queued (API stored it)",
    "queued -> sentToTarget (relay, broker, agent, report worker)",
    "sentToTarget -> executing (agent journal, report)",
    "executing -> completed (echo, journal, report)",
    "completed -> postback received (sender, HTTP)",
];

#[derive(Deserialize)]
struct History {
    value: Vec<Transition>,
}

#[derive(Deserialize)]
struct Transition {
    #[serde(rename = "Status")]
    status: String,
    #[serde(rename = "DateTime")]
    at: String,
}

/// Maps `Instant`s of this process to wall-clock time.
#[derive(Clone, Copy)]
pub struct Clock {
    instant: Instant,
    system: SystemTime,
}

impl Clock {
    pub fn now() -> Self {
        Self {
            instant: Instant::now(),
            system: SystemTime::now(),
        }
    }

    fn wall(&self, at: Instant) -> SystemTime {
        if at >= self.instant {
            self.system + (at - self.instant)
        } else {
            self.system - (self.instant - at)
        }
    }
}

/// Reads the history of up to `count` completed samples, spread evenly over
/// the run, and returns the latency of each stage.
pub async fn stage_latencies(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    samples: &[Sample],
    count: usize,
    clock: Clock,
) -> anyhow::Result<Vec<Latency>> {
    let completed: Vec<&Sample> = samples.iter().filter(|s| s.done.is_some()).collect();
    let step = (completed.len() / count.max(1)).max(1);
    let mut stages: Vec<Vec<Duration>> = vec![Vec::new(); STAGES.len()];
    for sample in completed.iter().step_by(step).take(count) {
        let body = http
            .get(format!("{base}/commands/{}/history", sample.id))
            .bearer_auth(token)
            .send()
            .await?
            .error_for_status()?
            .bytes()
            .await?;
        let history: History = serde_json::from_slice(&body)
            .with_context(|| format!("history of {} is unreadable", sample.id))?;
        let Some(times) = transition_times(&history) else {
            continue;
        };
        let done = sample.done.expect("only completed samples are read");
        let points = [
            clock.wall(sample.sent),
            times[0],
            times[1],
            times[2],
            times[3],
            clock.wall(done),
        ];
        for (stage, pair) in points.windows(2).enumerate() {
            // A millisecond-rounded server time can precede the
            // benchmark's exact time by under a millisecond.
            stages[stage].push(pair[1].duration_since(pair[0]).unwrap_or_default());
        }
    }
    Ok(stages.into_iter().map(Latency::of).collect())
}

/// Times of queued, sentToTarget, executing and completed, or `None` when
/// the command did not pass through all four.
fn transition_times(history: &History) -> Option<[SystemTime; 4]> {
    let find = |status: &str| {
        history
            .value
            .iter()
            .find(|transition| transition.status == status)
            .and_then(|transition| chrono::DateTime::parse_from_rfc3339(&transition.at).ok())
            .map(SystemTime::from)
    };
    Some([
        find("queued")?,
        find("sentToTarget")?,
        find("executing")?,
        find("completed")?,
    ])
}
