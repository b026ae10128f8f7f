//! Operators: stateless ones evaluate DataFusion physical expressions on whole batches
//! ([`Unnest`] expands a list column into rows: the windows of a `HOP` or `CUMULATE`);
//! [`WindowAggregate`] keeps DataFusion accumulators per event-time window and
//! [`SessionAggregate`] the rows of each open session; [`Dedup`] keeps
//! the keys it has seen, expiring them by event time.
//!
//! Stateful operators share one notion of lateness ([`Lateness`]): with watermark `w` and
//! allowed lateness `L`, the *horizon* is `w - L`; a row whose event time is before the
//! horizon is late. Results that depend on rows before the horizon are final, and each
//! stateful operator forwards as its own watermark the horizon, held back to the earliest
//! event time it may still emit, so operators downstream never see its output as late.
//!
//! Evaluation is non-strict: when an expression fails on a batch (a cast that cannot parse
//! one row, say), the rows it fails on are found by evaluating halves of the batch, down to
//! single rows (`evaluate_or_reject`); they go to the errors zone with the reason, the
//! others continue. The slow path runs only for batches that hold a bad row, and costs a few
//! dozen evaluations per bad row. Every operator evaluates this way: filters, projections,
//! and the keys, window bounds and aggregate arguments of the stateful ones.

mod dedup;
mod filter;
mod join_sides;
mod projection;
mod session_aggregate;
mod stream_join;
mod temporal_join;
mod unnest;
mod window_aggregate;

pub use dedup::{Dedup, DedupKeep, DedupSpec};
pub use filter::Filter;
pub use join_sides::{JoinSideSpec, JoinSides, JoinSidesSpec, SideOpsSpec};
pub use projection::Projection;
pub use session_aggregate::SessionAggregate;
pub use stream_join::{JoinKind, StreamJoin, StreamJoinSpec};
pub use temporal_join::{TemporalJoin, TemporalJoinSpec};
pub use unnest::Unnest;
pub use window_aggregate::{WindowAggregate, WindowAggregateSpec};

use arrow::record_batch::RecordBatch;

use crate::message::BadRecord;
use crate::operator::Collector;

/// What a stateful operator does with a row that arrives behind the watermark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LatePolicy {
    /// Count it and write it to the errors zone with reason `late: …` (the default).
    #[default]
    ErrorsZone,
    /// Count it and drop it (`late_events = 'drop'`).
    Drop,
}

/// How late rows may be, and what happens to those that are later. See the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Lateness {
    /// Allowed lateness in microseconds: results wait this long after the watermark.
    pub allowed: i64,
    /// What happens to rows behind the horizon.
    pub policy: LatePolicy,
}

impl Lateness {
    /// The horizon for watermark `w`: rows with an event time before it are late.
    pub fn horizon(&self, watermark: i64) -> i64 {
        watermark.saturating_sub(self.allowed)
    }

    /// Accounts for late row `row` of `batch`: counted, and rejected unless the policy drops
    /// late rows.
    pub(crate) fn late_row(
        &self,
        batch: &RecordBatch,
        row: usize,
        origin: &str,
        reason: &str,
        out: &mut Collector,
    ) {
        out.count_late(1);
        if self.policy == LatePolicy::ErrorsZone {
            out.reject(bad_row(batch, row, origin, reason));
        }
    }
}

/// Runs `eval` over `batch`; when it fails, finds the rows it fails on (see
/// [`failing_rows`]), rejects them to `out` with the reason (see the module docs), and runs it
/// over the others. Returns the rows evaluated (all of `batch`, or its good rows) with the
/// result; `None` when every row failed. An internal error, or one that no single row causes,
/// still fails.
pub(crate) fn evaluate_or_reject<T>(
    batch: RecordBatch,
    origin: &str,
    out: &mut Collector,
    eval: impl Fn(&RecordBatch) -> crate::error::Result<T>,
) -> crate::error::Result<Option<(RecordBatch, T)>> {
    match eval(&batch) {
        Ok(v) => return Ok(Some((batch, v))),
        Err(e @ crate::error::EngineError::Internal(_)) => return Err(e),
        Err(_) => {}
    }
    let failed = failing_rows(&batch, &eval);
    let mut good = Vec::with_capacity(batch.num_rows() - failed.len());
    let mut next_bad = failed.iter().peekable();
    for row in 0..batch.num_rows() {
        match next_bad.peek() {
            Some((bad, reason)) if *bad == row => {
                out.reject(bad_row(&batch, row, origin, reason));
                next_bad.next();
            }
            _ => good.push(row as u32),
        }
    }
    if good.is_empty() {
        return Ok(None);
    }
    let batch = arrow::compute::take_record_batch(&batch, &arrow::array::UInt32Array::from(good))?;
    let v = eval(&batch)?;
    Ok(Some((batch, v)))
}

