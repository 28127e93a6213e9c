//! RabbitMQ through lapin.
//!
//! One connection per [`AmqpBroker`], opened on first use and opened again
//! after it fails, so callers never hold a dead handle. Publishing uses one
//! channel in confirm mode; each consumer gets a channel of its own, so a
//! channel the broker closes costs that one consumer or operation only.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions,
    BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{FieldTable, ShortString};
use lapin::uri::AMQPUri;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use tokio::sync::Mutex;

use super::amqp_url::parse_node_urls;
use super::{
    Acker, BrokerError, Delivery, Destination, MessageProperties, OutgoingMessage, PublishBatch,
    Topology,
};
use crate::domain::DeviceId;

/// AMQP delivery mode 2: the broker writes the message to disk.
const PERSISTENT: u8 = 2;

#[derive(Clone)]
pub struct AmqpBroker {
    inner: Arc<Inner>,
}

struct Inner {
    /// The cluster's nodes, tried in turn. Never empty.
    uris: Vec<AMQPUri>,
    /// Index into `uris` of the node to try next.
    next_node: AtomicUsize,
    /// Count of publishing channels opened so far, which gives each one its
    /// id for [`PublishBatch`].
    publishers_opened: AtomicU64,
    topology: Topology,
    connection_name: String,
    live: Mutex<Option<Live>>,
}

/// An open connection with the state that dies with it.
struct Live {
    connection: Connection,
    publisher: Channel,
    /// The number of `publisher`, unique within this broker.
    publisher_id: u64,
    /// Takes declarations and gets. RabbitMQ closes a channel whose
    /// declaration conflicts with an existing queue; on this channel that
    /// costs the one declaration, not the publishes in flight.
    declarer: Channel,
    /// Device queues declared on this connection, so each is declared once
    /// per connection rather than once per message.
    declared_devices: HashSet<DeviceId>,
    reports_declared: bool,
}

impl fmt::Debug for AmqpBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URI may carry a password, so it is never printed.
        f.debug_struct("AmqpBroker")
            .field("connection_name", &self.inner.connection_name)
            .field("topology", &self.inner.topology)
            .finish_non_exhaustive()
    }
}

impl AmqpBroker {
    /// Creates a broker for `urls`: one AMQP URL, or several separated by
    /// commas for the nodes of a cluster. A connection goes to one node, and
    /// after a failure the next connection tries the next node. Returns why
    /// the list is invalid when a node's URL is, without repeating the URL.
    pub fn new(urls: &str, topology: Topology, connection_name: &str) -> Result<Self, String> {
        let uris = parse_node_urls(urls)?;
        Ok(Self {
            inner: Arc::new(Inner {
                uris,
                next_node: AtomicUsize::new(0),
                publishers_opened: AtomicU64::new(0),
                topology,
                connection_name: connection_name.to_owned(),
                live: Mutex::new(None),
            }),
        })
    }

    pub fn topology(&self) -> &Topology {
        &self.inner.topology
    }

    pub async fn check_ready(&self) -> Result<(), BrokerError> {
        let mut live = self.inner.live.lock().await;
        self.ensure_live(&mut live).await.map(|_| ())
    }

    pub async fn declare_device(&self, device: &DeviceId) -> Result<(), BrokerError> {
        let mut guard = self.inner.live.lock().await;
        let live = self.ensure_live(&mut guard).await?;
        let result = self.declare_device_on(live, device).await;
        self.forget_if_broken(&mut guard, result).await
    }

    pub async fn declare_reports(&self) -> Result<(), BrokerError> {
        let mut guard = self.inner.live.lock().await;
        let live = self.ensure_live(&mut guard).await?;
        let result = self.declare_reports_on(live).await;
        self.forget_if_broken(&mut guard, result).await
    }

