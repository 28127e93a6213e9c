//! Command handlers on the device: the built-in `echo` app service and the
//! programs that a handlers file maps app services and `LaunchUri` to.
//!
//! docs/handlers.md describes the handlers file and how programs are run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{ChildStdin, Command};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use uuid::Uuid;

use crate::domain::CommandType;

/// Name of the built-in app service that returns the payload as the response.
pub const ECHO_APP_SERVICE: &str = "echo";

/// Timeout for a program whose entry sets no `timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Maximum stdout a program may write. A program that writes more is killed
/// and the command fails, so a runaway program cannot exhaust the agent's memory.
pub const MAX_STDOUT_BYTES: usize = 1024 * 1024;

/// Number of bytes from the end of stderr that go into a failure's `Error`.
pub const STDERR_TAIL_BYTES: usize = 2048;

/// Time to keep reading stdout and stderr after the program exits. Output
/// left in the pipes arrives at once, so this limit matters only when a
/// process that the program left running keeps the pipes open.
const OUTPUT_DRAIN_AFTER_EXIT: Duration = Duration::from_secs(1);

/// Time to collect the rest of stderr after the program was killed.
const OUTPUT_DRAIN_AFTER_KILL: Duration = Duration::from_millis(500);

/// Environment variables that tell a program which command it runs. They are
/// set after the entry's `env`, so they take precedence over it.
const COMMAND_ID_ENV: &str = "DISPATCHER_COMMAND_ID";
const APP_SERVICE_NAME_ENV: &str = "DISPATCHER_APP_SERVICE_NAME";

/// A command as the agent hands it to a handler.
#[derive(Clone, Debug)]
pub struct HandlerRequest {
    pub command_id: Uuid,
    pub command_type: CommandType,
    pub app_service_name: Option<String>,
    pub package_family_name: Option<String>,
    pub payload: Option<Value>,
}

/// Result of a handler run. `Failed::error` is the text for the command's `Error`.
#[derive(Clone, Debug, PartialEq)]
pub enum HandlerOutcome {
    Completed {
        response: Option<Value>,
    },
    Failed {
        error: String,
        response: Option<Value>,
    },
    /// The cancel token fired and the handler stopped its program.
    Canceled,
}

impl HandlerOutcome {
    fn failed(error: impl Into<String>) -> Self {
        Self::Failed {
            error: error.into(),
            response: None,
        }
    }
}

/// The handlers of one device. Cloning is cheap because the configuration is shared.
#[derive(Clone, Debug)]
pub struct Handlers {
    config: Arc<Config>,
}

#[derive(Debug)]
struct Config {
    /// Handlers file the configuration came from, named in "not configured" errors.
    source: Option<PathBuf>,
    app_services: Vec<AppService>,
    launch_uri: Option<LaunchUri>,
}

#[derive(Debug)]
struct AppService {
    name: String,
    package_family_name: Option<String>,
    program: Program,
}

#[derive(Debug)]
struct LaunchUri {
    /// Allowed URI schemes in lowercase, or `None` to allow any scheme.
    schemes: Option<Vec<String>>,
    program: Program,
}

/// A program to run, with its path already resolved and checked.
#[derive(Debug)]
struct Program {
    path: PathBuf,
    args: Vec<String>,
    timeout: Duration,
    env: BTreeMap<String, String>,
    working_dir: Option<PathBuf>,
}

impl Handlers {
    /// Creates the handlers that every device has: only `echo`.
    pub fn builtin() -> Self {
        Self {
            config: Arc::new(Config {
                source: None,
                app_services: Vec::new(),
                launch_uri: None,
            }),
        }
    }

    /// Loads a handlers file and adds its entries to the built-in handlers.
    ///
    /// Relative `program` and `working_dir` paths are resolved against the
    /// file's directory. Each program must exist and be executable now, so
    /// that a typo fails at startup instead of on the first command.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("failed to read handlers file {}", path.display()))?;
        let file: HandlersFile = toml::from_str(&text)
            .with_context(|| format!("invalid handlers file {}", path.display()))?;
        let config = Config::from_file(file, path)
            .with_context(|| format!("invalid handlers file {}", path.display()))?;
        Ok(Self {
            config: Arc::new(config),
        })
    }

    /// Runs the handler for `request` and returns how it ended.
    ///
    /// Programs are killed, together with their process group, when their
    /// timeout passes or `cancel` fires. `echo` completes at once, even when
    /// `cancel` has already fired.
    pub async fn run(
        &self,
        request: &HandlerRequest,
        cancel: &CancellationToken,
    ) -> HandlerOutcome {
        match request.command_type {
            CommandType::AppService => self.run_app_service(request, cancel).await,
            CommandType::LaunchUri => self.run_launch_uri(request, cancel).await,
        }
    }

    async fn run_app_service(
        &self,
        request: &HandlerRequest,
        cancel: &CancellationToken,
    ) -> HandlerOutcome {
        let Some(name) = request.app_service_name.as_deref() else {
            return HandlerOutcome::failed("AppService command has no AppServiceName");
        };
        if name.eq_ignore_ascii_case(ECHO_APP_SERVICE) {
            return HandlerOutcome::Completed {
                response: request.payload.clone(),
            };
        }

        let package_family_name = request.package_family_name.as_deref();
        let Some(entry) = self.config.find_app_service(name, package_family_name) else {
            return HandlerOutcome::failed(
                self.config
                    .missing_app_service_error(name, package_family_name),
            );
        };
        run_program(&entry.program, None, request, cancel).await
    }

    async fn run_launch_uri(
        &self,
        request: &HandlerRequest,
        cancel: &CancellationToken,
    ) -> HandlerOutcome {
        let Some(launch_uri) = &self.config.launch_uri else {
            return HandlerOutcome::failed(
                "LaunchUri is not configured on this device; \
                 add a [launch_uri] section to the handlers file",
            );
        };
        let uri = match launch_uri.validate_uri(request.payload.as_ref()) {
            Ok(uri) => uri,
            Err(error) => return HandlerOutcome::failed(error),
        };
        run_program(&launch_uri.program, Some(uri.as_str()), request, cancel).await
    }
}

impl Config {
    /// Returns the entry whose package family name equals the command's, or
    /// else the entry for `name` that has no package family name.
    fn find_app_service(
        &self,
        name: &str,
        package_family_name: Option<&str>,
    ) -> Option<&AppService> {
        let mut fallback = None;
        for entry in &self.app_services {
            if !entry.name.eq_ignore_ascii_case(name) {
                continue;
            }
            match (&entry.package_family_name, package_family_name) {
                (None, _) => fallback = Some(entry),
                (Some(wanted), Some(given)) if wanted.eq_ignore_ascii_case(given) => {
                    return Some(entry);
                }
                (Some(_), _) => {}
            }
        }
        fallback
    }

