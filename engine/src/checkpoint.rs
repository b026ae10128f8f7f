//! Aligned-barrier checkpoints (Chandy–Lamport, as Flink, Arroyo and RisingWave do them) and
//! the two-phase commit of what streams write to the lake.
//!
//! ```text
//!            request epoch e (watch)                   reports (positions, state, staged files)
//!  Coordinator ──────────────► readers ─► Barrier(e) ─► stream task ─► Barrier(e) ─► lake writer
//!       ▲                        │                        │                            │
//!       └────────────────────────┴────────────────────────┴────────────────────────────┘
//! ```
//!
//! One [`Coordinator`] serves a whole server (the RisingWave model: one epoch for every
//! stream, so a stream reading another stream restores to the same cut as its input).
//! Every `interval` it requests epoch `e`; each reader of a registered stream, between two
//! batches, reports its position and sends `Barrier(e)`; a stream task aligns the barrier
//! over its inputs (holding back the inputs that delivered it), reports a copy of its
//! operators' state and forwards it; the lake writer closes the files it staged during the
//! epoch and reports them. When every participant has reported, the coordinator writes the
//! state files and then `manifest.json` under `_sluice/checkpoints/<epoch>/` — the commit
//! point — and only then moves the staged files to their place in the lake (phase two).
//! A participant whose input ended reports once more, with its final position and state;
//! that report stands for it in every later epoch.
//!
//! On start, [`Coordinator::open`] reads the newest manifest, finishes its phase two (moving
//! any staged file it lists that is still staged), claims the next epoch (see *Fencing*),
//! deletes every other staged file (epochs that never committed) and hands each stream its
//! positions and state when it registers again with the same SQL.
//!
//! # Fencing
//!
//! One process writes a lake (the server holds a lease; see [`Fence`]). Every commit first
//! asks the fence whether this process still holds it, and writes its manifest only if no
//! manifest of that epoch exists ([`CheckpointStore::put_new`]: `If-None-Match` on S3). A
//! process taking over claims the epoch after the newest manifest at once, by writing a copy
//! of it under that epoch: a paused old writer that wakes up and tries to commit the epoch it
//! had in flight finds it taken, and stops (`EngineError::Fenced`) without publishing. State is stored as Arrow IPC files per operator table, with the
//! format version in the manifest, so a newer Sluice knows what an older one wrote.
//!
//! # Retention
//!
//! The newest [`DEFAULT_RETENTION`] checkpoints are kept (their folders, and every state
//! file their manifests name; [`Coordinator::set_retention`]). When the newest manifest is
//! unreadable (a disk fault, a hand edit), [`Coordinator::open`] starts from the newest one
//! that reads, says so in the log, and claims an epoch past every existing one: the sources
//! replay from that older checkpoint's positions, rather than from their beginning.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::array::ArrayRef;
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc, watch};

use crate::error::{EngineError, Result};
use crate::fanout::FanOut;
use crate::message::{BadRecord, Barrier, Message};
use crate::router::HashRouter;

/// The manifest format this build writes; it reads this one and every older one.
pub const MANIFEST_VERSION: u32 = 1;

/// How many checkpoints are kept by default.
pub const DEFAULT_RETENTION: usize = 3;

/// Where checkpoints live, relative to the lake's root.
pub const CHECKPOINTS_DIR: &str = "_sluice/checkpoints";

/// Where lake writers stage the files of epochs not yet committed.
pub const STAGING_DIR: &str = "_sluice/staging";

/// Object storage as checkpoints need it (the lake implements it). Paths are relative to
/// the lake's root, `/`-separated.
#[async_trait]
pub trait CheckpointStore: Send + Sync + std::fmt::Debug {
    /// Writes an object whole (atomically: readers see all of it or nothing).
    async fn put(&self, path: &str, bytes: Bytes) -> Result<()>;
    /// Writes an object only if there is none at `path` (a conditional create); returns
    /// whether it wrote it.
    async fn put_new(&self, path: &str, bytes: Bytes) -> Result<bool>;
    /// Reads an object; `None` if it does not exist.
    async fn get(&self, path: &str) -> Result<Option<Bytes>>;
    /// Every object under `prefix`, recursively.
    async fn list(&self, prefix: &str) -> Result<Vec<String>>;
    /// Deletes an object; deleting one that does not exist is not an error.
    async fn delete(&self, path: &str) -> Result<()>;
    /// Moves `staged` to `target`. Idempotent: when `staged` is gone and `target` exists,
    /// the move already happened.
    async fn publish(&self, staged: &str, target: &str) -> Result<()>;
    /// Stages `records` as the errors-zone file `file` of `name`, in the partition of
    /// `at_micros` (published with the epoch; the same arguments give the same file).
    async fn stage_errors(
        &self,
        name: &str,
        records: &[BadRecord],
        at_micros: i64,
        file: &str,
    ) -> Result<StagedFile>;
}

/// Whether this process may still commit to the lake: it holds the lake's writer lease.
pub trait Fence: Send + Sync + std::fmt::Debug {
    /// `Err(EngineError::Fenced)` once the lease may have passed to another process.
    fn check(&self) -> Result<()>;
}

/// The fence of a process that is the lake's only writer by construction (tests, tools).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoFence;

impl Fence for NoFence {
    fn check(&self) -> Result<()> {
        Ok(())
    }
}

