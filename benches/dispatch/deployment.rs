//! One phase's world: a fresh data directory, database and AMQP prefix, a
//! `dispatcher serve` on them, and optionally agents for its devices.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use command_dispatcher::api::auth::JwtKeys;
use tempfile::TempDir;

use crate::agents::Agents;
use crate::backlog::Sampler;
use crate::broker_admin::BrokerAdmin;
use crate::database::{Database, outbox_len};
use crate::load::Api;
use crate::options::StoreKind;
use crate::receiver::Receiver;
use crate::server::{JWT_SECRET, Server, ServerSpec, Snapshot, Usage};
use command_dispatcher::broker::{QueueKind, Topology};

/// Settings every phase shares.
pub struct RunContext {
    pub amqp_url: String,
    pub store: StoreKind,
    pub postgres_url: Option<String>,
    /// Unique per run, so that runs sharing a broker or a PostgreSQL server
    /// never see each other's queues or databases.
    pub run_id: String,
    pub receiver: Arc<Receiver>,
    pub http: reqwest::Client,
    pub token: String,
    phases_started: std::sync::atomic::AtomicUsize,
}

impl RunContext {
    pub fn new(
        amqp_url: String,
        store: StoreKind,
        postgres_url: Option<String>,
        receiver: Receiver,
    ) -> anyhow::Result<Self> {
        let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
        let http = reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(1024)
            .build()?;
        let token =
            JwtKeys::new(JWT_SECRET.as_bytes()).issue("bench", Duration::from_secs(86_400))?;
        Ok(Self {
            amqp_url,
            store,
            postgres_url,
            run_id,
            receiver: Arc::new(receiver),
            http,
            token,
            phases_started: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// Returns a name unique to this run for a phase's prefix, database or queue.
    pub fn unique_name(&self, what: &str) -> String {
        let sequence = self
            .phases_started
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!("bench{}{what}{sequence}", self.run_id)
    }
}

/// Device ids `bench-00000`, `bench-00001`, …
pub fn device_ids(count: usize) -> Arc<Vec<String>> {
    Arc::new(
        (0..count)
            .map(|index| format!("bench-{index:05}"))
            .collect(),
    )
}

pub struct Deployment {
    pub dir: TempDir,
    pub prefix: String,
    pub devices: Arc<Vec<String>>,
    pub server: Server,
    pub api: Api,
    database: Database,
    outbox: sqlx::AnyPool,
    admin: BrokerAdmin,
    agents: Option<Agents>,
}

impl Deployment {
    pub async fn start(
        context: &RunContext,
        devices: usize,
        payload_bytes: usize,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("dispatcher-bench")
            .tempdir()
            .context("cannot create a temporary directory")?;
        let prefix = context.unique_name("p");
        // On stderr, so that an interrupted run can be cleaned up with
        // --delete-prefix.
        eprintln!("  starting a server with prefix={prefix}");
        let database = Database::fresh(
            context.store,
            context.postgres_url.as_deref(),
            dir.path(),
            &prefix,
        )
        .await?;
        let server = Server::start(&ServerSpec {
            amqp_url: &context.amqp_url,
            prefix: &prefix,
            database_url: &database.url,
            data_dir: dir.path(),
        })
        .await?;
        server.wait_ready(&context.http).await?;
        let outbox = database.pool().await?;
        let admin = BrokerAdmin::connect(&context.amqp_url, &prefix).await?;
        let api = Api::new(
            context.http.clone(),
            &server.base,
            &context.token,
            payload_bytes,
            &context.receiver.url,
        )?;
        Ok(Self {
            dir,
            prefix,
            devices: device_ids(devices),
            server,
            api,
            database,
            outbox,
            admin,
            agents: None,
        })
    }

    /// Starts an agent for every device and waits until each consumes.
    pub async fn start_agents(&mut self, context: &RunContext) -> anyhow::Result<()> {
        let journals = self.dir.path().join("journals");
        std::fs::create_dir_all(&journals)?;
        self.agents = Some(
            Agents::start(
                &context.amqp_url,
                &self.prefix,
                &self.devices,
                &journals,
                &self.admin,
            )
            .await?,
        );
        Ok(())
    }

    pub fn usage(&self) -> anyhow::Result<Usage> {
        self.server.usage()
    }

    /// Server usage, benchmark CPU and machine CPU now, with the time.
    pub fn snapshot(&self) -> anyhow::Result<(Snapshot, Instant)> {
        Ok((Snapshot::of(&self.server)?, Instant::now()))
    }

    /// Starts sampling the queues between the server's stages.
    pub async fn sample_backlog(&self, context: &RunContext) -> anyhow::Result<Sampler> {
        let topology = Topology::new(&self.prefix, QueueKind::Classic)
            .map_err(|error| anyhow::anyhow!(error))?;
        Sampler::start(
            &context.amqp_url,
            topology.reports_queue(),
            self.outbox.clone(),
        )
        .await
    }

    /// Waits until the relay has published every committed command, and
    /// returns when the outbox became empty (or `None` at the deadline).
    pub async fn wait_outbox_empty(&self, deadline: Duration) -> anyhow::Result<Option<Instant>> {
        let end = Instant::now() + deadline;
        loop {
            if outbox_len(&self.outbox).await? == 0 {
                return Ok(Some(Instant::now()));
            }
            if Instant::now() >= end {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops agents and server, deletes the broker topology and the
    /// database, and returns the server's final resource use.
    pub async fn finish(self) -> anyhow::Result<Usage> {
        if let Some(agents) = self.agents {
            agents.stop().await;
        }
        let usage = self.server.stop().await;
        self.outbox.close().await;
        let deleted = self.admin.delete_topology(&self.devices).await;
        self.admin.close().await;
        let dropped = self.database.drop_database().await;
        deleted?;
        dropped?;
        usage
    }
}