    pub async fn publish(
        &self,
        message: &OutgoingMessage,
        batch: Option<&PublishBatch>,
    ) -> Result<(), BrokerError> {
        match self.publish_once(message, batch).await {
            // A device queue deleted behind our back: declare it again and
            // retry once, because the declaration cache was stale.
            Err(BrokerError::Unroutable(
                Destination::Device(device) | Destination::Control(device),
            )) => {
                {
                    let mut guard = self.inner.live.lock().await;
                    if let Some(live) = guard.as_mut() {
                        live.declared_devices.remove(&device);
                    }
                }
                self.publish_once(message, batch).await
            }
            other => other,
        }
    }

    /// Publishes once, and stops `batch` when the broker is unavailable.
    async fn publish_once(
        &self,
        message: &OutgoingMessage,
        batch: Option<&PublishBatch>,
    ) -> Result<(), BrokerError> {
        let result = self.publish_in_batch(message, batch).await;
        if let (Some(batch), Err(BrokerError::Unavailable(_))) = (batch, &result) {
            batch.stop();
        }
        result
    }

    async fn publish_in_batch(
        &self,
        message: &OutgoingMessage,
        batch: Option<&PublishBatch>,
    ) -> Result<(), BrokerError> {
        let (exchange, routing_key) = match &message.destination {
            Destination::Device(device) => (
                self.inner.topology.commands_exchange(),
                device.as_str().to_owned(),
            ),
            Destination::Control(device) => (
                self.inner.topology.control_exchange(),
                device.as_str().to_owned(),
            ),
            Destination::Queue(queue) => (String::new(), queue.clone()),
        };

        // The lock covers handing the frames to the connection, which keeps
        // messages in call order, but not the wait for the confirm, so
        // concurrent publishers share the round trip.
        let confirm = {
            let mut guard = self.inner.live.lock().await;
            // Checked before connecting, so that a stopped batch does not
            // try to connect once per message.
            if batch.is_some_and(PublishBatch::is_stopped) {
                return Err(batch_stopped());
            }
            let live = self.ensure_live(&mut guard).await?;
            if let Some(batch) = batch
                && !batch.admit(live.publisher_id)
            {
                return Err(batch_stopped());
            }
            let declared = match &message.destination {
                Destination::Device(device) | Destination::Control(device) => {
                    self.declare_device_on(live, device).await
                }
                Destination::Queue(_) => Ok(()),
            };
            let published = match declared {
                Ok(()) => live
                    .publisher
                    .basic_publish(
                        ShortString::from(exchange),
                        ShortString::from(routing_key),
                        // Mandatory: a message no queue takes comes back
                        // instead of vanishing.
                        BasicPublishOptions {
                            mandatory: true,
                            ..BasicPublishOptions::default()
                        },
                        &message.body,
                        to_basic_properties(&message.properties),
                    )
                    .await
                    .map_err(|error| classify(live, &error)),
                Err(error) => Err(error),
            };
            self.forget_if_broken(&mut guard, published).await?
        };

        let confirmation = confirm.await.map_err(|error| {
            BrokerError::Unavailable(format!("no publisher confirm received: {error}"))
        })?;
        match confirmation {
            // With mandatory set an unroutable message is returned and still
            // acked, so the returned message decides.
            Confirmation::Ack(Some(_)) | Confirmation::Nack(Some(_)) => {
                Err(BrokerError::Unroutable(message.destination.clone()))
            }
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Nack(None) => Err(BrokerError::Rejected(format!(
                "broker returned a negative confirm for the publish to {}",
                message.destination
            ))),
            Confirmation::NotRequested => Err(BrokerError::Rejected(
                "publisher confirms are not enabled on the publishing channel".into(),
            )),
        }
    }

    pub async fn consume(&self, queue: &str, prefetch: u16) -> Result<AmqpConsumer, BrokerError> {
        let mut guard = self.inner.live.lock().await;
        let live = self.ensure_live(&mut guard).await?;
        let result = open_consumer(live, &self.inner.topology, queue, prefetch).await;
        self.forget_if_broken(&mut guard, result).await
    }

