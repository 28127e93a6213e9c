//! Fault tests against real RabbitMQ: broker outages, killed processes,
//! poison messages, expiry and closed connections. Each test prints what it
//! counted. They stop and start the shared test broker, so they take turns.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use command_dispatcher::broker::{
    Broker, BrokerError, Destination, MessageProperties, OutgoingMessage, PublishBatch, QueueKind,
    Topology,
};
use command_dispatcher::domain::DeviceId;
use common::receiver::Receiver;
use common::recording::{
    assert_once_and_in_order, create, executions, postbacks_per_command, write_handlers,
};
use common::{BrokerKind, TestEnv, amqp_url, rabbitmqctl, wait_until};
use serde_json::{Value, json};
use tokio::sync::Mutex;

/// Fault tests stop the broker that every test of this file uses.
static TURN: Mutex<()> = Mutex::const_new(());

/// Stops the RabbitMQ application until dropped, so that a test that fails
/// during the outage still starts the broker again for the tests after it.
struct BrokerOutage;

impl BrokerOutage {
    fn begin() -> Self {
        rabbitmqctl(&["stop_app"]);
        Self
    }
}

impl Drop for BrokerOutage {
    fn drop(&mut self) {
        rabbitmqctl(&["start_app"]);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn broker_outage_loses_nothing() {
    let _turn = TURN.lock().await;
    let env = TestEnv::new(BrokerKind::Rabbit).await;
    let (handlers, log) = write_handlers(env.data_dir());
    let receiver = Receiver::start().await;
    let server = env.serve(&[]).await;
    let devices: Vec<String> = (0..10).map(|n| format!("outage-{n}")).collect();
    let mut agents = Vec::new();
    for device in &devices {
        agents.push(env.agent(device, Some(&handlers)).await);
    }

    let mut ids = Vec::new();
    let mut outage = None;
    for index in 0..200 {
        if index == 60 {
            outage = Some(BrokerOutage::begin());
        }
        if index == 140 {
            // The broker was down for the creates in between, for several seconds.
            tokio::time::sleep(Duration::from_secs(3)).await;
            outage = None;
        }
        let device = &devices[index % devices.len()];
        ids.push(create(&server, "record", device, index, Some(&receiver.url)).await);
    }
    assert!(outage.is_none());

    let mut statuses: BTreeMap<String, usize> = BTreeMap::new();
    for id in &ids {
        let done = server.wait_final(id, Duration::from_secs(90)).await;
        *statuses
            .entry(done["Status"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    let all_posted = wait_until(Duration::from_secs(30), || async {
        postbacks_per_command(&receiver).len() == ids.len()
    })
    .await;
    let postbacks = postbacks_per_command(&receiver);
    let executions = executions(&log);
    println!(
        "created {}, final statuses {statuses:?}, executions {}, commands posted back {}, postbacks {}",
        ids.len(),
        executions.len(),
        postbacks.len(),
        receiver.count()
    );
    assert_eq!(
        statuses.get("completed"),
        Some(&200),
        "final statuses: {statuses:?}"
    );
    assert_once_and_in_order(&executions, 200);
    assert!(
        all_posted,
        "commands posted back: {} of 200",
        postbacks.len()
    );
    assert!(
        postbacks.values().all(|count| *count == 1),
        "a command was posted back twice: {postbacks:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_server_loses_nothing() {
    let _turn = TURN.lock().await;
    let env = TestEnv::new(BrokerKind::Rabbit).await;
    let (handlers, log) = write_handlers(env.data_dir());
    let receiver = Receiver::start().await;
    let mut server = env.serve(&[]).await;
    let devices = ["killed-0", "killed-1", "killed-2"];
    let mut agents = Vec::new();
    for device in devices {
        agents.push(env.agent(device, Some(&handlers)).await);
    }

    let mut ids = Vec::new();
    for index in 0..60 {
        ids.push(
            create(
                &server,
                "record",
                devices[index % 3],
                index,
                Some(&receiver.url),
            )
            .await,
        );
    }
    server.process.kill().await;
    let server = env.serve(&[]).await;

    let mut statuses: BTreeMap<String, usize> = BTreeMap::new();
    for id in &ids {
        let done = server.wait_final(id, Duration::from_secs(60)).await;
        *statuses
            .entry(done["Status"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    let all_posted = wait_until(Duration::from_secs(30), || async {
        postbacks_per_command(&receiver).len() == ids.len()
    })
    .await;
    let executions = executions(&log);
    println!(
        "created {}, final statuses {statuses:?}, executions {}, postbacks {}",
        ids.len(),
        executions.len(),
        receiver.count()
    );
    assert_eq!(
        statuses.get("completed"),
        Some(&60),
        "final statuses: {statuses:?}"
    );
    assert_once_and_in_order(&executions, 60);
    assert!(
        all_posted,
        "commands posted back: {} of 60",
        postbacks_per_command(&receiver).len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_agent_ends_command_once() {
    let _turn = TURN.lock().await;
    let env = TestEnv::new(BrokerKind::Rabbit).await;
    let (handlers, log) = write_handlers(env.data_dir());
    let receiver = Receiver::start().await;
    let server = env.serve(&[]).await;
    let mut agent = env.agent("crashy", Some(&handlers)).await;

    let id = create(&server, "slow", "crashy", 0, Some(&receiver.url)).await;
    let executing = wait_until(Duration::from_secs(20), || async {
        server.get(&format!("/commands/{id}")).await.json()["Status"] == "executing"
    })
    .await;
    assert!(executing, "command never reached executing");
    agent.kill().await;
    let _agent = env.agent("crashy", Some(&handlers)).await;

    let done = server.wait_final(&id, Duration::from_secs(30)).await;
    let posted = wait_until(Duration::from_secs(20), || async { receiver.count() >= 1 }).await;
    // Long enough for a duplicate postback or a second run to show up.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let executions = executions(&log);
    println!(
        "final status {}, error {}, executions {}, postbacks {}",
        done["Status"],
        done["Error"],
        executions.len(),
        receiver.count()
    );
    assert_eq!(done["Status"], "executionFailed");
    assert!(
        done["Error"]
            .as_str()
            .unwrap_or_default()
            .contains("agent stopped"),
        "{done}"
    );
    assert_eq!(executions.len(), 1, "the handler ran again after the crash");
    assert!(posted);
    assert_eq!(receiver.count(), 1, "postbacks sent");
    assert_eq!(receiver.received()[0].json()["Status"], "executionFailed");
}

#[tokio::test(flavor = "multi_thread")]
async fn poison_message_does_not_block_device() {
    let _turn = TURN.lock().await;
    let env = TestEnv::new(BrokerKind::Rabbit).await;
    let (handlers, log) = write_handlers(env.data_dir());
    let server = env.serve(&[]).await;
    let mut agent = env.agent("poisoned", Some(&handlers)).await;

    let topology = Topology::new(&env.prefix, QueueKind::Classic).unwrap();
    let broker =
        Broker::new(Some(&amqp_url()), topology, "fault test").expect("the test AMQP URL is valid");
    for body in [
        &b"not json at all"[..],
        br#"{"id":"not-a-uuid"}"#,
        b"\xff\xfe",
    ] {
        let poison = OutgoingMessage {
            destination: Destination::Device(DeviceId::parse("poisoned").unwrap()),
            properties: MessageProperties {
                kind: Some("command".into()),
                ..MessageProperties::default()
            },
            body: body.to_vec(),
        };
        broker
            .publish(&poison)
            .await
            .expect("publish a poison message");
    }

    let id = create(&server, "record", "poisoned", 1, None).await;
    let done = server.wait_final(&id, Duration::from_secs(20)).await;
    assert_eq!(done["Status"], "completed", "{done}");

    let pid = agent.child.id().unwrap();
    let before = cpu_ticks(pid);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = cpu_ticks(pid);
    let queue = format!("{}.device.poisoned", env.prefix);
    let depth = rabbitmqctl(&["list_queues", "name", "messages"])
        .lines()
        .find(|line| line.starts_with(&format!("{queue}\t")))
        .map(str::to_owned)
        .unwrap_or_default();
    println!(
        "agent CPU ticks while idle: {}, queue: {depth:?}, executions {}",
        after - before,
        executions(&log).len()
    );
    assert!(
        after - before < 20,
        "agent used {} CPU ticks in 2 s of idle",
        after - before
    );
    assert_eq!(
        depth,
        format!("{queue}\t0"),
        "poison messages left on the queue"
    );
    assert_eq!(executions(&log).len(), 1);
    agent.terminate().await;
    broker.close().await;
}

/// User plus system CPU time of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("process is alive");
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn command_expires_while_device_offline() {
    let _turn = TURN.lock().await;
    let env = TestEnv::new(BrokerKind::Rabbit).await;
    let (handlers, log) = write_handlers(env.data_dir());
    let receiver = Receiver::start().await;
    let server = env.serve(&[]).await;

    let expiry = (chrono::Utc::now() + chrono::Duration::seconds(2)).to_rfc3339();
    let body = json!({
        "Type": "AppService",
        "AppServiceName": "record",
        "Payload": { "device": "offline", "index": 0 },
        "PostBackUri": receiver.url,
        "ExpirationDateTime": expiry,
    });
    let created = server
        .post("/devices/offline/commands", &body.to_string())
        .await;
    assert_eq!(created.status, 201, "{}", created.text);
    let expired_id = created.json()["id"].as_str().unwrap().to_owned();

    let done = server
        .wait_final(&expired_id, Duration::from_secs(15))
        .await;
    assert_eq!(done["Status"], "expired", "{done}");

    let _agent = env.agent("offline", Some(&handlers)).await;
    let later = create(&server, "record", "offline", 1, Some(&receiver.url)).await;
    let completed = server.wait_final(&later, Duration::from_secs(20)).await;
    assert_eq!(completed["Status"], "completed");

    let executions = executions(&log);
    println!("executions after the agent came back: {executions:?}");
    assert_eq!(executions.len(), 1, "only the unexpired command ran");
    assert_eq!(executions[0]["index"], 1);
    let posted = wait_until(Duration::from_secs(10), || async { receiver.count() == 2 }).await;
    assert!(posted, "postbacks: {}", receiver.count());
    let statuses: Vec<Value> = receiver
        .received()
        .iter()
        .map(|r| r.json()["Status"].clone())
        .collect();
    assert!(statuses.contains(&json!("expired")), "{statuses:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn closed_connection_is_reopened() {
    let _turn = TURN.lock().await;
    let env = TestEnv::new(BrokerKind::Rabbit).await;
    let (handlers, _log) = write_handlers(env.data_dir());
    let server = env.serve(&[]).await;
    let _agent = env.agent("reconnect", Some(&handlers)).await;

    let first = create(&server, "record", "reconnect", 0, None).await;
    assert_eq!(
        server.wait_final(&first, Duration::from_secs(20)).await["Status"],
        "completed"
    );

    let name = format!("dispatcher serve ({})", env.prefix);
    let connections = rabbitmqctl(&["list_connections", "pid", "client_properties"]);
    let pids: Vec<String> = connections
        .lines()
        .filter(|line| line.contains(&name))
        .map(|line| line.split('\t').next().unwrap().to_owned())
        .collect();
    assert!(
        !pids.is_empty(),
        "no connection named {name:?} in {connections}"
    );
    for pid in &pids {
        rabbitmqctl(&[
            "close_connection",
            pid,
            "fault test closes the worker connection",
        ]);
    }

    let second = create(&server, "record", "reconnect", 1, None).await;
    let done = server.wait_final(&second, Duration::from_secs(30)).await;
    println!(
        "closed {} server connection(s); the next command ended {}",
        pids.len(),
        done["Status"]
    );
    assert_eq!(done["Status"], "completed");
    let ready = server.get("/health/ready").await;
    assert_eq!(ready.status, 200, "{}", ready.text);
}

#[tokio::test(flavor = "multi_thread")]
async fn conflicting_queue_fails_one_device_only() {
    let _turn = TURN.lock().await;
    let env = TestEnv::new(BrokerKind::Rabbit).await;
    let (handlers, log) = write_handlers(env.data_dir());
    let receiver = Receiver::start().await;
    let server = env.serve(&[]).await;
    let _agent = env.agent("healthy", Some(&handlers)).await;

    // Someone else declared the device's queue with other arguments, so
    // every declaration of ours is refused with PRECONDITION_FAILED.
    let connection =
        lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
            .await
            .expect("connect to RabbitMQ");
    let channel = connection.create_channel().await.unwrap();
    channel
        .queue_declare(
            format!("{}.device.conflict", env.prefix).into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("declare the conflicting queue");

    let doomed = create(&server, "record", "conflict", 0, Some(&receiver.url)).await;
    let mut healthy = Vec::new();
    for index in 0..10 {
        healthy.push(create(&server, "record", "healthy", index, Some(&receiver.url)).await);
    }
    for id in &healthy {
        assert_eq!(
            server.wait_final(id, Duration::from_secs(20)).await["Status"],
            "completed"
        );
    }
    let failed = server.wait_final(&doomed, Duration::from_secs(60)).await;
    println!(
        "conflicting device ended {} with error {}; {} healthy commands completed",
        failed["Status"],
        failed["Error"],
        healthy.len()
    );
    assert_eq!(failed["Status"], "failedToSend");
    assert!(
        failed["Error"]
            .as_str()
            .unwrap_or_default()
            .contains("PRECONDITION_FAILED"),
        "{failed}"
    );
    assert_once_and_in_order(&executions(&log), 10);
    let _ = connection.close(200, "test done".into()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn stopped_agent_finishes_its_command() {
    let _turn = TURN.lock().await;
    let env = TestEnv::new(BrokerKind::Rabbit).await;
    let (handlers, log) = write_handlers(env.data_dir());
    let server = env.serve(&[]).await;
    let mut agent = env.agent("graceful", Some(&handlers)).await;

    let running = create(&server, "slow", "graceful", 0, None).await;
    let waiting = create(&server, "record", "graceful", 1, None).await;
    let executing = wait_until(Duration::from_secs(20), || async {
        server.get(&format!("/commands/{running}")).await.json()["Status"] == "executing"
    })
    .await;
    assert!(executing, "the slow command never started");
    let status = agent.terminate().await;

    // The agent sent the final report before it exited; the server applies
    // it a moment later.
    let done = server.wait_final(&running, Duration::from_secs(10)).await;
    let queued = server.get(&format!("/commands/{waiting}")).await.json();
    println!(
        "agent exited with {status}; running command {}, next command {}",
        done["Status"], queued["Status"]
    );
    assert!(status.success(), "agent exit status {status}");
    assert_eq!(
        done["Status"], "completed",
        "the running command was finished before the exit"
    );
    assert_eq!(
        queued["Status"], "queued",
        "no new command was taken after SIGTERM"
    );

    let _agent = env.agent("graceful", Some(&handlers)).await;
    assert_eq!(
        server.wait_final(&waiting, Duration::from_secs(20)).await["Status"],
        "completed"
    );
    assert_once_and_in_order(&executions(&log), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn stopped_server_exits_cleanly_and_resumes() {
    let _turn = TURN.lock().await;
    let env = TestEnv::new(BrokerKind::Rabbit).await;
    let (handlers, log) = write_handlers(env.data_dir());
    let mut server = env.serve(&[]).await;
    let _agent = env.agent("resume", Some(&handlers)).await;
    let mut ids = Vec::new();
    for index in 0..20 {
        ids.push(create(&server, "record", "resume", index, None).await);
    }
    let started = std::time::Instant::now();
    let status = server.process.terminate().await;
    println!(
        "serve exited with {status} {:?} after SIGTERM",
        started.elapsed()
    );
    assert!(status.success(), "serve exit status {status}");

    let server = env.serve(&[]).await;
    for id in &ids {
        assert_eq!(
            server.wait_final(id, Duration::from_secs(30)).await["Status"],
            "completed"
        );
    }
    assert_once_and_in_order(&executions(&log), 20);
}

#[tokio::test(flavor = "multi_thread")]
async fn batch_stops_at_lost_connection() {
    let _turn = TURN.lock().await;
    let prefix = format!("f{}", uuid::Uuid::new_v4().simple());
    let name = format!("batch test ({prefix})");
    let topology = Topology::new(&prefix, QueueKind::Classic).unwrap();
    let broker =
        Broker::new(Some(&amqp_url()), topology, &name).expect("the test AMQP URL is valid");
    let kiosk = DeviceId::parse("kiosk").unwrap();
    let message = |body: &str| OutgoingMessage {
        destination: Destination::Device(kiosk.clone()),
        properties: MessageProperties::default(),
        body: body.as_bytes().to_vec(),
    };

    let batch = PublishBatch::default();
    broker.publish_in(&message("1"), &batch).await.unwrap();
    let connections = rabbitmqctl(&["list_connections", "pid", "client_properties"]);
    let pid = connections
        .lines()
        .find(|line| line.contains(&name))
        .and_then(|line| line.split('\t').next())
        .unwrap_or_else(|| panic!("no connection named {name:?} in {connections}"));
    rabbitmqctl(&[
        "close_connection",
        pid,
        "fault test closes the batch connection",
    ]);

    // The next publish of the batch would open a new connection; the batch
    // refuses it, so the message cannot get ahead of any lost one.
    let second = broker.publish_in(&message("2"), &batch).await;
    assert!(
        matches!(second, Err(BrokerError::Unavailable(_))),
        "a publish after the batch's connection was lost returned {second:?}"
    );
    broker
        .publish_in(&message("2"), &PublishBatch::default())
        .await
        .expect("a new batch publishes on a new connection");

    let queue = broker.topology().device_queue(&kiosk);
    let mut bodies = Vec::new();
    while let Some(delivery) = broker.get(&queue).await.unwrap() {
        bodies.push(String::from_utf8(delivery.body.clone()).unwrap());
        delivery.ack().await.unwrap();
    }
    println!("after the lost connection the queue held {bodies:?}");
    assert_eq!(bodies, ["1", "2"]);
    broker.close().await;
}
