//! webhook_relay: forwards every lifecycle event of a token store to an HTTP endpoint, signed,
//! retried until accepted, in order per installation, resuming after a restart from the cursor
//! it saved. The at-least-once contract: an event is posted again when the relay died between
//! the endpoint's answer and saving the cursor; the `X-Tokenkeeper-Delivery` header (the
//! event's `delivery_id()`: log, part, position) is the same both times, so the endpoint
//! de-duplicates on it.
//!
//! ```text
//! cargo run --example webhook_relay -- --store tokens.db --endpoint https://hooks.example/tk \
//!     --cursor-file relay.cursor            # the HMAC key comes from TK_RELAY_SECRET
//! cargo run --example webhook_relay -- --self-test
//! ```
//!
//! Each POST carries the event as JSON and:
//! - `X-Tokenkeeper-Timestamp`: unix seconds of the attempt;
//! - `X-Tokenkeeper-Delivery`: the event's `delivery_id()`, the same on every delivery;
//! - `X-Tokenkeeper-Signature`: `v1=` + hex HMAC-SHA256(secret, "v1:" + timestamp + ":" +
//!   delivery + ":" + body): the delivery id is signed, so de-duplicating on it is safe.
//!
//! An endpoint verifies the signature in constant time, refuses a timestamp more than
//! [`TOLERANCE`] away from its clock (a captured request cannot be replayed later), and
//! acts on each delivery id once (a replay inside the window changes nothing), as the
//! self-test's endpoint does. The relay refuses a secret shorter than 32 bytes, a plain
//! `http://` endpoint other than loopback, and follows no redirect (a 307 would re-post
//! signed events wherever it points).
//!
//! `--self-test` runs the whole story on this machine: a mock provider, a SQLite store with a
//! manager writing events, a receiver that checks every signature and answers 503 to some
//! attempts, and the relay as a child process that is SIGKILLed mid-stream and restarted; it
//! checks that every stored event arrived, in order per installation, nothing lost.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokenkeeper::core::{EventCursor, LifecycleEvent};
use tokenkeeper::stores::SqliteStore;
use tokenkeeper::{TokenManager, core::TokenStore, events::EventStream};
use tokenkeeper_mock_provider::{MockProfile, MockProvider};

#[path = "support.rs"]
mod support;

use support::Fallible;

const SIGNATURE: &str = "x-tokenkeeper-signature";
const TIMESTAMP: &str = "x-tokenkeeper-timestamp";
const DELIVERY: &str = "x-tokenkeeper-delivery";
const SECRET_ENV: &str = "TK_RELAY_SECRET";
/// How far a delivery's timestamp may be from the endpoint's clock.
const TOLERANCE: Duration = Duration::from_secs(300);
/// The shortest secret the relay accepts.
const MIN_SECRET: usize = 32;

/// The MAC over `v1:timestamp:delivery:body`.
fn mac(secret: &[u8], timestamp: &str, delivery: &str, body: &[u8]) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    for part in [
        b"v1:",
        timestamp.as_bytes(),
        b":",
        delivery.as_bytes(),
        b":",
    ] {
        mac.update(part);
    }
    mac.update(body);
    mac
}

/// `v1=` + hex HMAC-SHA256 of `v1:timestamp:delivery:body`.
fn signature(secret: &[u8], timestamp: &str, delivery: &str, body: &[u8]) -> String {
    let hex: String = mac(secret, timestamp, delivery, body)
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("v1={hex}")
}

