//! Startup of the real binary. Settings that can never work stop `serve`
//! and `agent` at once with a message. A broker that cannot be reached yet
//! is retried with a warning per attempt. Log colours follow the terminal
//! and `NO_COLOR`. Boolean variables take the usual spellings.

mod common;

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use common::wait_until;
use tokio::net::TcpListener;
use tokio::process::Command;

/// How long a process that must stop at once may take, which includes the
/// start of a debug build.
const EXIT_WITHIN: Duration = Duration::from_secs(20);

/// Returns `program` with a data directory for `dispatcher`, without any
/// `DISPATCHER_` variable of the environment the tests run in, and with
/// stdout and stderr captured.
fn command_with_data_dir(program: &str, data_dir: &Path) -> Command {
    let mut command = Command::new(program);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("DISPATCHER_") {
            command.env_remove(name);
        }
    }
    command
        .env("DISPATCHER_DATA_DIR", data_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// Returns the `dispatcher` command, prepared as [`command_with_data_dir`] does.
fn dispatcher(data_dir: &Path) -> Command {
    command_with_data_dir(env!("CARGO_BIN_EXE_dispatcher"), data_dir)
}

/// Runs `command` and returns its output, or panics when it is still
/// running after [`EXIT_WITHIN`].
async fn output_within_deadline(command: &mut Command, case: &str) -> Output {
    tokio::time::timeout(EXIT_WITHIN, command.output())
        .await
        .unwrap_or_else(|_| panic!("{case}: still running after {EXIT_WITHIN:?}"))
        .expect("dispatcher runs")
}

#[tokio::test]
async fn invalid_amqp_url_stops_start() {
    let cases = [
        (
            "http://127.0.0.1:5672/%2f",
            "the URL has the scheme \"http\"",
        ),
        (
            "amqp://user:s3cret@127.0.0.1:99999/%2f",
            "the URL is not a valid URL: invalid port number",
        ),
        (
            "amqp://127.0.0.1:5672/,,amqp://127.0.0.1:5673/",
            "node 2 of 3 is empty",
        ),
        ("amqp://127.0.0.1:5672/,", "node 2 of 2 is empty"),
    ];
    for (url, reason) in cases {
        for subcommand in ["serve", "agent"] {
            let case = format!("{subcommand} --amqp-url {url}");
            let data_dir = tempfile::tempdir().expect("temp dir");
            let mut command = dispatcher(data_dir.path());
            command.arg(subcommand).args(["--amqp-url", url]);
            if subcommand == "serve" {
                command.args(["--listen", "127.0.0.1:0"]);
            } else {
                command.args(["--device", "kiosk-1"]);
            }

            let output = output_within_deadline(&mut command, &case).await;

            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(
                !output.status.success(),
                "{case}: exit status {}",
                output.status
            );
            let expected =
                format!("dispatcher: invalid --amqp-url (DISPATCHER_AMQP_URL): {reason}");
            assert!(stderr.contains(&expected), "{case}: stderr {stderr}");
            assert!(!stderr.contains("s3cret"), "{case}: stderr {stderr}");
            assert!(output.stdout.is_empty(), "{case}: printed on stdout");
            let created: Vec<_> = std::fs::read_dir(data_dir.path())
                .expect("read the data directory")
                .collect();
            assert!(created.is_empty(), "{case}: created {created:?}");
        }
    }
}

#[tokio::test]
async fn unreachable_broker_is_retried_with_warnings() {
    // A server that accepts connections and closes them at once, so that
    // every AMQP handshake fails.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("local address");
    let closer = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            drop(stream);
        }
    });
    let data_dir = tempfile::tempdir().expect("temp dir");
    let log_path = data_dir.path().join("agent.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let mut agent = dispatcher(data_dir.path())
        .args(["agent", "--device", "kiosk-1"])
        .args(["--amqp-url", &format!("amqp://guest:guest@{address}/%2f")])
        .stderr(log)
        .spawn()
        .expect("spawn dispatcher agent");

    let expected = format!("cannot connect to {address}");
    let warnings = || {
        std::fs::read_to_string(&log_path)
            .unwrap_or_default()
            .lines()
            .filter(|line| line.contains("WARN") && line.contains(&expected))
            .count()
    };
    let retried = wait_until(EXIT_WITHIN, || async { warnings() >= 3 }).await;

    let still_running = agent.try_wait().expect("poll the agent").is_none();
    agent.kill().await.expect("kill the agent");
    closer.abort();
    let log_text = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(
        !log_text.contains('\u{1b}'),
        "ANSI codes in a log file:\n{log_text}"
    );
    assert!(
        retried,
        "{} warnings naming {address} within {EXIT_WITHIN:?}; log:\n{log_text}",
        warnings()
    );
    assert!(still_running, "the agent stopped; log:\n{log_text}");
}

