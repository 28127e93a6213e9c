//! Command-line settings. Every flag can also come from the environment
//! variable shown in `--help`; flags win over the environment.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::broker::QueueKind;

#[derive(Debug, Parser)]
#[command(
    name = "dispatcher",
    version,
    about = "Delivers commands to devices over AMQP and reports how they ended."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: CliCommand,
}

// The enum is built once per process, so the size of its largest variant
// costs nothing worth boxing for.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum CliCommand {
    /// Run the HTTP API and the server-side workers.
    Serve(ServeArgs),
    /// Run the device-side consumer for one device.
    Agent(AgentArgs),
    /// Print a bearer token signed with the configured secret.
    Token(TokenArgs),
}

/// Settings shared by every subcommand.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// Directory for the SQLite file, generated secrets and agent journals.
    #[arg(long, env = "DISPATCHER_DATA_DIR", default_value = "data")]
    pub data_dir: PathBuf,

    /// HS256 secret for bearer tokens. Unset: a secret generated into
    /// DATA_DIR/jwt-secret on first use.
    #[arg(long, env = "DISPATCHER_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
}

/// Broker settings shared by `serve` and `agent`.
#[derive(Debug, Clone, Args)]
pub struct BrokerArgs {
    /// RabbitMQ URL, such as amqp://user:pass@127.0.0.1:5672/%2f, or several
    /// separated by commas for the nodes of a cluster, tried in turn. Unset:
    /// the in-process broker (only in-process agents can reach it).
    #[arg(long, env = "DISPATCHER_AMQP_URL", hide_env_values = true)]
    pub amqp_url: Option<String>,

    /// Prefix of every exchange and queue name.
    #[arg(long, env = "DISPATCHER_AMQP_PREFIX", default_value = "dispatcher")]
    pub amqp_prefix: String,

    /// Kind of RabbitMQ queue for devices and reports: quorum for clusters.
    #[arg(long, env = "DISPATCHER_QUEUE_TYPE", value_enum, default_value_t = QueueKind::Classic)]
    pub queue_type: QueueKind,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub broker: BrokerArgs,

    /// Address the HTTP API listens on; port 0 picks a free port, printed at start.
    #[arg(long, env = "DISPATCHER_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Database URL: sqlite://PATH?mode=rwc or postgres://…. Unset: a SQLite
    /// file in the data directory.
    #[arg(long, env = "DISPATCHER_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// Most database connections in the pool.
    #[arg(long, env = "DISPATCHER_DATABASE_MAX_CONNECTIONS", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    pub database_max_connections: u32,

    /// How long a request waits for a free database connection before it
    /// fails with 503, such as 5s.
    #[arg(long, env = "DISPATCHER_DATABASE_ACQUIRE_TIMEOUT", default_value = "5s", value_parser = parse_positive_duration)]
    pub database_acquire_timeout: Duration,

    /// Also run an in-process agent for this device (repeatable).
    #[arg(long = "agent", value_name = "DEVICE_ID")]
    pub agents: Vec<String>,

    /// Handlers file for the in-process agents; see docs/handlers.md.
    #[arg(long, env = "DISPATCHER_HANDLERS")]
    pub handlers: Option<PathBuf>,

    /// Networks postbacks may reach although they are not public, as a
    /// comma-separated CIDR list such as 127.0.0.0/8,::1/128.
    #[arg(long, env = "DISPATCHER_POSTBACK_ALLOWED_NETWORKS", default_value = "")]
    pub postback_allowed_networks: String,

    /// Comma-separated whsec_ secrets that sign postbacks; every attempt is
    /// signed with each. Unset: one generated into DATA_DIR/webhook-secret.
    #[arg(long, env = "DISPATCHER_WEBHOOK_SECRETS", hide_env_values = true)]
    pub webhook_secrets: Option<String>,

    /// Delays between postback attempts, such as 1s,5s,30s. Unset: the
    /// default schedule in docs/webhooks.md.
    #[arg(long, env = "DISPATCHER_POSTBACK_RETRY_DELAYS")]
    pub postback_retry_delays: Option<String>,