    pub async fn get(&self, queue: &str) -> Result<Option<Delivery>, BrokerError> {
        let mut guard = self.inner.live.lock().await;
        let live = self.ensure_live(&mut guard).await?;
        // Acks go back on the channel that delivered; if the declaring
        // channel is replaced meanwhile, the ack fails and the message
        // comes back, which cancel notices tolerate.
        let result = live
            .declarer
            .basic_get(ShortString::from(queue), BasicGetOptions::default())
            .await
            .map_err(|error| classify(live, &error));
        let message = self.forget_if_broken(&mut guard, result).await?;
        Ok(message.map(|message| {
            let delivery = message.delivery;
            Delivery {
                properties: from_basic_properties(&delivery.properties),
                body: delivery.data,
                redelivered: delivery.redelivered,
                acker: Acker::Amqp(delivery.acker),
            }
        }))
    }

    pub async fn close(&self) {
        if let Some(live) = self.inner.live.lock().await.take() {
            let _ = live
                .connection
                .close(200, ShortString::from("dispatcher stopping"))
                .await;
        }
    }

    /// Returns the open connection, opening one when there is none or the
    /// last one died.
    async fn ensure_live<'a>(
        &self,
        guard: &'a mut Option<Live>,
    ) -> Result<&'a mut Live, BrokerError> {
        let usable = guard
            .as_ref()
            .is_some_and(|live| live.connection.status().connected());
        if !usable {
            *guard = None;
            *guard = Some(self.connect().await?);
        } else if let Some(live) = guard.as_mut() {
            // The broker closed a channel but not the connection (a message
            // over its size limit, a deleted exchange, a conflicting queue):
            // replace the channel, and declare everything again, because
            // what was declared may be what went missing.
            if !live.publisher.status().connected() {
                live.publisher = open_confirm_channel(&live.connection).await?;
                live.publisher_id = self.next_publisher_id();
                self.declare_exchanges(&live.publisher).await?;
                live.declared_devices.clear();
                live.reports_declared = false;
            }
            if !live.declarer.status().connected() {
                live.declarer = open_channel(&live.connection).await?;
            }
        }
        Ok(guard.as_mut().expect("connection was opened above"))
    }

    fn next_publisher_id(&self) -> u64 {
        self.inner.publishers_opened.fetch_add(1, Ordering::Relaxed)
    }

    async fn declare_exchanges(&self, channel: &Channel) -> Result<(), BrokerError> {
        let topology = &self.inner.topology;
        for exchange in [topology.commands_exchange(), topology.control_exchange()] {
            channel
                .exchange_declare(
                    ShortString::from(exchange.as_str()),
                    ExchangeKind::Direct,
                    ExchangeDeclareOptions {
                        durable: true,
                        ..ExchangeDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(|error| {
                    BrokerError::Rejected(format!("cannot declare exchange {exchange}: {error}"))
                })?;
        }
        Ok(())
    }

    async fn connect(&self) -> Result<Live, BrokerError> {
        let uris = &self.inner.uris;
        // Every attempt moves on to the next node, so after a node fails the
        // reconnect goes to another one.
        let node = self.inner.next_node.fetch_add(1, Ordering::Relaxed) % uris.len();
        let uri = uris[node].clone();
        let address = socket_address_text(&uri.authority.host, uri.authority.port);
        let properties = ConnectionProperties::default()
            .with_connection_name(self.inner.connection_name.clone().into());
        let connection = Connection::connect_uri(uri, properties)
            .await
            .map_err(|error| {
                BrokerError::Unavailable(format!("cannot connect to {address}: {error}"))
            })?;
        let publisher = open_confirm_channel(&connection).await?;
        let declarer = open_channel(&connection).await?;
        self.declare_exchanges(&publisher).await?;
        tracing::info!(
            connection = %self.inner.connection_name,
            node = %address,
            "connected to RabbitMQ"
        );
        Ok(Live {
            connection,
            publisher,
            publisher_id: self.next_publisher_id(),
            declarer,
            declared_devices: HashSet::new(),
            reports_declared: false,
        })
    }

    async fn declare_device_on(
        &self,
        live: &mut Live,
        device: &DeviceId,
    ) -> Result<(), BrokerError> {
        if live.declared_devices.contains(device) {
            return Ok(());
        }
        let topology = &self.inner.topology;
        let pairs = [
            (topology.device_queue(device), topology.commands_exchange()),
            (topology.control_queue(device), topology.control_exchange()),
        ];
        for (queue, exchange) in pairs {
            declare_queue(&live.declarer, &queue, topology.queue_arguments(&queue))
                .await
                .map_err(|error| declaration_error(live, topology, &queue, &error))?;
            live.declarer
                .queue_bind(
                    ShortString::from(queue.as_str()),
                    ShortString::from(exchange),
                    ShortString::from(device.as_str()),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|error| classify(live, &error))?;
        }
        live.declared_devices.insert(device.clone());
        Ok(())
    }

    async fn declare_reports_on(&self, live: &mut Live) -> Result<(), BrokerError> {
        if live.reports_declared {
            return Ok(());
        }
        let topology = &self.inner.topology;
        let queue = topology.reports_queue();
        declare_queue(&live.declarer, &queue, topology.reports_queue_arguments())
            .await
            .map_err(|error| declaration_error(live, topology, &queue, &error))?;
        live.reports_declared = true;
        Ok(())
    }

    /// Drops the connection after a connection-level failure so that the next
    /// call opens a new one.
    async fn forget_if_broken<T>(
        &self,
        guard: &mut Option<Live>,
        result: Result<T, BrokerError>,
    ) -> Result<T, BrokerError> {
        if let Err(BrokerError::Unavailable(reason)) = &result {
            tracing::warn!(
                connection = %self.inner.connection_name,
                error = %reason,
                "AMQP connection lost; the next operation reconnects"
            );
            *guard = None;
        }
        result
    }
}

/// Writes `host:port`, with an IPv6 address in brackets, as in URLs.
fn socket_address_text(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

fn batch_stopped() -> BrokerError {
    BrokerError::Unavailable(
        "an earlier publish of this batch found the broker unavailable, so the rest of the batch waits for the next attempt"
            .into(),
    )
}

async fn open_channel(connection: &Connection) -> Result<Channel, BrokerError> {
    connection
        .create_channel()
        .await
        .map_err(|error| BrokerError::Unavailable(format!("cannot open a channel: {error}")))
}

async fn open_confirm_channel(connection: &Connection) -> Result<Channel, BrokerError> {
    let channel = open_channel(connection).await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|error| BrokerError::Unavailable(format!("cannot enable confirms: {error}")))?;
    Ok(channel)
}

async fn declare_queue(
    channel: &Channel,
    queue: &str,
    arguments: FieldTable,
) -> Result<(), lapin::Error> {
    channel
        .queue_declare(
            ShortString::from(queue),
            // Durable: the queue, and with persistent messages its content,
            // survive a broker restart.
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            arguments,
        )
        .await
        .map(|_| ())
}

async fn open_consumer(
    live: &mut Live,
    topology: &Topology,
    queue: &str,
    prefetch: u16,
) -> Result<AmqpConsumer, BrokerError> {
    let channel = live
        .connection
        .create_channel()
        .await
        .map_err(|error| classify(live, &error))?;
    declare_queue(&channel, queue, topology.queue_arguments(queue))
        .await
        .map_err(|error| declaration_error(live, topology, queue, &error))?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await
        .map_err(|error| classify(live, &error))?;
    let consumer = channel
        .basic_consume(
            ShortString::from(queue),
            ShortString::from(""),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|error| classify(live, &error))?;
    Ok(AmqpConsumer {
        _channel: channel,
        consumer,
    })
}

/// Classifies a failed queue declaration like [`classify`], and logs an
/// error that names the queue and the fix when the queue exists with
/// another queue type than `--queue-type` declares.
fn declaration_error(
    live: &Live,
    topology: &Topology,
    queue: &str,
    error: &lapin::Error,
) -> BrokerError {
    let Some(detail) = queue_type_conflict(error) else {
        return classify(live, error);
    };
    let declared = topology.queue_kind();
    let message = format!(
        "queue {queue} already exists with another queue type ({detail}); this process declares {} queues, \
         so start it with --queue-type {} to match the existing queues, or delete the queue, which drops its messages, \
         so that it is declared again",
        declared.as_str(),
        declared.other().as_str(),
    );
    tracing::error!(%queue, queue_type = declared.as_str(), error = %message, "queue declaration conflicts with --queue-type");
    BrokerError::Rejected(message)
}

/// Returns RabbitMQ's reason when `error` is a `PRECONDITION_FAILED` about
/// the `x-queue-type` argument, which RabbitMQ sends when a queue is
/// declared with another type than it has.
fn queue_type_conflict(error: &lapin::Error) -> Option<String> {
    let lapin::ErrorKind::ProtocolError(amqp_error) = error.kind() else {
        return None;
    };
    let precondition_failed =
        *amqp_error.kind() == AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED);
    let reason = amqp_error.get_message().as_str();
    (precondition_failed && reason.contains("'x-queue-type'")).then(|| reason.to_owned())
}

