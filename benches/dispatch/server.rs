//! Starts `dispatcher serve` as a child process and reads its resource use
//! from /proc.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Secret of the bearer tokens; the benchmark signs its own tokens with it.
pub const JWT_SECRET: &str = "bench-secret-bench-secret-bench-secret-01";
/// Signing secret of the postbacks, in the Standard Webhooks `whsec_` form.
pub const WEBHOOK_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// Settings of one server.
pub struct ServerSpec<'a> {
    pub amqp_url: &'a str,
    pub prefix: &'a str,
    pub database_url: &'a str,
    pub data_dir: &'a Path,
}

pub struct Server {
    child: Child,
    pub pid: u32,
    pub base: String,
    pub log: PathBuf,
}

impl Server {
    pub async fn start(spec: &ServerSpec<'_>) -> anyhow::Result<Self> {
        let log = spec.data_dir.join("serve.log");
        let stderr = std::fs::File::create(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let mut child = Command::new(env!("CARGO_BIN_EXE_dispatcher"))
            .arg("serve")
            .args(["--listen", "127.0.0.1:0"])
            .args(["--database-url", spec.database_url])
            .args(["--amqp-url", spec.amqp_url])
            .args(["--amqp-prefix", spec.prefix])
            .arg("--data-dir")
            .arg(spec.data_dir)
            .args(["--jwt-secret", JWT_SECRET])
            .args(["--webhook-secrets", WEBHOOK_SECRET])
            // The webhook receiver listens on loopback, which postbacks
            // may not reach by default.
            .args(["--postback-allowed-networks", "127.0.0.0/8"])
            // The server logs at its default level, as in production.
            .env_remove("DISPATCHER_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .context("cannot start dispatcher serve")?;
        let pid = child.id().context("dispatcher serve exited at once")?;

        let stdout = child.stdout.take().context("stdout is piped")?;
        let mut lines = BufReader::new(stdout).lines();
        let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .with_context(|| {
                format!(
                    "dispatcher serve printed no address within 30 s; see {}",
                    log.display()
                )
            })??
            .with_context(|| {
                format!(
                    "dispatcher serve exited before listening; see {}",
                    log.display()
                )
            })?;
        let base = first
            .strip_prefix("dispatcher listening on ")
            .with_context(|| format!("unexpected first line from dispatcher serve: {first:?}"))?
            .to_owned();
        Ok(Self {
            child,
            pid,
            base,
            log,
        })
    }

    /// Waits until /health/ready returns 200, so that the database and the
    /// broker connection are open before the load starts.
    pub async fn wait_ready(&self, http: &reqwest::Client) -> anyhow::Result<()> {
        let url = format!("{}/health/ready", self.base);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(response) = http.get(&url).send().await
                && response.status().is_success()
            {
                return Ok(());
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "dispatcher serve was not ready within 30 s; see {}",
                self.log.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn usage(&self) -> anyhow::Result<Usage> {
        Usage::of(self.pid)
    }

    /// Reads the resource use, then stops the server with SIGTERM (and
    /// SIGKILL after 40 s).
    pub async fn stop(mut self) -> anyhow::Result<Usage> {
        let usage = self.usage()?;
        let pid = libc::pid_t::try_from(self.pid).context("pid out of range")?;
        // SAFETY: kill(2) has no memory effects; the pid is our own child,
        // which has not been waited for, so it cannot have been reused.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        if tokio::time::timeout(Duration::from_secs(40), self.child.wait())
            .await
            .is_err()
        {
            eprintln!(
                "dispatcher serve did not stop within 40 s of SIGTERM; killing it ({})",
                self.log.display()
            );
            self.child.kill().await?;
        }
        Ok(usage)
    }
}

/// Memory and CPU time of a process.
#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    /// Resident set size now (VmRSS).
    pub rss_kib: u64,
    /// Peak resident set size since the process started (VmHWM).
    pub peak_rss_kib: u64,
    /// User plus system CPU time since the process started.
    pub cpu: Duration,
}

impl Usage {
    pub fn of(pid: u32) -> anyhow::Result<Self> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("cannot read /proc/{pid}/status"))?;
        let field = |name: &str| -> anyhow::Result<u64> {
            let line = status
                .lines()
                .find(|line| line.starts_with(name))
                .with_context(|| format!("/proc/{pid}/status has no {name}"))?;
            let kib = line
                .split_whitespace()
                .nth(1)
                .with_context(|| format!("/proc/{pid}/status line {line:?} has no value"))?;
            Ok(kib.parse()?)
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
        Ok(Self {
            rss_kib: field("VmRSS:")?,
            peak_rss_kib: field("VmHWM:")?,
            cpu: cpu_time(&stat)?,
        })
    }

    pub fn rss_mib(&self) -> f64 {
        self.rss_kib as f64 / 1024.0
    }

    pub fn peak_rss_mib(&self) -> f64 {
        self.peak_rss_kib as f64 / 1024.0
    }
}

/// utime + stime from a /proc/PID/stat line. The command name in brackets
/// may contain spaces, so the fields are counted after its closing bracket:
/// utime and stime are fields 14 and 15 of the whole line.
fn cpu_time(stat: &str) -> anyhow::Result<Duration> {
    let after_name = stat
        .rsplit_once(')')
        .context("/proc/PID/stat has no command name")?
        .1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // After the name, field 3 (state) is at index 0, so field N is at N - 3.
    let ticks = |field: usize| -> anyhow::Result<u64> {
        Ok(fields
            .get(field - 3)
            .with_context(|| format!("/proc/PID/stat has no field {field}"))?
            .parse()?)
    };
    let total = ticks(14)? + ticks(15)?;
    Ok(Duration::from_secs_f64(
        total as f64 / clock_ticks_per_second(),
    ))
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// CPU time of the benchmark process itself (load generator, webhook
/// receiver and agents), which shares the machine with the server.
pub fn own_cpu() -> anyhow::Result<Duration> {
    Usage::of(std::process::id()).map(|usage| usage.cpu)
}

/// Busy and total CPU time of the whole machine, in clock ticks summed over
/// all cores, from the first line of /proc/stat.
#[derive(Clone, Copy, Debug, Default)]
pub struct MachineCpu {
    busy: u64,
    total: u64,
}

impl MachineCpu {
    pub fn now() -> anyhow::Result<Self> {
        let stat = std::fs::read_to_string("/proc/stat").context("cannot read /proc/stat")?;
        let line = stat.lines().next().context("/proc/stat is empty")?;
        let ticks: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(str::parse)
            .collect::<Result<_, _>>()
            .with_context(|| format!("/proc/stat line {line:?} is not numeric"))?;
        // Fields: user nice system idle iowait irq softirq steal …; idle
        // and iowait are the time no task ran.
        let idle =
            ticks.get(3).copied().unwrap_or_default() + ticks.get(4).copied().unwrap_or_default();
        let total: u64 = ticks.iter().take(8).sum();
        Ok(Self {
            busy: total.saturating_sub(idle),
            total,
        })
    }

    /// Share of all cores' time that was busy between `earlier` and `self`.
    pub fn busy_share_since(&self, earlier: &Self) -> f64 {
        let total = self.total.saturating_sub(earlier.total);
        if total == 0 {
            0.0
        } else {
            self.busy.saturating_sub(earlier.busy) as f64 / total as f64
        }
    }
}

/// The server's usage, the benchmark's CPU time and the machine's CPU
/// counters, read together.
#[derive(Clone, Copy, Debug, Default)]
pub struct Snapshot {
    pub server: Usage,
    pub bench_cpu: Duration,
    pub machine: MachineCpu,
}

impl Snapshot {
    pub fn of(server: &Server) -> anyhow::Result<Self> {
        Ok(Self {
            server: server.usage()?,
            bench_cpu: own_cpu()?,
            machine: MachineCpu::now()?,
        })
    }
}