    fn missing_app_service_error(&self, name: &str, package_family_name: Option<&str>) -> String {
        let file = match &self.source {
            Some(path) => format!("the handlers file {}", path.display()),
            None => "a handlers file".to_owned(),
        };
        let has_narrowed_entries = self
            .app_services
            .iter()
            .any(|entry| entry.name.eq_ignore_ascii_case(name));
        if !has_narrowed_entries {
            return format!(
                "no handler for app service {name:?} on this device; \
                 add an [[app_service]] entry for it to {file}"
            );
        }

        let family = match package_family_name {
            Some(family) => format!("package family {family:?}"),
            None => "commands without a PackageFamilyName".to_owned(),
        };
        format!(
            "no handler for app service {name:?} on this device for {family}; \
             the [[app_service]] entries for it in {file} name other package families"
        )
    }
}

impl LaunchUri {
    /// Returns `payload.uri` parsed as an absolute URI with an allowed scheme.
    ///
    /// The program receives the parsed form. It always starts with a scheme,
    /// so the program cannot mistake it for an option such as `--help`.
    fn validate_uri(&self, payload: Option<&Value>) -> Result<url::Url, String> {
        let Some(value) = payload.and_then(|payload| payload.get("uri")) else {
            return Err("LaunchUri command has no Payload.uri".to_owned());
        };
        let Some(text) = value.as_str() else {
            return Err(format!(
                "LaunchUri Payload.uri must be a string, not {value}"
            ));
        };
        let uri = url::Url::parse(text).map_err(|error| {
            format!("LaunchUri Payload.uri {text:?} is not a valid absolute URI: {error}")
        })?;

        if let Some(schemes) = &self.schemes
            && !schemes.iter().any(|scheme| scheme == uri.scheme())
        {
            return Err(format!(
                "LaunchUri Payload.uri {text:?} has scheme {:?}, which this device does not allow; \
                     allowed schemes: {}",
                uri.scheme(),
                schemes.join(", ")
            ));
        }
        Ok(uri)
    }
}

// ---------------------------------------------------------------------------
// Handlers file
// ---------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HandlersFile {
    #[serde(default)]
    app_service: Vec<AppServiceEntry>,
    launch_uri: Option<LaunchUriEntry>,
}

// The program fields are repeated in both entry types because serde does not
// support `flatten` together with `deny_unknown_fields`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AppServiceEntry {
    name: String,
    package_family_name: Option<String>,
    program: PathBuf,
    #[serde(default)]
    args: Vec<String>,
    timeout: Option<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    working_dir: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LaunchUriEntry {
    schemes: Option<Vec<String>>,
    program: PathBuf,
    #[serde(default)]
    args: Vec<String>,
    timeout: Option<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    working_dir: Option<PathBuf>,
}

/// The fields of an entry that describe its program, before validation.
struct ProgramEntry {
    program: PathBuf,
    args: Vec<String>,
    timeout: Option<String>,
    env: BTreeMap<String, String>,
    working_dir: Option<PathBuf>,
}

impl Config {
    fn from_file(file: HandlersFile, path: &Path) -> anyhow::Result<Self> {
        let base_dir = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };

        let mut app_services: Vec<AppService> = Vec::new();
        for entry in file.app_service {
            let label = match &entry.package_family_name {
                Some(family) => format!(
                    "[[app_service]] {:?} for package family {family:?}",
                    entry.name
                ),
                None => format!("[[app_service]] {:?}", entry.name),
            };
            let service = AppService::from_entry(entry, base_dir).with_context(|| label.clone())?;

            let duplicate = app_services.iter().any(|other| {
                other.name.eq_ignore_ascii_case(&service.name)
                    && eq_ignore_ascii_case_opt(
                        &other.package_family_name,
                        &service.package_family_name,
                    )
            });
            if duplicate {
                anyhow::bail!(
                    "{label}: duplicate entry; app service names and package family names \
                     are compared case-insensitively, so merge or rename the entries"
                );
            }
            app_services.push(service);
        }

        let launch_uri = match file.launch_uri {
            Some(entry) => Some(LaunchUri::from_entry(entry, base_dir).context("[launch_uri]")?),
            None => None,
        };

        Ok(Self {
            source: Some(path.to_owned()),
            app_services,
            launch_uri,
        })
    }
}

impl AppService {
    fn from_entry(entry: AppServiceEntry, base_dir: &Path) -> anyhow::Result<Self> {
        if entry.name.trim().is_empty() {
            anyhow::bail!("name must not be empty");
        }
        if entry.name.eq_ignore_ascii_case(ECHO_APP_SERVICE) {
            anyhow::bail!(
                "{ECHO_APP_SERVICE:?} is built in and cannot be redefined; choose another name"
            );
        }
        if let Some(family) = &entry.package_family_name
            && family.trim().is_empty()
        {
            anyhow::bail!("package_family_name must not be empty; remove it to match any package");
        }

        let program = Program::from_entry(
            ProgramEntry {
                program: entry.program,
                args: entry.args,
                timeout: entry.timeout,
                env: entry.env,
                working_dir: entry.working_dir,
            },
            base_dir,
        )?;
        Ok(Self {
            name: entry.name,
            package_family_name: entry.package_family_name,
            program,
        })
    }
}

impl LaunchUri {
    fn from_entry(entry: LaunchUriEntry, base_dir: &Path) -> anyhow::Result<Self> {
        let schemes = match entry.schemes {
            Some(schemes) => Some(validate_schemes(schemes)?),
            None => None,
        };
        let program = Program::from_entry(
            ProgramEntry {
                program: entry.program,
                args: entry.args,
                timeout: entry.timeout,
                env: entry.env,
                working_dir: entry.working_dir,
            },
            base_dir,
        )?;
        Ok(Self { schemes, program })
    }
}

