//! The phases of a run. Each starts a fresh server (and agents where it
//! needs them), drives load, and tears everything down again.

use std::time::{Duration, Instant};

use command_dispatcher::contract::CommandMessage;
use serde_json::value::RawValue;

use crate::database::Database;
use crate::deployment::{Deployment, RunContext};
use crate::history::{Clock, stage_latencies};
use crate::load::{LoopOutcome, closed_loop, open_loop, payload_json};
use crate::options::{Options, Scale, StoreKind};
use crate::raw::{amqp_round_trips, store_commit_rate};
use crate::report::{LoopFigures, ManyDevices, MemoryFigures, RawFigures};
use crate::stats::Latency;

/// Connections of the raw PostgreSQL insert loop: the server's default pool size.
const POSTGRES_RAW_CONNECTIONS: u32 = 8;
/// Clients of the end-to-end closed loop over one device. Commands of one
/// device run one at a time, so more clients only lengthen the queue.
const SINGLE_DEVICE_WORKERS: usize = 8;
/// Maximum wait for the relay to publish every created command.
const PUBLISH_DEADLINE: Duration = Duration::from_secs(300);

/// Runs `body` on a fresh deployment and tears the deployment down whether
/// or not `body` succeeded, so that a failed phase leaves nothing behind on
/// the shared broker.
async fn in_deployment<T>(
    context: &RunContext,
    devices: usize,
    payload: usize,
    body: impl AsyncFnOnce(&mut Deployment) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let mut deployment = Deployment::start(context, devices, payload).await?;
    let result = body(&mut deployment).await;
    let finished = deployment.finish().await;
    let value = result?;
    finished?;
    Ok(value)
}

/// Measures the raw limits for one payload size.
pub async fn raw(
    context: &RunContext,
    scale: &Scale,
    payload: usize,
) -> anyhow::Result<RawFigures> {
    let body = command_message_body(payload)?;
    let queue = format!("{}.raw", context.unique_name("r"));
    let amqp = amqp_round_trips(
        &context.amqp_url,
        &queue,
        &body,
        scale.raw_serial,
        scale.raw_pipelined,
    )
    .await?;

    let dir = tempfile::Builder::new()
        .prefix("dispatcher-bench")
        .tempdir()?;
    let name = context.unique_name("s");
    let database = Database::fresh(
        context.store,
        context.postgres_url.as_deref(),
        dir.path(),
        &name,
    )
    .await?;
    let (sqlite, connections) = match context.store {
        // The server writes through a single SQLite connection.
        StoreKind::Sqlite => (true, 1),
        StoreKind::Postgres => (false, POSTGRES_RAW_CONNECTIONS),
    };
    let store_rate = store_commit_rate(
        &database.url,
        sqlite,
        &payload_json(payload)?,
        scale.raw_store_rows,
        connections,
    )
    .await;
    database.drop_database().await?;
    let figures = RawFigures {
        amqp,
        message_bytes: body.len(),
        store_rate: store_rate?,
        store_connections: connections,
    };
    println!(
        "  raw {payload} B: AMQP one at a time {} ({:.0}/s), pipelined {:.0}/s; store {:.0} commits/s",
        figures.amqp.serial,
        figures.amqp.serial_rate,
        figures.amqp.pipelined_rate,
        figures.store_rate
    );
    Ok(figures)
}

