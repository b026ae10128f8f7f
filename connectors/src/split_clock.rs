//! [`SplitClock`]: event time per split (a Kafka partition, a Kinesis shard, or the one
//! split of a source that has no others) and the source's watermark over them;
//! [`SourceClock`], the watermark generator every source reader uses.
//!
//! Each split's own watermark is the largest event time it delivered minus the declared
//! delay. The source's is the smallest over the splits still delivering: a split that lags —
//! or has delivered nothing yet — holds event time back (Flink's rule), so a split fetched
//! later cannot find its rows behind a watermark the others set. A split quiet for the
//! source's `idle_timeout` stops counting until it delivers again; when every split is quiet,
//! nothing is pending and the watermark is the largest of theirs. A split that has ended
//! (a closed Kinesis shard read to its end) no longer counts at all.
//!
//! The clock is part of a reader's checkpoint ([`ClockState`] in its position): after a
//! restart the reader resumes with each split's largest event time and sends the watermark
//! it had sent at once, so what the restored operators hold back is emitted even when the
//! source stays quiet. Restored splits count as having delivered at the restart, so the
//! idle rules apply to them as before it.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Instant;

use arrow::array::TimestampMicrosecondArray;
use arrow::record_batch::RecordBatch;
use sluice_engine::source::WatermarkSpec;
use sluice_engine::{EventTime, Message, SourceContext};

/// Event time of one split.
#[derive(Debug)]
struct SplitTime {
    max_seen: Option<i64>,
    last_record: Instant,
}

/// Event time per split, keyed by `K`.
#[derive(Debug)]
pub struct SplitClock<K: Ord> {
    splits: BTreeMap<K, SplitTime>,
}

impl<K: Ord> Default for SplitClock<K> {
    fn default() -> Self {
        Self {
            splits: BTreeMap::new(),
        }
    }
}

impl<K: Ord> SplitClock<K> {
    /// Starts tracking `split` (holding the watermark back until it delivers); no effect on a
    /// split already tracked.
    pub fn add(&mut self, split: K) {
        self.splits.entry(split).or_insert(SplitTime {
            max_seen: None,
            last_record: Instant::now(),
        });
    }

    /// `split` delivered records now, the latest at `max_event_time` (if any has one).
    pub fn delivered(&mut self, split: K, max_event_time: Option<i64>) {
        let t = self.splits.entry(split).or_insert(SplitTime {
            max_seen: None,
            last_record: Instant::now(),
        });
        t.last_record = Instant::now();
        if let Some(m) = max_event_time {
            t.max_seen = Some(t.max_seen.map_or(m, |s| s.max(m)));
        }
    }

    /// `split` has ended: it no longer holds the watermark back.
    pub fn remove(&mut self, split: &K) {
        self.splits.remove(split);
    }

    /// The source's watermark now, by the rules in the module docs.
    pub fn watermark(&self, spec: &WatermarkSpec) -> Option<i64> {
        let now = Instant::now();
        let own = |t: &SplitTime| t.max_seen.map(|m| m.saturating_sub(spec.delay_micros));
        let (active, idle): (Vec<&SplitTime>, Vec<&SplitTime>) =
            self.splits.values().partition(|t| {
                spec.idle_timeout
                    .is_none_or(|idle| now - t.last_record < idle)
            });
        if active.is_empty() {
            return idle.iter().filter_map(|t| own(t)).max();
        }
        let mut min: Option<i64> = None;
        for t in active {
            let wm = own(t)?;
            min = Some(min.map_or(wm, |m| m.min(wm)));
        }
        min
    }
}

impl<K: Ord + ToString + FromStr> SplitClock<K> {
    /// What a checkpoint keeps of the clock: each split's largest event time, and
    /// `emitted`, the watermark the reader last sent.
    pub fn state(&self, emitted: Option<i64>) -> ClockState {
        ClockState {
            splits: self
                .splits
                .iter()
                .filter_map(|(k, t)| Some((k.to_string(), t.max_seen?)))
                .collect(),
            emitted,
        }
    }

    /// Takes back each split's largest event time from a checkpoint (as delivered now);
    /// returns the watermark the reader had sent.
    pub fn restore(&mut self, state: &ClockState) -> Option<i64> {
        for (k, max) in &state.splits {
            if let Ok(k) = k.parse::<K>() {
                self.delivered(k, Some(*max));
            }
        }
        state.emitted
    }
}

