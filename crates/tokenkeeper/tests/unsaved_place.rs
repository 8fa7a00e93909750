//! Where rotated tokens go when the store will not take them (review findings E3, N5): never
//! an ephemeral or shared default. A network store needs an explicit directory or callback
//! (the build says so), SQLite keeps them beside its database, the memory store in memory; a
//! directory must be this user's alone; what a process left there is restored when the next
//! manager starts; and `shutdown` rides out a short store failover before giving up.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use tokenkeeper::core::{EventKind, UnsavedHome};
use tokenkeeper::{core::TokenStore, oauth::ConfigError, profiles};
use tokenkeeper_memory::MemoryStore;
use tokenkeeper_mock_provider::{DEFAULT_CLIENT_SECRET, MockProfile, MockProvider};
use tokenkeeper_testkit::wrappers::{FaultKind, FaultSwitch, FaultTarget, FlakyStore};

const TWO_HOURS: Duration = Duration::from_secs(2 * 3600);

async fn bitbucket() -> MockProvider {
    MockProvider::builder()
        .profile(MockProfile::Bitbucket)
        .start()
        .await
        .unwrap()
}

fn builder(
    mock: &MockProvider,
    store: Arc<dyn TokenStore>,
    clock: &tokenkeeper::core::ManualClock,
) -> tokenkeeper::TokenManagerBuilder {
    tokenkeeper::TokenManager::builder_shared(
        consumer_for(profiles::bitbucket(), mock, DEFAULT_CLIENT_SECRET),
        store,
    )
    .clock(clock.clone())
    .tune(|p| p.result_write_patience = Duration::from_millis(300))
}

/// A memory store posing as a network store (its home is unknown), with a fault switch.
fn network_store() -> (Arc<dyn TokenStore>, Arc<FaultSwitch>) {
    let (store, switch) = FlakyStore::flaky(MemoryStore::new());
    (
        Arc::new(store.with_unsaved_home(UnsavedHome::Unknown)),
        switch,
    )
}

fn out_of_range(result: Result<tokenkeeper::TokenManager, ConfigError>) -> String {
    match result {
        Err(ConfigError::OutOfRange { field, reason }) => {
            assert_eq!(field, "unsaved_tokens_dir");
            reason
        }
        other => panic!("expected the unsaved-tokens place to be refused, got {other:?}"),
    }
}

#[tokio::test]
async fn a_network_store_without_an_unsaved_place_is_refused_at_build() {
    let mock = bitbucket().await;
    let (store, _) = network_store();
    let reason = out_of_range(builder(&mock, store.clone(), &now_clock()).build());
    assert!(reason.contains("unsaved_tokens_dir"), "{reason}");
    assert!(reason.contains("not /tmp"), "{reason}");
    // Either way out is accepted.
    let dir = tokenkeeper_testkit::dirs::fresh_dir("unsaved-net").join("kept");
    builder(&mock, store.clone(), &now_clock())
        .unsaved_tokens_dir(&dir)
        .build()
        .expect("an explicit directory");
    builder(&mock, store, &now_clock())
        .on_unsaved_tokens(|_| {})
        .build()
        .expect("a callback");
}

#[cfg(unix)]
#[tokio::test]
async fn a_directory_others_can_enter_or_own_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let mock = bitbucket().await;
    let (store, _) = network_store();
    let dir = tokenkeeper_testkit::dirs::fresh_dir("unsaved-shared").join("kept");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let reason = out_of_range(
        builder(&mock, store.clone(), &now_clock())
            .unsaved_tokens_dir(&dir)
            .build(),
    );
    assert!(reason.contains("lets other users in"), "{reason}");
    let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o777, "a foreign setting is refused, never changed");
    let link = dir.with_extension("link");
    std::os::unix::fs::symlink(&dir, &link).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let reason = out_of_range(
        builder(&mock, store.clone(), &now_clock())
            .unsaved_tokens_dir(&link)
            .build(),
    );
    assert!(reason.contains("symbolic link"), "{reason}");
    // Owned by another user (only root can hand a directory over).
    if std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).is_ok() {
        let reason = out_of_range(
            builder(&mock, store, &now_clock())
                .unsaved_tokens_dir(&dir)
                .build(),
        );
        assert!(reason.contains("belongs to another user"), "{reason}");
    }
}

