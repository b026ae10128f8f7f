//! [`Merger`]: the one place where several inputs become one ordered input — the stream's
//! branches before its stateful stage, and its parallel subtasks after it.
//!
//! Its contract:
//! - **Fairness**: inputs are polled round-robin, so no input starves the others.
//! - **Watermarks**: the merged watermark is the minimum over the inputs that have neither
//!   ended nor gone idle (no message for their idle timeout); it only moves forward.
//! - **Aligned barriers**: an input that delivered the barrier being aligned is not read
//!   again until every live input has (what it sends next belongs to the next epoch); the
//!   barrier is released once, when the last live input delivers it or ends.
//! - **Lockstep copies**: inputs that carry the same messages (a self-union's branches share
//!   a reader) are read a message of each in turn, so what is late does not depend on which
//!   copy the scheduler ran ahead.

use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use crate::message::{Barrier, Message};
use crate::metrics::Metrics;
use crate::time::EventTime;

/// What the merge of several inputs has to say next.
#[derive(Debug)]
pub(super) enum Event {
    /// Input `i` delivered a message. Its watermarks, barriers and end go back through
    /// [`Merger::watermark`], [`Merger::barrier`] and [`Merger::end`] once the caller has
    /// turned them into what it merges (a branch runs its chain first).
    Message(usize, Message),
    /// Input `i` closed without `End`: its producer failed.
    Closed(usize),
    /// Inputs went idle and the merged watermark advanced to this.
    Watermark(EventTime),
    /// Every input ended.
    Ended,
}

/// The state of a merge of `n` inputs. See the module docs.
#[derive(Debug)]
pub(super) struct Merger {
    watermarks: Vec<EventTime>,
    ended: Vec<bool>,
    /// Delivered the barrier being aligned.
    blocked: Vec<bool>,
    pending: Option<Barrier>,
    emitted: EventTime,
    /// Per input, the first input carrying the same messages (itself if none).
    leaders: Vec<usize>,
    /// Messages taken per input (for lockstep reading).
    taken: Vec<u64>,
    timeouts: Vec<Option<Duration>>,
    last_seen: Vec<Instant>,
    idle: Vec<bool>,
    idle_check: Option<tokio::time::Interval>,
    next_poll: usize,
}

impl Merger {
    /// A merge of inputs with these `leaders` (see [`Merger::leaders`]) and idle timeouts
    /// (`None`: the input is always waited for).
    pub(super) fn new(leaders: Vec<usize>, timeouts: Vec<Option<Duration>>) -> Self {
        let n = leaders.len();
        let idle_check = timeouts
            .iter()
            .flatten()
            .min()
            .map(|t| (*t / 4).max(Duration::from_millis(10)))
            .map(|every| {
                let mut i = tokio::time::interval(every);
                i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                i
            });
        Self {
            watermarks: vec![EventTime::MIN; n],
            ended: vec![false; n],
            blocked: vec![false; n],
            pending: None,
            emitted: EventTime::MIN,
            leaders,
            taken: vec![0; n],
            timeouts,
            last_seen: vec![Instant::now(); n],
            idle: vec![false; n],
            idle_check,
            next_poll: 0,
        }
    }

    /// `n` independent inputs, never idle.
    pub(super) fn independent(n: usize) -> Self {
        Self::new((0..n).collect(), vec![None; n])
    }

    /// Per input, the first input that carries the same messages: `same_as[i]` names an
    /// earlier one, or none.
    pub(super) fn leaders(same_as: impl IntoIterator<Item = Option<usize>>) -> Vec<usize> {
        same_as
            .into_iter()
            .enumerate()
            .map(|(i, s)| s.filter(|l| *l < i).unwrap_or(i))
            .collect()
    }

    /// Whether every input ended.
    pub(super) fn all_ended(&self) -> bool {
        self.ended.iter().all(|e| *e)
    }

