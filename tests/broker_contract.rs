//! The broker contract the service relies on, checked against RabbitMQ and
//! the in-process broker alike: routing, FIFO order, acks, redelivery of
//! unacked messages, a single active consumer, and `get`.

mod common;

use std::time::Duration;

use command_dispatcher::broker::{
    Broker, BrokerError, Delivery, Destination, MessageProperties, OutgoingMessage, PublishBatch,
    QueueKind, Topology,
};
use command_dispatcher::domain::DeviceId;
use common::{BrokerKind, amqp_url};

fn broker(kind: BrokerKind, queue_kind: QueueKind) -> Broker {
    let prefix = format!("c{}", uuid::Uuid::new_v4().simple());
    let topology = Topology::new(&prefix, queue_kind).unwrap();
    match kind {
        BrokerKind::Memory => Broker::new(None, topology, "contract test").unwrap(),
        BrokerKind::Rabbit => Broker::new(Some(&amqp_url()), topology, "contract test")
            .expect("the test AMQP URL is valid"),
    }
}

fn device(name: &str) -> DeviceId {
    DeviceId::parse(name).unwrap()
}

fn message(destination: Destination, body: &str) -> OutgoingMessage {
    OutgoingMessage {
        destination,
        properties: MessageProperties {
            message_id: Some(body.to_owned()),
            kind: Some("command".into()),
            content_type: Some("application/json".into()),
            timestamp: Some(1_700_000_000),
            ..MessageProperties::default()
        },
        body: body.as_bytes().to_vec(),
    }
}

async fn next(consumer: &mut command_dispatcher::broker::Consumer) -> Delivery {
    tokio::time::timeout(Duration::from_secs(5), consumer.next())
        .await
        .expect("a delivery within 5 s")
        .expect("consumer is open")
        .expect("delivery is ok")
}

fn text(delivery: &Delivery) -> String {
    String::from_utf8(delivery.body.clone()).unwrap()
}

async fn device_queue_is_fifo_with_properties(kind: BrokerKind, queue_kind: QueueKind) {
    let broker = broker(kind, queue_kind);
    let kiosk = device("kiosk");
    for body in ["1", "2", "3"] {
        broker
            .publish(&message(Destination::Device(kiosk.clone()), body))
            .await
            .unwrap();
    }
    let mut consumer = broker
        .consume(&broker.topology().device_queue(&kiosk), 10)
        .await
        .unwrap();
    let mut seen = Vec::new();
    for _ in 0..3 {
        let delivery = next(&mut consumer).await;
        assert_eq!(
            delivery.properties.message_id.as_deref(),
            Some(text(&delivery).as_str())
        );
        assert_eq!(delivery.properties.kind.as_deref(), Some("command"));
        assert_eq!(delivery.properties.timestamp, Some(1_700_000_000));
        assert!(!delivery.redelivered);
        seen.push(text(&delivery));
        delivery.ack().await.unwrap();
    }
    assert_eq!(seen, ["1", "2", "3"]);
    broker.close().await;
}

async fn unacked_messages_come_back_in_order(kind: BrokerKind, queue_kind: QueueKind) {
    let broker = broker(kind, queue_kind);
    let kiosk = device("kiosk");
    let queue = broker.topology().device_queue(&kiosk);
    for body in ["a", "b", "c"] {
        broker
            .publish(&message(Destination::Device(kiosk.clone()), body))
            .await
            .unwrap();
    }

    {
        let mut consumer = broker.consume(&queue, 2).await.unwrap();
        let first = next(&mut consumer).await;
        let second = next(&mut consumer).await;
        assert_eq!((text(&first), text(&second)), ("a".into(), "b".into()));
        first.ack().await.unwrap();
        // The consumer goes away with "b" unacked, and "c" too if it came.
    }

    let mut consumer = broker.consume(&queue, 2).await.unwrap();
    let mut returned = Vec::new();
    for _ in 0..2 {
        let delivery = next(&mut consumer).await;
        returned.push(text(&delivery));
        if text(&delivery) == "b" {
            assert!(
                delivery.redelivered,
                "a message delivered before is marked redelivered"
            );
        }
        delivery.ack().await.unwrap();
    }
    // NOTE: a RabbitMQ 3.10 quorum queue with a single active consumer
    // sometimes delivers a waiting message before one returned by the
    // consumer that went away, even with a prefetch of 1, so only the
    // classic queue promises the order here.
    match queue_kind {
        QueueKind::Classic => assert_eq!(returned, ["b", "c"]),
        QueueKind::Quorum => {
            returned.sort();
            assert_eq!(returned, ["b", "c"]);
        }
    }
    broker.close().await;
}

