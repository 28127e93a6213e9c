//! Two `dispatcher serve` processes on one PostgreSQL database and one
//! RabbitMQ: they share the work, publish each command once, keep each
//! device's order, and one carries on when the other is killed.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::receiver::Receiver;
use common::recording::{
    assert_once_and_in_order, create, executions, postbacks_per_command, write_handlers,
};
use common::{BrokerKind, Process, Server, TestEnv, wait_until};

const DEVICES: usize = 20;
const PER_DEVICE: usize = 25;

struct Cluster {
    env: TestEnv,
    servers: [Server; 2],
    _agents: Vec<Process>,
    log: std::path::PathBuf,
    receiver: Receiver,
}

async fn start_cluster() -> Cluster {
    let env = TestEnv::with_store(BrokerKind::Rabbit, true).await;
    let (handlers, log) = write_handlers(env.data_dir());
    let receiver = Receiver::start().await;
    let servers = [env.serve(&[]).await, env.serve(&[]).await];
    let mut agents = Vec::new();
    for device in 0..DEVICES {
        agents.push(env.agent(&format!("scale-{device}"), Some(&handlers)).await);
    }
    Cluster {
        env,
        servers,
        _agents: agents,
        log,
        receiver,
    }
}

/// Creates `PER_DEVICE` commands for every device, numbered from `first`,
/// one device per task, each command through the server `pick(device,
/// index)` names, in order per device, and returns the ids.
async fn create_all(
    cluster: &Cluster,
    first: usize,
    pick: impl Fn(usize, usize) -> usize + Send + Sync + 'static,
) -> Vec<String> {
    let pick = Arc::new(pick);
    let mut tasks = Vec::new();
    for device in 0..DEVICES {
        let servers = [
            cluster.servers[0].client.clone(),
            cluster.servers[1].client.clone(),
        ];
        let url = cluster.receiver.url.clone();
        let pick = pick.clone();
        tasks.push(tokio::spawn(async move {
            let name = format!("scale-{device}");
            let mut ids = Vec::new();
            for index in first..first + PER_DEVICE {
                let server = &servers[pick(device, index)];
                ids.push(create(server, "record", &name, index, Some(&url)).await);
            }
            ids
        }));
    }
    let mut ids = Vec::new();
    for task in tasks {
        ids.extend(task.await.expect("create task"));
    }
    ids
}

