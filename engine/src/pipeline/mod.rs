//! The task that runs one stream: its input branches, their operator chains, and the merge
//! of their outputs into the stream's [`FanOut`].
//!
//! ```text
//!  input 0 ─► OperatorChain ─┐
//!  input 1 ─► OperatorChain ─┼─► merge (watermark = min over live inputs) ─► post chain ─► FanOut
//!  …                         ┘
//! ```
//!
//! A stream that reads one table has one branch; `UNION ALL` of N selects has N. Every
//! branch's output has the stream's output schema (DataFusion's plan guarantees the column
//! types; the merge stamps the stream's field names on each batch).
//!
//! A stateful post chain can run as N parallel subtasks, each in its own task:
//!
//! ```text
//!  merge ─► HashRouter ─┬─► post chain 0 ─┐
//!  (rows by key,        ├─► post chain 1 ─┼─► merger (watermark = min over subtasks) ─► FanOut
//!   watermarks to all)  └─► …             ┘
//! ```
//!
//! A key's rows all go to one subtask, in order, so per-key order is kept end to end.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{Array, TimestampMicrosecondArray};
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::DEFAULT_CHANNEL_CAPACITY;
use crate::checkpoint::{CheckpointHandle, EpochReport, Payload};
use crate::error::{EngineError, Result};
use crate::fanout::{FanOut, Subscription};
use crate::message::{BadRecord, Message};
use crate::metrics::Metrics;
use crate::operator::{Collector, OperatorChain};
use crate::router::HashRouter;
use crate::time::EventTime;

mod builder;
mod merge;

pub use builder::{BranchSpec, ChainFactory, PipelineSpec, TaskWiring};
use merge::{Event, Merger};

/// One input of a stream and the operators its rows go through.
#[derive(Debug)]
pub struct Branch {
    /// Messages from the source or stream this branch reads.
    pub input: Subscription,
    /// The operators applied to them, in this task.
    pub chain: OperatorChain,
    /// After how long without any message the merge stops holding the watermark back for
    /// this input (until it delivers again); `None`: it always waits for it.
    pub idle_timeout: Option<std::time::Duration>,
    /// The first branch (by index) that reads the same messages as this one (a self-union),
    /// if this is not it. Such branches are read in
    /// lockstep, a message of each in turn, so what is late does not depend on which copy the
    /// scheduler happened to run ahead: a row meets the watermark that preceded it in its
    /// input, as with one input.
    pub same_input_as: Option<usize>,
}

/// The stateful stage of a stream (what runs after its branches merge): `parallelism`
/// copies of its chain, made by `chain`, and the router dividing rows among them by
/// `partition_keys` (none with one copy). With `restored` — per operator of the chain, the
/// parts every subtask of a checkpoint held — each copy takes the keys the router sends to
/// it, so state written at any parallelism resumes at this one ([`PipelineSpec::build`]
/// builds it).
fn stateful_stage(
    parallelism: usize,
    partition_keys: &[Arc<dyn datafusion::physical_expr::PhysicalExpr>],
    mut chain: impl FnMut() -> Result<OperatorChain>,
    restored: Option<&[Vec<crate::checkpoint::OperatorState>]>,
) -> Result<(Vec<OperatorChain>, Option<HashRouter>)> {
    let parallelism = parallelism.max(1);
    let mut post = (0..parallelism)
        .map(|_| chain())
        .collect::<Result<Vec<_>>>()?;
    let router = (parallelism > 1).then(|| HashRouter::new(partition_keys.to_vec(), parallelism));
    if let Some(parts) = restored {
        for (k, chain) in post.iter_mut().enumerate() {
            let keep = match &router {
                Some(r) => crate::checkpoint::KeyFilter::subtask(r.clone(), k),
                None => crate::checkpoint::KeyFilter::all(),
            };
            chain.restore(parts.to_vec(), &keep)?;
        }
    }
    Ok((post, router))
}