/// The rows of `batch` (on which `eval` fails) that `eval` fails on alone, in order, with
/// the reason. Found by halving: a failing half is split again down to single rows, so a batch
/// with a few bad rows costs about 2·log2(rows) evaluations per bad row, not one per row.
fn failing_rows<T>(
    batch: &RecordBatch,
    eval: &impl Fn(&RecordBatch) -> crate::error::Result<T>,
) -> Vec<(usize, String)> {
    fn split<T>(
        batch: &RecordBatch,
        eval: &impl Fn(&RecordBatch) -> crate::error::Result<T>,
        start: usize,
        len: usize,
        failed: &mut Vec<(usize, String)>,
    ) {
        let half = len / 2;
        for (s, l) in [(start, half), (start + half, len - half)] {
            if l == 0 {
                continue;
            }
            if let Err(e) = eval(&batch.slice(s, l)) {
                if l == 1 {
                    failed.push((s, e.to_string()));
                } else {
                    split(batch, eval, s, l, failed);
                }
            }
        }
    }
    let mut failed = Vec::new();
    match batch.num_rows() {
        0 => {}
        1 => {
            if let Err(e) = eval(batch) {
                failed.push((0, e.to_string()));
            }
        }
        n => split(batch, eval, 0, n, &mut failed),
    }
    failed
}

/// Evaluates `exprs` over `batch`, one array each.
pub(crate) fn evaluate_all(
    exprs: &[std::sync::Arc<dyn datafusion::physical_expr::PhysicalExpr>],
    batch: &RecordBatch,
) -> crate::error::Result<Vec<arrow::array::ArrayRef>> {
    let n = batch.num_rows();
    Ok(exprs
        .iter()
        .map(|e| e.evaluate(batch).and_then(|v| v.into_array(n)))
        .collect::<datafusion::error::Result<_>>()?)
}

/// The watermark a stateful operator forwards: its horizon, held back to the earliest event
/// time it may still emit, never going back.
#[derive(Debug)]
pub(crate) struct ForwardedWatermark(i64);

impl Default for ForwardedWatermark {
    fn default() -> Self {
        Self(i64::MIN)
    }
}

impl ForwardedWatermark {
    /// Emits `min(horizon, held)` if it advanced.
    pub(crate) fn advance(&mut self, horizon: i64, held: Option<i64>, out: &mut Collector) {
        let wm = held.map_or(horizon, |h| h.min(horizon));
        if wm > self.0 {
            self.0 = wm;
            out.emit_watermark(crate::time::EventTime(wm));
        }
    }
}

/// The event-time state every stateful operator checkpoints: its watermark and the
/// watermark it forwarded, as the state's `watermark` and `forwarded` values.
pub(crate) fn save_watermarks(
    state: &mut crate::checkpoint::OperatorState,
    watermark: Option<i64>,
    forwarded: &ForwardedWatermark,
) {
    if let Some(w) = watermark {
        state.values.insert("watermark".into(), w);
    }
    state.values.insert("forwarded".into(), forwarded.0);
}

/// Fails unless every part of a restored state has layout `version` (the operator's
/// current one): a checkpoint from another Sluice whose layout this build does not read.
pub(crate) fn check_state_version(
    operator: &str,
    parts: &[crate::checkpoint::OperatorState],
    version: u32,
) -> crate::error::Result<()> {
    match parts.iter().find(|p| p.version != version) {
        None => Ok(()),
        Some(p) => Err(crate::error::EngineError::Checkpoint(format!(
            "operator `{operator}`: the checkpoint holds state layout version {}, this build reads version {version}; restore it with the Sluice that wrote it, or drop and re-create the stream",
            p.version
        ))),
    }
}

/// The watermarks saved by [`save_watermarks`] in `parts` (one per old subtask, which all
/// saw the same watermarks): the smallest of each, to be safe.
pub(crate) fn restored_watermarks(
    parts: &[crate::checkpoint::OperatorState],
) -> (Option<i64>, ForwardedWatermark) {
    let min = |key: &str| {
        parts
            .iter()
            .filter_map(|p| p.values.get(key).copied())
            .min()
    };
    (
        min("watermark"),
        ForwardedWatermark(min("forwarded").unwrap_or(i64::MIN)),
    )
}

/// The rows `rows` — (batch id, row) pairs, in output order — of the retained `batches`, as
/// columns (one `interleave` per column). `batches` maps an id to the batch and how many of
/// its rows are still held.
pub(crate) fn gather_rows(
    batches: &std::collections::HashMap<u64, (RecordBatch, usize)>,
    rows: impl Iterator<Item = (u64, u32)> + Clone,
) -> crate::error::Result<Vec<arrow::array::ArrayRef>> {
    let Some((first, _)) = rows.clone().next() else {
        return Ok(vec![]);
    };
    let columns = 0..batches[&first].0.num_columns();
    gather_columns(|id| &batches[&id].0, columns, rows)
}

