//! `Dedup`: one row per key — `ROW_NUMBER() OVER (PARTITION BY k …) = 1`, `DISTINCT ON (k)`,
//! `SELECT DISTINCT`.
//!
//! Which row is kept ([`DedupKeep`]):
//! - [`DedupKeep::FirstArrival`]: the first row of a key to arrive is emitted at once; later
//!   rows with that key are dropped and counted as duplicates.
//! - [`DedupKeep::EarliestEventTime`] (`ORDER BY` the event-time column): the row with the
//!   smallest event time (the first to arrive among equals). A candidate is held until the
//!   horizon (watermark minus allowed lateness) passes its event time — only then can no
//!   earlier row of its key still arrive on time — and is emitted then. This is exactly what
//!   the same query returns in batch over the rows that were on time.
//!
//! State: per key seen, its encoded key and an expiry in event time — the kept row's event
//! time plus `ttl` ([`SeenKeys`]: the keys' bytes in one arena, a 16-byte table entry each;
//! no allocation per key). A key is forgotten once the horizon passes its expiry (swept in
//! bulk, at most every `max(ttl / 2, 1 s)` of event time). A row whose own expiry is already behind
//! the horizon is late (its key may have been forgotten, so it could be a duplicate): it is
//! counted and goes to the errors zone (or is dropped, per the stream's `late_events`). With
//! the default `ttl` of 0 a key lives as long as rows with its event time are on time, so a
//! duplicate carrying the same event time is always either dropped as a duplicate or
//! reported as late — never emitted twice.
//!
//! Emits: kept rows, with the input's columns (and a `ROW_NUMBER` column of 1s when the query
//! selects it). Forwards as watermark the horizon, held back to the earliest held candidate.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::BuildHasher;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, TimestampMicrosecondArray, UInt32Array, UInt64Array};
use arrow::compute::take;
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use arrow::row::{RowConverter, SortField};
use datafusion::physical_expr::PhysicalExpr;
use hashbrown::HashTable;

use super::{
    ForwardedWatermark, Lateness, bad_row, evaluate_all, evaluate_or_reject, gather_rows,
    restored_watermarks, save_watermarks,
};
use crate::checkpoint::{KeyFilter, OperatorState};
use crate::error::{EngineError, Result};
use crate::operator::{Collector, Operator};
use crate::time::EventTime;

type KeyMap<V> = HashMap<Box<[u8]>, V, foldhash::fast::RandomState>;

/// The least event time between two sweeps of expired keys (1 s).
const MIN_SWEEP_PERIOD: i64 = 1_000_000;

/// The layout of this operator's checkpointed state (bump it when the layout changes,
/// and regenerate `tests/golden/` with `SLUICE_GOLDEN_REGENERATE=1`).
const STATE_VERSION: u32 = 1;

/// One key in [`SeenKeys`]: 16 bytes.
#[derive(Debug, Clone, Copy)]
struct Seen {
    /// Offset in the arena (high 40 bits) and length (low 24 bits) of the encoded key.
    span: u64,
    expiry: i64,
}

impl Seen {
    fn range(&self) -> std::ops::Range<usize> {
        let start = (self.span >> 24) as usize;
        start..start + (self.span & 0xff_ffff) as usize
    }
}

/// The keys a dedup has seen, each with its expiry: the encoded keys' bytes live back to back
/// in one arena, and a hash table holds a fixed-size [`Seen`] entry per key — 16 bytes at a
/// load of 44–88 %, about 30 bytes per key besides the key itself, and no allocation per key.
/// (Hashes are not stored: a resize rehashes from the arena.)
struct SeenKeys {
    table: HashTable<Seen>,
    arena: Vec<u8>,
    /// Arena bytes of forgotten keys (reclaimed once they are half of it).
    garbage: usize,
    hasher: foldhash::fast::FixedState,
}

impl SeenKeys {
    fn new() -> Self {
        Self {
            table: HashTable::new(),
            arena: Vec::new(),
            garbage: 0,
            hasher: foldhash::fast::FixedState::with_seed(0x5eed),
        }
    }

