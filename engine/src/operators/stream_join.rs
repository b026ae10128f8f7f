//! `StreamJoin`: two inputs joined on equal keys within bounds of event time — Flink's
//! interval joins (`s.ts BETWEEN o.ts AND o.ts + INTERVAL '1' HOUR`) and window joins (both
//! sides windowed alike, joined on `window_start`, `window_end` and keys).
//!
//! Its contract:
//! - **Input**: one merged input whose rows come from either side. Column `side` (0: left,
//!   1: right) says which; then the join key (`keys`, computed by each side's branch, the
//!   same types on both); then the left side's columns, then the right side's (the other
//!   side's are NULL). Rows of one key reach one subtask (the key columns route them).
//! - **Matching**: a row is matched against the stored rows of the other side with an equal,
//!   non-NULL key; a pair is emitted when the residual `filter` (the time bounds and any
//!   other condition, over the output row) holds — at once, whichever side came second. The
//!   row is then stored.
//! - **Bounds**: each row has an *expiry*, from its side's `expiry` expression: the event
//!   time after which no row of the other side can match it (`o.ts + 1 hour` for the left of
//!   the interval join above, `s.ts - 0` for its right; `window_end` in a window join). Once
//!   the horizon (watermark minus allowed lateness) passes the expiry of every row of a
//!   stored batch, the batch is dropped; rows of a side an outer join preserves that never
//!   matched are emitted then, with NULLs for the other side. A row kept a little longer
//!   than its expiry cannot match wrongly: the filter holds the exact bounds.
//! - **Late rows**: a row whose event time is behind the horizon could have matched rows
//!   already dropped: it is late (errors zone or dropped, per the stream's `late_events`).
//! - **Watermark**: the horizon, held back to the earliest event time among stored rows of
//!   the side whose time the output carries (an emitted row is never behind it).
//! - **End of input**: every stored row an outer join preserves that never matched is
//!   emitted.
//!
//! Exactly the batch join of the rows that were on time (`tests/tests/differential.rs`).
//!
//! State: per side, the stored input batches (as they arrived, after late rows were taken
//! out), each with its rows' matched flags, the latest expiry and earliest event time among
//! its rows, and an index from encoded key to its rows (event time, batch, row) in time order
//! — an interval join's probe looks only at the other side's rows within the bounds.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, UInt32Array, new_null_array};
use arrow::compute::{filter_record_batch, take};
use arrow::datatypes::{DataType, SchemaRef};
use arrow::record_batch::RecordBatch;
use arrow::row::{RowConverter, Rows, SortField};
use datafusion::physical_expr::PhysicalExpr;

use super::{
    ForwardedWatermark, Lateness, check_state_version, restored_watermarks, save_watermarks,
};
use crate::checkpoint::{KeyFilter, OperatorState};
use crate::error::{EngineError, Result};
use crate::operator::{Collector, Operator};
use crate::time::EventTime;

/// The layout of this operator's checkpointed state (bump it when the layout changes).
const STATE_VERSION: u32 = 1;

/// Which rows without a match an outer join keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinKind {
    /// Only pairs.
    Inner,
    /// Pairs, and left rows without one.
    Left,
    /// Pairs, and right rows without one.
    Right,
    /// Pairs, and rows of either side without one.
    Full,
}

impl JoinKind {
    /// Whether rows of `side` (0 left, 1 right) without a match are emitted.
    fn preserves(self, side: usize) -> bool {
        matches!(
            (self, side),
            (JoinKind::Left | JoinKind::Full, 0) | (JoinKind::Right | JoinKind::Full, 1)
        )
    }
}