/// Columns `columns` of the rows `rows` — (batch id, row) pairs, in output order — of the
/// batches `batch` finds by id (one `interleave` per column).
pub(crate) fn gather_columns<'a>(
    batch: impl Fn(u64) -> &'a RecordBatch,
    columns: std::ops::Range<usize>,
    rows: impl Iterator<Item = (u64, u32)> + Clone,
) -> crate::error::Result<Vec<arrow::array::ArrayRef>> {
    let mut ids: Vec<u64> = rows.clone().map(|(b, _)| b).collect();
    ids.sort_unstable();
    ids.dedup();
    let sources: Vec<&RecordBatch> = ids.iter().map(|id| batch(*id)).collect();
    let indices: Vec<(usize, usize)> = rows
        .map(|(b, r)| (ids.binary_search(&b).expect("listed above"), r as usize))
        .collect();
    Ok(columns
        .map(|c| {
            let arrays: Vec<&dyn arrow::array::Array> =
                sources.iter().map(|b| b.column(c).as_ref()).collect();
            arrow::compute::interleave(&arrays, &indices)
        })
        .collect::<Result<Vec<_>, _>>()?)
}

/// The values of a timestamp (any unit) or integer array as µs.
pub(crate) fn micros(a: &arrow::array::ArrayRef) -> crate::error::Result<Vec<Option<i64>>> {
    use arrow::array::AsArray;
    use arrow::datatypes::{DataType, TimeUnit};
    let a = match a.data_type() {
        DataType::Int64 => std::sync::Arc::clone(a),
        DataType::Timestamp(TimeUnit::Microsecond, _) => arrow::compute::cast(a, &DataType::Int64)?,
        _ => arrow::compute::cast(
            &arrow::compute::cast(a, &DataType::Timestamp(TimeUnit::Microsecond, None))?,
            &DataType::Int64,
        )?,
    };
    Ok(a.as_primitive::<arrow::datatypes::Int64Type>()
        .iter()
        .collect())
}

/// Renders row `row` of `batch` as one JSON object, for the errors zone.
pub fn row_to_json(batch: &RecordBatch, row: usize) -> String {
    let slice = batch.slice(row, 1);
    let mut buf = Vec::new();
    let mut writer = arrow::json::LineDelimitedWriter::new(&mut buf);
    let written = writer.write(&slice).and_then(|_| writer.finish());
    match written {
        Ok(()) => String::from_utf8_lossy(&buf).trim_end().to_string(),
        Err(e) => format!("{{\"unrenderable_row\": {:?}}}", e.to_string()),
    }
}

/// A bad record for row `row` of `batch`, rejected by the operator `origin` because of
/// `reason`.
/// The columns `range` of a merged join input row as the output names them (`names` from
/// `first`): what a late row of one side looks like in the errors zone.
pub(crate) fn side_rows(
    batch: &RecordBatch,
    range: std::ops::Range<usize>,
    output: &arrow::datatypes::SchemaRef,
    first: usize,
) -> RecordBatch {
    let fields: Vec<arrow::datatypes::Field> = range
        .clone()
        .enumerate()
        .map(|(i, c)| {
            arrow::datatypes::Field::new(
                output.field(first + i).name(),
                batch.schema().field(c).data_type().clone(),
                true,
            )
        })
        .collect();
    let columns = range
        .map(|c| std::sync::Arc::clone(batch.column(c)))
        .collect();
    RecordBatch::try_new(
        std::sync::Arc::new(arrow::datatypes::Schema::new(fields)),
        columns,
    )
    .unwrap_or_else(|_| batch.clone())
}

pub(crate) fn bad_row(batch: &RecordBatch, row: usize, origin: &str, reason: &str) -> BadRecord {
    BadRecord {
        payload: row_to_json(batch, row),
        payload_base64: false,
        reason: reason.to_string(),
        origin: origin.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::sync::Arc;

    use arrow::array::{Array, Int64Array};
    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;
    use crate::error::EngineError;

    #[test]
    fn bad_rows_are_found_by_halving_and_the_rest_evaluated() {
        let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
        let values: Vec<i64> = (0..4096)
            .map(|i| if [7, 2000, 4095].contains(&i) { 0 } else { i })
            .collect();
        let batch = RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(values))]).unwrap();
        let calls = Cell::new(0usize);
        // Fails on a batch holding a 0 (a row-wise error, like a division by zero).
        let eval = |b: &RecordBatch| {
            calls.set(calls.get() + 1);
            let v = b.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
            match v.values().contains(&0) {
                true => Err(EngineError::Closed("zero".into())),
                false => Ok(v.len()),
            }
        };
        let mut out = Collector::default();
        let (good, n) = evaluate_or_reject(batch, "t", &mut out, eval)
            .unwrap()
            .unwrap();
        assert_eq!((good.num_rows(), n), (4092, 4092));
        let rejected = out.take_rejected();
        let payloads: Vec<&str> = rejected.iter().map(|r| r.payload.as_str()).collect();
        // Row 0 holds the value 0 too.
        assert_eq!(payloads, [r#"{"v":0}"#; 4]);
        assert!(calls.get() <= 2 + 4 * 2 * 12, "{} evaluations", calls.get());
    }

    #[test]
    fn internal_errors_are_not_taken_for_bad_rows() {
        let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
        let batch =
            RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(vec![1, 2]))]).unwrap();
        let mut out = Collector::default();
        let r = evaluate_or_reject(batch, "t", &mut out, |_| {
            Err::<(), _>(EngineError::Internal("bug".into()))
        });
        assert!(matches!(r, Err(EngineError::Internal(_))));
        assert!(out.take_rejected().is_empty());
    }
}
