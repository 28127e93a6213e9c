//! Entry points of the `dispatcher` subcommands, kept out of `main.rs` so
//! that the binary only parses arguments.

use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::agent::handlers::Handlers;
use crate::agent::runner::{self, AgentSettings};
use crate::api::AppState;
use crate::api::auth::JwtKeys;
use crate::broker::{Broker, Topology};
use crate::cli::{AgentArgs, BrokerArgs, ServeArgs, TokenArgs, read_or_create_secret};
use crate::domain::DeviceId;
use crate::net::address::AllowedNetworks;
use crate::postback::client::{ClientConfig, PostbackClient};
use crate::postback::schedule::RetrySchedule;
use crate::postback::signature::{WebhookSecrets, generate_secret};
use crate::server::{Handoff, SenderSettings, ServerContext, Service};
use crate::store::{PoolSettings, Store};

/// `dispatcher serve`.
pub async fn serve(args: ServeArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    // First, so that an invalid broker setting stops the start before any
    // file or database is created.
    let broker = broker_from(
        &args.broker,
        &format!("dispatcher serve ({})", args.broker.amqp_prefix),
    )?;
    let data_dir = &args.common.data_dir;
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create the data directory {}", data_dir.display()))?;
    let keys = JwtKeys::new(&args.common.jwt_secret()?);
    let allowed_networks = AllowedNetworks::parse(&args.postback_allowed_networks)
        .map_err(|error| anyhow::anyhow!("invalid --postback-allowed-networks: {error}"))?;
    let agents = args
        .agents
        .iter()
        .map(|device| {
            DeviceId::parse(device)
                .map_err(|error| anyhow::anyhow!("invalid --agent {device:?}: {error}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let handlers = load_handlers(args.handlers.as_deref())?;

    let database_url = args
        .database_url
        .clone()
        .unwrap_or_else(|| Store::default_sqlite_url(data_dir));
    let pool = PoolSettings {
        max_connections: args.database_max_connections,
        acquire_timeout: args.database_acquire_timeout,
    };
    let store = Store::connect(&database_url, &pool)
        .await
        .context("cannot open the database")?;

    let state = AppState {
        store: store.clone(),
        broker: broker.clone(),
        keys,
        allowed_networks,
        default_ttl: args.default_ttl.0,
        relay_wake: Arc::new(Notify::new()),
        postback_wake: Arc::new(Notify::new()),
        max_unfinished_per_device: args.max_unfinished_per_device,
        idempotency_ttl: args.idempotency_ttl,
        request_timeout: args.request_timeout,
    };
    let context = Arc::new(ServerContext {
        store,
        broker: broker.clone(),
        postback_wake: state.postback_wake.clone(),
        postback_every_transition: args.postback_every_transition,
        postback_handoff: Handoff::new(args.postback_timeout),
    });
    let postbacks = postback_sender(&args, &state.allowed_networks)?;
    let mut workers = Service::server_workers(&context, &state, postbacks, &shutdown);
    for device in agents {
        let settings = AgentSettings {
            journal_path: journal_path(data_dir, &device),
            device,
            handlers: handlers.clone(),
        };
        let (broker, shutdown) = (broker.clone(), shutdown.clone());
        workers.push(Box::pin(async move {
            let device = settings.device.clone();
            if let Err(error) = runner::run(broker, settings, shutdown).await {
                tracing::error!(device_id = %device, error = format!("{error:#}"), "in-process agent failed");
            }
        }));
    }

    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let address = listener.local_addr()?;
    // Printed on stdout, apart from the logs, so that scripts and tests can
    // read the port when they asked for port 0.
    println!("dispatcher listening on http://{address}");
    tracing::info!(
        %address,
        broker = broker_kind(&broker),
        backend = ?context.store.backend(),
        postback_every_transition = context.postback_every_transition,
        "dispatcher serving"
    );
    Service {
        state,
        context,
        workers,
    }
    .run(listener, shutdown)
    .await
}

/// The webhook client and sender settings from the serve flags; generates
/// a signing secret into the data directory when none is configured.
fn postback_sender(
    args: &ServeArgs,
    allowed: &AllowedNetworks,
) -> anyhow::Result<(PostbackClient, SenderSettings)> {
    let secrets_text = match &args.webhook_secrets {
        Some(list) => list.clone(),
        None => read_or_create_secret(
            &args.common.data_dir.join("webhook-secret"),
            generate_secret,
        )?,
    };
    let secrets = WebhookSecrets::parse(&secrets_text)
        .map_err(|error| anyhow::anyhow!("invalid webhook secrets: {error}"))?;
    // An empty list would send every postback unsigned.
    anyhow::ensure!(
        !secrets.is_empty(),
        "--webhook-secrets (DISPATCHER_WEBHOOK_SECRETS) is set but names no secret; give whsec_ secrets, or unset it to have one generated into the data directory"
    );
    let schedule = match &args.postback_retry_delays {
        Some(list) => RetrySchedule::parse(list)
            .map_err(|error| anyhow::anyhow!("invalid --postback-retry-delays: {error}"))?,
        None => RetrySchedule::default(),
    };
    let mut config = ClientConfig::new(allowed.clone());
    config.attempt_timeout = args.postback_timeout;
    config.per_host_concurrency = usize::from(args.postback_max_per_receiver);
    let client =
        PostbackClient::try_new(config).context("cannot build the postback HTTP client")?;
    let settings = SenderSettings {
        secrets,
        schedule,
        attempt_timeout: args.postback_timeout,
        max_in_flight: usize::from(args.postback_max_in_flight),
        max_in_flight_per_host: usize::from(args.postback_max_per_receiver),
    };
    Ok((client, settings))
}

/// `dispatcher agent`.
pub async fn agent(args: AgentArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let device = DeviceId::parse(&args.device)
        .map_err(|error| anyhow::anyhow!("invalid --device {:?}: {error}", args.device))?;
    anyhow::ensure!(
        args.broker.amqp_url.is_some(),
        "dispatcher agent needs --amqp-url (or DISPATCHER_AMQP_URL); with the in-process broker, run agents inside serve with --agent {device}"
    );
    let handlers = load_handlers(args.handlers.as_deref())?;
    let broker = broker_from(
        &args.broker,
        &format!("dispatcher agent {device} ({})", args.broker.amqp_prefix),
    )?;
    let settings = AgentSettings {
        journal_path: journal_path(&args.common.data_dir, &device),
        device,
        handlers,
    };
    let result = runner::run(broker.clone(), settings, shutdown).await;
    broker.close().await;
    result
}

/// `dispatcher token`.
pub fn token(args: TokenArgs) -> anyhow::Result<String> {
    anyhow::ensure!(!args.subject.is_empty(), "--subject must not be empty");
    JwtKeys::new(&args.common.jwt_secret()?).issue(&args.subject, args.lifetime)
}

fn broker_from(args: &BrokerArgs, connection_name: &str) -> anyhow::Result<Broker> {
    let topology = Topology::new(&args.amqp_prefix, args.queue_type)
        .map_err(|error| anyhow::anyhow!(error))?;
    Broker::new(args.amqp_url.as_deref(), topology, connection_name)
        .map_err(|error| anyhow::anyhow!("invalid --amqp-url (DISPATCHER_AMQP_URL): {error}"))
}

fn load_handlers(path: Option<&std::path::Path>) -> anyhow::Result<Handlers> {
    match path {
        Some(path) => Handlers::load(path),
        None => Ok(Handlers::builtin()),
    }
}

fn journal_path(data_dir: &std::path::Path, device: &DeviceId) -> std::path::PathBuf {
    data_dir.join("journals").join(format!("{device}.jsonl"))
}

fn broker_kind(broker: &Broker) -> &'static str {
    match broker {
        Broker::Amqp(_) => "rabbitmq",
        Broker::Memory(_) => "in-process",
    }
}

/// Cancels `token` on SIGTERM or Ctrl-C.
pub fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut terminate =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(signal) => signal,
                    Err(error) => {
                        tracing::error!(%error, "cannot listen for SIGTERM");
                        let _ = ctrl_c.await;
                        token.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {}
                _ = terminate.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("stop requested; finishing work in flight");
        token.cancel();
    });
}
