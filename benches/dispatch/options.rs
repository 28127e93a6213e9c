//! Command-line options and the counts each mode runs with.

use std::time::Duration;

use clap::{Parser, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "dispatch",
    about = "Measures dispatcher serve end to end against RabbitMQ, next to the raw limits of RabbitMQ and the store."
)]
pub struct Options {
    /// Run small counts (a few seconds in total) as a smoke test.
    #[arg(long)]
    pub quick: bool,

    /// RabbitMQ URL. Unset: DISPATCHER_BENCH_AMQP_URL, then DISPATCHER_TEST_AMQP_URL.
    #[arg(long)]
    pub amqp_url: Option<String>,

    /// Store the server runs on. Each phase gets a fresh database.
    #[arg(long, value_enum, default_value_t = StoreKind::Sqlite)]
    pub store: StoreKind,

    /// PostgreSQL URL whose user may create databases, for --store postgres.
    /// Unset: DISPATCHER_BENCH_POSTGRES_URL, then DISPATCHER_TEST_POSTGRES_URL.
    #[arg(long)]
    pub postgres_url: Option<String>,

    /// Payload sizes in bytes, comma-separated. The Payload JSON text of
    /// each command is exactly this long.
    #[arg(long, value_delimiter = ',', default_values_t = [256, 16384])]
    pub payload_sizes: Vec<usize>,

    /// Commands queued for offline devices in the memory phase. Unset:
    /// 30000, or 500 with --quick. The drain runs at the end-to-end rate,
    /// so 100000 takes about ten minutes on a 2-core machine.
    #[arg(long)]
    pub memory_commands: Option<usize>,

    /// Devices in the many-devices phase. Unset: 10000, or 50 with --quick.
    #[arg(long)]
    pub many_devices: Option<usize>,

    /// Phases to run, comma-separated. Unset: all of them.
    #[arg(long, value_delimiter = ',', value_enum)]
    pub only: Vec<Phase>,

    /// Rate of the open-loop phase as a fraction of the closed-loop
    /// end-to-end throughput measured just before it.
    #[arg(long, default_value_t = 0.1)]
    pub open_loop_fraction: f64,

    /// Commands whose per-stage timings are read from the history endpoint
    /// after the open-loop phase.
    #[arg(long, default_value_t = 200)]
    pub history_sample: usize,

    /// Delete the queues and exchanges that an interrupted run left under
    /// this AMQP prefix (printed on stderr as `prefix=`), for as many
    /// devices as --many-devices, then exit.
    #[arg(long, value_name = "PREFIX")]
    pub delete_prefix: Option<String>,

    /// Passed by `cargo bench` to every bench target; ignored.
    #[arg(long, hide = true)]
    pub bench: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum StoreKind {
    Sqlite,
    Postgres,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Phase {
    /// Raw RabbitMQ round trips and raw store inserts.
    Raw,
    /// Create-only closed loop over 100 devices (10 with --quick), no agents.
    Create,
    /// End-to-end closed loop over 100 devices (10 with --quick), then an open loop at a
    /// fraction of its throughput on the same server.
    EndToEnd,
    /// End-to-end closed loop over one device.
    SingleDevice,
    /// Create-only closed loop over many devices, no agents.
    ManyDevices,
    /// Commands queued for offline devices, then drained.
    Memory,
}

impl Options {
    pub fn runs(&self, phase: Phase) -> bool {
        self.only.is_empty() || self.only.contains(&phase)
    }

    pub fn amqp_url(&self) -> anyhow::Result<String> {
        first_of(
            self.amqp_url.clone(),
            &["DISPATCHER_BENCH_AMQP_URL", "DISPATCHER_TEST_AMQP_URL"],
        )
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no RabbitMQ URL: pass --amqp-url or set DISPATCHER_BENCH_AMQP_URL (or DISPATCHER_TEST_AMQP_URL)"
            )
        })
    }

    pub fn postgres_url(&self) -> anyhow::Result<String> {
        first_of(
            self.postgres_url.clone(),
            &["DISPATCHER_BENCH_POSTGRES_URL", "DISPATCHER_TEST_POSTGRES_URL"],
        )
        .ok_or_else(|| {
            anyhow::anyhow!(
                "--store postgres needs --postgres-url or DISPATCHER_BENCH_POSTGRES_URL (or DISPATCHER_TEST_POSTGRES_URL)"
            )
        })
    }

    pub fn scale(&self) -> Scale {
        let mut scale = if self.quick {
            Scale::QUICK
        } else {
            Scale::FULL
        };
        if let Some(count) = self.memory_commands {
            scale.memory_commands = count;
        }
        if let Some(count) = self.many_devices {
            scale.many_devices = count;
        }
        scale
    }
}

fn first_of(value: Option<String>, variables: &[&str]) -> Option<String> {
    value.or_else(|| {
        variables
            .iter()
            .find_map(|name| std::env::var(name).ok().filter(|value| !value.is_empty()))
    })
}

/// Counts and time limits of one run. Every loop stops at its count or its
/// time limit, whichever comes first.
#[derive(Clone, Debug)]
pub struct Scale {
    /// Raw AMQP round trips one at a time.
    pub raw_serial: usize,
    /// Raw AMQP round trips pipelined.
    pub raw_pipelined: usize,
    /// Rows inserted, one per transaction, in the raw store phase.
    pub raw_store_rows: usize,
    /// Devices of the create, end-to-end and open-loop phases.
    pub devices: usize,
    /// Concurrent HTTP clients of the create-only closed loops.
    pub create_workers: usize,
    pub create_commands: usize,
    /// Concurrent clients of the end-to-end closed loop; each waits for its
    /// command's postback before it creates the next.
    pub e2e_workers: usize,
    pub e2e_commands: usize,
    pub open_loop_time: Duration,
    /// Time limit of each closed loop.
    pub phase_time: Duration,
    pub many_devices: usize,
    pub memory_commands: usize,
    pub memory_devices: usize,
    /// How long the memory phase watches the idle server before the load.
    pub idle_time: Duration,
    /// How long the benchmark waits for outstanding postbacks after a loop.
    pub drain_time: Duration,
}

impl Scale {
    const FULL: Scale = Scale {
        raw_serial: 2_000,
        raw_pipelined: 20_000,
        raw_store_rows: 10_000,
        devices: 100,
        create_workers: 16,
        create_commands: 20_000,
        e2e_workers: 100,
        e2e_commands: 20_000,
        open_loop_time: Duration::from_secs(20),
        phase_time: Duration::from_secs(20),
        many_devices: 10_000,
        memory_commands: 30_000,
        memory_devices: 100,
        idle_time: Duration::from_secs(3),
        drain_time: Duration::from_secs(600),
    };

    const QUICK: Scale = Scale {
        raw_serial: 100,
        raw_pipelined: 1_000,
        raw_store_rows: 500,
        devices: 10,
        create_workers: 8,
        create_commands: 300,
        e2e_workers: 10,
        e2e_commands: 200,
        open_loop_time: Duration::from_secs(1),
        phase_time: Duration::from_secs(2),
        many_devices: 50,
        memory_commands: 500,
        memory_devices: 10,
        idle_time: Duration::from_secs(1),
        drain_time: Duration::from_secs(60),
    };
}
