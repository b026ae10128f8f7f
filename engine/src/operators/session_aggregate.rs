//! `SessionAggregate`: `GROUP BY …, window_start, window_end` over `SESSION` windows.
//!
//! A session of a group key is a run of its rows in which each row is less than `gap` after
//! the previous one (in event time); it spans `[first row, last row + gap)`. Input rows carry
//! their own one-row session (`window_start` = event time, `window_end` = event time + gap,
//! from the SQL `SESSION` table function); this operator merges, per key, every session that
//! overlaps a new row's — a row may join two sessions into one.
//!
//! Sessions only take their final shape when they close, so the operator holds each open
//! session's rows (references into the batches they arrived in) and aggregates a session
//! when the horizon (watermark minus allowed lateness) passes its end: all sessions closing
//! together are gathered into one batch and fed, as one group each, to fresh DataFusion
//! accumulators — every DataFusion aggregate works, as for the other windows. Memory is the
//! rows of the open sessions.
//!
//! A row behind the horizon is late (it could extend a session already emitted): counted,
//! and sent to the errors zone unless the stream drops late rows. Output: the group columns
//! (the key from the session's first row; `window_start`, `window_end` the session's bounds)
//! then the aggregates. Forwards as watermark the horizon, held back to the earliest open
//! session's start. This is exactly what batch session windows return over the rows that
//! were on time.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, TimestampMicrosecondArray, UInt32Array};
use arrow::compute::{cast, take};
use arrow::record_batch::RecordBatch;
use arrow::row::{RowConverter, SortField};
use datafusion::logical_expr::EmitTo;
use datafusion::physical_expr::PhysicalExpr;

use super::window_aggregate::{aggregate_inputs, create_accumulators};
use super::{
    ForwardedWatermark, WindowAggregateSpec, bad_row, evaluate_all, evaluate_or_reject,
    gather_rows, restored_watermarks, save_watermarks,
};
use crate::checkpoint::{KeyFilter, OperatorState};
use crate::error::{EngineError, Result};
use crate::operator::{Collector, Operator};
use crate::time::EventTime;

type KeyMap<V> = HashMap<Box<[u8]>, V, foldhash::fast::RandomState>;

/// The layout of this operator's checkpointed state (bump it when the layout changes,
/// and regenerate `tests/golden/` with `SLUICE_GOLDEN_REGENERATE=1`).
const STATE_VERSION: u32 = 1;

#[derive(Debug)]
struct Session {
    start: i64,
    end: i64,
    /// (batch id, row) of every row in the session.
    rows: Vec<(u64, u32)>,
}

/// The running operator. See the module docs.
pub struct SessionAggregate {
    spec: WindowAggregateSpec,
    gap: i64,
    /// The group expressions other than the window's bounds.
    keys: Vec<Arc<dyn PhysicalExpr>>,
    converter: RowConverter,
    sessions: KeyMap<Vec<Session>>,
    /// Session ends to visit, by time; entries of sessions that grew or merged are skipped.
    ends: BinaryHeap<Reverse<(i64, Box<[u8]>)>>,
    /// Starts of the open sessions (a multiset), for the forwarded watermark.
    starts: BTreeMap<i64, usize>,
    /// Batches holding rows of open sessions, with how many rows each still holds.
    batches: HashMap<u64, (RecordBatch, usize)>,
    next_batch: u64,
    watermark: Option<i64>,
    forwarded: ForwardedWatermark,
    origin: String,
}

impl std::fmt::Debug for SessionAggregate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionAggregate")
            .field("keys", &self.sessions.len())
            .field("open_sessions", &self.starts.values().sum::<usize>())
            .finish()
    }
}