/// Lowercases the schemes, because `url::Url::scheme` returns them lowercase.
fn validate_schemes(schemes: Vec<String>) -> anyhow::Result<Vec<String>> {
    if schemes.is_empty() {
        anyhow::bail!("schemes must not be empty; remove it to allow any scheme");
    }
    let mut lowercase = Vec::with_capacity(schemes.len());
    for scheme in schemes {
        let valid = scheme
            .chars()
            .next()
            .is_some_and(|first| first.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
        if !valid {
            anyhow::bail!(
                "scheme {scheme:?} is invalid; give it without \"://\", for example \"https\""
            );
        }
        lowercase.push(scheme.to_ascii_lowercase());
    }
    Ok(lowercase)
}

impl Program {
    fn from_entry(entry: ProgramEntry, base_dir: &Path) -> anyhow::Result<Self> {
        let path = resolve_program(&entry.program, base_dir)?;

        for (index, arg) in entry.args.iter().enumerate() {
            if arg.contains('\0') {
                anyhow::bail!(
                    "args[{index}] contains a NUL byte, which a program argument cannot contain"
                );
            }
        }

        let timeout = match &entry.timeout {
            Some(text) => parse_timeout(text)?,
            None => DEFAULT_TIMEOUT,
        };

        for (key, value) in &entry.env {
            if key.is_empty() || key.contains('=') || key.contains('\0') {
                anyhow::bail!(
                    "env key {key:?} is invalid; it must be non-empty without '=' or NUL"
                );
            }
            if value.contains('\0') {
                anyhow::bail!("env value of {key:?} contains a NUL byte");
            }
        }

        let working_dir = match &entry.working_dir {
            Some(dir) => Some(resolve_working_dir(dir, base_dir)?),
            None => None,
        };

        Ok(Self {
            path,
            args: entry.args,
            timeout,
            env: entry.env,
            working_dir,
        })
    }
}

fn parse_timeout(text: &str) -> anyhow::Result<Duration> {
    let timeout = humantime::parse_duration(text).with_context(|| {
        format!("timeout {text:?} is invalid; use a duration such as \"30s\" or \"2m\"")
    })?;
    if timeout.is_zero() {
        anyhow::bail!("timeout {text:?} is zero; use a duration greater than zero such as \"30s\"");
    }
    Ok(timeout)
}

/// Resolves `program` against the handlers file's directory and checks that
/// it is an executable file. `PATH` is not searched, so the program that runs
/// does not depend on the agent's environment.
fn resolve_program(program: &Path, base_dir: &Path) -> anyhow::Result<PathBuf> {
    if program.as_os_str().is_empty() {
        anyhow::bail!("program must not be empty");
    }
    let resolved = resolve_path(program, base_dir)?;
    let described_program = if program.is_absolute() {
        format!("program {}", program.display())
    } else {
        format!(
            "program {:?} (resolved against the handlers file's directory to {})",
            program.display().to_string(),
            resolved.display()
        )
    };

    let metadata = match std::fs::metadata(&resolved) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            anyhow::bail!(
                "{described_program} not found; PATH is not searched, so give an absolute path \
                 or one relative to the handlers file"
            );
        }
        Err(error) => anyhow::bail!("failed to read {described_program}: {error}"),
    };
    if !metadata.is_file() {
        anyhow::bail!("{described_program} is not a file");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if metadata.permissions().mode() & 0o111 == 0 {
            anyhow::bail!("{described_program} is not executable; run chmod +x on it");
        }
    }
    Ok(resolved)
}

fn resolve_working_dir(dir: &Path, base_dir: &Path) -> anyhow::Result<PathBuf> {
    let resolved = resolve_path(dir, base_dir)?;
    if !resolved.is_dir() {
        anyhow::bail!(
            "working_dir {} is not an existing directory",
            resolved.display()
        );
    }
    Ok(resolved)
}

fn resolve_path(path: &Path, base_dir: &Path) -> anyhow::Result<PathBuf> {
    let joined = base_dir.join(path);
    std::path::absolute(&joined)
        .with_context(|| format!("failed to make {} absolute", joined.display()))
}

fn eq_ignore_ascii_case_opt(left: &Option<String>, right: &Option<String>) -> bool {
    match (left, right) {
        (Some(left), Some(right)) => left.eq_ignore_ascii_case(right),
        (None, None) => true,
        _ => false,
    }
}

// ---------------------------------------------------------------------------
// Running a program
// ---------------------------------------------------------------------------

/// Event that ended the wait for a program.
enum RunEnd {
    Exited(std::io::Result<ExitStatus>),
    TimedOut,
    Canceled,
    OutputFailed(OutputError),
}

#[derive(Debug)]
enum OutputError {
    StdoutTooLarge,
    Read(std::io::Error),
}

/// Runs `program` with the payload on stdin and turns its exit and output into an outcome.
///
/// `extra_arg` goes after the configured arguments. The program runs in its
/// own process group, which is killed on timeout, cancel, too much stdout, or
/// when this future is dropped. After a normal exit, processes that the
/// program left running in the background are not killed, so a launcher can
/// start a long-lived application.
async fn run_program(
    program: &Program,
    extra_arg: Option<&str>,
    request: &HandlerRequest,
    cancel: &CancellationToken,
) -> HandlerOutcome {
    if cancel.is_cancelled() {
        return HandlerOutcome::Canceled;
    }

    let command_id = request.command_id;
    let program_path = program.path.display().to_string();
    let mut command = build_command(program, extra_arg, request);

    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(error) => {
            warn!(%command_id, program = %program_path, %error, "failed to start handler program");
            return HandlerOutcome::failed(format!(
                "failed to start program {program_path}: {error}"
            ));
        }
    };
    // Declared after `child` so that it is dropped first, while the child
    // is not yet reaped and its pid still names only this group.
    let mut group = ProcessGroupGuard::new(child.id());
    info!(%command_id, program = %program_path, pid = ?child.id(), "started handler program");

    let stdin = child.stdin.take().expect("stdin is piped");
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let input = encode_payload(request.payload.as_ref());

    let mut stdout_bytes = Vec::new();
    let mut stderr_tail = TailBuffer::new(STDERR_TAIL_BYTES);

    let end = {
        let io = pump_io(
            stdin,
            &input,
            &mut stdout,
            &mut stderr,
            &mut stdout_bytes,
            &mut stderr_tail,
        );
        let mut io = std::pin::pin!(io);
        let mut io_done = false;
        let deadline = tokio::time::sleep(program.timeout);
        let mut deadline = std::pin::pin!(deadline);

        let mut end = loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break RunEnd::Canceled,
                _ = &mut deadline => break RunEnd::TimedOut,
                result = &mut io, if !io_done => {
                    io_done = true;
                    if let Err(error) = result {
                        break RunEnd::OutputFailed(error);
                    }
                }
                status = child.wait() => break RunEnd::Exited(status),
            }
        };

        if matches!(end, RunEnd::Exited(_)) {
            group.disarm();
            if !io_done {
                match tokio::time::timeout(OUTPUT_DRAIN_AFTER_EXIT, &mut io).await {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => end = RunEnd::OutputFailed(error),
                    Err(_) => warn!(
                        %command_id, program = %program_path,
                        "handler program exited but a process it started keeps stdout or stderr \
                         open; using the output read so far"
                    ),
                }
            }
        } else {
            group.kill();
            if let Err(error) = child.start_kill() {
                warn!(%command_id, program = %program_path, %error, "failed to kill handler program");
            }
            if let Err(error) = child.wait().await {
                warn!(%command_id, program = %program_path, %error, "failed to wait for killed handler program");
            }
            if !io_done {
                let _ = tokio::time::timeout(OUTPUT_DRAIN_AFTER_KILL, &mut io).await;
            }
        }
        end
    };

    let outcome = build_outcome(program, end, &stdout_bytes, stderr_tail.into_text());
    log_outcome(command_id, &program_path, &outcome);
    outcome
}

fn build_command(program: &Program, extra_arg: Option<&str>, request: &HandlerRequest) -> Command {
    let mut command = Command::new(&program.path);
    command.args(&program.args);
    if let Some(arg) = extra_arg {
        command.arg(arg);
    }
    command.envs(&program.env);
    command.env(COMMAND_ID_ENV, request.command_id.to_string());
    match &request.app_service_name {
        Some(name) => command.env(APP_SERVICE_NAME_ENV, name),
        None => command.env_remove(APP_SERVICE_NAME_ENV),
    };
    if let Some(dir) = &program.working_dir {
        command.current_dir(dir);
    }
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // A new process group whose id is the child's pid, so that one signal
    // reaches the processes that the program starts too.
    #[cfg(unix)]
    command.process_group(0);
    command
}

