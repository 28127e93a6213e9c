//! Failover on the three-node RabbitMQ cluster that scripts/with-test-servers
//! starts: `serve` and the agents get every node in `--amqp-url` and use
//! quorum queues. The node the server is connected to stops while commands
//! flow, and every command still runs once, in order per device.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::recording::{assert_once_and_in_order, create, executions, write_handlers};
use common::{
    BrokerKind, Client, TestEnv, cluster_amqp_urls, cluster_nodes, rabbitmqctl_on, wait_until,
};

const DEVICES: usize = 4;
/// Pause between two creates for one device, so that commands keep arriving
/// before, during and after the outage.
const CREATE_PAUSE: Duration = Duration::from_millis(40);
/// How long the stopped node stays down after the server left it.
const OUTAGE: Duration = Duration::from_secs(3);

/// Runs `rabbitmqctl -n node` in `block_in_place`, because a call takes a
/// second or more and the creators must keep running meanwhile.
fn ctl(node: &str, args: &[&str]) -> String {
    tokio::task::block_in_place(|| rabbitmqctl_on(node, args))
}

/// Reads the AMQP port of each node from the cluster's URLs, in the order
/// of [`cluster_nodes`].
fn node_ports() -> Vec<String> {
    cluster_amqp_urls()
        .split(',')
        .map(|url| {
            let (_, after_host) = url.rsplit_once(':').expect("AMQP URL has a port");
            after_host.split('/').next().unwrap_or_default().to_owned()
        })
        .collect()
}

/// Lists the nodes that hold a connection whose name contains `name`.
/// `list_connections` covers the whole cluster but fails on a stopped node,
/// so it runs on the first node other than `skip`. A connection's `port`
/// column is the AMQP port of the node that accepted it.
fn nodes_with_connection(nodes: &[String], skip: Option<&str>, name: &str) -> Vec<String> {
    let ports = node_ports();
    let running = nodes
        .iter()
        .find(|node| Some(node.as_str()) != skip)
        .expect("a running node");
    ctl(running, &["list_connections", "port", "client_properties"])
        .lines()
        .filter(|line| line.contains(name))
        .map(|line| {
            let port = line.split('\t').next().unwrap_or_default();
            let index = ports
                .iter()
                .position(|node_port| node_port == port)
                .unwrap_or_else(|| panic!("port {port} is not a cluster node's: {line}"));
            nodes[index].clone()
        })
        .collect()
}

/// Creates `record` commands for `device`, numbered from 0, until `stop` is
/// set, and returns their ids in creation order.
async fn create_until(client: Client, device: String, stop: Arc<AtomicBool>) -> Vec<String> {
    let mut ids = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        ids.push(create(&client, "record", &device, ids.len(), None).await);
        tokio::time::sleep(CREATE_PAUSE).await;
    }
    ids
}

/// Collects the node of each "connected to RabbitMQ" line in a log, in
/// order.
fn connected_nodes(log: &str) -> Vec<String> {
    strip_ansi(log)
        .lines()
        .filter(|line| line.contains("connected to RabbitMQ"))
        .filter_map(|line| line.split("node=").nth(1))
        .map(|rest| {
            rest.split_whitespace()
                .next()
                .unwrap_or_default()
                .to_owned()
        })
        .collect()
}

