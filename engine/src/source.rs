//! The [`SourceReader`] trait that connectors implement, what a running one is given
//! ([`SourceContext`]), and [`publish`], how it sends rows.

use std::sync::Arc;

use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::error::{EngineError, Result};
use crate::fanout::FanOut;
use crate::message::{BadRecord, Message};
use crate::metrics::Metrics;

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

/// Sends a batch downstream and counts its rows: the one way sources publish rows, so their
/// counters agree across connectors. Watermarks are the reader's (connectors share one
/// generator for them).
pub async fn publish(ctx: &SourceContext, batch: RecordBatch) {
    if batch.num_rows() == 0 {
        return;
    }
    ctx.metrics.add_rows_in(batch.num_rows());
    ctx.metrics.add_rows_out(batch.num_rows());
    ctx.output.send(Message::Data(batch)).await;
}
