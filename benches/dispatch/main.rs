//! End-to-end benchmark of `dispatcher serve` on RabbitMQ, with the raw
//! limits of RabbitMQ and of the store measured in the same run:
//!
//! ```text
//! cargo bench --bench dispatch -- [--quick] [--store postgres] [--only raw,create,...]
//! ```
//!
//! Every server, agent and webhook receiver runs on 127.0.0.1, every phase
//! uses its own AMQP prefix and database and deletes them at its end, and
//! every loop stops at its count or its time limit. docs/BENCHMARKS.md
//! describes the phases and keeps the results.

mod agents;
mod backlog;
mod broker_admin;
mod database;
mod deployment;
mod history;
mod load;
mod options;
mod phases;
mod raw;
mod receiver;
mod report;
mod server;
mod stats;

use std::time::Instant;

use clap::Parser;

use crate::deployment::RunContext;
use crate::options::{Options, Phase, StoreKind};
use crate::receiver::Receiver;
use crate::report::Report;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let options = Options::parse();
    let scale = options.scale();
    if let Some(prefix) = &options.delete_prefix {
        return delete_leftovers(&options.amqp_url()?, prefix, scale.many_devices).await;
    }
    let postgres_url = match options.store {
        StoreKind::Postgres => Some(options.postgres_url()?),
        StoreKind::Sqlite => None,
    };
    let context = RunContext::new(
        options.amqp_url()?,
        options.store,
        postgres_url,
        Receiver::start().await?,
    )?;
    println!(
        "# dispatch benchmark: {} mode, store {:?}, run {}, load average at start {}\n",
        if options.quick { "quick" } else { "full" },
        options.store,
        context.run_id,
        load_average()
    );
    let started = Instant::now();
    let mut report = Report::default();
    let first_payload = *options
        .payload_sizes
        .first()
        .ok_or_else(|| anyhow::anyhow!("--payload-sizes is empty"))?;

    for &payload in &options.payload_sizes {
        println!("## {payload} B payload");
        if options.runs(Phase::Raw) {
            report
                .raw
                .insert(payload, phases::raw(&context, &scale, payload).await?);
        }
        if options.runs(Phase::Create) {
            report
                .create
                .insert(payload, phases::create(&context, &scale, payload).await?);
        }
        if options.runs(Phase::EndToEnd) {
            let figures = phases::end_to_end(&context, &options, &scale, payload).await?;
            report.e2e.insert(payload, figures.closed);
            report.open.insert(payload, figures.open);
            report.stages_closed.insert(payload, figures.closed_stages);
            report.stages_open.insert(payload, figures.open_stages);
        }
        if options.runs(Phase::SingleDevice) {
            report.single.insert(
                payload,
                phases::single_device(&context, &scale, payload).await?,
            );
        }
    }
    if options.runs(Phase::ManyDevices) {
        println!("## many devices, {first_payload} B payload");
        report.many = Some(phases::many_devices(&context, &scale, first_payload).await?);
    }
    if options.runs(Phase::Memory) {
        println!("## memory, {first_payload} B payload");
        report.memory = Some(phases::memory(&context, &scale, first_payload).await?);
    }

    report.print_summary();
    let (repeats, unreadable) = context.receiver.anomalies();
    println!(
        "\nRun took {:.0} s; load average at the end {}; the receiver saw {repeats} repeated postbacks and {unreadable} unreadable bodies.",
        started.elapsed().as_secs_f64(),
        load_average()
    );
    Ok(())
}

/// Deletes what an interrupted run left on the broker under `prefix`.
async fn delete_leftovers(amqp_url: &str, prefix: &str, devices: usize) -> anyhow::Result<()> {
    let admin = broker_admin::BrokerAdmin::connect(amqp_url, prefix).await?;
    let deleted = admin
        .delete_topology(&deployment::device_ids(devices))
        .await;
    admin.close().await;
    deleted?;
    println!("deleted the queues of {devices} devices and the exchanges under {prefix}");
    Ok(())
}

/// Returns the 1, 5 and 15 minute load averages, which show whether other
/// work shared the machine with the run.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|error| format!("(unreadable: {error})"))
}
