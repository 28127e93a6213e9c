//! A table of malformed requests: bodies, headers, paths and query options.
//! Each gets its own status and Graph error code, never a 5xx.

mod common;

use common::{BrokerKind, JWT_SECRET, TestEnv};
use reqwest::Method;
use reqwest::header::{HeaderName, HeaderValue};

const DEVICE_COMMANDS: &str = "/devices/kiosk-1/commands";
const ECHO: &str = r#"{"Type":"AppService","AppServiceName":"echo"}"#;

/// [`ECHO`] compressed with gzip (Python's `gzip.compress` with mtime 0).
const ECHO_GZIP: [u8; 53] = [
    0x1f, 0x8b, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x03, 0xab, 0x56, 0x0a, 0xa9, 0x2c, 0x48,
    0x55, 0xb2, 0x52, 0x72, 0x2c, 0x28, 0x08, 0x4e, 0x2d, 0x2a, 0xcb, 0x4c, 0x4e, 0x55, 0xd2, 0x41,
    0xe2, 0xf8, 0x25, 0xe6, 0x82, 0x64, 0x53, 0x93, 0x33, 0xf2, 0x95, 0x6a, 0x01, 0xe8, 0x63, 0x22,
    0xfb, 0x2d, 0x00, 0x00, 0x00,
];

