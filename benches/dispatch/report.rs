//! Figures of each phase, their ratios to the raw limits, and the targets.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::backlog::Backlog;
use crate::history::STAGES;
use crate::load::LoopOutcome;
use crate::raw::RawAmqp;
use crate::server::{Snapshot, Usage};
use crate::stats::{Latency, millis, percent_of, rate};

/// Figures of one load loop and of the server while it ran.
#[derive(Clone, Debug, Default)]
pub struct LoopFigures {
    pub label: String,
    pub devices: usize,
    pub creates: usize,
    pub errors: usize,
    pub first_error: Option<String>,
    pub create_rate: f64,
    pub create_latency: Latency,
    /// Commands whose postback arrived.
    pub completed: usize,
    pub e2e_rate: f64,
    pub e2e_latency: Latency,
    /// Server CPU time spent between the loop's start and its last postback.
    pub server_cpu: Duration,
    /// CPU time of the benchmark process over the same span.
    pub bench_cpu: Duration,
    /// Share of the machine's CPU time (all cores) that was busy.
    pub machine_busy: f64,
    pub elapsed: Duration,
    pub server_peak_rss_mib: f64,
    /// Queue lengths between the stages while the loop ran.
    pub backlog: Option<Backlog>,
}

impl LoopFigures {
    pub fn new(
        label: String,
        devices: usize,
        outcome: &LoopOutcome,
        before: (Snapshot, std::time::Instant),
        after: (Snapshot, std::time::Instant),
    ) -> Self {
        let ((before, started), (after, ended)) = (before, after);
        let samples = &outcome.samples;
        let first_sent = samples.iter().map(|s| s.sent).min();
        let last_created = samples.iter().map(|s| s.created).max();
        let last_done = samples.iter().filter_map(|s| s.done).max();
        let create_rate = match (first_sent, last_created) {
            (Some(first), Some(last)) => rate(samples.len(), last - first),
            _ => 0.0,
        };
        let e2e: Vec<Duration> = samples
            .iter()
            .filter_map(|s| s.done.map(|done| done - s.sent))
            .collect();
        let e2e_rate = match (first_sent, last_done) {
            (Some(first), Some(last)) => rate(e2e.len(), last - first),
            _ => 0.0,
        };
        Self {
            label,
            devices,
            creates: samples.len(),
            errors: outcome.errors,
            first_error: outcome.first_error.clone(),
            create_rate,
            create_latency: Latency::of(samples.iter().map(|s| s.created - s.sent).collect()),
            completed: e2e.len(),
            e2e_rate,
            e2e_latency: Latency::of(e2e),
            server_cpu: after.server.cpu.saturating_sub(before.server.cpu),
            bench_cpu: after.bench_cpu.saturating_sub(before.bench_cpu),
            machine_busy: after.machine.busy_share_since(&before.machine),
            elapsed: ended - started,
            server_peak_rss_mib: after.server.peak_rss_mib(),
            backlog: None,
        }
    }

    pub fn print(&self) {
        println!("  {}", self.label);
        println!(
            "    creates   {} ({} failed) at {:.0}/s, latency {}",
            self.creates, self.errors, self.create_rate, self.create_latency
        );
        if let Some(error) = &self.first_error {
            println!("    first failure: {error}");
        }
        if self.completed > 0 {
            println!(
                "    postbacks {} of {} at {:.0}/s, create to postback {}",
                self.completed, self.creates, self.e2e_rate, self.e2e_latency
            );
        }
        println!(
            "    server    CPU {:.2} s ({} ms per command, {:.0}% of one core), peak RSS {:.1} MiB",
            self.server_cpu.as_secs_f64(),
            self.cpu_per_command_ms(),
            100.0 * self.core_share(self.server_cpu),
            self.server_peak_rss_mib,
        );
        let cores = std::thread::available_parallelism().map_or(1, usize::from) as f64;
        let busy = self.machine_busy * cores;
        let server = self.core_share(self.server_cpu);
        let bench = self.core_share(self.bench_cpu);
        println!(
            "    machine   {busy:.2} of {cores} cores busy over {:.1} s: server {server:.2}, benchmark process {bench:.2}, RabbitMQ, kernel and other processes {:.2}",
            self.elapsed.as_secs_f64(),
            (busy - server - bench).max(0.0)
        );
        if let Some(backlog) = &self.backlog {
            println!("    backlog   {backlog}");
        }
    }

