//! The postback sender: delivers due webhook deliveries from the store,
//! signs every attempt, and schedules retries.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use url::Url;

use super::ServerContext;
use crate::command::Millis;
use crate::postback::client::{Attempt, Outcome, PostbackClient};
use crate::postback::schedule::RetrySchedule;
use crate::postback::signature::WebhookSecrets;
use crate::store::{AttemptRecord, DELIVERED, DuePostback, FAILED, PENDING};

/// How often the sender looks for due deliveries when nothing wakes it,
/// which is when scheduled retries fall due.
const IDLE_POLL: Duration = Duration::from_millis(200);
/// Time past an attempt's deadline for recording its outcome.
const LEASE_MARGIN: Duration = Duration::from_secs(5);

pub struct SenderSettings {
    pub secrets: WebhookSecrets,
    pub schedule: RetrySchedule,
    /// Deadline of one attempt, from connect to the end of the response.
    pub attempt_timeout: Duration,
    /// Attempts in flight at once, across all receivers.
    pub max_in_flight: usize,
    /// Attempts in flight at once to one receiver (scheme, host and port),
    /// so that a slow or recovering receiver is neither flooded nor able to
    /// take every slot from the others.
    pub max_in_flight_per_host: usize,
}

pub async fn run(
    context: Arc<ServerContext>,
    client: PostbackClient,
    settings: SenderSettings,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let settings = Arc::new(settings);
    let mut tasks: JoinSet<String> = JoinSet::new();
    let mut per_host: HashMap<String, usize> = HashMap::new();
    loop {
        let woken = wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();

        if tasks.len() < settings.max_in_flight {
            start_due(&context, &client, &settings, &mut tasks, &mut per_host).await;
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = &mut woken => {}
            () = tokio::time::sleep(IDLE_POLL) => {}
            Some(finished) = tasks.join_next(), if !tasks.is_empty() => release(&mut per_host, finished),
        }
    }
    // Attempts in flight end within their deadline; let them record their
    // outcome so that nothing is left leased and unrecorded.
    while let Some(finished) = tasks.join_next().await {
        release(&mut per_host, finished);
    }
    tracing::info!("postback sender stopped");
}

fn release(
    per_host: &mut HashMap<String, usize>,
    finished: Result<String, tokio::task::JoinError>,
) {
    match finished {
        Ok(host) => {
            if let Some(count) = per_host.get_mut(&host) {
                *count -= 1;
                if *count == 0 {
                    per_host.remove(&host);
                }
            }
        }
        Err(error) => tracing::error!(%error, "postback task failed"),
    }
}

async fn start_due(
    context: &Arc<ServerContext>,
    client: &PostbackClient,
    settings: &Arc<SenderSettings>,
    tasks: &mut JoinSet<String>,
    per_host: &mut HashMap<String, usize>,
) {
    let now = Millis::now();
    // Read more than there are free slots, because rows of receivers that
    // reach their maximum during the pass are passed over.
    let limit = settings.max_in_flight * 4;
    // The lease outlives the attempt's deadline with room to record the
    // outcome; a sender that dies mid-attempt frees the row when it ends.
    // This loop keeps to the same per-receiver cap that `run::serve` gives the
    // client, so attempts do not wait for a slot there and the deadline bounds
    // the whole attempt.
    // NOTE: this loop counts per origin and the client per host and port, so
    // `http://h:8443` and `https://h:8443` together can make an attempt wait
    // in the client and outlive its lease, which at worst sends it twice.
    let lease_until = now.saturating_add(settings.attempt_timeout + LEASE_MARGIN);
    // Receivers without a free slot are left out of the query. A full page
    // in which a receiver ran out of slots may hide rows of other receivers,
    // so the query runs again without it. Each repeat leaves out one more
    // receiver, so the passes end.
    loop {
        let busy = busy_origins(per_host, settings.max_in_flight_per_host);
        let Some(due) = read_due(context, now, &busy, limit).await else {
            return;
        };
        let page_full = due.len() >= limit;
        for postback in due {
            if tasks.len() >= settings.max_in_flight {
                return;
            }
            let host = host_key(&postback.url);
            if per_host.get(&host).copied().unwrap_or(0) >= settings.max_in_flight_per_host {
                continue;
            }
            match context
                .store
                .lease_postback(postback.id, now, lease_until)
                .await
            {
                Ok(true) => {}
                Ok(false) => continue,
                Err(error) => {
                    tracing::warn!(postback_id = %postback.id, %error, "cannot lease a postback");
                    continue;
                }
            }
            *per_host.entry(host.clone()).or_default() += 1;
            let (context, client, settings) = (context.clone(), client.clone(), settings.clone());
            tasks.spawn(async move {
                // A panicking attempt still hands its receiver's slot back;
                // its lease runs out and another attempt follows.
                let id = postback.id;
                let attempt = AssertUnwindSafe(deliver(&context, &client, &settings, postback));
                if attempt.catch_unwind().await.is_err() {
                    tracing::error!(postback_id = %id, "postback attempt panicked; it will be retried when its lease ends");
                }
                host
            });
        }
        let newly_busy = busy_origins(per_host, settings.max_in_flight_per_host).len() > busy.len();
        if !page_full || !newly_busy {
            return;
        }
    }
}