    /// The next event; `recv(i, cx)` polls input `i`.
    ///
    /// # Cancel safety
    /// Cancel safe as long as `recv` is (a message is taken only when returned).
    pub(super) async fn next(
        &mut self,
        metrics: &Metrics,
        mut recv: impl FnMut(usize, &mut Context<'_>) -> Poll<Option<Message>>,
    ) -> Event {
        std::future::poll_fn(|cx| {
            if self.all_ended() {
                return Poll::Ready(Event::Ended);
            }
            while let Some(check) = &mut self.idle_check {
                if check.poll_tick(cx).is_pending() {
                    break;
                }
                if self.mark_idle()
                    && let Some(wm) = self.advance(metrics)
                {
                    return Poll::Ready(Event::Watermark(wm));
                }
            }
            let skip = self.skipped();
            let n = self.ended.len();
            for k in 0..n {
                let i = (self.next_poll + k) % n;
                if skip[i] {
                    continue;
                }
                if let Poll::Ready(m) = recv(i, cx) {
                    self.next_poll = (i + 1) % n;
                    let Some(m) = m else {
                        return Poll::Ready(Event::Closed(i));
                    };
                    self.taken[i] += 1;
                    // Checkpoint barriers are not activity: a quiet input stays idle.
                    if !matches!(m, Message::Barrier(_)) {
                        self.last_seen[i] = Instant::now();
                        self.idle[i] = false;
                    }
                    return Poll::Ready(Event::Message(i, m));
                }
            }
            Poll::Pending
        })
        .await
    }

    /// Input `i`'s watermark is `t`: the merged watermark, if it advanced.
    pub(super) fn watermark(
        &mut self,
        i: usize,
        t: EventTime,
        metrics: &Metrics,
    ) -> Option<EventTime> {
        self.watermarks[i] = self.watermarks[i].max(t);
        self.advance(metrics)
    }

    /// Input `i` delivered barrier `b`: the barrier, once every live input has.
    pub(super) fn barrier(&mut self, i: usize, b: Barrier) -> Option<Barrier> {
        self.blocked[i] = true;
        self.pending = Some(b);
        self.release()
    }

    /// Input `i` ended: the merged watermark, if it advanced, and the barrier being aligned,
    /// if the ended input was the last one it waited for (when every input ended, only with
    /// `when_all_ended`).
    pub(super) fn end(
        &mut self,
        i: usize,
        metrics: &Metrics,
        when_all_ended: bool,
    ) -> (Option<EventTime>, Option<Barrier>) {
        self.ended[i] = true;
        let wm = self.advance(metrics);
        let barrier = if self.all_ended() && !when_all_ended {
            None
        } else {
            self.release()
        };
        (wm, barrier)
    }

    fn release(&mut self) -> Option<Barrier> {
        let aligned = self.blocked.iter().zip(&self.ended).all(|(b, e)| *b || *e);
        if !aligned {
            return None;
        }
        self.blocked.iter_mut().for_each(|b| *b = false);
        self.pending.take()
    }

    /// Inputs not read now: ended, held at a barrier, or not their turn among copies. Of the
    /// copies of one input that may be read, only the first with the fewest messages taken
    /// may take the next (copies that subscribed while the input was sending may be a
    /// message apart: the turn then passes over one held at a barrier rather than wait).
    fn skipped(&self) -> Vec<bool> {
        let readable: Vec<bool> = self
            .ended
            .iter()
            .zip(&self.blocked)
            .map(|(e, b)| !*e && !*b)
            .collect();
        let mut skip: Vec<bool> = readable.iter().map(|r| !*r).collect();
        for (i, leader) in self.leaders.iter().enumerate() {
            if !readable[i] {
                continue;
            }
            let turn = (0..self.leaders.len())
                .filter(|j| self.leaders[*j] == *leader && readable[*j])
                .min_by_key(|j| (self.taken[*j], *j));
            if turn != Some(i) {
                skip[i] = true;
            }
        }
        skip
    }

    /// Marks inputs silent for their idle timeout as idle; whether any became idle.
    fn mark_idle(&mut self) -> bool {
        let now = Instant::now();
        let mut changed = false;
        for i in 0..self.ended.len() {
            if let Some(t) = self.timeouts[i]
                && !self.idle[i]
                && !self.ended[i]
                && now.duration_since(self.last_seen[i]) >= t
            {
                self.idle[i] = true;
                changed = true;
            }
        }
        changed
    }

    /// The minimum watermark over the inputs neither ended nor idle, if it advanced.
    fn advance(&mut self, metrics: &Metrics) -> Option<EventTime> {
        let live_min = self
            .watermarks
            .iter()
            .zip(self.ended.iter().zip(&self.idle))
            .filter(|(_, (e, i))| !**e && !**i)
            .map(|(w, _)| *w)
            .min();
        match live_min {
            Some(wm) if wm > self.emitted => {
                self.emitted = wm;
                metrics.observe_watermark(wm);
                Some(wm)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn barrier(epoch: u64) -> Barrier {
        Barrier { epoch }
    }

    #[test]
    fn a_barrier_is_released_once_every_live_input_delivered_it() {
        let metrics = Metrics::default();
        let mut m = Merger::independent(3);
        assert_eq!(m.barrier(0, barrier(4)), None);
        assert_eq!(
            m.skipped(),
            [true, false, false],
            "input 0 waits for the others"
        );
        assert_eq!(m.end(2, &metrics, false), (None, None));
        assert_eq!(m.barrier(1, barrier(4)), Some(barrier(4)));
        assert_eq!(
            m.skipped(),
            [false, false, true],
            "the ended input stays skipped"
        );
    }

    #[test]
    fn an_input_that_ends_releases_the_barrier_it_was_waited_for() {
        let metrics = Metrics::default();
        let mut m = Merger::independent(2);
        assert_eq!(m.barrier(0, barrier(1)), None);
        assert_eq!(m.end(1, &metrics, false).1, Some(barrier(1)));
        let mut all = Merger::independent(1);
        assert_eq!(all.barrier(0, barrier(2)), Some(barrier(2)));
        let mut last = Merger::independent(2);
        last.barrier(0, barrier(3));
        last.end(0, &metrics, true);
        assert_eq!(last.end(1, &metrics, true).1, Some(barrier(3)));
    }

    #[test]
    fn the_watermark_is_the_minimum_over_live_inputs_and_only_moves_forward() {
        let metrics = Metrics::default();
        let mut m = Merger::independent(2);
        let t = EventTime;
        assert_eq!(
            m.watermark(0, t(10), &metrics),
            None,
            "input 1 has none yet"
        );
        assert_eq!(m.watermark(1, t(5), &metrics), Some(t(5)));
        assert_eq!(m.watermark(1, t(20), &metrics), Some(t(10)));
        assert_eq!(m.watermark(1, t(3), &metrics), None, "never backwards");
        assert_eq!(
            m.end(0, &metrics, false).0,
            Some(t(20)),
            "an ended input stops counting"
        );
    }

    #[test]
    fn copies_of_one_input_are_read_in_turn() {
        let mut m = Merger::new(Merger::leaders([None, Some(0), None]), vec![None; 3]);
        assert_eq!(m.skipped(), [false, true, false]);
        m.taken[0] = 1;
        assert_eq!(m.skipped(), [true, false, false]);
    }
}