async fn final_statuses(server: &Server, ids: &[String]) -> BTreeMap<String, usize> {
    let mut statuses = BTreeMap::new();
    for id in ids {
        let done = server.wait_final(id, Duration::from_secs(120)).await;
        *statuses
            .entry(done["Status"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    statuses
}

#[tokio::test(flavor = "multi_thread")]
async fn two_servers_share_the_work() {
    let cluster = start_cluster().await;
    let ids = create_all(&cluster, 0, |device, index| (device + index) % 2).await;

    let statuses = final_statuses(&cluster.servers[1], &ids).await;
    let posted = wait_until(Duration::from_secs(30), || async {
        postbacks_per_command(&cluster.receiver).len() == ids.len()
    })
    .await;
    let postbacks = postbacks_per_command(&cluster.receiver);
    let executions = executions(&cluster.log);
    println!(
        "created {} through two servers, final statuses {statuses:?}, executions {}, commands posted back {}, postbacks {}",
        ids.len(),
        executions.len(),
        postbacks.len(),
        cluster.receiver.count()
    );
    assert_eq!(
        statuses.get("completed"),
        Some(&(DEVICES * PER_DEVICE)),
        "{statuses:?}"
    );
    assert_once_and_in_order(&executions, DEVICES * PER_DEVICE);
    assert!(
        posted,
        "commands posted back: {} of {}",
        postbacks.len(),
        ids.len()
    );
    assert!(
        postbacks.values().all(|count| *count == 1),
        "a command was posted back twice"
    );
    let _ = &cluster.env;
}

#[tokio::test(flavor = "multi_thread")]
async fn survivor_finishes_when_one_server_is_killed() {
    let mut cluster = start_cluster().await;
    let first_half = create_all(&cluster, 0, |device, index| (device + index) % 2).await;
    cluster.servers[0].process.kill().await;
    let second_half = create_all(&cluster, PER_DEVICE, |_, _| 1).await;
    let ids: Vec<String> = first_half.into_iter().chain(second_half).collect();

    let statuses = final_statuses(&cluster.servers[1], &ids).await;
    let posted = wait_until(Duration::from_secs(60), || async {
        postbacks_per_command(&cluster.receiver).len() == ids.len()
    })
    .await;
    let executions = executions(&cluster.log);
    println!(
        "created {}, one server killed mid-run, final statuses {statuses:?}, executions {}, postbacks {}",
        ids.len(),
        executions.len(),
        cluster.receiver.count()
    );
    assert_eq!(statuses.get("completed"), Some(&ids.len()), "{statuses:?}");
    assert_once_and_in_order(&executions, ids.len());
    assert!(
        posted,
        "commands posted back: {} of {}",
        postbacks_per_command(&cluster.receiver).len(),
        ids.len()
    );
    let _ = &cluster.env;
}

#[tokio::test(flavor = "multi_thread")]
async fn quorum_queues_keep_the_contract() {
    let mut env = TestEnv::with_store(BrokerKind::Rabbit, true).await;
    env.queue_type = Some("quorum");
    let (handlers, log) = write_handlers(env.data_dir());
    let receiver = Receiver::start().await;
    let server = env.serve(&[]).await;
    let _agent = env.agent("quorum-0", Some(&handlers)).await;

    let mut ids = Vec::new();
    for index in 0..20 {
        ids.push(create(&server, "record", "quorum-0", index, Some(&receiver.url)).await);
    }
    let statuses = final_statuses(&server, &ids).await;
    let queues = common::rabbitmqctl(&["list_queues", "name", "type"]);
    let device_queue = format!("{}.device.quorum-0", env.prefix);
    println!(
        "final statuses {statuses:?}, executions {}",
        executions(&log).len()
    );
    assert_eq!(statuses.get("completed"), Some(&20), "{statuses:?}");
    assert_once_and_in_order(&executions(&log), 20);
    assert!(
        queues
            .lines()
            .any(|line| line == format!("{device_queue}\tquorum")),
        "device queue is not a quorum queue: {queues}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn exhausted_pool_answers_503() {
    let mut env = TestEnv::with_store(BrokerKind::Memory, true).await;
    env.extra_serve_args = [
        "--database-max-connections",
        "1",
        "--database-acquire-timeout",
        "1ms",
    ]
    .map(String::from)
    .to_vec();
    let server = env.serve(&["pool-0"]).await;
    let mut tasks = Vec::new();
    for index in 0..64 {
        let client = server.client.clone();
        tasks.push(tokio::spawn(async move {
            let body = serde_json::json!({ "Type": "AppService", "AppServiceName": "echo", "Payload": { "index": index } });
            client.post("/devices/pool-0/commands", &body.to_string()).await
        }));
    }
    let mut statuses = BTreeMap::new();
    let mut busy_message = None;
    for task in tasks {
        let response = task.await.unwrap();
        if response.status == 503 {
            assert_eq!(response.header("retry-after").as_deref(), Some("1"));
            busy_message = Some(response.json()["error"].clone());
        }
        *statuses.entry(response.status).or_insert(0) += 1;
    }
    println!(
        "statuses of 64 creates on one pooled connection: {statuses:?}; 503 body: {busy_message:?}"
    );
    assert!(
        statuses
            .keys()
            .all(|status| *status == 201 || *status == 503),
        "{statuses:?}"
    );
    let busy = busy_message.expect("at least one request found the pool exhausted");
    assert_eq!(busy["code"], "serviceNotAvailable");
    assert!(
        busy["message"]
            .as_str()
            .unwrap()
            .contains("database is busy"),
        "{busy}"
    );
    assert!(
        server
            .process
            .log_text()
            .contains("database connection pool exhausted")
    );
}