/// A reader's event time as its checkpointed position holds it (under `"event_time"`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClockState {
    /// Per split (its name as text), the largest event time delivered, µs.
    pub splits: BTreeMap<String, i64>,
    /// The watermark the reader had sent, µs.
    pub emitted: Option<i64>,
}

impl ClockState {
    /// Adds the state to a position object as `"event_time": {"splits": {…}, "watermark": w}`.
    pub fn write_into(&self, position: &mut serde_json::Value) {
        if let Some(obj) = position.as_object_mut() {
            obj.insert(
                "event_time".into(),
                serde_json::json!({ "splits": self.splits, "watermark": self.emitted }),
            );
        }
    }

    /// The state in a position written by [`Self::write_into`]; empty for a position
    /// without one (written before event time was checkpointed). `None` when it is there
    /// but malformed.
    pub fn read_from(position: &serde_json::Value) -> Option<Self> {
        let Some(v) = position.get("event_time") else {
            return Some(Self::default());
        };
        let splits = v
            .get("splits")?
            .as_object()?
            .iter()
            .map(|(k, t)| Some((k.clone(), t.as_i64()?)))
            .collect::<Option<_>>()?;
        let emitted = match v.get("watermark") {
            None | Some(serde_json::Value::Null) => None,
            Some(w) => Some(w.as_i64()?),
        };
        Some(Self { splits, emitted })
    }
}

/// Sends the watermark a reader restored from its checkpoint (see [`SplitClock::restore`]),
/// before anything else: the promise it made before the restart still holds.
pub async fn resend_watermark(ctx: &SourceContext, emitted: Option<i64>) {
    if let (Some(_), Some(wm)) = (&ctx.watermark, emitted) {
        ctx.metrics.observe_watermark(EventTime(wm));
        ctx.output.send(Message::Watermark(EventTime(wm))).await;
    }
}

/// The event-time column of a source's `rows`, when it declares one.
pub fn event_times<'a>(
    ctx: &SourceContext,
    rows: &'a RecordBatch,
) -> Option<&'a TimestampMicrosecondArray> {
    let spec = ctx.watermark.as_ref()?;
    let col = rows.schema().index_of(&spec.column).ok()?;
    rows.column(col)
        .as_any()
        .downcast_ref::<TimestampMicrosecondArray>()
}

/// Sends `clock`'s watermark downstream if it advanced past `emitted`.
pub async fn advance_watermark<K: Ord>(
    ctx: &SourceContext,
    clock: &SplitClock<K>,
    emitted: &mut Option<i64>,
) {
    let Some(spec) = &ctx.watermark else { return };
    if let Some(wm) = clock.watermark(spec)
        && emitted.is_none_or(|e| wm > e)
    {
        *emitted = Some(wm);
        ctx.metrics.observe_watermark(EventTime(wm));
        ctx.output.send(Message::Watermark(EventTime(wm))).await;
    }
}

/// A reader's event time and the watermarks it sends: the one watermark generator every
/// source uses — per split, with idleness, checkpointed ([`SplitClock`] plus the watermark
/// last sent). A source with one split keys it by [`OneSplit`].
#[derive(Debug)]
pub struct SourceClock<K: Ord> {
    splits: SplitClock<K>,
    emitted: Option<i64>,
}

impl<K: Ord> Default for SourceClock<K> {
    fn default() -> Self {
        Self {
            splits: SplitClock::default(),
            emitted: None,
        }
    }
}

impl<K: Ord> SourceClock<K> {
    /// Starts tracking `split`: it holds the watermark back until it delivers.
    pub fn add(&mut self, split: K) {
        self.splits.add(split);
    }

    /// `split` has ended: it no longer holds the watermark back.
    pub fn remove(&mut self, split: &K) {
        self.splits.remove(split);
    }

