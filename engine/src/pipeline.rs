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

use std::collections::BTreeMap;
use std::sync::Arc;
use std::task::Poll;

use arrow::array::{Array, TimestampMicrosecondArray};
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::error::Result;
use crate::fanout::{FanOut, Subscription};
use crate::message::{BadRecord, Message};
use crate::metrics::Metrics;
use crate::operator::{Collector, OperatorChain};
use crate::time::EventTime;

/// One input of a stream and the operators its rows go through.
#[derive(Debug)]
pub struct Branch {
    /// Messages from the source or stream this branch reads.
    pub input: Subscription,
    /// The operators applied to them, in this task.
    pub chain: OperatorChain,
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
    /// Operators after the merge: stateful ones (window aggregation), which must see the rows
    /// of every branch and the merged watermark. Often empty.
    pub post: OperatorChain,
    /// Index of the output's event-time column, if it has one.
    pub event_time_column: Option<usize>,
    /// Its counters.
    pub metrics: Arc<Metrics>,
    /// Where rejected rows go.
    pub bad_records: mpsc::Sender<Vec<BadRecord>>,
    /// Cancelled when the stream is dropped or the server shuts down.
    pub cancel: CancellationToken,
}

impl StreamTask {
    /// Runs until every input ends or the task is cancelled; always finishes by sending
    /// `End` downstream.
    pub async fn run(mut self) -> Result<()> {
        let result = self.run_inner().await;
        self.output.send(Message::End).await;
        result
    }

    async fn run_inner(&mut self) -> Result<()> {
        let n = self.branches.len();
        let mut watermarks = vec![EventTime::MIN; n];
        let mut ended = vec![false; n];
        let mut emitted_wm = EventTime::MIN;
        let mut barriers: BTreeMap<u64, usize> = BTreeMap::new();
        let mut next_poll = 0usize;
        let cancel = self.cancel.clone();
        loop {
            let received = tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                r = next_message(&mut self.branches, &ended, &mut next_poll) => r,
            };
            let Some((i, msg)) = received else {
                return self.post_and_deliver(Message::End).await; // every branch ended
            };
            let msg = msg.unwrap_or(Message::End);
            if let Message::Data(b) = &msg {
                self.metrics.add_rows_in(b.num_rows());
            }
            let mut out = Collector::default();
            self.branches[i].chain.process(msg, &mut out)?;
            self.forward_rejected(&mut out).await;
            for m in out.take_messages() {
                match m {
                    Message::Data(batch) => {
                        let batch = self.stamp_schema(batch)?;
                        self.post_and_deliver(Message::Data(batch)).await?;
                    }
                    Message::Watermark(t) => {
                        watermarks[i] = watermarks[i].max(t);
                        if let Some(wm) =
                            advance_watermark(&self.metrics, &watermarks, &ended, &mut emitted_wm)
                        {
                            self.post_and_deliver(Message::Watermark(wm)).await?;
                        }
                    }
                    Message::Barrier(b) => {
                        // Forward a barrier once every live branch has delivered it.
                        // (Aligned checkpoints, which also hold back the faster inputs,
                        // come with the checkpoint coordinator.)
                        let seen = barriers.entry(b.epoch).or_default();
                        *seen += 1;
                        if *seen >= ended.iter().filter(|e| !**e).count() {
                            barriers.remove(&b.epoch);
                            self.post_and_deliver(Message::Barrier(b)).await?;
                        }
                    }
                    Message::End => {
                        ended[i] = true;
                        if let Some(wm) =
                            advance_watermark(&self.metrics, &watermarks, &ended, &mut emitted_wm)
                        {
                            self.post_and_deliver(Message::Watermark(wm)).await?;
                        }
                    }
                }
            }
            if ended.iter().all(|e| *e) {
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

    /// Counts the rows an operator rejected and hands them to the errors-zone writer.
    async fn forward_rejected(&mut self, out: &mut Collector) {
        self.metrics.add_operator_counts(out.take_counts());
        let rejected = out.take_rejected();
        if !rejected.is_empty() {
            self.metrics.add_bad_records(rejected.len());
            // The errors-zone writer only goes away at shutdown; losing its channel then is
            // not an error of this stream.
            let _ = self.bad_records.send(rejected).await;
        }
    }

    /// Runs `msg` through the post-merge chain and delivers what comes out.
    async fn post_and_deliver(&mut self, msg: Message) -> Result<()> {
        let mut out = Collector::default();
        self.post.process(msg, &mut out)?;
        self.forward_rejected(&mut out).await;
        for m in out.take_messages() {
            match m {
                Message::Data(batch) => {
                    self.metrics.add_rows_out(batch.num_rows());
                    self.observe_event_time(&batch);
                    self.output.send(Message::Data(batch)).await;
                }
                // `run` sends the one `End`.
                Message::End => {}
                other => {
                    self.output.send(other).await;
                }
            }
        }
        Ok(())
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

/// The minimum watermark over the live branches, if it advanced.
fn advance_watermark(
    metrics: &Metrics,
    watermarks: &[EventTime],
    ended: &[bool],
    emitted: &mut EventTime,
) -> Option<EventTime> {
    let live_min = watermarks
        .iter()
        .zip(ended)
        .filter(|(_, e)| !**e)
        .map(|(w, _)| *w)
        .min();
    match live_min {
        Some(wm) if wm > *emitted => {
            *emitted = wm;
            metrics.observe_watermark(wm);
            Some(wm)
        }
        _ => None,
    }
}

/// Receives the next message from any live branch, polling branches round-robin so that no
/// input starves the others. `None` when every branch has ended.
async fn next_message(
    branches: &mut [Branch],
    ended: &[bool],
    next_poll: &mut usize,
) -> Option<(usize, Option<Message>)> {
    let n = branches.len();
    if ended.iter().all(|e| *e) {
        return None;
    }
    std::future::poll_fn(|cx| {
        for k in 0..n {
            let i = (*next_poll + k) % n;
            if ended[i] {
                continue;
            }
            if let Poll::Ready(m) = branches[i].input.poll_recv(cx) {
                *next_poll = (i + 1) % n;
                return Poll::Ready(Some((i, m)));
            }
        }
        Poll::Pending
    })
    .await
}

#[cfg(test)]
mod tests {
    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;

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
        let (bad_tx, _bad_rx) = mpsc::channel(4);
        let task = StreamTask {
            name: "u".into(),
            branches: vec![
                Branch {
                    input: a.subscribe(8),
                    chain: OperatorChain::default(),
                },
                Branch {
                    input: b.subscribe(8),
                    chain: OperatorChain::default(),
                },
            ],
            output: out.clone(),
            output_schema: Arc::clone(&schema),
            post: OperatorChain::default(),
            event_time_column: None,
            metrics: Arc::default(),
            bad_records: bad_tx,
            cancel: CancellationToken::new(),
        };
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
}