/// The check of the directory and each write into it are two steps: whoever may rename
/// entries of its parent could swap the checked directory for their own in between. So the
/// parent must be writable by this user (or root) alone, or sticky (as `/tmp` is).
#[cfg(unix)]
#[tokio::test]
async fn a_directory_whose_parent_others_may_write_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let mock = bitbucket().await;
    let (store, _) = network_store();
    let parent = tokenkeeper_testkit::dirs::fresh_dir("unsaved-parent");
    let dir = parent.join("kept");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o777)).unwrap();
    let reason = out_of_range(
        builder(&mock, store.clone(), &now_clock())
            .unsaved_tokens_dir(&dir)
            .build(),
    );
    assert!(reason.contains("rename or replace"), "{reason}");
    // Sticky, as /tmp is: others may not rename what this user owns there.
    std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o1777)).unwrap();
    builder(&mock, store, &now_clock())
        .unsaved_tokens_dir(&dir)
        .build()
        .expect("a sticky parent");
}

#[cfg(unix)]
#[tokio::test]
async fn sqlite_keeps_unsaved_tokens_beside_its_database() {
    use std::os::unix::fs::PermissionsExt;
    let mock = bitbucket().await;
    let path = tokenkeeper_testkit::dirs::fresh_db("unsaved-sqlite");
    let store: Arc<dyn TokenStore> =
        Arc::new(tokenkeeper_sqlite::SqliteStore::open(&path).await.unwrap());
    builder(&mock, store, &now_clock())
        .build()
        .expect("SQLite offers a directory beside its file");
    let mut dir = path.as_os_str().to_owned();
    dir.push(".unsaved");
    let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
}

/// A manager on a network store with its own unsaved-tokens directory, one installation
/// whose refresh the store refused (`Refreshed` writes fail until `switch` heals): its
/// rotated tokens are in the directory.
struct Stranded {
    mock: MockProvider,
    clock: tokenkeeper::core::ManualClock,
    store: Arc<dyn TokenStore>,
    switch: Arc<FaultSwitch>,
    dir: std::path::PathBuf,
    manager: tokenkeeper::TokenManager,
    id: tokenkeeper::InstallationId,
}

async fn stranded(tag: &str) -> Stranded {
    stranded_at(tag, bitbucket().await).await
}

/// Installs one installation, makes it due, and has the store refuse every result write.
async fn due_with_results_refused(
    manager: &tokenkeeper::TokenManager,
    mock: &MockProvider,
    clock: &tokenkeeper::core::ManualClock,
    switch: &FaultSwitch,
) -> tokenkeeper::InstallationId {
    let id = authorize_with(manager, mock, None).await.installation;
    clock.advance(TWO_HOURS);
    mock.advance(TWO_HOURS);
    switch.fail(
        FaultTarget::WritesOf(EventKind::Refreshed),
        FaultKind::Backend,
    );
    id
}

/// [`stranded`] against `mock`.
async fn stranded_at(tag: &str, mock: MockProvider) -> Stranded {
    let clock = now_clock();
    let (store, switch) = network_store();
    let dir = tokenkeeper_testkit::dirs::fresh_dir(tag).join("kept");
    let manager = builder(&mock, store.clone(), &clock)
        .unsaved_tokens_dir(&dir)
        .build()
        .unwrap();
    let id = due_with_results_refused(&manager, &mock, &clock, &switch).await;
    assert!(manager.access_token(&id).await.is_err());
    Stranded {
        mock,
        clock,
        store,
        switch,
        dir,
        manager,
        id,
    }
}

/// The restored tokens are served, and two hours on refreshed with the rotated refresh token
/// they brought back: two rotations in all, no refusal.
async fn served_then_refreshed(
    manager: &tokenkeeper::TokenManager,
    clock: &tokenkeeper::core::ManualClock,
    mock: &MockProvider,
    id: &tokenkeeper::InstallationId,
) {
    manager
        .access_token(id)
        .await
        .expect("the restored tokens are served");
    clock.advance(TWO_HOURS);
    mock.advance(TWO_HOURS);
    manager.access_token(id).await.expect("and refreshed");
    let c = mock.counters().totals;
    assert_eq!((c.rotations, c.rejected_refreshes), (2, 0), "{c:?}");
}

