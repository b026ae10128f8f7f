//! The [`Operator`] trait and the [`OperatorChain`] that runs operators in one task.

use arrow::record_batch::RecordBatch;

use crate::checkpoint::{KeyFilter, OperatorState};
use crate::error::{EngineError, Result};
use crate::message::{BadRecord, Barrier, Message};
use crate::time::EventTime;

/// Rows an operator accounted for without emitting them or sending them to the errors zone
/// under their own name: reported in `SHOW STREAMS` and the metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct OperatorCounts {
    /// Rows that arrived behind the watermark (whether rejected or dropped).
    pub late: u64,
    /// Rows a dedup dropped because their key was seen before.
    pub duplicates: u64,
    /// The change in rows the operator holds in its state, per input side: a join's stored
    /// rows of its left and right sides.
    pub state_rows: [i64; 2],
}

impl std::ops::AddAssign for OperatorCounts {
    fn add_assign(&mut self, other: Self) {
        self.late += other.late;
        self.duplicates += other.duplicates;
        self.state_rows[0] += other.state_rows[0];
        self.state_rows[1] += other.state_rows[1];
    }
}

/// Where an operator puts what it emits while handling one message.
#[derive(Debug, Default)]
pub struct Collector {
    out: Vec<Message>,
    bad: Vec<BadRecord>,
    counts: OperatorCounts,
}

impl Collector {
    /// Emits a batch downstream; empty batches are dropped.
    pub fn emit(&mut self, batch: RecordBatch) {
        if batch.num_rows() > 0 {
            self.out.push(Message::Data(batch));
        }
    }

    /// Emits a watermark downstream.
    pub fn emit_watermark(&mut self, t: EventTime) {
        self.out.push(Message::Watermark(t));
    }

    /// Emits a barrier downstream.
    pub fn emit_barrier(&mut self, b: Barrier) {
        self.out.push(Message::Barrier(b));
    }

    /// Sends a record to the errors zone.
    pub fn reject(&mut self, record: BadRecord) {
        self.bad.push(record);
    }

    /// Counts `n` rows that arrived behind the watermark.
    pub fn count_late(&mut self, n: u64) {
        self.counts.late += n;
    }

    /// Notes that the operator's state grew (or, negative, shrank) by `n` rows of input
    /// `side` (0: left, 1: right).
    pub fn add_state_rows(&mut self, side: usize, n: i64) {
        self.counts.state_rows[side] += n;
    }

    /// Notes changes in state rows of both sides at once (see [`Collector::add_state_rows`]).
    pub fn add_state_rows_by_side(&mut self, rows: [i64; 2]) {
        self.counts.state_rows[0] += rows[0];
        self.counts.state_rows[1] += rows[1];
    }

    /// Counts `n` rows dropped as duplicates.
    pub fn count_duplicates(&mut self, n: u64) {
        self.counts.duplicates += n;
    }

    /// Takes the counts accumulated so far.
    pub fn take_counts(&mut self) -> OperatorCounts {
        std::mem::take(&mut self.counts)
    }

    /// Takes what was emitted downstream.
    pub fn take_messages(&mut self) -> Vec<Message> {
        std::mem::take(&mut self.out)
    }

    /// Takes what was rejected.
    pub fn take_rejected(&mut self) -> Vec<BadRecord> {
        std::mem::take(&mut self.bad)
    }
}

/// A synchronous, batch-at-a-time transformation.
///
/// The hooks are called from one task, one at a time, in the order the messages arrive on
/// the operator's input; none of them may block on I/O. Each hook may emit any number of
/// messages through the [`Collector`]; they are delivered downstream in emission order,
/// before anything emitted for the next input message.
///
/// Returning an error fails the whole pipeline: rows that merely cannot be processed
/// (a cast that fails on one row, say) are rejected through [`Collector::reject`] instead.
pub trait Operator: Send {
    /// A short name for logs and `EXPLAIN`, e.g. `filter`.
    fn name(&self) -> &str;

    /// Called for each batch of rows.
    fn process_batch(&mut self, batch: RecordBatch, out: &mut Collector) -> Result<()>;

    /// Called when event time on the input advances to `t`. The default forwards it.
    fn on_watermark(&mut self, t: EventTime, out: &mut Collector) -> Result<()> {
        out.emit_watermark(t);
        Ok(())
    }

    /// Called when a checkpoint barrier passes. Stateful operators snapshot their state here,
    /// before the barrier is forwarded. The default forwards it.
    fn on_barrier(&mut self, barrier: Barrier, out: &mut Collector) -> Result<()> {
        out.emit_barrier(barrier);
        Ok(())
    }