    fn len(&self) -> usize {
        self.table.len()
    }

    fn hash(&self, key: &[u8]) -> u64 {
        self.hasher.hash_one(key)
    }

    fn contains(&self, hash: u64, key: &[u8]) -> bool {
        let arena = &self.arena;
        self.table
            .find(hash, |e| &arena[e.range()] == key)
            .is_some()
    }

    /// Adds `key` unless it is present; whether it was added.
    fn insert(&mut self, hash: u64, key: &[u8], expiry: i64) -> Result<bool> {
        if key.len() > 0xff_ffff || self.arena.len() >= 1 << 40 {
            return Err(EngineError::Internal(
                "dedup: a key over 16 MB, or over 1 TB of keys".into(),
            ));
        }
        let span = ((self.arena.len() as u64) << 24) | key.len() as u64;
        let (arena, hasher) = (&self.arena, &self.hasher);
        match self.table.entry(
            hash,
            |e| &arena[e.range()] == key,
            |e| hasher.hash_one(&arena[e.range()]),
        ) {
            hashbrown::hash_table::Entry::Occupied(_) => Ok(false),
            hashbrown::hash_table::Entry::Vacant(v) => {
                v.insert(Seen { span, expiry });
                self.arena.extend_from_slice(key);
                Ok(true)
            }
        }
    }

    /// Forgets every key whose expiry is before `horizon`.
    fn sweep(&mut self, horizon: i64) {
        let mut freed = 0;
        self.table.retain(|e| {
            let keep = e.expiry >= horizon;
            if !keep {
                freed += e.range().len();
            }
            keep
        });
        self.garbage += freed;
        if self.garbage * 2 > self.arena.len() {
            let mut arena = Vec::with_capacity(self.arena.len() - self.garbage);
            for e in self.table.iter_mut() {
                let range = e.range();
                e.span = ((arena.len() as u64) << 24) | range.len() as u64;
                arena.extend_from_slice(&self.arena[range]);
            }
            self.arena = arena;
            self.garbage = 0;
        }
    }
}

/// Which row of a key a [`Dedup`] keeps. See the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DedupKeep {
    /// The first to arrive, emitted at once.
    FirstArrival,
    /// The earliest in event time, emitted when the horizon passes it.
    EarliestEventTime,
}

/// What a [`Dedup`] does.
#[derive(Debug, Clone)]
pub struct DedupSpec {
    /// The key expressions over the input.
    pub keys: Vec<Arc<dyn PhysicalExpr>>,
    /// Index of the input's event-time column (a µs UTC timestamp).
    pub event_time: usize,
    /// Which row is kept.
    pub keep: DedupKeep,
    /// How long (µs of event time, after the kept row's) a key is remembered.
    pub ttl: i64,
    /// Lateness settings.
    pub lateness: Lateness,
    /// Output schema: the input's columns, plus a trailing `UInt64` row number (always 1)
    /// when it has one more field than the input.
    pub schema: SchemaRef,
}

/// A held candidate (earliest-event-time mode).
#[derive(Debug, Clone, Copy)]
struct Held {
    ts: i64,
    batch: u64,
    row: u32,
}

/// The running operator. See the module docs.
pub struct Dedup {
    spec: DedupSpec,
    converter: RowConverter,
    origin: String,
    /// Keys whose row was emitted, with their expiry (event time).
    seen: SeenKeys,
    /// Sweep `seen` when the horizon reaches this.
    next_sweep: i64,
    watermark: Option<i64>,
    /// Earliest-event-time mode: the current candidate per key, not yet emitted.
    pending: KeyMap<Held>,
    /// Candidates by event time (entries of replaced candidates are skipped when popped).
    queue: BinaryHeap<Reverse<(i64, Box<[u8]>)>>,
    /// Batches holding candidates, with the number of candidates each still holds.
    batches: HashMap<u64, (RecordBatch, usize)>,
    next_batch: u64,
    forwarded: ForwardedWatermark,
    row_number: bool,
}

