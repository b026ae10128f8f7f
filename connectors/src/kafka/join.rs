//! How a stream that starts while its Kafka source is running catches up with the source's
//! shared reader, then reads through it.
//!
//! A Kafka source has one shared reader: it decodes every record once, archives it, and
//! publishes the rows to every stream through the source's hub. A stream created later with
//! `start = 'earliest'` must still see the records the shared reader published before it
//! existed, so it starts with a backfill reader of its own (as RisingWave's shared sources
//! do):
//!
//! ```text
//!  backfill reader                                       shared reader
//!  read [start, X) until X is within a batch of ──┐
//!  the shared reader's position                   └─► JoinRequest { at: X }
//!                                                     between two batches, once its
//!                                                     position J covers X: subscribes the
//!                      Joined { subscription, J } ◄── stream to its hub
//!  read [X, J) (records past J dropped)
//!  relay the subscription, re-reporting the hub's barriers with the shared reader's
//!  position at each
//! ```
//!
//! Positions are the next offset per partition. The backfill reader hands on the records
//! before `J`, the subscription those from `J` on: every record reaches the stream once.
//! While the backfill reads, its checkpoints hold its own position (a restart resumes the
//! backfill there); after the join, the shared reader's position at each barrier, so a
//! restart joins again at once.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use sluice_engine::checkpoint::ReaderCheckpoint;

use crate::split_clock::ClockState;
use sluice_engine::{
    DEFAULT_CHANNEL_CAPACITY, EngineError, FanOut, Message, SourceContext, Subscription,
};
use tokio::sync::{mpsc, oneshot};

/// The next offset to read, per partition.
pub(super) type Offsets = BTreeMap<i32, i64>;

/// How many barriers' positions the shared reader keeps for relays to look up. One is
/// enough (a checkpoint completes before the next is requested); more is slack.
const BARRIER_POSITIONS: usize = 8;

/// A checkpoint position of a Kafka reader: `{"offsets": {"<partition>": <next offset>},
/// "event_time": …}` (the reader's [`ClockState`] at those offsets).
pub(super) fn position_json(offsets: &Offsets, clock: &ClockState) -> serde_json::Value {
    let offsets: serde_json::Map<String, serde_json::Value> = offsets
        .iter()
        .map(|(p, o)| (p.to_string(), (*o).into()))
        .collect();
    let mut position = serde_json::json!({ "offsets": offsets });
    clock.write_into(&mut position);
    position
}

/// Whether position `a` is at or past `b` in every partition `b` names.
pub(super) fn covers(a: &Offsets, b: &Offsets) -> bool {
    b.iter()
        .all(|(p, o)| a.get(p).is_some_and(|reached| reached >= o))
}

/// Per partition `ahead` names, how many records position `behind` has still to read to
/// reach it (a partition `behind` has not read counts from offset 0).
pub(super) fn lag(behind: &Offsets, ahead: &Offsets) -> Vec<(i32, i64)> {
    ahead
        .iter()
        .map(|(p, o)| (*p, (o - behind.get(p).copied().unwrap_or(0)).max(0)))
        .collect()
}

/// Where a stream joins the shared reader's hub.
pub(super) struct Joined {
    /// The stream's subscription to the hub: rows from `offsets` on.
    pub subscription: Subscription,
    /// The shared reader's position when the stream subscribed.
    pub offsets: Offsets,
    /// The shared reader's event time there.
    pub clock: ClockState,
    /// The epoch of the last barrier the shared reader sent before (0: none).
    pub last_barrier: u64,
}

/// A backfill reader's request to join, once the shared reader's position covers `at`.
pub(super) struct JoinRequest {
    at: Offsets,
    reply: oneshot::Sender<Joined>,
}

#[derive(Debug, Default)]
struct Position {
    /// The shared reader's position after the last batch it published.
    next: Offsets,
    /// Its checkpointed position at its last barriers: (epoch, position).
    at_barriers: VecDeque<(u64, serde_json::Value)>,
}

/// The backfill readers' side of a shared reader: its position, and joining it.
#[derive(Debug, Clone)]
pub struct Joinable {
    requests: mpsc::Sender<JoinRequest>,
    position: Arc<Mutex<Position>>,
}

/// The shared reader's side: answers join requests between batches.
pub(super) struct JoinService {
    requests: mpsc::Receiver<JoinRequest>,
    waiting: Vec<JoinRequest>,
    position: Arc<Mutex<Position>>,
    last_barrier: u64,
}

/// A shared reader's join service and the handle backfill readers join it by.
pub(super) fn join_channel() -> (Joinable, JoinService) {
    let (tx, rx) = mpsc::channel(16);
    let position: Arc<Mutex<Position>> = Arc::default();
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

fn lock(position: &Mutex<Position>) -> std::sync::MutexGuard<'_, Position> {
    // Every update is one assignment or push: a poisoned lock holds consistent data.
    position.lock().unwrap_or_else(|e| e.into_inner())
}