/// One malformed request and the response it must get.
struct Case {
    name: &'static str,
    method: Method,
    path: String,
    /// Replaces the default JSON content type and bearer token when set.
    headers: Vec<(&'static str, Vec<u8>)>,
    body: Vec<u8>,
    status: u16,
    code: &'static str,
    /// Text the error message must contain.
    mentions: &'static str,
}

fn post(
    name: &'static str,
    body: impl Into<Vec<u8>>,
    status: u16,
    code: &'static str,
    mentions: &'static str,
) -> Case {
    Case {
        name,
        method: Method::POST,
        path: DEVICE_COMMANDS.to_owned(),
        headers: Vec::new(),
        body: body.into(),
        status,
        code,
        mentions,
    }
}

fn bad_body(name: &'static str, body: impl Into<Vec<u8>>, mentions: &'static str) -> Case {
    post(name, body, 400, "badRequest", mentions)
}

fn get(
    name: &'static str,
    path: impl Into<String>,
    status: u16,
    code: &'static str,
    mentions: &'static str,
) -> Case {
    Case {
        name,
        method: Method::GET,
        path: path.into(),
        headers: Vec::new(),
        body: Vec::new(),
        status,
        code,
        mentions,
    }
}

fn bad_query(name: &'static str, query: &str, mentions: &'static str) -> Case {
    get(
        name,
        format!("{DEVICE_COMMANDS}?{query}"),
        400,
        "badRequest",
        mentions,
    )
}

fn with_header(mut case: Case, name: &'static str, value: impl Into<Vec<u8>>) -> Case {
    case.headers.push((name, value.into()));
    case
}

fn echo_with(property: &str, value: &str) -> String {
    format!(r#"{{"Type":"AppService","AppServiceName":"echo","{property}":{value}}}"#)
}

fn token_without_scope() -> String {
    let now = jsonwebtoken::get_current_timestamp();
    let claims =
        serde_json::json!({"sub": "alice", "scp": "User.Read", "iat": now, "exp": now + 600});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .unwrap()
}

fn cases() -> Vec<Case> {
    let unknown_id = uuid::Uuid::now_v7();
    let deep = format!(
        r#"{{"Type":"AppService","AppServiceName":"echo","Payload":{{"a":{}{}}}}}"#,
        "[".repeat(80),
        "]".repeat(80)
    );
    vec![
        // Bodies.
        bad_body("body is not JSON", "{", "not valid JSON"),
        bad_body("body is empty", "", "not valid JSON"),
        bad_body("body is an array", "[]", "JSON object"),
        bad_body("body is a string", r#""AppService""#, "JSON object"),
        bad_body(
            "data after the object",
            format!("{ECHO} {{}}"),
            "after the JSON object",
        ),
        bad_body(
            "body is not UTF-8",
            b"{\"Type\":\"\xff\"}".to_vec(),
            "UTF-8",
        ),
        bad_body(
            "duplicate property",
            r#"{"Type":"AppService","Type":"AppService","AppServiceName":"echo"}"#,
            "more than once",
        ),
        bad_body(
            "duplicate property in two casings",
            r#"{"Type":"AppService","TYPE":"AppService","AppServiceName":"echo"}"#,
            "more than once",
        ),
        bad_body(
            "duplicate key in Payload",
            echo_with("Payload", r#"{"a":1,"a":2}"#),
            "more than once",
        ),
        bad_body(
            "unknown property",
            echo_with("Colour", r#""red""#),
            "Colour",
        ),
        bad_body(
            "misspelled property",
            echo_with("PostBackUrl", r#""https://example.com/""#),
            "did you mean PostBackUri",
        ),
        bad_body(
            "key with @ that is no annotation",
            echo_with("notify@example.com", r#""x""#),
            "\"notify@example.com\" is not a command property",
        ),
        bad_body(
            "annotation of an unknown property",
            echo_with("PostBackUrl@odata.type", r#""x""#),
            "\"PostBackUrl@odata.type\" is not a command property",
        ),
        bad_body("Type is a number", r#"{"Type":1}"#, "Type must be a string"),
        bad_body("Type is unknown", r#"{"Type":"Reboot"}"#, "Reboot"),
        bad_body(
            "Type is missing",
            r#"{"AppServiceName":"echo"}"#,
            "Type is missing",
        ),
        bad_body(
            "AppServiceName is missing",
            r#"{"Type":"AppService"}"#,
            "AppServiceName is required",
        ),
        bad_body(
            "AppServiceName is a number",
            r#"{"Type":"AppService","AppServiceName":7}"#,
            "AppServiceName must be a string",
        ),
        bad_body(
            "Payload is a string",
            echo_with("Payload", r#""x""#),
            "Payload must be a JSON object",
        ),
        bad_body(
            "Payload is an array",
            echo_with("Payload", "[1]"),
            "Payload must be a JSON object",
        ),
        bad_body("Payload nests too deep", deep, "nests deeper"),
        bad_body(
            "PostBackUri is empty",
            echo_with("PostBackUri", r#""""#),
            "PostBackUri is empty",
        ),
        bad_body(
            "PostBackUri is the string null",
            echo_with("PostBackUri", r#""null""#),
            "JSON null",
        ),
        bad_body(
            "PostBackUri is a number",
            echo_with("PostBackUri", "5"),
            "PostBackUri must be a string",
        ),
        bad_body(
            "PostBackUri is relative",
            echo_with("PostBackUri", r#""/hook""#),
            "PostBackUri",
        ),
        bad_body(
            "DeviceId differs from the path",
            echo_with("DeviceId", r#""kiosk-2""#),
            "differs",
        ),
        bad_body(
            "ExpirationDateTime is in the past",
            echo_with("ExpirationDateTime", r#""2001-01-01T00:00:00Z""#),
            "in the past",
        ),
        bad_body(
            "ExpirationDateTime is not a date",
            echo_with("ExpirationDateTime", r#""soon""#),
            "ISO 8601",
        ),
        bad_body(
            "LaunchUri without uri",
            r#"{"Type":"LaunchUri","Payload":{}}"#,
            "Payload.uri is required",
        ),
        bad_body(
            "text property too long",
            echo_with("PackageFamilyName", &format!("\"{}\"", "p".repeat(1025))),
            "maximum is 1024",
        ),
        bad_body(
            "text with a control character",
            echo_with("PackageFamilyName", r#""a\u0007b""#),
            "control characters",
        ),
        Case {
            path: "/commands".to_owned(),
            ..bad_body(
                "DeviceId is missing on /commands",
                ECHO,
                "DeviceId is required",
            )
        },
        Case {
            path: "/commands".to_owned(),
            ..bad_body(
                "DeviceId in the body is invalid",
                echo_with("DeviceId", r#""a/b""#),
                "DeviceId is invalid",
            )
        },
        post(
            "body is larger than the limit",
            echo_with(
                "Payload",
                &format!("{{\"x\":\"{}\"}}", "y".repeat(300 * 1024)),
            ),
            413,
            "requestEntityTooLarge",
            "larger than",
        ),
        // Headers.
        with_header(
            post(
                "Content-Type is text/plain",
                ECHO,
                415,
                "unsupportedMediaType",
                "application/json",
            ),
            "content-type",
            "text/plain",
        ),
        with_header(
            post(
                "Content-Type is form data",
                ECHO,
                415,
                "unsupportedMediaType",
                "application/json",
            ),
            "content-type",
            "application/x-www-form-urlencoded",
        ),
        with_header(
            post(
                "Content-Encoding is gzip",
                ECHO_GZIP,
                415,
                "unsupportedMediaType",
                "Content-Encoding \"gzip\" is not supported; send the body uncompressed",
            ),
            "content-encoding",
            "gzip",
        ),
        with_header(
            post(
                "Content-Encoding lists br after identity",
                ECHO,
                415,
                "unsupportedMediaType",
                "Content-Encoding \"identity, br\"",
            ),
            "content-encoding",
            "identity, br",
        ),
        with_header(
            bad_body("Idempotency-Key is empty", ECHO, "Idempotency-Key"),
            "idempotency-key",
            "",
        ),
        with_header(
            bad_body("Idempotency-Key is too long", ECHO, "256 bytes"),
            "idempotency-key",
            "k".repeat(256),
        ),
        with_header(
            bad_body("Idempotency-Key is not ASCII", ECHO, "0xc3"),
            "idempotency-key",
            "é".as_bytes(),
        ),
        with_header(
            post(
                "Authorization is missing",
                ECHO,
                401,
                "unauthenticated",
                "missing Authorization",
            ),
            "authorization",
            "",
        ),
        with_header(
            post(
                "Authorization is Basic",
                ECHO,
                401,
                "unauthenticated",
                "Bearer",
            ),
            "authorization",
            "Basic YWxpY2U6cHc=",
        ),
        with_header(
            post(
                "bearer token is garbage",
                ECHO,
                401,
                "unauthenticated",
                "invalid",
            ),
            "authorization",
            "Bearer not.a.token",
        ),
        with_header(
            get(
                "token lacks the scope",
                DEVICE_COMMANDS,
                403,
                "accessDenied",
                "Device.Command",
            ),
            "authorization",
            format!("Bearer {}", token_without_scope()),
        ),
        // Paths.
        post(
            "device id with an encoded slash",
            ECHO,
            400,
            "badRequest",
            "'/'",
        )
        .at("/devices/a%2Fb/commands"),
        get(
            "device id with an encoded NUL",
            "/devices/a%00b/commands",
            400,
            "badRequest",
            "deviceId",
        ),
        get(
            "device id is an encoded space",
            "/devices/%20/commands",
            400,
            "badRequest",
            "deviceId",
        ),
        get(
            "device id is double encoded",
            "/devices/a%252Fb/commands",
            400,
            "badRequest",
            "'%'",
        ),
        get(
            "device id is not ASCII",
            "/devices/%C3%A9/commands",
            400,
            "badRequest",
            "deviceId",
        ),
        get(
            "device id is invalid UTF-8",
            "/devices/%FF/commands/0190a0b2-7c3d-7e4f-8a9b-0c1d2e3f4a5b",
            400,
            "badRequest",
            "URL path",
        ),
        get(
            "device id is too long",
            format!("/devices/{}/commands", "d".repeat(129)),
            400,
            "badRequest",
            "maximum is 128",
        ),
        get(
            "command id is not a UUID",
            format!("{DEVICE_COMMANDS}/42"),
            400,
            "badRequest",
            "not a UUID",
        ),
        get(
            "command does not exist",
            format!("/commands/{unknown_id}"),
            404,
            "itemNotFound",
            "was not found",
        ),
        post(
            "cancel of an unknown command",
            "",
            404,
            "itemNotFound",
            "was not found",
        )
        .at(&format!("/commands/{unknown_id}/cancel")),
        get(
            "route does not exist",
            "/commands/x/y/z",
            404,
            "itemNotFound",
            "no such route",
        ),
        Case {
            method: Method::DELETE,
            ..get(
                "method is not allowed",
                DEVICE_COMMANDS,
                405,
                "methodNotAllowed",
                "method",
            )
        },
        Case {
            method: Method::PUT,
            ..get(
                "PUT on a command",
                format!("/commands/{unknown_id}"),
                405,
                "methodNotAllowed",
                "method",
            )
        },
        // Query options.
        bad_query("$top is zero", "$top=0", "from 1 to 1000"),
        bad_query("$top is above the maximum", "$top=1001", "from 1 to 1000"),
        bad_query("$top is not a number", "$top=ten", "from 1 to 1000"),
        bad_query("$top is negative", "$top=-5", "from 1 to 1000"),
        bad_query("$top appears twice", "$top=5&$top=6", "more than once"),
        bad_query(
            "$orderby is unsupported",
            "$orderby=CreatedDateTime%20asc",
            "$orderby is not supported",
        ),
        bad_query(
            "$skip is unsupported",
            "$skip=100",
            "$skip is not supported",
        ),
        bad_query(
            "$select is unsupported",
            "$select=id",
            "$select is not supported",
        ),
        bad_query(
            "$count is unsupported",
            "$count=true",
            "$count is not supported",
        ),
        bad_query("unknown option", "colour=red", "\"colour\""),
        bad_query("option without $", "top=5", "did you mean $top"),
        bad_query("$filter is empty", "$filter=", "clause is expected"),
        bad_query(
            "$filter on an unknown property",
            "$filter=DeviceId%20eq%20'kiosk-1'",
            "\"DeviceId\"",
        ),
        bad_query(
            "$filter with or",
            "$filter=Status%20eq%20'queued'%20or%20Status%20eq%20'executing'",
            "\"or\"",
        ),
        bad_query(
            "$filter with an unknown status",
            "$filter=Status%20eq%20'done'",
            "'done'",
        ),
        bad_query(
            "$filter with an unquoted status",
            "$filter=Status%20eq%20queued",
            "single quotes",
        ),
        bad_query(
            "$filter with a bad date",
            "$filter=CreatedDateTime%20gt%20yesterday",
            "ISO 8601",
        ),
        bad_query(
            "$filter with an unclosed string",
            "$filter=Status%20eq%20'queued",
            "never closed",
        ),
        bad_query(
            "$skiptoken is garbage",
            "$skiptoken=!!!",
            "$skiptoken is invalid",
        ),
        bad_query(
            "$skiptoken is not a page token",
            "$skiptoken=aGVsbG8",
            "$skiptoken is invalid",
        ),
    ]
}

impl Case {
    fn at(mut self, path: &str) -> Self {
        path.clone_into(&mut self.path);
        self
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_requests_get_precise_errors() {
    let env = TestEnv::new(BrokerKind::Memory).await;
    let server = env.serve(&[]).await;
    let cases = cases();
    assert!(cases.len() >= 40, "only {} cases", cases.len());

    let mut failures = Vec::new();
    for case in &cases {
        let mut request = server
            .http
            .request(case.method.clone(), server.url(&case.path))
            .body(case.body.clone());
        let overrides = |name: &str| case.headers.iter().any(|(header, _)| *header == name);
        if !overrides("content-type") {
            request = request.header("content-type", "application/json");
        }
        if !overrides("authorization") {
            request = request.bearer_auth(&server.token);
        }
        for (name, value) in &case.headers {
            if value.is_empty() && *name == "authorization" {
                continue; // the case leaves the header out
            }
            request = request.header(
                HeaderName::from_static(name),
                HeaderValue::from_bytes(value).unwrap(),
            );
        }
        let response = server.send(request).await;

        let body: serde_json::Value = serde_json::from_str(&response.text).unwrap_or_default();
        let error = &body["error"];
        let message = error["message"].as_str().unwrap_or_default();
        let problems = [
            (response.status >= 500, "a server error"),
            (response.status != case.status, "another status"),
            (error["code"] != case.code, "another code"),
            (
                !message.contains(case.mentions),
                "a message without the expected text",
            ),
            (
                !error["innerError"]["request-id"].is_string(),
                "no request-id",
            ),
        ];
        for (failed, what) in problems {
            if failed {
                failures.push(format!(
                    "{}: {what}: expected {} {} mentioning {:?}, got {} {}",
                    case.name,
                    case.status,
                    case.code,
                    case.mentions,
                    response.status,
                    response.text
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test(flavor = "multi_thread")]
async fn stalled_body_gets_408() {
    use std::time::{Duration, Instant};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mut env = TestEnv::new(BrokerKind::Memory).await;
    env.set_serve_flag("--request-timeout", "1s");
    let server = env.serve(&[]).await;
    let address = server.base.trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
    // The headers promise 1000 bytes, and the client sends 9 and stops.
    let head = format!(
        "POST {DEVICE_COMMANDS} HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"Type\":",
        server.token
    );
    stream.write_all(head.as_bytes()).await.unwrap();

    let started = Instant::now();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buffer = [0u8; 4096];
        loop {
            let count = stream.read(&mut buffer).await.unwrap_or(0);
            if count == 0 {
                break;
            }
            answer.extend_from_slice(&buffer[..count]);
            if answer.windows(2).any(|pair| pair == b"}}") {
                break;
            }
        }
    })
    .await;
    assert!(read.is_ok(), "no answer within 10 s");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("\"code\":\"requestTimeout\""), "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}
