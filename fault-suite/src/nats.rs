//! A private `nats-server` with JetStream on a free port that a scenario may kill
//! (SIGKILL), pause (SIGSTOP), resume (SIGCONT) and restart with the same store. The
//! machine's shared server is never touched.

use edupulse_events_tests::{free_port, unique, wait_for};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A private nats-server; killed and its store removed when dropped.
#[derive(Debug)]
pub struct NatsProcess {
    /// The server's port.
    pub port: u16,
    store: PathBuf,
    child: Option<Child>,
    paused: bool,
}

/// The nats-server binary: `NATS_SERVER_BIN`, else `/usr/sbin/nats-server`, else the
/// one on the `PATH`.
pub fn nats_server_binary() -> String {
    if let Ok(binary) = std::env::var("NATS_SERVER_BIN") {
        return binary;
    }
    if std::path::Path::new("/usr/sbin/nats-server").is_file() {
        return "/usr/sbin/nats-server".to_owned();
    }
    "nats-server".to_owned()
}

/// Sends `signal` (e.g. `STOP`, `CONT`) to process `pid` with kill(1).
///
/// # Panics
/// If kill(1) cannot be run or fails (tests only).
pub fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill(1)");
    assert!(status.success(), "kill -{signal} {pid} failed: {status}");
}

impl NatsProcess {
    /// Starts a server and waits until it accepts connections.
    pub async fn start() -> NatsProcess {
        let store = std::env::temp_dir().join(format!("edupulse-faults-nats-{}", unique()));
        std::fs::create_dir_all(&store).expect("create the nats store dir");
        let mut server = NatsProcess {
            port: free_port(),
            store,
            child: None,
            paused: false,
        };
        server.spawn().await;
        server
    }

    /// The URL to connect to.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    async fn spawn(&mut self) {
        let child = Command::new(nats_server_binary())
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(&self.store)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server (is it installed?)");
        self.child = Some(child);
        self.paused = false;
        let port = self.port;
        wait_for(
            Duration::from_secs(20),
            "nats-server to accept connections",
            || async move { std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() },
        )
        .await;
    }

    /// Kills the server with SIGKILL (a paused one too) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.paused = false;
    }

    /// Pauses the server with SIGSTOP: connections stay open, nothing is answered.
    pub fn pause(&mut self) {
        if let Some(pid) = self.pid() {
            signal(pid, "STOP");
            self.paused = true;
        }
    }

    /// Resumes a paused server with SIGCONT.
    pub fn resume(&mut self) {
        if let Some(pid) = self.pid() {
            signal(pid, "CONT");
            self.paused = false;
        }
    }

    /// Starts the server again on the same port and store (killing it first if it runs).
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }
}

impl Drop for NatsProcess {
    fn drop(&mut self) {
        // SIGKILL ends a stopped process too.
        self.kill();
        let _ = std::fs::remove_dir_all(&self.store);
    }
}