/// What a [`StreamJoin`] computes (see the module docs for the input layout).
#[derive(Debug, Clone)]
pub struct StreamJoinSpec {
    /// Inner or outer.
    pub kind: JoinKind,
    /// How many key columns follow the side column.
    pub keys: usize,
    /// The left side's columns in the input.
    pub left: Range<usize>,
    /// The right side's columns in the input.
    pub right: Range<usize>,
    /// Per side, a row's event time (over the whole input row; a timestamp or µs): what
    /// lateness is judged by.
    pub time: [Arc<dyn PhysicalExpr>; 2],
    /// Per side, the event time after which no row of the other side can match a row
    /// (over the whole input row; a timestamp).
    pub expiry: [Arc<dyn PhysicalExpr>; 2],
    /// The condition a pair must meet besides equal keys (over the output row).
    pub filter: Option<Arc<dyn PhysicalExpr>>,
    /// The output: the left side's columns, then the right side's.
    pub output: SchemaRef,
    /// The side whose event time the output carries, and that time of a row of it (over
    /// the whole input row): the watermark is held back to the earliest such time in state.
    /// None: the output has no event time.
    pub output_time: Option<(usize, Arc<dyn PhysicalExpr>)>,
    /// When a row is late.
    pub lateness: Lateness,
    /// An interval join's bounds `a ≤ r − l ≤ b` (µs) on the two sides' `time`s: a probe
    /// looks only at the other side's rows within them (the filter still decides). None:
    /// every row of the key (a window join, whose key holds the window).
    pub bounds: Option<(i64, i64)>,
}

/// A stored row in a key's index entry: its event time, batch and row.
#[derive(Debug, Clone, Copy)]
struct Entry {
    time: i64,
    batch: u64,
    row: u32,
}

/// One stored input batch.
#[derive(Debug)]
struct Stored {
    batch: RecordBatch,
    keys: Rows,
    /// Rows whose key has a NULL (in no index entry).
    null_key: Vec<bool>,
    matched: Vec<bool>,
    max_expiry: i64,
    /// The earliest output event time among its rows (the side the output's time is from).
    min_time: i64,
    /// The earliest and latest event time of its rows in the index: where its entries lie
    /// in each key's time-ordered list.
    entry_times: (i64, i64),
}

/// What [`StreamJoin::prepare`] computes of a batch.
struct Prepared {
    keys: Rows,
    null_key: Vec<bool>,
    times: Vec<Option<i64>>,
}

/// One side's state. (foldhash rather than std's SipHash: the index is looked up for every
/// row stored and probed; SipHash's DoS resistance buys nothing for keys already routed.)
#[derive(Debug, Default)]
struct Side {
    batches: HashMap<u64, Stored, foldhash::fast::RandomState>,
    /// Per key, its rows in event-time order.
    /// (A deque: rows expire oldest first, and the oldest are at its front.)
    index: HashMap<Box<[u8]>, VecDeque<Entry>, foldhash::fast::RandomState>,
    rows: usize,
}

/// See the module docs.
pub struct StreamJoin {
    spec: StreamJoinSpec,
    origin: String,
    converter: RowConverter,
    sides: [Side; 2],
    next_id: u64,
    watermark: Option<i64>,
    forwarded: ForwardedWatermark,
    /// Rows restored into state, reported with the first message handled.
    unreported: [i64; 2],
}

impl StreamJoin {
    /// A join per `spec` over input rows of `input`; `origin` names the stream in
    /// errors-zone records.
    pub fn new(spec: StreamJoinSpec, input: &SchemaRef, origin: &str) -> Result<Self> {
        let fields = (1..=spec.keys)
            .map(|i| SortField::new(input.field(i).data_type().clone()))
            .collect();
        Ok(Self {
            converter: RowConverter::new(fields)?,
            spec,
            origin: origin.to_string(),
            sides: [Side::default(), Side::default()],
            next_id: 0,
            watermark: None,
            forwarded: ForwardedWatermark::default(),
            unreported: [0, 0],
        })
    }

    fn range(&self, side: usize) -> Range<usize> {
        if side == 0 {
            self.spec.left.clone()
        } else {
            self.spec.right.clone()
        }
    }