impl SessionAggregate {
    /// An operator for `spec` with session gap `gap` (µs) over batches of `input` schema;
    /// `origin` names the stream.
    pub fn try_new(
        spec: WindowAggregateSpec,
        gap: i64,
        input: &arrow::datatypes::Schema,
        origin: impl Into<String>,
    ) -> Result<Self> {
        if gap <= 0 {
            return Err(EngineError::Internal(
                "a session gap must be positive".into(),
            ));
        }
        let keys = spec.key_exprs();
        let fields = keys
            .iter()
            .map(|e| Ok(SortField::new(e.data_type(input)?)))
            .collect::<Result<Vec<_>>>()?;
        // Fail at CREATE time on aggregates that cannot run on these types.
        for a in &spec.aggregates {
            a.create_accumulator()?;
        }
        create_accumulators(&spec.aggregates)?;
        Ok(Self {
            converter: RowConverter::new(fields)?,
            keys,
            gap,
            spec,
            sessions: KeyMap::default(),
            ends: BinaryHeap::new(),
            starts: BTreeMap::new(),
            batches: HashMap::new(),
            next_batch: 0,
            watermark: None,
            forwarded: ForwardedWatermark::default(),
            origin: origin.into(),
        })
    }

    fn horizon(&self) -> i64 {
        self.watermark
            .map_or(i64::MIN, |w| self.spec.lateness.horizon(w))
    }

    fn add_start(&mut self, start: i64) {
        *self.starts.entry(start).or_default() += 1;
    }

    fn remove_start(&mut self, start: i64) {
        if let Some(n) = self.starts.get_mut(&start) {
            *n -= 1;
            if *n == 0 {
                self.starts.remove(&start);
            }
        }
    }

    /// Aggregates and emits `closed` sessions, and releases their rows.
    fn emit(&mut self, mut closed: Vec<Session>, out: &mut Collector) -> Result<()> {
        if closed.is_empty() {
            return Ok(());
        }
        // Merges concatenate rows in any order; (batch id, row) is the order of arrival.
        for s in &mut closed {
            s.rows.sort_unstable();
        }
        // Every row of every closed session, gathered into one batch.
        let mut groups = Vec::new();
        let mut first_rows = Vec::with_capacity(closed.len());
        for (g, s) in closed.iter().enumerate() {
            first_rows.push(groups.len() as u32);
            groups.extend(std::iter::repeat_n(g, s.rows.len()));
        }
        let input_schema = self
            .batches
            .values()
            .next()
            .map(|(b, _)| b.schema())
            .ok_or_else(|| EngineError::Internal("session rows without their batches".into()))?;
        let columns = gather_rows(
            &self.batches,
            closed.iter().flat_map(|s| s.rows.iter().copied()),
        )?;
        let rows = RecordBatch::try_new(input_schema, columns)?;
        let n = rows.num_rows();

        let first = UInt32Array::from(first_rows);
        let schema = Arc::clone(&self.spec.schema);
        let bound = |i: usize, values: Vec<i64>| -> Result<ArrayRef> {
            let a: ArrayRef =
                Arc::new(TimestampMicrosecondArray::from(values).with_timezone("UTC"));
            Ok(cast(&a, schema.field(i).data_type())?)
        };
        let mut out_columns = Vec::with_capacity(schema.fields().len());
        for (i, e) in self.spec.group_exprs.iter().enumerate() {
            if i == self.spec.window_start {
                out_columns.push(bound(i, closed.iter().map(|s| s.start).collect())?);
            } else if i == self.spec.window_end {
                out_columns.push(bound(i, closed.iter().map(|s| s.end).collect())?);
            } else {
                let values = e.evaluate(&rows)?.into_array(n)?;
                out_columns.push(take(values.as_ref(), &first, None)?);
            }
        }
        let mut accumulators = create_accumulators(&self.spec.aggregates)?;
        for (agg, acc) in self.spec.aggregates.iter().zip(&mut accumulators) {
            let args = aggregate_inputs(agg)
                .iter()
                .map(|e| Ok(e.evaluate(&rows)?.into_array(n)?))
                .collect::<Result<Vec<_>>>()?;
            acc.update_batch(&args, &groups, None, closed.len())?;
            out_columns.push(acc.evaluate(EmitTo::All)?);
        }
        out.emit(RecordBatch::try_new(schema, out_columns)?);

        for s in &closed {
            for &(b, _) in &s.rows {
                if let Some((_, live)) = self.batches.get_mut(&b) {
                    *live -= 1;
                    if *live == 0 {
                        self.batches.remove(&b);
                    }
                }
            }
        }
        Ok(())
    }

