//! The postback sender: delivers due webhook deliveries from the store,
//! signs every attempt, and schedules retries.

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use url::Url;
use uuid::Uuid;

use super::ServerContext;
use crate::command::Millis;
use crate::postback::client::{Attempt, Outcome, PostbackClient};
use crate::postback::schedule::RetrySchedule;
use crate::postback::signature::WebhookSecrets;
use crate::store::{AttemptRecord, DELIVERED, DuePostback, FAILED, FinishedAttempt, PENDING};

/// How often the sender looks for due deliveries when nothing wakes it,
/// which is when scheduled retries fall due.
const IDLE_POLL: Duration = Duration::from_millis(200);
/// Time past an attempt's deadline for recording its outcome.
const LEASE_MARGIN: Duration = Duration::from_secs(5);

/// Deliveries that the report worker creates already leased to this
/// process and hands straight to the sender, which then needs neither to
/// read nor to lease them. The sender starts each at once when its receiver
/// has a free slot, and otherwise when one frees, while the lease lasts.
pub struct Handoff {
    sender: mpsc::UnboundedSender<Handed>,
    receiver: std::sync::Mutex<Option<mpsc::UnboundedReceiver<Handed>>>,
    lease: Duration,
}

impl Handoff {
    /// Creates a handoff whose leases cover one attempt of `attempt_timeout`
    /// and the recording of its outcome.
    pub fn new(attempt_timeout: Duration) -> Self {
        let (sender, receiver) = mpsc::unbounded_channel();
        Self {
            sender,
            receiver: std::sync::Mutex::new(Some(receiver)),
            lease: attempt_timeout + LEASE_MARGIN,
        }
    }

    /// Returns the end of a lease taken at `now`.
    pub fn lease_until(&self, now: Millis) -> Millis {
        now.saturating_add(self.lease)
    }

    /// Hands deliveries leased until `lease_until`, with their bodies, to
    /// the sender.
    pub fn hand(&self, postbacks: Vec<(DuePostback, String)>, lease_until: Millis) {
        for (postback, body) in postbacks {
            // Without a running sender the lease ends and the delivery is
            // sent from the store.
            let _ = self.sender.send(Handed {
                postback,
                body,
                lease_until,
            });
        }
    }

    fn take_receiver(&self) -> Option<mpsc::UnboundedReceiver<Handed>> {
        self.receiver
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }
}

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
    let Some(mut handed) = context.postback_handoff.take_receiver() else {
        tracing::error!("a second postback sender started for one server; it stops");
        return;
    };
    // Attempts hand their receiver's slot back here as soon as the receiver
    // responded, before the outcome is stored.
    let (freed_sender, mut freed) = mpsc::unbounded_channel::<String>();
    // Attempts send their outcome to one recorder, which stores the
    // outcomes that wait together in one transaction.
    let (finished_sender, finished) = mpsc::unbounded_channel();
    let recorder = tokio::spawn(record(context.clone(), finished));
    let mut sender = Sender {
        context,
        client,
        settings: Arc::new(settings),
        tasks: JoinSet::new(),
        per_host: HashMap::new(),
        waiting: HashMap::new(),
        to_release: Vec::new(),
        backlog: false,
        freed: freed_sender,
        finished: finished_sender,
    };
    // Whether the store may hold deliveries this sender can start: set when
    // something wakes it, at the idle poll, and when a receiver frees a slot
    // that nothing in memory waits for.
    let mut scan = true;
    // A timer of its own, so that a steady stream of other events cannot
    // keep postponing the poll that finds retries falling due.
    let mut poll = tokio::time::interval(IDLE_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let woken = wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();

        while let Ok(host) = freed.try_recv() {
            scan |= sender.slot_freed(&host);
        }
        while let Ok(postback) = handed.try_recv() {
            sender.start_handed(postback);
        }
        if scan && sender.tasks.len() < sender.settings.max_in_flight {
            scan = false;
            // Deliveries this sender holds leased but will not start soon go
            // back to the store first, so that the pass takes them in due
            // order with the rest.
            sender.release_deferred().await;
            sender.start_due().await;
        }
        let full = sender.tasks.len() >= sender.settings.max_in_flight;
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = &mut woken => scan = true,
            _ = poll.tick() => {
                sender.release_deferred().await;
                scan = true;
            }
            Some(host) = freed.recv() => scan |= sender.slot_freed(&host),
            Some(postback) = handed.recv() => sender.start_handed(postback),
            Some(finished) = sender.tasks.join_next(), if !sender.tasks.is_empty() => {
                if let Err(error) = finished {
                    tracing::error!(%error, "postback task failed");
                }
                sender.start_waiting();
                // A full sender left the store alone in its last pass.
                scan |= full;
            }
        }
    }
    // Deliveries handed over but not started are left to the next sender.
    handed.close();
    let mut unstarted: Vec<Uuid> = sender
        .waiting
        .drain()
        .flat_map(|(_, line)| line)
        .map(|h| h.postback.id)
        .collect();
    while let Ok(postback) = handed.try_recv() {
        unstarted.push(postback.postback.id);
    }
    if let Err(error) = sender
        .context
        .store
        .release_postback_leases(&unstarted)
        .await
    {
        tracing::warn!(count = unstarted.len(), %error, "cannot end the leases of unsent postbacks; they are sent when the leases end");
    }
    // Attempts in flight end within their deadline; let them record their
    // outcome so that nothing is left leased and unrecorded.
    while let Some(finished) = sender.tasks.join_next().await {
        if let Err(error) = finished {
            tracing::error!(%error, "postback task failed");
        }
    }
    drop(sender);
    if let Err(error) = recorder.await {
        tracing::error!(%error, "postback recorder failed");
    }
    tracing::info!("postback sender stopped");
}

