//! The whole path of a command, from the create request to the postback,
//! on the in-process broker and on RabbitMQ.

mod common;

use std::time::Duration;

use common::receiver::Receiver;
use common::{BrokerKind, TestEnv, is_final, token_for, wait_until};
use serde_json::{Value, json};

const FINAL_WITHIN: Duration = Duration::from_secs(20);

/// The request body of the Create command page, as written there, except
/// for the `Type` and `AppServiceName` a real command needs, and with the
/// `PostBackUri` pointing at the test's receiver.
fn api_page_example(postback: &str) -> String {
    format!(
        r##"{{
  "@odata.type": "#microsoft.graph.command",
  "Status": "Status value",
  "Type": "AppService",
  "AppServiceName": "echo",
  "PackageFamilyName": "Package Family Name value",
  "Error": "Error value",
  "Payload": {{
    "@odata.type": "microsoft.graph.PayloadRequest"
  }},
  "PermissionTicket": "Permission Ticket value",
  "PostBackUri": "{postback}"
}}"##
    )
}

/// Starts an agent for `device` the way the broker allows: inside `serve`
/// for the in-process broker, as its own process on RabbitMQ.
struct Deployment {
    env: TestEnv,
    server: common::Server,
    agents: Vec<common::Process>,
}

impl Deployment {
    async fn start(broker: BrokerKind, devices: &[&str]) -> Self {
        let env = TestEnv::new(broker).await;
        let (server, agents) = match broker {
            BrokerKind::Memory => (env.serve(devices).await, Vec::new()),
            BrokerKind::Rabbit => {
                let server = env.serve(&[]).await;
                let mut agents = Vec::new();
                for device in devices {
                    agents.push(env.agent(device, None).await);
                }
                (server, agents)
            }
        };
        Self {
            env,
            server,
            agents,
        }
    }

    /// Restarts `serve` (SIGTERM, then start), adding in-process agents for
    /// `devices` on the in-process broker, or agent processes on RabbitMQ.
    async fn restart_with_agents(&mut self, devices: &[&str]) {
        self.server.process.terminate().await;
        match self.env.broker {
            BrokerKind::Memory => self.server = self.env.serve(devices).await,
            BrokerKind::Rabbit => {
                self.server = self.env.serve(&[]).await;
                for device in devices {
                    self.agents.push(self.env.agent(device, None).await);
                }
            }
        }
    }
}

async fn example_request_completes_and_posts_back(broker: BrokerKind) {
    let receiver = Receiver::start().await;
    let deployment = Deployment::start(broker, &["kiosk-1"]).await;
    let server = &deployment.server;

    let created = server
        .post(
            "/devices/kiosk-1/commands",
            &api_page_example(&receiver.url),
        )
        .await;
    assert_eq!(created.status, 201, "{}", created.text);
    let command = created.json();
    assert_eq!(command["Status"], "queued");
    assert_eq!(
        command["Error"],
        Value::Null,
        "server-owned Error is ignored on create"
    );
    let id = command["id"].as_str().unwrap().to_owned();
    assert_eq!(
        created.header("location").as_deref(),
        Some(format!("/devices/kiosk-1/commands/{id}").as_str())
    );

    let done = server.wait_final(&id, FINAL_WITHIN).await;
    assert_eq!(done["Status"], "completed", "{done}");
    assert_eq!(
        done["ResponsePayload"],
        json!({"@odata.type": "microsoft.graph.PayloadRequest"})
    );
    assert!(
        wait_until(FINAL_WITHIN, || async { receiver.count() >= 1 }).await,
        "no postback arrived"
    );
    let delivered = wait_until(FINAL_WITHIN, || async {
        server.get(&format!("/commands/{id}")).await.json()["Postback"]["State"] == "delivered"
    })
    .await;
    assert!(delivered, "postback state never became delivered");

    let postbacks = receiver.received();
    assert_eq!(postbacks.len(), 1, "exactly one postback");
    let posted = postbacks[0].json();
    assert_eq!(posted["id"], id.as_str());
    assert_eq!(posted["Status"], "completed");
    assert_eq!(posted["ResponsePayload"], posted["Payload"]);
    assert_eq!(posted["ResponsePayload"], done["ResponsePayload"]);
}