impl std::fmt::Debug for Dedup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dedup")
            .field("keep", &self.spec.keep)
            .field("keys", &self.seen.len())
            .field("pending", &self.pending.len())
            .finish()
    }
}

impl Dedup {
    /// An operator for `spec` over batches of `input` schema; `origin` names the stream.
    pub fn try_new(
        spec: DedupSpec,
        input: &arrow::datatypes::Schema,
        origin: impl Into<String>,
    ) -> Result<Self> {
        let fields = spec
            .keys
            .iter()
            .map(|e| Ok(SortField::new(e.data_type(input)?)))
            .collect::<Result<Vec<_>>>()?;
        let n_in = input.fields().len();
        let n_out = spec.schema.fields().len();
        if n_out != n_in && n_out != n_in + 1 {
            return Err(EngineError::Internal(format!(
                "dedup: {n_out} output columns for {n_in} input columns"
            )));
        }
        Ok(Self {
            converter: RowConverter::new(fields)?,
            origin: origin.into(),
            seen: SeenKeys::new(),
            next_sweep: i64::MIN,
            watermark: None,
            pending: KeyMap::default(),
            queue: BinaryHeap::new(),
            batches: HashMap::new(),
            next_batch: 0,
            forwarded: ForwardedWatermark::default(),
            row_number: n_out == n_in + 1,
            spec,
        })
    }

    fn horizon(&self) -> i64 {
        self.watermark
            .map_or(i64::MIN, |w| self.spec.lateness.horizon(w))
    }

    /// Stamps the output schema (and the row-number column) on kept input columns.
    fn output(&self, mut columns: Vec<ArrayRef>) -> Result<RecordBatch> {
        if self.row_number {
            let n = columns.first().map_or(0, |c| c.len());
            columns.push(Arc::new(UInt64Array::from_value(1, n)));
        }
        Ok(RecordBatch::try_new(
            Arc::clone(&self.spec.schema),
            columns,
        )?)
    }

    /// Emits the held candidates `ready` (in the given order) and releases their batches.
    fn emit_held(&mut self, ready: &[Held], out: &mut Collector) -> Result<()> {
        if ready.is_empty() {
            return Ok(());
        }
        let columns = gather_rows(&self.batches, ready.iter().map(|h| (h.batch, h.row)))?;
        let batch = self.output(columns)?;
        out.emit(batch);
        for h in ready {
            self.release(h.batch);
        }
        Ok(())
    }

    fn release(&mut self, batch: u64) {
        if let Some((_, live)) = self.batches.get_mut(&batch) {
            *live -= 1;
            if *live == 0 {
                self.batches.remove(&batch);
            }
        }
    }

    /// Forgets keys whose expiry the horizon has passed (in bulk, see the module docs).
    fn sweep(&mut self, horizon: i64) {
        if horizon < self.next_sweep {
            return;
        }
        self.seen.sweep(horizon);
        let period = (self.spec.ttl / 2).max(MIN_SWEEP_PERIOD);
        self.next_sweep = horizon.saturating_add(period);
    }

    /// Forwards the horizon, held back to the earliest candidate still held.
    fn forward_watermark(&mut self, out: &mut Collector) {
        let held = self.queue.peek().map(|Reverse((ts, _))| *ts);
        let horizon = self.horizon();
        self.forwarded.advance(horizon, held, out);
    }
}

impl Operator for Dedup {
    fn name(&self) -> &str {
        "dedup"
    }