/// A process could not store rotated tokens and wrote them to its directory; the next
/// manager started on that directory puts them back by itself and deletes the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsaved_files_are_restored_when_a_manager_starts() {
    let Stranded {
        mock,
        clock,
        store,
        switch,
        dir,
        manager: first,
        id,
    } = stranded("unsaved-restart").await;
    let files = || std::fs::read_dir(&dir).unwrap().count();
    assert_eq!(
        files(),
        1,
        "the rotated tokens were written to the directory"
    );
    switch.heal();
    drop(first);
    let second = builder(&mock, store.clone(), &clock)
        .unsaved_tokens_dir(&dir)
        .build()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while files() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the file was never restored"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    served_then_refreshed(&second, &clock, &mock, &id).await;
}

/// The memory store keeps nothing past the process, so the manager holds what it could not
/// store in memory; `restore_unsaved_files` puts it back once the store works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ephemeral_store_holds_unsaved_tokens_in_memory_until_restored() {
    let mock = bitbucket().await;
    let clock = now_clock();
    let (store, switch) = FlakyStore::flaky(MemoryStore::new());
    let store: Arc<dyn TokenStore> = Arc::new(store);
    let manager = builder(&mock, store, &clock).build().unwrap();
    let id = due_with_results_refused(&manager, &mock, &clock, &switch).await;
    assert!(manager.access_token(&id).await.is_err());
    switch.fail(FaultTarget::Writes, FaultKind::Unavailable);
    let waiting = manager.restore_unsaved_files().await.unwrap();
    assert_eq!(waiting.kept, 1, "the store still fails: kept");
    switch.heal();
    let report = manager.restore_unsaved_files().await.unwrap();
    assert_eq!(report.restored, 1, "{report:?}");
    manager.access_token(&id).await.expect("restored");
    assert_eq!(mock.counters().totals.rotations, 1);
}

/// A store failover during the drain (the store refuses writes for a second): `shutdown`
/// keeps retrying for `shutdown_grace` and the rotated tokens land in the store; nothing
/// reaches the sink.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_rides_out_a_store_failover_during_the_drain() {
    let mock = bitbucket().await;
    let clock = now_clock();
    let (store, switch) = FlakyStore::flaky(MemoryStore::new());
    let kept = Arc::new(Mutex::new(Vec::new()));
    let manager = builder(&mock, Arc::new(store), &clock)
        .tune(|p| {
            p.result_write_patience = Duration::from_secs(60);
            p.shutdown_grace = Duration::from_secs(5);
        })
        .on_unsaved_tokens({
            let kept = kept.clone();
            move |u| kept.lock().unwrap().push(u)
        })
        .build()
        .unwrap();
    let id = authorize_with(&manager, &mock, None).await.installation;
    clock.advance(TWO_HOURS);
    mock.advance(TWO_HOURS);
    switch.fail(
        FaultTarget::WritesOf(EventKind::Refreshed),
        FaultKind::Unavailable,
    );
    let caller = {
        let (m, id) = (manager.clone(), id.clone());
        tokio::spawn(async move { m.access_token(&id).await })
    };
    while mock.counters().totals.rotations == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let shutdown = {
        let m = manager.clone();
        tokio::spawn(async move { m.shutdown().await })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    switch.heal();
    shutdown.await.unwrap();
    assert!(kept.lock().unwrap().is_empty(), "nothing went to the sink");
    let token = caller
        .await
        .unwrap()
        .expect("the result landed during the drain");
    let stored = manager.store().get(&id).await.unwrap().unwrap();
    assert_eq!(stored.tokens().access_token, token);
}

/// A result that can no longer land (the user authorized the installation again meanwhile)
/// is set aside in `obsolete/`, never deleted: its tokens may still be live at the provider.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn obsolete_unsaved_files_are_set_aside_not_deleted() {
    let Stranded {
        mock,
        switch,
        dir,
        manager,
        id,
        ..
    } = stranded("unsaved-obsolete").await;
    switch.heal();
    authorize_with(&manager, &mock, Some(id.clone())).await;
    let report = manager.restore_unsaved_files().await.unwrap();
    assert_eq!((report.restored, report.obsolete), (0, 1), "{report:?}");
    let aside = std::fs::read_dir(dir.join("obsolete")).unwrap().count();
    assert_eq!(aside, 1, "set aside");
    let left = std::fs::read_dir(&dir)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().is_file())
        .count();
    assert_eq!(left, 0);
}

