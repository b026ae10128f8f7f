//! `WindowAggregate`: `GROUP BY …, window_start, window_end` over event-time windows.
//!
//! Input rows already carry their window (see the SQL `TUMBLE`/`HOP` table functions); the
//! operator keeps, per open window, DataFusion's `GroupValues` (the vectorised hash table of
//! its hash aggregation) over the group key without the window's bounds (they are the same for
//! every row of a window, and are put back when it is emitted), and one DataFusion
//! `GroupsAccumulator` per aggregate (or an adapter over the plain `Accumulator` where an
//! aggregate has no groups variant), so every DataFusion aggregate works incrementally.
//!
//! State: the open windows, keyed by `window_end`. Emits: all groups of a window, once, when
//! the horizon (watermark minus allowed lateness) reaches its end, and every open window
//! when the input ends. Forwards as watermark the horizon, held back to the earliest open
//! window's start (its rows carry that event time downstream). A row whose window has
//! already been emitted is late: counted, and sent to the errors zone with reason `late`
//! unless the stream drops late rows — never silently lost.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, Int64Array, TimestampMicrosecondArray, UInt32Array, new_null_array,
};
use arrow::compute::{cast, concat, filter_record_batch, take};
use arrow::datatypes::{Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use datafusion::logical_expr::{EmitTo, GroupsAccumulator};
use datafusion::physical_expr::aggregate::AggregateFunctionExpr;
use datafusion::physical_expr::{GroupsAccumulatorAdapter, PhysicalExpr};
use datafusion::physical_plan::aggregates::group_values::{GroupValues, new_group_values};
use datafusion::physical_plan::aggregates::order::GroupOrdering;

use super::{
    ForwardedWatermark, Lateness, bad_row, evaluate_all, evaluate_or_reject, restored_watermarks,
    save_watermarks,
};
use crate::checkpoint::{KeyFilter, OperatorState};
use crate::error::{EngineError, Result};
use crate::operator::{Collector, Operator};
use crate::time::EventTime;

/// The layout of this operator's checkpointed state (bump it when the layout changes,
/// and regenerate `tests/golden/` with `SLUICE_GOLDEN_REGENERATE=1`).
const STATE_VERSION: u32 = 1;

/// What a [`WindowAggregate`] computes.
#[derive(Debug, Clone)]
pub struct WindowAggregateSpec {
    /// Group-by expressions over the input, in output order; they include the window's end.
    pub group_exprs: Vec<Arc<dyn PhysicalExpr>>,
    /// Which group expression is `window_start` (a µs UTC timestamp).
    pub window_start: usize,
    /// Which group expression is `window_end` (a µs UTC timestamp).
    pub window_end: usize,
    /// Lateness settings.
    pub lateness: Lateness,
    /// The aggregates, in output order after the group columns.
    pub aggregates: Vec<Arc<AggregateFunctionExpr>>,
    /// Output schema: the group columns, then one column per aggregate.
    pub schema: SchemaRef,
}

struct Window {
    /// The window's start (the event time of its output rows).
    start: i64,
    /// Group key (without the window's bounds) → group index; `None` when the aggregation
    /// has no key besides the window (one group).
    groups: Option<Box<dyn GroupValues>>,
    /// Number of groups so far.
    len: usize,
    accumulators: Vec<Box<dyn GroupsAccumulator>>,
}

impl WindowAggregateSpec {
    /// The group expressions other than the window's bounds: the key within a window (and
    /// the key its rows are routed by among parallel subtasks).
    pub fn key_exprs(&self) -> Vec<Arc<dyn PhysicalExpr>> {
        self.group_exprs
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != self.window_start && *i != self.window_end)
            .map(|(_, e)| Arc::clone(e))
            .collect()
    }
}

/// The running operator. See the module docs.
pub struct WindowAggregate {
    spec: WindowAggregateSpec,
    /// The group expressions other than the window's bounds, and their schema.
    keys: Vec<Arc<dyn PhysicalExpr>>,
    key_schema: SchemaRef,
    windows: BTreeMap<i64, Window>,
    watermark: Option<i64>,
    forwarded: ForwardedWatermark,
    origin: String,
}

impl std::fmt::Debug for WindowAggregate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WindowAggregate")
            .field("open_windows", &self.windows.len())
            .field("watermark", &self.watermark)
            .finish()
    }
}