    /// Called once when the input ends, before `End` is forwarded. Operators that hold rows
    /// emit them here.
    fn on_close(&mut self, _out: &mut Collector) -> Result<()> {
        Ok(())
    }

    /// Whether the operator can take part in checkpoints ([`Operator::snapshot`] and
    /// [`Operator::restore`] cover all its state). Stateless operators can.
    fn checkpointable(&self) -> bool {
        true
    }

    /// A copy of the operator's state, taken when a checkpoint barrier passes it (the
    /// operator keeps running on its own), with the operator's state version. `None`: it has
    /// no state. Every operator says which (no default: a stateful operator that forgot
    /// would lose its state at every restart).
    fn snapshot(&mut self) -> Result<Option<OperatorState>>;

    /// Restores the state of a checkpoint: `parts` are the snapshots of every subtask that
    /// ran the operator then (several when the parallelism was another); the operator takes
    /// the keys `keep` says are its own. Called before any message.
    fn restore(&mut self, parts: Vec<OperatorState>, _keep: &KeyFilter) -> Result<()> {
        if parts.is_empty() {
            return Ok(());
        }
        Err(EngineError::Checkpoint(format!(
            "operator `{}` has no state to restore, but the checkpoint holds some",
            self.name()
        )))
    }
}

/// Several operators run back to back in one task, as Flink chains operators: the output of
/// each is the input of the next, with no channel in between.
#[derive(Default)]
pub struct OperatorChain {
    operators: Vec<Box<dyn Operator>>,
}

impl std::fmt::Debug for OperatorChain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.operators.iter().map(|o| o.name()))
            .finish()
    }
}

impl OperatorChain {
    /// A chain of the given operators, first to last.
    pub fn new(operators: Vec<Box<dyn Operator>>) -> Self {
        Self { operators }
    }

    /// Appends an operator at the end of the chain.
    pub fn push(&mut self, op: Box<dyn Operator>) {
        self.operators.push(op);
    }

    /// The names of the operators, first to last.
    pub fn names(&self) -> Vec<&str> {
        self.operators.iter().map(|o| o.name()).collect()
    }

    /// Whether every operator can take part in checkpoints.
    pub fn checkpointable(&self) -> bool {
        self.operators.iter().all(|o| o.checkpointable())
    }

    /// A copy of every operator's state, first to last.
    pub fn snapshot(&mut self) -> Result<Vec<Option<OperatorState>>> {
        self.operators
            .iter_mut()
            .map(|o| {
                let mut s = o.snapshot()?;
                if let Some(s) = &mut s {
                    s.operator = o.name().to_string();
                }
                Ok(s)
            })
            .collect()
    }

    /// Restores every operator: `parts[i]` holds the snapshots of operator `i` from every
    /// subtask of the checkpoint.
    pub fn restore(&mut self, parts: Vec<Vec<OperatorState>>, keep: &KeyFilter) -> Result<()> {
        if parts.len() > self.operators.len()
            && parts[self.operators.len()..].iter().any(|p| !p.is_empty())
        {
            return Err(EngineError::Checkpoint(format!(
                "the checkpoint holds state for {} operators, the stream has {}",
                parts.len(),
                self.operators.len()
            )));
        }
        for (op, parts) in self.operators.iter_mut().zip(parts) {
            if let Some(p) = parts.iter().find(|p| p.operator != op.name()) {
                return Err(EngineError::Checkpoint(format!(
                    "the checkpoint holds state of a `{}` where the stream has a `{}`",
                    p.operator,
                    op.name()
                )));
            }
            op.restore(parts, keep)?;
        }
        Ok(())
    }

    /// Runs one input message through every operator; what the last one emits lands in
    /// `out`, together with every rejected record of the whole chain.
    pub fn process(&mut self, msg: Message, out: &mut Collector) -> Result<()> {
        let mut current = vec![msg];
        for op in &mut self.operators {
            let mut next = Collector::default();
            for m in current.drain(..) {
                match m {
                    Message::Data(batch) => op.process_batch(batch, &mut next)?,
                    Message::Watermark(t) => op.on_watermark(t, &mut next)?,
                    Message::Barrier(b) => op.on_barrier(b, &mut next)?,
                    Message::End => {
                        op.on_close(&mut next)?;
                        next.out.push(Message::End);
                    }
                }
            }
            out.bad.append(&mut next.bad);
            out.counts += next.counts;
            current = next.out;
        }
        out.out.append(&mut current);
        Ok(())
    }
}