    fn process_batch(&mut self, batch: RecordBatch, out: &mut Collector) -> Result<()> {
        // Rows whose key fails to evaluate go to the errors zone.
        let Some((batch, keys)) = evaluate_or_reject(batch, &self.origin, out, |b| {
            evaluate_all(&self.spec.keys, b)
        })?
        else {
            return Ok(());
        };
        let n = batch.num_rows();
        let rows = self.converter.convert_columns(&keys)?;
        let ts = batch
            .column(self.spec.event_time)
            .as_any()
            .downcast_ref::<TimestampMicrosecondArray>()
            .ok_or_else(|| EngineError::Internal("dedup: event time is not a µs timestamp".into()))?
            .clone();
        let horizon = self.horizon();
        let ttl = self.spec.ttl;
        let batch_id = self.next_batch;
        let mut kept: Vec<u32> = Vec::new();
        let mut held = 0usize;
        let mut duplicates = 0u64;
        for i in 0..n {
            if ts.is_null(i) {
                out.reject(bad_row(
                    &batch,
                    i,
                    &self.origin,
                    "the row has no event time (NULL), so its key cannot be kept for a bounded time",
                ));
                continue;
            }
            let key = rows.row(i);
            let hash = self.seen.hash(key.as_ref());
            let t = ts.value(i);
            let expiry = match self.spec.keep {
                DedupKeep::FirstArrival => t.saturating_add(ttl),
                DedupKeep::EarliestEventTime => t,
            };
            // A key already seen is a duplicate, however late; otherwise a row behind the
            // horizon is late; otherwise first arrival keeps it (one probe for both steps).
            let on_time = expiry >= horizon;
            let first_arrival = self.spec.keep == DedupKeep::FirstArrival;
            if on_time && first_arrival {
                if self.seen.insert(hash, key.as_ref(), expiry)? {
                    kept.push(i as u32);
                } else {
                    duplicates += 1;
                }
                continue;
            }
            if self.seen.contains(hash, key.as_ref()) {
                duplicates += 1;
                continue;
            }
            if !on_time {
                self.spec.lateness.late_row(
                    &batch,
                    i,
                    &self.origin,
                    &format!(
                        "late: event time {} is behind the watermark (minus allowed lateness and dedup_ttl), \
                         so whether its key was already seen is no longer known",
                        EventTime(t)
                    ),
                    out,
                );
                continue;
            }
            // Earliest event time: hold the earliest row per key until the horizon passes it.
            let new = Held {
                ts: t,
                batch: batch_id,
                row: i as u32,
            };
            match self.pending.get_mut(key.as_ref()) {
                Some(h) if t < h.ts => {
                    let old = std::mem::replace(h, new);
                    duplicates += 1;
                    self.queue.push(Reverse((t, key.as_ref().into())));
                    // The replaced row no longer holds its batch.
                    if old.batch == batch_id {
                        held -= 1;
                    } else {
                        self.release(old.batch);
                    }
                    held += 1;
                }
                Some(_) => duplicates += 1,
                None => {
                    self.pending.insert(key.as_ref().into(), new);
                    self.queue.push(Reverse((t, key.as_ref().into())));
                    held += 1;
                }
            }
        }
        out.count_duplicates(duplicates);
        match self.spec.keep {
            DedupKeep::FirstArrival => {
                if kept.len() == n {
                    out.emit(self.output(batch.columns().to_vec())?);
                } else if !kept.is_empty() {
                    let idx = UInt32Array::from(kept);
                    let columns = batch
                        .columns()
                        .iter()
                        .map(|c| take(c.as_ref(), &idx, None))
                        .collect::<Result<Vec<_>, _>>()?;
                    out.emit(self.output(columns)?);
                }
            }
            DedupKeep::EarliestEventTime => {
                if held > 0 {
                    self.batches.insert(batch_id, (batch, held));
                    self.next_batch += 1;
                }
            }
        }
        Ok(())
    }

    fn on_watermark(&mut self, t: EventTime, out: &mut Collector) -> Result<()> {
        self.watermark = Some(self.watermark.map_or(t.0, |w| w.max(t.0)));
        let horizon = self.horizon();
        let mut ready = Vec::new();
        while let Some(Reverse((ts, _))) = self.queue.peek() {
            if *ts >= horizon {
                break;
            }
            let Reverse((ts, key)) = self.queue.pop().expect("peeked");
            // A candidate replaced by an earlier row leaves its queue entry behind.
            if self.pending.get(&key).is_some_and(|h| h.ts == ts) {
                let h = self.pending.remove(&key).expect("checked");
                let hash = self.seen.hash(&key);
                self.seen
                    .insert(hash, &key, ts.saturating_add(self.spec.ttl))?;
                ready.push(h);
            }
        }
        self.emit_held(&ready, out)?;
        self.sweep(horizon);
        self.forward_watermark(out);
        Ok(())
    }

