//! The message broker: RabbitMQ through lapin, or an in-process broker with
//! the same contract for what the service relies on (durable per-device FIFO
//! queues, publisher confirms, manual acks, redelivery of unacked messages).
//!
//! Everything above this module talks to [`Broker`] and never to lapin, so
//! the contract tests in `tests/broker_contract.rs` run one suite against both.

mod amqp;
mod amqp_url;
mod memory;
mod topology;

use std::fmt;
use std::time::Duration;

use futures_util::FutureExt;
use tokio_util::sync::CancellationToken;

pub use amqp::AmqpBroker;
pub use memory::MemoryBroker;
pub use topology::{QueueKind, Topology};

use crate::backoff::backoff_delay;
use crate::domain::DeviceId;

/// AMQP `type` of a command message sent to a device.
pub const COMMAND_MESSAGE_TYPE: &str = "command";
/// AMQP `type` of a status report a device sends back.
pub const REPORT_MESSAGE_TYPE: &str = "status-report";
/// AMQP `type` of a cancel notice for a command that is already running.
pub const CANCEL_MESSAGE_TYPE: &str = "cancel";
pub const JSON_CONTENT_TYPE: &str = "application/json";

/// Where a message goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Destination {
    /// A device's queue, through the commands exchange with the device id
    /// as routing key.
    Device(DeviceId),
    /// A device's control queue, through the control exchange with the
    /// device id as routing key.
    Control(DeviceId),
    /// A named queue, through the default exchange.
    Queue(String),
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Device(device) => write!(f, "device {device}"),
            Self::Control(device) => write!(f, "control queue of device {device}"),
            Self::Queue(queue) => write!(f, "queue {queue}"),
        }
    }
}

/// The AMQP properties the contract uses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MessageProperties {
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    /// The AMQP `type` property.
    pub kind: Option<String>,
    pub reply_to: Option<String>,
    /// Seconds since the Unix epoch.
    pub timestamp: Option<u64>,
    pub content_type: Option<String>,
}

#[derive(Clone, Debug)]
pub struct OutgoingMessage {
    pub destination: Destination,
    pub properties: MessageProperties,
    pub body: Vec<u8>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    /// The broker cannot be reached now; the same operation may succeed later.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The broker took the message but had no queue for it.
    #[error("message to {0} was returned as unroutable")]
    Unroutable(Destination),
    /// The broker refused this one operation (a negative confirm, or a
    /// channel closed because of the message or its queue). Retrying the
    /// same message is unlikely to help.
    #[error("broker rejected the operation: {0}")]
    Rejected(String),
}

/// Concurrent publishes that must reach their queues in the order they
/// were started, such as one round of the outbox relay.
///
/// Publishes started one after the other on one channel keep their order.
/// Without a batch, each publish after a failure tries to connect again, so
/// a later message could be confirmed on a new connection while an earlier
/// one had failed and went out again behind it. In a batch, the first
/// publish that finds the broker unavailable stops the batch: the later
/// ones fail as well, and the caller sends them again in order.
#[derive(Debug, Default)]
pub struct PublishBatch {
    state: std::sync::Mutex<BatchState>,
}

#[derive(Debug, Default)]
enum BatchState {
    #[default]
    Unused,
    /// Publishing on the channel with this id. Every new connection or
    /// publishing channel gets a new id.
    On(u64),
    Stopped,
}

impl PublishBatch {
    /// Returns whether the batch may publish on the channel with id
    /// `channel`, binding it to that channel on first use. A batch that is
    /// stopped, or bound to another channel, stops for good.
    fn admit(&self, channel: u64) -> bool {
        let mut state = self.lock();
        match *state {
            BatchState::Unused => {
                *state = BatchState::On(channel);
                true
            }
            BatchState::On(bound) if bound == channel => true,
            BatchState::On(_) | BatchState::Stopped => {
                *state = BatchState::Stopped;
                false
            }
        }
    }

    fn is_stopped(&self) -> bool {
        matches!(*self.lock(), BatchState::Stopped)
    }