/// The sender's state between passes.
struct Sender {
    context: Arc<ServerContext>,
    client: PostbackClient,
    settings: Arc<SenderSettings>,
    tasks: JoinSet<()>,
    /// Attempts in flight per receiver, in the form of [`host_key`].
    per_host: HashMap<String, usize>,
    /// Leased deliveries waiting for a slot of their receiver, oldest first:
    /// at most as many per receiver as it has slots, so that each starts
    /// long before its lease ends.
    waiting: HashMap<String, VecDeque<Handed>>,
    /// Leased deliveries this sender will not start soon, whose leases the
    /// loop ends before its next pass so that the store's due order decides
    /// when they go.
    to_release: Vec<Uuid>,
    /// Whether the store likely contains due deliveries beyond the lines: the last pass filled a line, or deliveries went back to the
    /// store since. While it is set, a line running low starts a pass.
    backlog: bool,
    freed: mpsc::UnboundedSender<String>,
    finished: mpsc::UnboundedSender<FinishedAttempt>,
}

impl Sender {
    /// Returns whether one more attempt to `host` may start now.
    fn has_slot(&self, host: &str) -> bool {
        self.tasks.len() < self.settings.max_in_flight
            && self.per_host.get(host).copied().unwrap_or(0) < self.settings.max_in_flight_per_host
    }

    /// Most leased deliveries one receiver may have waiting in memory: a
    /// few rounds of its slots, which it works through long before their
    /// leases end, and which spare a pass over the store for each slot
    /// that frees.
    fn line_capacity(&self) -> usize {
        4 * self.settings.max_in_flight_per_host
    }

    /// Returns how many more deliveries `host` may have waiting in memory.
    fn line_room(&self, host: &str) -> usize {
        let waiting = self.waiting.get(host).map_or(0, VecDeque::len);
        self.line_capacity().saturating_sub(waiting)
    }

    /// Ends the leases of the deliveries set aside for the store.
    async fn release_deferred(&mut self) {
        if self.to_release.is_empty() {
            return;
        }
        let ids = std::mem::take(&mut self.to_release);
        if let Err(error) = self.context.store.release_postback_leases(&ids).await {
            tracing::warn!(count = ids.len(), %error, "cannot end the leases of deferred postbacks; they are sent when the leases end");
        }
    }

    /// Starts a handed delivery, or lines it up behind its receiver's
    /// attempts in flight when the line has room. Otherwise it goes back to
    /// the store.
    fn start_handed(&mut self, handed: Handed) {
        let host = host_key(&handed.postback.url);
        if self.has_slot(&host) && !self.waiting.contains_key(&host) {
            self.spawn_attempt(handed.postback, handed.body, host);
        } else if self.line_room(&host) > 0 {
            self.waiting.entry(host).or_default().push_back(handed);
        } else {
            self.to_release.push(handed.postback.id);
            self.backlog = true;
        }
    }