    /// Rows stored on each side (for `SHOW STREAMS`).
    pub fn state_rows(&self) -> [usize; 2] {
        [self.sides[0].rows, self.sides[1].rows]
    }

    /// Bytes the state takes in memory: the stored batches' Arrow buffers, their encoded
    /// keys and per-row flags, and the index (its entries and keys; the hash tables' own
    /// slack aside). Walks the whole state: for measurements, not the hot path.
    pub fn state_bytes(&self) -> usize {
        let entry = std::mem::size_of::<Entry>();
        let slot = std::mem::size_of::<(Box<[u8]>, VecDeque<Entry>)>();
        self.sides
            .iter()
            .map(|s| {
                let batches: usize = s
                    .batches
                    .values()
                    .map(|b| {
                        b.batch.get_array_memory_size()
                            + b.keys.size()
                            + b.null_key.capacity()
                            + b.matched.capacity()
                    })
                    .sum();
                let index: usize = s
                    .index
                    .iter()
                    .map(|(k, v)| slot + k.len() + v.capacity() * entry)
                    .sum();
                batches + index
            })
            .sum()
    }

    fn horizon(&self) -> Option<i64> {
        self.watermark.map(|w| self.spec.lateness.horizon(w))
    }

    /// The output rows for `pairs` of (row of `batch` on `side`, stored row of the other side).
    fn pairs_batch(
        &self,
        side: usize,
        batch: &RecordBatch,
        pairs: &[(u32, (u64, u32))],
    ) -> Result<RecordBatch> {
        let other = 1 - side;
        let here = UInt32Array::from_iter_values(pairs.iter().map(|(r, _)| *r));
        let mine: Vec<ArrayRef> = self
            .range(side)
            .map(|c| take(batch.column(c), &here, None))
            .collect::<std::result::Result<_, _>>()?;
        let theirs = self.gather(other, pairs.iter().map(|(_, s)| *s))?;
        let (left, right) = if side == 0 {
            (mine, theirs)
        } else {
            (theirs, mine)
        };
        let columns: Vec<ArrayRef> = left.into_iter().chain(right).collect();
        Ok(RecordBatch::try_new(
            Arc::clone(&self.spec.output),
            columns,
        )?)
    }

    /// The columns of `side` of its stored rows `rows`.
    fn gather(
        &self,
        side: usize,
        rows: impl Iterator<Item = (u64, u32)> + Clone,
    ) -> Result<Vec<ArrayRef>> {
        let stored = &self.sides[side].batches;
        super::gather_columns(|id| &stored[&id].batch, self.range(side), rows)
    }