    /// Sends `rows` downstream (counting them), then the watermark if it advanced. `latest`
    /// names each split that delivered in this batch — also those whose records all failed
    /// to decode — with the largest event time among its rows.
    pub async fn publish(
        &mut self,
        ctx: &SourceContext,
        rows: RecordBatch,
        latest: impl IntoIterator<Item = (K, Option<i64>)>,
    ) {
        let mut max: Option<i64> = None;
        for (split, m) in latest {
            max = max.max(m);
            self.splits.delivered(split, m);
        }
        if let Some(m) = max {
            ctx.metrics.observe_event_time(EventTime(m));
        }
        sluice_engine::source::publish(ctx, rows).await;
        self.tick(ctx).await;
    }

    /// Sends the watermark if it advanced (call it now and then: quiet splits turn idle).
    pub async fn tick(&mut self, ctx: &SourceContext) {
        advance_watermark(ctx, &self.splits, &mut self.emitted).await;
    }
}

impl SourceClock<OneSplit> {
    /// [`Self::publish`] for a source with one split: the event time is the rows' largest.
    pub async fn publish_one(&mut self, ctx: &SourceContext, rows: RecordBatch) {
        let max = event_times(ctx, &rows).and_then(arrow::compute::max);
        self.publish(ctx, rows, [(OneSplit, max)]).await;
    }
}

impl<K: Ord + ToString + FromStr> SourceClock<K> {
    /// What a checkpoint keeps of it.
    pub fn state(&self) -> ClockState {
        self.splits.state(self.emitted)
    }

    /// Takes its state back from a checkpoint (send the watermark it had sent with
    /// [`resend_watermark`] first, when the reader starts).
    pub fn restore(&mut self, state: &ClockState) {
        let emitted = self.splits.restore(state);
        self.emitted = self.emitted.max(emitted);
    }
}

/// The split of a source that has one: an HTTP endpoint, a landing zone, a generator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct OneSplit;

impl std::fmt::Display for OneSplit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("all")
    }
}

impl FromStr for OneSplit {
    type Err = std::convert::Infallible;

    fn from_str(_: &str) -> Result<Self, Self::Err> {
        Ok(OneSplit)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn spec(idle: Option<Duration>) -> WatermarkSpec {
        WatermarkSpec {
            column: "ts".into(),
            delay_micros: 10,
            idle_timeout: idle,
        }
    }

    #[test]
    fn the_slowest_split_holds_the_watermark_until_it_ends() {
        let mut c = SplitClock::default();
        c.add(1);
        c.add(2);
        c.delivered(1, Some(100));
        assert_eq!(
            c.watermark(&spec(None)),
            None,
            "split 2 has delivered nothing"
        );
        c.delivered(2, Some(50));
        assert_eq!(c.watermark(&spec(None)), Some(40));
        c.remove(&2);
        assert_eq!(c.watermark(&spec(None)), Some(90));
    }

    #[test]
    fn a_restored_clock_has_every_split_and_the_watermark_it_had() {
        let mut c = SplitClock::default();
        c.add(1);
        c.add(2);
        c.add(3);
        c.delivered(1, Some(100));
        c.delivered(2, Some(70));
        let mut position = serde_json::json!({ "offsets": {} });
        c.state(Some(60)).write_into(&mut position);
        let state = ClockState::read_from(&position).unwrap();
        let mut restored: SplitClock<i32> = SplitClock::default();
        restored.add(3);
        assert_eq!(restored.restore(&state), Some(60));
        assert_eq!(
            restored.watermark(&spec(None)),
            None,
            "split 3 had delivered nothing: it still holds the watermark back"
        );
        restored.delivered(3, Some(500));
        assert_eq!(
            restored.watermark(&spec(None)),
            Some(60),
            "min(100, 70, 500) - 10"
        );
        assert_eq!(
            ClockState::read_from(&serde_json::json!({ "offsets": {} })),
            Some(ClockState::default()),
            "positions of older checkpoints have no event time"
        );
    }

    #[test]
    fn quiet_splits_stop_counting_after_the_idle_timeout() {
        let mut c = SplitClock::default();
        c.add("a");
        c.add("b");
        c.delivered("a", Some(100));
        std::thread::sleep(Duration::from_millis(20));
        let idle = spec(Some(Duration::from_millis(10)));
        // Both quiet: nothing pending, the largest.
        assert_eq!(c.watermark(&idle), Some(90));
        c.delivered("b", Some(30));
        assert_eq!(c.watermark(&idle), Some(20), "b delivers again: it counts");
    }
}