async fn prefetch_limits_unacked_deliveries(kind: BrokerKind, queue_kind: QueueKind) {
    let broker = broker(kind, queue_kind);
    let kiosk = device("kiosk");
    for body in ["x", "y"] {
        broker
            .publish(&message(Destination::Device(kiosk.clone()), body))
            .await
            .unwrap();
    }
    let mut consumer = broker
        .consume(&broker.topology().device_queue(&kiosk), 1)
        .await
        .unwrap();
    let first = next(&mut consumer).await;
    let blocked = tokio::time::timeout(Duration::from_millis(300), consumer.next()).await;
    assert!(
        blocked.is_err(),
        "a second delivery arrived while the first was unacked"
    );
    first.ack().await.unwrap();
    assert_eq!(text(&next(&mut consumer).await), "y");
    broker.close().await;
}

async fn requeue_puts_message_back_and_reject_drops_it(kind: BrokerKind, queue_kind: QueueKind) {
    let broker = broker(kind, queue_kind);
    let kiosk = device("kiosk");
    let queue = broker.topology().device_queue(&kiosk);
    for body in ["poison", "next"] {
        broker
            .publish(&message(Destination::Device(kiosk.clone()), body))
            .await
            .unwrap();
    }

    let mut consumer = broker.consume(&queue, 1).await.unwrap();
    let first = next(&mut consumer).await;
    assert_eq!(text(&first), "poison");
    first.requeue().await.unwrap();

    // A quorum queue (RabbitMQ 3.10) puts a requeued message behind the
    // waiting ones, but a classic queue and the in-process broker put it
    // first.
    if queue_kind == QueueKind::Quorum {
        let waiting = next(&mut consumer).await;
        assert_eq!(text(&waiting), "next");
        waiting.ack().await.unwrap();
    }

    let again = next(&mut consumer).await;
    assert_eq!(text(&again), "poison");
    assert!(again.redelivered);
    again.reject().await.unwrap();
    if queue_kind == QueueKind::Classic {
        let following = next(&mut consumer).await;
        assert_eq!(text(&following), "next");
        following.ack().await.unwrap();
    }
    let nothing = tokio::time::timeout(Duration::from_millis(500), consumer.next()).await;
    assert!(nothing.is_err(), "a rejected message must not come back");
    broker.close().await;
}

async fn only_one_consumer_per_device_is_active(kind: BrokerKind, queue_kind: QueueKind) {
    let broker = broker(kind, queue_kind);
    let kiosk = device("kiosk");
    let queue = broker.topology().device_queue(&kiosk);
    broker.declare_device(&kiosk).await.unwrap();
    let mut active = broker.consume(&queue, 10).await.unwrap();
    let mut standby = broker.consume(&queue, 10).await.unwrap();
    broker
        .publish(&message(Destination::Device(kiosk.clone()), "only"))
        .await
        .unwrap();
    let delivery = next(&mut active).await;
    assert_eq!(text(&delivery), "only");
    let idle = tokio::time::timeout(Duration::from_millis(300), standby.next()).await;
    assert!(
        idle.is_err(),
        "the second consumer received a message while the first was active"
    );
    delivery.ack().await.unwrap();
    broker.close().await;
}

async fn devices_do_not_share_messages(kind: BrokerKind, queue_kind: QueueKind) {
    let broker = broker(kind, queue_kind);
    let (left, right) = (device("left"), device("right"));
    broker
        .publish(&message(Destination::Device(left.clone()), "for-left"))
        .await
        .unwrap();
    broker
        .publish(&message(Destination::Device(right.clone()), "for-right"))
        .await
        .unwrap();
    let mut consumer = broker
        .consume(&broker.topology().device_queue(&right), 10)
        .await
        .unwrap();
    let delivery = next(&mut consumer).await;
    assert_eq!(text(&delivery), "for-right");
    delivery.ack().await.unwrap();
    let nothing = tokio::time::timeout(Duration::from_millis(300), consumer.next()).await;
    assert!(
        nothing.is_err(),
        "the right device received the left device's message"
    );
    broker.close().await;
}