    /// Emits rows of `side` (of `batch`, at `rows`) with NULLs for the other side.
    fn emit_unmatched(
        &self,
        side: usize,
        batch: &RecordBatch,
        rows: &[u32],
        out: &mut Collector,
    ) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let idx = UInt32Array::from_iter_values(rows.iter().copied());
        let n = rows.len();
        let mine: Vec<ArrayRef> = self
            .range(side)
            .map(|c| take(batch.column(c), &idx, None))
            .collect::<std::result::Result<_, _>>()?;
        let other_fields = if side == 0 {
            self.spec.left.len()..self.spec.output.fields().len()
        } else {
            0..self.spec.left.len()
        };
        let nulls: Vec<ArrayRef> = other_fields
            .map(|i| new_null_array(self.spec.output.field(i).data_type(), n))
            .collect();
        let columns: Vec<ArrayRef> = if side == 0 {
            mine.into_iter().chain(nulls).collect()
        } else {
            nulls.into_iter().chain(mine).collect()
        };
        out.emit(RecordBatch::try_new(
            Arc::clone(&self.spec.output),
            columns,
        )?);
        Ok(())
    }

    /// The event times (µs) of `batch`'s rows on `side`.
    fn times(&self, side: usize, batch: &RecordBatch) -> Result<Vec<Option<i64>>> {
        super::micros(
            &self.spec.time[side]
                .evaluate(batch)
                .and_then(|v| v.into_array(batch.num_rows()))?,
        )
    }

    /// The encoded keys of `batch`'s rows, which have a NULL in their key, and their event
    /// times (µs) on `side` (`times` when the caller has them): computed once per batch, for
    /// the probe and the store.
    fn prepare(
        &self,
        side: usize,
        batch: &RecordBatch,
        times: Option<Vec<Option<i64>>>,
    ) -> Result<Prepared> {
        let n = batch.num_rows();
        let key_columns: Vec<ArrayRef> = (1..=self.spec.keys)
            .map(|i| Arc::clone(batch.column(i)))
            .collect();
        Ok(Prepared {
            keys: self.converter.convert_columns(&key_columns)?,
            null_key: (0..n)
                .map(|r| key_columns.iter().any(|k| k.is_null(r)))
                .collect(),
            times: match times {
                Some(t) => t,
                None => self.times(side, batch)?,
            },
        })
    }

    /// Stores `batch` (rows of `side`, none late, `prepared` for it) with the rows' matched
    /// flags; the state grew by its rows.
    fn store(
        &mut self,
        side: usize,
        batch: RecordBatch,
        prepared: Prepared,
        matched: Vec<bool>,
        out: &mut Collector,
    ) -> Result<()> {
        let n = batch.num_rows();
        if n == 0 {
            return Ok(());
        }
        let Prepared {
            keys,
            null_key,
            times,
        } = prepared;
        let expiry = self.spec.expiry[side]
            .evaluate(&batch)
            .and_then(|v| v.into_array(n))?;
        let max_expiry = super::micros(&expiry)?
            .into_iter()
            .map(|e| e.unwrap_or(i64::MIN))
            .max()
            .unwrap_or(i64::MIN);
        let min_time = match &self.spec.output_time {
            Some((s, e)) if *s == side => {
                super::micros(&e.evaluate(&batch).and_then(|v| v.into_array(n))?)?
                    .into_iter()
                    .flatten()
                    .min()
                    .unwrap_or(i64::MAX)
            }
            _ => i64::MAX,
        };
        let id = self.next_id;
        self.next_id += 1;
        let state = &mut self.sides[side];
        let mut entry_times = (i64::MAX, i64::MIN);
        for (r, null) in null_key.iter().enumerate() {
            if *null {
                continue;
            }
            let entry = Entry {
                time: times[r].unwrap_or(i64::MIN),
                batch: id,
                row: r as u32,
            };
            entry_times = (entry_times.0.min(entry.time), entry_times.1.max(entry.time));
            let key = keys.row(r);
            // A key seen before (the common case) costs no allocation.
            match state.index.get_mut(key.as_ref()) {
                Some(entries) => {
                    // Rows come nearly in time order: almost always an append.
                    let at = entries.partition_point(|e| e.time <= entry.time);
                    entries.insert(at, entry);
                }
                None => {
                    state
                        .index
                        .insert(key.as_ref().into(), VecDeque::from([entry]));
                }
            }
        }
        state.rows += n;
        out.add_state_rows(side, n as i64);
        state.batches.insert(
            id,
            Stored {
                batch,
                keys,
                null_key,
                matched,
                max_expiry,
                min_time,
                entry_times,
            },
        );
        Ok(())
    }

    /// Rows of one side: late ones out, the rest matched against the other side and stored.
    fn process_side(&mut self, side: usize, batch: RecordBatch, out: &mut Collector) -> Result<()> {
        let n = batch.num_rows();
        let times = self.times(side, &batch)?;
        let (batch, times) = match self.horizon() {
            Some(h) => {
                let mut keep = Vec::with_capacity(n);
                let first = if side == 0 { 0 } else { self.spec.left.len() };
                let mut shown: Option<RecordBatch> = None;
                for (r, t) in times.iter().enumerate() {
                    let late = t.is_none_or(|t| t < h);
                    if late {
                        let reason = match t {
                            Some(_) => {
                                "late: its event time is behind the watermark, so rows it could have joined with are gone"
                            }
                            None => "no event time (NULL)",
                        };
                        let shown = shown.get_or_insert_with(|| {
                            super::side_rows(&batch, self.range(side), &self.spec.output, first)
                        });
                        self.spec
                            .lateness
                            .late_row(shown, r, &self.origin, reason, out);
                    }
                    keep.push(!late);
                }
                if keep.iter().all(|k| *k) {
                    (batch, times)
                } else {
                    let on_time = times
                        .iter()
                        .zip(&keep)
                        .filter(|(_, k)| **k)
                        .map(|(t, _)| *t)
                        .collect();
                    (
                        filter_record_batch(&batch, &BooleanArray::from(keep))?,
                        on_time,
                    )
                }
            }
            None => (batch, times),
        };
        let n = batch.num_rows();
        if n == 0 {
            return Ok(());
        }
        let prepared = self.prepare(side, &batch, Some(times))?;
        let other = 1 - side;
        let mut pairs: Vec<(u32, (u64, u32))> = vec![];
        for (r, time) in prepared.times.iter().enumerate() {
            if prepared.null_key[r] {
                continue;
            }
            let Some(found) = self.sides[other].index.get(prepared.keys.row(r).as_ref()) else {
                continue;
            };
            // The other side's times a match can have: r − l ∈ [a, b].
            let range = match (self.spec.bounds, *time) {
                (Some((a, b)), Some(t)) if side == 0 => (t.saturating_add(a), t.saturating_add(b)),
                (Some((a, b)), Some(t)) => (t.saturating_sub(b), t.saturating_sub(a)),
                _ => (i64::MIN, i64::MAX),
            };
            let from = found.partition_point(|e| e.time < range.0);
            let to = found.partition_point(|e| e.time <= range.1);
            pairs.extend(
                found
                    .range(from..to.max(from))
                    .map(|e| (r as u32, (e.batch, e.row))),
            );
        }
        let mut matched = vec![false; n];
        if !pairs.is_empty() {
            let candidates = self.pairs_batch(side, &batch, &pairs)?;
            let (joined, passed) = match &self.spec.filter {
                Some(f) => {
                    let mask = f
                        .evaluate(&candidates)
                        .and_then(|v| v.into_array(candidates.num_rows()))?;
                    let mask = mask.as_boolean_opt().ok_or_else(|| {
                        EngineError::Internal("join: the condition is not boolean".into())
                    })?;
                    let passed: Vec<bool> = (0..mask.len())
                        .map(|i| mask.is_valid(i) && mask.value(i))
                        .collect();
                    (filter_record_batch(&candidates, mask)?, passed)
                }
                None => (candidates, vec![true; pairs.len()]),
            };
            out.emit(joined);
            let track_other = self.spec.kind.preserves(other);
            for ((r, (id, row)), ok) in pairs.iter().zip(passed) {
                if ok {
                    matched[*r as usize] = true;
                    if track_other && let Some(s) = self.sides[other].batches.get_mut(id) {
                        s.matched[*row as usize] = true;
                    }
                }
            }
        }
        self.store(side, batch, prepared, matched, out)
    }

    /// Drops the stored batches of `side` whose every row is past the horizon, emitting the
    /// unmatched rows an outer join keeps (all of them when `everything`).
    fn expire(&mut self, side: usize, horizon: i64, out: &mut Collector) -> Result<()> {
        let gone: Vec<u64> = self.sides[side]
            .batches
            .iter()
            .filter(|(_, s)| s.max_expiry < horizon)
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            self.drop_batch(side, id, out)?;
        }
        Ok(())
    }

    fn drop_batch(&mut self, side: usize, id: u64, out: &mut Collector) -> Result<()> {
        let state = &mut self.sides[side];
        let Some(stored) = state.batches.remove(&id) else {
            return Ok(());
        };
        state.rows -= stored.batch.num_rows();
        out.add_state_rows(side, -(stored.batch.num_rows() as i64));
        // Each key of the batch once: its entries of this batch go in one pass.
        let mut keys: Vec<&[u8]> = (0..stored.batch.num_rows())
            .filter(|r| !stored.null_key[*r])
            .map(|r| stored.keys.row(r).data())
            .collect();
        keys.sort_unstable();
        keys.dedup();
        // Its entries lie within its rows' times in each key's time-ordered list: only that
        // stretch is searched (rows come nearly in time order, so it is short).
        let (earliest, latest) = stored.entry_times;
        for key in keys {
            if let Some(entries) = state.index.get_mut(key) {
                // The common case: the oldest entries, at the front.
                while entries.front().is_some_and(|e| e.batch == id) {
                    entries.pop_front();
                }
                let from = entries.partition_point(|e| e.time < earliest);
                let to = entries.partition_point(|e| e.time <= latest).max(from);
                let mut kept = from;
                for i in from..to {
                    if entries[i].batch != id {
                        entries.swap(kept, i);
                        kept += 1;
                    }
                }
                entries.drain(kept..to);
                if entries.is_empty() {
                    state.index.remove(key);
                }
            }
        }
        if self.spec.kind.preserves(side) {
            let unmatched: Vec<u32> = (0..stored.batch.num_rows())
                .filter(|r| !stored.matched[*r])
                .map(|r| r as u32)
                .collect();
            self.emit_unmatched(side, &stored.batch, &unmatched, out)?;
        }
        Ok(())
    }

    fn forward_watermark(&mut self, out: &mut Collector) {
        let Some(horizon) = self.horizon() else {
            return;
        };
        let held = self
            .spec
            .output_time
            .as_ref()
            .and_then(|(side, _)| self.sides[*side].batches.values().map(|s| s.min_time).min());
        self.forwarded.advance(horizon, held, out);
    }
}

