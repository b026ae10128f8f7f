//! How a stream that starts while its source is running catches up with the source's
//! shared reader, then reads through it (kafka and kinesis).
//!
//! A replayable source has one shared reader: it decodes every record once, archives it, and
//! publishes the rows to every stream through the source's hub. A stream created later that
//! starts at the source's beginning must still see the records the shared reader published
//! before it existed, so it starts with a backfill reader of its own (as RisingWave's shared
//! sources do):
//!
//! ```text
//!  backfill reader                                       shared reader
//!  read [start, X) until X is level with the   ───┐
//!  shared reader's position                       └─► JoinRequest { at: X }
//!                                                     between two batches, once its
//!                                                     position J covers X: subscribes the
//!                      Joined { subscription, J } ◄── stream to its hub
//!  read [X, J) (records past J dropped)
//!  relay the subscription, re-reporting the hub's barriers with the shared reader's
//!  position at each
//! ```
//!
//! A position says, per split (partition, shard), how far a reader has read
//! ([`Positions`]). The backfill reader hands on the records before `J`, the subscription
//! those from `J` on: every record reaches the stream once. While the backfill reads, its
//! checkpoints hold its own position (a restart resumes the backfill there); after the join,
//! the shared reader's position at each barrier, so a restart joins again at once.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use sluice_engine::checkpoint::ReaderCheckpoint;

use crate::split_clock::ClockState;
use sluice_engine::{
    DEFAULT_CHANNEL_CAPACITY, EngineError, FanOut, Message, SourceContext, Subscription,
};
use tokio::sync::{mpsc, oneshot};

/// How many barriers' positions the shared reader keeps for relays to look up. One is
/// enough (a checkpoint completes before the next is requested); more is slack.
const BARRIER_POSITIONS: usize = 8;

/// How far a reader has read, per split.
pub trait Positions: Clone + Default + std::fmt::Debug + Send + 'static {
    /// Whether `self` is at or past `other` in every split `other` names.
    fn covers(&self, other: &Self) -> bool;
}

/// Where a stream joins the shared reader's hub.
pub(crate) struct Joined<P> {
    /// The stream's subscription to the hub: rows from `offsets` on.
    pub subscription: Subscription,
    /// The shared reader's position when the stream subscribed.
    pub position: P,
    /// The shared reader's event time there.
    pub clock: ClockState,
    /// The epoch of the last barrier the shared reader sent before (0: none).
    pub last_barrier: u64,
    /// The hub subscribed to (it says why, if the shared reader fails).
    pub hub: FanOut,
}

/// A backfill reader's request to join, once the shared reader's position covers `at`.
pub(crate) struct JoinRequest<P> {
    at: P,
    reply: oneshot::Sender<Joined<P>>,
}

#[derive(Debug, Default)]
struct Shared<P> {
    /// The shared reader's position after the last batch it published.
    next: P,
    /// Its checkpointed position at its last barriers: (epoch, position).
    at_barriers: VecDeque<(u64, serde_json::Value)>,
    /// Why it stopped, if it failed.
    failure: Option<String>,
}

/// The backfill readers' side of a shared reader: its position, and joining it.
#[derive(Debug, Clone)]
pub struct Joinable<P> {
    requests: mpsc::Sender<JoinRequest<P>>,
    position: Arc<Mutex<Shared<P>>>,
}

/// The shared reader's side: answers join requests between batches.
pub(crate) struct JoinService<P> {
    requests: mpsc::Receiver<JoinRequest<P>>,
    waiting: Vec<JoinRequest<P>>,
    position: Arc<Mutex<Shared<P>>>,
    last_barrier: u64,
}

/// A shared reader's join service and the handle backfill readers join it by.
pub(crate) fn join_channel<P: Positions>() -> (Joinable<P>, JoinService<P>) {
    let (tx, rx) = mpsc::channel(16);
    let position: Arc<Mutex<Shared<P>>> = Arc::default();
    (
        Joinable {
            requests: tx,
            position: Arc::clone(&position),
        },
        JoinService {
            requests: rx,
            waiting: vec![],
            position,
            last_barrier: 0,
        },
    )
}