/// A copy of one operator's state, taken when a barrier passes it.
#[derive(Debug, Clone, Default)]
pub struct OperatorState {
    /// The operator's name ([`crate::Operator::name`]), checked on restore.
    pub operator: String,
    /// Scalars (watermarks and the like).
    pub values: BTreeMap<String, i64>,
    /// Named tables; each is stored as one Arrow IPC file.
    pub tables: BTreeMap<String, RecordBatch>,
}

/// Which of the keys in a restored state a subtask keeps: those the stream's router sends
/// to it (state written at another parallelism is divided anew by key).
#[derive(Debug, Clone, Default)]
pub struct KeyFilter {
    route: Option<(HashRouter, usize)>,
}

impl KeyFilter {
    /// Keeps every key (one subtask).
    pub fn all() -> Self {
        Self::default()
    }

    /// Keeps the keys `router` sends to subtask `index`.
    pub fn subtask(router: HashRouter, index: usize) -> Self {
        Self {
            route: Some((router, index)),
        }
    }

    /// For each row of the evaluated key columns `keys` (as the router's key expressions
    /// produce them): whether this subtask keeps it.
    pub fn keeps(&self, keys: &[ArrayRef], rows: usize) -> Result<Vec<bool>> {
        match &self.route {
            None => Ok(vec![true; rows]),
            Some((router, index)) => Ok(router
                .route_keys(keys, rows)?
                .into_iter()
                .map(|s| s == *index)
                .collect()),
        }
    }

    /// Splits whole input rows (batches the router's expressions apply to): the rows this
    /// subtask keeps.
    pub fn keep_rows(&self, batch: &RecordBatch) -> Result<Option<RecordBatch>> {
        match &self.route {
            None => Ok(Some(batch.clone())),
            Some((router, index)) => Ok(router.split(batch)?.swap_remove(*index)),
        }
    }
}

/// A file a lake writer staged: where it is, and where it goes when its epoch commits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedFile {
    /// Its staging path.
    pub staged: String,
    /// Its final path.
    pub target: String,
    /// The target is consumed once published (an exactly-once sink deletes it when
    /// delivered), so recovery finds neither file when it was.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub transient: bool,
}

impl StagedFile {
    /// A file staged at `staged` that becomes `target`.
    pub fn new(staged: impl Into<String>, target: impl Into<String>) -> Self {
        Self {
            staged: staged.into(),
            target: target.into(),
            transient: false,
        }
    }
}

/// What a participant reports for an epoch.
#[derive(Debug, Clone)]
pub enum Payload {
    /// A reader's position (connector-defined JSON: offsets, sequence numbers, row counts).
    Position(serde_json::Value),
    /// A subtask's operator states, one per operator of its chain (`None`: stateless), and
    /// the rows its stream rejected in the epoch (they reach the errors zone with it).
    State {
        /// The states.
        operators: Vec<Option<OperatorState>>,
        /// Rejected rows.
        rejected: Vec<BadRecord>,
        /// The stream's counters at the barrier ([`crate::Metrics::counters`]), so that a
        /// restart carries them over (subtask 0's are kept).
        counters: BTreeMap<String, i64>,
    },
    /// A lake writer's staged files; `published` counts them once they are visible.
    Staged {
        /// The files.
        files: Vec<StagedFile>,
        /// Incremented by the number of files when they are published.
        published: Arc<AtomicU64>,
    },
}

#[derive(Debug)]
struct Report {
    stream: String,
    participant: String,
    /// `None`: the participant's input ended; this is its last report.
    epoch: Option<u64>,
    payload: Payload,
}

/// A participant's way to report to the coordinator.
#[derive(Debug, Clone)]
pub struct CheckpointHandle {
    stream: Arc<str>,
    participant: Arc<str>,
    first_epoch: u64,
    reports: mpsc::UnboundedSender<Report>,
}

impl CheckpointHandle {
    /// The first epoch this participant takes part in: barriers of earlier epochs (from an
    /// input stream that was checkpointing before this one existed) are not its own.
    pub fn first_epoch(&self) -> u64 {
        self.first_epoch
    }

    /// Reports this participant's part of `epoch`.
    pub fn report(&self, epoch: u64, payload: Payload) {
        self.send(Some(epoch), payload);
    }

    /// Reports the participant's final part: its input ended and it has handed on
    /// everything. It stands for the participant in every later epoch.
    pub fn finish(&self, payload: Payload) {
        self.send(None, payload);
    }

    fn send(&self, epoch: Option<u64>, payload: Payload) {
        // The coordinator only goes away at shutdown; a report then is moot.
        let _ = self.reports.send(Report {
            stream: self.stream.to_string(),
            participant: self.participant.to_string(),
            epoch,
            payload,
        });
    }
}

/// A source reader's side of checkpoints: it asks, between batches, whether a barrier is
/// due, and if so reports its position and sends the barrier after the rows it covers.
#[derive(Debug, Clone)]
pub struct ReaderCheckpoint {
    handle: CheckpointHandle,
    /// A source that writes to the lake itself (its raw and errors zones) reports the files
    /// it staged through this.
    files: Option<CheckpointHandle>,
    requests: watch::Receiver<u64>,
    /// The last epoch committed.
    completed: watch::Receiver<u64>,
    next: u64,
}

impl ReaderCheckpoint {
    /// The epoch whose barrier this reader owes, if any.
    pub fn due(&self) -> Option<u64> {
        let e = *self.requests.borrow();
        (e >= self.next).then_some(e)
    }

    /// Whether this reader still owes the barrier of `epoch` (it has not sent it, and the
    /// epoch is not from before it registered).
    pub fn owes(&self, epoch: u64) -> bool {
        epoch >= self.next
    }