impl Operator for StreamJoin {
    fn name(&self) -> &str {
        "join"
    }

    fn process_batch(&mut self, batch: RecordBatch, out: &mut Collector) -> Result<()> {
        out.add_state_rows_by_side(std::mem::take(&mut self.unreported));
        let sides = batch
            .column(0)
            .as_primitive::<arrow::datatypes::UInt8Type>();
        let first = sides.value(0);
        if sides.values().iter().all(|s| *s == first) {
            return self.process_side(usize::from(first != 0), batch, out);
        }
        for side in [0u8, 1] {
            let mask = BooleanArray::from_iter(sides.values().iter().map(|s| Some(*s == side)));
            let part = filter_record_batch(&batch, &mask)?;
            if part.num_rows() > 0 {
                self.process_side(usize::from(side), part, out)?;
            }
        }
        Ok(())
    }

    fn on_watermark(&mut self, t: EventTime, out: &mut Collector) -> Result<()> {
        out.add_state_rows_by_side(std::mem::take(&mut self.unreported));
        if self.watermark.is_some_and(|w| w >= t.0) {
            return Ok(());
        }
        self.watermark = Some(t.0);
        let horizon = self.spec.lateness.horizon(t.0);
        for side in [0, 1] {
            self.expire(side, horizon, out)?;
        }
        self.forward_watermark(out);
        Ok(())
    }