    fn stop(&self) {
        *self.lock() = BatchState::Stopped;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BatchState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A connection to the broker, cheap to clone.
#[derive(Clone, Debug)]
pub enum Broker {
    Amqp(AmqpBroker),
    Memory(MemoryBroker),
}

impl Broker {
    /// Connects to RabbitMQ at `amqp_url`, or starts the in-process broker
    /// when there is none. The AMQP connection itself is opened lazily and
    /// reopened after failures, so this succeeds while RabbitMQ is down. It
    /// fails only when `amqp_url` is invalid, and then returns why.
    pub fn new(
        amqp_url: Option<&str>,
        topology: Topology,
        connection_name: &str,
    ) -> Result<Self, String> {
        match amqp_url {
            Some(url) => AmqpBroker::new(url, topology, connection_name).map(Self::Amqp),
            None => Ok(Self::Memory(MemoryBroker::new(topology))),
        }
    }

    pub fn topology(&self) -> &Topology {
        match self {
            Self::Amqp(broker) => broker.topology(),
            Self::Memory(broker) => broker.topology(),
        }
    }

    /// Declares the command and control queues of `device` and binds them,
    /// so that messages wait there until the device's agent connects.
    pub async fn declare_device(&self, device: &DeviceId) -> Result<(), BrokerError> {
        match self {
            Self::Amqp(broker) => broker.declare_device(device).await,
            Self::Memory(broker) => broker.declare_device(device),
        }
    }

    /// Declares the queue that receives status reports.
    pub async fn declare_reports(&self) -> Result<(), BrokerError> {
        match self {
            Self::Amqp(broker) => broker.declare_reports().await,
            Self::Memory(broker) => broker.declare_reports(),
        }
    }

    /// Publishes a persistent message and waits for the broker's confirm.
    /// A message to a device whose queue does not exist is declared first.
    pub async fn publish(&self, message: &OutgoingMessage) -> Result<(), BrokerError> {
        match self {
            Self::Amqp(broker) => broker.publish(message, None).await,
            Self::Memory(broker) => broker.publish(message),
        }
    }

    /// Publishes like [`Broker::publish`], as part of `batch`. Every message
    /// of a batch goes out on the same publishing channel, and once that
    /// channel is lost the rest of the batch fails as unavailable.
    pub async fn publish_in(
        &self,
        message: &OutgoingMessage,
        batch: &PublishBatch,
    ) -> Result<(), BrokerError> {
        match self {
            Self::Amqp(broker) => broker.publish(message, Some(batch)).await,
            // One process, one queue: nothing can overtake.
            Self::Memory(broker) => broker.publish(message),
        }
    }

    /// Starts consuming `queue` with manual acks and at most `prefetch`
    /// unacknowledged deliveries.
    pub async fn consume(&self, queue: &str, prefetch: u16) -> Result<Consumer, BrokerError> {
        match self {
            Self::Amqp(broker) => broker
                .consume(queue, prefetch)
                .await
                .map(|consumer| Consumer::Amqp(Box::new(consumer))),
            Self::Memory(broker) => broker.consume(queue, prefetch).map(Consumer::Memory),
        }
    }

    /// Takes the next message from `queue` without a consumer, or `None`
    /// when the queue is empty. The message stays unacked until acked.
    pub async fn get(&self, queue: &str) -> Result<Option<Delivery>, BrokerError> {
        match self {
            Self::Amqp(broker) => broker.get(queue).await,
            Self::Memory(broker) => Ok(broker.get(queue)),
        }
    }

    /// Consumes `queue` until `shutdown` fires, handing each delivery to
    /// `handle` and waiting for it before taking the next. Whenever the
    /// consumer fails (connection lost, queue deleted, broker down) it is
    /// started again after a capped, jittered backoff.
    pub async fn consume_until<F, Fut>(
        &self,
        queue: &str,
        prefetch: u16,
        shutdown: &CancellationToken,
        mut handle: F,
    ) where
        F: FnMut(Delivery) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        self.consume_batches_until(queue, prefetch, 1, shutdown, |mut batch| {
            let delivery = batch.pop().expect("a batch holds at least one delivery");
            handle(delivery)
        })
        .await;
    }

    /// Consumes `queue` like [`Broker::consume_until`], but hands `handle`
    /// every delivery that has already arrived, up to `max_batch`, in
    /// delivery order. A batch is never empty and never waits for more
    /// deliveries to arrive, so batching adds no latency when traffic is low.
    pub async fn consume_batches_until<F, Fut>(
        &self,
        queue: &str,
        prefetch: u16,
        max_batch: usize,
        shutdown: &CancellationToken,
        mut handle: F,
    ) where
        F: FnMut(Vec<Delivery>) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let max_batch = max_batch.max(1);
        let mut failures = 0u32;
        while !shutdown.is_cancelled() {
            let started = tokio::select! {
                () = shutdown.cancelled() => return,
                started = self.consume(queue, prefetch) => started,
            };
            let mut consumer = match started {
                Ok(consumer) => {
                    if failures > 0 {
                        tracing::info!(%queue, "consuming again");
                    }
                    failures = 0;
                    consumer
                }
                Err(error) => {
                    failures += 1;
                    let delay = backoff_delay(
                        failures,
                        Duration::from_millis(200),
                        Duration::from_secs(10),
                    );
                    tracing::warn!(%queue, %error, retry_in = ?delay, "cannot consume");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(delay) => continue,
                    }
                }
            };
            loop {
                // Biased: when a stop was requested and a delivery is also
                // waiting, the stop wins, so no new work starts after it.
                let next = tokio::select! {
                    biased;
                    () = shutdown.cancelled() => return,
                    next = consumer.next() => next,
                };
                let stopped = match next {
                    Some(Ok(first)) => {
                        let mut batch = vec![first];
                        let mut stopped = None;
                        while batch.len() < max_batch {
                            match consumer.next().now_or_never() {
                                Some(Some(Ok(delivery))) => batch.push(delivery),
                                Some(Some(Err(error))) => {
                                    stopped = Some(error.to_string());
                                    break;
                                }
                                Some(None) => {
                                    stopped = Some("the consumer closed".to_owned());
                                    break;
                                }
                                None => break,
                            }
                        }
                        // Deliveries taken before the consumer failed are
                        // still handled; their acks fail if the channel is
                        // gone, and the broker delivers them again.
                        handle(batch).await;
                        stopped
                    }
                    Some(Err(error)) => Some(error.to_string()),
                    None => Some("the consumer closed".to_owned()),
                };
                if let Some(reason) = stopped {
                    tracing::warn!(%queue, %reason, "consumer stopped; consuming again");
                    break;
                }
            }
        }
    }

    /// Checks that the broker is reachable now, opening a connection if none is open.
    pub async fn check_ready(&self) -> Result<(), BrokerError> {
        match self {
            Self::Amqp(broker) => broker.check_ready().await,
            Self::Memory(_) => Ok(()),
        }
    }

    /// Closes the connection, if any.
    pub async fn close(&self) {
        if let Self::Amqp(broker) = self {
            broker.close().await;
        }
    }
}

