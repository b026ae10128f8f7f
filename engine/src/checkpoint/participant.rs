//! The participants' side: what readers, stream tasks and writers report, and how.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use arrow::array::ArrayRef;
use arrow::record_batch::RecordBatch;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::error::Result;
use crate::fanout::FanOut;
use crate::message::{BadRecord, Barrier, Message};
use crate::router::HashRouter;

/// A copy of one operator's state, taken when a barrier passes it.
#[derive(Debug, Clone, Default)]
pub struct OperatorState {
    /// The operator's name ([`crate::Operator::name`]), checked on restore.
    pub operator: String,
    /// The layout of its values and tables: each stateful operator numbers its own, and
    /// refuses to restore a layout it does not know (see `tests/golden/`).
    pub version: u32,
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
    /// Which of the key columns an operator passes are the router's keys, in the router's
    /// order (`None`: all of them, as they are).
    select: Option<Vec<usize>>,
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
            select: None,
        }
    }

    /// The same filter for an operator whose keys are not the router's: the router's key
    /// columns are its key columns `columns` (in the router's order). A join side's window
    /// aggregation, say, keeps its groups by all its keys, and the join routes by some.
    pub fn selecting(&self, columns: Vec<usize>) -> Self {
        Self {
            route: self.route.clone(),
            select: Some(columns),
        }
    }

    /// For each row of the evaluated key columns `keys` (as the router's key expressions
    /// produce them): whether this subtask keeps it.
    pub fn keeps(&self, keys: &[ArrayRef], rows: usize) -> Result<Vec<bool>> {
        match &self.route {
            None => Ok(vec![true; rows]),
            Some((router, index)) => {
                let selected: Vec<ArrayRef>;
                let keys = match &self.select {
                    None => keys,
                    Some(columns) => {
                        selected = columns.iter().map(|&c| Arc::clone(&keys[c])).collect();
                        &selected
                    }
                };
                Ok(router
                    .route_keys(keys, rows)?
                    .into_iter()
                    .map(|s| s == *index)
                    .collect())
            }
        }
    }

    /// Splits whole input rows (batches the router's expressions apply to): the rows this
    /// subtask keeps.
    pub fn keep_rows(&self, batch: &RecordBatch) -> Result<Option<RecordBatch>> {
        if self.select.is_some() {
            return Err(crate::error::EngineError::Internal(
                "a state of whole rows restored under a key selection".into(),
            ));
        }
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
    /// Its size in bytes, where the writer knew it (for the lake's counters; 0: unknown).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub bytes: u64,
    /// When its first row reached the writer, µs since the Unix epoch (processed files):
    /// the time from then to the file's commit is the lake's event-to-commit latency.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_row_at: Option<i64>,
    /// Files this one replaces (a compaction's inputs): deleted right after it is
    /// published, in the same phase two (and again by recovery, if it was interrupted).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retires: Vec<String>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl StagedFile {
    /// A file staged at `staged` that becomes `target`.
    pub fn new(staged: impl Into<String>, target: impl Into<String>) -> Self {
        Self {
            staged: staged.into(),
            target: target.into(),
            transient: false,
            bytes: 0,
            first_row_at: None,
            retires: vec![],
        }
    }

    /// The same file, replacing `files` (relative paths) once it is published.
    pub fn retiring(mut self, files: Vec<String>) -> Self {
        self.retires = files;
        self
    }

    /// The same file, `bytes` long, whose first row reached its writer at `first_row_at`.
    pub fn with_stats(mut self, bytes: u64, first_row_at: Option<i64>) -> Self {
        self.bytes = bytes;
        self.first_row_at = first_row_at;
        self
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

/// Who takes part in a stream's checkpoints.
///
/// The order of the variants is the order of a stream's pipeline: readers report before the
/// subtasks their rows reach, subtasks before the writer.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Participant {
    /// The stream's own reader of a source (by name): reports positions.
    Reader(String),
    /// Subtask `k` of the stream's stateful chain: reports operator state and rejected rows.
    Subtask(usize),
    /// What the stream writes — its lake writer, a sink, a source's raw- and errors-zone
    /// files: reports staged files.
    Writer,
}

impl std::fmt::Display for Participant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Reader(source) => write!(f, "reader of `{source}`"),
            Self::Subtask(k) => write!(f, "subtask {k}"),
            Self::Writer => f.write_str("writer"),
        }
    }
}

/// One report, as the coordinator receives it.
#[derive(Debug)]
pub(super) struct Report {
    pub(super) stream: Arc<str>,
    pub(super) participant: Participant,
    /// `None`: the participant's input ended; this is its last report.
    pub(super) epoch: Option<u64>,
    pub(super) payload: Payload,
}

/// A participant's way to report to the coordinator.
///
/// The order a participant must keep — take the barrier, snapshot, report, then forward the
/// barrier — is carried by the types: [`Self::on_barrier`] is the only way to an
/// [`EpochReport`], which must be used before anything else happens to the barrier, and it
/// ignores barriers of epochs that began before the participant registered (from an input
/// stream that was checkpointing before this one existed). [`Self::finish`] consumes the
/// handle: it is called once, when the input really ended (`Message::End`), never when it was
/// cut short.
#[derive(Debug, Clone)]
pub struct CheckpointHandle {
    pub(super) stream: Arc<str>,
    pub(super) participant: Participant,
    pub(super) first_epoch: u64,
    pub(super) reports: mpsc::UnboundedSender<Report>,
}