/// Encodes the payload as one line of compact JSON, `null` when absent.
fn encode_payload(payload: Option<&Value>) -> Vec<u8> {
    let mut input = serde_json::to_vec(payload.unwrap_or(&Value::Null))
        .expect("a JSON value always serializes");
    input.push(b'\n');
    input
}

/// Writes the input to stdin while reading stdout and stderr, so that a
/// program that writes before it reads, or never reads, cannot deadlock
/// against the agent. Returns when the input is written and stdout and stderr
/// reach end of file, or as soon as stdout passes `MAX_STDOUT_BYTES`.
async fn pump_io(
    stdin: ChildStdin,
    input: &[u8],
    stdout: &mut (impl AsyncRead + Unpin),
    stderr: &mut (impl AsyncRead + Unpin),
    stdout_bytes: &mut Vec<u8>,
    stderr_tail: &mut TailBuffer,
) -> Result<(), OutputError> {
    let write = async {
        write_input(stdin, input).await;
        Ok(())
    };
    let read_stdout = read_capped(stdout, stdout_bytes, MAX_STDOUT_BYTES);
    let read_stderr = async {
        let mut chunk = [0u8; 8192];
        loop {
            let count = stderr.read(&mut chunk).await.map_err(OutputError::Read)?;
            if count == 0 {
                return Ok(());
            }
            stderr_tail.push(&chunk[..count]);
        }
    };
    tokio::try_join!(write, read_stdout, read_stderr)?;
    Ok(())
}

/// Writes the input and closes stdin. A program may exit without reading
/// its input, so a broken pipe is expected and not an error.
async fn write_input(mut stdin: ChildStdin, input: &[u8]) {
    if let Err(error) = stdin.write_all(input).await
        && error.kind() != std::io::ErrorKind::BrokenPipe
    {
        warn!(%error, "failed to write the payload to a handler program's stdin");
    }
    drop(stdin);
}

async fn read_capped(
    reader: &mut (impl AsyncRead + Unpin),
    buffer: &mut Vec<u8>,
    limit: usize,
) -> Result<(), OutputError> {
    let mut chunk = [0u8; 8192];
    loop {
        let count = reader.read(&mut chunk).await.map_err(OutputError::Read)?;
        if count == 0 {
            return Ok(());
        }
        if buffer.len() + count > limit {
            return Err(OutputError::StdoutTooLarge);
        }
        buffer.extend_from_slice(&chunk[..count]);
    }
}

fn build_outcome(program: &Program, end: RunEnd, stdout: &[u8], stderr: String) -> HandlerOutcome {
    let program_path = program.path.display();
    match end {
        RunEnd::Canceled => HandlerOutcome::Canceled,
        RunEnd::TimedOut => HandlerOutcome::failed(with_stderr(
            format!(
                "program {program_path} timed out after {} and was killed",
                humantime::format_duration(program.timeout)
            ),
            &stderr,
        )),
        RunEnd::OutputFailed(OutputError::StdoutTooLarge) => HandlerOutcome::failed(with_stderr(
            format!(
                "program {program_path} wrote more than the maximum of {MAX_STDOUT_BYTES} bytes \
                 to stdout; make it write less, for example by saving large results to a file"
            ),
            &stderr,
        )),
        RunEnd::OutputFailed(OutputError::Read(error)) => HandlerOutcome::failed(format!(
            "failed to read the output of program {program_path}: {error}"
        )),
        RunEnd::Exited(Err(error)) => HandlerOutcome::failed(format!(
            "failed to wait for program {program_path}: {error}"
        )),
        RunEnd::Exited(Ok(status)) if status.success() => match parse_stdout(stdout) {
            Ok(response) => HandlerOutcome::Completed { response },
            Err(error) => HandlerOutcome::failed(with_stderr(
                format!(
                    "program {program_path} exited successfully but its stdout was not JSON: {error}"
                ),
                &stderr,
            )),
        },
        RunEnd::Exited(Ok(status)) => HandlerOutcome::Failed {
            error: with_stderr(
                format!("program {program_path} {}", describe_exit(status)),
                &stderr,
            ),
            // A failing program may still report details as JSON on stdout.
            response: parse_stdout(stdout).ok().flatten(),
        },
    }
}

/// Parses stdout as one JSON value. Stdout that is empty or only whitespace means no response.
fn parse_stdout(stdout: &[u8]) -> Result<Option<Value>, serde_json::Error> {
    if stdout.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(stdout).map(Some)
}

fn describe_exit(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        return format!("exited with code {code}");
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(signal) = status.signal() {
            return format!("was terminated by signal {signal}");
        }
    }
    format!("ended with {status}")
}

fn with_stderr(message: String, stderr: &str) -> String {
    if stderr.is_empty() {
        message
    } else {
        format!("{message}; stderr: {stderr}")
    }
}

fn log_outcome(command_id: Uuid, program: &str, outcome: &HandlerOutcome) {
    match outcome {
        HandlerOutcome::Completed { .. } => {
            info!(%command_id, %program, "handler program completed");
        }
        HandlerOutcome::Failed { error, .. } => {
            warn!(%command_id, %program, %error, "handler program failed");
        }
        HandlerOutcome::Canceled => {
            info!(%command_id, %program, "handler program was canceled and killed");
        }
    }
}

/// The end of a byte stream, bounded in memory by twice the kept size.
struct TailBuffer {
    bytes: Vec<u8>,
    keep: usize,
    truncated: bool,
}

impl TailBuffer {
    fn new(keep: usize) -> Self {
        Self {
            bytes: Vec::new(),
            keep,
            truncated: false,
        }
    }

    fn push(&mut self, data: &[u8]) {
        self.bytes.extend_from_slice(data);
        // Dropping only when twice the kept size is reached keeps the copying
        // amortized to a constant per byte.
        if self.bytes.len() > 2 * self.keep {
            let excess = self.bytes.len() - self.keep;
            self.bytes.drain(..excess);
            self.truncated = true;
        }
    }

    /// Returns the last `keep` bytes as trimmed text, starting with "…" when
    /// earlier output was dropped. Invalid UTF-8 becomes U+FFFD.
    fn into_text(self) -> String {
        let start = self.bytes.len().saturating_sub(self.keep);
        let mut tail = &self.bytes[start..];
        let truncated = self.truncated || start > 0;
        if truncated {
            // The cut may fall inside a multi-byte character, whose
            // continuation bytes (0b10xxxxxx) would decode as U+FFFD.
            while let Some((&first, rest)) = tail.split_first() {
                if first & 0xC0 != 0x80 {
                    break;
                }
                tail = rest;
            }
        }
        let text = String::from_utf8_lossy(tail);
        let text = text.trim();
        if truncated && !text.is_empty() {
            format!("…{text}")
        } else {
            text.to_owned()
        }
    }
}

/// Kills a child's process group on `kill` or on drop, unless disarmed.
///
/// It must be disarmed as soon as the child is reaped, because the group id
/// is the child's pid and the system may reuse that pid afterwards.
struct ProcessGroupGuard {
    group_id: Option<u32>,
}