    /// Forwards the horizon, held back to the earliest open session's start.
    fn forward_watermark(&mut self, out: &mut Collector) {
        let held = self.starts.first_key_value().map(|(start, _)| *start);
        let horizon = self.horizon();
        self.forwarded.advance(horizon, held, out);
    }

    /// A batch's keys and event times. The aggregates' arguments are evaluated too, only to
    /// find the rows they fail on now: evaluated again when the session closes, they must
    /// not fail the stream then.
    fn evaluate(&self, batch: &RecordBatch) -> Result<(Vec<ArrayRef>, TimestampMicrosecondArray)> {
        for agg in &self.spec.aggregates {
            evaluate_all(&aggregate_inputs(agg), batch)?;
        }
        let times = self.spec.group_exprs[self.spec.window_start]
            .evaluate(batch)?
            .into_array(batch.num_rows())?
            .as_any()
            .downcast_ref::<TimestampMicrosecondArray>()
            .cloned()
            .ok_or_else(|| EngineError::Internal("session time is not a µs timestamp".into()))?;
        Ok((evaluate_all(&self.keys, batch)?, times))
    }
}

impl Operator for SessionAggregate {
    /// State: the watermarks, and table `rows`: every row of the open sessions, session by
    /// session in arrival order (input rows). Restoring feeds them in again with no
    /// watermark in force, which rebuilds the same sessions.
    fn snapshot(&mut self) -> Result<Option<OperatorState>> {
        let mut state = OperatorState {
            version: STATE_VERSION,
            ..OperatorState::default()
        };
        save_watermarks(&mut state, self.watermark, &self.forwarded);
        let held: Vec<(u64, u32)> = self
            .sessions
            .values()
            .flatten()
            .flat_map(|s| s.rows.iter().copied())
            .collect();
        if let Some((batch, _)) = self.batches.values().next()
            && !held.is_empty()
        {
            let schema = batch.schema();
            let columns = gather_rows(&self.batches, held.into_iter())?;
            state
                .tables
                .insert("rows".into(), RecordBatch::try_new(schema, columns)?);
        }
        Ok(Some(state))
    }

    fn restore(&mut self, parts: Vec<OperatorState>, keep: &KeyFilter) -> Result<()> {
        super::check_state_version(self.name(), &parts, STATE_VERSION)?;
        let (watermark, forwarded) = restored_watermarks(&parts);
        self.forwarded = forwarded;
        let mut rows = vec![];
        for part in parts {
            if let Some(t) = part.tables.get("rows")
                && let Some(mine) = keep.keep_rows(t)?
            {
                rows.push(mine);
            }
        }
        // No horizon while the held rows go in: none of them is late, as none was.
        self.watermark = None;
        let mut out = Collector::default();
        for batch in rows {
            self.process_batch(batch, &mut out)?;
        }
        if !out.take_messages().is_empty() || !out.take_rejected().is_empty() {
            return Err(EngineError::Internal(
                "session aggregate: restoring held rows emitted or rejected some".into(),
            ));
        }
        self.watermark = watermark;
        Ok(())
    }

    fn name(&self) -> &str {
        "session_aggregate"
    }

