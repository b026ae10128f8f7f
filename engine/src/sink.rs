//! The [`Sink`] trait that connectors implement, and the task that drives one.

use std::time::Duration;

use arrow::record_batch::RecordBatch;
use async_trait::async_trait;

use crate::error::Result;
use crate::fanout::Subscription;
use crate::message::{Barrier, Message};
use crate::time::EventTime;

/// A connector's writing side.
///
/// Hooks are called from one task, in input order. `close` is called exactly once, when the
/// input ends (or its sender goes away); a sink makes everything it accepted visible there.
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
}

/// Drives `sink` from `input` until `End`, then closes it.
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
            Some(Message::End) | None => break,
        }
    }
    sink.close().await
}
