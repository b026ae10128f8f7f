//! The coordinator: requests epochs, gathers reports, commits manifests, applies retention.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{Notify, mpsc, watch};

use super::manifest::{epoch_of, state_files};
use super::participant::Report;
use super::*;
use crate::error::{EngineError, Result};

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
    /// How long an epoch may wait for this stream's participants before it is aborted.
    /// One epoch serves every stream: it waits as long as the most patient stream that sets
    /// a timeout allows, and when none sets one, [`default_timeout`] of the coordinator's
    /// interval.
    pub timeout: Option<Duration>,
}

/// The checkpoint timeout of a stream that sets none: ten intervals, and at least a minute
/// (Flink's default is ten minutes whatever the interval; a minute keeps a stuck epoch from
/// holding a fast-checkpointing stream's output back for long, and ten intervals leave a slow
/// one the room it asked for).
pub fn default_timeout(interval: Duration) -> Duration {
    (interval * 10).max(Duration::from_secs(60))
}

/// How a stream's checkpoints have gone, as `SHOW STREAMS` reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckpointHealth {
    /// Epochs aborted because one of this stream's participants did not report in time.
    pub aborted: u64,
    /// Why the last one was aborted.
    pub last_abort: Option<String>,
}

#[derive(Debug)]
struct Registered {
    /// Epochs before this one were requested before the stream existed.
    first_epoch: u64,
    sql: String,
    parallelism: usize,
    participants: BTreeSet<Participant>,
    interval: Duration,
    timeout: Option<Duration>,
    finals: BTreeMap<Participant, Payload>,
    health: CheckpointHealth,
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
    /// The last epoch that committed or was aborted, and whether checkpoints stopped for
    /// good (shutdown, fenced).
    settled: watch::Sender<(u64, bool)>,
    /// Epochs aborted since the coordinator opened.
    aborted: AtomicU64,
    reports: mpsc::UnboundedSender<Report>,
    trigger: Notify,
    /// Streams came or went: the coordinator recomputes when the next checkpoint is due.
    changed: Notify,
    default_interval: Duration,
    /// Duration of the last checkpoint, µs.
    last_duration_micros: AtomicU64,
    /// When the last checkpoint completed (before the first: when the coordinator opened).
    last_completed_at: Mutex<std::time::Instant>,
    /// When the last checkpoint completed, µs since the epoch (0: none yet).
    last_completed_unix_micros: std::sync::atomic::AtomicI64,
    /// Durations of the checkpoints completed since [`Coordinator::take_durations`] was last
    /// called (at most [`MAX_PENDING_DURATIONS`]: the oldest are dropped).
    durations: Mutex<std::collections::VecDeque<Duration>>,
    /// Per stream, the bytes of operator state its last checkpoint wrote.
    state_bytes: Mutex<BTreeMap<String, u64>>,
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
                        publish(store.as_ref(), f).await?;
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
            settled: watch::channel((0, false)).0,
            aborted: AtomicU64::new(0),
            reports: reports_tx,
            trigger: Notify::new(),
            changed: Notify::new(),
            default_interval,
            last_duration_micros: AtomicU64::new(0),
            last_completed_at: Mutex::new(std::time::Instant::now()),
            last_completed_unix_micros: std::sync::atomic::AtomicI64::new(0),
            durations: Mutex::default(),
            state_bytes: Mutex::default(),
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
            let mut participants: BTreeSet<Participant> =
                r.readers.iter().cloned().map(Participant::Reader).collect();
            participants.extend((0..r.parallelism).map(Participant::Subtask));
            if r.writer {
                participants.insert(Participant::Writer);
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
                    timeout: r.timeout,
                    finals: BTreeMap::new(),
                    health: CheckpointHealth::default(),
                },
            );
            (st.next_epoch, recovered)
        };
        let restored = match recovered {
            Some(c) => Some(self.load(&r.name, c).await?),
            None => None,
        };
        let handle = |participant: Participant| CheckpointHandle {
            stream: r.name.as_str().into(),
            participant,
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
                            handle: handle(Participant::Reader(s.clone())),
                            files: (r.writer && r.parallelism == 0)
                                .then(|| handle(Participant::Writer)),
                            requests: requests.clone(),
                            completed: self.shared.completed.subscribe(),
                            next: first_epoch,
                        },
                    )
                })
                .collect(),
            subtasks: (0..r.parallelism)
                .map(|k| handle(Participant::Subtask(k)))
                .collect(),
            writer: handle(Participant::Writer),
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
                    version: stored.version,
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

    /// Takes a checkpoint as soon as possible and waits until it committed or was aborted —
    /// so that everything reported so far (a finished stream's last files) is committed and
    /// visible. Returns whether it committed.
    pub async fn checkpoint_now(&self) -> bool {
        let target = {
            let st = self.lock();
            if st.closing.is_some() {
                return false; // shut down: no more checkpoints
            }
            st.next_epoch
        };
        self.trigger();
        self.wait_settled(target).await && self.last_completed() >= target
    }

    /// Waits until epoch `epoch` or a later one committed or was aborted; `false` when
    /// checkpoints stopped for good first (shutdown, fenced).
    pub async fn wait_settled(&self, epoch: u64) -> bool {
        self.commit_watch().wait_settled(epoch).await
    }

    /// A read-only view of which epochs settle, for participants that act on commits.
    pub fn commit_watch(&self) -> CommitWatch {
        CommitWatch {
            settled: self.shared.settled.subscribe(),
        }
    }

    /// The last epoch that committed or was aborted.
    pub fn last_settled(&self) -> u64 {
        self.shared.settled.borrow().0
    }

    /// How often checkpoints are taken now: the smallest interval of the registered
    /// streams; `None` while no stream takes part.
    pub fn interval(&self) -> Option<Duration> {
        let st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        st.streams.values().map(|s| s.interval).min()
    }

    /// The durations of the checkpoints completed since the last call (for a histogram;
    /// at most the last [`MAX_PENDING_DURATIONS`] of them).
    pub fn take_durations(&self) -> Vec<Duration> {
        let mut d = self
            .shared
            .durations
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        d.drain(..).collect()
    }

    /// When the last checkpoint completed, µs since the Unix epoch; `None` before the first.
    pub fn last_completed_unix_micros(&self) -> Option<i64> {
        Some(
            self.shared
                .last_completed_unix_micros
                .load(Ordering::Relaxed),
        )
        .filter(|t| *t > 0)
    }

    /// The bytes of operator state `stream`'s last checkpoint wrote (0 for a stream without
    /// state, or before its first checkpoint).
    pub fn state_bytes(&self, stream: &str) -> u64 {
        self.shared
            .state_bytes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(stream)
            .copied()
            .unwrap_or(0)
    }

    /// Epochs aborted since the coordinator opened (a participant did not report in time).
    pub fn aborted_total(&self) -> u64 {
        self.shared.aborted.load(Ordering::Relaxed)
    }

    /// How `stream`'s checkpoints have gone (`None`: not registered).
    pub fn health(&self, stream: &str) -> Option<CheckpointHealth> {
        self.lock().streams.get(stream).map(|s| s.health.clone())
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

/// The epoch in flight.
#[derive(Debug, Clone, Copy)]
struct InFlight {
    epoch: u64,
    started: std::time::Instant,
    /// When it was requested, µs since the Unix epoch (its errors-zone files' partition).
    requested_at: i64,
    /// When it is aborted unless complete.
    deadline: tokio::time::Instant,
    timeout: Duration,
}

/// What a participant of an aborted epoch staged — files, rejected rows — waiting for its
/// stream's next commit (see [`abort`]).
#[derive(Debug)]
struct Carried {
    stream: Arc<str>,
    epoch: u64,
    payload: Payload,
}

/// The part of an aborted epoch's report that must still reach the lake: its files and
/// rejected rows (positions and state are superseded by the next epoch's).
fn carried_part(payload: Payload) -> Option<Payload> {
    match payload {
        Payload::Staged { files, published } if !files.is_empty() => {
            Some(Payload::Staged { files, published })
        }
        Payload::State { rejected, .. } if !rejected.is_empty() => Some(Payload::State {
            operators: vec![],
            rejected,
            counters: BTreeMap::new(),
        }),
        _ => None,
    }
}

/// How many aborted epochs are remembered, so that a participant catching up with one has
/// its files carried rather than ignored.
const ABORTED_REMEMBERED: usize = 1024;

/// The coordinator task: triggers epochs, gathers reports, commits or aborts.
async fn run(shared: Arc<Shared>, mut reports: mpsc::UnboundedReceiver<Report>) {
    // Reports of the epoch in flight, by (stream, participant).
    let mut pending: BTreeMap<(Arc<str>, Participant), Payload> = BTreeMap::new();
    let mut in_flight: Option<InFlight> = None;
    // Epochs aborted, and what their participants staged.
    let mut aborted: BTreeSet<u64> = BTreeSet::new();
    let mut carried: Vec<Carried> = vec![];
    // A trigger that came while a checkpoint was in flight: the next one starts right after.
    let mut triggered = false;
    let mut next_due = tokio::time::Instant::now() + shared.default_interval;
    loop {
        let (interval, timeout) = {
            let st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            let interval = st
                .streams
                .values()
                .map(|s| s.interval)
                .min()
                .unwrap_or(shared.default_interval);
            // One epoch for every stream: it waits as long as the most patient one allows.
            let timeout = st.streams.values().filter_map(|s| s.timeout).max();
            (
                interval,
                timeout.unwrap_or_else(|| default_timeout(interval)),
            )
        };
        next_due = next_due.min(tokio::time::Instant::now() + interval);
        let deadline = in_flight.map(|f| f.deadline);
        tokio::select! {
            r = reports.recv() => {
                let Some(r) = r else { return };
                match r.epoch {
                    None => {
                        let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
                        if let Some(s) = st.streams.get_mut(&*r.stream) {
                            // A writer that finished has everything: checkpoint soon, so
                            // the stream's last files become visible.
                            let writer = r.participant == Participant::Writer;
                            s.finals.insert(r.participant, r.payload);
                            if writer && in_flight.is_none() {
                                next_due = tokio::time::Instant::now();
                            } else if writer {
                                triggered = true;
                            }
                        }
                    }
                    Some(e) if in_flight.is_some_and(|f| f.epoch == e) => {
                        pending.insert((r.stream, r.participant), r.payload);
                    }
                    Some(e) if aborted.contains(&e) => {
                        // A participant catching up with an aborted epoch: what it staged
                        // goes with its stream's next commit.
                        if let Some(payload) = carried_part(r.payload) {
                            carried.push(Carried { stream: r.stream, epoch: e, payload });
                        }
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
                in_flight = Some(InFlight {
                    epoch,
                    started: std::time::Instant::now(),
                    requested_at: crate::time::EventTime::now().micros(),
                    deadline: tokio::time::Instant::now() + timeout,
                    timeout,
                });
                drop(st);
                shared.requests.send_replace(epoch);
                tracing::debug!(epoch, "checkpoint requested");
            }
            _ = tokio::time::sleep_until(deadline.unwrap_or(next_due)), if deadline.is_some() => {
                let f = in_flight.take().expect("an epoch is in flight");
                abort(&shared, &f, &mut pending, &mut carried);
                aborted.insert(f.epoch);
                while aborted.len() > ABORTED_REMEMBERED {
                    aborted.pop_first();
                }
                let closing = shared.state.lock().unwrap_or_else(|e| e.into_inner()).closing;
                next_due = if std::mem::take(&mut triggered) || closing.is_some() {
                    tokio::time::Instant::now()
                } else {
                    tokio::time::Instant::now() + interval
                };
                continue;
            }
            // Re-check completion now and then: streams may deregister mid-epoch.
            _ = tokio::time::sleep(Duration::from_millis(100)), if in_flight.is_some() => {}
        }
        let Some(f) = in_flight else {
            continue;
        };
        let complete = {
            let st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            st.streams
                .iter()
                .filter(|(_, s)| s.first_epoch <= f.epoch)
                .all(|(name, s)| {
                    s.participants.iter().all(|p| {
                        s.finals.contains_key(p)
                            || pending.contains_key(&(Arc::from(name.as_str()), p.clone()))
                    })
                })
        };
        if !complete {
            continue;
        }
        in_flight = None;
        let epoch = f.epoch;
        // An epoch's reports cover rows no later report repeats: its commit is retried until
        // it succeeds (the lake may be away for a while); the pipelines go on meanwhile.
        // (No give-up: dropping them would lose those rows; the waits are the shared policy's.)
        let mut retry = crate::retry::RetryPolicy {
            initial: Duration::from_millis(200),
            max_delay: Duration::from_secs(5),
            max_attempts: None,
            give_up_after: None,
        }
        .start();
        let used = loop {
            match commit(&shared, &f, &pending, &carried).await {
                Ok(used) => break used,
                Err(e @ EngineError::Fenced(_)) => {
                    // Another process writes the lake now: nothing more is committed here.
                    tracing::error!(epoch, error = %e, "checkpoints stop: this server is no longer the lake's writer");
                    shared.settled.send_modify(|s| s.1 = true);
                    return;
                }
                Err(e) => {
                    let delay = retry.next_delay().unwrap_or(Duration::from_secs(5));
                    let attempt = retry.failures();
                    tracing::error!(epoch, attempt, error = %e, "checkpoint commit failed; retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        };
        consume_finals(&shared, &used);
        carried.clear();
        let took = f.started.elapsed();
        shared
            .last_duration_micros
            .store(took.as_micros() as u64, Ordering::Relaxed);
        *shared
            .last_completed_at
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = std::time::Instant::now();
        shared
            .last_completed_unix_micros
            .store(crate::EventTime::now().micros(), Ordering::Relaxed);
        {
            let mut d = shared.durations.lock().unwrap_or_else(|e| e.into_inner());
            if d.len() >= MAX_PENDING_DURATIONS {
                d.pop_front();
            }
            d.push_back(took);
        }
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
                shared.settled.send_replace((epoch, true));
                while reports.recv().await.is_some() {}
                return;
            }
            Some(_) => next_due = tokio::time::Instant::now(),
            None => {}
        }
        shared.settled.send_replace((epoch, false));
    }
}

/// Aborts the epoch in flight: its participants did not all report within the timeout.
///
/// No manifest is written for it, and each stream with a participant that did not report
/// has the failure counted. What the participants that did report staged — lake files,
/// rejected rows — is not deleted: those rows are behind the positions and state the next
/// epoch will commit, so deleting them would lose them for good. They are carried to the
/// stream's next commit instead (Flink's file sink keeps a failed checkpoint's committables
/// the same way) and become visible with it, atomically with the positions that cover them,
/// never before. A stream that goes away meanwhile has its carried files deleted: its
/// restart replays them from its last committed positions.
fn abort(
    shared: &Shared,
    f: &InFlight,
    pending: &mut BTreeMap<(Arc<str>, Participant), Payload>,
    carried: &mut Vec<Carried>,
) {
    let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
    for (name, s) in st.streams.iter_mut() {
        if s.first_epoch > f.epoch {
            continue;
        }
        let key: Arc<str> = Arc::from(name.as_str());
        let missing: Vec<String> = s
            .participants
            .iter()
            .filter(|p| {
                !s.finals.contains_key(p)
                    && !pending.contains_key(&(Arc::clone(&key), (*p).clone()))
            })
            .map(ToString::to_string)
            .collect();
        if missing.is_empty() {
            continue;
        }
        let reason = format!(
            "epoch {}: {} did not report within {:?}",
            f.epoch,
            missing.join(", "),
            f.timeout
        );
        tracing::warn!(stream = %name, "checkpoint aborted: {reason}");
        s.health.aborted += 1;
        s.health.last_abort = Some(reason);
    }
    drop(st);
    for ((stream, _), payload) in std::mem::take(pending) {
        if let Some(payload) = carried_part(payload) {
            carried.push(Carried {
                stream,
                epoch: f.epoch,
                payload,
            });
        }
    }
    shared.aborted.fetch_add(1, Ordering::Relaxed);
    shared.settled.send_replace((f.epoch, false));
}

/// After a commit: the files and rejected rows of the final reports it `used` (stream,
/// participant) are published; later epochs carry only their positions and state.
fn consume_finals(shared: &Shared, used: &[(String, Participant)]) {
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

/// How many checkpoint durations are kept for [`Coordinator::take_durations`] between calls.
pub const MAX_PENDING_DURATIONS: usize = 4096;

/// Makes `f` visible, then deletes the files it replaces. Idempotent, so recovery can
/// repeat an interrupted phase two.
async fn publish(store: &dyn CheckpointStore, f: &StagedFile) -> Result<()> {
    store.publish(f).await?;
    // One request on S3: readers listing the partition in between see the old files beside
    // the new ones for as long as it takes (see `docs/architecture.md`, *Compaction*).
    store.delete_all(&f.retires).await
}

/// Writes epoch `f.epoch`'s state files and manifest, then publishes its staged files (and
/// those `carried` from aborted epochs). Idempotent: a failed attempt can be repeated with
/// the same reports. Returns the final reports it used (see [`consume_finals`]).
async fn commit(
    shared: &Shared,
    f: &InFlight,
    pending: &BTreeMap<(Arc<str>, Participant), Payload>,
    carried: &[Carried],
) -> Result<Vec<(String, Participant)>> {
    let epoch = f.epoch;
    let mut used_finals = vec![];
    let dir = epoch_dir(epoch);
    // Gather each registered stream's parts: this epoch's report, else its final one.
    let mut streams: BTreeMap<String, StreamCheckpoint> = BTreeMap::new();
    let mut published: Vec<(Arc<AtomicU64>, u64)> = vec![];
    let mut last_streams;
    // (stream, sql, parallelism, each participant's part, what aborted epochs carried)
    type Parts = Vec<(Participant, Payload)>;
    let mut registered: Vec<(String, String, usize, Parts)> = vec![];
    let mut orphans: Vec<&Carried> = vec![];
    {
        let st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
        last_streams = st.last.streams.clone();
        for (name, s) in st.streams.iter() {
            if s.first_epoch > epoch {
                continue; // registered after the epoch began: its last state is carried
            }
            let key: Arc<str> = Arc::from(name.as_str());
            let mut parts = vec![];
            for p in &s.participants {
                if let Some(payload) = pending.get(&(Arc::clone(&key), p.clone())) {
                    parts.push((p.clone(), payload.clone()));
                } else if let Some(payload) = s.finals.get(p) {
                    // A final report stands for every later epoch (its files and rejected
                    // rows are published once: see `consume_finals`).
                    parts.push((p.clone(), payload.clone()));
                    used_finals.push((name.clone(), p.clone()));
                }
            }
            registered.push((name.clone(), s.sql.clone(), s.parallelism, parts));
        }
        for c in carried {
            let ours = st
                .streams
                .get(&*c.stream)
                .is_some_and(|s| s.first_epoch <= c.epoch);
            if !ours {
                orphans.push(c);
            }
        }
    }
    for (name, sql, parallelism, parts) in registered {
        last_streams.remove(&name);
        let mut c = StreamCheckpoint {
            sql,
            parallelism,
            subtasks: vec![vec![]; parallelism],
            ..Default::default()
        };
        let mut subtask_state_bytes: BTreeMap<usize, u64> = BTreeMap::new();
        for (participant, payload) in parts {
            match (participant, payload) {
                (Participant::Reader(source), Payload::Position(v)) => {
                    c.positions.insert(source, v);
                }
                (
                    Participant::Subtask(k),
                    Payload::State {
                        operators: states,
                        rejected,
                        counters,
                    },
                ) => {
                    if k == 0 {
                        c.counters = counters;
                    }
                    if !rejected.is_empty() {
                        // Named after the epoch: a retried commit stages the same file.
                        let file = format!("epoch-{epoch:020}-subtask-{k}.jsonl");
                        c.staged.push(
                            shared
                                .store
                                .stage_errors(&name, &rejected, f.requested_at, &file)
                                .await?,
                        );
                    }
                    let mut stored = vec![];
                    let mut state_bytes = 0;
                    for (i, s) in states.into_iter().enumerate() {
                        stored.push(match s {
                            None => None,
                            Some(s) => {
                                let mut tables = BTreeMap::new();
                                for (t, batch) in &s.tables {
                                    let path = format!("{dir}/{name}/s{k}-op{i}-{t}.arrow");
                                    let ipc = write_ipc(batch)?;
                                    state_bytes += ipc.len() as u64;
                                    shared.store.put(&path, ipc).await?;
                                    tables.insert(t.clone(), path);
                                }
                                Some(StoredState {
                                    operator: s.operator,
                                    version: s.version,
                                    values: s.values,
                                    tables,
                                })
                            }
                        });
                    }
                    if k < c.subtasks.len() {
                        c.subtasks[k] = stored;
                    }
                    // Per subtask; summed over the subtasks of the stream below.
                    subtask_state_bytes.insert(k, state_bytes);
                }
                (
                    Participant::Writer,
                    Payload::Staged {
                        files,
                        published: p,
                    },
                ) => {
                    published.push((p, files.len() as u64));
                    c.staged.extend(files);
                }
                (participant, other) => {
                    return Err(EngineError::Internal(format!(
                        "checkpoint: unexpected report {other:?} from {participant} of {name}"
                    )));
                }
            }
        }
        for (n, carried) in carried.iter().enumerate() {
            if *carried.stream != *name || orphans.iter().any(|o| std::ptr::eq(*o, carried)) {
                continue;
            }
            match &carried.payload {
                Payload::Staged {
                    files,
                    published: p,
                } => {
                    published.push((Arc::clone(p), files.len() as u64));
                    c.staged.extend(files.iter().cloned());
                }
                Payload::State { rejected, .. } => {
                    let file = format!("epoch-{epoch:020}-carried-{n}.jsonl");
                    c.staged.push(
                        shared
                            .store
                            .stage_errors(&name, rejected, f.requested_at, &file)
                            .await?,
                    );
                }
                Payload::Position(_) => {}
            }
        }
        shared
            .state_bytes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.clone(), subtask_state_bytes.values().sum());
        streams.insert(name, c);
    }
    // Streams not running now (a failed one, one whose restore failed) keep their last
    // checkpointed state; their staged files were published with it.
    for (name, mut c) in last_streams {
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
            publish(shared.store.as_ref(), f).await?;
        }
    }
    for (counter, n) in published {
        counter.fetch_add(n, Ordering::Relaxed);
    }
    // What aborted epochs staged for streams that are gone: their restart replays it.
    for o in orphans {
        if let Payload::Staged { files, .. } = &o.payload {
            for f in files {
                shared.store.delete(&f.staged).await?;
            }
        }
    }
    apply_retention(shared, &manifest).await?;
    shared.state.lock().unwrap_or_else(|e| e.into_inner()).last = manifest;
    Ok(used_finals)
}