impl ProcessGroupGuard {
    fn new(child_pid: Option<u32>) -> Self {
        Self {
            group_id: child_pid,
        }
    }

    fn disarm(&mut self) {
        self.group_id = None;
    }

    fn kill(&mut self) {
        if let Some(group_id) = self.group_id.take() {
            kill_process_group(group_id);
        }
    }
}

impl Drop for ProcessGroupGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(unix)]
fn kill_process_group(group_id: u32) {
    let Ok(group_id) = libc::pid_t::try_from(group_id) else {
        warn!(
            group_id,
            "process group id does not fit in pid_t; not killing the group"
        );
        return;
    };
    // SAFETY: killpg takes plain integers and has no memory-safety
    // preconditions. The caller guarantees that the group leader is not yet
    // reaped, so the id cannot name an unrelated group.
    let result = unsafe { libc::killpg(group_id, libc::SIGKILL) };
    if result != 0 {
        let error = std::io::Error::last_os_error();
        // ESRCH means every process in the group has already exited.
        if error.raw_os_error() != Some(libc::ESRCH) {
            warn!(group_id, %error, "failed to kill handler process group");
        }
    }
}

// NOTE: Without process groups, only the program itself is killed, and
// processes it started keep running.
#[cfg(not(unix))]
fn kill_process_group(_group_id: u32) {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    const SH: &str = "/bin/sh";

    /// Writes `toml` to a handlers file in a new temporary directory and loads it.
    fn load_handlers(toml: &str) -> (tempfile::TempDir, anyhow::Result<Handlers>) {
        let dir = tempfile::tempdir().expect("create temp dir");
        let path = dir.path().join("handlers.toml");
        std::fs::write(&path, toml).expect("write handlers file");
        let handlers = Handlers::load(&path);
        (dir, handlers)
    }

    /// Loads one app service named "tool" that runs `sh -c script`.
    fn shell_handler(script: &str, timeout: &str) -> (tempfile::TempDir, Handlers) {
        let toml = format!(
            "[[app_service]]\nname = \"tool\"\nprogram = \"{SH}\"\nargs = [\"-c\", {}]\ntimeout = \"{timeout}\"\n",
            toml_string(script)
        );
        let (dir, handlers) = load_handlers(&toml);
        (dir, handlers.expect("valid handlers file"))
    }

    fn toml_string(text: &str) -> String {
        toml::Value::String(text.to_owned()).to_string()
    }

    fn app_service_request(name: &str, payload: Option<Value>) -> HandlerRequest {
        HandlerRequest {
            command_id: Uuid::new_v4(),
            command_type: CommandType::AppService,
            app_service_name: Some(name.to_owned()),
            package_family_name: None,
            payload,
        }
    }

    fn launch_uri_request(payload: Option<Value>) -> HandlerRequest {
        HandlerRequest {
            command_id: Uuid::new_v4(),
            command_type: CommandType::LaunchUri,
            app_service_name: None,
            package_family_name: None,
            payload,
        }
    }

    fn expect_failed(outcome: HandlerOutcome) -> (String, Option<Value>) {
        match outcome {
            HandlerOutcome::Failed { error, response } => (error, response),
            other => panic!("expected Failed, got {other:?}"),
        }
    }

    fn expect_completed(outcome: HandlerOutcome) -> Option<Value> {
        match outcome {
            HandlerOutcome::Completed { response } => response,
            other => panic!("expected Completed, got {other:?}"),
        }
    }

    /// Polls until `path` exists and contains text, and returns the text.
    async fn wait_for_file(path: &Path) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(text) = std::fs::read_to_string(path)
                && text.ends_with('\n')
            {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "{} was not written within 10 s",
                path.display()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Returns whether the process exists and is not a zombie. Killed
    /// grandchildren are reparented, and a container's init may not reap them.
    fn process_is_running(pid: u32) -> bool {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return false;
        };
        // The state letter follows the command name, which ends with ')'.
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next());
        !matches!(state, Some('Z' | 'X'))
    }

    async fn assert_process_stops(pid: u32) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while process_is_running(pid) {
            assert!(
                Instant::now() < deadline,
                "process {pid} is still running 10 s after the kill"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn parse_pids(text: &str) -> Vec<u32> {
        text.split_whitespace()
            .map(|pid| pid.parse().expect("pid is a number"))
            .collect()
    }

    #[tokio::test]
    async fn echo_preserves_payload_exactly() {
        let payload: Value =
            serde_json::from_str(r#"{"n": 12345678901234567890123, "s": "héllo ✓"}"#).unwrap();
        let request = app_service_request("echo", Some(payload));

        let response = expect_completed(
            Handlers::builtin()
                .run(&request, &CancellationToken::new())
                .await,
        );

        let response = response.expect("echo returns the payload");
        assert_eq!(
            response.to_string(),
            r#"{"n":12345678901234567890123,"s":"héllo ✓"}"#
        );
    }

    #[tokio::test]
    async fn echo_matches_name_case_insensitively() {
        let request = app_service_request("Echo", Some(serde_json::json!([1, 2])));

        let response = expect_completed(
            Handlers::builtin()
                .run(&request, &CancellationToken::new())
                .await,
        );

        assert_eq!(response, Some(serde_json::json!([1, 2])));
    }

    #[tokio::test]
    async fn echo_without_payload_returns_none() {
        let request = app_service_request("echo", None);

        let response = expect_completed(
            Handlers::builtin()
                .run(&request, &CancellationToken::new())
                .await,
        );

        assert_eq!(response, None);
    }

    #[tokio::test]
    async fn echo_completes_despite_canceled_token() {
        let cancel = CancellationToken::new();
        cancel.cancel();
        let request = app_service_request("echo", Some(Value::Bool(true)));

        let response = expect_completed(Handlers::builtin().run(&request, &cancel).await);

        assert_eq!(response, Some(Value::Bool(true)));
    }

    #[tokio::test]
    async fn unknown_app_service_fails() {
        let request = app_service_request("paint", None);

        let (error, _) = expect_failed(
            Handlers::builtin()
                .run(&request, &CancellationToken::new())
                .await,
        );

        assert!(
            error.contains(r#"no handler for app service "paint" on this device"#),
            "{error}"
        );
        assert!(error.contains("handlers file"), "{error}");
    }

    #[tokio::test]
    async fn unknown_app_service_names_loaded_file() {
        let (dir, handlers) = shell_handler("cat", "5s");
        let request = app_service_request("paint", None);

        let (error, _) = expect_failed(handlers.run(&request, &CancellationToken::new()).await);

        let path = dir.path().join("handlers.toml").display().to_string();
        assert!(error.contains(&path), "{error}");
    }

    #[tokio::test]
    async fn app_service_without_name_fails() {
        let mut request = app_service_request("echo", None);
        request.app_service_name = None;

        let (error, _) = expect_failed(
            Handlers::builtin()
                .run(&request, &CancellationToken::new())
                .await,
        );

        assert!(error.contains("no AppServiceName"), "{error}");
    }

    #[tokio::test]
    async fn program_returns_stdout_json() {
        let (_dir, handlers) = shell_handler("cat", "10s");
        let payload: Value =
            serde_json::from_str(r#"{"n": 12345678901234567890123, "s": "héllo ✓"}"#).unwrap();
        let request = app_service_request("tool", Some(payload.clone()));

        let response = expect_completed(handlers.run(&request, &CancellationToken::new()).await);

        assert_eq!(response, Some(payload));
    }

    #[tokio::test]
    async fn program_matches_name_case_insensitively() {
        let (_dir, handlers) = shell_handler("echo '{\"ok\": true}'", "10s");
        let request = app_service_request("TOOL", None);

        let response = expect_completed(handlers.run(&request, &CancellationToken::new()).await);

        assert_eq!(response, Some(serde_json::json!({"ok": true})));
    }

    #[tokio::test]
    async fn program_receives_null_without_payload() {
        let (_dir, handlers) = shell_handler("cat", "10s");
        let request = app_service_request("tool", None);

        let response = expect_completed(handlers.run(&request, &CancellationToken::new()).await);

        assert_eq!(response, Some(Value::Null));
    }

    #[tokio::test]
    async fn program_empty_stdout_means_no_response() {
        let (_dir, handlers) = shell_handler("cat > /dev/null", "10s");
        let request = app_service_request("tool", Some(Value::Bool(true)));

        let response = expect_completed(handlers.run(&request, &CancellationToken::new()).await);

        assert_eq!(response, None);
    }

    #[tokio::test]
    async fn program_gets_command_id_env() {
        let (_dir, handlers) = shell_handler(
            "printf '[\"%s\", \"%s\"]' \"$DISPATCHER_COMMAND_ID\" \"$DISPATCHER_APP_SERVICE_NAME\"",
            "10s",
        );
        let request = app_service_request("Tool", None);

        let response = expect_completed(handlers.run(&request, &CancellationToken::new()).await);

        let expected = serde_json::json!([request.command_id.to_string(), "Tool"]);
        assert_eq!(response, Some(expected));
    }

    #[tokio::test]
    async fn program_non_json_stdout_fails() {
        let (_dir, handlers) = shell_handler("echo hello", "10s");
        let request = app_service_request("tool", None);

        let (error, response) =
            expect_failed(handlers.run(&request, &CancellationToken::new()).await);

        assert!(error.contains("stdout was not JSON"), "{error}");
        assert_eq!(response, None);
    }

    #[tokio::test]
    async fn program_nonzero_exit_reports_stderr() {
        let (_dir, handlers) = shell_handler(
            "echo 'disk is full' >&2; echo '{\"step\": 2}'; exit 3",
            "10s",
        );
        let request = app_service_request("tool", None);

        let (error, response) =
            expect_failed(handlers.run(&request, &CancellationToken::new()).await);

        assert!(error.contains("exited with code 3"), "{error}");
        assert!(error.ends_with("stderr: disk is full"), "{error}");
        assert_eq!(response, Some(serde_json::json!({"step": 2})));
    }

    #[tokio::test]
    async fn program_killed_by_signal_fails() {
        let (_dir, handlers) = shell_handler("kill -TERM $$", "10s");
        let request = app_service_request("tool", None);

        let (error, _) = expect_failed(handlers.run(&request, &CancellationToken::new()).await);

        assert!(error.contains("was terminated by signal 15"), "{error}");
    }

    #[tokio::test]
    async fn program_huge_stderr_keeps_tail() {
        let script = "echo FIRST-LINE >&2; head -c 1000000 /dev/zero | tr '\\0' x >&2; \
                      printf '\\nLAST-LINE\\n' >&2; exit 1";
        let (_dir, handlers) = shell_handler(script, "30s");
        let request = app_service_request("tool", None);

        let (error, _) = expect_failed(handlers.run(&request, &CancellationToken::new()).await);

        assert!(
            error.ends_with("xxx\nLAST-LINE"),
            "{}",
            &error[error.len().saturating_sub(100)..]
        );
        assert!(
            !error.contains("FIRST-LINE"),
            "the start of stderr was kept"
        );
        assert!(error.contains("stderr: …x"), "truncation is not marked");
        assert!(
            error.len() < STDERR_TAIL_BYTES + 200,
            "error is {} bytes long",
            error.len()
        );
    }

    #[tokio::test]
    async fn stderr_tail_starts_at_character_boundary() {
        let mut tail = TailBuffer::new(4);
        tail.push("aé✓".as_bytes());

        // The last 4 bytes are the second byte of "é" and the 3 bytes of "✓".
        assert_eq!(tail.into_text(), "…✓");
    }

    #[tokio::test]
    async fn program_huge_stdout_fails() {
        let script = "head -c 2000000 /dev/zero | tr '\\0' 1";
        let (_dir, handlers) = shell_handler(script, "30s");
        let request = app_service_request("tool", None);

        let (error, _) = expect_failed(handlers.run(&request, &CancellationToken::new()).await);

        assert!(
            error.contains("wrote more than the maximum of 1048576 bytes"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn program_ignoring_stdin_does_not_deadlock() {
        let (_dir, handlers) = shell_handler("echo '{\"ok\": true}'", "20s");
        let payload = Value::String("p".repeat(4 * 1024 * 1024));
        let request = app_service_request("tool", Some(payload));

        let response = expect_completed(handlers.run(&request, &CancellationToken::new()).await);

        assert_eq!(response, Some(serde_json::json!({"ok": true})));
    }

    #[tokio::test]
    async fn program_writing_before_reading_does_not_deadlock() {
        // 512 KiB of stderr fills the pipe many times over before the
        // program reads its 512 KiB payload.
        let script = "head -c 524288 /dev/zero >&2; cat";
        let (_dir, handlers) = shell_handler(script, "20s");
        let payload = Value::String("p".repeat(512 * 1024));
        let request = app_service_request("tool", Some(payload.clone()));

        let response = expect_completed(handlers.run(&request, &CancellationToken::new()).await);

        assert_eq!(response, Some(payload));
    }

    #[tokio::test]
    async fn program_timeout_kills_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pids");
        let script = format!("sleep 30 & echo $$ $! > '{}'; sleep 30", pid_file.display());
        let (_handlers_dir, handlers) = shell_handler(&script, "2s");
        let request = app_service_request("tool", None);

        let started = Instant::now();
        let (error, _) = expect_failed(handlers.run(&request, &CancellationToken::new()).await);

        assert!(
            error.contains("timed out after 2s and was killed"),
            "{error}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "took {:?}",
            started.elapsed()
        );
        let pids = parse_pids(&wait_for_file(&pid_file).await);
        assert_eq!(pids.len(), 2, "pid file: {pids:?}");
        for pid in pids {
            assert_process_stops(pid).await;
        }
    }

    #[tokio::test]
    async fn program_cancel_kills_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pids");
        let script = format!("sleep 30 & echo $$ $! > '{}'; sleep 30", pid_file.display());
        let (_handlers_dir, handlers) = shell_handler(&script, "60s");
        let request = app_service_request("tool", None);
        let cancel = CancellationToken::new();

        let run = tokio::spawn({
            let cancel = cancel.clone();
            async move { handlers.run(&request, &cancel).await }
        });
        let pids = parse_pids(&wait_for_file(&pid_file).await);
        cancel.cancel();
        let outcome = tokio::time::timeout(Duration::from_secs(10), run)
            .await
            .expect("run returns within 10 s of the cancel")
            .expect("run task does not panic");

        assert_eq!(outcome, HandlerOutcome::Canceled);
        assert_eq!(pids.len(), 2, "pid file: {pids:?}");
        for pid in pids {
            assert_process_stops(pid).await;
        }
    }

    #[tokio::test]
    async fn program_not_started_when_already_canceled() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("ran");
        let (_handlers_dir, handlers) =
            shell_handler(&format!("touch '{}'", marker.display()), "10s");
        let cancel = CancellationToken::new();
        cancel.cancel();

        let outcome = handlers
            .run(&app_service_request("tool", None), &cancel)
            .await;

        assert_eq!(outcome, HandlerOutcome::Canceled);
        assert!(!marker.exists(), "the program ran");
    }

    #[tokio::test]
    async fn dropped_run_kills_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pids");
        let script = format!("sleep 30 & echo $$ $! > '{}'; sleep 30", pid_file.display());
        let (_handlers_dir, handlers) = shell_handler(&script, "60s");
        let request = app_service_request("tool", None);

        let run =
            tokio::spawn(async move { handlers.run(&request, &CancellationToken::new()).await });
        let pids = parse_pids(&wait_for_file(&pid_file).await);
        run.abort();
        let _ = run.await;

        assert_eq!(pids.len(), 2, "pid file: {pids:?}");
        for pid in pids {
            assert_process_stops(pid).await;
        }
    }

    #[tokio::test]
    async fn program_gets_env_and_working_dir() {
        let work = tempfile::tempdir().unwrap();
        let toml = format!(
            r#"
            [[app_service]]
            name = "tool"
            program = "{SH}"
            args = ["-c", "printf '[\"%s\", \"%s\"]' \"$GREETING\" \"$(pwd)\""]
            env = {{ GREETING = "héllo" }}
            working_dir = {}
            "#,
            toml_string(&work.path().display().to_string())
        );
        let (_dir, handlers) = load_handlers(&toml);
        let request = app_service_request("tool", None);

        let response = expect_completed(
            handlers
                .unwrap()
                .run(&request, &CancellationToken::new())
                .await,
        );

        let work_dir = work.path().canonicalize().unwrap().display().to_string();
        assert_eq!(response, Some(serde_json::json!(["héllo", work_dir])));
    }

    #[tokio::test]
    async fn package_family_name_narrows_entry() {
        let toml = format!(
            r#"
            [[app_service]]
            name = "open"
            program = "{SH}"
            args = ["-c", "echo '\"any\"'"]

            [[app_service]]
            name = "open"
            package_family_name = "Contoso.Tools_8wekyb3d8bbwe"
            program = "{SH}"
            args = ["-c", "echo '\"contoso\"'"]
            "#
        );
        let (_dir, handlers) = load_handlers(&toml);
        let handlers = handlers.unwrap();
        let cases = [
            (Some("Contoso.Tools_8wekyb3d8bbwe"), "contoso"),
            (Some("contoso.tools_8WEKYB3D8BBWE"), "contoso"),
            (Some("Fabrikam.Viewer_1234567890abc"), "any"),
            (None, "any"),
        ];

        for (family, expected) in cases {
            let mut request = app_service_request("open", None);
            request.package_family_name = family.map(str::to_owned);
            let response =
                expect_completed(handlers.run(&request, &CancellationToken::new()).await);
            assert_eq!(
                response,
                Some(Value::from(expected)),
                "package family {family:?}"
            );
        }
    }

    #[tokio::test]
    async fn package_family_name_entry_rejects_others() {
        let toml = format!(
            r#"
            [[app_service]]
            name = "open"
            package_family_name = "Contoso.Tools_8wekyb3d8bbwe"
            program = "{SH}"
            args = ["-c", "true"]
            "#
        );
        let (_dir, handlers) = load_handlers(&toml);
        let mut request = app_service_request("open", None);
        request.package_family_name = Some("Fabrikam.Viewer_1234567890abc".to_owned());

        let (error, _) = expect_failed(
            handlers
                .unwrap()
                .run(&request, &CancellationToken::new())
                .await,
        );

        assert!(
            error.contains(r#"for package family "Fabrikam.Viewer_1234567890abc""#),
            "{error}"
        );
        assert!(error.contains("other package families"), "{error}");
    }

    fn launch_uri_handlers(extra: &str) -> (tempfile::TempDir, Handlers) {
        let toml = format!(
            r#"
            [launch_uri]
            program = "{SH}"
            args = ["-c", "printf '{{\"uri\": \"%s\"}}' \"$1\"", "launch"]
            timeout = "10s"
            {extra}
            "#
        );
        let (dir, handlers) = load_handlers(&toml);
        (dir, handlers.expect("valid handlers file"))
    }

    #[tokio::test]
    async fn launch_uri_passes_uri_as_last_argument() {
        let (_dir, handlers) = launch_uri_handlers("");
        let request = launch_uri_request(Some(
            serde_json::json!({"uri": "https://example.com/a?b=c"}),
        ));

        let response = expect_completed(handlers.run(&request, &CancellationToken::new()).await);

        assert_eq!(
            response,
            Some(serde_json::json!({"uri": "https://example.com/a?b=c"}))
        );
    }

    #[tokio::test]
    async fn launch_uri_unconfigured_fails() {
        let request = launch_uri_request(Some(serde_json::json!({"uri": "https://example.com/"})));

        let (error, _) = expect_failed(
            Handlers::builtin()
                .run(&request, &CancellationToken::new())
                .await,
        );

        assert_eq!(
            error,
            "LaunchUri is not configured on this device; add a [launch_uri] section to the handlers file"
        );
    }

    #[tokio::test]
    async fn launch_uri_rejects_bad_uri() {
        let (_dir, handlers) = launch_uri_handlers("");
        let cases = [
            (None, "has no Payload.uri"),
            (
                Some(serde_json::json!({"url": "https://example.com/"})),
                "has no Payload.uri",
            ),
            (Some(serde_json::json!({"uri": 7})), "must be a string"),
            (
                Some(serde_json::json!({"uri": "--help"})),
                "is not a valid absolute URI",
            ),
            (
                Some(serde_json::json!({"uri": "/relative/path"})),
                "is not a valid absolute URI",
            ),
        ];

        for (payload, expected) in cases {
            let request = launch_uri_request(payload.clone());
            let (error, _) = expect_failed(handlers.run(&request, &CancellationToken::new()).await);
            assert!(error.contains(expected), "payload {payload:?}: {error}");
        }
    }

    #[tokio::test]
    async fn launch_uri_enforces_schemes() {
        let (_dir, handlers) = launch_uri_handlers(r#"schemes = ["HTTPS", "ms-settings"]"#);
        let allowed = launch_uri_request(Some(serde_json::json!({"uri": "ms-settings:display"})));
        let rejected = launch_uri_request(Some(serde_json::json!({"uri": "file:///etc/passwd"})));

        let response = expect_completed(handlers.run(&allowed, &CancellationToken::new()).await);
        let (error, _) = expect_failed(handlers.run(&rejected, &CancellationToken::new()).await);

        assert_eq!(
            response,
            Some(serde_json::json!({"uri": "ms-settings:display"}))
        );
        assert!(
            error.contains(r#"has scheme "file", which this device does not allow"#),
            "{error}"
        );
    }

    #[test]
    fn load_rejects_invalid_files() {
        let entry = |extra: &str| {
            format!("[[app_service]]\nname = \"tool\"\nprogram = \"{SH}\"\n{extra}\n")
        };
        let cases = [
            (
                "unknown key",
                entry("colour = \"red\""),
                "unknown field `colour`",
            ),
            (
                "unknown section",
                "[launch_url]\nprogram = \"/bin/sh\"\n".to_owned(),
                "unknown field `launch_url`",
            ),
            (
                "duplicate name",
                format!("{}{}", entry(""), entry("").replace("\"tool\"", "\"TOOL\"")),
                "duplicate entry",
            ),
            (
                "reserved name",
                entry("").replace("\"tool\"", "\"echo\""),
                "is built in",
            ),
            (
                "empty name",
                entry("").replace("\"tool\"", "\"\""),
                "name must not be empty",
            ),
            (
                "zero timeout",
                entry("timeout = \"0s\""),
                "timeout \"0s\" is zero",
            ),
            (
                "invalid timeout",
                entry("timeout = \"soon\""),
                "timeout \"soon\" is invalid",
            ),
            (
                "missing relative program",
                entry("").replace(SH, "bin/tool"),
                "resolved against the handlers file's directory",
            ),
            (
                "missing absolute program",
                entry("").replace(SH, "/nonexistent/tool"),
                "not found",
            ),
            (
                "program is directory",
                entry("").replace(SH, "/"),
                "is not a file",
            ),
            (
                "missing working dir",
                entry("working_dir = \"/nonexistent/dir\""),
                "is not an existing directory",
            ),
            (
                "invalid env key",
                entry("env = { \"A=B\" = \"c\" }"),
                "env key \"A=B\" is invalid",
            ),
            (
                "empty schemes",
                "[launch_uri]\nprogram = \"/bin/sh\"\nschemes = []\n".to_owned(),
                "schemes must not be empty",
            ),
            (
                "scheme with separator",
                "[launch_uri]\nprogram = \"/bin/sh\"\nschemes = [\"https://\"]\n".to_owned(),
                "scheme \"https://\" is invalid",
            ),
        ];

        for (case, toml, expected) in cases {
            let (dir, result) = load_handlers(&toml);
            let error = format!("{:#}", result.expect_err(case));
            let path = dir.path().join("handlers.toml").display().to_string();
            assert!(error.contains(expected), "{case}: {error}");
            assert!(
                error.contains(&path),
                "{case}: error does not name the file: {error}"
            );
        }
    }

    #[test]
    fn load_error_names_entry() {
        let toml =
            format!("[[app_service]]\nname = \"tool\"\nprogram = \"{SH}\"\ntimeout = \"0s\"\n");

        let (_dir, result) = load_handlers(&toml);

        let error = format!("{:#}", result.unwrap_err());
        assert!(error.contains(r#"[[app_service]] "tool""#), "{error}");
    }

    #[test]
    fn load_allows_same_name_per_package_family() {
        let toml = format!(
            "[[app_service]]\nname = \"tool\"\nprogram = \"{SH}\"\n\
             [[app_service]]\nname = \"tool\"\npackage_family_name = \"A_1\"\nprogram = \"{SH}\"\n\
             [[app_service]]\nname = \"tool\"\npackage_family_name = \"B_2\"\nprogram = \"{SH}\"\n"
        );

        let (_dir, result) = load_handlers(&toml);

        assert!(result.is_ok(), "{:#}", result.unwrap_err());
    }

    #[test]
    fn load_rejects_duplicate_package_family() {
        let toml = format!(
            "[[app_service]]\nname = \"tool\"\npackage_family_name = \"A_1\"\nprogram = \"{SH}\"\n\
             [[app_service]]\nname = \"Tool\"\npackage_family_name = \"a_1\"\nprogram = \"{SH}\"\n"
        );

        let (_dir, result) = load_handlers(&toml);

        let error = format!("{:#}", result.unwrap_err());
        assert!(error.contains("duplicate entry"), "{error}");
    }

    #[test]
    fn load_resolves_relative_program() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        std::fs::copy(SH, bin.join("tool")).unwrap();
        let path = dir.path().join("handlers.toml");
        std::fs::write(
            &path,
            "[[app_service]]\nname = \"tool\"\nprogram = \"bin/tool\"\n",
        )
        .unwrap();

        let handlers = Handlers::load(&path).unwrap();

        let program = &handlers.config.app_services[0].program;
        assert_eq!(program.path, bin.join("tool"));
        assert_eq!(program.timeout, DEFAULT_TIMEOUT);
    }

    #[test]
    fn load_rejects_non_executable_program() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tool"), "#!/bin/sh\n").unwrap();
        let path = dir.path().join("handlers.toml");
        std::fs::write(
            &path,
            "[[app_service]]\nname = \"tool\"\nprogram = \"tool\"\n",
        )
        .unwrap();

        let error = format!("{:#}", Handlers::load(&path).unwrap_err());

        assert!(error.contains("is not executable"), "{error}");
    }

    #[test]
    fn load_reports_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent.toml");

        let error = format!("{:#}", Handlers::load(&path).unwrap_err());

        assert!(error.contains("failed to read handlers file"), "{error}");
        assert!(error.contains("absent.toml"), "{error}");
    }

    #[tokio::test]
    async fn example_file_runs() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/handlers.toml");
        let handlers = Handlers::load(&path).expect("example handlers file loads");
        let cancel = CancellationToken::new();

        let cat = app_service_request("cat", Some(serde_json::json!({"a": [1, "✓"]})));
        let mut version = app_service_request("version", None);
        version.package_family_name = Some("Contoso.Tools_8wekyb3d8bbwe".to_owned());
        let launch = launch_uri_request(Some(serde_json::json!({"uri": "https://example.com/"})));

        let cat_response = expect_completed(handlers.run(&cat, &cancel).await);
        let version_response = expect_completed(handlers.run(&version, &cancel).await);
        let launch_response = expect_completed(handlers.run(&launch, &cancel).await);

        assert_eq!(cat_response, Some(serde_json::json!({"a": [1, "✓"]})));
        let kernel = version_response
            .as_ref()
            .and_then(|response| response.get("kernel"));
        assert!(
            kernel
                .and_then(Value::as_str)
                .is_some_and(|text| !text.is_empty()),
            "{version_response:?}"
        );
        assert_eq!(
            launch_response,
            Some(serde_json::json!({"received": "https://example.com/"}))
        );
    }
}
