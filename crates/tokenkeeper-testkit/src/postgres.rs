//! A real PostgreSQL server for integration tests and benchmarks.
//!
//! [`server_url`] returns `TOKENKEEPER_POSTGRES_URL` when set, otherwise starts one server per
//! process on a free loopback port that stops with the process. [`Server`] is one of its own
//! (stopped, started and crashed by the restart tests). The binaries come from
//! `TOKENKEEPER_POSTGRES_BIN` or Debian's `/usr/lib/postgresql/<version>/bin`. PostgreSQL
//! refuses to run as root: as root, the server runs as the `postgres` user (or `nobody`). A
//! missing PostgreSQL is a panic that says how to install it, never a silent skip.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How to get PostgreSQL, for failure messages.
pub const INSTALL_HINT: &str = "PostgreSQL is needed for the PostgreSQL tests: install it (Debian: `apt-get install postgresql`), or set TOKENKEEPER_POSTGRES_BIN to the directory holding initdb and pg_ctl, or point TOKENKEEPER_POSTGRES_URL at a running server; scripts/test.sh does all of this";

/// The directory holding `initdb` and `pg_ctl`.
pub fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("TOKENKEEPER_POSTGRES_BIN") {
        return PathBuf::from(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((v, bin))
        })
        .collect();
    versions.sort();
    match versions.pop() {
        Some((_, bin)) => bin,
        None => panic!("{INSTALL_HINT}"),
    }
}

/// Who runs the server: nobody in particular when we are not root; otherwise `postgres` (the
/// Debian package's user) or `nobody`, with their uid and gid.
fn run_as() -> Option<(String, u32, u32)> {
    let euid = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&euid.stdout).trim() != "0" {
        return None;
    }
    ["postgres", "nobody"].into_iter().find_map(|user| {
        let id = |flag: &str| {
            let out = Command::new("id").args([flag, user]).output().ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).trim().parse().ok())?
        };
        Some((user.to_owned(), id("-u")?, id("-g")?))
    })
}