/// Tells a dead connection (retry later) from a refused operation.
fn classify(live: &Live, error: &lapin::Error) -> BrokerError {
    if live.connection.status().connected() {
        BrokerError::Rejected(error.to_string())
    } else {
        BrokerError::Unavailable(error.to_string())
    }
}

fn to_basic_properties(properties: &MessageProperties) -> BasicProperties {
    let mut basic = BasicProperties::default().with_delivery_mode(PERSISTENT);
    if let Some(value) = &properties.message_id {
        basic = basic.with_message_id(value.as_str().into());
    }
    if let Some(value) = &properties.correlation_id {
        basic = basic.with_correlation_id(value.as_str().into());
    }
    if let Some(value) = &properties.kind {
        basic = basic.with_type(value.as_str().into());
    }
    if let Some(value) = &properties.reply_to {
        basic = basic.with_reply_to(value.as_str().into());
    }
    if let Some(value) = properties.timestamp {
        basic = basic.with_timestamp(value);
    }
    if let Some(value) = &properties.content_type {
        basic = basic.with_content_type(value.as_str().into());
    }
    basic
}

fn from_basic_properties(basic: &BasicProperties) -> MessageProperties {
    let text = |value: &Option<ShortString>| value.as_ref().map(|v| v.as_str().to_owned());
    MessageProperties {
        message_id: text(basic.message_id()),
        correlation_id: text(basic.correlation_id()),
        kind: text(basic.kind()),
        reply_to: text(basic.reply_to()),
        timestamp: *basic.timestamp(),
        content_type: text(basic.content_type()),
    }
}

