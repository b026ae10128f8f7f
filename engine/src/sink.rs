//! The [`Sink`] trait that connectors implement, and the task that drives one.

use std::time::Duration;

use arrow::record_batch::RecordBatch;
use async_trait::async_trait;

use crate::error::{EngineError, Result};
use crate::fanout::Subscription;
use crate::message::{Barrier, Message};
use crate::time::EventTime;

/// A connector's writing side.
///
/// Hooks are called from one task, in input order. Exactly one of `close` (the input ended)
/// or `abort` (it was cut short by a failure upstream) is called, last.
#[async_trait]
pub trait Sink: Send {
    /// A short name for logs.
    fn name(&self) -> &str;

    /// Writes one batch.
    async fn write_batch(&mut self, batch: RecordBatch) -> Result<()>;

    /// Event time advanced on the input. The default ignores it.
    async fn on_watermark(&mut self, _t: EventTime) -> Result<()> {
        Ok(())
    }

    /// A checkpoint barrier passed. The default ignores it.
    async fn on_barrier(&mut self, _b: Barrier) -> Result<()> {
        Ok(())
    }

    /// How often [`Sink::on_tick`] should be called, if at all (time-based file rolling).
    fn tick_interval(&self) -> Option<Duration> {
        None
    }

    /// Called every [`Sink::tick_interval`].
    async fn on_tick(&mut self) -> Result<()> {
        Ok(())
    }

    /// The input ended: flush and publish everything.
    async fn close(&mut self) -> Result<()>;

    /// The input was cut short by a failure upstream (its channel closed without `End`).
    /// A sink that publishes with checkpoints discards what the last checkpoint does not
    /// cover: a restart replays it from there. The default, for sinks that deliver at least
    /// once, is [`Sink::close`].
    async fn abort(&mut self) -> Result<()> {
        self.close().await
    }
}

/// Drives `sink` from `input` until `End`, then closes it. When the input closes without
/// `End`, the sink is aborted and this fails with [`EngineError::Closed`].
pub async fn run_sink(mut input: Subscription, mut sink: Box<dyn Sink>) -> Result<()> {
    let mut ticker = sink.tick_interval().map(|d| {
        let mut t = tokio::time::interval(d);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    loop {
        let msg = match &mut ticker {
            Some(t) => tokio::select! {
                m = input.recv() => m,
                _ = t.tick() => { sink.on_tick().await?; continue; }
            },
            None => input.recv().await,
        };
        match msg {
            Some(Message::Data(b)) => sink.write_batch(b).await?,
            Some(Message::Watermark(t)) => sink.on_watermark(t).await?,
            Some(Message::Barrier(b)) => sink.on_barrier(b).await?,
            Some(Message::End) => break,
            None => {
                sink.abort().await?;
                return Err(EngineError::Closed(format!(
                    "the input of `{}` failed before its end",
                    sink.name()
                )));
            }
        }
    }
    sink.close().await
}

/// How a stream's output files roll, and how closed partitions are compacted (the lake
/// writer's options on `CREATE STREAM`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRolling {
    /// Close a file after it has been open this long (freshness).
    pub rollover_interval: Duration,
    /// Close a file once it reaches about this many bytes (file size for Athena); compaction
    /// writes files of about this size too.
    pub target_file_size: u64,
    /// Rewrite closed partitions into few sorted files (`None`: never).
    pub compaction: Option<Compaction>,
}

impl Default for FileRolling {
    fn default() -> Self {
        Self {
            rollover_interval: Duration::from_secs(10),
            target_file_size: 128 * 1024 * 1024,
            compaction: None,
        }
    }
}

/// When an hour partition of a stream's output counts as closed, so that it is compacted
/// and marked complete: once the stream's watermark (for a stream placed by arrival time,
/// the clock) has passed the hour's end by `allowed_lateness` plus `delay`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compaction {
    /// The stream's `allowed_lateness`: rows that late are still taken.
    pub allowed_lateness: Duration,
    /// The grace after that (option `compaction_delay`).
    pub delay: Duration,
}

impl Compaction {
    /// The default `compaction_delay`.
    pub const DEFAULT_DELAY: Duration = Duration::from_secs(300);

    /// How far past an hour's end the watermark must be for it to close, µs.
    pub fn closes_after_micros(&self) -> i64 {
        i64::try_from((self.allowed_lateness + self.delay).as_micros()).unwrap_or(i64::MAX)
    }
}
