//! Ports for the servers tests start, chosen so that parallel test processes never collide.
//!
//! nextest runs every test in its own process, so dozens of processes start redis-servers,
//! cluster nodes and PostgreSQL at once. A port from `bind(0)` comes from the kernel's
//! ephemeral range, where it can be handed out again to another process's `bind(0)` or an
//! outgoing connection before our server binds it; and a Redis Cluster node also needs
//! port + 10000 for its bus. A CI run lost a cluster test to exactly that ("redis-server did
//! not start on port 32853"). So ports come from below the ephemeral range, with port + 10000
//! below it too, and each is reserved across processes by an advisory lock on a file named
//! after it, held until the process exits (the kernel drops the lock however it ends).

use std::fs::File;
use std::net::TcpListener;
use std::sync::Mutex;

/// The lowest port handed out.
const LOW: u16 = 10_000;
/// The cluster bus listens here above the client port.
const BUS_OFFSET: u16 = 10_000;

/// The locks this process holds: one per port it was given.
static HELD: Mutex<Vec<File>> = Mutex::new(Vec::new());

/// The first port of the kernel's ephemeral range (32768 when it cannot be read).
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// A pseudo-random start so that processes begin their search in different places.
fn seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    u64::from(nanos) ^ (u64::from(std::process::id()) << 20)
}

/// True when nothing listens on `port` now.
fn bindable(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// Takes the cross-process lock for `port`; false when another process holds it.
fn reserve(port: u16) -> bool {
    let dir = std::env::temp_dir().join("tokenkeeper-test-ports");
    if std::fs::create_dir_all(&dir).is_err() {
        return true; // no shared place to coordinate: the bind check alone decides
    }
    let Ok(file) = File::create(dir.join(port.to_string())) else {
        return false;
    };
    if file.try_lock().is_err() {
        return false;
    }
    HELD.lock().unwrap_or_else(|e| e.into_inner()).push(file);
    true
}

/// A loopback port for a test server: free now, not in the ephemeral range, with port + 10000
/// free and outside it as well, and handed to no other test process while this one lives.
pub fn server_port() -> u16 {
    let high = ephemeral_low().saturating_sub(BUS_OFFSET).max(LOW + 1);
    let span = u64::from(high - LOW);
    let start = seed();
    for i in 0..span {
        let port = LOW + u16::try_from((start + i * 7919) % span).unwrap_or(0);
        if bindable(port) && bindable(port + BUS_OFFSET) && reserve(port) {
            return port;
        }
    }
    panic!("no free loopback port below the ephemeral range ({LOW}..{high})")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_and_outside_the_ephemeral_range() {
        let low = ephemeral_low();
        let ports: Vec<u16> = (0..50).map(|_| server_port()).collect();
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), ports.len(), "a port was handed out twice");
        assert!(ports.iter().all(|p| *p >= LOW && p + BUS_OFFSET < low));
    }

    #[test]
    fn a_port_held_by_another_holder_is_not_handed_out() {
        let port = server_port();
        // A second lock on the same file, as another process would try, fails while held.
        let path = std::env::temp_dir()
            .join("tokenkeeper-test-ports")
            .join(port.to_string());
        let other = File::open(path).unwrap();
        assert!(other.try_lock().is_err());
    }
}