/// Removes the colour codes that the log writer puts around field names.
fn strip_ansi(text: &str) -> String {
    let mut plain = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // An SGR sequence: ESC [ parameters m.
            for code in chars.by_ref() {
                if code == 'm' {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain
}

#[tokio::test(flavor = "multi_thread")]
async fn node_outage_fails_over() {
    let nodes = cluster_nodes();
    assert_eq!(nodes.len(), 3, "expected three cluster nodes: {nodes:?}");
    let mut env = TestEnv::new(BrokerKind::Rabbit).await;
    env.queue_type = Some("quorum");
    env.amqp_url = Some(cluster_amqp_urls());
    let (handlers, log) = write_handlers(env.data_dir());
    let server = env.serve(&[]).await;
    let devices: Vec<String> = (0..DEVICES).map(|n| format!("cluster-{n}")).collect();
    let mut agents = Vec::new();
    for device in &devices {
        agents.push(env.agent(device, Some(&handlers)).await);
    }

    let stop = Arc::new(AtomicBool::new(false));
    let creators: Vec<_> = devices
        .iter()
        .map(|device| {
            tokio::spawn(create_until(
                server.client.clone(),
                device.clone(),
                stop.clone(),
            ))
        })
        .collect();

    // Let commands run end to end before the outage.
    let flowing = wait_until(Duration::from_secs(60), || async {
        executions(&log).len() >= 2 * DEVICES
    })
    .await;
    assert!(flowing, "no commands ran before the outage");

    let name = format!("dispatcher serve ({})", env.prefix);
    let before = nodes_with_connection(&nodes, None, &name);
    assert_eq!(
        before.len(),
        1,
        "the server should hold one connection, on one node: {before:?}"
    );
    let stopped = before[0].clone();
    let executed_before = executions(&log).len();
    ctl(&stopped, &["stop_app"]);

    let mut after = Vec::new();
    let failed_over = wait_until(Duration::from_secs(30), || {
        after = nodes_with_connection(&nodes, Some(&stopped), &name);
        std::future::ready(!after.is_empty())
    })
    .await;
    assert!(
        failed_over,
        "the server did not connect to another node within 30 s of {stopped} stopping; log: {}",
        server.process.log_text()
    );
    tokio::time::sleep(OUTAGE).await;
    let executed_during = executions(&log).len() - executed_before;
    ctl(&stopped, &["start_app"]);
    // Keep creating for a moment with all three nodes back.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);

    let mut ids_per_device = Vec::new();
    for creator in creators {
        ids_per_device.push(creator.await.expect("create task"));
    }
    let ids: Vec<&String> = ids_per_device.iter().flatten().collect();
    let mut statuses: BTreeMap<String, usize> = BTreeMap::new();
    for id in &ids {
        // NOTE: once, in a CI run on PostgreSQL on a loaded machine, one
        // command stayed `executing` past this deadline. The runs since did
        // not repeat it, and the cause was not found.
        let done = server.wait_final(id, Duration::from_secs(120)).await;
        *statuses
            .entry(done["Status"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    let executions = executions(&log);
    let server_nodes = connected_nodes(&server.process.log_text());
    let agent_nodes: BTreeSet<String> = agents
        .iter()
        .flat_map(|agent| connected_nodes(&agent.log_text()))
        .collect();
    println!(
        "stopped {stopped}; the server moved to {after:?}; created {} commands ({:?} per device), \
         final statuses {statuses:?}, executions {}, {executed_during} of them while the node was down; \
         server connections in order {server_nodes:?}, agents connected to {agent_nodes:?}",
        ids.len(),
        ids_per_device.iter().map(Vec::len).collect::<Vec<_>>(),
        executions.len(),
    );
    assert_eq!(statuses.get("completed"), Some(&ids.len()), "{statuses:?}");
    assert_once_and_in_order(&executions, ids.len());
    assert!(
        executed_during > 0,
        "no command ran while {stopped} was down"
    );

    // Every quorum queue of this test has a member on each node, so losing
    // any one node leaves a majority.
    let queues = ctl(&nodes[0], &["list_queues", "name", "type", "members"]);
    let ours: Vec<&str> = queues
        .lines()
        .filter(|line| line.starts_with(&format!("{}.", env.prefix)))
        .collect();
    println!(
        "queues of this test with their members:\n{}",
        ours.join("\n")
    );
    assert_eq!(
        ours.len(),
        2 * DEVICES + 1,
        "expected a device and a control queue per device and the reports queue: {queues}"
    );
    for line in &ours {
        let columns: Vec<&str> = line.split('\t').collect();
        assert_eq!(
            columns.get(1),
            Some(&"quorum"),
            "not a quorum queue: {line}"
        );
        for node in &nodes {
            assert!(
                columns
                    .get(2)
                    .is_some_and(|members| members.contains(node.as_str())),
                "queue has no member on {node}: {line}"
            );
        }
    }
}