async fn camel_case_request_behaves_the_same(broker: BrokerKind) {
    let receiver = Receiver::start().await;
    let deployment = Deployment::start(broker, &["kiosk-1"]).await;
    let server = &deployment.server;
    let body = json!({
        "type": "appService",
        "appServiceName": "echo",
        "payload": {"big": 12345678901234567890123u128, "text": "héllo ✓"},
        "postbackURI": receiver.url,
    });

    let created = server
        .post("/devices/kiosk-1/commands", &body.to_string())
        .await;
    assert_eq!(created.status, 201, "{}", created.text);
    let id = created.json()["id"].as_str().unwrap().to_owned();
    let done = server.wait_final(&id, FINAL_WITHIN).await;

    assert_eq!(done["Status"], "completed", "{done}");
    assert_eq!(done["PostBackUri"], receiver.url.as_str());
    assert!(
        wait_until(FINAL_WITHIN, || async { receiver.count() == 1 }).await,
        "no postback arrived"
    );
    let raw = String::from_utf8(receiver.received()[0].body.to_vec()).unwrap();
    assert!(
        raw.contains(r#""ResponsePayload":{"big":12345678901234567890123,"text":"héllo ✓"}"#),
        "{raw}"
    );
    let response_payload = server.get(&format!("/commands/{id}/responsePayload")).await;
    assert_eq!(
        response_payload.text,
        r#"{"big":12345678901234567890123,"text":"héllo ✓"}"#
    );
}

async fn unknown_app_service_fails_and_posts_back(broker: BrokerKind) {
    let receiver = Receiver::start().await;
    let deployment = Deployment::start(broker, &["kiosk-1"]).await;
    let server = &deployment.server;
    let body = json!({ "Type": "AppService", "AppServiceName": "no-such-service", "PostBackUri": receiver.url });

    let created = server
        .post("/devices/kiosk-1/commands", &body.to_string())
        .await;
    assert_eq!(created.status, 201, "{}", created.text);
    let id = created.json()["id"].as_str().unwrap().to_owned();
    let done = server.wait_final(&id, FINAL_WITHIN).await;

    assert_eq!(done["Status"], "executionFailed");
    assert!(
        done["Error"]
            .as_str()
            .unwrap_or_default()
            .contains("no-such-service"),
        "{done}"
    );
    assert!(
        wait_until(FINAL_WITHIN, || async { receiver.count() == 1 }).await,
        "no postback arrived"
    );
    assert_eq!(receiver.received()[0].json()["Status"], "executionFailed");
}

async fn command_waits_for_an_agent_started_later(broker: BrokerKind) {
    let mut deployment = Deployment::start(broker, &[]).await;
    let id = deployment
        .server
        .create_echo("late-device", &json!({"n": 1}), None)
        .await;

    // Nothing runs it while no agent is there.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let waiting = deployment
        .server
        .get(&format!("/commands/{id}"))
        .await
        .json();
    assert_eq!(waiting["Status"], "queued");

    deployment.restart_with_agents(&["late-device"]).await;
    let done = deployment.server.wait_final(&id, FINAL_WITHIN).await;
    assert_eq!(done["Status"], "completed", "{done}");
}

async fn agents_only_run_their_own_device(broker: BrokerKind) {
    let deployment = Deployment::start(broker, &["device-a", "device-b"]).await;
    let server = &deployment.server;
    let mut ids = Vec::new();
    for index in 0..4 {
        let device = if index % 2 == 0 {
            "device-a"
        } else {
            "device-b"
        };
        ids.push((
            device,
            server
                .create_echo(device, &json!({ "index": index }), None)
                .await,
        ));
    }

    for (device, id) in &ids {
        let done = server.wait_final(id, FINAL_WITHIN).await;
        assert_eq!(done["Status"], "completed", "{done}");
        let history = server.get(&format!("/commands/{id}/history")).await.json();
        for transition in history["value"].as_array().unwrap().iter().skip(1) {
            assert_eq!(
                transition["Source"],
                format!("agent:{device}"),
                "command {id} of {device}: {history}"
            );
        }
    }
}

async fn restart_before_agent_start_loses_nothing(broker: BrokerKind) {
    let receiver = Receiver::start().await;
    let mut deployment = Deployment::start(broker, &[]).await;
    let mut ids = Vec::new();
    for index in 0..5 {
        ids.push(
            deployment
                .server
                .create_echo(
                    "restart-device",
                    &json!({ "index": index }),
                    Some(&receiver.url),
                )
                .await,
        );
    }

    deployment.server.process.kill().await;
    deployment.restart_with_agents(&["restart-device"]).await;

    for id in &ids {
        let done = deployment.server.wait_final(id, FINAL_WITHIN).await;
        assert_eq!(done["Status"], "completed", "{done}");
    }
    assert!(wait_until(FINAL_WITHIN, || async { receiver.count() >= ids.len() }).await);
    let mut posted: Vec<String> = receiver
        .received()
        .iter()
        .map(|r| r.json()["id"].as_str().unwrap().to_owned())
        .collect();
    posted.sort();
    posted.dedup();
    assert_eq!(posted.len(), ids.len(), "every command posted back");
}

async fn missing_token_is_unauthorized(broker: BrokerKind) {
    let deployment = Deployment::start(broker, &[]).await;
    let server = &deployment.server;
    let response = server
        .http
        .post(format!("{}/devices/kiosk-1/commands", server.base))
        .header("content-type", "application/json")
        .body(r#"{"Type":"AppService","AppServiceName":"echo"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    let body: Value = response.json_value().await;
    assert_eq!(body["error"]["code"], "unauthenticated");
    let health = server
        .http
        .get(format!("{}/health", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200, "health needs no token");
}

async fn me_routes_hide_other_users_commands(broker: BrokerKind) {
    let deployment = Deployment::start(broker, &[]).await;
    let server = &deployment.server;
    let body = r#"{"Type":"AppService","AppServiceName":"echo"}"#;
    let alice = token_for("alice");
    let bob = token_for("bob");

    let created = server
        .post_as("/me/devices/shared-1/commands", body, &alice)
        .await;
    assert_eq!(created.status, 201, "{}", created.text);
    let id = created.json()["id"].as_str().unwrap().to_owned();

    let own = server
        .get_as(&format!("/me/devices/shared-1/commands/{id}"), &alice)
        .await;
    assert_eq!(own.status, 200);
    let other = server
        .get_as(&format!("/me/devices/shared-1/commands/{id}"), &bob)
        .await;
    assert_eq!(other.status, 404, "{}", other.text);
    assert_eq!(other.json()["error"]["code"], "itemNotFound");
    let wrong_device = server
        .get_as(&format!("/devices/other-device/commands/{id}"), &alice)
        .await;
    assert_eq!(wrong_device.status, 404);
}

async fn concurrent_creates_all_succeed(broker: BrokerKind) {
    let deployment = Deployment::start(broker, &["busy-1"]).await;
    let client = deployment.server.client.clone();
    let mut tasks = Vec::new();
    for index in 0..64 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let body = json!({ "Type": "AppService", "AppServiceName": "echo", "Payload": { "index": index } });
            client.post("/devices/busy-1/commands", &body.to_string()).await
        }));
    }
    let mut statuses = std::collections::BTreeMap::new();
    for task in tasks {
        let response = task.await.unwrap();
        assert!(!response.text.contains("locked"), "{}", response.text);
        *statuses.entry(response.status).or_insert(0) += 1;
    }
    assert_eq!(
        statuses.get(&201),
        Some(&64),
        "statuses of 64 concurrent creates: {statuses:?}"
    );
}

