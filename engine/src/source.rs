//! The [`SourceReader`] trait that connectors implement, and the event-time helper
//! [`WatermarkTracker`] they share.

use std::sync::Arc;

use arrow::array::{Array, TimestampMicrosecondArray};
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::error::{EngineError, Result};
use crate::fanout::FanOut;
use crate::message::{BadRecord, Message};
use crate::metrics::Metrics;
use crate::time::EventTime;

/// What a running source reader is given.
#[derive(Debug, Clone)]
pub struct SourceContext {
    /// Where its rows and watermarks go.
    pub output: FanOut,
    /// Its counters.
    pub metrics: Arc<Metrics>,
    /// Where records that fail to decode or validate go (the errors zone writer).
    pub bad_records: mpsc::Sender<Vec<BadRecord>>,
    /// Cancelled when the source is dropped or the server shuts down.
    pub cancel: CancellationToken,
    /// Event-time tracking for the declared `WATERMARK FOR` column, if any.
    pub watermark: Option<WatermarkSpec>,
    /// The reader's part in checkpoints, when the stream reading it checkpoints (only
    /// readers whose [`SourceReader::checkpointable`] is true get one).
    pub checkpoint: Option<crate::checkpoint::ReaderCheckpoint>,
}

/// A declared `WATERMARK FOR column AS column - INTERVAL 'delay'`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatermarkSpec {
    /// The event-time column (a `Timestamp(Microsecond, UTC)` column of the source).
    pub column: String,
    /// How far the watermark trails the largest event time seen, in microseconds.
    pub delay_micros: i64,
    /// After how long without data a stream stops waiting for this input when it merges
    /// watermarks (the source's `idle_timeout` option); `None`: always wait.
    pub idle_timeout: Option<std::time::Duration>,
}

/// A connector's reading side: pulls records from outside and pushes batches into
/// [`SourceContext::output`].
///
/// `run` returns when the input is exhausted (bounded sources) or when
/// [`SourceContext::cancel`] fires; the caller then sends [`Message::End`]. An error fails
/// the source; records that merely fail to decode must go to `bad_records` instead.
#[async_trait]
pub trait SourceReader: Send {
    /// Reads until the input ends or the context is cancelled.
    ///
    /// With [`SourceContext::checkpoint`], the reader checks between batches whether a
    /// barrier is due ([`crate::checkpoint::ReaderCheckpoint::due`], or `requested` while
    /// waiting for input) and then sends it with its position; when its input is exhausted
    /// it reports its final position.
    async fn run(self: Box<Self>, ctx: SourceContext) -> Result<()>;

    /// Whether the reader can report positions and resume from them.
    fn checkpointable(&self) -> bool {
        false
    }

    /// Resumes after `position` (what it reported at a checkpoint), instead of at its start
    /// option. Called before [`SourceReader::run`].
    fn restore(&mut self, position: &serde_json::Value) -> Result<()> {
        Err(EngineError::Checkpoint(format!(
            "this reader cannot resume from position {position}"
        )))
    }
}

/// Tracks the largest event time a source split has seen and derives its watermark
/// (bounded out-of-orderness, as Flink's `WATERMARK FOR ts AS ts - INTERVAL …`).
#[derive(Debug, Clone)]
pub struct WatermarkTracker {
    column: usize,
    delay_micros: i64,
    max_seen: Option<i64>,
    emitted: Option<i64>,
}

impl WatermarkTracker {
    /// A tracker for `spec` over batches of `schema`.
    pub fn try_new(spec: &WatermarkSpec, schema: &arrow::datatypes::Schema) -> Result<Self> {
        let column = schema.index_of(&spec.column).map_err(|_| {
            EngineError::Internal(format!(
                "watermark column `{}` is not in the schema",
                spec.column
            ))
        })?;
        Ok(Self {
            column,
            delay_micros: spec.delay_micros,
            max_seen: None,
            emitted: None,
        })
    }

    /// Observes a batch; returns the largest event time in it, if any.
    pub fn observe(&mut self, batch: &RecordBatch) -> Option<EventTime> {
        let col = batch.column(self.column);
        let ts = col.as_any().downcast_ref::<TimestampMicrosecondArray>()?;
        let max = arrow::compute::max(ts)?;
        self.max_seen = Some(self.max_seen.map_or(max, |m| m.max(max)));
        Some(EventTime(max))
    }

    /// What a checkpoint keeps: the largest event time seen and the watermark emitted.
    pub fn state(&self) -> (Option<i64>, Option<i64>) {
        (self.max_seen, self.emitted)
    }

    /// Takes back [`Self::state`] from a checkpoint; returns the watermark to send again.
    pub fn restore(&mut self, max_seen: Option<i64>, emitted: Option<i64>) -> Option<EventTime> {
        self.max_seen = self.max_seen.max(max_seen);
        self.emitted = self.emitted.max(emitted);
        self.emitted.map(EventTime)
    }

    /// The watermark to emit, if it advanced since the last call.
    pub fn advance(&mut self) -> Option<EventTime> {
        let wm = self.max_seen?.saturating_sub(self.delay_micros);
        if self.emitted.is_some_and(|e| e >= wm) {
            return None;
        }
        self.emitted = Some(wm);
        Some(EventTime(wm))
    }
}

/// Sends a batch and, when it advanced, the watermark after it; updates the counters.
///
/// This is the one way sources publish rows, so metrics and watermarks are consistent
/// across connectors.
pub async fn publish(
    ctx: &SourceContext,
    tracker: &mut Option<WatermarkTracker>,
    batch: RecordBatch,
) {
    if batch.num_rows() == 0 {
        return;
    }
    ctx.metrics.add_rows_in(batch.num_rows());
    ctx.metrics.add_rows_out(batch.num_rows());
    let wm = tracker.as_mut().and_then(|t| {
        if let Some(max) = t.observe(&batch) {
            ctx.metrics.observe_event_time(max);
        }
        t.advance()
    });
    ctx.output.send(Message::Data(batch)).await;
    if let Some(wm) = wm {
        ctx.metrics.observe_watermark(wm);
        ctx.output.send(Message::Watermark(wm)).await;
    }
}