    fn on_close(&mut self, out: &mut Collector) -> Result<()> {
        out.add_state_rows_by_side(std::mem::take(&mut self.unreported));
        for side in [0, 1] {
            let mut ids: Vec<u64> = self.sides[side].batches.keys().copied().collect();
            ids.sort_unstable();
            for id in ids {
                self.drop_batch(side, id, out)?;
            }
        }
        Ok(())
    }

    /// State: per side a table of the stored input rows with a last column `matched`; the
    /// watermarks.
    fn snapshot(&mut self) -> Result<Option<OperatorState>> {
        let mut state = OperatorState {
            version: STATE_VERSION,
            ..OperatorState::default()
        };
        for (side, name) in [(0, "left"), (1, "right")] {
            let mut ids: Vec<u64> = self.sides[side].batches.keys().copied().collect();
            ids.sort_unstable();
            let mut parts = vec![];
            for id in ids {
                let s = &self.sides[side].batches[&id];
                let mut columns = s.batch.columns().to_vec();
                columns.push(Arc::new(BooleanArray::from(s.matched.clone())));
                let mut fields: Vec<arrow::datatypes::FieldRef> =
                    s.batch.schema().fields().iter().cloned().collect();
                fields.push(Arc::new(arrow::datatypes::Field::new(
                    "matched",
                    DataType::Boolean,
                    false,
                )));
                parts.push(RecordBatch::try_new(
                    Arc::new(arrow::datatypes::Schema::new(fields)),
                    columns,
                )?);
            }
            if let Some(first) = parts.first() {
                let table = arrow::compute::concat_batches(&first.schema(), &parts)?;
                state.tables.insert(name.into(), table);
            }
        }
        save_watermarks(&mut state, self.watermark, &self.forwarded);
        Ok(Some(state))
    }