    fn process_batch(&mut self, batch: RecordBatch, out: &mut Collector) -> Result<()> {
        // Rows whose key, time or aggregate arguments fail to evaluate go to the errors zone.
        let Some((batch, (keys, times))) =
            evaluate_or_reject(batch, &self.origin, out, |b| self.evaluate(b))?
        else {
            return Ok(());
        };
        let n = batch.num_rows();
        let rows = self.converter.convert_columns(&keys)?;
        let horizon = self.horizon();
        let batch_id = self.next_batch;
        let mut held = 0usize;
        for i in 0..n {
            if times.is_null(i) {
                out.reject(bad_row(
                    &batch,
                    i,
                    &self.origin,
                    "the row has no session (NULL event time)",
                ));
                continue;
            }
            let t = times.value(i);
            if t < horizon {
                self.spec.lateness.late_row(
                    &batch,
                    i,
                    &self.origin,
                    &format!(
                        "late: event time {} is behind the watermark, so its session may already have been emitted",
                        EventTime(t)
                    ),
                    out,
                );
                continue;
            }
            held += 1;
            let (start, end) = (t, t.saturating_add(self.gap));
            let key = rows.row(i);
            let list = self.sessions.entry(key.as_ref().into()).or_default();
            // Every open session of this key that the row's own session overlaps merges
            // with it.
            let mut merged = Session {
                start,
                end,
                rows: vec![(batch_id, i as u32)],
            };
            let mut removed_starts = Vec::new();
            let mut k = 0;
            while k < list.len() {
                let s = &list[k];
                if s.start < end && start < s.end {
                    let s = list.swap_remove(k);
                    removed_starts.push(s.start);
                    merged.start = merged.start.min(s.start);
                    merged.end = merged.end.max(s.end);
                    let mut rows = s.rows;
                    rows.append(&mut merged.rows);
                    merged.rows = rows;
                } else {
                    k += 1;
                }
            }
            let (new_start, new_end) = (merged.start, merged.end);
            list.push(merged);
            for s in removed_starts {
                self.remove_start(s);
            }
            self.add_start(new_start);
            self.ends.push(Reverse((new_end, key.as_ref().into())));
        }
        if held > 0 {
            self.batches.insert(batch_id, (batch, held));
            self.next_batch += 1;
        }
        Ok(())
    }

    fn on_watermark(&mut self, t: EventTime, out: &mut Collector) -> Result<()> {
        self.watermark = Some(self.watermark.map_or(t.0, |w| w.max(t.0)));
        let horizon = self.horizon();
        let mut closed = Vec::new();
        while let Some(Reverse((end, _))) = self.ends.peek() {
            if *end > horizon {
                break;
            }
            let Reverse((end, key)) = self.ends.pop().expect("peeked");
            let Some(list) = self.sessions.get_mut(&key) else {
                continue;
            };
            // Entries of sessions that grew or merged since are stale: skip them.
            if let Some(k) = list.iter().position(|s| s.end == end) {
                let s = list.swap_remove(k);
                if list.is_empty() {
                    self.sessions.remove(&key);
                }
                self.remove_start(s.start);
                closed.push(s);
            }
        }
        self.emit(closed, out)?;
        self.forward_watermark(out);
        Ok(())
    }

    fn on_close(&mut self, out: &mut Collector) -> Result<()> {
        let closed: Vec<Session> = self.sessions.drain().flat_map(|(_, l)| l).collect();
        self.starts.clear();
        self.ends.clear();
        self.emit(closed, out)
    }
}

#[cfg(test)]
mod tests {
    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
    use datafusion::functions_aggregate::count::count_udaf;
    use datafusion::physical_expr::aggregate::AggregateExprBuilder;
    use datafusion::physical_expr::expressions::{col, lit};

    use super::*;
    use crate::message::Message;
    use crate::operators::Lateness;

    const GAP: i64 = 10;

    fn ts_type() -> DataType {
        DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
    }

