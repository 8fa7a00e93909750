//! What the paged reads that run by default move over the wire, against a redis-server of the
//! test's own (so its byte counters see nobody else): a page of `list` or `read_events`
//! merged from 16 shards must not ask every shard for a whole page, and counting the
//! installations by state (the refresher's gauge) must not move their ids (review E10).
//! Measured with the server's `total_net_output_bytes`.

use tokenkeeper_core::conformance::{T0, sample_record};
use tokenkeeper_core::{EventCursor, InstallationId, ListFilter, StateKind, TokenStore};
use tokenkeeper_redis::{DurabilityCheck, RedisStore};
use tokenkeeper_testkit::redis::{Server, free_port};

const RECORDS: usize = 4_000;

/// The server's count of bytes it sent so far.
async fn sent(raw: &mut redis::aio::MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("stats")
        .query_async(raw)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("total_net_output_bytes:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("INFO stats names total_net_output_bytes")
}

/// The bytes the server sent for `op`, less what the `INFO` around it cost.
async fn bytes_of<T>(
    raw: &mut redis::aio::MultiplexedConnection,
    op: impl std::future::Future<Output = T>,
) -> (u64, T) {
    let a = sent(raw).await;
    let b = sent(raw).await;
    let info = b - a;
    let result = op.await;
    let c = sent(raw).await;
    (c - b - info, result)
}

/// A redis-server of the test's own and a store on it.
async fn fresh() -> (Server, RedisStore) {
    let server = Server::start_on(free_port(), &[]);
    let store = RedisStore::builder(server.url())
        .durability_check(DurabilityCheck::Skip)
        .connect()
        .await
        .unwrap();
    (server, store)
}

async fn filled() -> (Server, RedisStore, redis::aio::MultiplexedConnection) {
    let (server, store) = fresh().await;
    for i in 0..RECORDS {
        let id = InstallationId::new(format!("inst-{i:05}")).unwrap();
        store.create(&sample_record(&id, T0)).await.unwrap();
    }
    let raw = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    (server, store, raw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_page_moves_about_what_it_returns() {
    let (_server, store, mut raw) = filled().await;
    // One id as the server sends it in an array: `$10\r\ninst-00000\r\n`.
    let per_id = "$10\r\n".len() + 10 + 2;
    let (bytes, page) = bytes_of(&mut raw, store.list(ListFilter::all(), None, 1000)).await;
    let page = page.unwrap();
    assert!(!page.entries.is_empty() && page.next.is_some());
    let ideal = page.entries.len() * per_id;
    let ratio = bytes as f64 / ideal as f64;
    println!(
        "list: {bytes} bytes for {} ids ({ratio:.2}× their size)",
        page.entries.len()
    );
    assert!(
        ratio < 1.5,
        "a page of {} ids moved {bytes} bytes, {ratio:.1} times their size: every shard sent a whole page",
        page.entries.len()
    );
    // Paging with the cursors still visits every installation once, in id order.
    let mut seen = Vec::new();
    let mut after: Option<InstallationId> = None;
    loop {
        let page = store
            .list(ListFilter::in_state(StateKind::Active), after.as_ref(), 700)
            .await
            .unwrap();
        seen.extend(page.entries.into_iter().map(|e| e.id));
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert_eq!(seen.len(), RECORDS);
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "not in id order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counting_by_state_moves_no_ids() {
    let (_server, store, mut raw) = filled().await;
    let (bytes, counts) = bytes_of(&mut raw, store.count_states(u64::MAX)).await;
    let counts = counts.unwrap();
    assert_eq!(counts.get(StateKind::Active), RECORDS as u64);
    assert_eq!(counts.get(StateKind::Revoked), 0);
    println!("count_states: {bytes} bytes for {RECORDS} installations");
    // 16 shards × 5 states, one integer reply each (`:250\r\n`).
    assert!(
        bytes < 16 * 5 * 8,
        "counting {RECORDS} installations moved {bytes} bytes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_page_moves_about_what_it_returns() {
    let (_server, store, mut raw) = filled().await;
    // What one event costs on the wire: a shard's stream read whole, divided by its length.
    let stream = format!("{}:{{s00}}:events", "tokenkeeper");
    let len: usize = redis::cmd("XLEN")
        .arg(&stream)
        .query_async(&mut raw)
        .await
        .unwrap();
    assert!(len > 100, "shard 0 holds {len} events");
    let mut other = raw.clone();
    let (whole, _) = bytes_of(&mut raw, async {
        let _: redis::Value = redis::cmd("XRANGE")
            .arg(&stream)
            .arg("-")
            .arg("+")
            .query_async(&mut other)
            .await
            .unwrap();
    })
    .await;
    let per_event = whole as f64 / len as f64;
    let limit = 500;
    let (bytes, page) = bytes_of(
        &mut raw,
        store.read_events(&EventCursor::beginning(), limit),
    )
    .await;
    let page = page.unwrap();
    assert_eq!(
        page.events.len(),
        limit,
        "a full page while more events exist"
    );
    let ratio = bytes as f64 / (limit as f64 * per_event);
    println!("read_events: {bytes} bytes for {limit} events ({ratio:.2}× their size)");
    assert!(
        ratio < 1.5,
        "a page of {limit} events moved {bytes} bytes, {ratio:.1} times their size"
    );
    // Reading on from each page's cursor returns every event once.
    let mut cursor = EventCursor::beginning();
    let mut total = 0;
    loop {
        let page = store.read_events(&cursor, 300).await.unwrap();
        if page.events.is_empty() {
            break;
        }
        total += page.events.len();
        cursor = page.next;
    }
    assert_eq!(total, RECORDS);
}

/// Events crowded into one shard: its share of the first round comes back full, so it is
/// asked for the rest of the page; the page is full, moves about what it returns, and
/// reading on returns every event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_crowded_into_one_shard_still_fill_pages() {
    let (_server, store, mut raw) = filled().await;
    let head = store.event_head().await.unwrap();
    let mut crowded = 0;
    for n in 0.. {
        let id = InstallationId::new(format!("busy-{n:05}")).unwrap();
        if !store.record_key(&id).starts_with("tokenkeeper:{s03}:") {
            continue;
        }
        store.create(&sample_record(&id, T0)).await.unwrap();
        crowded += 1;
        if crowded == 600 {
            break;
        }
    }
    let limit = 500;
    let (bytes, page) = bytes_of(&mut raw, store.read_events(&head, limit)).await;
    let page = page.unwrap();
    assert_eq!(
        page.events.len(),
        limit,
        "a full page while more events exist"
    );
    let per_event = bytes as f64 / limit as f64;
    println!("crowded read_events: {bytes} bytes for {limit} events ({per_event:.0} per event)");
    let rest = store.read_events(&page.next, limit).await.unwrap();
    assert_eq!(rest.events.len(), crowded - limit);
    assert!(
        store
            .read_events(&rest.next, limit)
            .await
            .unwrap()
            .events
            .is_empty()
    );
    let mut ids: Vec<_> = page
        .events
        .iter()
        .chain(&rest.events)
        .map(|e| e.installation.clone())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), crowded, "every crowded event once");
}

/// A page is the log's next events in order, whatever its size: events of two shards
/// interleaved unevenly (three of one to one of the other) read as pages of 7 and as pages
/// of 1 give the same sequence, so resuming from any event's cursor continues it exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_of_any_size_read_the_same_sequence() {
    let (_server, store) = fresh().await;
    let on = |name: &'static str, shard: &'static str| {
        let store = store.clone();
        (0..)
            .map(move |n| InstallationId::new(format!("{name}-{n:05}")).unwrap())
            .filter(move |id| {
                store
                    .record_key(id)
                    .starts_with(&format!("tokenkeeper:{shard}:"))
            })
    };
    let (mut busy, mut quiet) = (on("busy", "{s03}"), on("quiet", "{s05}"));
    for n in 0..80 {
        let id = if n % 4 == 3 {
            quiet.next()
        } else {
            busy.next()
        }
        .unwrap();
        store.create(&sample_record(&id, T0)).await.unwrap();
    }
    let drain = async |limit: usize| {
        let mut cursor = EventCursor::beginning();
        let mut seen = Vec::new();
        loop {
            let page = store.read_events(&cursor, limit).await.unwrap();
            if page.events.is_empty() {
                return seen;
            }
            seen.extend(page.events.iter().map(|e| e.installation.clone()));
            cursor = page.next;
        }
    };
    let sevens = drain(7).await;
    let ones = drain(1).await;
    assert_eq!(sevens.len(), 80);
    assert_eq!(sevens, ones);
}