async fn control_queue_is_read_with_get(kind: BrokerKind, queue_kind: QueueKind) {
    let broker = broker(kind, queue_kind);
    let kiosk = device("kiosk");
    let control = broker.topology().control_queue(&kiosk);
    broker
        .publish(&message(Destination::Device(kiosk.clone()), "command"))
        .await
        .unwrap();
    broker
        .publish(&message(Destination::Control(kiosk.clone()), "cancel"))
        .await
        .unwrap();
    let notice = broker
        .get(&control)
        .await
        .unwrap()
        .expect("the notice waits on the control queue");
    assert_eq!(text(&notice), "cancel");
    notice.ack().await.unwrap();
    assert!(
        broker.get(&control).await.unwrap().is_none(),
        "the control queue is empty after the ack"
    );
    broker.close().await;
}

async fn message_to_missing_queue_is_unroutable(kind: BrokerKind, queue_kind: QueueKind) {
    let broker = broker(kind, queue_kind);
    let missing = format!("{}.no-such-queue", broker.topology().reports_queue());
    let result = broker
        .publish(&message(Destination::Queue(missing), "lost"))
        .await;
    assert!(
        matches!(result, Err(BrokerError::Unroutable(_))),
        "got {result:?}"
    );
    broker.close().await;
}

async fn batches_hold_waiting_deliveries_in_order(kind: BrokerKind, queue_kind: QueueKind) {
    let broker = broker(kind, queue_kind);
    broker.declare_reports().await.unwrap();
    let queue = broker.topology().reports_queue();
    let bodies: Vec<String> = (1..=7).map(|n| n.to_string()).collect();
    for body in &bodies {
        broker
            .publish(&message(Destination::Queue(queue.clone()), body))
            .await
            .unwrap();
    }
    let shutdown = tokio_util::sync::CancellationToken::new();
    let mut batches: Vec<Vec<String>> = Vec::new();
    let consumed = broker.consume_batches_until(&queue, 10, 3, &shutdown, |batch| {
        let first = batches.is_empty();
        batches.push(batch.iter().map(text).collect());
        if batches.iter().map(Vec::len).sum::<usize>() == bodies.len() {
            shutdown.cancel();
        }
        async move {
            if first {
                // Lets every other delivery reach the consumer, so the next
                // batch is full.
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            for delivery in batch {
                delivery.ack().await.unwrap();
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), consumed)
        .await
        .expect("every delivery within 10 s");
    assert_eq!(batches.concat(), bodies, "batches {batches:?}");
    assert!(
        batches.iter().all(|batch| (1..=3).contains(&batch.len())),
        "{batches:?}"
    );
    assert_eq!(
        batches[1].len(),
        3.min(bodies.len() - batches[0].len()),
        "{batches:?}"
    );
    broker.close().await;
}

macro_rules! contract {
    ($module:ident, $kind:expr, $queue_kind:expr) => {
        mod $module {
            use super::*;

            #[tokio::test]
            async fn device_queue_is_fifo() {
                device_queue_is_fifo_with_properties($kind, $queue_kind).await;
            }

            #[tokio::test]
            async fn unacked_messages_return() {
                unacked_messages_come_back_in_order($kind, $queue_kind).await;
            }

            #[tokio::test]
            async fn prefetch_is_respected() {
                prefetch_limits_unacked_deliveries($kind, $queue_kind).await;
            }

            #[tokio::test]
            async fn requeue_and_reject() {
                requeue_puts_message_back_and_reject_drops_it($kind, $queue_kind).await;
            }

            #[tokio::test]
            async fn single_active_consumer() {
                only_one_consumer_per_device_is_active($kind, $queue_kind).await;
            }

            #[tokio::test]
            async fn devices_are_isolated() {
                devices_do_not_share_messages($kind, $queue_kind).await;
            }

            #[tokio::test]
            async fn control_queue_get() {
                control_queue_is_read_with_get($kind, $queue_kind).await;
            }

            #[tokio::test]
            async fn batches_in_order() {
                batches_hold_waiting_deliveries_in_order($kind, $queue_kind).await;
            }

            #[tokio::test]
            async fn unroutable_is_reported() {
                message_to_missing_queue_is_unroutable($kind, $queue_kind).await;
            }
        }
    };
}

contract!(in_process, BrokerKind::Memory, QueueKind::Classic);
contract!(rabbitmq, BrokerKind::Rabbit, QueueKind::Classic);
// Quorum queues work on a single node too; a cluster only adds replicas.
contract!(rabbitmq_quorum, BrokerKind::Rabbit, QueueKind::Quorum);

#[tokio::test]
async fn next_cluster_node_is_tried_after_a_failure() {
    let prefix = format!("c{}", uuid::Uuid::new_v4().simple());
    let topology = Topology::new(&prefix, QueueKind::Classic).unwrap();
    // Nothing listens on port 1 of the loopback address: the first node is down.
    let nodes = format!("amqp://guest:guest@127.0.0.1:1/%2f, {}", amqp_url());
    let broker =
        Broker::new(Some(&nodes), topology, "contract test").expect("the node URLs are valid");
    let kiosk = device("kiosk");

    let first = broker
        .publish(&message(Destination::Device(kiosk.clone()), "1"))
        .await;
    assert!(
        matches!(first, Err(BrokerError::Unavailable(_))),
        "got {first:?}"
    );
    broker
        .publish(&message(Destination::Device(kiosk.clone()), "2"))
        .await
        .expect("the second attempt goes to the live node");
    let mut consumer = broker
        .consume(&broker.topology().device_queue(&kiosk), 1)
        .await
        .unwrap();
    assert_eq!(text(&next(&mut consumer).await), "2");
    broker.close().await;
}

#[tokio::test]
async fn batch_stops_at_first_unavailable() {
    let prefix = format!("c{}", uuid::Uuid::new_v4().simple());
    let topology = Topology::new(&prefix, QueueKind::Classic).unwrap();
    // Nothing listens on port 1 of the loopback address: the first node is down.
    let nodes = format!("amqp://guest:guest@127.0.0.1:1/%2f, {}", amqp_url());
    let broker =
        Broker::new(Some(&nodes), topology, "contract test").expect("the node URLs are valid");
    let kiosk = device("kiosk");

    let batch = PublishBatch::default();
    let first = broker
        .publish_in(&message(Destination::Device(kiosk.clone()), "1"), &batch)
        .await;
    assert!(
        matches!(first, Err(BrokerError::Unavailable(_))),
        "got {first:?}"
    );
    // The live node would take "2", but then "2" would be queued ahead of
    // "1", which the caller sends again later.
    let second = broker
        .publish_in(&message(Destination::Device(kiosk.clone()), "2"), &batch)
        .await;
    assert!(
        matches!(second, Err(BrokerError::Unavailable(_))),
        "a publish after the batch's first failure returned {second:?}"
    );

    let retry = PublishBatch::default();
    for body in ["1", "2"] {
        broker
            .publish_in(&message(Destination::Device(kiosk.clone()), body), &retry)
            .await
            .expect("a new batch connects to the live node");
    }
    let mut consumer = broker
        .consume(&broker.topology().device_queue(&kiosk), 2)
        .await
        .unwrap();
    assert_eq!(text(&next(&mut consumer).await), "1");
    assert_eq!(text(&next(&mut consumer).await), "2");
    broker.close().await;
}

#[test]
fn invalid_amqp_url_is_reported_without_the_password() {
    let topology = Topology::new("contract", QueueKind::Classic).unwrap();
    let error = Broker::new(
        Some("amqp://user:secret-password@127.0.0.1:notaport/%2f"),
        topology,
        "contract test",
    )
    .unwrap_err();
    assert!(error.contains("invalid port number"), "{error}");
    assert!(!error.contains("secret-password"), "{error}");
}

#[tokio::test]
async fn queue_type_conflict_names_queue_and_fix() {
    let orders = [
        (QueueKind::Classic, QueueKind::Quorum),
        (QueueKind::Quorum, QueueKind::Classic),
    ];
    for (existing, declared) in orders {
        let prefix = format!("c{}", uuid::Uuid::new_v4().simple());
        let rabbit_broker = |queue_kind| {
            let topology = Topology::new(&prefix, queue_kind).unwrap();
            Broker::new(Some(&amqp_url()), topology, "contract test")
                .expect("the test AMQP URL is valid")
        };
        let kiosk = device("kiosk");
        let first = rabbit_broker(existing);
        first.declare_device(&kiosk).await.unwrap();
        first.declare_reports().await.unwrap();
        first.close().await;

        let second = rabbit_broker(declared);
        let queues = [
            second.topology().device_queue(&kiosk),
            second.topology().reports_queue(),
        ];
        let errors = [
            second.declare_device(&kiosk).await.unwrap_err(),
            second.declare_reports().await.unwrap_err(),
        ];
        for (queue, error) in queues.iter().zip(errors) {
            let case = format!("{queue} declared {declared:?} over {existing:?}");
            assert!(
                matches!(error, BrokerError::Rejected(_)),
                "{case}: {error:?}"
            );
            let message = error.to_string();
            assert!(
                message.contains(&format!("queue {queue} ")),
                "{case}: {message}"
            );
            let flag = format!("--queue-type {}", existing.as_str());
            assert!(message.contains(&flag), "{case}: {message}");
            assert!(message.contains("delete the queue"), "{case}: {message}");
        }
        second.close().await;
    }
}