    /// Waits until a barrier is due; returns its epoch.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn requested(&mut self) -> u64 {
        loop {
            if let Some(e) = self.due() {
                return e;
            }
            if self.requests.changed().await.is_err() {
                // No coordinator any more (shutdown): never due.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Reports `position` (which covers exactly the rows sent so far) for `epoch` and sends
    /// the barrier to `output`.
    pub async fn barrier(&mut self, output: &FanOut, epoch: u64, position: serde_json::Value) {
        self.handle.report(epoch, Payload::Position(position));
        self.next = epoch + 1;
        output.send(Message::Barrier(Barrier { epoch })).await;
    }

    /// The epochs of committed checkpoints as they happen, from now on. (A source can then
    /// tell the outside what is durable, e.g. commit a Kafka consumer group's offsets.)
    pub fn committed_epochs(&self) -> watch::Receiver<u64> {
        let mut rx = self.completed.clone();
        rx.mark_unchanged();
        rx
    }

    /// The input ended: reports the final position.
    pub fn finish(&self, position: serde_json::Value) {
        self.handle.finish(Payload::Position(position));
    }

    /// Reports the files the reader staged in `epoch` (call before [`Self::barrier`]); they
    /// become visible when the epoch commits. Only for a source registered with a writer.
    pub fn staged(&self, epoch: u64, files: Vec<StagedFile>) {
        if let Some(h) = &self.files {
            h.report(
                epoch,
                Payload::Staged {
                    files,
                    published: Arc::default(),
                },
            );
        }
    }
}

/// The epoch of the barrier a reader owes: [`ReaderCheckpoint::requested`], or never
/// without checkpoints (for `select!` loops over an optional checkpoint).
///
/// # Cancel safety
/// Cancel safe.
pub async fn barrier_due(checkpoint: &mut Option<ReaderCheckpoint>) -> u64 {
    match checkpoint {
        Some(ck) => ck.requested().await,
        None => std::future::pending().await,
    }
}

/// What the manifest holds of one operator's state.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StoredState {
    /// The operator's name.
    pub operator: String,
    /// Its scalars.
    pub values: BTreeMap<String, i64>,
    /// Its tables: name → IPC file path.
    pub tables: BTreeMap<String, String>,
}

/// What the manifest holds of one stream.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StreamCheckpoint {
    /// The `CREATE STREAM` statement: state is only restored into the same query.
    pub sql: String,
    /// Subtasks of the stateful chain when the state was taken.
    pub parallelism: usize,
    /// Readers' positions, by source name.
    pub positions: BTreeMap<String, serde_json::Value>,
    /// Per subtask, per operator of its chain: the state (`None`: stateless).
    pub subtasks: Vec<Vec<Option<StoredState>>>,
    /// Files this epoch made visible (phase two; redone on recovery if interrupted).
    pub staged: Vec<StagedFile>,
    /// The stream's counters at the barrier (absent in checkpoints of older versions).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub counters: BTreeMap<String, i64>,
}

/// `_sluice/checkpoints/<epoch>/manifest.json`: one complete checkpoint.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Manifest {
    /// The format version.
    pub version: u32,
    /// The epoch.
    pub epoch: u64,
    /// When it completed (µs since the epoch).
    pub completed_at_micros: i64,
    /// Every checkpointed stream.
    pub streams: BTreeMap<String, StreamCheckpoint>,
    /// The coordinator that wrote it (an id per process start), so that a retried commit
    /// knows its own manifest from another writer's.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub writer: String,
}

/// What a stream gets back from the last checkpoint when it registers.
#[derive(Debug, Default)]
pub struct Restored {
    /// The epoch restored.
    pub epoch: u64,
    /// Readers' positions, by source name.
    pub positions: BTreeMap<String, serde_json::Value>,
    /// Per operator of the stateful chain: the parts every old subtask held.
    pub operators: Vec<Vec<OperatorState>>,
    /// The parallelism the state was written at.
    pub parallelism: usize,
    /// The stream's counters at the checkpoint, to carry over.
    pub counters: BTreeMap<String, i64>,
}

/// A stream's participants, handed out at registration.
#[derive(Debug)]
pub struct StreamCheckpoints {
    /// One per source the stream reads with its own reader.
    pub readers: BTreeMap<String, ReaderCheckpoint>,
    /// One per subtask of the stateful chain.
    pub subtasks: Vec<CheckpointHandle>,
    /// The stream's lake writer (unused when it registered without one).
    pub writer: CheckpointHandle,
    /// Positions and state to resume from, if the last checkpoint has this stream.
    pub restored: Option<Restored>,
}

/// What a stream declares when it registers.
#[derive(Debug, Clone)]
pub struct StreamRegistration {
    /// Its name.
    pub name: String,
    /// Its `CREATE STREAM` statement.
    pub sql: String,
    /// Sources it reads with readers of its own.
    pub readers: Vec<String>,
    /// Subtasks of its stateful chain (0: none, e.g. a push source taking part alone).
    pub parallelism: usize,
    /// It has a lake writer.
    pub writer: bool,
    /// How often it wants checkpoints (the coordinator runs at the smallest interval).
    pub interval: Duration,
}

#[derive(Debug)]
struct Registered {
    /// Epochs before this one were requested before the stream existed.
    first_epoch: u64,
    sql: String,
    parallelism: usize,
    participants: BTreeSet<String>,
    interval: Duration,
    finals: BTreeMap<String, Payload>,
}