pub struct AmqpConsumer {
    /// Kept so the channel lives as long as the consumer.
    _channel: Channel,
    consumer: lapin::Consumer,
}

impl AmqpConsumer {
    pub async fn next(&mut self) -> Option<Result<Delivery, BrokerError>> {
        let delivery = match self.consumer.next().await? {
            Ok(delivery) => delivery,
            Err(error) => {
                return Some(Err(BrokerError::Unavailable(format!(
                    "consumer stopped: {error}"
                ))));
            }
        };
        Some(Ok(Delivery {
            properties: from_basic_properties(&delivery.properties),
            body: delivery.data,
            redelivered: delivery.redelivered,
            acker: Acker::Amqp(delivery.acker),
        }))
    }
}

pub(super) async fn ack(acker: &lapin::Acker) -> Result<(), BrokerError> {
    acker
        .ack(BasicAckOptions::default())
        .await
        .map(|_| ())
        .map_err(|error| BrokerError::Unavailable(format!("ack failed: {error}")))
}

pub(super) async fn reject(acker: &lapin::Acker) -> Result<(), BrokerError> {
    acker
        .nack(BasicNackOptions {
            requeue: false,
            ..BasicNackOptions::default()
        })
        .await
        .map(|_| ())
        .map_err(|error| BrokerError::Unavailable(format!("reject failed: {error}")))
}

pub(super) async fn requeue(acker: &lapin::Acker) -> Result<(), BrokerError> {
    acker
        .nack(BasicNackOptions {
            requeue: true,
            ..BasicNackOptions::default()
        })
        .await
        .map(|_| ())
        .map_err(|error| BrokerError::Unavailable(format!("requeue failed: {error}")))
}
