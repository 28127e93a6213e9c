//! A recording handler for tests that count executions: its app services
//! append each payload to a log file, so a test can check that every
//! command ran once and in order.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::Client;
use super::receiver::Receiver;

/// A handlers file whose `record` app service appends the payload to
/// `executions.log` (one line per run) and answers null, and whose `slow`
/// app service records its start, then sleeps before answering.
pub fn write_handlers(dir: &Path) -> (PathBuf, PathBuf) {
    let log = dir.join("executions.log");
    let handlers = dir.join("handlers.toml");
    let text = format!(
        r#"
[[app_service]]
name = "record"
program = "/bin/sh"
args = ["-c", "printf '%s\n' \"$(cat)\" >> \"$EXECUTIONS\"; echo null"]
env = {{ EXECUTIONS = "{log}" }}

[[app_service]]
name = "slow"
program = "/bin/sh"
args = ["-c", "printf '%s\n' \"$(cat)\" >> \"$EXECUTIONS\"; sleep 3; echo null"]
env = {{ EXECUTIONS = "{log}" }}
"#,
        log = log.display()
    );
    std::fs::write(&handlers, text).expect("write handlers file");
    (handlers, log)
}

/// Every payload the handlers saw, in the order they ran.
pub fn executions(log: &Path) -> Vec<Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| serde_json::from_str(line).expect("execution log line is JSON"))
        .collect()
}

pub async fn create(
    server: &Client,
    app_service: &str,
    device: &str,
    index: usize,
    postback: Option<&str>,
) -> String {
    let body = json!({
        "Type": "AppService",
        "AppServiceName": app_service,
        "Payload": { "device": device, "index": index },
        "PostBackUri": postback,
    });
    let response = server
        .post(&format!("/devices/{device}/commands"), &body.to_string())
        .await;
    assert_eq!(
        response.status, 201,
        "create {device}#{index}: {}",
        response.text
    );
    response.json()["id"].as_str().unwrap().to_owned()
}

/// Checks that every (device, index) ran exactly once and each device ran
/// its commands in creation order.
pub fn assert_once_and_in_order(executions: &[Value], expected: usize) {
    let mut per_device: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for execution in executions {
        per_device
            .entry(execution["device"].as_str().unwrap().to_owned())
            .or_default()
            .push(execution["index"].as_u64().unwrap());
    }
    let total: usize = per_device.values().map(Vec::len).sum();
    assert_eq!(
        total, expected,
        "executions seen by the handler: {per_device:?}"
    );
    for (device, indexes) in &per_device {
        assert!(
            indexes.windows(2).all(|pair| pair[0] < pair[1]),
            "device {device} ran out of order or twice: {indexes:?}"
        );
    }
}

pub fn postbacks_per_command(receiver: &Receiver) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for request in receiver.received() {
        *counts
            .entry(request.json()["id"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    counts
}
