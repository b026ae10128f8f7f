//! `TemporalJoin`: each row of the left side joined with the version of its key the right
//! side (a keyed relation: each row the new version of its primary key) had at the left
//! row's time — Flink's `JOIN versioned FOR SYSTEM_TIME AS OF l.ts`.
//!
//! Its contract:
//! - **Input**: the merged layout of [`super::StreamJoin`] (`side`, the key columns, the left
//!   side's columns, the right side's); the key is the right side's primary key.
//! - **Event time** (`as_of` given): a left row waits until the horizon (watermark minus
//!   allowed lateness) passes its `as_of` time — then every version up to that time has
//!   arrived — and is joined with the latest version whose time is at or before it (ties: the
//!   last to arrive). Without one it is dropped, or kept with NULLs (`LEFT JOIN`). A right
//!   row behind the horizon, or a left row whose time is, is late.
//! - **Processing time** (`as_of` none: `PROCTIME()`): a left row is joined at once with the
//!   latest version of its key that has arrived.
//! - **State**: per key, the versions not yet superseded below the horizon (the one in force
//!   at the horizon and any later ones); the left rows waiting.
//! - **Watermark**: the horizon, held back to the earliest waiting left row.
//! - **End of input**: waiting left rows are joined with what has arrived.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, new_null_array};
use arrow::compute::filter_record_batch;
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use arrow::row::{RowConverter, SortField};
use datafusion::physical_expr::PhysicalExpr;

use super::{
    ForwardedWatermark, Lateness, check_state_version, restored_watermarks, save_watermarks,
};
use crate::checkpoint::{KeyFilter, OperatorState};
use crate::error::{EngineError, Result};
use crate::operator::{Collector, Operator};
use crate::time::EventTime;

const STATE_VERSION: u32 = 1;

/// A stored row: (batch, row).
type Loc = (u64, u32);
/// An encoded key.
type Key = Box<[u8]>;
/// Ordered by (event time, arrival).
type At = (i64, u64);

/// What a [`TemporalJoin`] computes.
#[derive(Debug, Clone)]
pub struct TemporalJoinSpec {
    /// `LEFT JOIN`: left rows without a version are kept, with NULLs.
    pub left_outer: bool,
    /// How many key columns follow the side column.
    pub keys: usize,
    /// The left side's columns in the input.
    pub left: Range<usize>,
    /// The right side's columns in the input.
    pub right: Range<usize>,
    /// A left row's time (over the input row); none: processing time.
    pub as_of: Option<Arc<dyn PhysicalExpr>>,
    /// A right row's version time (over the input row).
    pub version_time: Arc<dyn PhysicalExpr>,
    /// A condition besides the key (over the output row); a left row whose version fails it
    /// is treated as having none.
    pub filter: Option<Arc<dyn PhysicalExpr>>,
    /// The output: the left side's columns, then the right side's.
    pub output: SchemaRef,
    /// When a row is late.
    pub lateness: Lateness,
}

/// A stored input batch and how many of its rows are still referenced.
#[derive(Debug)]
struct Stored {
    batch: RecordBatch,
    live: usize,
    /// 0: left rows waiting, 1: versions.
    side: usize,
}

/// See the module docs.
pub struct TemporalJoin {
    spec: TemporalJoinSpec,
    origin: String,
    converter: RowConverter,
    batches: HashMap<u64, Stored>,
    next_id: u64,
    /// Per key, its versions by (time, arrival) → (batch, row).
    versions: HashMap<Key, BTreeMap<At, Loc>>,
    /// Left rows waiting, by (time, arrival) → (batch, row, key; none for a NULL key).
    waiting: BTreeMap<At, (u64, u32, Option<Key>)>,
    arrivals: u64,
    watermark: Option<i64>,
    forwarded: ForwardedWatermark,
    rows: i64,
    unreported: [i64; 2],
}

impl TemporalJoin {
    /// A temporal join per `spec` over input rows of `input`.
    pub fn new(spec: TemporalJoinSpec, input: &SchemaRef, origin: &str) -> Result<Self> {
        let fields = (1..=spec.keys)
            .map(|i| SortField::new(input.field(i).data_type().clone()))
            .collect();
        Ok(Self {
            converter: RowConverter::new(fields)?,
            spec,
            origin: origin.to_string(),
            batches: HashMap::new(),
            next_id: 0,
            versions: HashMap::new(),
            waiting: BTreeMap::new(),
            arrivals: 0,
            watermark: None,
            forwarded: ForwardedWatermark::default(),
            rows: 0,
            unreported: [0, 0],
        })
    }