fn lock<P>(position: &Mutex<Shared<P>>) -> std::sync::MutexGuard<'_, Shared<P>> {
    // Every update is one assignment or push: a poisoned lock holds consistent data.
    position.lock().unwrap_or_else(|e| e.into_inner())
}

impl<P: Positions> Joinable<P> {
    /// The shared reader's position after its last batch.
    pub(crate) fn position(&self) -> P {
        lock(&self.position).next.clone()
    }

    /// Asks to join once the shared reader's position covers `at`; the answer comes on the
    /// returned channel. Fails if the shared reader is gone.
    pub(crate) async fn join(
        &self,
        source: &str,
        at: P,
    ) -> sluice_engine::Result<oneshot::Receiver<Joined<P>>> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(JoinRequest { at, reply })
            .await
            .map_err(|_| self.gone(source, None))?;
        Ok(answer)
    }

    /// The error of a backfill reader whose source's shared reader stopped: why it failed,
    /// as `hub` (once joined) or the reader itself ([`JoinService::failed`]) says.
    pub(crate) fn gone(&self, source: &str, hub: Option<&FanOut>) -> EngineError {
        let why = hub
            .and_then(FanOut::failure)
            .map(|f| f.to_string())
            .or_else(|| lock(&self.position).failure.clone())
            .unwrap_or_else(|| "it stopped".to_string());
        EngineError::external(
            format!("source `{source}`: the source's reader is not running"),
            std::io::Error::other(why),
        )
    }

    /// The shared reader's checkpointed position at its barrier of `epoch`.
    fn position_at(&self, epoch: u64) -> Option<serde_json::Value> {
        lock(&self.position)
            .at_barriers
            .iter()
            .find(|(e, _)| *e == epoch)
            .map(|(_, o)| o.clone())
    }
}

impl<P: Positions> JoinService<P> {
    /// Notes how the shared reader ended: if it failed, why, for the backfill readers that
    /// try to join it (call before the service is dropped, so none misses it).
    pub(crate) fn ended(&self, result: &sluice_engine::Result<()>) {
        if let Err(e) = result {
            lock(&self.position).failure = Some(e.to_string());
        }
    }

    /// Notes the reader's position after a batch (or where it resumes).
    pub(crate) fn set_position(&self, next: &P) {
        lock(&self.position).next.clone_from(next);
    }

    /// Notes the position the reader reports with its barrier of `epoch`; call before
    /// sending the barrier.
    pub(crate) fn barrier(&mut self, epoch: u64, position: serde_json::Value) {
        let mut p = lock(&self.position);
        if p.at_barriers.len() == BARRIER_POSITIONS {
            p.at_barriers.pop_front();
        }
        p.at_barriers.push_back((epoch, position));
        self.last_barrier = epoch;
    }

    /// The next join request.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub(crate) async fn request(&mut self) -> JoinRequest<P> {
        match self.requests.recv().await {
            Some(r) => r,
            // Every handle is gone (the source is being dropped): no more requests.
            None => std::future::pending().await,
        }
    }

    /// Takes `request`, and answers every waiting request that position `next` (with event
    /// time `clock`) covers by subscribing it to `hub`. Call between batches.
    pub(crate) fn serve(
        &mut self,
        request: Option<JoinRequest<P>>,
        next: &P,
        clock: impl FnOnce() -> ClockState,
        hub: &FanOut,
    ) {
        self.waiting.extend(request);
        if self.waiting.is_empty() {
            return;
        }
        let (ready, waiting) = std::mem::take(&mut self.waiting)
            .into_iter()
            .partition(|r| next.covers(&r.at));
        self.waiting = waiting;
        if ready.is_empty() {
            return;
        }
        let clock = clock();
        for r in ready {
            // A reader that stopped waiting drops its subscription; the hub forgets it.
            let _ = r.reply.send(Joined {
                subscription: hub.subscribe(DEFAULT_CHANNEL_CAPACITY),
                position: next.clone(),
                clock: clock.clone(),
                last_barrier: self.last_barrier,
                hub: hub.clone(),
            });
        }
    }
}