    /// Deadline of one postback attempt, from connect to the end of the response.
    #[arg(long, env = "DISPATCHER_POSTBACK_TIMEOUT", default_value = "10s", value_parser = parse_positive_duration)]
    pub postback_timeout: Duration,

    /// Postback attempts in flight at once, across all receivers.
    #[arg(long, env = "DISPATCHER_POSTBACK_MAX_IN_FLIGHT", default_value_t = 64,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub postback_max_in_flight: u16,

    /// Postback attempts in flight at once to one receiver (scheme, host and
    /// port), so that a slow receiver is not flooded and cannot take every
    /// slot from the others.
    #[arg(long, env = "DISPATCHER_POSTBACK_MAX_PER_RECEIVER", default_value_t = 16,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub postback_max_per_receiver: u16,

    /// Post back on every status change, not only when the command is final.
    /// The variable takes true/false, 1/0, yes/no or on/off.
    #[arg(long, env = "DISPATCHER_POSTBACK_EVERY_TRANSITION", value_parser = parse_bool)]
    pub postback_every_transition: bool,

    /// Expiry of commands that name no ExpirationDateTime, such as 24h;
    /// "none" means they never expire.
    #[arg(long, env = "DISPATCHER_DEFAULT_TTL", default_value = "24h", value_parser = parse_ttl)]
    pub default_ttl: Ttl,

    /// Maximum number of unfinished (queued, sentToTarget or executing)
    /// commands per device; a create beyond it is rejected with 429.
    #[arg(long, env = "DISPATCHER_MAX_UNFINISHED_PER_DEVICE", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_unfinished_per_device: u32,

    /// How long an Idempotency-Key is remembered after the create that used
    /// it, such as 24h; a sweep deletes older keys.
    #[arg(long, env = "DISPATCHER_IDEMPOTENCY_TTL", default_value = "24h", value_parser = parse_positive_duration)]
    pub idempotency_ttl: Duration,

    /// Time for a request from its headers to the response, the body's
    /// arrival included; a request over it gets 408.
    #[arg(long, env = "DISPATCHER_REQUEST_TIMEOUT", default_value = "30s", value_parser = parse_positive_duration)]
    pub request_timeout: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct AgentArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub broker: BrokerArgs,

    /// The device whose queue this agent consumes.
    #[arg(long, env = "DISPATCHER_DEVICE")]
    pub device: String,

    /// Handlers file; see docs/handlers.md. Unset: only the built-in echo.
    #[arg(long, env = "DISPATCHER_HANDLERS")]
    pub handlers: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    #[command(flatten)]
    pub common: CommonArgs,

    /// The token's subject (`sub`): the user that /me routes belong to.
    #[arg(long)]
    pub subject: String,

    /// How long the token is valid, such as 24h.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub lifetime: Duration,
}

/// A default command lifetime, or none.
#[derive(Debug, Clone, Copy)]
pub struct Ttl(pub Option<Duration>);

fn parse_ttl(value: &str) -> Result<Ttl, String> {
    if value.eq_ignore_ascii_case("none") {
        return Ok(Ttl(None));
    }
    let duration = humantime::parse_duration(value)
        .map_err(|error| format!("{error}; use a duration such as 24h, or none"))?;
    if duration.is_zero() {
        return Err(
            "a default TTL of zero would expire every command at once; use none to disable expiry"
                .into(),
        );
    }
    Ok(Ttl(Some(duration)))
}

/// Parses the value of a boolean flag, which comes from its environment
/// variable: true/false, 1/0, yes/no or on/off, in any letter case.
fn parse_bool(value: &str) -> Result<bool, String> {
    match value.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err("use true or false, 1 or 0, yes or no, on or off".to_owned()),
    }
}

fn parse_positive_duration(value: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(value)
        .map_err(|error| format!("{error}; use a duration such as 24h"))?;
    if duration.is_zero() {
        return Err("the duration must be longer than zero".into());
    }
    Ok(duration)
}