    fn restore(&mut self, parts: Vec<OperatorState>, keep: &KeyFilter) -> Result<()> {
        check_state_version(self.name(), &parts, STATE_VERSION)?;
        (self.watermark, self.forwarded) = restored_watermarks(&parts);
        let mut counted = Collector::default();
        for part in parts {
            for (side, name) in [(0, "left"), (1, "right")] {
                let Some(table) = part.tables.get(name) else {
                    continue;
                };
                let Some(mine) = keep.keep_rows(table)? else {
                    continue;
                };
                let last = mine.num_columns() - 1;
                let matched: Vec<bool> = mine
                    .column(last)
                    .as_boolean_opt()
                    .ok_or_else(|| {
                        EngineError::Checkpoint("join: `matched` is not boolean".into())
                    })?
                    .iter()
                    .map(|m| m.unwrap_or(false))
                    .collect();
                let mut rows = mine;
                rows.remove_column(last);
                let prepared = self.prepare(side, &rows, None)?;
                self.store(side, rows, prepared, matched, &mut counted)?;
            }
        }
        let restored = counted.take_counts().state_rows;
        self.unreported = [
            self.unreported[0] + restored[0],
            self.unreported[1] + restored[1],
        ];
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use arrow::array::{Int64Array, UInt8Array};
    use arrow::datatypes::{Field, Schema};
    use datafusion::physical_expr::expressions::{BinaryExpr, Column, Literal};
    use datafusion::scalar::ScalarValue;

    use super::*;
    use crate::message::Message;

    /// `l JOIN r ON l.k = r.k AND r.t BETWEEN l.t AND l.t + 10` (times as plain µs), left outer.
    fn join() -> (StreamJoin, SchemaRef) {
        let int = |n: &str| Field::new(n, DataType::Int64, true);
        let input: SchemaRef = Arc::new(Schema::new(vec![
            Field::new("side", DataType::UInt8, false),
            int("__key0"),
            int("__l0"),
            int("__l1"),
            int("__r0"),
            int("__r1"),
        ]));
        let output: SchemaRef =
            Arc::new(Schema::new(vec![int("k"), int("t"), int("k"), int("r_t")]));
        let col = |n: &str, i: usize| Arc::new(Column::new(n, i)) as Arc<dyn PhysicalExpr>;
        let plus = |e: Arc<dyn PhysicalExpr>, d: i64| -> Arc<dyn PhysicalExpr> {
            Arc::new(BinaryExpr::new(
                e,
                datafusion::logical_expr::Operator::Plus,
                Arc::new(Literal::new(ScalarValue::Int64(Some(d)))),
            ))
        };
        let between: Arc<dyn PhysicalExpr> = Arc::new(BinaryExpr::new(
            Arc::new(BinaryExpr::new(
                col("r_t", 3),
                datafusion::logical_expr::Operator::GtEq,
                col("t", 1),
            )),
            datafusion::logical_expr::Operator::And,
            Arc::new(BinaryExpr::new(
                col("r_t", 3),
                datafusion::logical_expr::Operator::LtEq,
                plus(col("t", 1), 10),
            )),
        ));
        let spec = StreamJoinSpec {
            kind: JoinKind::Left,
            keys: 1,
            left: 2..4,
            right: 4..6,
            time: [col("__l1", 3), col("__r1", 5)],
            expiry: [plus(col("__l1", 3), 10), col("__r1", 5)],
            filter: Some(between),
            output: Arc::clone(&output),
            output_time: Some((0, col("__l1", 3))),
            lateness: Lateness::default(),
            bounds: Some((0, 10)),
        };
        (StreamJoin::new(spec, &input, "stream j").unwrap(), input)
    }

    fn rows(input: &SchemaRef, side: u8, rows: &[(i64, i64)]) -> RecordBatch {
        let n = rows.len();
        let key = Int64Array::from_iter_values(rows.iter().map(|r| r.0));
        let t = Int64Array::from_iter_values(rows.iter().map(|r| r.1));
        let none = || Arc::new(Int64Array::new_null(n)) as ArrayRef;
        let (l, r): (Vec<ArrayRef>, Vec<ArrayRef>) = if side == 0 {
            (
                vec![Arc::new(key.clone()), Arc::new(t)],
                vec![none(), none()],
            )
        } else {
            (
                vec![none(), none()],
                vec![Arc::new(key.clone()), Arc::new(t)],
            )
        };
        let mut columns: Vec<ArrayRef> =
            vec![Arc::new(UInt8Array::from(vec![side; n])), Arc::new(key)];
        columns.extend(l);
        columns.extend(r);
        RecordBatch::try_new(Arc::clone(input), columns).unwrap()
    }

    fn data(out: &mut Collector) -> Vec<String> {
        let mut got = vec![];
        for m in out.take_messages() {
            if let Message::Data(b) = m {
                for r in 0..b.num_rows() {
                    got.push(super::super::row_to_json(&b, r));
                }
            }
        }
        got
    }

    #[test]
    fn pairs_at_once_outer_rows_at_their_bound_late_rows_named_as_the_query_names_them() {
        let (mut j, input) = join();
        let mut out = Collector::default();
        j.process_batch(rows(&input, 0, &[(1, 100), (2, 100)]), &mut out)
            .unwrap();
        j.process_batch(rows(&input, 1, &[(1, 105), (1, 200)]), &mut out)
            .unwrap();
        // The pair comes with the second row; r_t 200 is outside the bound.
        assert_eq!(data(&mut out), [r#"{"k":1,"t":100,"k":1,"r_t":105}"#]);
        assert_eq!(j.state_rows(), [2, 2]);
        // The horizon passes 110 (left rows' bound): key 2 had no match.
        j.on_watermark(EventTime(111), &mut out).unwrap();
        let emitted = data(&mut out);
        assert_eq!(emitted, [r#"{"k":2,"t":100}"#]);
        assert_eq!(j.state_rows()[0], 0);
        // A right row behind the horizon is late, reported with the query's column names.
        j.process_batch(rows(&input, 1, &[(1, 50)]), &mut out)
            .unwrap();
        let late = out.take_rejected();
        assert_eq!(late.len(), 1);
        assert_eq!(late[0].payload, r#"{"k":1,"r_t":50}"#, "{late:?}");
        assert_eq!(out.take_counts().late, 1);
        // Restored at another moment: the state comes back whole.
        let snapshot = j.snapshot().unwrap().unwrap();
        let (mut again, _) = join();
        again.restore(vec![snapshot], &KeyFilter::all()).unwrap();
        assert_eq!(again.state_rows(), j.state_rows());
    }
}