/// A running stream: merges its branches into `output`.
#[derive(Debug)]
pub struct StreamTask {
    /// The stream's name, for logs and errors-zone origins.
    pub name: String,
    /// Its inputs.
    pub branches: Vec<Branch>,
    /// Where its output goes (the lake writer and any stream reading this one subscribe).
    pub output: FanOut,
    /// The schema of every batch the branches produce (stamped on them at the merge).
    pub output_schema: SchemaRef,
    /// Operators after the merge: stateful ones (window aggregation, dedup), which must see
    /// the rows of every branch and the merged watermark, and what follows them. One chain
    /// per subtask: with more than one (and a `router`), each runs in its own task and gets
    /// the rows of its keys; watermarks and barriers go to all of them. Often one empty chain.
    pub post: Vec<OperatorChain>,
    /// Routes merged rows among the `post` chains by key, when there are several.
    pub router: Option<HashRouter>,
    /// Index of the output's event-time column, if it has one.
    pub event_time_column: Option<usize>,
    /// Its counters.
    pub metrics: Arc<Metrics>,
    /// Where rejected rows go.
    pub bad_records: mpsc::Sender<Vec<BadRecord>>,
    /// Cancelled when the stream is dropped or the server shuts down.
    pub cancel: CancellationToken,
    /// Checkpoints: one handle per `post` chain, through which its state is reported when a
    /// barrier passes (and once more when the input ends). Empty: the stream does not
    /// checkpoint, and barriers just pass through.
    pub checkpoints: Vec<CheckpointHandle>,
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Hands a stream's results and rejected rows on, counting them.
#[derive(Debug, Clone)]
struct Delivery {
    output: FanOut,
    metrics: Arc<Metrics>,
    event_time_column: Option<usize>,
    bad_records: mpsc::Sender<Vec<BadRecord>>,
    /// With checkpoints, rejected rows are held here until the barrier that covers them and
    /// reach the errors zone with its epoch (so a replay after a crash does not report them
    /// twice). One buffer per task.
    held: Option<Arc<std::sync::Mutex<Vec<BadRecord>>>>,
    /// Parallel stage: what the merging task rejected before each barrier (by epoch;
    /// `u64::MAX` for the end), reported by subtask 0 with its state.
    merged_rejects: Arc<std::sync::Mutex<BTreeMap<u64, Vec<BadRecord>>>>,
}

/// The key of [`Delivery::merged_rejects`] for the end of input.
const END_EPOCH: u64 = u64::MAX;

impl Delivery {
    /// Counts what the operators counted and rejected, and hands the rejected rows to the
    /// errors-zone writer.
    async fn rejected(&self, out: &mut Collector) {
        self.metrics.add_operator_counts(out.take_counts());
        let mut rejected = out.take_rejected();
        if !rejected.is_empty() {
            self.metrics.add_bad_records(rejected.len());
            if let Some(held) = &self.held {
                lock(held).append(&mut rejected);
                return;
            }
            // The errors-zone writer only goes away at shutdown; losing its channel then is
            // not an error of this stream.
            let _ = self.bad_records.send(rejected).await;
        }
    }

    /// The same, for another task: its own buffer of held rows.
    fn for_task(&self) -> Self {
        let mut d = self.clone();
        d.held = self.held.as_ref().map(|_| Arc::default());
        d
    }

    /// Takes the rows held so far (and, for `epoch`, those the merging task set aside).
    fn take_held(&self, with_merged: Option<u64>) -> Vec<BadRecord> {
        let mut rows = self
            .held
            .as_ref()
            .map(|h| std::mem::take(&mut *lock(h)))
            .unwrap_or_default();
        if let Some(epoch) = with_merged
            && let Some(mut merged) = lock(&self.merged_rejects).remove(&epoch)
        {
            merged.append(&mut rows);
            rows = merged;
        }
        rows
    }

    /// The merging task, at a barrier (or the end) of the parallel stage: its held rows go
    /// with subtask 0's report for that epoch.
    fn set_aside(&self, epoch: u64) {
        let rows = self.take_held(None);
        if self.held.is_some() {
            lock(&self.merged_rejects)
                .entry(epoch)
                .or_default()
                .extend(rows);
        }
    }

    /// Sends one result message downstream (`End` is the task's to send, once).
    async fn deliver(&self, m: Message) {
        match m {
            Message::Data(batch) => {
                self.metrics.add_rows_out(batch.num_rows());
                self.observe_event_time(&batch);
                self.output.send(Message::Data(batch)).await;
            }
            Message::End => {}
            other => {
                self.output.send(other).await;
            }
        }
    }