    /// State: the watermarks; table `seen` (the keys, decoded to their columns `k0…`, and
    /// `expiry`); table `pending` (earliest-event-time mode: each key's held row, as input
    /// rows).
    fn snapshot(&mut self) -> Result<Option<OperatorState>> {
        let parser = self.converter.parser();
        let arena = &self.seen.arena;
        let entries: Vec<Seen> = self.seen.table.iter().copied().collect();
        let keys = self
            .converter
            .convert_rows(entries.iter().map(|e| parser.parse(&arena[e.range()])))?;
        let mut columns: Vec<(String, ArrayRef)> = keys
            .into_iter()
            .enumerate()
            .map(|(i, k)| (format!("k{i}"), k))
            .collect();
        columns.push((
            "expiry".into(),
            Arc::new(arrow::array::Int64Array::from_iter_values(
                entries.iter().map(|e| e.expiry),
            )),
        ));
        let mut state = OperatorState {
            version: STATE_VERSION,
            ..OperatorState::default()
        };
        state
            .tables
            .insert("seen".into(), RecordBatch::try_from_iter(columns)?);
        if !self.pending.is_empty() {
            let held: Vec<Held> = self.pending.values().copied().collect();
            let columns = gather_rows(&self.batches, held.iter().map(|h| (h.batch, h.row)))?;
            let schema = self
                .batches
                .values()
                .next()
                .expect("held rows have batches")
                .0
                .schema();
            state
                .tables
                .insert("pending".into(), RecordBatch::try_new(schema, columns)?);
        }
        save_watermarks(&mut state, self.watermark, &self.forwarded);
        state.values.insert("next_sweep".into(), self.next_sweep);
        Ok(Some(state))
    }

    fn restore(&mut self, parts: Vec<OperatorState>, keep: &KeyFilter) -> Result<()> {
        super::check_state_version(self.name(), &parts, STATE_VERSION)?;
        let mut pending = vec![];
        (self.watermark, self.forwarded) = restored_watermarks(&parts);
        for part in parts {
            if let Some(n) = part.values.get("next_sweep") {
                self.next_sweep = *n;
            }
            if let Some(seen) = part.tables.get("seen") {
                let nkeys = seen.num_columns().saturating_sub(1);
                if nkeys != self.spec.keys.len() {
                    return Err(EngineError::Checkpoint(format!(
                        "dedup state has {nkeys} key columns where this query has {}",
                        self.spec.keys.len()
                    )));
                }
                let keys = &seen.columns()[..nkeys];
                let expiry = seen
                    .column(nkeys)
                    .as_any()
                    .downcast_ref::<arrow::array::Int64Array>()
                    .ok_or_else(|| EngineError::Checkpoint("dedup expiry is not Int64".into()))?;
                let mask = keep.keeps(keys, seen.num_rows())?;
                let rows = self.converter.convert_columns(keys)?;
                for (i, kept) in mask.into_iter().enumerate() {
                    if kept {
                        let key = rows.row(i);
                        let hash = self.seen.hash(key.as_ref());
                        self.seen.insert(hash, key.as_ref(), expiry.value(i))?;
                    }
                }
            }
            if let Some(p) = part.tables.get("pending")
                && let Some(mine) = keep.keep_rows(p)?
            {
                pending.push(mine);
            }
        }
        // Held rows are held again: they are on time (the horizon has not passed them) and
        // their keys are not in `seen`.
        let mut out = Collector::default();
        for batch in pending {
            self.process_batch(batch, &mut out)?;
        }
        if !out.take_messages().is_empty() || !out.take_rejected().is_empty() {
            return Err(EngineError::Internal(
                "dedup: restoring held rows emitted or rejected some".into(),
            ));
        }
        Ok(())
    }

