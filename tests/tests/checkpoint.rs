//! The checkpoint coordinator's protocol against a real lake (a local directory): which
//! reports make an epoch, what its commit publishes, and what a restart recovers.

use std::sync::Arc;
use std::time::Duration;

use sluice_connectors::lake::Lake;
use sluice_engine::checkpoint::{
    CheckpointHandle, CheckpointStore, Coordinator, NoFence, Payload, ReaderCheckpoint, StagedFile,
    StreamCheckpoints, StreamRegistration,
};
use sluice_engine::{BadRecord, Barrier, FanOut};

/// Stages a file with `body` for `target`; returns what a writer reports for it.
async fn stage(lake: &Lake, name: &str, target: &str) -> StagedFile {
    let staged = format!("_sluice/staging/s/{name}");
    CheckpointStore::put(lake, &staged, bytes::Bytes::from(name.to_string()))
        .await
        .unwrap();
    StagedFile::new(staged, target.to_string())
}

/// What a stateless subtask reports, with the rows its stream rejected.
fn no_state(rejected: Vec<BadRecord>) -> Payload {
    Payload::State {
        operators: vec![None],
        rejected,
        counters: Default::default(),
    }
}

/// `handle` takes the barrier of `epoch` and reports `payload` for it.
fn report(handle: &CheckpointHandle, epoch: u64, payload: Payload) {
    handle
        .on_barrier(Barrier { epoch })
        .expect("the participant's epoch")
        .report(payload);
}

/// A coordinator over `store` that takes checkpoints only when triggered.
async fn open(store: &Arc<dyn CheckpointStore>) -> Coordinator {
    Coordinator::open(
        Arc::clone(store),
        Duration::from_secs(3600),
        Arc::new(NoFence),
    )
    .await
    .unwrap()
}

/// Stream `s`: one reader of `src`, one subtask, a writer.
fn stream_s(timeout: Option<Duration>) -> StreamRegistration {
    StreamRegistration {
        name: "s".into(),
        sql: "CREATE STREAM s AS SELECT 1".into(),
        readers: vec!["src".into()],
        parallelism: 1,
        writer: true,
        interval: Duration::from_secs(3600),
        timeout,
    }
}

