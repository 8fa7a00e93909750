//! A real redis-server for integration tests and benchmarks.
//!
//! [`server_url`] returns `TOKENKEEPER_REDIS_URL` when set, otherwise starts one server per
//! process on a free loopback port (no persistence) that dies with the process. A missing
//! redis-server is a panic that says how to install it, never a silent skip.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How to get a redis-server, for failure messages.
pub const INSTALL_HINT: &str = "redis-server is needed for the Redis tests: install it (Debian: `apt-get install redis-server`), put it on PATH or set TOKENKEEPER_REDIS_SERVER, or point TOKENKEEPER_REDIS_URL at a running server; scripts/test.sh does all of this";

/// A free loopback TCP port.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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

/// A redis-server child (no persistence unless `extra` turns it on, its own temp dir) that is
/// killed when dropped.
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

    /// `redis://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

fn spawn(port: u16, dir: &std::path::Path, extra: &[String]) -> Child {
    {
        let child = Command::new(server_binary())
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
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not start on port {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
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
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start: {INSTALL_HINT}");
            std::thread::sleep(Duration::from_millis(20));
        }
        format!("redis://127.0.0.1:{port}")
    })
    .clone()
}

/// A key prefix no other test (or process) uses.
pub fn unique_prefix(tag: &str) -> String {
    format!("tk-test-{tag}-{}", crate::dirs::unique_suffix())
}
