//! A real redis-server for integration tests and benchmarks.
//!
//! [`server_url`] returns `TOKENKEEPER_REDIS_URL` when set, otherwise starts one server per
//! process on a free loopback port (no persistence) that dies with the process. A missing
//! redis-server is a panic that says how to install it, never a silent skip.

use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How to get a redis-server, for failure messages.
pub const INSTALL_HINT: &str = "redis-server is needed for the Redis tests: install it (Debian: `apt-get install redis-server`), put it on PATH or set TOKENKEEPER_REDIS_SERVER, or point TOKENKEEPER_REDIS_URL at a running server; scripts/test.sh does all of this";

/// A free loopback TCP port no other test process is given (see [`crate::ports`]).
pub fn free_port() -> u16 {
    crate::ports::server_port()
}

/// The redis-server binary (`TOKENKEEPER_REDIS_SERVER` or `redis-server` on PATH); panics
/// with installation instructions when there is none.
pub fn server_binary() -> String {
    let bin = std::env::var("TOKENKEEPER_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
    match Command::new(&bin).arg("--version").output() {
        Ok(out) if out.status.success() => bin,
        _ => panic!("{INSTALL_HINT}"),
    }
}

/// Waits (up to 10 s) until a redis-server accepts connections on `port`; fails at once,
/// with its exit status, when `child` is given and exits first.
fn wait_for_port(port: u16, mut child: Option<&mut Child>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(Ok(Some(status))) = child.as_mut().map(|c| c.try_wait()) {
            panic!("redis-server on port {port} exited at start ({status})");
        }
        assert!(
            Instant::now() < deadline,
            "redis-server did not start on port {port}: {INSTALL_HINT}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A redis-server child (no persistence unless `extra` turns it on, its own temp dir) that is
/// killed when dropped.
#[derive(Debug)]
pub struct Server {
    /// Its port.
    pub port: u16,
    child: Child,
    dir: std::path::PathBuf,
    extra: Vec<String>,
}

impl Server {
    /// Starts a server on `port` with extra arguments and waits until it accepts connections.
    pub fn start_on(port: u16, extra: &[&str]) -> Server {
        let dir =
            std::env::temp_dir().join(format!("tokenkeeper-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let extra: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
        let child = spawn(port, &dir, &extra);
        Server {
            port,
            child,
            dir,
            extra,
        }
    }

    /// Kills the server with SIGKILL (a crash: nothing is saved on the way down) and starts
    /// it again on the same port, directory and arguments, so it recovers from whatever it
    /// had persisted.
    pub fn crash_and_restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn(self.port, &self.dir, &self.extra);
    }

    /// Kills the server with SIGKILL and leaves it down.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts a killed server again on the same port, directory and arguments.
    pub fn start_again(&mut self) {
        self.child = spawn(self.port, &self.dir, &self.extra);
    }

    /// `redis://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

fn spawn(port: u16, dir: &std::path::Path, extra: &[String]) -> Child {
    {
        let mut child = Command::new(server_binary())
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(dir)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{INSTALL_HINT} ({e})"));
        wait_for_port(port, Some(&mut child));
        child
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The shared server's URL. A server started here lives as long as the test process: a shell
/// wrapper kills it when our stdin pipe closes, whichever way the process ends.
pub fn server_url() -> String {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        if let Ok(url) = std::env::var("TOKENKEEPER_REDIS_URL") {
            return url;
        }
        let bin = server_binary();
        let port = free_port();
        let script = format!(
            "'{bin}' --port {port} --bind 127.0.0.1 --save '' --appendonly no --dir /tmp >/dev/null 2>&1 & pid=$!; read _; kill $pid"
        );
        let child = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        // Keep the pipe's write end open for the life of the process.
        std::mem::forget(child);
        wait_for_port(port, None);
        format!("redis://127.0.0.1:{port}")
    })
    .clone()
}

/// A key prefix no other test (or process) uses.
pub fn unique_prefix(tag: &str) -> String {
    format!("tk-test-{tag}-{}", crate::dirs::unique_suffix())
}

/// The redis-cli next to the redis-server in use (or on PATH).
pub fn cli_binary() -> String {
    let server = server_binary();
    let beside = std::path::Path::new(&server).with_file_name("redis-cli");
    if beside.is_file() {
        beside.to_string_lossy().into_owned()
    } else {
        "redis-cli".to_owned()
    }
}

/// Runs `redis-cli -p port args…` and returns its output.
pub fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new(cli_binary())
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("redis-cli: {e}: {INSTALL_HINT}"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The arguments that make a redis-server a cluster node (1 s node timeout, so a failover
/// takes a few seconds).
fn cluster_args(port: u16) -> Vec<String> {
    vec![
        "--cluster-enabled".into(),
        "yes".into(),
        "--cluster-config-file".into(),
        format!("nodes-{port}.conf"),
        "--cluster-node-timeout".into(),
        "1000".into(),
    ]
}

/// Joins the nodes on `ports` into a cluster with `replicas` replicas per primary and waits
/// until every node reports `cluster_state:ok`.
fn create_cluster(ports: &[u16], replicas: usize) {
    let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let out = Command::new(cli_binary())
        .args(["--cluster", "create"])
        .args(&addrs)
        .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
        .output()
        .unwrap_or_else(|e| panic!("redis-cli: {e}: {INSTALL_HINT}"));
    assert!(
        out.status.success(),
        "redis-cli --cluster create failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    wait_cluster_ok(ports);
}

/// Waits (up to 30 s) until every node on `ports` says `cluster_state:ok`.
pub fn wait_cluster_ok(ports: &[u16]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ports
        .iter()
        .all(|p| cli(*p, &["cluster", "info"]).contains("cluster_state:ok"))
    {
        assert!(
            Instant::now() < deadline,
            "the Redis Cluster did not become ok"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A Redis Cluster of its own on free loopback ports (no persistence), stopped when dropped.
#[derive(Debug)]
pub struct Cluster {
    /// Its nodes, primaries first as created.
    pub nodes: Vec<Server>,
}

impl Cluster {
    /// `primaries` primaries with `replicas` replicas each.
    pub fn start(primaries: usize, replicas: usize) -> Cluster {
        let nodes: Vec<Server> = (0..primaries * (1 + replicas))
            .map(|_| {
                let port = free_port();
                // With an append-only file: a killed node that comes back has its data.
                let mut args = cluster_args(port);
                args.extend(["--appendonly".to_owned(), "yes".to_owned()]);
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                Server::start_on(port, &args)
            })
            .collect();
        let ports: Vec<u16> = nodes.iter().map(|n| n.port).collect();
        create_cluster(&ports, replicas);
        let cluster = Cluster { nodes };
        // `cluster_state:ok` comes before the replicas have synced: wait for their links, so
        // a `WAIT` right away counts them.
        cluster.wait_replicas_synced();
        cluster
    }

    /// `redis://127.0.0.1:PORT` of every node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(Server::url).collect()
    }

    /// The ports of the nodes that are primaries now.
    pub fn primary_ports(&self) -> Vec<u16> {
        let any = self
            .nodes
            .iter()
            .find(|n| !cli(n.port, &["ping"]).is_empty());
        let Some(any) = any else { return Vec::new() };
        cli(any.port, &["cluster", "nodes"])
            .lines()
            .filter(|l| l.contains("master") && !l.contains("fail"))
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter_map(|addr| addr.split('@').next()?.rsplit(':').next()?.parse().ok())
            .collect()
    }

    /// Kills the node on `port` (SIGKILL: a crash).
    pub fn kill(&mut self, port: u16) {
        if let Some(n) = self.nodes.iter_mut().find(|n| n.port == port) {
            n.kill();
        }
    }

    /// Waits (up to 30 s) until the cluster has failed over from the killed primary on
    /// `port`: `primaries` primaries again, none of them that one, and every other node ok.
    pub fn wait_failover(&self, port: u16, primaries: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let now = self.primary_ports();
            if now.len() == primaries && !now.contains(&port) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no failover from {port}: {now:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let alive: Vec<u16> = self.ports().into_iter().filter(|p| *p != port).collect();
        wait_cluster_ok(&alive);
    }

    /// Starts the killed node on `port` again: it rejoins from its cluster configuration
    /// (as a replica, if its slots were failed over meanwhile).
    pub fn restart(&mut self, port: u16) {
        if let Some(n) = self.nodes.iter_mut().find(|n| n.port == port) {
            n.start_again();
        }
    }

    /// The ports of every node.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// Waits (up to 30 s) until every replica's link to its primary is up.
    pub fn wait_replicas_synced(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let synced = |p: &u16| {
            let info = cli(*p, &["info", "replication"]);
            !info.contains("role:slave") || info.contains("master_link_status:up")
        };
        while !self.ports().iter().all(synced) {
            assert!(Instant::now() < deadline, "the replicas did not sync");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The URLs of a shared 3-primary cluster (no replicas) that lives as long as the test
/// process: a shell wrapper stops its servers when our stdin pipe closes.
pub fn cluster_urls() -> Vec<String> {
    static URLS: OnceLock<Vec<String>> = OnceLock::new();
    URLS.get_or_init(|| {
        let bin = server_binary();
        let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let mut script = String::new();
        for port in &ports {
            let dir = std::env::temp_dir().join(format!(
                "tokenkeeper-redis-cluster-{}-{port}",
                std::process::id()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            script.push_str(&format!(
                "'{bin}' --port {port} --bind 127.0.0.1 --save '' --appendonly no --dir '{}' {} >/dev/null 2>&1 & pids=\"$pids $!\"; ",
                dir.display(),
                cluster_args(*port).join(" ")
            ));
        }
        script.push_str(&format!(
            "read _; kill $pids; rm -rf {}/tokenkeeper-redis-cluster-{}-*",
            std::env::temp_dir().display(),
            std::process::id()
        ));
        let child = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        // Keep the pipe's write end open for the life of the process.
        std::mem::forget(child);
        for port in &ports {
            wait_for_port(*port, None);
        }
        create_cluster(&ports, 0);
        ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    })
    .clone()
}