    fn on_close(&mut self, out: &mut Collector) -> Result<()> {
        let mut ready = Vec::with_capacity(self.pending.len());
        while let Some(Reverse((ts, key))) = self.queue.pop() {
            if self.pending.get(&key).is_some_and(|h| h.ts == ts) {
                ready.push(self.pending.remove(&key).expect("checked"));
            }
        }
        self.emit_held(&ready, out)
    }
}

#[cfg(test)]
mod tests {
    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
    use datafusion::physical_expr::expressions::col;

    use super::*;
    use crate::message::Message;
    use crate::operators::LatePolicy;

    fn input() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, false),
            Field::new(
                "ts",
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                false,
            ),
            Field::new("v", DataType::Int64, false),
        ]))
    }

    fn batch(rows: &[(&str, i64, i64)]) -> RecordBatch {
        RecordBatch::try_new(
            input(),
            vec![
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
                Arc::new(
                    TimestampMicrosecondArray::from_iter_values(rows.iter().map(|r| r.1))
                        .with_timezone("UTC"),
                ),
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.2))),
            ],
        )
        .unwrap()
    }

    fn dedup(keep: DedupKeep, ttl: i64, row_number: bool) -> Dedup {
        let schema = input();
        let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
        if row_number {
            fields.push(Field::new("rn", DataType::UInt64, false));
        }
        let spec = DedupSpec {
            keys: vec![col("id", &schema).unwrap()],
            event_time: 1,
            keep,
            ttl,
            lateness: Lateness {
                allowed: 0,
                policy: LatePolicy::ErrorsZone,
            },
            schema: Arc::new(Schema::new(fields)),
        };
        Dedup::try_new(spec, &schema, "stream d").unwrap()
    }

    /// (id, ts, v) of every emitted row, and the watermarks, in order.
    fn drain(out: &mut Collector) -> (Vec<(String, i64, i64)>, Vec<i64>) {
        let mut rows = vec![];
        let mut wms = vec![];
        for m in out.take_messages() {
            match m {
                Message::Data(b) => {
                    let id = b.column(0).as_any().downcast_ref::<StringArray>().unwrap();
                    let ts = b
                        .column(1)
                        .as_any()
                        .downcast_ref::<TimestampMicrosecondArray>()
                        .unwrap();
                    let v = b.column(2).as_any().downcast_ref::<Int64Array>().unwrap();
                    for i in 0..b.num_rows() {
                        rows.push((id.value(i).to_string(), ts.value(i), v.value(i)));
                    }
                }
                Message::Watermark(t) => wms.push(t.0),
                _ => {}
            }
        }
        (rows, wms)
    }

    fn r(id: &str, ts: i64, v: i64) -> (String, i64, i64) {
        (id.to_string(), ts, v)
    }

    #[test]
    fn first_arrival_emits_at_once_and_drops_duplicates() {
        let mut op = dedup(DedupKeep::FirstArrival, 0, true);
        let mut out = Collector::default();
        op.process_batch(batch(&[("a", 10, 1), ("b", 5, 2), ("a", 3, 3)]), &mut out)
            .unwrap();
        let msgs = out.take_messages();
        let Message::Data(b) = &msgs[0] else { panic!() };
        assert_eq!(b.num_columns(), 4, "row number appended");
        for m in msgs {
            if let Message::Data(b) = m {
                out.emit(b);
            }
        }
        assert_eq!(drain(&mut out).0, vec![r("a", 10, 1), r("b", 5, 2)]);
        op.process_batch(batch(&[("b", 7, 4), ("c", 8, 5)]), &mut out)
            .unwrap();
        assert_eq!(drain(&mut out).0, vec![r("c", 8, 5)]);
        assert_eq!(out.take_counts().duplicates, 2);
    }

    #[test]
    fn keys_expire_by_event_time_and_late_rows_are_reported() {
        let mut op = dedup(DedupKeep::FirstArrival, 100, false);
        let mut out = Collector::default();
        op.process_batch(batch(&[("a", 1_000, 1)]), &mut out)
            .unwrap();
        op.on_watermark(EventTime(1_050), &mut out).unwrap();
        op.process_batch(batch(&[("a", 1_060, 2)]), &mut out)
            .unwrap();
        assert_eq!(
            drain(&mut out).0,
            vec![r("a", 1_000, 1)],
            "still remembered"
        );
        // Past 1000 + ttl (and a sweep period) the key is forgotten.
        op.on_watermark(EventTime(2_000_000), &mut out).unwrap();
        assert_eq!(op.seen.len(), 0, "swept");
        op.process_batch(batch(&[("a", 2_000_000, 3), ("z", 1_000, 4)]), &mut out)
            .unwrap();
        assert_eq!(drain(&mut out).0, vec![r("a", 2_000_000, 3)]);
        let late = out.take_rejected();
        assert_eq!(late.len(), 1);
        assert!(late[0].reason.starts_with("late:"), "{}", late[0].reason);
        assert_eq!(out.take_counts().late, 1);
    }

    #[test]
    fn earliest_event_time_waits_for_the_watermark() {
        let mut op = dedup(DedupKeep::EarliestEventTime, 1_000, false);
        let mut out = Collector::default();
        op.process_batch(batch(&[("a", 20, 1), ("b", 30, 2)]), &mut out)
            .unwrap();
        op.process_batch(batch(&[("a", 15, 3), ("a", 15, 4), ("b", 40, 5)]), &mut out)
            .unwrap();
        assert_eq!(
            drain(&mut out),
            (vec![], vec![]),
            "nothing before the watermark"
        );
        op.on_watermark(EventTime(16), &mut out).unwrap();
        // `a`@15 is final; `b`@30 is still held, so the watermark stays at 16.
        assert_eq!(drain(&mut out), (vec![r("a", 15, 3)], vec![16]));
        op.on_watermark(EventTime(35), &mut out).unwrap();
        // The stale queue entry for a@20 is skipped.
        assert_eq!(drain(&mut out), (vec![r("b", 30, 2)], vec![35]));
        op.process_batch(batch(&[("a", 500, 6), ("c", 10, 7)]), &mut out)
            .unwrap();
        assert_eq!(out.take_rejected().len(), 1, "c@10 is late");
        op.process_batch(batch(&[("d", 100, 8)]), &mut out).unwrap();
        op.on_close(&mut out).unwrap();
        assert_eq!(drain(&mut out).0, vec![r("d", 100, 8)]);
        // a@15 dup of a@20's replacement, a@15 again, b@40, a@500.
        assert_eq!(out.take_counts().duplicates, 4);
        assert!(op.batches.is_empty(), "no batch retained");
    }

    #[test]
    fn dropped_late_rows_are_counted_not_rejected() {
        let mut op = dedup(DedupKeep::FirstArrival, 0, false);
        op.spec.lateness.policy = LatePolicy::Drop;
        let mut out = Collector::default();
        op.on_watermark(EventTime(100), &mut out).unwrap();
        op.process_batch(batch(&[("a", 50, 1)]), &mut out).unwrap();
        assert!(out.take_rejected().is_empty());
        assert_eq!(out.take_counts().late, 1);
    }

    #[test]
    fn seen_keys_survive_sweeps_and_arena_compaction() {
        let mut seen = SeenKeys::new();
        let key = |i: u32| format!("key-{i}").into_bytes();
        for i in 0..1000u32 {
            let k = key(i);
            let h = seen.hash(&k);
            assert!(!seen.contains(h, &k));
            seen.insert(h, &k, i64::from(i)).unwrap();
        }
        // Forget the first 700: more than half the arena is garbage, so it is compacted.
        seen.sweep(700);
        assert_eq!(seen.len(), 300);
        assert_eq!(seen.garbage, 0, "compacted");
        for i in 0..1000u32 {
            let k = key(i);
            assert_eq!(seen.contains(seen.hash(&k), &k), i >= 700, "{i}");
        }
        // Keys added after compaction are found too.
        let k = key(5000);
        let h = seen.hash(&k);
        seen.insert(h, &k, 9000).unwrap();
        assert!(seen.contains(h, &k));
    }
}
