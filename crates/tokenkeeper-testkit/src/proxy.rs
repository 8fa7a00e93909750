//! A TCP forwarder on a loopback port whose target can be switched: the address clients keep
//! while a failover moves the service behind it (what a virtual IP, a DNS name or a
//! Sentinel-aware proxy gives applications in production). Switching drops every open
//! connection, as a promoted replica's clients see the old primary's connections die.

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A running forwarder; dropping it stops accepting and closes every connection.
#[derive(Debug)]
pub struct Proxy {
    /// The port clients connect to.
    pub port: u16,
    target: Arc<AtomicU16>,
    generation: watch::Sender<u64>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Forwards a free loopback port to `127.0.0.1:target`.
    ///
    /// # Panics
    ///
    /// If no loopback port can be bound (test scaffolding).
    pub async fn start(target: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let target = Arc::new(AtomicU16::new(target));
        let (generation, _) = watch::channel(0u64);
        let (t, g) = (target.clone(), generation.clone());
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let to = t.load(Ordering::SeqCst);
                let mut switched = g.subscribe();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(("127.0.0.1", to)).await else {
                        return;
                    };
                    let mut client = client;
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = switched.changed() => {}
                    }
                });
            }
        });
        Proxy {
            port,
            target,
            generation,
            accept,
        }
    }

    /// `redis://` URL of the forwarder.
    pub fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Points new connections at `target` and drops every open one.
    pub fn switch_to(&self, target: u16) {
        self.target.store(target, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.generation.send_modify(|g| *g += 1);
    }
}
