//! Child processes: the parent side ([`ChildProcess`]: spawn a binary of this crate,
//! read its status lines, write commands, SIGKILL it) and the child side (what
//! `relay-child` and `consumer-child` share: settings from the environment, commands
//! from stdin, exiting when the parent goes away).
//!
//! The protocol is lines of text: a child prints `ready` once it runs, and other
//! status lines (`doomed …`, `stats …`); it reads commands (`go`, `stop`) from stdin
//! and exits at once when stdin ends, so that no child outlives a failed test.

use edupulse_events::{Config, ConsumerSettings, EventService, RelaySettings};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;

/// A running child process of the suite. It is killed (SIGKILL) when dropped.
#[derive(Debug)]
pub struct ChildProcess {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::UnboundedReceiver<String>,
    log: PathBuf,
}

/// The directory where children's stderr logs go.
pub fn log_dir(scenario: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("edupulse-faults-{scenario}"));
    let _ = std::fs::create_dir_all(&dir);
    dir
}

impl ChildProcess {
    /// Starts `program` with `env` added to the environment; its stdout lines are
    /// collected, its stderr appended to `{log_dir}/{name}.log`.
    ///
    /// # Panics
    /// If the program cannot be started (tests only).
    pub fn spawn(program: &str, name: &str, env: &[(&str, String)], log_dir: &Path) -> Self {
        let log = log_dir.join(format!("{name}.log"));
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("open the child's log file");
        let mut command = Command::new(program);
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .kill_on_drop(true);
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("start {program}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let stdin = child.stdin.take();
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        ChildProcess {
            name: name.to_owned(),
            child,
            stdin,
            lines,
            log,
        }
    }

    /// The child's name, as given to [`ChildProcess::spawn`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where the child's stderr goes.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// The process id, while the child runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Waits for the next line that starts with `prefix`, skipping others; `None` if
    /// `limit` passes or the child's stdout ends first.
    pub async fn next_line(&mut self, prefix: &str, limit: Duration) -> Option<String> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(line)) if line.starts_with(prefix) => return Some(line),
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => return None,
            }
        }
    }

    /// Like [`ChildProcess::next_line`], but panics (with the log's path) on a timeout.
    pub async fn expect_line(&mut self, prefix: &str, limit: Duration) -> String {
        match self.next_line(prefix, limit).await {
            Some(line) => line,
            None => panic!(
                "child {} printed no `{prefix}` line within {limit:?}; see {}",
                self.name,
                self.log.display()
            ),
        }
    }

    /// The lines printed since the last read, without waiting.
    pub fn drain_lines(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(line) = self.lines.try_recv() {
            out.push(line);
        }
        out
    }

    /// Writes a command line to the child's stdin; false if the child is gone.
    pub async fn send(&mut self, command: &str) -> bool {
        let Some(stdin) = self.stdin.as_mut() else {
            return false;
        };
        stdin
            .write_all(format!("{command}\n").as_bytes())
            .await
            .is_ok()
            && stdin.flush().await.is_ok()
    }

    /// Kills the child with SIGKILL and reaps it.
    pub async fn kill(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    /// Asks the child to stop (`stop` on stdin) and waits up to `limit` for it to
    /// exit; kills it if it does not. Returns whether it exited by itself with success.
    pub async fn stop(&mut self, limit: Duration) -> bool {
        self.send("stop").await;
        match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(Ok(status)) => status.success(),
            _ => {
                self.kill().await;
                false
            }
        }
    }
}

// ---- The child side ----

/// Reads a duration in milliseconds from the environment variable `key`.
pub fn env_millis(key: &str) -> Option<Duration> {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_millis)
}

/// The relay settings a child runs with: [`crate::workload::suite_relay`], with
/// `EDUPULSE_FAULT_ACK_TIMEOUT_MS`, `EDUPULSE_FAULT_RETRY_MAX_MS` and
/// `EDUPULSE_FAULT_BATCH_SIZE` overriding.
pub fn relay_settings_from_env() -> RelaySettings {
    let mut settings = crate::workload::suite_relay();
    if let Some(timeout) = env_millis("EDUPULSE_FAULT_ACK_TIMEOUT_MS") {
        settings.ack_timeout = timeout;
    }
    if let Some(max) = env_millis("EDUPULSE_FAULT_RETRY_MAX_MS") {
        settings.retry_max = max;
    }
    if let Some(batch) = std::env::var("EDUPULSE_FAULT_BATCH_SIZE")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        settings.batch_size = batch;
    }
    settings
}

/// The consumer settings a child runs with: [`crate::workload::suite_consumer`], with
/// `EDUPULSE_FAULT_ACK_WAIT_MS` overriding.
pub fn consumer_settings_from_env() -> ConsumerSettings {
    let mut settings = crate::workload::suite_consumer();
    if let Some(wait) = env_millis("EDUPULSE_FAULT_ACK_WAIT_MS") {
        settings.ack_wait = wait;
    }
    settings
}

/// Builds the configuration from the environment (`DATABASE_URL`, `NATS_URL`,
/// `EDUPULSE_SUBJECT_PREFIX`, `EDUPULSE_STREAM`, `EDUPULSE_SOURCE`, as
/// [`Config::from_env`] reads them) with `relay` as the relay settings.
///
/// # Errors
/// The configuration error, as text.
pub fn config_from_env(relay: RelaySettings) -> Result<Config, String> {
    // Validates the variables and gives the library's own error messages.
    let base = Config::from_env().map_err(|e| e.to_string())?;
    let database_url = std::env::var("DATABASE_URL").map_err(|e| e.to_string())?;
    let mut builder = Config::builder(database_url)
        .subject_prefix(base.subject_prefix())
        .stream(base.stream())
        .source(base.source())
        .max_connections(4)
        .connect_timeout(Duration::from_secs(2))
        .relay(relay);
    if let Ok(nats_url) = std::env::var("NATS_URL") {
        builder = builder.nats_url(nats_url);
    }
    builder.build().map_err(|e| e.to_string())
}

/// Connects with `config`, retrying every 200 ms until it works: a child may start
/// while a server is down or a proxy refuses.
pub async fn connect_until_up(config: Config) -> EventService {
    loop {
        match EventService::connect(config.clone()).await {
            Ok(service) => return service,
            Err(error) => {
                eprintln!("child: cannot connect yet: {error}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Reads command lines from stdin on a thread of its own; when stdin ends (the parent
/// is gone) the process exits at once.
pub fn stdin_commands() -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        let mut line = String::new();
        loop {
            line.clear();
            match stdin.read_line(&mut line) {
                Ok(0) | Err(_) => std::process::exit(0),
                Ok(_) => {
                    if tx.send(line.trim().to_owned()).is_err() {
                        std::process::exit(0);
                    }
                }
            }
        }
    });
    rx
}

/// Prints a status line to stdout and flushes it (the parent reads it at once).
pub fn say(line: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{line}");
    let _ = stdout.flush();
}
