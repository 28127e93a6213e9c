//! Listing, cancel, idempotent create, the per-device limit, request ids
//! and the OpenAPI document, against the real binary.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use command_dispatcher::api::openapi::openapi_path;
use command_dispatcher::api::routes::Operation;
use common::receiver::Receiver;
use common::{BrokerKind, Server, TestEnv, token_for, wait_until};
use serde_json::{Value, json};

const WITHIN: Duration = Duration::from_secs(20);
const ECHO: &str = r#"{"Type":"AppService","AppServiceName":"echo"}"#;

/// Follows `@odata.nextLink` from `path` and returns every page.
async fn all_pages(server: &Server, path: &str) -> Vec<Value> {
    let mut pages = Vec::new();
    let mut next = Some(path.to_owned());
    while let Some(path) = next {
        let response = server.get(&path).await;
        assert_eq!(response.status, 200, "GET {path}: {}", response.text);
        let page = response.json();
        next = page["@odata.nextLink"].as_str().map(str::to_owned);
        pages.push(page);
        assert!(pages.len() < 100, "paging does not end");
    }
    pages
}

/// The ids of every command a listing returns, in order.
async fn listed_ids(server: &Server, path: &str) -> Vec<String> {
    all_pages(server, path)
        .await
        .iter()
        .flat_map(|page| page["value"].as_array().unwrap().clone())
        .map(|command| command["id"].as_str().unwrap().to_owned())
        .collect()
}