impl Joinable {
    /// Per partition the shared reader has read, how many records it has read that a reader
    /// at `mine` has not.
    pub(super) fn lag(&self, mine: &Offsets) -> Vec<(i32, i64)> {
        lag(mine, &lock(&self.position).next)
    }

    /// Asks to join once the shared reader's position covers `at`; the answer comes on the
    /// returned channel. Fails if the shared reader is gone.
    pub(super) async fn join(
        &self,
        source: &str,
        at: Offsets,
    ) -> sluice_engine::Result<oneshot::Receiver<Joined>> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(JoinRequest { at, reply })
            .await
            .map_err(|_| gone(source))?;
        Ok(answer)
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

/// The error of a backfill reader whose source's shared reader stopped.
pub(super) fn gone(source: &str) -> EngineError {
    EngineError::Internal(format!(
        "kafka source `{source}`: the source's reader is not running (see SHOW SOURCES)"
    ))
}

impl JoinService {
    /// Notes the reader's position after a batch (or where it resumes).
    pub(super) fn set_position(&self, next: &Offsets) {
        lock(&self.position).next.clone_from(next);
    }

    /// Notes the position the reader reports with its barrier of `epoch`; call before
    /// sending the barrier.
    pub(super) fn barrier(&mut self, epoch: u64, position: serde_json::Value) {
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
    pub(super) async fn request(&mut self) -> JoinRequest {
        match self.requests.recv().await {
            Some(r) => r,
            // Every handle is gone (the source is being dropped): no more requests.
            None => std::future::pending().await,
        }
    }

    /// Takes `request`, and answers every waiting request that position `next` (with event
    /// time `clock`) covers by subscribing it to `hub`. Call between batches.
    pub(super) fn serve(
        &mut self,
        request: Option<JoinRequest>,
        next: &Offsets,
        clock: impl FnOnce() -> ClockState,
        hub: &FanOut,
    ) {
        self.waiting.extend(request);
        if self.waiting.is_empty() {
            return;
        }
        let (ready, waiting) = std::mem::take(&mut self.waiting)
            .into_iter()
            .partition(|r| covers(next, &r.at));
        self.waiting = waiting;
        if ready.is_empty() {
            return;
        }
        let clock = clock();
        for r in ready {
            // A reader that stopped waiting drops its subscription; the hub forgets it.
            let _ = r.reply.send(Joined {
                subscription: hub.subscribe(DEFAULT_CHANNEL_CAPACITY),
                offsets: next.clone(),
                clock: clock.clone(),
                last_barrier: self.last_barrier,
            });
        }
    }
}

/// After the join: hands what the shared reader publishes on to the stream's branch. With
/// `checkpoint`, each hub barrier the stream owes is reported with the shared reader's
/// position at it. Returns when the hub ends or `ctx` is cancelled; fails when the shared
/// reader failed.
pub(super) async fn relay(
    source: &str,
    joinable: &Joinable,
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
            None => return Err(gone(source)),
            Some(Message::End) => return Ok(()),
            Some(Message::Barrier(b)) => match &mut checkpoint {
                // Sent by the backfill reader already, or from before the stream existed.
                Some(ck) if !ck.owes(b.epoch) => {}
                Some(ck) => {
                    let at = joinable.position_at(b.epoch).ok_or_else(|| {
                        EngineError::Internal(format!(
                            "kafka source `{source}`: no position recorded for barrier {}",
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

#[cfg(test)]
mod tests {
    use super::*;

    fn offsets(pairs: &[(i32, i64)]) -> Offsets {
        pairs.iter().copied().collect()
    }

    #[test]
    fn covers_needs_every_partition_named() {
        let a = offsets(&[(0, 10), (1, 5)]);
        assert!(covers(&a, &offsets(&[(0, 10)])));
        assert!(covers(&a, &offsets(&[])));
        assert!(!covers(&a, &offsets(&[(0, 11)])));
        assert!(!covers(&a, &offsets(&[(2, 0)])), "a partition not read yet");
    }

    #[test]
    fn lag_counts_records_ahead_only() {
        let mine = offsets(&[(0, 10), (1, 50)]);
        let shared = offsets(&[(0, 25), (1, 40), (2, 7)]);
        // 15 in partition 0, none in 1 (ahead there), 7 in partition 2 (not read).
        assert_eq!(lag(&mine, &shared), [(0, 15), (1, 0), (2, 7)]);
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
        assert_eq!(joined.offsets, offsets(&[(0, 12)]));
        assert_eq!(
            joined.clock, clock,
            "the stream joins with the reader's event time"
        );
        assert_eq!(joined.last_barrier, 3);
        assert_eq!(hub.subscriber_count(), 1);
        assert_eq!(joinable.position_at(3), Some(at_barrier));
    }
}