    fn core_share(&self, cpu: Duration) -> f64 {
        if self.elapsed.is_zero() {
            0.0
        } else {
            cpu.as_secs_f64() / self.elapsed.as_secs_f64()
        }
    }

    fn cpu_per_command_ms(&self) -> String {
        if self.creates == 0 {
            return "n/a".to_owned();
        }
        format!(
            "{:.3}",
            self.server_cpu.as_secs_f64() * 1000.0 / self.creates as f64
        )
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct RawFigures {
    pub amqp: RawAmqp,
    /// Body size of the command message for this payload size.
    pub message_bytes: usize,
    pub store_rate: f64,
    pub store_connections: u32,
}

#[derive(Debug, Default)]
pub struct ManyDevices {
    pub devices: usize,
    pub payload: usize,
    /// One create per device, which makes the relay declare every queue.
    pub warmup: LoopFigures,
    /// From the first warm-up create until the outbox was empty.
    pub warmup_published_after: Option<Duration>,
    pub measured: LoopFigures,
}

#[derive(Debug, Default)]
pub struct MemoryFigures {
    pub payload: usize,
    pub commands: usize,
    pub devices: usize,
    pub create: LoopFigures,
    /// From the first create until the relay had published every command.
    pub published_after: Option<Duration>,
    pub idle: Usage,
    /// Server CPU time per second of wall time while idle, before the load.
    pub idle_cpu_share: f64,
    /// Once every command waited in RabbitMQ and no agent ran.
    pub queued: Usage,
    /// From the start of the agents to the last postback.
    pub drain_time: Duration,
    pub drained: usize,
    /// Right after the last postback.
    pub after_drain: Usage,
    /// Five seconds after the last postback.
    pub settled: Usage,
}

/// Everything one run measured, by payload size in bytes.
#[derive(Debug, Default)]
pub struct Report {
    pub raw: BTreeMap<usize, RawFigures>,
    pub create: BTreeMap<usize, LoopFigures>,
    pub e2e: BTreeMap<usize, LoopFigures>,
    pub open: BTreeMap<usize, LoopFigures>,
    /// Stage latencies of sampled commands of the closed and the open loop.
    pub stages_closed: BTreeMap<usize, Vec<Latency>>,
    pub stages_open: BTreeMap<usize, Vec<Latency>>,
    pub single: BTreeMap<usize, LoopFigures>,
    pub many: Option<ManyDevices>,
    pub memory: Option<MemoryFigures>,
}

/// End-to-end throughput that meets the target, as a share of the raw
/// pipelined round-trip rate.
const E2E_SHARE_TARGET: f64 = 0.25;
const OPEN_E2E_P99_TARGET: Duration = Duration::from_millis(20);
const OPEN_CREATE_P99_TARGET: Duration = Duration::from_millis(10);
const QUEUED_RSS_TARGET_MIB: f64 = 150.0;
/// RSS after the drain may exceed the RSS with every command queued by
/// this share before it counts as growth; allocators keep some freed pages.
const DRAIN_GROWTH_TOLERANCE: f64 = 0.10;
/// The many-devices create rate may fall this far below the create-phase one.
const MANY_DEVICES_TOLERANCE: f64 = 0.20;

impl Report {
    pub fn print_summary(&self) {
        println!("\n## Summary (ratios are to the raw limits of the same run)\n");
        for (payload, raw) in &self.raw {
            println!(
                "raw, {payload} B payload ({} B message): AMQP round trip one at a time p50 {} / p99 {} ms ({:.0}/s), pipelined {:.0}/s; store commits {:.0} rows/s over {} connection(s)",
                raw.message_bytes,
                millis(raw.amqp.serial.p50),
                millis(raw.amqp.serial.p99),
                raw.amqp.serial_rate,
                raw.amqp.pipelined_rate,
                raw.store_rate,
                raw.store_connections
            );
        }
        println!("\n| figure | payload | value | ratio to raw limit |");
        println!("|---|---|---|---|");
        self.print_loop_rows();
        self.print_many_rows();
        self.print_memory_rows();
        self.print_stages();
        self.print_targets();
    }

    fn print_loop_rows(&self) {
        for (payload, figures) in &self.create {
            let store = self.raw.get(payload).map_or(0.0, |raw| raw.store_rate);
            row(
                &format!(
                    "create throughput, closed loop, {} devices, no agents",
                    figures.devices
                ),
                *payload,
                format!("{:.0}/s", figures.create_rate),
                format!(
                    "{} of store commits",
                    percent_of(figures.create_rate, store)
                ),
            );
            row(
                "create latency, same loop",
                *payload,
                figures.create_latency.to_string(),
                String::new(),
            );
        }
        for (payload, figures) in &self.e2e {
            let raw = self.raw.get(payload).copied().unwrap_or_default();
            row(
                &format!(
                    "end-to-end throughput, closed loop, {} devices",
                    figures.devices
                ),
                *payload,
                format!("{:.0}/s", figures.e2e_rate),
                format!(
                    "{} of pipelined, {} of one-at-a-time AMQP round trips",
                    percent_of(figures.e2e_rate, raw.amqp.pipelined_rate),
                    percent_of(figures.e2e_rate, raw.amqp.serial_rate)
                ),
            );
            row(
                "end-to-end latency, same loop",
                *payload,
                figures.e2e_latency.to_string(),
                String::new(),
            );
        }
        for (payload, figures) in &self.single {
            let raw = self.raw.get(payload).copied().unwrap_or_default();
            row(
                "end-to-end throughput, closed loop, 1 device",
                *payload,
                format!("{:.0}/s", figures.e2e_rate),
                format!(
                    "{} of one-at-a-time AMQP round trips",
                    percent_of(figures.e2e_rate, raw.amqp.serial_rate)
                ),
            );
        }
        for (payload, figures) in &self.open {
            let raw = self.raw.get(payload).copied().unwrap_or_default();
            row(
                &format!("open loop rate, {} devices", figures.devices),
                *payload,
                format!("{:.0}/s", figures.create_rate),
                String::new(),
            );
            row(
                "open loop create latency",
                *payload,
                figures.create_latency.to_string(),
                String::new(),
            );
            row(
                "open loop end-to-end latency",
                *payload,
                figures.e2e_latency.to_string(),
                format!(
                    "p50 is {:.1}x the one-at-a-time AMQP round trip p50",
                    ratio(figures.e2e_latency.p50, raw.amqp.serial.p50)
                ),
            );
            row(
                "open loop server CPU per command",
                *payload,
                format!("{} ms", figures.cpu_per_command_ms()),
                String::new(),
            );
        }
    }

    fn print_many_rows(&self) {
        if let Some(many) = &self.many {
            let baseline = self
                .create
                .get(&many.payload)
                .map_or(0.0, |f| f.create_rate);
            row(
                &format!("warm-up: one create per device, {} devices", many.devices),
                many.payload,
                format!(
                    "creates {:.0}/s; relay declared the queues and published all in {}",
                    many.warmup.create_rate,
                    many.warmup_published_after.map_or(
                        "(not within the deadline)".to_owned(),
                        |d| format!("{:.1} s", d.as_secs_f64())
                    )
                ),
                String::new(),
            );
            row(
                &format!("create throughput, {} devices, no agents", many.devices),
                many.payload,
                format!("{:.0}/s", many.measured.create_rate),
                format!(
                    "{} of the {}-device figure",
                    percent_of(many.measured.create_rate, baseline),
                    self.create.get(&many.payload).map_or(0, |f| f.devices)
                ),
            );
        }
    }

    fn print_memory_rows(&self) {
        if let Some(memory) = &self.memory {
            row(
                "server RSS and CPU when idle",
                memory.payload,
                format!(
                    "{:.1} MiB, {:.1}% of one core",
                    memory.idle.rss_mib(),
                    100.0 * memory.idle_cpu_share
                ),
                String::new(),
            );
            row(
                &format!(
                    "{} commands created for {} offline devices",
                    memory.commands, memory.devices
                ),
                memory.payload,
                format!(
                    "{:.0}/s; all published {}",
                    memory.create.create_rate,
                    memory
                        .published_after
                        .map_or("(not within the deadline)".to_owned(), |d| {
                            format!("{:.1} s after the first create", d.as_secs_f64())
                        })
                ),
                String::new(),
            );
            row(
                &format!(
                    "server RSS, {} commands queued for offline devices",
                    memory.commands
                ),
                memory.payload,
                format!(
                    "{:.1} MiB (peak {:.1})",
                    memory.queued.rss_mib(),
                    memory.queued.peak_rss_mib()
                ),
                String::new(),
            );
            row(
                "drain: agents started, every postback received",
                memory.payload,
                format!(
                    "{} of {} in {:.1} s ({:.0}/s)",
                    memory.drained,
                    memory.commands,
                    memory.drain_time.as_secs_f64(),
                    rate(memory.drained, memory.drain_time)
                ),
                String::new(),
            );
            row(
                "server RSS after the drain / 5 s later",
                memory.payload,
                format!(
                    "{:.1} / {:.1} MiB",
                    memory.after_drain.rss_mib(),
                    memory.settled.rss_mib()
                ),
                String::new(),
            );
        }
    }

    fn print_stages(&self) {
        let loops = [("closed", &self.stages_closed), ("open", &self.stages_open)];
        for (kind, stages) in loops {
            for (payload, stages) in stages {
                print_stage_table(kind, *payload, stages);
            }
        }
    }

    fn print_targets(&self) {
        println!("\n## Targets\n");
        for (payload, figures) in &self.e2e {
            let limit = self
                .raw
                .get(payload)
                .map_or(0.0, |raw| raw.amqp.pipelined_rate);
            verdict(
                &format!(
                    "{payload} B: end-to-end throughput >= 25% of the pipelined AMQP round-trip rate"
                ),
                figures.e2e_rate >= E2E_SHARE_TARGET * limit && limit > 0.0,
                format!(
                    "{:.0}/s is {}",
                    figures.e2e_rate,
                    percent_of(figures.e2e_rate, limit)
                ),
            );
        }
        for (payload, figures) in &self.open {
            verdict(
                &format!("{payload} B: open loop end-to-end p99 < 20 ms"),
                figures.completed > 0 && figures.e2e_latency.p99 < OPEN_E2E_P99_TARGET,
                format!("{} ms", millis(figures.e2e_latency.p99)),
            );
            verdict(
                &format!("{payload} B: open loop create p99 < 10 ms"),
                figures.creates > 0 && figures.create_latency.p99 < OPEN_CREATE_P99_TARGET,
                format!("{} ms", millis(figures.create_latency.p99)),
            );
        }
        if let Some(memory) = &self.memory {
            verdict(
                &format!("RSS < 150 MiB with {} commands queued", memory.commands),
                memory.queued.rss_mib() < QUEUED_RSS_TARGET_MIB,
                format!("{:.1} MiB", memory.queued.rss_mib()),
            );
            verdict(
                "no RSS growth after the drain (at most 10% above the queued RSS)",
                memory.drained == memory.commands
                    && memory.settled.rss_mib()
                        <= memory.queued.rss_mib() * (1.0 + DRAIN_GROWTH_TOLERANCE),
                format!(
                    "{:.1} MiB queued, {:.1} MiB 5 s after the drain, {} of {} drained",
                    memory.queued.rss_mib(),
                    memory.settled.rss_mib(),
                    memory.drained,
                    memory.commands
                ),
            );
        }
        if let Some(many) = &self.many {
            let baseline = self
                .create
                .get(&many.payload)
                .map_or(0.0, |f| f.create_rate);
            verdict(
                &format!(
                    "{} devices: create throughput within 20% of {} devices",
                    many.devices,
                    self.create.get(&many.payload).map_or(0, |f| f.devices)
                ),
                baseline > 0.0
                    && many.measured.create_rate >= (1.0 - MANY_DEVICES_TOLERANCE) * baseline,
                format!("{:.0}/s vs {:.0}/s", many.measured.create_rate, baseline),
            );
        }
    }
}

fn print_stage_table(kind: &str, payload: usize, stages: &[Latency]) {
    println!(
        "\nStages of sampled {kind}-loop commands, {payload} B payload (from GET /commands/{{id}}/history):\n"
    );
    println!("| stage | p50 ms | p99 ms | max ms |");
    println!("|---|---|---|---|");
    for (name, latency) in STAGES.iter().zip(stages) {
        println!(
            "| {name} | {} | {} | {} |",
            millis(latency.p50),
            millis(latency.p99),
            millis(latency.max)
        );
    }
}

fn row(figure: &str, payload: usize, value: String, ratio: String) {
    println!("| {figure} | {payload} B | {value} | {ratio} |");
}

fn verdict(target: &str, met: bool, detail: String) {
    println!(
        "- {}: {target} ({detail})",
        if met { "MET" } else { "MISSED" }
    );
}

fn ratio(value: Duration, limit: Duration) -> f64 {
    if limit.is_zero() {
        0.0
    } else {
        value.as_secs_f64() / limit.as_secs_f64()
    }
}