fn created_at(command: &Value) -> DateTime<Utc> {
    command["CreatedDateTime"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// Lists the ids that `base` returns with `$filter` set to `filter`.
async fn filtered_ids(server: &Server, base: &str, filter: &str) -> HashSet<String> {
    let encoded: String = url::form_urlencoded::byte_serialize(filter.as_bytes()).collect();
    listed_ids(server, &format!("{base}?$filter={encoded}"))
        .await
        .into_iter()
        .collect()
}

fn id_of(command: &Value) -> String {
    command["id"].as_str().unwrap().to_owned()
}

async fn create(server: &Server, path: &str) -> Value {
    let response = server.post(path, ECHO).await;
    assert_eq!(response.status, 201, "{}", response.text);
    response.json()
}

async fn paging_walks_every_command_once(broker: BrokerKind) {
    let env = TestEnv::new(broker).await;
    let server = env.serve(&[]).await;
    let mut created = HashSet::new();
    for _ in 0..250 {
        created.insert(create(&server, "/devices/pager/commands").await["id"].clone());
    }
    create(&server, "/devices/other/commands").await;

    let pages = all_pages(&server, "/devices/pager/commands?$top=100").await;
    let sizes: Vec<usize> = pages
        .iter()
        .map(|page| page["value"].as_array().unwrap().len())
        .collect();
    assert_eq!(sizes, vec![100, 100, 50]);
    assert!(
        pages[2].get("@odata.nextLink").is_none(),
        "last page has a link"
    );

    let listed: Vec<Value> = pages
        .iter()
        .flat_map(|page| page["value"].as_array().unwrap().clone())
        .collect();
    let ids: HashSet<Value> = listed.iter().map(|command| command["id"].clone()).collect();
    assert_eq!(ids.len(), listed.len(), "a command was listed twice");
    assert_eq!(ids, created, "listing differs from the created commands");
    let keys: Vec<(DateTime<Utc>, String)> = listed
        .iter()
        .map(|command| {
            (
                created_at(command),
                command["id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert!(
        keys.windows(2).all(|pair| pair[0] > pair[1]),
        "not newest first"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn paging_walks_every_command_once_in_process() {
    paging_walks_every_command_once(BrokerKind::Memory).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn paging_walks_every_command_once_on_rabbitmq() {
    paging_walks_every_command_once(BrokerKind::Rabbit).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn default_page_is_100_commands() {
    let env = TestEnv::new(BrokerKind::Memory).await;
    let server = env.serve(&[]).await;
    for _ in 0..101 {
        create(&server, "/devices/many/commands").await;
    }
    let page = server.get("/commands").await.json();
    assert_eq!(page["value"].as_array().unwrap().len(), 100);
    let link = page["@odata.nextLink"].as_str().unwrap();
    assert!(link.starts_with("/commands?$top=100&$skiptoken="), "{link}");
}

#[tokio::test(flavor = "multi_thread")]
async fn status_filter_returns_exact_matches() {
    let env = TestEnv::new(BrokerKind::Memory).await;
    let server = env.serve(&["runner"]).await;
    let mut completed = HashSet::new();
    for _ in 0..2 {
        let id = id_of(&create(&server, "/devices/runner/commands").await);
        server.wait_final(&id, WITHIN).await;
        completed.insert(id);
    }
    let mut queued = HashSet::new();
    for _ in 0..3 {
        queued.insert(id_of(&create(&server, "/devices/idle/commands").await));
    }
    let canceled = id_of(&create(&server, "/devices/idle/commands").await);
    let cancel = server
        .post(&format!("/commands/{canceled}/cancel"), "")
        .await;
    assert_eq!(cancel.status, 200, "{}", cancel.text);

    let select = |filter| filtered_ids(&server, "/commands", filter);
    assert_eq!(select("Status eq 'completed'").await, completed);
    assert_eq!(select("Status eq 'queued'").await, queued);
    let mut queued_or_canceled = queued.clone();
    queued_or_canceled.insert(canceled.clone());
    assert_eq!(
        select("Status in ('queued', 'canceled')").await,
        queued_or_canceled
    );
    assert_eq!(
        select("Status ne 'completed' and Status ne 'queued'").await,
        HashSet::from([canceled])
    );
    assert!(select("Status eq 'executing'").await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn time_filter_returns_exact_matches() {
    let env = TestEnv::new(BrokerKind::Memory).await;
    let server = env.serve(&[]).await;
    let mut commands = Vec::new();
    for _ in 0..6 {
        commands.push(create(&server, "/devices/clock/commands").await);
        // Spreads creation times over distinct milliseconds, so that the
        // bounds below separate commands.
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let low = created_at(&commands[1]);
    let high = created_at(&commands[4]);
    let expect = |keep: &dyn Fn(DateTime<Utc>) -> bool| -> HashSet<String> {
        commands
            .iter()
            .filter(|command| keep(created_at(command)))
            .map(id_of)
            .collect()
    };
    let low_text = commands[1]["CreatedDateTime"].as_str().unwrap();
    let high_text = commands[4]["CreatedDateTime"].as_str().unwrap();
    let base = "/devices/clock/commands";

    let strict = filtered_ids(
        &server,
        base,
        &format!("CreatedDateTime gt {low_text} and CreatedDateTime lt {high_text}"),
    )
    .await;
    assert_eq!(strict, expect(&|at| at > low && at < high));
    assert!(!strict.is_empty(), "the strict window selects nothing");
    let inclusive = filtered_ids(
        &server,
        base,
        &format!("CreatedDateTime ge {low_text} and CreatedDateTime le {high_text}"),
    )
    .await;
    assert_eq!(inclusive, expect(&|at| at >= low && at <= high));
    let with_status = filtered_ids(
        &server,
        base,
        &format!("Status eq 'queued' and CreatedDateTime lt {high_text}"),
    )
    .await;
    assert_eq!(with_status, expect(&|at| at < high));
}

#[tokio::test(flavor = "multi_thread")]
async fn me_list_shows_only_callers_commands() {
    let env = TestEnv::new(BrokerKind::Memory).await;
    let server = env.serve(&[]).await;
    let (alice, bob) = (token_for("alice"), token_for("bob"));
    let mut own = HashSet::new();
    for path in ["/me/devices/shared/commands", "/devices/shared/commands"] {
        let created = server.post_as(path, ECHO, &alice).await;
        assert_eq!(created.status, 201, "{}", created.text);
        own.insert(created.json()["id"].as_str().unwrap().to_owned());
    }
    let other = server
        .post_as("/me/devices/shared/commands", ECHO, &bob)
        .await;
    assert_eq!(other.status, 201, "{}", other.text);
    server
        .post_as("/me/devices/elsewhere/commands", ECHO, &alice)
        .await;

    let listed = server
        .get_as("/me/devices/shared/commands", &alice)
        .await
        .json();
    let ids: HashSet<String> = listed["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|command| command["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, own);
    let device_wide = listed_ids(&server, "/devices/shared/commands").await;
    assert_eq!(device_wide.len(), 3);
}

async fn cancel_queued_command_posts_back(broker: BrokerKind) {
    let receiver = Receiver::start().await;
    let env = TestEnv::new(broker).await;
    let server = env.serve(&[]).await;
    let body = json!({"Type": "AppService", "AppServiceName": "echo", "PostBackUri": receiver.url});
    let created = server
        .post("/devices/waiting/commands", &body.to_string())
        .await;
    assert_eq!(created.status, 201, "{}", created.text);
    let id = created.json()["id"].as_str().unwrap().to_owned();

    let canceled = server
        .post(&format!("/devices/waiting/commands/{id}/cancel"), "")
        .await;
    assert_eq!(canceled.status, 200, "{}", canceled.text);
    assert_eq!(canceled.json()["Status"], "canceled");
    assert!(
        wait_until(WITHIN, || async { receiver.count() >= 1 }).await,
        "no postback arrived"
    );
    assert_eq!(receiver.received()[0].json()["Status"], "canceled");
    assert_eq!(
        server.get(&format!("/commands/{id}")).await.json()["Status"],
        "canceled"
    );

    let again = server.post(&format!("/commands/{id}/cancel"), "").await;
    assert_eq!(again.status, 409, "{}", again.text);
    assert_eq!(again.json()["error"]["code"], "conflict");
    assert!(again.text.contains("canceled"), "{}", again.text);
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_queued_command_posts_back_in_process() {
    cancel_queued_command_posts_back(BrokerKind::Memory).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_queued_command_posts_back_on_rabbitmq() {
    cancel_queued_command_posts_back(BrokerKind::Rabbit).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_respects_visibility() {
    let env = TestEnv::new(BrokerKind::Memory).await;
    let server = env.serve(&[]).await;
    let created = server.post("/me/devices/mine/commands", ECHO).await;
    let id = created.json()["id"].as_str().unwrap().to_owned();

    let bob = token_for("bob");
    let as_bob = server
        .post_as(&format!("/me/devices/mine/commands/{id}/cancel"), "", &bob)
        .await;
    assert_eq!(as_bob.status, 404, "{}", as_bob.text);
    let wrong_device = server
        .post(&format!("/devices/other/commands/{id}/cancel"), "")
        .await;
    assert_eq!(wrong_device.status, 404, "{}", wrong_device.text);
    let unknown = server
        .post(&format!("/commands/{}/cancel", uuid::Uuid::now_v7()), "")
        .await;
    assert_eq!(unknown.json()["error"]["code"], "itemNotFound");
    assert_eq!(
        server.get(&format!("/commands/{id}")).await.json()["Status"],
        "queued",
        "a rejected cancel changed the command"
    );
}

async fn create_with_key(server: &Server, path: &str, key: &str, body: &str) -> common::Response {
    server
        .send(
            server
                .http
                .post(server.url(path))
                .bearer_auth(&server.token)
                .header("content-type", "application/json")
                .header("idempotency-key", key)
                .body(body.to_owned()),
        )
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn idempotent_repeat_returns_first_command() {
    let env = TestEnv::new(BrokerKind::Memory).await;
    let server = env.serve(&[]).await;
    let first = create_with_key(&server, "/devices/idem/commands", "key-1", ECHO).await;
    let second = create_with_key(&server, "/devices/idem/commands", "key-1", ECHO).await;

    assert_eq!(first.status, 201, "{}", first.text);
    assert_eq!(second.status, 201, "{}", second.text);
    assert_eq!(first.json()["id"], second.json()["id"]);
    assert_eq!(first.header("idempotent-replayed"), None);
    assert_eq!(
        second.header("idempotent-replayed").as_deref(),
        Some("true")
    );
    assert_eq!(first.header("location"), second.header("location"));
    assert_eq!(listed_ids(&server, "/devices/idem/commands").await.len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn idempotency_key_with_other_request_conflicts() {
    let env = TestEnv::new(BrokerKind::Memory).await;
    let server = env.serve(&[]).await;
    let first = create_with_key(&server, "/devices/idem/commands", "key-2", ECHO).await;
    assert_eq!(first.status, 201, "{}", first.text);

    let other_body = r#"{"Type":"AppService","AppServiceName":"other"}"#;
    let changed = create_with_key(&server, "/devices/idem/commands", "key-2", other_body).await;
    assert_eq!(changed.status, 409, "{}", changed.text);
    assert_eq!(changed.json()["error"]["code"], "conflict");
    assert!(changed.text.contains("key-2"), "{}", changed.text);
    let other_route = create_with_key(&server, "/devices/idem-2/commands", "key-2", ECHO).await;
    assert_eq!(other_route.status, 409, "{}", other_route.text);
    assert_eq!(listed_ids(&server, "/commands").await.len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn idempotency_keys_are_per_caller() {
    let env = TestEnv::new(BrokerKind::Memory).await;
    let server = env.serve(&[]).await;
    let alice = create_with_key(&server, "/devices/idem/commands", "shared", ECHO).await;
    let bob = server
        .send(
            server
                .http
                .post(server.url("/devices/idem/commands"))
                .bearer_auth(token_for("bob"))
                .header("content-type", "application/json")
                .header("idempotency-key", "shared")
                .body(ECHO),
        )
        .await;
    assert_eq!(bob.status, 201, "{}", bob.text);
    assert_ne!(alice.json()["id"], bob.json()["id"]);
    assert_eq!(bob.header("idempotent-replayed"), None);
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_creates_with_one_key_store_one() {
    let env = TestEnv::new(BrokerKind::Memory).await;
    let server = env.serve(&[]).await;
    for round in 0..5 {
        let key = format!("race-{round}");
        let (a, b, c) = tokio::join!(
            create_with_key(&server, "/devices/race/commands", &key, ECHO),
            create_with_key(&server, "/devices/race/commands", &key, ECHO),
            create_with_key(&server, "/devices/race/commands", &key, ECHO),
        );
        let ids: HashSet<Value> = [&a, &b, &c]
            .iter()
            .map(|response| {
                assert_eq!(response.status, 201, "{}", response.text);
                response.json()["id"].clone()
            })
            .collect();
        assert_eq!(ids.len(), 1, "round {round} created {ids:?}");
        let replayed = [&a, &b, &c]
            .iter()
            .filter(|response| response.header("idempotent-replayed").is_some())
            .count();
        assert_eq!(replayed, 2, "round {round}");
    }
    assert_eq!(listed_ids(&server, "/devices/race/commands").await.len(), 5);
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_idempotency_key_can_be_reused() {
    let mut env = TestEnv::new(BrokerKind::Memory).await;
    env.extra_serve_args
        .extend(["--idempotency-ttl".to_owned(), "1s".to_owned()]);
    let server = env.serve(&[]).await;
    let first = create_with_key(&server, "/devices/idem/commands", "short", ECHO).await;
    assert_eq!(first.status, 201, "{}", first.text);

    let other_body = r#"{"Type":"AppService","AppServiceName":"other"}"#;
    let reused = wait_until(Duration::from_secs(5), || async {
        create_with_key(&server, "/devices/idem/commands", "short", other_body)
            .await
            .status
            == 201
    })
    .await;
    assert!(reused, "the key was never released");
}

#[tokio::test(flavor = "multi_thread")]
async fn replay_survives_a_body_that_has_expired() {
    let env = TestEnv::new(BrokerKind::Memory).await;
    let server = env.serve(&[]).await;
    let expires = Utc::now() + chrono::Duration::milliseconds(1500);
    let body = json!({
        "Type": "AppService",
        "AppServiceName": "echo",
        "ExpirationDateTime": expires.to_rfc3339(),
    })
    .to_string();
    let first = create_with_key(&server, "/devices/idem/commands", "late", &body).await;
    assert_eq!(first.status, 201, "{}", first.text);

    assert!(wait_until(Duration::from_secs(5), || async { Utc::now() > expires }).await);
    let retry = create_with_key(&server, "/devices/idem/commands", "late", &body).await;
    assert_eq!(retry.status, 201, "{}", retry.text);
    assert_eq!(retry.json()["id"], first.json()["id"]);
    let fresh = create_with_key(&server, "/devices/idem/commands", "fresh", &body).await;
    assert_eq!(fresh.status, 400, "{}", fresh.text);
}

#[tokio::test(flavor = "multi_thread")]
async fn device_limit_rejects_with_429() {
    let mut env = TestEnv::new(BrokerKind::Memory).await;
    env.extra_serve_args
        .extend(["--max-unfinished-per-device".to_owned(), "3".to_owned()]);
    let server = env.serve(&[]).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(create(&server, "/devices/full/commands").await["id"].clone());
    }

    let rejected = server.post("/devices/full/commands", ECHO).await;
    assert_eq!(rejected.status, 429, "{}", rejected.text);
    let error = &rejected.json()["error"];
    assert_eq!(error["code"], "tooManyRequests");
    let message = error["message"].as_str().unwrap();
    assert!(message.contains("device full"), "{message}");
    assert!(message.contains('3'), "{message}");
    assert_eq!(listed_ids(&server, "/devices/full/commands").await.len(), 3);
    create(&server, "/devices/not-full/commands").await;

    let cancel = server
        .post(
            &format!("/commands/{}/cancel", ids[0].as_str().unwrap()),
            "",
        )
        .await;
    assert_eq!(cancel.status, 200, "{}", cancel.text);
    create(&server, "/devices/full/commands").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_creates_stop_at_the_device_limit() {
    let mut env = TestEnv::new(BrokerKind::Memory).await;
    env.extra_serve_args
        .extend(["--max-unfinished-per-device".to_owned(), "3".to_owned()]);
    let server = env.serve(&[]).await;
    let requests = (0..10).map(|_| server.post("/devices/busy/commands", ECHO));
    let responses = futures_util::future::join_all(requests).await;
    let mut statuses: HashMap<u16, usize> = HashMap::new();
    for response in &responses {
        *statuses.entry(response.status).or_default() += 1;
    }
    assert_eq!(statuses.get(&201), Some(&3), "{statuses:?}");
    assert_eq!(statuses.get(&429), Some(&7), "{statuses:?}");
    assert_eq!(listed_ids(&server, "/devices/busy/commands").await.len(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn error_bodies_carry_the_request_id() {
    let env = TestEnv::new(BrokerKind::Memory).await;
    let server = env.serve(&[]).await;
    let response = server
        .send(
            server
                .http
                .get(server.url("/commands?$top=0"))
                .bearer_auth(&server.token)
                .header("client-request-id", "client-42"),
        )
        .await;

    assert_eq!(response.status, 400);
    let request_id = response.header("request-id").expect("request-id header");
    let inner = &response.json()["error"]["innerError"];
    assert_eq!(inner["request-id"], request_id.as_str());
    assert_eq!(inner["client-request-id"], "client-42");
    assert!(
        inner["date"]
            .as_str()
            .unwrap()
            .parse::<DateTime<Utc>>()
            .is_ok(),
        "{inner}"
    );
    assert_eq!(
        response.header("client-request-id").as_deref(),
        Some("client-42")
    );
    let logged = wait_until(Duration::from_secs(5), || async {
        server.process.log_text().contains(&request_id)
    })
    .await;
    assert!(logged, "request-id {request_id} is not in the log");
}

#[tokio::test(flavor = "multi_thread")]
async fn unauthenticated_and_unrouted_errors_carry_the_request_id() {
    let env = TestEnv::new(BrokerKind::Memory).await;
    let server = env.serve(&[]).await;
    for request in [
        server.http.get(server.url("/commands")),
        server.http.get(server.url("/no-such-route")),
        server.http.delete(server.url("/commands")),
    ] {
        let response = server.send(request).await;
        let request_id = response.header("request-id").expect("request-id header");
        assert_eq!(
            response.json()["error"]["innerError"]["request-id"],
            request_id.as_str(),
            "{}",
            response.text
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn openapi_document_lists_every_route() {
    let env = TestEnv::new(BrokerKind::Memory).await;
    let server = env.serve(&[]).await;
    let response = server
        .send(server.http.get(server.url("/openapi.json")))
        .await;
    assert_eq!(response.status, 200, "the document needs no token");
    let document = response.json();
    assert!(
        document["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        document["openapi"]
    );
    assert_eq!(
        document["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    for schema in [
        "Command",
        "CommandCollection",
        "ErrorResponse",
        "CreateCommandRequest",
    ] {
        assert!(
            document["components"]["schemas"].get(schema).is_some(),
            "schema {schema} is missing"
        );
    }

    for operation in Operation::all() {
        let method = operation.method().as_str().to_ascii_lowercase();
        let path = openapi_path(operation);
        let described = &document["paths"][&path][&method];
        assert!(
            described.is_object(),
            "{method} {path} is not in the document"
        );
        assert_eq!(
            described.get("security").is_some(),
            operation.requires_token(),
            "{method} {path} security"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_documented_route_is_served() {
    let env = TestEnv::new(BrokerKind::Memory).await;
    let server = env.serve(&[]).await;
    let command = create(&server, "/devices/doc/commands").await;
    let id = command["id"].as_str().unwrap();
    let document = server.get("/openapi.json").await.json();

    for (path, item) in document["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            let url = server.url(&path.replace("{deviceId}", "doc").replace("{id}", id));
            let request = match method.as_str() {
                "get" => server.http.get(url),
                "post" => server.http.post(url),
                other => panic!("unexpected method {other} for {path}"),
            };
            let response = server
                .send(
                    request
                        .bearer_auth(&server.token)
                        .header("content-type", "application/json")
                        .body(ECHO),
                )
                .await;
            assert!(
                response.status < 500 || path == "/health/ready",
                "{method} {path}: {}",
                response.text
            );
            assert!(
                !response.text.contains("no such route") && response.status != 405,
                "{method} {path} is documented but not routed: {}",
                response.text
            );
        }
    }
}