impl CommonArgs {
    /// The configured JWT secret, or the one in the data directory, created
    /// on first use with mode 0600.
    pub fn jwt_secret(&self) -> anyhow::Result<Vec<u8>> {
        if let Some(secret) = &self.jwt_secret {
            anyhow::ensure!(
                secret.len() >= 32,
                "the JWT secret must be at least 32 bytes long"
            );
            return Ok(secret.as_bytes().to_vec());
        }
        let generated = read_or_create_secret(&self.data_dir.join("jwt-secret"), || {
            let bytes: [u8; 32] = rand::random();
            bytes.iter().map(|byte| format!("{byte:02x}")).collect()
        })?;
        Ok(generated.into_bytes())
    }
}

/// Reads a secret file, or writes a new secret into it readable by the
/// owner only. The secret itself is never logged.
pub fn read_or_create_secret(
    path: &Path,
    generate: impl FnOnce() -> String,
) -> anyhow::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(text) => return Ok(text.trim().to_owned()),
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
            anyhow::bail!("cannot read the secret file {}: {error}", path.display())
        }
        Err(_) => {}
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|error| {
            anyhow::anyhow!(
                "cannot create the data directory {}: {error}",
                parent.display()
            )
        })?;
    }
    write_private(path, &generate())?;
    tracing::info!(path = %path.display(), "generated a new secret file");
    // Read back rather than return the generated value: another process
    // may have created the file first.
    let text = std::fs::read_to_string(path).map_err(|error| {
        anyhow::anyhow!("cannot read the secret file {}: {error}", path.display())
    })?;
    Ok(text.trim().to_owned())
}

#[cfg(unix)]
fn write_private(path: &Path, secret: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    // create_new: two processes starting at once must not overwrite each
    // other's secret; the loser reads the winner's.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path);
    match file {
        Ok(mut file) => {
            file.write_all(secret.as_bytes())?;
            file.sync_all()?;
            Ok(())
        }
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(error) => anyhow::bail!("cannot write the secret file {}: {error}", path.display()),
    }
}

#[cfg(not(unix))]
fn write_private(path: &Path, secret: &str) -> anyhow::Result<()> {
    std::fs::write(path, secret).map_err(|error| {
        anyhow::anyhow!("cannot write the secret file {}: {error}", path.display())
    })
}

#[cfg(test)]
mod tests {
    use clap::{ArgAction, CommandFactory};

    use super::*;

    /// Returns every argument of every subcommand that is a boolean flag
    /// and can also come from an environment variable.
    fn boolean_env_flags() -> Vec<clap::Arg> {
        let cli = Cli::command();
        let mut flags = Vec::new();
        for subcommand in cli.get_subcommands() {
            for arg in subcommand.get_arguments() {
                let boolean = matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::SetFalse);
                if boolean && arg.get_env().is_some() {
                    flags.push(arg.clone());
                }
            }
        }
        flags
    }

    /// Parses `text` with the value parser of `flag`, the one clap applies
    /// to the flag's environment variable. A flag takes no value on the
    /// command line, so a copy that takes one parses it here.
    fn parse_flag_value(flag: &clap::Arg, text: &str) -> Result<bool, clap::Error> {
        let long = flag.get_long().expect("the flag has a long name");
        let command =
            clap::Command::new("test").arg(flag.clone().action(ArgAction::Set).env(None::<&str>));
        let matches = command.try_get_matches_from(["test", &format!("--{long}={text}")])?;
        Ok(*matches
            .get_one::<bool>(flag.get_id().as_str())
            .expect("the value was given"))
    }

    #[test]
    fn boolean_env_flags_take_usual_forms() {
        let flags = boolean_env_flags();
        assert!(!flags.is_empty(), "no boolean flag with a variable found");
        let forms = [
            ("true", true),
            ("TRUE", true),
            ("1", true),
            ("yes", true),
            ("on", true),
            ("false", false),
            ("False", false),
            ("0", false),
            ("no", false),
            ("off", false),
        ];
        for flag in &flags {
            let name = flag.get_id();
            for (form, expected) in forms {
                let value = parse_flag_value(flag, form)
                    .unwrap_or_else(|error| panic!("{name} rejects {form:?}: {error}"));
                assert_eq!(value, expected, "{name} = {form:?}");
            }
            for form in ["maybe", "2", ""] {
                let parsed = parse_flag_value(flag, form);
                assert!(parsed.is_err(), "{name} accepts {form:?}: {parsed:?}");
            }
        }
    }
}