    fn observe_event_time(&self, batch: &RecordBatch) {
        let Some(col) = self.event_time_column else {
            return;
        };
        if let Some(ts) = batch
            .column(col)
            .as_any()
            .downcast_ref::<TimestampMicrosecondArray>()
            && let Some(max) = arrow::compute::max(ts)
        {
            self.metrics.observe_event_time(EventTime(max));
        }
    }
}

/// Where merged messages go: the one post chain, run in the merging task, or the inputs of
/// the parallel subtasks.
enum Stage {
    Inline(OperatorChain),
    Parallel {
        router: HashRouter,
        inputs: Vec<mpsc::Sender<Message>>,
    },
}

/// The merging half of a running [`StreamTask`].
struct Merge {
    branches: Vec<Branch>,
    output_schema: SchemaRef,
    delivery: Delivery,
    stage: Stage,
    cancel: CancellationToken,
    /// The inline chain's checkpoint handle.
    checkpoint: Option<CheckpointHandle>,
}

impl StreamTask {
    /// Runs until every input ends or the task is cancelled, then sends `End` downstream;
    /// when it fails, it aborts its output instead (see [`FanOut::abort`]).
    pub async fn run(self) -> Result<()> {
        let StreamTask {
            name,
            branches,
            output,
            output_schema,
            post,
            router,
            event_time_column,
            metrics,
            bad_records,
            cancel,
            checkpoints,
        } = self;
        let delivery = Delivery {
            output: output.clone(),
            metrics,
            event_time_column,
            bad_records,
            held: (!checkpoints.is_empty()).then(Arc::default),
            merged_rejects: Arc::default(),
        };
        let mut workers = vec![];
        let stage = match router {
            Some(router) if post.len() > 1 => {
                let (merged_tx, merged_rx): (Vec<_>, Vec<_>) = (0..post.len())
                    .map(|_| mpsc::channel(DEFAULT_CHANNEL_CAPACITY))
                    .unzip();
                let mut inputs = vec![];
                for (k, (chain, merged)) in post.into_iter().zip(merged_tx).enumerate() {
                    let (tx, rx) = mpsc::channel(DEFAULT_CHANNEL_CAPACITY);
                    inputs.push(tx);
                    workers.push(tokio::spawn(run_subtask(
                        chain,
                        rx,
                        merged,
                        delivery.for_task(),
                        k == 0,
                        checkpoints.get(k).cloned(),
                        cancel.clone(),
                    )));
                }
                workers.push(tokio::spawn(merge_subtasks(merged_rx, delivery.clone())));
                Stage::Parallel { router, inputs }
            }
            _ => Stage::Inline(post.into_iter().next().unwrap_or_default()),
        };
        let mut merge = Merge {
            branches,
            output_schema,
            delivery,
            stage,
            cancel,
            checkpoint: checkpoints.first().cloned(),
        };
        let result = merge.run().await;
        // Closing the subtasks' inputs ends them (after `End`, or at once when cancelled).
        drop(merge);
        let mut failed = None;
        for w in workers {
            let r = w.await.unwrap_or_else(|e| {
                Err(EngineError::Internal(format!(
                    "stream `{name}` subtask: {e}"
                )))
            });
            if let Err(e) = r {
                failed.get_or_insert(e);
            }
        }
        let result = match (result, failed) {
            // The merge only saw that a subtask stopped: the subtask's error says why.
            (Err(EngineError::Closed(_)), Some(e)) | (Ok(()), Some(e)) => Err(e),
            (result, _) => result,
        };
        match &result {
            Ok(()) => {
                output.send(Message::End).await;
            }
            // Readers downstream must not take a failure for the end of the stream.
            Err(e) => output.abort(e.to_string()),
        }
        result
    }
}

/// What a subtask owes the coordinator after a message.
enum Due<'a> {
    /// Its part of the barrier's epoch.
    Epoch(EpochReport<'a>),
    /// Its final part: the input ended.
    End(&'a CheckpointHandle),
}

/// Runs `msg` through `chain`; when it is a barrier (or the end of the input) and the
/// stream checkpoints, reports the chain's state for it.
async fn process_and_snapshot(
    chain: &mut OperatorChain,
    msg: Message,
    out: &mut Collector,
    delivery: &Delivery,
    checkpoint: Option<&CheckpointHandle>,
    cancel: &CancellationToken,
    with_merged: bool,
) -> Result<()> {
    let report = match (&msg, checkpoint) {
        (Message::Barrier(b), Some(h)) => h.on_barrier(*b).map(Due::Epoch),
        // Only a real end of input is final; a stop (cancel) leaves the last checkpoint be.
        (Message::End, Some(h)) if !cancel.is_cancelled() => Some(Due::End(h)),
        _ => None,
    };
    chain.process(msg, out)?;
    delivery.rejected(out).await;
    if let Some(due) = report {
        let merged = with_merged.then_some(match &due {
            Due::Epoch(r) => r.epoch(),
            Due::End(_) => END_EPOCH,
        });
        let state = Payload::State {
            operators: chain.snapshot()?,
            rejected: delivery.take_held(merged),
            counters: delivery.metrics.counters(),
        };
        match due {
            Due::Epoch(r) => r.report(state),
            Due::End(h) => h.clone().finish(state),
        }
    }
    Ok(())
}

/// One parallel subtask: its post chain over the rows routed to it.
async fn run_subtask(
    mut chain: OperatorChain,
    mut input: mpsc::Receiver<Message>,
    merged: mpsc::Sender<Message>,
    delivery: Delivery,
    first: bool,
    checkpoint: Option<CheckpointHandle>,
    cancel: CancellationToken,
) -> Result<()> {
    while let Some(msg) = input.recv().await {
        let end = matches!(msg, Message::End);
        let mut out = Collector::default();
        process_and_snapshot(
            &mut chain,
            msg,
            &mut out,
            &delivery,
            checkpoint.as_ref(),
            &cancel,
            first,
        )
        .await?;
        for m in out.take_messages() {
            if merged.send(m).await.is_err() {
                return Ok(()); // the merger is gone: the stream is shutting down
            }
        }
        if end {
            break;
        }
    }
    Ok(())
}

/// Merges the subtasks' outputs: rows as they come, the minimum watermark, barriers once
/// every subtask passed them ([`Merger`]). A subtask's closed channel counts as its end (its
/// error, if it failed, is reported when it is joined).
async fn merge_subtasks(
    mut inputs: Vec<mpsc::Receiver<Message>>,
    delivery: Delivery,
) -> Result<()> {
    let mut merger = Merger::independent(inputs.len());
    loop {
        let event = merger
            .next(&delivery.metrics, |i, cx| inputs[i].poll_recv(cx))
            .await;
        let (i, msg) = match event {
            Event::Ended => return Ok(()),
            Event::Closed(i) => (i, Message::End),
            Event::Message(i, m) => (i, m),
            Event::Watermark(wm) => {
                delivery.deliver(Message::Watermark(wm)).await;
                continue;
            }
        };
        match msg {
            Message::Data(_) => delivery.deliver(msg).await,
            Message::Watermark(t) => {
                if let Some(wm) = merger.watermark(i, t, &delivery.metrics) {
                    delivery.deliver(Message::Watermark(wm)).await;
                }
            }
            Message::Barrier(b) => {
                if let Some(b) = merger.barrier(i, b) {
                    delivery.deliver(Message::Barrier(b)).await;
                }
            }
            Message::End => {
                // Every subtask delivers the same barriers: one pending when the last ends
                // was delivered by all the others.
                let (wm, barrier) = merger.end(i, &delivery.metrics, true);
                if let Some(wm) = wm {
                    delivery.deliver(Message::Watermark(wm)).await;
                }
                if let Some(b) = barrier {
                    delivery.deliver(Message::Barrier(b)).await;
                }
            }
        }
    }
}

impl Merge {
    async fn run(&mut self) -> Result<()> {
        let mut merger = Merger::new(
            Merger::leaders(self.branches.iter().map(|b| b.same_input_as)),
            self.branches.iter().map(|b| b.idle_timeout).collect(),
        );
        let cancel = self.cancel.clone();
        let metrics = Arc::clone(&self.delivery.metrics);
        loop {
            let branches = &mut self.branches;
            let event = tokio::select! {
                biased;
                _ = cancel.cancelled() => return Ok(()),
                e = merger.next(&metrics, |i, cx| branches[i].input.poll_recv(cx)) => e,
            };
            let (i, msg) = match event {
                // Every branch ended.
                Event::Ended => return self.post_and_deliver(Message::End).await,
                Event::Closed(i) => {
                    // Cut short by a failure upstream: what the stream holds is not complete.
                    return Err(EngineError::Closed(format!(
                        "input {} of the stream failed before its end",
                        i + 1
                    )));
                }
                Event::Watermark(wm) => {
                    self.post_and_deliver(Message::Watermark(wm)).await?;
                    continue;
                }
                Event::Message(i, m) => (i, m),
            };
            if let Message::Data(b) = &msg {
                metrics.add_rows_in(b.num_rows());
            }
            let mut out = Collector::default();
            self.branches[i].chain.process(msg, &mut out)?;
            self.delivery.rejected(&mut out).await;
            for m in out.take_messages() {
                match m {
                    Message::Data(batch) => {
                        let batch = self.stamp_schema(batch)?;
                        self.post_and_deliver(Message::Data(batch)).await?;
                    }
                    Message::Watermark(t) => {
                        if let Some(wm) = merger.watermark(i, t, &metrics) {
                            self.post_and_deliver(Message::Watermark(wm)).await?;
                        }
                    }
                    Message::Barrier(b) => {
                        // A stream that does not checkpoint, or a barrier of an epoch from
                        // before this stream existed (from an input stream): not ours.
                        if !self.checkpoint.as_ref().is_some_and(|h| h.takes(b)) {
                            continue;
                        }
                        if let Some(b) = merger.barrier(i, b) {
                            self.post_and_deliver(Message::Barrier(b)).await?;
                        }
                    }
                    Message::End => {
                        // When every branch ended, `End` follows: the final state covers
                        // a barrier still being aligned.
                        let (wm, barrier) = merger.end(i, &metrics, false);
                        if let Some(wm) = wm {
                            self.post_and_deliver(Message::Watermark(wm)).await?;
                        }
                        if let Some(b) = barrier {
                            self.post_and_deliver(Message::Barrier(b)).await?;
                        }
                    }
                }
            }
            if merger.all_ended() {
                // Every input ended: stateful operators flush.
                return self.post_and_deliver(Message::End).await;
            }
        }
    }

    fn stamp_schema(&self, batch: RecordBatch) -> Result<RecordBatch> {
        if Arc::ptr_eq(&batch.schema(), &self.output_schema)
            || batch.schema().fields() == self.output_schema.fields()
        {
            return Ok(batch);
        }
        Ok(RecordBatch::try_new(
            Arc::clone(&self.output_schema),
            batch.columns().to_vec(),
        )?)
    }

    /// Runs `msg` through the post-merge stage and delivers what comes out.
    async fn post_and_deliver(&mut self, msg: Message) -> Result<()> {
        match &mut self.stage {
            Stage::Inline(chain) => {
                let mut out = Collector::default();
                process_and_snapshot(
                    chain,
                    msg,
                    &mut out,
                    &self.delivery,
                    self.checkpoint.as_ref(),
                    &self.cancel,
                    false,
                )
                .await?;
                for m in out.take_messages() {
                    self.delivery.deliver(m).await;
                }
            }
            Stage::Parallel { router, inputs } => {
                match &msg {
                    Message::Barrier(b) => self.delivery.set_aside(b.epoch),
                    Message::End => self.delivery.set_aside(END_EPOCH),
                    _ => {}
                }
                let sent = match msg {
                    Message::Data(batch) => {
                        let mut ok = true;
                        for (part, tx) in router.split(&batch)?.into_iter().zip(inputs.iter()) {
                            if let Some(part) = part {
                                ok &= tx.send(Message::Data(part)).await.is_ok();
                            }
                        }
                        ok
                    }
                    other => {
                        let mut ok = true;
                        for tx in inputs.iter() {
                            ok &= tx.send(other.clone()).await.is_ok();
                        }
                        ok
                    }
                };
                if !sent {
                    // A subtask stopped early: its error is reported when it is joined.
                    return Err(EngineError::Closed("a subtask of the stream".into()));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    /// A task merging `branches` (no stateful chain) into `out`.
    fn merging(name: &str, branches: Vec<Branch>, out: &FanOut, schema: SchemaRef) -> StreamTask {
        let (bad_tx, mut bad_rx) = mpsc::channel(4);
        tokio::spawn(async move { while bad_rx.recv().await.is_some() {} });
        StreamTask {
            name: name.into(),
            branches,
            output: out.clone(),
            output_schema: schema,
            post: vec![OperatorChain::default()],
            router: None,
            event_time_column: None,
            metrics: Arc::default(),
            bad_records: bad_tx,
            cancel: CancellationToken::new(),
            checkpoints: vec![],
        }
    }

    /// A branch reading `input` as is.
    fn branch(input: &FanOut) -> Branch {
        Branch {
            input: input.subscribe(8),
            chain: OperatorChain::default(),
            idle_timeout: None,
            same_input_as: None,
        }
    }

    fn batch(name: &str, v: Vec<i64>) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new(name, DataType::Int64, false)]));
        RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(v))]).unwrap()
    }

    #[tokio::test]
    async fn union_merges_rows_and_takes_the_minimum_watermark() {
        let a = FanOut::new("a");
        let b = FanOut::new("b");
        let out = FanOut::new("out");
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]));
        let task = merging("u", vec![branch(&a), branch(&b)], &out, Arc::clone(&schema));
        let mut rx = out.subscribe(64);
        let handle = tokio::spawn(task.run());
        a.send(Message::Data(batch("a", vec![1, 2]))).await;
        a.send(Message::Watermark(EventTime(10))).await;
        b.send(Message::Data(batch("b", vec![3]))).await;
        b.send(Message::Watermark(EventTime(5))).await;
        a.send(Message::End).await;
        b.send(Message::Watermark(EventTime(20))).await;
        b.send(Message::End).await;
        handle.await.unwrap().unwrap();

        let mut rows = 0;
        let mut wms = vec![];
        while let Some(m) = rx.recv().await {
            match m {
                Message::Data(d) => {
                    assert_eq!(d.schema(), schema, "batches carry the stream's schema");
                    rows += d.num_rows();
                }
                Message::Watermark(t) => wms.push(t.0),
                Message::End => break,
                Message::Barrier(_) => unreachable!(),
            }
        }
        assert_eq!(rows, 3);
        // 5 = min(10, 5); after `a` ended only `b` counts: 20.
        assert_eq!(wms, vec![5, 20]);
    }

    #[tokio::test]
    async fn parallel_subtasks_keep_every_row_and_per_key_order() {
        let input = FanOut::new("in");
        let out = FanOut::new("out");
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, false),
            Field::new("seq", DataType::Int64, false),
        ]));
        let (bad_tx, _bad_rx) = mpsc::channel(4);
        let key = datafusion::physical_expr::expressions::col("k", &schema).unwrap();
        let task = StreamTask {
            name: "p".into(),
            branches: vec![Branch {
                input: input.subscribe(8),
                chain: OperatorChain::default(),
                idle_timeout: None,
                same_input_as: None,
            }],
            output: out.clone(),
            output_schema: Arc::clone(&schema),
            post: (0..3).map(|_| OperatorChain::default()).collect(),
            router: Some(HashRouter::new(vec![key], 3)),
            event_time_column: None,
            metrics: Arc::default(),
            bad_records: bad_tx,
            cancel: CancellationToken::new(),
            checkpoints: vec![],
        };
        let mut rx = out.subscribe(256);
        let handle = tokio::spawn(task.run());
        for b in 0..20i64 {
            let batch = RecordBatch::try_new(
                Arc::clone(&schema),
                vec![
                    Arc::new(Int64Array::from_iter_values((0..50).map(|i| i % 7))),
                    Arc::new(Int64Array::from_iter_values((0..50).map(|i| b * 50 + i))),
                ],
            )
            .unwrap();
            input.send(Message::Data(batch)).await;
            input.send(Message::Watermark(EventTime(b))).await;
        }
        input.send(Message::End).await;
        handle.await.unwrap().unwrap();

        let mut last_seq = std::collections::HashMap::new();
        let (mut rows, mut wms, mut ends) = (0, vec![], 0);
        while let Some(m) = rx.recv().await {
            match m {
                Message::Data(d) => {
                    let k = d.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
                    let seq = d.column(1).as_any().downcast_ref::<Int64Array>().unwrap();
                    for i in 0..d.num_rows() {
                        let prev = last_seq.insert(k.value(i), seq.value(i));
                        assert!(prev < Some(seq.value(i)), "key {} out of order", k.value(i));
                    }
                    rows += d.num_rows();
                }
                Message::Watermark(t) => wms.push(t.0),
                Message::End => {
                    ends += 1;
                    break;
                }
                Message::Barrier(_) => unreachable!(),
            }
        }
        assert_eq!(rows, 1000);
        assert_eq!(ends, 1);
        assert!(
            wms.windows(2).all(|w| w[0] < w[1]),
            "watermarks advance: {wms:?}"
        );
        assert_eq!(wms.last(), Some(&19));
    }

    #[tokio::test]
    async fn copies_of_one_input_are_read_in_lockstep_whichever_arrives_first() {
        // Two branches reading the same messages (here two hubs, so that one copy can be
        // sent well before the other): the merge takes a message of each in turn.
        let (a, b, out) = (FanOut::new("a"), FanOut::new("b"), FanOut::new("out"));
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]));
        let copy = |input: &FanOut, same_input_as| Branch {
            same_input_as,
            ..branch(input)
        };
        let task = merging(
            "copies",
            vec![copy(&a, None), copy(&b, Some(0))],
            &out,
            schema,
        );
        let mut rx = out.subscribe(64);
        let handle = tokio::spawn(task.run());
        for (hub, first) in [(&a, 10), (&b, 11)] {
            hub.send(Message::Data(batch("x", vec![first]))).await;
            hub.send(Message::Watermark(EventTime(100))).await;
            hub.send(Message::Data(batch("x", vec![first + 10]))).await;
            hub.send(Message::End).await;
            // The first copy is all there before the second starts.
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        handle.await.unwrap().unwrap();
        let mut seen = vec![];
        while let Some(m) = rx.recv().await {
            match m {
                Message::Data(d) => seen.push(
                    d.column(0)
                        .as_any()
                        .downcast_ref::<Int64Array>()
                        .unwrap()
                        .value(0)
                        .to_string(),
                ),
                Message::Watermark(t) => seen.push(format!("wm {}", t.0)),
                Message::End => break,
                Message::Barrier(_) => unreachable!(),
            }
        }
        // Not 10, 20, 11, 21: the second row of `a` waits for `b` to reach the watermark
        // that preceded it.
        assert_eq!(seen, ["10", "11", "wm 100", "20", "21"]);
    }

    #[tokio::test]
    async fn an_idle_input_stops_holding_the_watermark_back_until_it_delivers_again() {
        let a = FanOut::new("a");
        let b = FanOut::new("b");
        let out = FanOut::new("out");
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]));
        let quiet_after = |input: &FanOut, idle_timeout| Branch {
            idle_timeout,
            ..branch(input)
        };
        let task = merging(
            "idle",
            vec![
                quiet_after(&a, None),
                quiet_after(&b, Some(std::time::Duration::from_millis(50))),
            ],
            &out,
            schema,
        );
        let mut rx = out.subscribe(64);
        let handle = tokio::spawn(task.run());
        async fn next_wm(rx: &mut Subscription) -> Result<i64, tokio::time::error::Elapsed> {
            let fut = async {
                loop {
                    match rx.recv().await {
                        Some(Message::Watermark(t)) => return t.0,
                        Some(_) => {}
                        None => panic!("ended"),
                    }
                }
            };
            tokio::time::timeout(std::time::Duration::from_secs(5), fut).await
        }
        // `b` says nothing: after its idle timeout the watermark follows `a` alone.
        a.send(Message::Watermark(EventTime(10))).await;
        assert_eq!(next_wm(&mut rx).await.unwrap(), 10);
        // `b` delivers again and counts again: the minimum is its 15 (10 → 15, not 20).
        b.send(Message::Watermark(EventTime(15))).await;
        a.send(Message::Watermark(EventTime(20))).await;
        assert_eq!(next_wm(&mut rx).await.unwrap(), 15);
        a.send(Message::End).await;
        b.send(Message::End).await;
        handle.await.unwrap().unwrap();
    }
}