    fn horizon(&self) -> Option<i64> {
        self.watermark.map(|w| self.spec.lateness.horizon(w))
    }

    fn keys_of(&self, batch: &RecordBatch) -> Result<Vec<Option<Box<[u8]>>>> {
        let cols: Vec<ArrayRef> = (1..=self.spec.keys)
            .map(|i| Arc::clone(batch.column(i)))
            .collect();
        let rows = self.converter.convert_columns(&cols)?;
        Ok((0..batch.num_rows())
            .map(|r| (!cols.iter().any(|c| c.is_null(r))).then(|| rows.row(r).as_ref().into()))
            .collect())
    }

    fn release(&mut self, id: u64, out: &mut Collector) {
        if let Some(s) = self.batches.get_mut(&id) {
            s.live -= 1;
            self.rows -= 1;
            out.add_state_rows(s.side, -1);
            if s.live == 0 {
                self.batches.remove(&id);
            }
        }
    }

    fn store(&mut self, side: usize, batch: RecordBatch, live: usize, out: &mut Collector) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.rows += live as i64;
        out.add_state_rows(side, live as i64);
        if live > 0 {
            self.batches.insert(id, Stored { batch, live, side });
        }
        id
    }

    /// Drops the versions of `key` superseded at or below `horizon` (keeps the one in force).
    fn prune(&mut self, key: &[u8], horizon: i64, out: &mut Collector) {
        let Some(versions) = self.versions.get_mut(key) else {
            return;
        };
        let in_force = versions
            .range(..=(horizon, u64::MAX))
            .next_back()
            .map(|(k, _)| *k);
        let Some(in_force) = in_force else { return };
        let old: Vec<(i64, u64)> = versions.range(..in_force).map(|(k, _)| *k).collect();
        let mut gone = vec![];
        for k in old {
            if let Some((b, _)) = versions.remove(&k) {
                gone.push(b);
            }
        }
        for b in gone {
            self.release(b, out);
        }
    }

    fn add_versions(&mut self, batch: RecordBatch, out: &mut Collector) -> Result<()> {
        let n = batch.num_rows();
        let times = super::micros(&self.spec.version_time.evaluate(&batch)?.into_array(n)?)?;
        let keys = self.keys_of(&batch)?;
        let horizon = self.horizon();
        let mut keep = vec![];
        for r in 0..n {
            let late = match (times[r], horizon) {
                (None, _) => true,
                (Some(t), Some(h)) => self.spec.as_of.is_some() && t < h,
                _ => false,
            };
            if late {
                let shown = super::side_rows(
                    &batch,
                    self.spec.right.clone(),
                    &self.spec.output,
                    self.spec.left.len(),
                );
                self.spec.lateness.late_row(
                    &shown,
                    r,
                    &self.origin,
                    "late: a version behind the watermark (rows at its time were already joined)",
                    out,
                );
            } else if keys[r].is_some() {
                keep.push(r);
            }
        }
        let id = self.store(1, batch, keep.len(), out);
        for r in keep {
            let key = keys[r].clone().expect("kept rows have keys");
            let t = times[r].expect("kept rows have times");
            let seq = self.arrivals;
            self.arrivals += 1;
            let versions = self.versions.entry(key.clone()).or_default();
            versions.insert((t, seq), (id, r as u32));
            if self.spec.as_of.is_none() {
                // Processing time: only the latest version is ever read.
                let latest = *versions.keys().next_back().expect("just inserted");
                let older: Vec<_> = versions.range(..latest).map(|(k, v)| (*k, v.0)).collect();
                let mut gone = vec![];
                for (k, b) in older {
                    versions.remove(&k);
                    gone.push(b);
                }
                for b in gone {
                    self.release(b, out);
                }
            } else if let Some(h) = horizon {
                self.prune(&key, h, out);
            }
        }
        Ok(())
    }

    /// Joins left rows (`(batch, row, key, time)`) with their versions and emits the result.
    fn join(&mut self, rows: Vec<(u64, u32, Option<Key>, i64)>, out: &mut Collector) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut matched = vec![];
        let mut unmatched = vec![];
        for (b, r, key, t) in &rows {
            let version = key
                .as_ref()
                .and_then(|k| self.versions.get(k))
                .and_then(|v| {
                    let found = if self.spec.as_of.is_some() {
                        v.range(..=(*t, u64::MAX)).next_back()
                    } else {
                        v.iter().next_back()
                    };
                    found.map(|(_, loc)| *loc)
                });
            match version {
                Some(loc) => matched.push(((*b, *r), loc)),
                None => unmatched.push((*b, *r)),
            }
        }
        if !matched.is_empty() {
            let joined = self.build(&matched)?;
            match &self.spec.filter {
                Some(f) => {
                    let mask = f.evaluate(&joined)?.into_array(joined.num_rows())?;
                    let mask = mask.as_boolean_opt().ok_or_else(|| {
                        EngineError::Internal("temporal join: the condition is not boolean".into())
                    })?;
                    for (i, (left, _)) in matched.iter().enumerate() {
                        if !(mask.is_valid(i) && mask.value(i)) {
                            unmatched.push(*left);
                        }
                    }
                    out.emit(filter_record_batch(&joined, mask)?);
                }
                None => out.emit(joined),
            }
        }
        if self.spec.left_outer && !unmatched.is_empty() {
            out.emit(self.build_unmatched(&unmatched)?);
        }
        for (b, _, _, _) in rows {
            self.release(b, out);
        }
        Ok(())
    }

    fn gather(&self, range: Range<usize>, rows: &[Loc]) -> Result<Vec<ArrayRef>> {
        super::gather_columns(|id| &self.batches[&id].batch, range, rows.iter().copied())
    }

    fn build(&self, pairs: &[(Loc, Loc)]) -> Result<RecordBatch> {
        let left: Vec<(u64, u32)> = pairs.iter().map(|(l, _)| *l).collect();
        let right: Vec<(u64, u32)> = pairs.iter().map(|(_, r)| *r).collect();
        let mut columns = self.gather(self.spec.left.clone(), &left)?;
        columns.extend(self.gather(self.spec.right.clone(), &right)?);
        Ok(RecordBatch::try_new(
            Arc::clone(&self.spec.output),
            columns,
        )?)
    }

    fn build_unmatched(&self, rows: &[(u64, u32)]) -> Result<RecordBatch> {
        let mut columns = self.gather(self.spec.left.clone(), rows)?;
        let nl = self.spec.left.len();
        for i in nl..self.spec.output.fields().len() {
            columns.push(new_null_array(
                self.spec.output.field(i).data_type(),
                rows.len(),
            ));
        }
        Ok(RecordBatch::try_new(
            Arc::clone(&self.spec.output),
            columns,
        )?)
    }

    fn add_left(&mut self, batch: RecordBatch, out: &mut Collector) -> Result<()> {
        let n = batch.num_rows();
        let keys = self.keys_of(&batch)?;
        let Some(as_of) = self.spec.as_of.clone() else {
            // Processing time: joined now.
            let id = self.store(0, batch, n, out);
            let rows = (0..n)
                .map(|r| (id, r as u32, keys[r].clone(), i64::MAX))
                .collect();
            return self.join(rows, out);
        };
        let times = super::micros(&as_of.evaluate(&batch)?.into_array(n)?)?;
        let horizon = self.horizon();
        let mut keep = vec![];
        let shown = || super::side_rows(&batch, self.spec.left.clone(), &self.spec.output, 0);
        for (r, time) in times.iter().enumerate() {
            match (*time, horizon) {
                (Some(t), Some(h)) if t < h => self.spec.lateness.late_row(
                    &shown(),
                    r,
                    &self.origin,
                    "late: behind the watermark (the versions at its time may be gone)",
                    out,
                ),
                (None, _) => self.spec.lateness.late_row(
                    &shown(),
                    r,
                    &self.origin,
                    "no time to look the version up at (NULL)",
                    out,
                ),
                (Some(t), _) => keep.push((r, t)),
            }
        }
        let id = self.store(0, batch, keep.len(), out);
        for (r, t) in keep {
            let seq = self.arrivals;
            self.arrivals += 1;
            self.waiting
                .insert((t, seq), (id, r as u32, keys[r].clone()));
        }
        Ok(())
    }

    /// Joins the waiting left rows whose time is before `until`.
    fn release_waiting(&mut self, until: Option<i64>, out: &mut Collector) -> Result<()> {
        let ready: Vec<(i64, u64)> = match until {
            Some(u) => self.waiting.range(..(u, 0)).map(|(k, _)| *k).collect(),
            None => self.waiting.keys().copied().collect(),
        };
        let rows = ready
            .into_iter()
            .filter_map(|k| self.waiting.remove(&k).map(|(b, r, key)| (b, r, key, k.0)))
            .collect();
        self.join(rows, out)
    }
}