/// Rotated tokens held in the unsaved-tokens place are put back by the manager itself before
/// a flight presents anything: once the store works again, the next refresh of that
/// installation lands the held result instead of presenting the retired token (a reuse on
/// Bitbucket, and a lost installation), with no call to `restore_unsaved_files`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_results_are_restored_before_the_next_flight_presents() {
    let mock = bitbucket().await;
    let clock = now_clock();
    let (store, switch) = FlakyStore::flaky(MemoryStore::new());
    let store: Arc<dyn TokenStore> = Arc::new(store);
    let manager = builder(&mock, store.clone(), &clock).build().unwrap();
    let id = due_with_results_refused(&manager, &mock, &clock, &switch).await;
    assert!(manager.access_token(&id).await.is_err());
    switch.heal();
    // The store works again; the access token the provider issued has expired meanwhile.
    clock.advance(TWO_HOURS);
    mock.advance(TWO_HOURS);
    manager
        .access_token(&id)
        .await
        .expect("the held result landed first, then a refresh with its token");
    let c = mock.counters().totals;
    assert_eq!(
        (c.rotations, c.reuse_detections),
        (2, 0),
        "the retired token was presented: {c:?}"
    );
}

/// A held result that still cannot be stored keeps its installation's retired refresh token
/// from being presented: the flight is refused (the store's error) until the result lands,
/// and then the installation refreshes with the rotated token (second review of the
/// automatic restore).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_result_the_store_refuses_blocks_its_retired_token() {
    let mock = bitbucket().await;
    let clock = now_clock();
    let (store, switch) = FlakyStore::flaky(MemoryStore::new());
    let store: Arc<dyn TokenStore> = Arc::new(store);
    let manager = builder(&mock, store.clone(), &clock).build().unwrap();
    let id = due_with_results_refused(&manager, &mock, &clock, &switch).await;
    assert!(manager.access_token(&id).await.is_err());
    // The store takes leases again but still refuses the held result.
    switch.fail(
        FaultTarget::WritesOf(EventKind::LateRefreshed),
        FaultKind::Unavailable,
    );
    clock.advance(TWO_HOURS);
    mock.advance(TWO_HOURS);
    let calls = mock.counters().totals.refresh_calls;
    assert!(manager.access_token(&id).await.is_err());
    assert_eq!(
        mock.counters().totals.refresh_calls,
        calls,
        "the retired refresh token was presented"
    );
    switch.heal();
    tokio::time::sleep(Duration::from_secs(6)).await;
    manager
        .access_token(&id)
        .await
        .expect("the held result landed, then a refresh with its token");
    let c = mock.counters().totals;
    assert_eq!((c.rotations, c.reuse_detections), (2, 0), "{c:?}");
}

/// A held result of an installation the application revoked meanwhile can never land; its
/// rotated tokens are live at a provider for which the retired token the application revoked
/// was merely invalid (RFC 7009 section 2.2), so the restore revokes them too, as a late
/// result meeting a revoked record does: nothing of a revoked installation stays live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_result_of_a_revoked_installation_is_revoked_at_the_provider() {
    let mock = MockProvider::builder()
        .profile(MockProfile::Bitbucket)
        .retired_revocation_revokes_grant(false)
        .start()
        .await
        .unwrap();
    let Stranded {
        mock,
        switch,
        manager,
        id,
        ..
    } = stranded_at("unsaved-revoked", mock).await;
    switch.heal();
    // The application revokes the installation: the store's (retired) token is revoked,
    // which this provider ignores, so the grant lives on in the held result.
    manager.revoke(&id).await.unwrap();
    let live = |mock: &MockProvider| {
        mock.counters()
            .grants
            .values()
            .filter(|g| g.revoked.is_none())
            .count()
    };
    assert_eq!(live(&mock), 1, "the held result's grant is still live");
    let report = manager.restore_unsaved_files().await.unwrap();
    assert_eq!((report.restored, report.obsolete), (0, 1), "{report:?}");
    // Revoked in the background (no restore waits on the provider).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while live(&mock) > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the held tokens were never revoked at the provider"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Review E14: the sink's work runs off the async workers. A sink callback that blocks until