impl WindowAggregate {
    /// An operator for `spec` over batches of `input` schema; `origin` names the stream.
    pub fn try_new(
        spec: WindowAggregateSpec,
        input: &arrow::datatypes::Schema,
        origin: impl Into<String>,
    ) -> Result<Self> {
        let keys = spec.key_exprs();
        let fields = keys
            .iter()
            .enumerate()
            .map(|(i, e)| {
                Ok(Field::new(
                    format!("k{i}"),
                    e.data_type(input)?,
                    e.nullable(input)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let op = Self {
            keys,
            key_schema: Arc::new(Schema::new(fields)),
            spec,
            windows: BTreeMap::new(),
            watermark: None,
            forwarded: ForwardedWatermark::default(),
            origin: origin.into(),
        };
        // An aggregate that cannot run on these types fails here, at CREATE time, rather
        // than with the first row. (The adapter creates its accumulators lazily, so make one.)
        op.new_window(0)?;
        for a in &op.spec.aggregates {
            a.create_accumulator()?;
        }
        Ok(op)
    }

    fn new_window(&self, start: i64) -> Result<Window> {
        let accumulators = create_accumulators(&self.spec.aggregates)?;
        let groups = if self.keys.is_empty() {
            None
        } else {
            Some(new_group_values(
                Arc::clone(&self.key_schema),
                &GroupOrdering::None,
            )?)
        };
        Ok(Window {
            start,
            groups,
            len: 0,
            accumulators,
        })
    }

    fn emit(&mut self, end: i64, out: &mut Collector) -> Result<()> {
        let Some(mut w) = self.windows.remove(&end) else {
            return Ok(());
        };
        let n = w.len;
        let mut keys = match &mut w.groups {
            Some(g) => g.emit(EmitTo::All)?.into_iter(),
            None => Vec::new().into_iter(),
        };
        let schema = &self.spec.schema;
        let bound = |i: usize, t: i64| -> Result<ArrayRef> {
            let a: ArrayRef =
                Arc::new(TimestampMicrosecondArray::from_value(t, n).with_timezone("UTC"));
            Ok(cast(&a, schema.field(i).data_type())?)
        };
        let mut columns = Vec::with_capacity(schema.fields().len());
        for i in 0..self.spec.group_exprs.len() {
            if i == self.spec.window_start {
                columns.push(bound(i, w.start)?);
            } else if i == self.spec.window_end {
                columns.push(bound(i, end)?);
            } else {
                let k = keys
                    .next()
                    .unwrap_or_else(|| new_null_array(schema.field(i).data_type(), n));
                columns.push(k);
            }
        }
        for acc in &mut w.accumulators {
            columns.push(acc.evaluate(EmitTo::All)?);
        }
        out.emit(RecordBatch::try_new(
            Arc::clone(&self.spec.schema),
            columns,
        )?);
        Ok(())
    }
}

impl WindowAggregate {
    /// The columns of the `windows` state table: each open window's bounds, its groups'
    /// keys and every aggregate's intermediate state (DataFusion's `state_fields`, the
    /// partial aggregates its two-phase aggregation exchanges).
    fn state_schema(&self) -> Result<SchemaRef> {
        let mut fields = vec![
            Field::new("window_start", arrow::datatypes::DataType::Int64, false),
            Field::new("window_end", arrow::datatypes::DataType::Int64, false),
        ];
        fields.extend(self.key_schema.fields().iter().map(|f| f.as_ref().clone()));
        for (i, a) in self.spec.aggregates.iter().enumerate() {
            for (j, f) in a.state_fields()?.iter().enumerate() {
                fields.push(Field::new(format!("a{i}_{j}"), f.data_type().clone(), true));
            }
        }
        Ok(Arc::new(Schema::new(fields)))
    }
}

/// What an aggregate's accumulator is fed, in order: its arguments, then the expressions of
/// its `ORDER BY` (`first_value(x ORDER BY ts)`), as DataFusion's aggregation feeds them.
pub(crate) fn aggregate_inputs(agg: &AggregateFunctionExpr) -> Vec<Arc<dyn PhysicalExpr>> {
    let all = agg.all_expressions();
    let mut inputs = all.args;
    inputs.extend(all.order_by_exprs);
    inputs
}

/// One fresh groups accumulator per aggregate: DataFusion's own where the aggregate has one,
/// an adapter over its plain accumulator otherwise.
pub(crate) fn create_accumulators(
    aggregates: &[Arc<AggregateFunctionExpr>],
) -> Result<Vec<Box<dyn GroupsAccumulator>>> {
    aggregates
        .iter()
        .map(|a| -> Result<Box<dyn GroupsAccumulator>> {
            if a.groups_accumulator_supported() {
                Ok(a.create_groups_accumulator()?)
            } else {
                let a = Arc::clone(a);
                Ok(Box::new(GroupsAccumulatorAdapter::new(move || {
                    a.create_accumulator()
                })))
            }
        })
        .collect()
}

/// What a batch's rows are aggregated by: evaluated all at once, before any state changes.
struct Inputs {
    keys: Vec<ArrayRef>,
    starts: TimestampMicrosecondArray,
    ends: TimestampMicrosecondArray,
    /// Each aggregate's arguments.
    args: Vec<Vec<ArrayRef>>,
}

impl WindowAggregate {
    fn evaluate(&self, batch: &RecordBatch) -> Result<Inputs> {
        let n = batch.num_rows();
        let micros = |i: usize| -> Result<TimestampMicrosecondArray> {
            self.spec.group_exprs[i]
                .evaluate(batch)?
                .into_array(n)?
                .as_any()
                .downcast_ref::<TimestampMicrosecondArray>()
                .cloned()
                .ok_or_else(|| EngineError::Internal("window bound is not a µs timestamp".into()))
        };
        let args = self
            .spec
            .aggregates
            .iter()
            .map(|agg| evaluate_all(&aggregate_inputs(agg), batch))
            .collect::<Result<_>>()?;
        Ok(Inputs {
            keys: evaluate_all(&self.keys, batch)?,
            starts: micros(self.spec.window_start)?,
            ends: micros(self.spec.window_end)?,
            args,
        })
    }
}

impl Operator for WindowAggregate {
    fn name(&self) -> &str {
        "window_aggregate"
    }

    fn process_batch(&mut self, batch: RecordBatch, out: &mut Collector) -> Result<()> {
        // Rows whose key, window or aggregate arguments fail to evaluate go to the errors zone.
        let Some((batch, inputs)) =
            evaluate_or_reject(batch, &self.origin, out, |b| self.evaluate(b))?
        else {
            return Ok(());
        };
        let Inputs {
            keys,
            starts,
            ends,
            args,
        } = inputs;
        let n = batch.num_rows();
        let horizon = self
            .watermark
            .map_or(i64::MIN, |w| self.spec.lateness.horizon(w));
        // Route rows to windows first (a batch usually touches one or two), so the window map
        // is consulted per window, not per row.
        // (window end, window start, rows, their group indices)
        let mut routed: Vec<(i64, i64, Vec<u32>, Vec<usize>)> = Vec::new();
        let mut last: Option<usize> = None;
        for i in 0..n {
            if ends.is_null(i) || starts.is_null(i) {
                out.reject(bad_row(
                    &batch,
                    i,
                    &self.origin,
                    "the row has no window (NULL event time)",
                ));
                continue;
            }
            let end = ends.value(i);
            if end <= horizon {
                self.spec.lateness.late_row(
                    &batch,
                    i,
                    &self.origin,
                    &format!(
                        "late: its window ended at {} and was emitted when the watermark passed it",
                        EventTime(end)
                    ),
                    out,
                );
                continue;
            }
            let slot = match last {
                Some(k) if routed[k].0 == end => k,
                _ => match routed.iter().position(|r| r.0 == end) {
                    Some(k) => k,
                    None => {
                        routed.push((end, starts.value(i), Vec::new(), Vec::new()));
                        routed.len() - 1
                    }
                },
            };
            last = Some(slot);
            routed[slot].2.push(i as u32);
        }
        // Group indices, one window at a time (a window's rows taken out of the batch only
        // when the batch spans several windows or holds rejected rows).
        for (end, start, take_rows, groups) in &mut routed {
            if !self.windows.contains_key(end) {
                let w = self.new_window(*start)?;
                self.windows.insert(*end, w);
            }
            let w = self.windows.get_mut(end).expect("inserted above");
            match &mut w.groups {
                Some(g) => {
                    let cols = if take_rows.len() == n {
                        keys.clone()
                    } else {
                        let idx = UInt32Array::from(take_rows.clone());
                        keys.iter()
                            .map(|k| take(k.as_ref(), &idx, None))
                            .collect::<Result<Vec<_>, _>>()?
                    };
                    g.intern(&cols, groups)?;
                    w.len = g.len();
                }
                None => {
                    groups.clear();
                    groups.resize(take_rows.len(), 0);
                    w.len = 1;
                }
            }
        }
        for (end, _, take_rows, groups) in routed {
            let w = self.windows.get_mut(&end).expect("routed windows exist");
            let total = w.len;
            let indices = (take_rows.len() != n).then(|| UInt32Array::from(take_rows));
            for (values, acc) in args.iter().zip(&mut w.accumulators) {
                let values = match &indices {
                    None => values.clone(),
                    Some(idx) => values
                        .iter()
                        .map(|v| take(v.as_ref(), idx, None))
                        .collect::<Result<Vec<_>, _>>()?,
                };
                acc.update_batch(&values, &groups, None, total)?;
            }
        }
        Ok(())
    }

    fn on_watermark(&mut self, t: EventTime, out: &mut Collector) -> Result<()> {
        let w = self.watermark.map_or(t.0, |w| w.max(t.0));
        self.watermark = Some(w);
        let horizon = self.spec.lateness.horizon(w);
        let closed: Vec<i64> = self.windows.range(..=horizon).map(|(e, _)| *e).collect();
        for end in closed {
            self.emit(end, out)?;
        }
        let held = self.windows.values().map(|w| w.start).min();
        self.forwarded.advance(horizon, held, out);
        Ok(())
    }

    fn on_close(&mut self, out: &mut Collector) -> Result<()> {
        let open: Vec<i64> = self.windows.keys().copied().collect();
        for end in open {
            self.emit(end, out)?;
        }
        Ok(())
    }

    /// State: the watermarks, and table `windows` (see `WindowAggregate::state_schema`).
    /// Taking it drains each window's groups and accumulators and merges them back.
    fn snapshot(&mut self) -> Result<Option<OperatorState>> {
        let schema = self.state_schema()?;
        let mut parts: Vec<Vec<ArrayRef>> = vec![];
        for (end, w) in self.windows.iter_mut() {
            let n = w.len;
            if n == 0 {
                continue;
            }
            let mut columns: Vec<ArrayRef> = vec![
                Arc::new(Int64Array::from_value(w.start, n)),
                Arc::new(Int64Array::from_value(*end, n)),
            ];
            let groups: Vec<usize> = (0..n).collect();
            if let Some(g) = &mut w.groups {
                let keys = g.emit(EmitTo::All)?;
                // Into a fresh table: DataFusion 55's table of a boolean key column among
                // others cannot intern again after emitting all (it reads its emptied bits).
                let mut fresh =
                    new_group_values(Arc::clone(&self.key_schema), &GroupOrdering::None)?;
                let mut again = Vec::with_capacity(n);
                fresh.intern(&keys, &mut again)?;
                debug_assert_eq!(again, groups);
                *g = fresh;
                columns.extend(keys);
            }
            let fresh = create_accumulators(&self.spec.aggregates)?;
            for (acc, mut new) in w.accumulators.iter_mut().zip(fresh) {
                let state = acc.state(EmitTo::All)?;
                new.merge_batch(&state, &groups, n)?;
                *acc = new;
                columns.extend(state);
            }
            parts.push(columns);
        }
        let columns = (0..schema.fields().len())
            .map(|c| {
                if parts.is_empty() {
                    return Ok(arrow::array::new_empty_array(schema.field(c).data_type()));
                }
                let arrays: Vec<&dyn Array> = parts.iter().map(|p| p[c].as_ref()).collect();
                Ok(concat(&arrays)?)
            })
            .collect::<Result<Vec<_>>>()?;
        let table = RecordBatch::try_new(schema, columns)?;
        let mut state = OperatorState {
            version: STATE_VERSION,
            ..OperatorState::default()
        };
        save_watermarks(&mut state, self.watermark, &self.forwarded);
        state.tables.insert("windows".into(), table);
        Ok(Some(state))
    }

    fn restore(&mut self, parts: Vec<OperatorState>, keep: &KeyFilter) -> Result<()> {
        super::check_state_version(self.name(), &parts, STATE_VERSION)?;
        let nkeys = self.key_schema.fields().len();
        let state_widths = self
            .spec
            .aggregates
            .iter()
            .map(|a| Ok(a.state_fields()?.len()))
            .collect::<Result<Vec<_>>>()?;
        (self.watermark, self.forwarded) = restored_watermarks(&parts);
        for part in parts {
            let Some(table) = part.tables.get("windows") else {
                continue;
            };
            let expected = 2 + nkeys + state_widths.iter().sum::<usize>();
            if table.num_columns() != expected {
                return Err(EngineError::Checkpoint(format!(
                    "window state has {} columns where this query needs {expected}",
                    table.num_columns()
                )));
            }
            let keys: Vec<ArrayRef> = table.columns()[2..2 + nkeys].to_vec();
            let mask = keep.keeps(&keys, table.num_rows())?;
            let table = filter_record_batch(table, &arrow::array::BooleanArray::from(mask))?;
            let as_i64 = |c: usize| -> Result<Int64Array> {
                table
                    .column(c)
                    .as_any()
                    .downcast_ref::<Int64Array>()
                    .cloned()
                    .ok_or_else(|| EngineError::Checkpoint("window bounds are not Int64".into()))
            };
            let (starts, ends) = (as_i64(0)?, as_i64(1)?);
            let mut by_end: BTreeMap<i64, (i64, Vec<u32>)> = BTreeMap::new();
            for i in 0..table.num_rows() {
                by_end
                    .entry(ends.value(i))
                    .or_insert_with(|| (starts.value(i), vec![]))
                    .1
                    .push(i as u32);
            }
            for (end, (start, rows)) in by_end {
                let idx = UInt32Array::from(rows);
                let cols = table
                    .columns()
                    .iter()
                    .map(|c| take(c.as_ref(), &idx, None))
                    .collect::<Result<Vec<_>, _>>()?;
                if !self.windows.contains_key(&end) {
                    let w = self.new_window(start)?;
                    self.windows.insert(end, w);
                }
                let w = self.windows.get_mut(&end).expect("inserted above");
                let mut groups = Vec::with_capacity(idx.len());
                match &mut w.groups {
                    Some(g) => {
                        g.intern(&cols[2..2 + nkeys], &mut groups)?;
                        w.len = g.len();
                    }
                    None => {
                        groups.resize(idx.len(), 0);
                        w.len = 1;
                    }
                }
                let mut c = 2 + nkeys;
                for (acc, width) in w.accumulators.iter_mut().zip(&state_widths) {
                    acc.merge_batch(&cols[c..c + width], &groups, w.len)?;
                    c += width;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
    use arrow::util::pretty::pretty_format_batches;
    use datafusion::functions_aggregate::sum::sum_udaf;
    use datafusion::logical_expr::Operator as BinaryOp;
    use datafusion::physical_expr::aggregate::AggregateExprBuilder;
    use datafusion::physical_expr::expressions::{binary, col, lit};

    use super::*;
    use crate::message::Message;

    fn input() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, false),
            Field::new(
                "window_end",
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                false,
            ),
            Field::new("v", DataType::Int64, false),
        ]))
    }

    fn batch(rows: &[(i64, i64, i64)]) -> RecordBatch {
        RecordBatch::try_new(
            input(),
            vec![
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.0))),
                Arc::new(
                    TimestampMicrosecondArray::from_iter_values(rows.iter().map(|r| r.1))
                        .with_timezone("UTC"),
                ),
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.2))),
            ],
        )
        .unwrap()
    }

    fn operator() -> WindowAggregate {
        operator_summing(col("v", &input()).unwrap())
    }

    /// `SELECT k, window_end, sum(<arg>) AS total … GROUP BY k, window_end`.
    fn operator_summing(arg: Arc<dyn PhysicalExpr>) -> WindowAggregate {
        let schema = input();
        let sum = AggregateExprBuilder::new(sum_udaf(), vec![arg])
            .schema(Arc::clone(&schema))
            .alias("total")
            .build()
            .unwrap();
        let output = Arc::new(Schema::new(vec![
            schema.field(0).clone(),
            schema.field(1).clone(),
            Field::new("total", DataType::Int64, true),
        ]));
        let spec = WindowAggregateSpec {
            group_exprs: vec![
                col("k", &schema).unwrap(),
                col("window_end", &schema).unwrap(),
            ],
            window_start: 1,
            window_end: 1,
            lateness: Lateness::default(),
            aggregates: vec![Arc::new(sum)],
            schema: output,
        };
        WindowAggregate::try_new(spec, &schema, "stream t").unwrap()
    }

    fn rows(out: &mut Collector) -> (String, Vec<String>) {
        let mut batches = vec![];
        let mut other = vec![];
        for m in out.take_messages() {
            match m {
                Message::Data(b) => batches.push(b),
                Message::Watermark(t) => other.push(format!("wm {}", t.0)),
                m => other.push(format!("{m:?}")),
            }
        }
        (pretty_format_batches(&batches).unwrap().to_string(), other)
    }

    #[test]
    fn windows_emit_once_when_the_watermark_passes_and_late_rows_are_rejected() {
        let mut op = operator();
        let mut out = Collector::default();
        op.process_batch(batch(&[(1, 10, 1), (1, 10, 2), (2, 20, 5)]), &mut out)
            .unwrap();
        assert_eq!(rows(&mut out).0, "++\n++", "nothing before the watermark");

        op.on_watermark(EventTime(10), &mut out).unwrap();
        let (emitted, after) = rows(&mut out);
        assert!(
            emitted.contains("| 1 | 1970-01-01T00:00:00.000010Z | 3     |"),
            "{emitted}"
        );
        assert!(
            !emitted.contains("| 2 |"),
            "window 20 is still open: {emitted}"
        );
        assert_eq!(after, ["wm 10"], "the watermark follows the window's rows");

        op.process_batch(batch(&[(1, 10, 100), (2, 20, 1)]), &mut out)
            .unwrap();
        let late = out.take_rejected();
        assert_eq!(late.len(), 1);
        assert!(late[0].reason.starts_with("late:"), "{}", late[0].reason);
        assert_eq!(
            late[0].payload,
            r#"{"k":1,"window_end":"1970-01-01T00:00:00.000010Z","v":100}"#
        );

        op.on_watermark(EventTime(10), &mut out).unwrap();
        assert_eq!(rows(&mut out).0, "++\n++", "a window is emitted once");
        op.on_close(&mut out).unwrap();
        let (emitted, _) = rows(&mut out);
        assert!(
            emitted.contains("| 2 | 1970-01-01T00:00:00.000020Z | 6     |"),
            "{emitted}"
        );
    }

    #[test]
    fn rows_whose_arguments_fail_go_to_the_errors_zone_and_the_rest_aggregate() {
        let schema = input();
        // sum(60 / v): fails where v = 0.
        let arg = binary(
            lit(60i64),
            BinaryOp::Divide,
            col("v", &schema).unwrap(),
            &schema,
        )
        .unwrap();
        let mut op = operator_summing(arg);
        let mut out = Collector::default();
        op.process_batch(batch(&[(1, 10, 2), (1, 10, 0), (1, 10, 3)]), &mut out)
            .unwrap();
        let bad = out.take_rejected();
        assert_eq!(bad.len(), 1);
        assert!(
            bad[0].reason.contains("Divide by zero"),
            "{}",
            bad[0].reason
        );
        assert_eq!(
            bad[0].payload,
            r#"{"k":1,"window_end":"1970-01-01T00:00:00.000010Z","v":0}"#
        );
        assert_eq!(bad[0].origin, "stream t");
        // A batch of bad rows only changes nothing.
        op.process_batch(batch(&[(2, 10, 0)]), &mut out).unwrap();
        assert_eq!(out.take_rejected().len(), 1);
        op.on_watermark(EventTime(10), &mut out).unwrap();
        let (emitted, _) = rows(&mut out);
        assert!(
            emitted.contains("| 1 | 1970-01-01T00:00:00.000010Z | 50    |"),
            "30 + 20: {emitted}"
        );
        assert!(!emitted.contains("| 2 |"), "{emitted}");
    }
}