/// A stream of deliveries from one queue.
pub enum Consumer {
    Amqp(Box<amqp::AmqpConsumer>),
    Memory(memory::MemoryConsumer),
}

impl Consumer {
    /// Waits for the next delivery. `None` or an error means the consumer
    /// is gone (connection lost, queue deleted) and must be started again.
    pub async fn next(&mut self) -> Option<Result<Delivery, BrokerError>> {
        match self {
            Self::Amqp(consumer) => consumer.next().await,
            Self::Memory(consumer) => consumer.next().await.map(Ok),
        }
    }
}

/// One delivered message. It stays unacknowledged, and is redelivered if its
/// consumer goes away, until [`Delivery::ack`] or [`Delivery::reject`].
#[derive(Debug)]
pub struct Delivery {
    pub properties: MessageProperties,
    pub body: Vec<u8>,
    /// Set when the broker delivered this message before and it was not acked.
    pub redelivered: bool,
    acker: Acker,
}

#[derive(Debug)]
enum Acker {
    Amqp(lapin::Acker),
    Memory(memory::MemoryAcker),
}

impl Delivery {
    /// Removes the message from its queue for good.
    pub async fn ack(&self) -> Result<(), BrokerError> {
        match &self.acker {
            Acker::Amqp(acker) => amqp::ack(acker).await,
            Acker::Memory(acker) => {
                acker.ack();
                Ok(())
            }
        }
    }

    /// Drops a message that can never be processed, without requeueing it,
    /// so that it cannot loop.
    pub async fn reject(&self) -> Result<(), BrokerError> {
        match &self.acker {
            Acker::Amqp(acker) => amqp::reject(acker).await,
            Acker::Memory(acker) => {
                acker.ack();
                Ok(())
            }
        }
    }

    /// Puts the message back in its queue for another try: first in line on
    /// a classic queue and in the in-process broker, but behind the waiting
    /// messages on a RabbitMQ 3.10 quorum queue.
    pub async fn requeue(&self) -> Result<(), BrokerError> {
        match &self.acker {
            Acker::Amqp(acker) => amqp::requeue(acker).await,
            Acker::Memory(acker) => {
                acker.requeue();
                Ok(())
            }
        }
    }
}