/// Sends a backfill reader's barrier of `epoch`, at its checkpointed `position` (nothing
/// when it does not checkpoint).
pub(crate) async fn barrier(
    ctx: &SourceContext,
    checkpoint: &mut Option<ReaderCheckpoint>,
    epoch: u64,
    position: serde_json::Value,
) {
    if let Some(ck) = checkpoint {
        ck.barrier(&ctx.output, epoch, position).await;
    }
}

/// After the join: hands what the shared reader publishes on to the stream's branch. With
/// `checkpoint`, each hub barrier the stream owes is reported with the shared reader's
/// position at it. Returns when the hub ends or `ctx` is cancelled; fails when the shared
/// reader failed.
pub(crate) async fn relay<P: Positions>(
    source: &str,
    joinable: &Joinable<P>,
    hub: &FanOut,
    mut subscription: Subscription,
    ctx: &SourceContext,
    mut checkpoint: Option<ReaderCheckpoint>,
) -> sluice_engine::Result<()> {
    loop {
        let msg = tokio::select! {
            biased;
            _ = ctx.cancel.cancelled() => return Ok(()),
            msg = subscription.recv() => msg,
        };
        match msg {
            None => return Err(joinable.gone(source, Some(hub))),
            Some(Message::End) => return Ok(()),
            Some(Message::Barrier(b)) => match &mut checkpoint {
                // Sent by the backfill reader already, or from before the stream existed.
                Some(ck) if !ck.owes(b.epoch) => {}
                Some(ck) => {
                    let at = joinable.position_at(b.epoch).ok_or_else(|| {
                        EngineError::Internal(format!(
                            "source `{source}`: no position recorded for barrier {}",
                            b.epoch
                        ))
                    })?;
                    ck.barrier(&ctx.output, b.epoch, at).await;
                }
                None => {
                    ctx.output.send(Message::Barrier(b)).await;
                }
            },
            Some(m) => {
                ctx.output.send(m).await;
            }
        }
    }
}

#[cfg(all(test, feature = "kafka"))]
mod tests {
    use super::*;
    use crate::kafka::offsets::{Offsets, position_json};

    fn offsets(pairs: &[(i32, i64)]) -> Offsets {
        pairs.iter().copied().collect()
    }

    #[tokio::test]
    async fn a_request_is_answered_once_the_position_covers_it() {
        let (joinable, mut service) = join_channel();
        let hub = FanOut::new("s");
        let answer = joinable.join("s", offsets(&[(0, 10)])).await.unwrap();
        let request = service.request().await;
        service.serve(
            Some(request),
            &offsets(&[(0, 5)]),
            ClockState::default,
            &hub,
        );
        assert_eq!(hub.subscriber_count(), 0, "not level yet");
        let at_barrier = position_json(&offsets(&[(0, 8)]), &ClockState::default());
        service.barrier(3, at_barrier.clone());
        let clock = ClockState {
            splits: [("0".to_string(), 42)].into(),
            emitted: Some(40),
        };
        service.serve(None, &offsets(&[(0, 12)]), || clock.clone(), &hub);
        let joined = answer.await.unwrap();
        assert_eq!(joined.position, offsets(&[(0, 12)]));
        assert_eq!(
            joined.clock, clock,
            "the stream joins with the reader's event time"
        );
        assert_eq!(joined.last_barrier, 3);
        assert_eq!(hub.subscriber_count(), 1);
        assert_eq!(joinable.position_at(3), Some(at_barrier));
    }
}