/// What an endpoint does with the headers: the timestamp within [`TOLERANCE`] of `now`
/// (unix seconds), and the signature checked in constant time.
fn verify(
    secret: &[u8],
    (timestamp, delivery): (&str, &str),
    body: &[u8],
    header: &str,
    now: u64,
) -> bool {
    let Ok(at) = timestamp.parse::<u64>() else {
        return false;
    };
    if at.abs_diff(now) > TOLERANCE.as_secs() {
        return false;
    }
    let Some(hex) = header.strip_prefix("v1=") else {
        return false;
    };
    let Some(bytes) = (0..hex.len())
        .step_by(2)
        .map(|i| {
            hex.get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect::<Option<Vec<u8>>>()
    else {
        return false;
    };
    mac(secret, timestamp, delivery, body)
        .verify_slice(&bytes)
        .is_ok()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The relay's HTTP client: no redirects (a 307 or 308 would re-post signed events to
/// wherever it points), a bounded wait.
fn relay_client() -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .build()
}

/// The endpoint, if it is https, or plain http on a loopback host.
fn checked_endpoint(endpoint: &str) -> Fallible<reqwest::Url> {
    let url: reqwest::Url = endpoint.parse()?;
    let host = url.host_str().unwrap_or_default();
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    match url.scheme() {
        "https" => Ok(url),
        "http" if loopback => Ok(url),
        _ => Err(format!(
            "the endpoint {endpoint} must be https (plain http only on a loopback host): signed events carry installation ids and the provider's words"
        )
        .into()),
    }
}

/// The secret, if it is long enough to be one.
fn checked_secret(secret: String) -> Fallible<Vec<u8>> {
    if secret.len() < MIN_SECRET {
        return Err(format!(
            "{SECRET_ENV} holds {} bytes; give it at least {MIN_SECRET} random bytes (an empty or short key lets anyone sign events)",
            secret.len()
        )
        .into());
    }
    Ok(secret.into_bytes())
}

struct Relay {
    http: reqwest::Client,
    endpoint: reqwest::Url,
    secret: Vec<u8>,
    cursor_file: PathBuf,
}

impl Relay {
    /// Posts one event until the endpoint accepts it (2xx), backing off 50 ms to 5 s.
    async fn deliver(&self, event: &LifecycleEvent) -> Fallible<u32> {
        let body = serde_json::to_vec(event)?;
        let mut pause = Duration::from_millis(50);
        for attempt in 1u32.. {
            let timestamp = unix_now().to_string();
            let delivery = event.delivery_id();
            let sent = self
                .http
                .post(self.endpoint.clone())
                .header("content-type", "application/json")
                .header(TIMESTAMP, &timestamp)
                .header(
                    SIGNATURE,
                    signature(&self.secret, &timestamp, &delivery, &body),
                )
                .header(DELIVERY, &delivery)
                .body(body.clone())
                .send()
                .await;
            match sent {
                Ok(reply) if reply.status().is_success() => return Ok(attempt),
                // One refusal is routine; say so from the second on.
                Ok(reply) if attempt > 1 => {
                    eprintln!("relay: endpoint answered {}; retrying", reply.status())
                }
                Ok(_) => {}
                Err(e) => eprintln!("relay: endpoint unreachable ({e}); retrying"),
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(5));
        }
        unreachable!("the loop returns on success")
    }

    /// Saves the cursor so that a crash never loses it half-written: a temporary file,
    /// synced, renamed over the old one.
    fn save(&self, cursor: &EventCursor) -> Fallible<()> {
        let tmp = self.cursor_file.with_extension("tmp");
        let mut file = std::fs::File::create(&tmp)?;
        std::io::Write::write_all(&mut file, cursor.to_string().as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&tmp, &self.cursor_file)?;
        Ok(())
    }

    fn load(&self) -> Fallible<EventCursor> {
        match std::fs::read_to_string(&self.cursor_file) {
            Ok(text) => Ok(text.trim().parse()?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(EventCursor::beginning()),
            Err(e) => Err(e.into()),
        }
    }

    /// Relays forever (until a fatal stream error).
    async fn run(&self, store: Arc<dyn TokenStore>) -> Fallible<()> {
        let mut events = EventStream::from_store(store, self.load()?, Duration::from_millis(100));
        while let Some(item) = events.next().await {
            let event = match item {
                Ok(event) => event,
                Err(e) if e.is_fatal() => return Err(e.into()),
                Err(e) => {
                    eprintln!("relay: {e}");
                    continue;
                }
            };
            self.deliver(&event).await?;
            self.save(&event.cursor)?;
        }
        Ok(())
    }
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

#[tokio::main]
async fn main() -> Fallible<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--self-test") {
        return self_test().await;
    }
    let usage = "usage: webhook_relay --store FILE.db --endpoint URL --cursor-file FILE (HMAC key in TK_RELAY_SECRET) | --self-test";
    let (Some(store), Some(endpoint), Some(cursor_file)) = (
        arg(&args, "--store"),
        arg(&args, "--endpoint"),
        arg(&args, "--cursor-file"),
    ) else {
        return Err(usage.into());
    };
    let secret =
        std::env::var(SECRET_ENV).map_err(|_| format!("{SECRET_ENV} is not set; {usage}"))?;
    let relay = Relay {
        http: relay_client()?,
        endpoint: checked_endpoint(&endpoint)?,
        secret: checked_secret(secret)?,
        cursor_file: cursor_file.into(),
    };
    relay.run(Arc::new(SqliteStore::open(store).await?)).await
}

/// What the self-test's endpoint saw.
#[derive(Default)]
struct Received {
    /// Every accepted delivery, in arrival order: (delivery id, event).
    accepted: Vec<(String, LifecycleEvent)>,
    /// The delivery ids acted on (each once).
    acted: HashSet<String>,
    /// Deliveries of an id already acted on: acknowledged, not acted on again.
    repeats: u64,
    /// The first accepted request as sent: (timestamp, delivery, signature, body).
    captured: Option<(String, String, String, Vec<u8>)>,
    attempts: u64,
    refused_503: u64,
    bad_signatures: u64,
}

async fn endpoint(secret: Vec<u8>, seen: Arc<Mutex<Received>>) -> Fallible<String> {
    use axum::http::{HeaderMap, StatusCode};
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
            let (secret, seen) = (secret.clone(), seen.clone());
            async move {
                let header = |n: &str| {
                    headers
                        .get(n)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned()
                };
                let mut seen = seen.lock().unwrap();
                seen.attempts += 1;
                let (timestamp, delivery) = (header(TIMESTAMP), header(DELIVERY));
                let signed = (timestamp.as_str(), delivery.as_str());
                if !verify(&secret, signed, &body, &header(SIGNATURE), unix_now()) {
                    seen.bad_signatures += 1;
                    return StatusCode::UNAUTHORIZED;
                }
                // Every fifth attempt fails, so the relay's retries are exercised.
                if seen.attempts % 5 == 0 {
                    seen.refused_503 += 1;
                    return StatusCode::SERVICE_UNAVAILABLE;
                }
                match serde_json::from_slice::<LifecycleEvent>(&body) {
                    Ok(event) => {
                        if !seen.acted.insert(delivery.clone()) {
                            // Already acted on (a re-send after a crash, or a replay inside
                            // the window): acknowledged, nothing done again.
                            seen.repeats += 1;
                        }
                        if seen.captured.is_none() {
                            let sig = header(SIGNATURE);
                            seen.captured = Some((timestamp, delivery.clone(), sig, body.to_vec()));
                        }
                        seen.accepted.push((delivery, event));
                        StatusCode::OK
                    }
                    Err(_) => StatusCode::BAD_REQUEST,
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(url)
}

fn spawn_relay(db: &Path, endpoint: &str, cursor: &Path, secret: &str) -> Fallible<Child> {
    Ok(Command::new(std::env::current_exe()?)
        .args(["--store", &db.display().to_string(), "--endpoint", endpoint])
        .args(["--cursor-file", &cursor.display().to_string()])
        .env(SECRET_ENV, secret)
        .spawn()?)
}

/// Writes events: refreshes of random installations, a revocation now and then.
async fn churn(
    manager: &TokenManager,
    ids: &[tokenkeeper::InstallationId],
    rounds: usize,
) -> Fallible<()> {
    for n in 0..rounds {
        let id = &ids[fastrand_index(n, ids.len())];
        match manager.force_refresh(id).await {
            Ok(_) => {}
            Err(e) if e.needs_reauthorization() => {}
            Err(e) => return Err(e.into()),
        }
        if n % 17 == 16 {
            let _ = manager.revoke(id).await;
        }
    }
    Ok(())
}

fn fastrand_index(n: usize, len: usize) -> usize {
    (n.wrapping_mul(2_654_435_761) >> 7) % len
}

async fn wait_for(seen: &Arc<Mutex<Received>>, accepted: usize, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if seen.lock().unwrap().accepted.len() >= accepted {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

async fn self_test() -> Fallible<()> {
    let dir = std::env::temp_dir().join(format!("tokenkeeper-relay-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let outcome = run_self_test(&dir).await;
    std::fs::remove_dir_all(&dir)?;
    outcome
}

async fn run_self_test(dir: &Path) -> Fallible<()> {
    let (db, cursor) = (dir.join("tokens.db"), dir.join("relay.cursor"));
    let secret = "self-test-webhook-secret-of-32-bytes-at-least";
    let mock = MockProvider::builder()
        .profile(MockProfile::Bitbucket)
        .start()
        .await?;
    let consumer = support::mock_consumer(&mock)?;
    let store: Arc<dyn TokenStore> = Arc::new(SqliteStore::open(&db).await?);
    let manager = TokenManager::builder_shared(consumer, store.clone()).build()?;
    let seen = Arc::new(Mutex::new(Received::default()));
    let hook = endpoint(secret.as_bytes().to_vec(), seen.clone()).await?;

    let mut ids = Vec::new();
    for _ in 0..12 {
        ids.push(support::install(&manager, &mock).await?);
    }
    churn(&manager, &ids, 40).await?;
    let mut relay = spawn_relay(&db, &hook, &cursor, secret)?;
    // Events keep coming while the relay works; it is killed mid-stream.
    churn(&manager, &ids, 40).await?;
    let before_kill = {
        wait_for(&seen, 60, Duration::from_secs(20)).await;
        relay.kill()?; // SIGKILL: no chance to save anything more
        relay.wait()?;
        seen.lock().unwrap().accepted.len()
    };
    churn(&manager, &ids, 40).await?;
    let mut relay = spawn_relay(&db, &hook, &cursor, secret)?;

    // Everything the store holds must arrive.
    let (stored, _) = all_events(&*store).await?;
    let missing = wait_for_every_event(&seen, &stored, Duration::from_secs(60)).await;
    relay.kill()?;
    relay.wait()?;
    if !missing.is_empty() {
        return Err(format!(
            "{} stored events never arrived (first: {:?})",
            missing.len(),
            missing.first()
        )
        .into());
    }
    let (duplicates, retried, installations) = check_deliveries(&seen.lock().unwrap(), &stored)?;
    replays_are_refused(&hook, secret.as_bytes(), &seen).await?;
    unsafe_settings_are_refused()?;
    println!(
        "webhook_relay self-test: {} events of {} installations delivered in order per installation across a SIGKILL after {before_kill} and a restart; {duplicates} re-sent at least once, {retried} attempts retried after a 503, every signature verified; a re-timestamped replay refused, a repeat acknowledged and not acted on twice, a replay past {}s refused",
        stored.len(),
        installations,
        TOLERANCE.as_secs(),
    );
    Ok(())
}

/// Waits up to `within` for every one of the `stored` events to arrive, and returns the
/// delivery ids of those that did not. Re-sent events count twice in `accepted`: this waits
/// for every distinct one.
async fn wait_for_every_event(
    seen: &Arc<Mutex<Received>>,
    stored: &[LifecycleEvent],
    within: Duration,
) -> Vec<String> {
    let deadline = Instant::now() + within;
    loop {
        let got: HashSet<String> = seen
            .lock()
            .unwrap()
            .accepted
            .iter()
            .map(|(d, _)| d.clone())
            .collect();
        let missing: Vec<String> = stored
            .iter()
            .map(LifecycleEvent::delivery_id)
            .filter(|c| !got.contains(c))
            .collect();
        if missing.is_empty() || Instant::now() > deadline {
            return missing;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Checks what the endpoint received against the `stored` events: every delivery id is the
/// event's own, first deliveries follow the store's versions exactly per installation, every
/// signature verified and some attempts were retried after a 503. Returns how many deliveries
/// were repeats, how many attempts were retried, and how many installations there were.
fn check_deliveries(seen: &Received, stored: &[LifecycleEvent]) -> Fallible<(usize, u64, usize)> {
    // In order per installation: first deliveries follow the store's versions exactly.
    let mut first = HashSet::new();
    let mut per_installation: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (delivery, event) in &seen.accepted {
        if event.delivery_id() != *delivery {
            return Err(format!("delivery id {delivery} differs from the event's own").into());
        }
        if first.insert(delivery.clone()) {
            per_installation
                .entry(event.installation.to_string())
                .or_default()
                .push(event.version);
        }
    }
    let mut expected: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for e in stored {
        expected
            .entry(e.installation.to_string())
            .or_default()
            .push(e.version);
    }
    if per_installation != expected {
        return Err("an installation's events arrived out of order or incomplete".into());
    }
    if seen.bad_signatures > 0 || seen.refused_503 == 0 {
        return Err(format!(
            "{} bad signatures, {} retried attempts",
            seen.bad_signatures, seen.refused_503
        )
        .into());
    }
    Ok((
        seen.accepted.len() - first.len(),
        seen.refused_503,
        expected.len(),
    ))
}

/// A captured delivery replayed: with a new timestamp (the signature no longer matches), as
/// is (acknowledged, nothing acted on again), and judged later than the window (refused).
async fn replays_are_refused(
    hook: &str,
    secret: &[u8],
    seen: &Arc<Mutex<Received>>,
) -> Fallible<()> {
    let (timestamp, delivery, sig, body) = seen
        .lock()
        .unwrap()
        .captured
        .clone()
        .ok_or("nothing was delivered")?;
    let post = |timestamp: String| {
        relay_client().map(|c| {
            c.post(hook)
                .header(TIMESTAMP, timestamp)
                .header(DELIVERY, &delivery)
                .header(SIGNATURE, &sig)
                .body(body.clone())
        })
    };
    let forged = post((unix_now() + 1).to_string())?.send().await?;
    let (repeats, acted) = {
        let s = seen.lock().unwrap();
        (s.repeats, s.acted.len())
    };
    // The endpoint refuses every fifth attempt with a 503 (to exercise retries): retry that.
    let mut again = post(timestamp.clone())?.send().await?;
    for _ in 0..4 {
        if again.status() != 503 {
            break;
        }
        again = post(timestamp.clone())?.send().await?;
    }
    let after = seen.lock().unwrap().acted.len();
    let late = unix_now() + TOLERANCE.as_secs() + 1;
    let signed = (timestamp.as_str(), delivery.as_str());
    first_failure(&[
        (
            forged.status() == 401,
            "a re-timestamped replay was accepted",
        ),
        (again.status().is_success(), "a repeat was not acknowledged"),
        (
            after == acted,
            "a replay inside the window was acted on twice",
        ),
        (
            seen.lock().unwrap().repeats > repeats,
            "the repeat was not seen as one",
        ),
        (
            verify(secret, signed, &body, &sig, unix_now()),
            "the captured request does not verify",
        ),
        (
            !verify(secret, signed, &body, &sig, late),
            "a replay past the window verifies",
        ),
    ])
}

/// The relay's own refusals: a short secret, a remote plain-http endpoint.
fn unsafe_settings_are_refused() -> Fallible<()> {
    first_failure(&[
        (
            checked_secret("short".into()).is_err(),
            "a short secret was accepted",
        ),
        (
            checked_endpoint("http://hooks.example/tk").is_err(),
            "remote plain http accepted",
        ),
        (
            checked_endpoint("https://hooks.example/tk").is_ok(),
            "https refused",
        ),
    ])
}

/// The first failed check's message as the error, if any check failed.
fn first_failure(checks: &[(bool, &str)]) -> Fallible<()> {
    match checks.iter().find(|(ok, _)| !ok) {
        Some((_, why)) => Err((*why).into()),
        None => Ok(()),
    }
}

async fn all_events(store: &dyn TokenStore) -> Fallible<(Vec<LifecycleEvent>, EventCursor)> {
    let mut cursor = EventCursor::beginning();
    let mut events = Vec::new();
    loop {
        let page = store.read_events(&cursor, 500).await?;
        cursor = page.next;
        if page.events.is_empty() {
            return Ok((events, cursor));
        }
        events.extend(page.events);
    }
}