/// `program args…` as the server's user.
fn command(program: &Path) -> Command {
    match run_as() {
        Some((user, ..)) => {
            let mut c = Command::new("runuser");
            c.args(["-u", &user, "--"]).arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// A throwaway data directory owned by the server's user, with `initdb` run in it.
fn init(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "tokenkeeper-pg-{tag}-{}",
        crate::dirs::unique_suffix()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    if let Some((_, uid, gid)) = run_as() {
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).unwrap();
    }
    let out = command(&bin_dir().join("initdb"))
        .args([
            "-U",
            "tokenkeeper",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ])
        .arg("-D")
        .arg(&dir)
        .stdout(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{INSTALL_HINT} ({e})"));
    assert!(
        out.status.success(),
        "initdb failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

/// The `pg_ctl start` options: loopback TCP only, room for the tests' pools. `fsync=off` is safe for what the tests do: a killed server keeps what it
/// wrote to the operating system, only a machine crash would lose it.
fn options(port: u16, _dir: &Path) -> String {
    // TCP only: a Unix socket path under a long temporary directory can exceed the 107 bytes
    // a socket path may have.
    format!(
        "-p {port} -c unix_socket_directories= -c listen_addresses=127.0.0.1 -c max_connections=400 -c fsync=off"
    )
}

/// Waits until the server accepts connections (`pg_isready`: a server that is still starting
/// answers TCP but refuses sessions).
fn wait_for(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let ready = || {
        Command::new(bin_dir().join("pg_isready"))
            .args(["-q", "-h", "127.0.0.1", "-p", &port.to_string()])
            .status()
            .is_ok_and(|s| s.success())
    };
    while !ready() {
        assert!(
            Instant::now() < deadline,
            "PostgreSQL did not start on port {port}: {INSTALL_HINT}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A PostgreSQL server of its own, stopped and removed when dropped.
#[derive(Debug)]
pub struct Server {
    /// Its port.
    pub port: u16,
    dir: PathBuf,
    extra: String,
}

impl Server {
    /// Initialises a data directory and starts a server on a free loopback port.
    pub fn start() -> Server {
        let server = Server {
            port: crate::redis::free_port(),
            dir: init("server"),
            extra: String::new(),
        };
        server.start_again();
        server
    }

    /// A server that offers TLS with `ca`'s server certificate (for `127.0.0.1` and
    /// `localhost`).
    pub fn start_tls(ca: &crate::tls::PrivateCa) -> Server {
        let dir = init("tls");
        ca.install_server_files(&dir, run_as().map(|(_, uid, gid)| (uid, gid)));
        let server = Server {
            port: crate::redis::free_port(),
            dir,
            extra: " -c ssl=on -c ssl_cert_file=server.crt -c ssl_key_file=server.key".into(),
        };
        server.start_again();
        server
    }

    /// `postgres://tokenkeeper@127.0.0.1:PORT/postgres?sslmode=disable`
    pub fn url(&self) -> String {
        format!(
            "postgres://tokenkeeper@127.0.0.1:{}/postgres?sslmode=disable",
            self.port
        )
    }

    fn pg_ctl(&self, args: &[&str]) {
        let out = command(&bin_dir().join("pg_ctl"))
            .arg("-D")
            .arg(&self.dir)
            .args(args)
            .stdout(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Stops the server cleanly (`pg_ctl stop -m fast`: connections are closed).
    pub fn stop(&self) {
        self.pg_ctl(&["stop", "-m", "fast", "-w"]);
    }

    /// Kills the server (`pg_ctl stop -m immediate`: no shutdown checkpoint; the next start
    /// recovers from the write-ahead log).
    pub fn crash(&self) {
        self.pg_ctl(&["stop", "-m", "immediate", "-w"]);
    }

    /// Starts the (stopped) server again on the same port and data.
    pub fn start_again(&self) {
        let log = self.dir.join("server.log");
        self.pg_ctl(&[
            "start",
            "-w",
            "-t",
            "30",
            "-l",
            log.to_str().unwrap_or("server.log"),
            "-o",
            &format!("{}{}", options(self.port, &self.dir), self.extra),
        ]);
        wait_for(self.port);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = command(&bin_dir().join("pg_ctl"))
            .arg("-D")
            .arg(&self.dir)
            .args(["stop", "-m", "immediate", "-w"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The shared server's URL. A server started here lives as long as the test process: a shell
/// wrapper stops it when our stdin pipe closes, whichever way the process ends.
pub fn server_url() -> String {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        if let Ok(url) = std::env::var("TOKENKEEPER_POSTGRES_URL") {
            return url;
        }
        let dir = init("shared");
        let port = crate::redis::free_port();
        let pg_ctl = bin_dir().join("pg_ctl");
        let as_user = match run_as() {
            Some((user, ..)) => format!("runuser -u {user} -- "),
            None => String::new(),
        };
        let d = dir.display();
        let script = format!(
            "{as_user}'{}' -D '{d}' -w -t 30 -l '{d}/server.log' -o '{}' start >/dev/null 2>&1; read _; {as_user}'{}' -D '{d}' -m immediate -w stop >/dev/null 2>&1; rm -rf '{d}'",
            pg_ctl.display(),
            options(port, &dir),
            pg_ctl.display(),
        );
        let child = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        // Keep the pipe's write end open for the life of the process.
        std::mem::forget(child);
        wait_for(port);
        format!("postgres://tokenkeeper@127.0.0.1:{port}/postgres?sslmode=disable")
    })
    .clone()
}

/// A schema name no other test (or process) uses: `tk_<tag>_<n>`.
pub fn unique_schema(tag: &str) -> String {
    let suffix: String = crate::dirs::unique_suffix()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let mut name = format!("tk_{tag}_{suffix}").to_ascii_lowercase();
    name.truncate(63);
    name
}