impl Operator for TemporalJoin {
    fn name(&self) -> &str {
        "temporal_join"
    }

    fn process_batch(&mut self, batch: RecordBatch, out: &mut Collector) -> Result<()> {
        out.add_state_rows_by_side(std::mem::take(&mut self.unreported));
        let sides = batch
            .column(0)
            .as_primitive::<arrow::datatypes::UInt8Type>();
        for side in [1u8, 0] {
            let part = if sides.values().iter().all(|s| *s == side) {
                batch.clone()
            } else if sides.values().contains(&side) {
                let mask = BooleanArray::from_iter(sides.values().iter().map(|s| Some(*s == side)));
                filter_record_batch(&batch, &mask)?
            } else {
                continue;
            };
            if side == 1 {
                self.add_versions(part, out)?;
            } else {
                self.add_left(part, out)?;
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
        if self.spec.as_of.is_some() {
            // Versions at the horizon may still come (only older ones are late).
            self.release_waiting(Some(horizon), out)?;
            let keys: Vec<Box<[u8]>> = self.versions.keys().cloned().collect();
            for k in keys {
                self.prune(&k, horizon, out);
            }
        }
        let held = self.waiting.keys().next().map(|(t, _)| *t);
        self.forwarded.advance(horizon, held, out);
        Ok(())
    }

    fn on_close(&mut self, out: &mut Collector) -> Result<()> {
        out.add_state_rows_by_side(std::mem::take(&mut self.unreported));
        self.release_waiting(None, out)
    }

    /// State: table `versions` (the right rows in force and later), table `waiting` (the
    /// left rows waiting), both as input rows; the watermarks.
    fn snapshot(&mut self) -> Result<Option<OperatorState>> {
        let mut state = OperatorState {
            version: STATE_VERSION,
            ..OperatorState::default()
        };
        let versions: Vec<(u64, u32)> = self
            .versions
            .values()
            .flat_map(|v| v.values().copied())
            .collect();
        let waiting: Vec<(u64, u32)> = self.waiting.values().map(|(b, r, _)| (*b, *r)).collect();
        for (name, rows) in [("versions", versions), ("waiting", waiting)] {
            if rows.is_empty() {
                continue;
            }
            let schema = self.batches[&rows[0].0].batch.schema();
            let columns = self.gather(0..schema.fields().len(), &rows)?;
            state
                .tables
                .insert(name.into(), RecordBatch::try_new(schema, columns)?);
        }
        save_watermarks(&mut state, self.watermark, &self.forwarded);
        Ok(Some(state))
    }

    fn restore(&mut self, parts: Vec<OperatorState>, keep: &KeyFilter) -> Result<()> {
        check_state_version(self.name(), &parts, STATE_VERSION)?;
        let mut counted = Collector::default();
        // Restored rows go in as they came, before any watermark: none is late.
        for part in &parts {
            for name in ["versions", "waiting"] {
                if let Some(table) = part.tables.get(name)
                    && let Some(mine) = keep.keep_rows(table)?
                {
                    self.process_batch(mine, &mut counted)?;
                }
            }
        }
        if !counted.take_messages().is_empty() {
            return Err(EngineError::Internal(
                "temporal join: restoring emitted rows".into(),
            ));
        }
        let restored = counted.take_counts().state_rows;
        self.unreported = [
            self.unreported[0] + restored[0],
            self.unreported[1] + restored[1],
        ];
        (self.watermark, self.forwarded) = restored_watermarks(&parts);
        Ok(())
    }
}