impl CheckpointHandle {
    /// The first epoch this participant takes part in.
    pub fn first_epoch(&self) -> u64 {
        self.first_epoch
    }

    /// Who this handle reports for.
    pub fn participant(&self) -> &Participant {
        &self.participant
    }

    /// A barrier reached this participant: the report it owes for its epoch, or `None` when
    /// the epoch began before the participant registered (the barrier is forwarded, nothing
    /// is reported, and what arrives until the next barrier belongs to the participant's
    /// first epoch).
    pub fn on_barrier(&self, barrier: Barrier) -> Option<EpochReport<'_>> {
        self.takes(barrier).then_some(EpochReport {
            handle: self,
            epoch: barrier.epoch,
            reported: false,
        })
    }

    /// Whether `barrier` is this participant's: its epoch began after the participant
    /// registered. (A participant that only forwards barriers, such as a merge aligning
    /// them for its subtasks, asks this; one that reports uses [`Self::on_barrier`].)
    pub fn takes(&self, barrier: Barrier) -> bool {
        barrier.epoch >= self.first_epoch
    }

    /// Reports the participant's final part: its input ended and it has handed on
    /// everything. It stands for the participant in every later epoch.
    pub fn finish(self, payload: Payload) {
        self.send(None, payload);
    }

    fn send(&self, epoch: Option<u64>, payload: Payload) {
        // The coordinator only goes away at shutdown; a report then is moot.
        let _ = self.reports.send(Report {
            stream: Arc::clone(&self.stream),
            participant: self.participant.clone(),
            epoch,
            payload,
        });
    }
}

/// The report a participant owes for the barrier it holds (see
/// [`CheckpointHandle::on_barrier`]): snapshot what the barrier covers, [`Self::report`] it,
/// and only then forward the barrier.
#[must_use = "a participant that took a barrier reports its part before forwarding it"]
#[derive(Debug)]
pub struct EpochReport<'a> {
    handle: &'a CheckpointHandle,
    epoch: u64,
    reported: bool,
}

impl EpochReport<'_> {
    /// The barrier's epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Reports the participant's part of the epoch.
    pub fn report(mut self, payload: Payload) {
        self.reported = true;
        self.handle.send(Some(self.epoch), payload);
    }
}

impl Drop for EpochReport<'_> {
    fn drop(&mut self) {
        if !self.reported && !std::thread::panicking() {
            // Only an error path gets here (the snapshot failed and the participant stops);
            // the epoch then times out instead of completing.
            tracing::warn!(
                stream = %self.handle.stream,
                participant = %self.handle.participant,
                epoch = self.epoch,
                "a participant took a barrier and did not report it"
            );
        }
    }
}

/// A source reader's side of checkpoints: it asks, between batches, whether a barrier is
/// due, and if so reports its position and sends the barrier after the rows it covers.
#[derive(Debug, Clone)]
pub struct ReaderCheckpoint {
    pub(super) handle: CheckpointHandle,
    /// A source that writes to the lake itself (its raw and errors zones) reports the files
    /// it staged through this.
    pub(super) files: Option<CheckpointHandle>,
    pub(super) requests: watch::Receiver<u64>,
    /// The last epoch committed.
    pub(super) completed: watch::Receiver<u64>,
    pub(super) next: u64,
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
        self.handle.send(Some(epoch), Payload::Position(position));
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
        self.handle.send(None, Payload::Position(position));
    }

    /// Reports the files the reader staged in `epoch` (call before [`Self::barrier`]); they
    /// become visible when the epoch commits. Only for a source registered with a writer.
    pub fn staged(&self, epoch: u64, files: Vec<StagedFile>) {
        if let Some(h) = &self.files {
            h.send(
                Some(epoch),
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

/// What a sink that delivers exactly once needs of the server's checkpoints: it takes part as
/// a writer (staging each epoch's rows in the lake) and delivers an epoch once it committed.
#[derive(Debug, Clone)]
pub struct SinkCheckpoint {
    /// The lake, where epochs' rows wait until delivered.
    pub store: Arc<dyn super::CheckpointStore>,
    /// Which epochs settled (to learn when its files are published); read-only: the sink
    /// never triggers a checkpoint (its final report does, as any writer's).
    pub commits: CommitWatch,
    /// The sink's participant handle (registered as a writer).
    pub handle: CheckpointHandle,
    /// Counts the rows delivered: an epoch's, once the destination has them.
    pub delivered: Arc<AtomicU64>,
}

/// Which epochs committed or were aborted, and whether checkpoints stopped for good — the
/// read-only view of the coordinator a participant that acts on commits needs
/// ([`super::Coordinator::commit_watch`]).
#[derive(Debug, Clone)]
pub struct CommitWatch {
    pub(super) settled: watch::Receiver<(u64, bool)>,
}

impl CommitWatch {
    /// Waits until epoch `epoch` or a later one committed or was aborted; `false` when
    /// checkpoints stopped for good first (shutdown, fenced).
    pub async fn wait_settled(&mut self, epoch: u64) -> bool {
        loop {
            let (last, stopped) = *self.settled.borrow_and_update();
            if last >= epoch {
                return true;
            }
            if stopped || self.settled.changed().await.is_err() {
                return false;
            }
        }
    }

    /// The last epoch that committed or was aborted.
    pub fn last_settled(&self) -> u64 {
        self.settled.borrow().0
    }
}