async fn read_due(
    context: &ServerContext,
    now: Millis,
    busy: &[String],
    limit: usize,
) -> Option<Vec<DuePostback>> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    match context.store.due_postbacks(now, busy, limit).await {
        Ok(due) => Some(due),
        Err(error) => {
            tracing::warn!(%error, "cannot read due postbacks");
            None
        }
    }
}

/// Origins of the receivers that have no free slot, in the form of
/// [`host_key`], without the empty key of unparsable URLs.
fn busy_origins(per_host: &HashMap<String, usize>, max_per_host: usize) -> Vec<String> {
    per_host
        .iter()
        .filter(|(origin, count)| !origin.is_empty() && **count >= max_per_host)
        .map(|(origin, _)| origin.clone())
        .collect()
}

/// Returns the receiver of a URL as its origin, such as `https://example.com`
/// or `http://127.0.0.1:8080`, the form that
/// [`crate::store::Store::due_postbacks`] matches against stored URLs. An
/// unparsable or non-HTTP URL gives "".
fn host_key(url: &str) -> String {
    Url::parse(url)
        .ok()
        .map(|url| url.origin())
        .filter(url::Origin::is_tuple)
        .map(|origin| origin.ascii_serialization())
        .unwrap_or_default()
}

async fn deliver(
    context: &ServerContext,
    client: &PostbackClient,
    settings: &SenderSettings,
    postback: DuePostback,
) {
    let attempt_number = postback.attempts + 1;
    let started = Millis::now();
    let webhook_id = postback.id.to_string();
    let result = match Url::parse(&postback.url) {
        Ok(url) => {
            let timestamp = started.0 / 1000;
            let headers = [
                ("webhook-id", webhook_id.clone()),
                ("webhook-timestamp", timestamp.to_string()),
                (
                    "webhook-signature",
                    settings
                        .secrets
                        .sign(&webhook_id, timestamp, postback.body.as_bytes()),
                ),
                ("webhook-sequence", postback.sequence.to_string()),
            ];
            client
                .send(&url, &headers, Bytes::from(postback.body.clone()))
                .await
        }
        Err(error) => Attempt {
            outcome: Outcome::Rejected,
            status: None,
            error: Some(format!("PostBackUri is not a valid URL: {error}")),
            retry_after: None,
            duration: Duration::ZERO,
        },
    };

    let next = next_attempt_at(settings, &result, attempt_number, started);
    let state = match (&result.outcome, next) {
        (Outcome::Delivered, _) => DELIVERED,
        (_, Some(_)) => PENDING,
        (_, None) => FAILED,
    };
    let record = AttemptRecord {
        attempt: attempt_number,
        at: started,
        status_code: result.status.map(i64::from),
        outcome: attempt_outcome_name(result.outcome, next).to_owned(),
        error: result.error.clone(),
        duration_ms: i64::try_from(result.duration.as_millis()).unwrap_or(i64::MAX),
    };
    log_attempt(&postback, &record, state, next);
    if let Err(error) = context
        .store
        .record_postback_attempt(postback.id, &record, next, state)
        .await
    {
        tracing::error!(postback_id = %postback.id, %error, "cannot record a postback attempt; it will be sent again when its lease ends");
    }
}