/// Builds the body of the command message that the relay publishes for a
/// command with this payload size, so that raw round trips carry the same bytes.
fn command_message_body(payload: usize) -> anyhow::Result<Vec<u8>> {
    let message = CommandMessage {
        id: uuid::Uuid::now_v7(),
        device_id: "bench-00000".to_owned(),
        command_type: "AppService".to_owned(),
        app_service_name: Some("echo".to_owned()),
        package_family_name: None,
        payload: Some(RawValue::from_string(payload_json(payload)?)?),
        permission_ticket: None,
        created: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        expiration: Some(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
    };
    Ok(serde_json::to_vec(&message)?)
}

/// Creates one command per device, so that every device queue exists and
/// the relay has declared it before the measured loop.
async fn warm_up(
    context: &RunContext,
    deployment: &Deployment,
    scale: &Scale,
    with_agents: bool,
) -> anyhow::Result<LoopOutcome> {
    let receiver = with_agents.then_some(&context.receiver);
    let workers = if with_agents {
        scale.e2e_workers
    } else {
        scale.create_workers
    };
    let devices = deployment.devices.len();
    let outcome = closed_loop(
        &deployment.api,
        &deployment.devices,
        workers,
        devices,
        PUBLISH_DEADLINE,
        receiver,
    )
    .await;
    anyhow::ensure!(
        outcome.errors == 0,
        "warm-up creates failed: {}",
        outcome.first_error.clone().unwrap_or_default()
    );
    anyhow::ensure!(
        deployment
            .wait_outbox_empty(PUBLISH_DEADLINE)
            .await?
            .is_some(),
        "the relay did not publish the warm-up commands within {PUBLISH_DEADLINE:?}"
    );
    Ok(outcome)
}

/// Create-only closed loop over `scale.devices` devices without agents:
/// commands wait in their queues.
pub async fn create(
    context: &RunContext,
    scale: &Scale,
    payload: usize,
) -> anyhow::Result<LoopFigures> {
    in_deployment(
        context,
        scale.devices,
        payload,
        async |deployment: &mut Deployment| {
            warm_up(context, deployment, scale, false).await?;
            let sampler = deployment.sample_backlog(context).await?;
            let before = deployment.snapshot()?;
            let outcome = closed_loop(
                &deployment.api,
                &deployment.devices,
                scale.create_workers,
                scale.create_commands,
                scale.phase_time,
                None,
            )
            .await;
            let after = deployment.snapshot()?;
            let mut figures = LoopFigures::new(
                format!(
                    "create only, {} devices, {payload} B, {} clients",
                    scale.devices, scale.create_workers
                ),
                deployment.devices.len(),
                &outcome,
                before,
                after,
            );
            figures.backlog = Some(sampler.stop().await?);
            figures.print();
            let published = deployment.wait_outbox_empty(PUBLISH_DEADLINE).await?;
            print_publish_rate(&outcome, published);
            Ok(figures)
        },
    )
    .await
}

fn print_publish_rate(outcome: &LoopOutcome, published: Option<Instant>) {
    let first = outcome.samples.iter().map(|s| s.sent).min();
    match (first, published) {
        (Some(first), Some(published)) => println!(
            "    relay     outbox empty {:.2} s after the first create ({:.0} commands/s)",
            (published - first).as_secs_f64(),
            crate::stats::rate(outcome.samples.len(), published - first)
        ),
        _ => println!("    relay     outbox not empty within {PUBLISH_DEADLINE:?}"),
    }
}

/// Figures of the end-to-end phase.
pub struct EndToEnd {
    pub closed: LoopFigures,
    pub open: LoopFigures,
    pub closed_stages: Vec<Latency>,
    pub open_stages: Vec<Latency>,
}

/// End-to-end closed loop over `scale.devices` devices with agents, then an
/// open loop at a fraction of its throughput on the same server, and the
/// stage timings of a sample of each loop's commands.
pub async fn end_to_end(
    context: &RunContext,
    options: &Options,
    scale: &Scale,
    payload: usize,
) -> anyhow::Result<EndToEnd> {
    in_deployment(context, scale.devices, payload, async |deployment: &mut Deployment| {
    deployment.start_agents(context).await?;
    warm_up(context, deployment, scale, true).await?;

    let clock = Clock::now();
    let sampler = deployment.sample_backlog(context).await?;
    let before = deployment.snapshot()?;
    let mut outcome = closed_loop(
        &deployment.api,
        &deployment.devices,
        scale.e2e_workers,
        scale.e2e_commands,
        scale.phase_time,
        Some(&context.receiver),
    )
    .await;
    outcome
        .collect_postbacks(&context.receiver, scale.drain_time)
        .await;
    let after = deployment.snapshot()?;
    let mut closed = LoopFigures::new(
        format!(
            "end to end, closed loop, {} devices, {payload} B, {} clients",
            scale.devices, scale.e2e_workers
        ),
        deployment.devices.len(),
        &outcome,
        before,
        after,
    );
    closed.backlog = Some(sampler.stop().await?);
    closed.print();
    let closed_stages = stage_latencies(
        &context.http,
        &deployment.server.base,
        &context.token,
        &outcome.samples,
        options.history_sample,
        clock,
    )
    .await?;

    let rate = (closed.e2e_rate * options.open_loop_fraction).max(1.0);
    let sampler = deployment.sample_backlog(context).await?;
    let before = deployment.snapshot()?;
    let mut outcome = open_loop(
        &deployment.api,
        &deployment.devices,
        rate,
        scale.open_loop_time,
    )
    .await;
    outcome
        .collect_postbacks(&context.receiver, scale.drain_time)
        .await;
    let after = deployment.snapshot()?;
    let mut open = LoopFigures::new(
        format!(
            "end to end, open loop at {rate:.0}/s ({:.0}% of the closed loop), {} devices, {payload} B",
            options.open_loop_fraction * 100.0,
            scale.devices
        ),
        deployment.devices.len(),
        &outcome,
        before,
        after,
    );
    open.backlog = Some(sampler.stop().await?);
    open.print();
    let open_stages = stage_latencies(
        &context.http,
        &deployment.server.base,
        &context.token,
        &outcome.samples,
        options.history_sample,
        clock,
    )
    .await?;
    Ok(EndToEnd {
        closed,
        open,
        closed_stages,
        open_stages,
    })
    })
    .await
}

/// End-to-end closed loop over one device with its agent.
pub async fn single_device(
    context: &RunContext,
    scale: &Scale,
    payload: usize,
) -> anyhow::Result<LoopFigures> {
    in_deployment(context, 1, payload, async |deployment: &mut Deployment| {
        deployment.start_agents(context).await?;
        warm_up(context, deployment, scale, true).await?;
        let sampler = deployment.sample_backlog(context).await?;
        let before = deployment.snapshot()?;
        let mut outcome = closed_loop(
            &deployment.api,
            &deployment.devices,
            SINGLE_DEVICE_WORKERS,
            scale.e2e_commands,
            scale.phase_time,
            Some(&context.receiver),
        )
        .await;
        outcome
            .collect_postbacks(&context.receiver, scale.drain_time)
            .await;
        let after = deployment.snapshot()?;
        let mut figures = LoopFigures::new(
            format!(
                "end to end, closed loop, 1 device, {payload} B, {SINGLE_DEVICE_WORKERS} clients"
            ),
            deployment.devices.len(),
            &outcome,
            before,
            after,
        );
        figures.backlog = Some(sampler.stop().await?);
        figures.print();
        Ok(figures)
    })
    .await
}

/// Create-only closed loop over `scale.many_devices` devices without
/// agents, after a warm-up create per device that declares every queue.
pub async fn many_devices(
    context: &RunContext,
    scale: &Scale,
    payload: usize,
) -> anyhow::Result<ManyDevices> {
    in_deployment(
        context,
        scale.many_devices,
        payload,
        async |deployment: &mut Deployment| {
            let before = deployment.snapshot()?;
            let warm = warm_up(context, deployment, scale, false).await?;
            let published = Instant::now();
            let after = deployment.snapshot()?;
            let warmup = LoopFigures::new(
                format!(
                    "warm-up: one create per device, {} devices, {payload} B, {} clients",
                    scale.many_devices, scale.create_workers
                ),
                deployment.devices.len(),
                &warm,
                before,
                after,
            );
            warmup.print();
            let first = warm.samples.iter().map(|s| s.sent).min();
            let warmup_published_after = first.map(|first| published - first);
            if let Some(elapsed) = warmup_published_after {
                println!(
                    "    relay     declared {} devices' queues and published in {:.2} s",
                    scale.many_devices,
                    elapsed.as_secs_f64()
                );
            }

            let sampler = deployment.sample_backlog(context).await?;
            let before = deployment.snapshot()?;
            let outcome = closed_loop(
                &deployment.api,
                &deployment.devices,
                scale.create_workers,
                scale.create_commands,
                scale.phase_time,
                None,
            )
            .await;
            let after = deployment.snapshot()?;
            let mut measured = LoopFigures::new(
                format!(
                    "create only, {} devices with live queues, {payload} B, {} clients",
                    scale.many_devices, scale.create_workers
                ),
                deployment.devices.len(),
                &outcome,
                before,
                after,
            );
            measured.backlog = Some(sampler.stop().await?);
            measured.print();
            let published = deployment.wait_outbox_empty(PUBLISH_DEADLINE).await?;
            print_publish_rate(&outcome, published);
            Ok(ManyDevices {
                devices: scale.many_devices,
                payload,
                warmup,
                warmup_published_after,
                measured,
            })
        },
    )
    .await
}

/// Queues `scale.memory_commands` commands for offline devices, reads the
/// server's RSS, then starts the agents and reads it again after the drain.
pub async fn memory(
    context: &RunContext,
    scale: &Scale,
    payload: usize,
) -> anyhow::Result<MemoryFigures> {
    in_deployment(context, scale.memory_devices, payload, async |deployment: &mut Deployment| {
    // The server's own background work (relay, sender and expiry polls)
    // over a few idle seconds.
    let idle_start = deployment.snapshot()?;
    tokio::time::sleep(scale.idle_time).await;
    let (idle_end, idle_ended) = deployment.snapshot()?;
    let idle = idle_end.server;
    let idle_cpu_share = idle_end
        .server
        .cpu
        .saturating_sub(idle_start.0.server.cpu)
        .as_secs_f64()
        / (idle_ended - idle_start.1).as_secs_f64();
    let before = deployment.snapshot()?;
    let mut outcome = closed_loop(
        &deployment.api,
        &deployment.devices,
        scale.create_workers,
        scale.memory_commands,
        PUBLISH_DEADLINE,
        None,
    )
    .await;
    let after = deployment.snapshot()?;
    let create = LoopFigures::new(
        format!(
            "memory: {} commands for {} offline devices, {payload} B",
            scale.memory_commands, scale.memory_devices
        ),
        deployment.devices.len(),
        &outcome,
        before,
        after,
    );
    create.print();
    let published = deployment.wait_outbox_empty(PUBLISH_DEADLINE).await?;
    print_publish_rate(&outcome, published);
    let first = outcome.samples.iter().map(|s| s.sent).min();
    let queued = deployment.usage()?;
    println!(
        "    memory    RSS idle {:.1} MiB, with every command queued {:.1} MiB (peak so far {:.1})",
        idle.rss_mib(),
        queued.rss_mib(),
        queued.peak_rss_mib()
    );

    let drain_start = Instant::now();
    deployment.start_agents(context).await?;
    outcome
        .collect_postbacks(&context.receiver, scale.drain_time)
        .await;
    let drain_end = outcome
        .samples
        .iter()
        .filter_map(|s| s.done)
        .max()
        .unwrap_or(drain_start);
    let drain_time = drain_end.saturating_duration_since(drain_start);
    let drained = outcome.samples.iter().filter(|s| s.done.is_some()).count();
    let after_drain = deployment.usage()?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let settled = deployment.usage()?;
    println!(
        "    drain     {drained} of {} postbacks in {:.1} s ({:.0}/s); RSS after {:.1} MiB, 5 s later {:.1} MiB, peak {:.1} MiB",
        outcome.samples.len(),
        drain_time.as_secs_f64(),
        crate::stats::rate(drained, drain_time),
        after_drain.rss_mib(),
        settled.rss_mib(),
        settled.peak_rss_mib()
    );
    Ok(MemoryFigures {
        payload,
        commands: outcome.samples.len(),
        devices: scale.memory_devices,
        create,
        published_after: first.zip(published).map(|(first, end)| end - first),
        idle,
        idle_cpu_share,
        queued,
        drain_time,
        drained,
        after_drain,
        settled,
    })
    })
    .await
}