fn staged(files: Vec<StagedFile>) -> Payload {
    Payload::Staged {
        files,
        published: Arc::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_of_an_epoch_and_of_a_final_report_are_each_published_once_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::open(dir.path().to_str().unwrap()).unwrap();
    let store: Arc<dyn CheckpointStore> = Arc::new(lake.clone());
    let coordinator = open(&store).await;
    let mut ck = coordinator.register(stream_s(None)).await.unwrap();
    let mut reader = ck.readers.remove("src").unwrap();
    let out = FanOut::new("src");

    coordinator.trigger();
    let epoch = reader.requested().await;
    let a = stage(&lake, "a", "processed/s/a.parquet").await;
    let b = stage(&lake, "b", "processed/s/b.parquet").await;
    // The writer reports the epoch's file, then finishes with another before the epoch is
    // complete (the subtask has not reported yet): the epoch publishes `a`; `b` waits for
    // the next one.
    report(&ck.writer, epoch, staged(vec![a]));
    ck.writer.clone().finish(staged(vec![b]));
    reader
        .barrier(&out, epoch, serde_json::json!({ "at": 1 }))
        .await;
    report(&ck.subtasks[0], epoch, no_state(vec![]));
    tokio::time::timeout(Duration::from_secs(10), coordinator.wait_for(epoch))
        .await
        .expect("the epoch commits");
    assert!(store.get("processed/s/a.parquet").await.unwrap().is_some());
    assert!(
        store.get("processed/s/b.parquet").await.unwrap().is_none(),
        "a final report's files wait for an epoch that has them"
    );

    // The reader and the subtask finish too; the next checkpoint publishes `b`.
    reader.finish(serde_json::json!({ "at": 2 }));
    ck.subtasks[0].clone().finish(no_state(vec![]));
    tokio::time::timeout(Duration::from_secs(10), coordinator.checkpoint_now())
        .await
        .expect("the next epoch commits");
    assert_eq!(
        store.get("processed/s/b.parquet").await.unwrap().as_deref(),
        Some(&b"b"[..])
    );
    assert!(
        store.list("_sluice/staging").await.unwrap().is_empty(),
        "nothing left staged"
    );

    // A file staged by an epoch that never commits is gone after a restart, and the
    // restarted stream gets the last committed position back.
    let orphan = stage(&lake, "c", "processed/s/c.parquet").await;
    drop(coordinator);
    let coordinator = open(&store).await;
    assert!(store.get(&orphan.staged).await.unwrap().is_none());
    assert!(store.get("processed/s/c.parquet").await.unwrap().is_none());
    let ck = coordinator.register(stream_s(None)).await.unwrap();
    let restored = ck.restored.expect("the stream is in the checkpoint");
    assert_eq!(restored.positions["src"], serde_json::json!({ "at": 2 }));
}

/// Takes one checkpoint of stream `ck` (reader at position `{"at": at}`, no state, no
/// files) and waits for it to commit.
async fn one_epoch(
    coordinator: &Coordinator,
    ck: &mut StreamCheckpoints,
    reader: &mut ReaderCheckpoint,
    out: &FanOut,
    at: u64,
) {
    coordinator.trigger();
    let epoch = reader.requested().await;
    reader
        .barrier(out, epoch, serde_json::json!({ "at": at }))
        .await;
    report(&ck.writer, epoch, staged(vec![]));
    report(&ck.subtasks[0], epoch, no_state(vec![]));
    tokio::time::timeout(Duration::from_secs(10), coordinator.wait_for(epoch))
        .await
        .expect("the epoch commits");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_newest_checkpoints_are_kept_and_a_corrupt_newest_manifest_falls_back_to_the_one_before()
 {
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::open(dir.path().to_str().unwrap()).unwrap();
    let store: Arc<dyn CheckpointStore> = Arc::new(lake.clone());
    let registration = || stream_s(None);
    let open = || open(&store);
    let manifests = || async {
        let mut m: Vec<String> = store
            .list("_sluice/checkpoints")
            .await
            .unwrap()
            .into_iter()
            .filter(|p| p.ends_with("/manifest.json"))
            .collect();
        m.sort();
        m
    };
    let coordinator = open().await;
    let mut ck = coordinator.register(registration()).await.unwrap();
    let mut reader = ck.readers.remove("src").unwrap();
    let out = FanOut::new("src");
    for at in 1..=5 {
        one_epoch(&coordinator, &mut ck, &mut reader, &out, at).await;
    }
    let kept = manifests().await;
    assert_eq!(kept.len(), 3, "the default retention: {kept:?}");
    drop((ck, reader, coordinator));

    // The newest manifest is damaged: the restart takes the one before, and claims an
    // epoch past the damaged one.
    let newest = kept.last().unwrap().clone();
    CheckpointStore::put(
        &lake,
        &newest,
        bytes::Bytes::from_static(b"{\"epoch\": 7, trunc"),
    )
    .await
    .unwrap();
    let coordinator = open().await;
    let mut ck = coordinator.register(registration()).await.unwrap();
    let restored = ck
        .restored
        .take()
        .expect("restored from the checkpoint before");
    assert_eq!(restored.positions["src"], serde_json::json!({ "at": 4 }));
    let after = manifests().await;
    assert!(
        after.last().unwrap() > &newest,
        "the claim comes after the damaged epoch: {after:?}"
    );

    // A smaller retention applies from the next commit.
    coordinator.set_retention(1);
    let mut reader = ck.readers.remove("src").unwrap();
    one_epoch(&coordinator, &mut ck, &mut reader, &out, 6).await;
    assert_eq!(manifests().await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_epoch_whose_participant_does_not_report_in_time_is_aborted_and_the_next_one_commits() {
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::open(dir.path().to_str().unwrap()).unwrap();
    let store: Arc<dyn CheckpointStore> = Arc::new(lake.clone());
    let coordinator = open(&store).await;
    let mut ck = coordinator
        .register(stream_s(Some(Duration::from_millis(500))))
        .await
        .unwrap();
    let mut reader = ck.readers.remove("src").unwrap();
    let out = FanOut::new("src");
    let manifest = |epoch: u64| format!("_sluice/checkpoints/{epoch:020}/manifest.json");

    // Epoch e: the reader and the writer report (the writer with a file), subtask 0 never
    // does in time.
    coordinator.trigger();
    let e = reader.requested().await;
    reader
        .barrier(&out, e, serde_json::json!({ "at": 1 }))
        .await;
    let a = stage(&lake, "a", "processed/s/a.parquet").await;
    report(&ck.writer, e, staged(vec![a.clone()]));
    let settled = tokio::time::timeout(Duration::from_secs(10), coordinator.wait_settled(e))
        .await
        .expect("the epoch is settled within the timeout");
    assert!(settled);
    assert!(
        coordinator.last_completed() < e,
        "epoch {e} must not commit"
    );
    assert_eq!(coordinator.aborted_total(), 1);
    let health = coordinator.health("s").unwrap();
    assert_eq!(health.aborted, 1);
    let reason = health.last_abort.unwrap();
    assert!(reason.contains("subtask 0"), "{reason}");
    assert!(store.get(&manifest(e)).await.unwrap().is_none());
    assert!(
        store.get("processed/s/a.parquet").await.unwrap().is_none(),
        "nothing the aborted epoch staged is visible"
    );

    // The subtask catches up with the aborted epoch (a row it rejected in it), then every
    // participant reports epoch e + 1: it commits, with what the aborted epoch staged — the
    // rows behind e + 1's positions, which must not be lost.
    let bad = BadRecord {
        payload: "{\"x\": oops}".into(),
        payload_base64: false,
        reason: "not JSON".into(),
        origin: "stream s".into(),
    };
    report(&ck.subtasks[0], e, no_state(vec![bad]));
    coordinator.trigger();
    let next = reader.requested().await;
    assert_eq!(next, e + 1);
    reader
        .barrier(&out, next, serde_json::json!({ "at": 2 }))
        .await;
    let b = stage(&lake, "b", "processed/s/b.parquet").await;
    report(&ck.writer, next, staged(vec![b]));
    report(&ck.subtasks[0], next, no_state(vec![]));
    tokio::time::timeout(Duration::from_secs(10), coordinator.wait_for(next))
        .await
        .expect("the next epoch commits");
    assert!(store.get(&manifest(e)).await.unwrap().is_none());
    assert!(store.get(&manifest(next)).await.unwrap().is_some());
    for file in ["processed/s/a.parquet", "processed/s/b.parquet"] {
        assert!(store.get(file).await.unwrap().is_some(), "{file}");
    }
    let errors = store.list("errors/s").await.unwrap();
    assert_eq!(errors.len(), 1, "{errors:?}");
    let text = store.get(&errors[0]).await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&text).contains("not JSON"));
    assert!(
        store.list("_sluice/staging").await.unwrap().is_empty(),
        "nothing left staged"
    );
    assert_eq!(coordinator.aborted_total(), 1);

    // A restart resumes from e + 1.
    drop(ck);
    drop(coordinator);
    let coordinator = open(&store).await;
    let ck = coordinator.register(stream_s(None)).await.unwrap();
    assert_eq!(
        ck.restored.unwrap().positions["src"],
        serde_json::json!({ "at": 2 })
    );
}