/// Status values are final when the test polls them.
#[test]
fn final_statuses_are_recognised() {
    assert!(is_final("completed"));
    assert!(!is_final("executing"));
}

trait JsonValue {
    async fn json_value(self) -> Value;
}

impl JsonValue for reqwest::Response {
    async fn json_value(self) -> Value {
        serde_json::from_slice(&self.bytes().await.unwrap()).unwrap()
    }
}

macro_rules! suite {
    ($module:ident, $broker:expr) => {
        mod $module {
            use super::*;

            #[tokio::test(flavor = "multi_thread")]
            async fn example_request_completes() {
                example_request_completes_and_posts_back($broker).await;
            }

            #[tokio::test(flavor = "multi_thread")]
            async fn camel_case_request() {
                camel_case_request_behaves_the_same($broker).await;
            }

            #[tokio::test(flavor = "multi_thread")]
            async fn unknown_app_service() {
                unknown_app_service_fails_and_posts_back($broker).await;
            }

            #[tokio::test(flavor = "multi_thread")]
            async fn agent_started_later() {
                command_waits_for_an_agent_started_later($broker).await;
            }

            #[tokio::test(flavor = "multi_thread")]
            async fn devices_are_isolated() {
                agents_only_run_their_own_device($broker).await;
            }

            #[tokio::test(flavor = "multi_thread")]
            async fn restart_loses_nothing() {
                restart_before_agent_start_loses_nothing($broker).await;
            }

            #[tokio::test(flavor = "multi_thread")]
            async fn missing_token() {
                missing_token_is_unauthorized($broker).await;
            }

            #[tokio::test(flavor = "multi_thread")]
            async fn concurrent_creates() {
                concurrent_creates_all_succeed($broker).await;
            }

            #[tokio::test(flavor = "multi_thread")]
            async fn me_routes_are_private() {
                me_routes_hide_other_users_commands($broker).await;
            }
        }
    };
}

suite!(in_process_broker, BrokerKind::Memory);
suite!(rabbitmq, BrokerKind::Rabbit);