/// a task of the same single-threaded runtime answers completes: were it called on the
/// runtime's one worker, that task could never run and the callback would time out.
#[tokio::test(flavor = "current_thread")]
async fn a_blocking_sink_does_not_stall_the_runtime() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let mock = bitbucket().await;
    let clock = now_clock();
    let (store, switch) = FlakyStore::flaky(MemoryStore::new());
    let entered = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(Mutex::new(None));
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let rx = Mutex::new(rx);
    let manager = builder(&mock, Arc::new(store), &clock)
        .on_unsaved_tokens({
            let (entered, answered) = (entered.clone(), answered.clone());
            move |_| {
                entered.store(true, Ordering::SeqCst);
                let got = rx.lock().unwrap().recv_timeout(Duration::from_secs(5));
                *answered.lock().unwrap() = Some(got.is_ok());
            }
        })
        .build()
        .unwrap();
    let id = due_with_results_refused(&manager, &mock, &clock, &switch).await;
    // Answers the callback once it has started, from the runtime's own thread.
    let answer = tokio::spawn({
        let entered = entered.clone();
        async move {
            while !entered.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            tx.send(()).unwrap();
        }
    });
    assert!(
        manager.access_token(&id).await.is_err(),
        "the store refused"
    );
    answer.await.unwrap();
    assert_eq!(
        *answered.lock().unwrap(),
        Some(true),
        "the sink ran while the runtime kept working"
    );
}

/// Review E1, restore side: while the rotated tokens waited in the unsaved place, a peer
/// spent the failure budget on the retired refresh token and condemned the installation. The
/// verdict was about the retired token, not the rotated one: the restore lands the file on
/// the condemned record (it still holds the refresh token the file presented), revives the
/// installation, and the rotated refresh token keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsaved_file_is_restored_onto_a_verdict_about_the_retired_token() {
    use tokenkeeper::core::{Clock, Event, LeaseHolder, ReauthReason, StateKind};
    let Stranded {
        mock,
        clock,
        store,
        switch,
        dir,
        manager: first,
        id,
    } = stranded("unsaved-verdict").await;
    switch.heal();
    drop(first);
    // The stranded flight's lease lapses; a peer's lease, then its condemnation after a spent
    // failure budget.
    clock.advance(Duration::from_secs(60));
    mock.advance(Duration::from_secs(60));
    let record = store.get(&id).await.unwrap().unwrap();
    let now = clock.now();
    let leased = record
        .apply(
            Event::LeaseAcquired {
                holder: LeaseHolder::new("peer:1"),
                until: now.saturating_add(Duration::from_secs(30)),
            },
            now,
        )
        .unwrap();
    store
        .compare_and_swap(&leased, record.version())
        .await
        .unwrap();
    let fence = leased.state().lease().unwrap().fence;
    let condemned = leased
        .apply(
            Event::RefreshRejected {
                fence,
                reason: ReauthReason::FailureBudgetExhausted,
                error: None,
            },
            now,
        )
        .unwrap();
    store
        .compare_and_swap(&condemned, leased.version())
        .await
        .unwrap();
    let second = builder(&mock, store.clone(), &clock)
        .unsaved_tokens_dir(&dir)
        .build()
        .unwrap();
    // The manager restores what it finds when it starts.
    let waiting = || {
        std::fs::read_dir(&dir)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().is_file())
            .count()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while waiting() > 0 {
        assert!(std::time::Instant::now() < deadline, "never restored");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let set_aside = std::fs::read_dir(dir.join("obsolete")).map_or(0, |d| d.count());
    assert_eq!(
        set_aside, 0,
        "the file landed, it was not set aside as obsolete"
    );
    assert_eq!(
        store.get(&id).await.unwrap().unwrap().state().kind(),
        StateKind::Active
    );
    served_then_refreshed(&second, &clock, &mock, &id).await;
}