    /// Input: key, window_start (= ts), window_end (= ts + gap).
    fn input() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, false),
            Field::new("window_start", ts_type(), false),
            Field::new("window_end", ts_type(), false),
        ]))
    }

    fn batch(rows: &[(i64, i64)]) -> RecordBatch {
        let ts = |f: fn(i64) -> i64| {
            Arc::new(
                TimestampMicrosecondArray::from_iter_values(rows.iter().map(|r| f(r.1)))
                    .with_timezone("UTC"),
            ) as ArrayRef
        };
        RecordBatch::try_new(
            input(),
            vec![
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.0))),
                ts(|t| t),
                ts(|t| t + GAP),
            ],
        )
        .unwrap()
    }

    fn operator() -> SessionAggregate {
        let schema = input();
        let count = AggregateExprBuilder::new(count_udaf(), vec![lit(1i64)])
            .schema(Arc::clone(&schema))
            .alias("n")
            .build()
            .unwrap();
        let output = Arc::new(Schema::new(vec![
            schema.field(0).clone(),
            schema.field(1).clone(),
            schema.field(2).clone(),
            Field::new("n", DataType::Int64, false),
        ]));
        let spec = WindowAggregateSpec {
            group_exprs: vec![
                col("k", &schema).unwrap(),
                col("window_start", &schema).unwrap(),
                col("window_end", &schema).unwrap(),
            ],
            window_start: 1,
            window_end: 2,
            lateness: Lateness::default(),
            aggregates: vec![Arc::new(count)],
            schema: output,
        };
        SessionAggregate::try_new(spec, GAP, &schema, "stream s").unwrap()
    }

    /// (key, start, end, count) of an emitted row.
    type Row = (i64, i64, i64, i64);

    /// The emitted rows, sorted; and the watermarks.
    fn drain(out: &mut Collector) -> (Vec<Row>, Vec<i64>) {
        let mut rows = vec![];
        let mut wms = vec![];
        for m in out.take_messages() {
            match m {
                Message::Data(b) => {
                    let i64s = |c: usize| -> Vec<i64> {
                        let a = b.column(c);
                        match a.as_any().downcast_ref::<Int64Array>() {
                            Some(a) => a.values().to_vec(),
                            None => a
                                .as_any()
                                .downcast_ref::<TimestampMicrosecondArray>()
                                .unwrap()
                                .values()
                                .to_vec(),
                        }
                    };
                    let (k, s, e, n) = (i64s(0), i64s(1), i64s(2), i64s(3));
                    for i in 0..b.num_rows() {
                        rows.push((k[i], s[i], e[i], n[i]));
                    }
                }
                Message::Watermark(t) => wms.push(t.0),
                _ => {}
            }
        }
        rows.sort();
        (rows, wms)
    }

    #[test]
    fn sessions_merge_close_on_the_watermark_and_reject_late_rows() {
        let mut op = operator();
        let mut out = Collector::default();
        // Key 1: 0, 5 (joined), 30 (new session); key 2: 3.
        op.process_batch(batch(&[(1, 0), (1, 5), (2, 3), (1, 30)]), &mut out)
            .unwrap();
        // 20 joins neither 0..15 nor 30..40 (30 is not less than 20 + 10): a session of its
        // own, until 12 bridges 0..15 and 20..30 into one.
        op.process_batch(batch(&[(1, 20), (1, 12)]), &mut out)
            .unwrap();
        op.on_watermark(EventTime(14), &mut out).unwrap();
        // Key 2's session 3..13 is closed; key 1's 0..30 is not (and holds the watermark at 0).
        assert_eq!(drain(&mut out), (vec![(2, 3, 13, 1)], vec![0]));
        op.on_watermark(EventTime(35), &mut out).unwrap();
        assert_eq!(drain(&mut out), (vec![(1, 0, 30, 4)], vec![30]));
        op.process_batch(batch(&[(1, 29), (1, 36)]), &mut out)
            .unwrap();
        let late = out.take_rejected();
        assert_eq!(late.len(), 1, "29 is behind the watermark");
        assert!(late[0].reason.starts_with("late:"), "{}", late[0].reason);
        op.on_close(&mut out).unwrap();
        assert_eq!(drain(&mut out).0, vec![(1, 30, 46, 2)]);
        assert!(op.batches.is_empty(), "every held batch released");
    }
}