#[derive(Debug, Default)]
struct State {
    next_epoch: u64,
    streams: BTreeMap<String, Registered>,
    /// The last complete checkpoint (streams not registered now are carried forward).
    last: Manifest,
    /// Streams of the recovered checkpoint not yet registered again.
    unclaimed: BTreeSet<String>,
    /// Shutting down: the epoch of the final checkpoint, after which none is taken.
    closing: Option<u64>,
}

#[derive(Debug)]
struct Shared {
    store: Arc<dyn CheckpointStore>,
    fence: Arc<dyn Fence>,
    /// This coordinator's id in the manifests it writes.
    writer: String,
    state: Mutex<State>,
    requests: watch::Sender<u64>,
    completed: watch::Sender<u64>,
    reports: mpsc::UnboundedSender<Report>,
    trigger: Notify,
    /// Streams came or went: the coordinator recomputes when the next checkpoint is due.
    changed: Notify,
    default_interval: Duration,
    /// Duration of the last checkpoint, µs.
    last_duration_micros: AtomicU64,
    /// When the last checkpoint completed (before the first: when the coordinator opened).
    last_completed_at: Mutex<std::time::Instant>,
    /// How many checkpoints to keep.
    retention: std::sync::atomic::AtomicUsize,
    /// The state files each kept checkpoint names, by epoch (read once per checkpoint).
    kept: Mutex<BTreeMap<u64, BTreeSet<String>>>,
}

/// The server's checkpoint coordinator. See the module docs.
#[derive(Debug, Clone)]
pub struct Coordinator {
    shared: Arc<Shared>,
}

fn epoch_dir(epoch: u64) -> String {
    format!("{CHECKPOINTS_DIR}/{epoch:020}")
}