/// Runs `dispatcher token` with a fresh data directory, so that it logs the
/// secret file it generates, and returns what it wrote on its terminal or,
/// with `terminal` false, on stderr. `script` (util-linux) gives it a
/// pseudo-terminal.
async fn token_log(terminal: bool, no_color: Option<&str>) -> String {
    let data_dir = tempfile::tempdir().expect("temp dir");
    let binary = env!("CARGO_BIN_EXE_dispatcher");
    let mut command = if terminal {
        let mut script = command_with_data_dir("script", data_dir.path());
        script.args([
            "-qec",
            &format!("{binary} token --subject alice"),
            "/dev/null",
        ]);
        script
    } else {
        let mut token = dispatcher(data_dir.path());
        token.args(["token", "--subject", "alice"]);
        token
    };
    command.env_remove("NO_COLOR");
    if let Some(value) = no_color {
        command.env("NO_COLOR", value);
    }
    let case = format!("terminal {terminal}, NO_COLOR {no_color:?}");

    let output = output_within_deadline(&mut command, &case).await;

    assert!(
        output.status.success(),
        "{case}: exit status {}",
        output.status
    );
    let text = if terminal {
        String::from_utf8_lossy(&output.stdout).into_owned()
    } else {
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    assert!(
        text.contains("generated a new secret file"),
        "{case}: {text}"
    );
    text
}

#[tokio::test]
async fn log_colors_follow_terminal_and_no_color() {
    const ESCAPE: char = '\u{1b}';
    let cases = [
        (false, None, false),
        (true, None, true),
        (true, Some("1"), false),
        (true, Some(""), true),
    ];
    for (terminal, no_color, colored) in cases {
        let text = token_log(terminal, no_color).await;
        assert_eq!(
            text.contains(ESCAPE),
            colored,
            "terminal {terminal}, NO_COLOR {no_color:?}: {text:?}"
        );
    }
}

/// Starts `dispatcher serve` with `DISPATCHER_POSTBACK_EVERY_TRANSITION`
/// set to `value`, and returns the setting that its start log line shows.
async fn every_transition_setting(value: &str) -> String {
    let data_dir = tempfile::tempdir().expect("temp dir");
    let log_path = data_dir.path().join("serve.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let mut serve = dispatcher(data_dir.path())
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("DISPATCHER_POSTBACK_EVERY_TRANSITION", value)
        .stderr(log)
        .spawn()
        .expect("spawn dispatcher serve");

    let field = "postback_every_transition=";
    let start_line = || {
        std::fs::read_to_string(&log_path)
            .unwrap_or_default()
            .lines()
            .find(|line| line.contains("dispatcher serving"))
            .map(str::to_owned)
    };
    let started = wait_until(EXIT_WITHIN, || async { start_line().is_some() }).await;
    serve.kill().await.expect("kill serve");
    let log_text = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(started, "{value:?}: serve did not start; log:\n{log_text}");

    let line = start_line().expect("the start line was found");
    let setting = line
        .split_whitespace()
        .find_map(|word| word.strip_prefix(field))
        .unwrap_or_else(|| panic!("{value:?}: no {field} in {line}"));
    setting.to_owned()
}

#[tokio::test]
async fn boolean_variable_takes_usual_forms() {
    let forms = [
        ("1", "true"),
        ("0", "false"),
        ("yes", "true"),
        ("no", "false"),
        ("ON", "true"),
        ("off", "false"),
        ("true", "true"),
        ("False", "false"),
    ];
    for (value, expected) in forms {
        let setting = every_transition_setting(value).await;
        assert_eq!(
            setting, expected,
            "DISPATCHER_POSTBACK_EVERY_TRANSITION={value}"
        );
    }
}

#[tokio::test]
async fn invalid_boolean_variable_stops_start() {
    for value in ["maybe", "2"] {
        let case = format!("DISPATCHER_POSTBACK_EVERY_TRANSITION={value}");
        let data_dir = tempfile::tempdir().expect("temp dir");
        let mut command = dispatcher(data_dir.path());
        command
            .args(["serve", "--listen", "127.0.0.1:0"])
            .env("DISPATCHER_POSTBACK_EVERY_TRANSITION", value);

        let output = output_within_deadline(&mut command, &case).await;

        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success(),
            "{case}: exit status {}",
            output.status
        );
        let expected = format!(
            "invalid value '{value}' for '--postback-every-transition': use true or false, 1 or 0, yes or no, on or off"
        );
        assert!(stderr.contains(&expected), "{case}: stderr {stderr}");
    }
}