    /// Hands a slot of `host` back and starts the deliveries waiting for
    /// slots. Returns whether the store may hold deliveries for `host` that
    /// the last pass left out because it had no free slot.
    fn slot_freed(&mut self, host: &str) -> bool {
        let Some(count) = self.per_host.get_mut(host) else {
            return false;
        };
        let was_full = *count >= self.settings.max_in_flight_per_host;
        *count -= 1;
        if *count == 0 {
            self.per_host.remove(host);
        }
        self.start_waiting();
        let low = self.line_room(host) >= self.line_capacity() / 2;
        (was_full && !self.waiting.contains_key(host)) || (self.backlog && low)
    }

    /// Starts waiting deliveries, oldest first per receiver, while slots
    /// are free.
    fn start_waiting(&mut self) {
        if self.waiting.is_empty() {
            return;
        }
        let now = Millis::now();
        let hosts: Vec<String> = self.waiting.keys().cloned().collect();
        for host in hosts {
            while self.has_slot(&host) {
                let Some(line) = self.waiting.get_mut(&host) else {
                    break;
                };
                let Some(handed) = line.pop_front() else {
                    break;
                };
                if line.is_empty() {
                    self.waiting.remove(&host);
                }
                // An attempt must end within its lease, or another sender
                // may take the delivery meanwhile.
                if now.saturating_add(self.settings.attempt_timeout) < handed.lease_until {
                    self.spawn_attempt(handed.postback, handed.body, host.clone());
                } else {
                    self.to_release.push(handed.postback.id);
                    self.backlog = true;
                }
            }
        }
    }

    /// Starts one attempt of a leased delivery in a slot of its receiver.
    fn spawn_attempt(&mut self, postback: DuePostback, body: String, host: String) {
        *self.per_host.entry(host.clone()).or_default() += 1;
        let slot = Slot {
            host,
            freed: self.freed.clone(),
        };
        let (client, settings, finished) = (
            self.client.clone(),
            self.settings.clone(),
            self.finished.clone(),
        );
        self.tasks.spawn(async move {
            // A panicking attempt still hands its receiver's slot back; its
            // lease runs out and another attempt follows.
            let id = postback.id;
            let attempt = AssertUnwindSafe(async {
                let outcome = deliver(&client, &settings, postback, body, slot).await;
                // The recorder runs until the sender stops, after this task.
                let _ = finished.send(outcome);
            });
            if attempt.catch_unwind().await.is_err() {
                tracing::error!(postback_id = %id, "postback attempt panicked; it will be retried when its lease ends");
            }
        });
    }

    /// Reads due deliveries from the store, leases those whose receivers
    /// have a free slot, and starts them.
    async fn start_due(&mut self) {
        let now = Millis::now();
        let settings = self.settings.clone();
        // Read more than there are free slots, because rows of receivers
        // that reach their maximum during the pass are passed over.
        let limit = settings.max_in_flight * 4;
        // The lease outlives the attempt's deadline with room to record the
        // outcome; a sender that dies mid-attempt frees the row when it ends.
        // The sender keeps to the same per-receiver cap that `run::serve`
        // gives the client, so attempts do not wait for a slot there and the
        // deadline bounds the whole attempt.
        // NOTE: the sender counts per origin and the client per host and
        // port, so `http://h:8443` and `https://h:8443` together can make an
        // attempt wait in the client and outlive its lease, which at worst
        // sends it twice.
        let lease_until = now.saturating_add(settings.attempt_timeout + LEASE_MARGIN);
        // Receivers without a free slot are left out of the query. A full
        // page in which a receiver ran out of slots may hide rows of other
        // receivers, so the query runs again without it. Each repeat leaves
        // out one more receiver, so the passes end.
        loop {
            let busy = self.busy_origins();
            let Some(due) = read_due(&self.context, now, &busy, limit).await else {
                return;
            };
            let page_full = due.len() >= limit;
            // Each receiver takes as many as it has free slots plus room in
            // its line, counted while choosing so that the caps hold within
            // one page; the leases are then taken in one statement.
            let mut chosen = Vec::new();
            let mut counted: HashMap<String, usize> = HashMap::new();
            for postback in due {
                if self.tasks.len() + chosen.len() >= settings.max_in_flight {
                    break;
                }
                let host = host_key(&postback.url);
                let taken = counted.entry(host.clone()).or_default();
                let in_flight = self.per_host.get(&host).copied().unwrap_or(0);
                let free = settings.max_in_flight_per_host.saturating_sub(in_flight);
                if *taken >= free + self.line_room(&host) {
                    continue;
                }
                *taken += 1;
                chosen.push((postback, host));
            }
            let ids: Vec<_> = chosen.iter().map(|(postback, _)| postback.id).collect();
            let leased = self
                .context
                .store
                .lease_postbacks(&ids, now, lease_until)
                .await;
            let mut bodies = leased.unwrap_or_else(|error| {
                tracing::warn!(count = ids.len(), %error, "cannot lease due postbacks");
                HashMap::new()
            });
            let mut newly_busy = false;
            for (postback, host) in chosen {
                // A delivery another sender took since the read has no body.
                let Some(body) = bodies.remove(&postback.id) else {
                    continue;
                };
                if self.has_slot(&host) && !self.waiting.contains_key(&host) {
                    self.spawn_attempt(postback, body, host.clone());
                } else {
                    self.waiting
                        .entry(host.clone())
                        .or_default()
                        .push_back(Handed {
                            postback,
                            body,
                            lease_until,
                        });
                }
                newly_busy |= self.line_room(&host) == 0;
            }
            self.backlog = page_full || newly_busy;
            if self.tasks.len() >= settings.max_in_flight || !page_full || !newly_busy {
                return;
            }
        }
    }