impl Coordinator {
    /// Recovers from the newest checkpoint in `store` (finishing its phase two, claiming the
    /// next epoch and deleting files staged by epochs that never committed) and starts the
    /// coordinator task. `default_interval` applies to streams that do not set
    /// `checkpoint_interval`; every commit asks `fence` first (see *Fencing*).
    pub async fn open(
        store: Arc<dyn CheckpointStore>,
        default_interval: Duration,
        fence: Arc<dyn Fence>,
    ) -> Result<Self> {
        let writer = format!(
            "{}-{}",
            std::process::id(),
            crate::time::EventTime::now().micros()
        );
        let last = loop {
            let found = manifests(store.as_ref()).await?;
            let last = found.newest.clone();
            for (path, reason) in &found.unreadable {
                tracing::error!(
                    manifest = %path,
                    %reason,
                    starting_from = last.as_ref().map(|m| m.epoch),
                    "a checkpoint manifest newer than the one recovered is unreadable; starting from the newest readable one (sources replay from its positions)"
                );
            }
            if let Some(m) = &last {
                for s in m.streams.values() {
                    for f in &s.staged {
                        if f.transient && store.get(&f.staged).await?.is_none() {
                            continue; // published, and consumed since
                        }
                        store.publish(&f.staged, &f.target).await?;
                    }
                }
                tracing::info!(
                    epoch = m.epoch,
                    streams = m.streams.len(),
                    "recovered checkpoint"
                );
            }
            // Claim the next epoch: the same checkpoint again, under an epoch of our own.
            let mut claim = last.clone().unwrap_or(Manifest {
                version: MANIFEST_VERSION,
                ..Default::default()
            });
            // Past every epoch that exists, readable or not.
            claim.epoch = claim.epoch.max(found.highest_epoch) + 1;
            claim.version = MANIFEST_VERSION;
            claim.writer.clone_from(&writer);
            for s in claim.streams.values_mut() {
                s.staged.clear(); // published above
            }
            fence.check()?;
            let bytes = serde_json::to_vec_pretty(&claim).expect("the manifest serialises");
            if store
                .put_new(
                    &format!("{}/manifest.json", epoch_dir(claim.epoch)),
                    Bytes::from(bytes),
                )
                .await?
            {
                break claim;
            }
            // A writer we are taking over from committed that epoch meanwhile: recover it.
            tracing::warn!(
                epoch = claim.epoch,
                "another writer committed this epoch meanwhile; recovering it"
            );
        };
        for leftover in store.list(STAGING_DIR).await? {
            store.delete(&leftover).await?;
        }
        let (reports_tx, reports_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            store,
            fence,
            writer,
            state: Mutex::new(State {
                next_epoch: last.epoch + 1,
                unclaimed: last.streams.keys().cloned().collect(),
                last,
                ..Default::default()
            }),
            requests: watch::channel(0).0,
            completed: watch::channel(0).0,
            reports: reports_tx,
            trigger: Notify::new(),
            changed: Notify::new(),
            default_interval,
            last_duration_micros: AtomicU64::new(0),
            last_completed_at: Mutex::new(std::time::Instant::now()),
            retention: std::sync::atomic::AtomicUsize::new(DEFAULT_RETENTION),
            kept: Mutex::default(),
        });
        tokio::spawn(run(Arc::clone(&shared), reports_rx));
        Ok(Self { shared })
    }

    /// Keeps the newest `n` checkpoints (at least 1) from the next commit on.
    pub fn set_retention(&self, n: usize) {
        self.shared.retention.store(n.max(1), Ordering::Relaxed);
    }

    /// The interval for streams that do not set one.
    pub fn default_interval(&self) -> Duration {
        self.shared.default_interval
    }

    /// The epoch of the last complete checkpoint (0: none yet).
    pub fn last_completed(&self) -> u64 {
        *self.shared.completed.borrow()
    }

    /// How long the last checkpoint took, from request to published files.
    pub fn last_duration(&self) -> Duration {
        Duration::from_micros(self.shared.last_duration_micros.load(Ordering::Relaxed))
    }

    /// When the last checkpoint completed; before the first one of this process, when the
    /// coordinator opened. A time long past while streams checkpoint every few seconds means
    /// checkpoints are stuck.
    pub fn last_completed_at(&self) -> std::time::Instant {
        *self
            .shared
            .last_completed_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a stream; returns its participants' handles and, if the last checkpoint
    /// has the stream with the same SQL, what to restore.
    pub async fn register(&self, r: StreamRegistration) -> Result<StreamCheckpoints> {
        let (first_epoch, recovered) = {
            let mut st = self.lock();
            let recovered = match st.last.streams.get(&r.name) {
                Some(c) if st.unclaimed.contains(&r.name) && c.sql == r.sql => Some(c.clone()),
                Some(_) => {
                    tracing::warn!(stream = %r.name, "the checkpointed stream had another definition: it starts afresh");
                    None
                }
                None => None,
            };
            st.unclaimed.remove(&r.name);
            if recovered.is_none() {
                st.last.streams.remove(&r.name);
            }
            let mut participants: BTreeSet<String> =
                r.readers.iter().map(|s| format!("reader:{s}")).collect();
            participants.extend((0..r.parallelism).map(|k| format!("subtask:{k}")));
            if r.writer {
                participants.insert("writer".into());
            }
            let first_epoch = st.next_epoch;
            st.streams.insert(
                r.name.clone(),
                Registered {
                    first_epoch,
                    sql: r.sql.clone(),
                    parallelism: r.parallelism,
                    participants,
                    interval: r.interval,
                    finals: BTreeMap::new(),
                },
            );
            (st.next_epoch, recovered)
        };
        let restored = match recovered {
            Some(c) => Some(self.load(&r.name, c).await?),
            None => None,
        };
        let handle = |participant: String| CheckpointHandle {
            stream: r.name.as_str().into(),
            participant: participant.into(),
            first_epoch,
            reports: self.shared.reports.clone(),
        };
        self.shared.changed.notify_one();
        let mut requests = self.shared.requests.subscribe();
        requests.mark_unchanged();
        Ok(StreamCheckpoints {
            readers: r
                .readers
                .iter()
                .map(|s| {
                    (
                        s.clone(),
                        ReaderCheckpoint {
                            handle: handle(format!("reader:{s}")),
                            files: (r.writer && r.parallelism == 0)
                                .then(|| handle("writer".into())),
                            requests: requests.clone(),
                            completed: self.shared.completed.subscribe(),
                            next: first_epoch,
                        },
                    )
                })
                .collect(),
            subtasks: (0..r.parallelism)
                .map(|k| handle(format!("subtask:{k}")))
                .collect(),
            writer: handle("writer".into()),
            restored,
        })
    }

    async fn load(&self, stream: &str, c: StreamCheckpoint) -> Result<Restored> {
        let epoch = self.lock().last.epoch;
        let ops = c.subtasks.iter().map(|s| s.len()).max().unwrap_or(0);
        let mut operators: Vec<Vec<OperatorState>> = (0..ops).map(|_| vec![]).collect();
        for subtask in &c.subtasks {
            for (i, stored) in subtask.iter().enumerate() {
                let Some(stored) = stored else { continue };
                let mut tables = BTreeMap::new();
                for (name, path) in &stored.tables {
                    let bytes = self.shared.store.get(path).await?.ok_or_else(|| {
                        EngineError::Checkpoint(format!(
                            "stream `{stream}`: state file {path} of epoch {epoch} is missing"
                        ))
                    })?;
                    tables.insert(name.clone(), read_ipc(&bytes, path)?);
                }
                operators[i].push(OperatorState {
                    operator: stored.operator.clone(),
                    values: stored.values.clone(),
                    tables,
                });
            }
        }
        Ok(Restored {
            epoch,
            positions: c.positions,
            operators,
            parallelism: c.parallelism,
            counters: c.counters,
        })
    }

    /// Forgets a stream: `DROP STREAM` (its checkpointed state goes too), or a stream that
    /// failed (`keep_state`: its last checkpointed state stays, so a restart resumes it).
    pub fn deregister(&self, stream: &str, keep_state: bool) {
        let mut st = self.lock();
        st.streams.remove(stream);
        if !keep_state {
            st.last.streams.remove(stream);
            st.unclaimed.remove(stream);
        }
        drop(st);
        self.shared.trigger.notify_one();
    }

    /// Takes a checkpoint now and waits (up to `timeout`) until it is complete; afterwards
    /// no more are taken (server shutdown: the next start resumes exactly here). Returns
    /// whether it completed.
    pub async fn final_checkpoint(&self, timeout: Duration) -> bool {
        let mut completed = self.shared.completed.subscribe();
        let target = {
            let mut st = self.lock();
            let target = st.next_epoch;
            st.closing = Some(target);
            if st.streams.is_empty() {
                return true;
            }
            target
        };
        self.shared.trigger.notify_one();
        let wait = async {
            loop {
                if *completed.borrow_and_update() >= target {
                    return true;
                }
                if completed.changed().await.is_err() {
                    return false;
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.unwrap_or(false)
    }

    /// Requests a checkpoint now instead of at the next interval (after the one in flight,
    /// if there is one).
    pub fn trigger(&self) {
        self.shared.trigger.notify_one();
    }

    /// Takes a checkpoint as soon as possible and waits until it is complete — so that
    /// everything reported so far (a finished stream's last files) is committed and visible.
    pub async fn checkpoint_now(&self) {
        let target = {
            let st = self.lock();
            if st.closing.is_some() {
                return; // shut down: no more checkpoints
            }
            st.next_epoch
        };
        self.trigger();
        self.wait_for(target).await;
    }

    /// Waits until a checkpoint at or after `epoch` has completed.
    pub async fn wait_for(&self, epoch: u64) {
        let mut completed = self.shared.completed.subscribe();
        while *completed.borrow_and_update() < epoch {
            if completed.changed().await.is_err() {
                return;
            }
        }
    }
}

/// What [`manifests`] found.
#[derive(Debug, Default)]
pub struct Manifests {
    /// The newest readable manifest.
    pub newest: Option<Manifest>,
    /// Manifests newer than it that could not be read: (path, why).
    pub unreadable: Vec<(String, String)>,
    /// The highest epoch with a manifest, readable or not.
    pub highest_epoch: u64,
}

/// The epoch of a `…/<epoch>/manifest.json` path.
fn epoch_of(path: &str) -> Option<u64> {
    path.strip_suffix("/manifest.json")?
        .rsplit('/')
        .next()?
        .parse()
        .ok()
}

/// The manifests in `store`: the newest that reads, and the newer ones that do not. A
/// manifest written by a newer Sluice is an error, not skipped (this build must not
/// overwrite what it cannot read).
pub async fn manifests(store: &dyn CheckpointStore) -> Result<Manifests> {
    let mut paths: Vec<(u64, String)> = store
        .list(CHECKPOINTS_DIR)
        .await?
        .into_iter()
        .filter_map(|p| Some((epoch_of(&p)?, p)))
        .collect();
    paths.sort();
    let mut found = Manifests {
        highest_epoch: paths.last().map_or(0, |(e, _)| *e),
        ..Default::default()
    };
    while let Some((_, path)) = paths.pop() {
        let Some(bytes) = store.get(&path).await? else {
            continue; // deleted meanwhile (retention)
        };
        let m: Manifest = match serde_json::from_slice(&bytes) {
            Ok(m) => m,
            Err(e) => {
                found.unreadable.push((path, e.to_string()));
                continue;
            }
        };
        if m.version > MANIFEST_VERSION {
            return Err(EngineError::Checkpoint(format!(
                "{path} has format version {}, written by a newer Sluice (this one reads up to {MANIFEST_VERSION})",
                m.version
            )));
        }
        found.newest = Some(m);
        break;
    }
    Ok(found)
}

/// The newest readable manifest in `store`, if any.
pub async fn latest_manifest(store: &dyn CheckpointStore) -> Result<Option<Manifest>> {
    Ok(manifests(store).await?.newest)
}

/// The state files `m` names.
fn state_files(m: &Manifest) -> BTreeSet<String> {
    m.streams
        .values()
        .flat_map(|s| s.subtasks.iter().flatten().flatten())
        .flat_map(|s| s.tables.values().cloned())
        .collect()
}

/// Deletes what no kept checkpoint needs: everything under [`CHECKPOINTS_DIR`] but the
/// folders of the newest `retention` epochs and the state files their manifests name.
async fn apply_retention(shared: &Shared, newest: &Manifest) -> Result<()> {
    let retention = shared.retention.load(Ordering::Relaxed).max(1);
    let all = shared.store.list(CHECKPOINTS_DIR).await?;
    let mut epochs: Vec<u64> = all.iter().filter_map(|p| epoch_of(p)).collect();
    epochs.sort_unstable();
    epochs.dedup();
    let keep: Vec<u64> = epochs.iter().rev().take(retention).copied().collect();
    let mut kept = BTreeMap::new();
    for epoch in &keep {
        let cached = shared
            .kept
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(epoch)
            .cloned();
        let files = match cached {
            Some(f) => f,
            None if *epoch == newest.epoch => state_files(newest),
            None => {
                let path = format!("{}/manifest.json", epoch_dir(*epoch));
                // An unreadable manifest names nothing; its folder is kept all the same.
                match shared.store.get(&path).await? {
                    Some(b) => serde_json::from_slice::<Manifest>(&b)
                        .map(|m| state_files(&m))
                        .unwrap_or_default(),
                    None => BTreeSet::new(),
                }
            }
        };
        kept.insert(*epoch, files);
    }
    let referenced: BTreeSet<&str> = kept.values().flatten().map(String::as_str).collect();
    let kept_dirs: Vec<String> = keep.iter().map(|e| format!("{}/", epoch_dir(*e))).collect();
    for path in &all {
        if !kept_dirs.iter().any(|d| path.starts_with(d)) && !referenced.contains(path.as_str()) {
            shared.store.delete(path).await?;
        }
    }
    *shared.kept.lock().unwrap_or_else(|e| e.into_inner()) = kept;
    Ok(())
}

/// The coordinator task: triggers epochs, gathers reports, commits.
async fn run(shared: Arc<Shared>, mut reports: mpsc::UnboundedReceiver<Report>) {
    // Reports of an epoch not yet complete, by (stream, participant).
    let mut pending: BTreeMap<(String, String), Payload> = BTreeMap::new();
    // The epoch in flight, when it was requested (monotonic, and wall clock µs).
    let mut in_flight: Option<(u64, std::time::Instant, i64)> = None;
    // A trigger that came while a checkpoint was in flight: the next one starts right after.
    let mut triggered = false;
    let mut next_due = tokio::time::Instant::now() + shared.default_interval;
    loop {
        let interval = {
            let st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            st.streams
                .values()
                .map(|s| s.interval)
                .min()
                .unwrap_or(shared.default_interval)
        };
        next_due = next_due.min(tokio::time::Instant::now() + interval);
        tokio::select! {
            r = reports.recv() => {
                let Some(r) = r else { return };
                match r.epoch {
                    None => {
                        let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
                        if let Some(s) = st.streams.get_mut(&r.stream) {
                            // A writer that finished has everything: checkpoint soon, so
                            // the stream's last files become visible.
                            let writer = r.participant == "writer";
                            s.finals.insert(r.participant, r.payload);
                            if writer && in_flight.is_none() {
                                next_due = tokio::time::Instant::now();
                            } else if writer {
                                triggered = true;
                            }
                        }
                    }
                    Some(e) if in_flight.is_some_and(|(f, _, _)| f == e) => {
                        pending.insert((r.stream, r.participant), r.payload);
                    }
                    Some(e) => tracing::debug!(epoch = e, stream = %r.stream, "stale checkpoint report ignored"),
                }
            }
            _ = shared.changed.notified() => {}
            _ = shared.trigger.notified() => {
                if in_flight.is_none() {
                    next_due = tokio::time::Instant::now();
                } else {
                    triggered = true;
                }
            }
            _ = tokio::time::sleep_until(next_due), if in_flight.is_none() => {
                let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
                next_due = tokio::time::Instant::now() + interval;
                if st.streams.is_empty() {
                    continue;
                }
                let epoch = st.next_epoch;
                st.next_epoch += 1;
                in_flight = Some((
                    epoch,
                    std::time::Instant::now(),
                    crate::time::EventTime::now().micros(),
                ));
                drop(st);
                shared.requests.send_replace(epoch);
                tracing::debug!(epoch, "checkpoint requested");
            }
            // Re-check completion now and then: streams may deregister mid-epoch.
            _ = tokio::time::sleep(Duration::from_millis(100)), if in_flight.is_some() => {}
        }
        let Some((epoch, started, requested_at)) = in_flight else {
            continue;
        };
        let complete = {
            let st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            st.streams
                .iter()
                .filter(|(_, s)| s.first_epoch <= epoch)
                .all(|(name, s)| {
                    s.participants.iter().all(|p| {
                        s.finals.contains_key(p) || pending.contains_key(&(name.clone(), p.clone()))
                    })
                })
        };
        if !complete {
            continue;
        }
        in_flight = None;
        // An epoch's reports cover rows no later report repeats: its commit is retried until
        // it succeeds (the lake may be away for a while); the pipelines go on meanwhile.
        let mut attempt = 0u32;
        let used = loop {
            match commit(&shared, epoch, requested_at, &pending).await {
                Ok(used) => break used,
                Err(e @ EngineError::Fenced(_)) => {
                    // Another process writes the lake now: nothing more is committed here.
                    tracing::error!(epoch, error = %e, "checkpoints stop: this server is no longer the lake's writer");
                    return;
                }
                Err(e) => {
                    attempt += 1;
                    tracing::error!(epoch, attempt, error = %e, "checkpoint commit failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200) * attempt.min(25)).await;
                }
            }
        };
        consume_finals(&shared, &used);
        let took = started.elapsed();
        shared
            .last_duration_micros
            .store(took.as_micros() as u64, Ordering::Relaxed);
        *shared
            .last_completed_at
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = std::time::Instant::now();
        tracing::debug!(epoch, ?took, "checkpoint complete");
        shared.completed.send_replace(epoch);
        pending.clear();
        if std::mem::take(&mut triggered) {
            next_due = tokio::time::Instant::now();
        }
        let closing = shared
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .closing;
        match closing {
            Some(target) if epoch >= target => {
                // Shutdown: the final checkpoint is taken; take no more.
                while reports.recv().await.is_some() {}
                return;
            }
            Some(_) => next_due = tokio::time::Instant::now(),
            None => {}
        }
    }
}

/// After a commit: the files and rejected rows of the final reports it `used` (stream,
/// participant) are published; later epochs carry only their positions and state.
fn consume_finals(shared: &Shared, used: &[(String, String)]) {
    let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
    for (stream, participant) in used {
        let payload = st
            .streams
            .get_mut(stream)
            .and_then(|s| s.finals.get_mut(participant));
        match payload {
            Some(Payload::Staged { files, .. }) => files.clear(),
            Some(Payload::State { rejected, .. }) => rejected.clear(),
            Some(Payload::Position(_)) | None => {}
        }
    }
}

/// Writes epoch `epoch`'s state files and manifest, then publishes its staged files.
/// Idempotent: a failed attempt can be repeated with the same reports.
/// Returns the final reports it used (see [`consume_finals`]).
async fn commit(
    shared: &Shared,
    epoch: u64,
    requested_at: i64,
    pending: &BTreeMap<(String, String), Payload>,
) -> Result<Vec<(String, String)>> {
    let mut used_finals = vec![];
    let dir = epoch_dir(epoch);
    // Gather each registered stream's parts: this epoch's report, else its final one.
    let mut streams: BTreeMap<String, StreamCheckpoint> = BTreeMap::new();
    let mut published: Vec<(Arc<AtomicU64>, u64)> = vec![];
    let mut carried;
    // (stream, sql, parallelism, each participant's part)
    type Parts = Vec<(String, Payload)>;
    let registered: Vec<(String, String, usize, Parts)> = {
        let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
        carried = st.last.streams.clone();
        let mut out = vec![];
        for (name, s) in st.streams.iter_mut() {
            if s.first_epoch > epoch {
                continue; // registered after the epoch began: its last state is carried
            }
            let mut parts = vec![];
            for p in &s.participants {
                if let Some(payload) = pending.get(&(name.clone(), p.clone())) {
                    parts.push((p.clone(), payload.clone()));
                } else if let Some(payload) = s.finals.get(p) {
                    // A final report stands for every later epoch (its files and rejected
                    // rows are published once: see `consume_finals`).
                    parts.push((p.clone(), payload.clone()));
                    used_finals.push((name.clone(), p.clone()));
                }
            }
            out.push((name.clone(), s.sql.clone(), s.parallelism, parts));
        }
        out
    };
    for (name, sql, parallelism, parts) in registered {
        carried.remove(&name);
        let mut c = StreamCheckpoint {
            sql,
            parallelism,
            subtasks: vec![vec![]; parallelism],
            ..Default::default()
        };
        for (participant, payload) in parts {
            match (participant.split_once(':'), payload) {
                (Some(("reader", source)), Payload::Position(v)) => {
                    c.positions.insert(source.to_string(), v);
                }
                (
                    Some(("subtask", k)),
                    Payload::State {
                        operators: states,
                        rejected,
                        counters,
                    },
                ) => {
                    let k: usize = k.parse().unwrap_or(0);
                    if k == 0 {
                        c.counters = counters;
                    }
                    if !rejected.is_empty() {
                        // Named after the epoch: a retried commit stages the same file.
                        let file = format!("epoch-{epoch:020}-subtask-{k}.jsonl");
                        c.staged.push(
                            shared
                                .store
                                .stage_errors(&name, &rejected, requested_at, &file)
                                .await?,
                        );
                    }
                    let mut stored = vec![];
                    for (i, s) in states.into_iter().enumerate() {
                        stored.push(match s {
                            None => None,
                            Some(s) => {
                                let mut tables = BTreeMap::new();
                                for (t, batch) in &s.tables {
                                    let path = format!("{dir}/{name}/s{k}-op{i}-{t}.arrow");
                                    shared.store.put(&path, write_ipc(batch)?).await?;
                                    tables.insert(t.clone(), path);
                                }
                                Some(StoredState {
                                    operator: s.operator,
                                    values: s.values,
                                    tables,
                                })
                            }
                        });
                    }
                    if k < c.subtasks.len() {
                        c.subtasks[k] = stored;
                    }
                }
                (
                    _,
                    Payload::Staged {
                        files,
                        published: p,
                    },
                ) => {
                    published.push((p, files.len() as u64));
                    c.staged.extend(files);
                }
                (_, other) => {
                    return Err(EngineError::Internal(format!(
                        "checkpoint: unexpected report {other:?} from {name}/{participant}"
                    )));
                }
            }
        }
        streams.insert(name, c);
    }
    // Streams not running now (a failed one, one whose restore failed) keep their last
    // checkpointed state; their staged files were published with it.
    for (name, mut c) in carried {
        c.staged.clear();
        streams.insert(name, c);
    }
    let manifest = Manifest {
        version: MANIFEST_VERSION,
        epoch,
        completed_at_micros: crate::time::EventTime::now().micros(),
        streams,
        writer: shared.writer.clone(),
    };
    let bytes = serde_json::to_vec_pretty(&manifest).expect("the manifest serialises");
    let path = format!("{dir}/manifest.json");
    shared.fence.check()?;
    if !shared.store.put_new(&path, Bytes::from(bytes)).await? {
        // Either our own earlier attempt wrote it (a retry), or another writer took the
        // epoch: only the first may go on.
        let theirs = shared.store.get(&path).await?;
        let ours = theirs
            .and_then(|b| serde_json::from_slice::<Manifest>(&b).ok())
            .is_some_and(|m| m.writer == shared.writer);
        if !ours {
            return Err(EngineError::Fenced(format!(
                "epoch {epoch} was committed by another writer"
            )));
        }
    }
    // Committed. Phase two: make the epoch's files visible.
    for s in manifest.streams.values() {
        for f in &s.staged {
            shared.fence.check()?;
            shared.store.publish(&f.staged, &f.target).await?;
        }
    }
    for (counter, n) in published {
        counter.fetch_add(n, Ordering::Relaxed);
    }
    apply_retention(shared, &manifest).await?;
    shared.state.lock().unwrap_or_else(|e| e.into_inner()).last = manifest;
    Ok(used_finals)
}

/// One batch as an Arrow IPC file.
pub fn write_ipc(batch: &RecordBatch) -> Result<Bytes> {
    let mut buf = Vec::new();
    let mut w = arrow::ipc::writer::FileWriter::try_new(&mut buf, &batch.schema())?;
    w.write(batch)?;
    w.finish()?;
    drop(w);
    Ok(Bytes::from(buf))
}

/// The batches of an Arrow IPC file, concatenated.
pub fn read_ipc(bytes: &Bytes, path: &str) -> Result<RecordBatch> {
    let reader = arrow::ipc::reader::FileReader::try_new(std::io::Cursor::new(bytes.clone()), None)
        .map_err(|e| EngineError::Checkpoint(format!("{path}: {e}")))?;
    let schema = reader.schema();
    let batches = reader
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| EngineError::Checkpoint(format!("{path}: {e}")))?;
    Ok(arrow::compute::concat_batches(&schema, &batches)?)
}