/// When to try again, or `None` when the delivery is over.
fn next_attempt_at(
    settings: &SenderSettings,
    result: &Attempt,
    attempt_number: i64,
    now: Millis,
) -> Option<Millis> {
    if result.outcome != Outcome::Retry {
        return None;
    }
    let next = u32::try_from(attempt_number + 1).unwrap_or(u32::MAX);
    settings
        .schedule
        .delay_before_attempt(next, result.retry_after, rand::random::<f64>())
        .map(|delay| now.saturating_add(delay))
}

/// Names an attempt's outcome for the attempt log. A temporary failure with
/// no attempt left in the schedule is logged as `failed`, the delivery's
/// final state, because no retry follows it.
fn attempt_outcome_name(outcome: Outcome, next: Option<Millis>) -> &'static str {
    match (outcome, next) {
        (Outcome::Delivered, _) => "delivered",
        (Outcome::Retry, Some(_)) => "retry",
        (Outcome::Retry, None) => FAILED,
        (Outcome::Gone, _) => "gone",
        (Outcome::Rejected, _) => "rejected",
        (Outcome::Refused, _) => "refused",
    }
}

fn log_attempt(postback: &DuePostback, record: &AttemptRecord, state: &str, next: Option<Millis>) {
    let error = record.error.as_deref().unwrap_or_default();
    match state {
        DELIVERED => tracing::info!(
            postback_id = %postback.id, command_id = %postback.command_id, attempt = record.attempt,
            status = ?record.status_code, "postback delivered"
        ),
        PENDING => tracing::warn!(
            postback_id = %postback.id, command_id = %postback.command_id, attempt = record.attempt,
            status = ?record.status_code, error, retry_at = ?next.map(Millis::to_rfc3339), "postback attempt failed; will retry"
        ),
        _ => tracing::warn!(
            postback_id = %postback.id, command_id = %postback.command_id, attempt = record.attempt,
            status = ?record.status_code, error, outcome = %record.outcome, "postback failed for good"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_key_prefixes_the_normalized_url() {
        // The store leaves out a busy receiver's rows by this prefix, so it
        // must hold for every form a PostBackUri is stored in.
        let cases = [
            ("http://127.0.0.1:8080/hooks", "http://127.0.0.1:8080"),
            ("HTTPS://Example.COM:443/a?b=c", "https://example.com"),
            ("http://example.com:80", "http://example.com"),
            ("http://[::1]:9000/x", "http://[::1]:9000"),
            ("http://bücher.example/", "http://xn--bcher-kva.example"),
        ];
        for (text, expected) in cases {
            let stored = Url::parse(text).unwrap().to_string();
            let key = host_key(&stored);
            assert_eq!(key, expected, "{text}");
            assert!(stored.starts_with(&format!("{key}/")), "{stored} {key}");
        }
    }

    #[test]
    fn attempt_outcome_name_marks_last_retry_failed() {
        let later = Some(Millis(1_000));
        assert_eq!(attempt_outcome_name(Outcome::Retry, later), "retry");
        assert_eq!(attempt_outcome_name(Outcome::Retry, None), "failed");
        assert_eq!(attempt_outcome_name(Outcome::Delivered, None), "delivered");
        assert_eq!(attempt_outcome_name(Outcome::Gone, None), "gone");
        assert_eq!(attempt_outcome_name(Outcome::Rejected, None), "rejected");
        assert_eq!(attempt_outcome_name(Outcome::Refused, None), "refused");
    }

    #[test]
    fn host_key_of_invalid_url_is_empty() {
        assert_eq!(host_key("not a url"), "");
        assert_eq!(host_key("mailto:hooks@example.com"), "");
    }

    #[test]
    fn busy_origins_lists_full_hosts_only() {
        let per_host = HashMap::from([
            ("http://a.example".to_owned(), 4),
            ("http://b.example".to_owned(), 3),
            (String::new(), 4),
        ]);
        assert_eq!(busy_origins(&per_host, 4), ["http://a.example"]);
    }
}