    /// Origins of the receivers that can take nothing more now (no free
    /// slot and a full line), in the form of [`host_key`], without the empty
    /// key of unparsable URLs.
    fn busy_origins(&self) -> Vec<String> {
        self.per_host
            .iter()
            .filter(|(origin, count)| {
                !origin.is_empty()
                    && **count >= self.settings.max_in_flight_per_host
                    && self.line_room(origin) == 0
            })
            .map(|(origin, _)| origin.clone())
            .collect()
    }
}

/// A delivery handed to the sender, leased to this process until
/// `lease_until`.
pub(super) struct Handed {
    postback: DuePostback,
    body: String,
    lease_until: Millis,
}

/// Most attempt outcomes stored in one transaction.
const RECORD_BATCH: usize = 256;

/// Stores attempt outcomes until every sender of `finished` is gone.
async fn record(
    context: Arc<ServerContext>,
    mut finished: mpsc::UnboundedReceiver<FinishedAttempt>,
) {
    let mut batch = Vec::with_capacity(RECORD_BATCH);
    while finished.recv_many(&mut batch, RECORD_BATCH).await > 0 {
        if let Err(error) = context.store.record_postback_attempts(&batch).await {
            tracing::error!(
                count = batch.len(),
                %error,
                "cannot record postback attempts; they will be sent again when their leases end"
            );
        }
        batch.clear();
    }
}

/// A receiver's slot, held by one attempt while it talks to the receiver.
/// Dropping it hands the slot back to the sender, also when the attempt
/// panics.
struct Slot {
    host: String,
    freed: mpsc::UnboundedSender<String>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        // The sender's loop owns the receiving end until it stops, and then
        // no slot counts any more.
        let _ = self.freed.send(std::mem::take(&mut self.host));
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

/// Makes one attempt and returns its outcome for the recorder.
async fn deliver(
    client: &PostbackClient,
    settings: &SenderSettings,
    postback: DuePostback,
    body: String,
    slot: Slot,
) -> FinishedAttempt {
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
                        .sign(&webhook_id, timestamp, body.as_bytes()),
                ),
                ("webhook-sequence", postback.sequence.to_string()),
            ];
            client.send(&url, &headers, Bytes::from(body)).await
        }
        Err(error) => Attempt {
            outcome: Outcome::Rejected,
            status: None,
            error: Some(format!("PostBackUri is not a valid URL: {error}")),
            retry_after: None,
            duration: Duration::ZERO,
        },
    };
    // The receiver is done with this attempt; storing the outcome waits for
    // the store's writer, and the next attempt need not wait for that.
    drop(slot);

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
    FinishedAttempt {
        postback_id: postback.id,
        attempt: record,
        next_attempt_at: next,
        state: state.to_owned(),
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
}
