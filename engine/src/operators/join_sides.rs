//! `JoinSides`: the operators a join side runs on its own — a window aggregation and the
//! filters and projections after it (Nexmark q8 joins two aggregated sides) — after the
//! merge, in front of the [`StreamJoin`](super::StreamJoin).
//!
//! Its contract:
//! - **Input**: the two sides merged as the branches send them: `side` (0: left, 1: right),
//!   the join key (`keys` columns), the left side's columns, the right side's (the other
//!   side's NULL). A side with operators sends what they read (an aggregated side: the
//!   aggregation's input rows) with the join key its output rows will have (for an
//!   aggregated side, one of its GROUP BY keys, computed from the input row), so the rows
//!   of one join key reach one subtask, and with them every group of that key.
//! - **Output**: the join's input, in the same layout with each side's columns as the join
//!   reads them: a side without operators passes through; a side with operators runs
//!   through them, and their output rows are laid out with their join key (columns `keys`
//!   of the operators' output).
//! - **Watermark**: the input's goes through each side's operators; forwarded is the least
//!   of what they forward (a window aggregation holds it back to its earliest open window,
//!   so its rows are never late in the join) and, for a side without operators, the
//!   input's.
//! - **Checkpoints**: barriers go through each side's operators; the state is theirs, its
//!   values and tables named `<side>.<operator>.<name>`. Restored at another parallelism, a
//!   side's aggregation keeps the groups whose join key (its state keys `state_keys`)
//!   routes to the subtask.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

use arrow::array::{ArrayRef, UInt8Array, new_null_array};
use arrow::compute::filter_record_batch;
use arrow::compute::kernels::boolean::not;
use arrow::compute::kernels::cmp::eq;
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;

use super::check_state_version;
use crate::checkpoint::{KeyFilter, OperatorState};
use crate::error::{EngineError, Result};
use crate::message::Message;
use crate::operator::{Collector, Operator, OperatorChain};
use crate::time::EventTime;

/// The layout of this operator's own checkpointed values (bump it when it changes; the
/// sides' operators number their own layouts).
const STATE_VERSION: u32 = 1;

/// One side of the join, as [`JoinSides`] sees it.
#[derive(Debug, Clone)]
pub struct JoinSideSpec {
    /// The side's columns in the input.
    pub input: Range<usize>,
    /// The side's columns in the output.
    pub output: Range<usize>,
    /// The side's own operators, if it has any.
    pub ops: Option<SideOpsSpec>,
}

/// What a side with its own operators needs besides them.
#[derive(Debug, Clone)]
pub struct SideOpsSpec {
    /// The schema of the side's input columns, as the first operator reads them.
    pub schema: SchemaRef,
    /// The join key: columns of the operators' output, in the join's key order.
    pub keys: Vec<usize>,
    /// The join key among the first operator's state keys (its GROUP BY keys without the
    /// window), in the join's key order.
    pub state_keys: Vec<usize>,
}

/// What [`JoinSides`] does. See the module docs.
#[derive(Debug, Clone)]
pub struct JoinSidesSpec {
    /// How many join key columns follow `side`.
    pub keys: usize,
    /// Left, right.
    pub sides: [JoinSideSpec; 2],
    /// The output schema (the join's input).
    pub output: SchemaRef,
}

/// The running operator. See the module docs.
pub struct JoinSides {
    spec: JoinSidesSpec,
    chains: [Option<OperatorChain>; 2],
    /// The input's watermark.
    watermark: Option<i64>,
    /// What each side's operators forwarded last.
    side_watermarks: [Option<i64>; 2],
    forwarded: Option<i64>,
}

impl JoinSides {
    /// The operator for `spec`, with the operators of each side that has some (as
    /// `spec.sides[i].ops` says).
    pub fn new(spec: JoinSidesSpec, chains: [Option<OperatorChain>; 2]) -> Result<Self> {
        for (side, chain) in spec.sides.iter().zip(&chains) {
            if side.ops.is_some() != chain.is_some() {
                return Err(EngineError::Internal(
                    "join sides: a side's operators and their description disagree".into(),
                ));
            }
        }
        Ok(Self {
            spec,
            chains,
            watermark: None,
            side_watermarks: [None, None],
            forwarded: None,
        })
    }

    /// Lays out rows of `side` in the output: `keys` and `columns` (the side's).
    fn lay_out(
        &self,
        side: usize,
        keys: Vec<ArrayRef>,
        columns: &[ArrayRef],
        rows: usize,
    ) -> Result<RecordBatch> {
        let output = &self.spec.output;
        let own = &self.spec.sides[side].output;
        let mut out: Vec<ArrayRef> = Vec::with_capacity(output.fields().len());
        out.push(Arc::new(UInt8Array::from_value(side as u8, rows)));
        out.extend(keys);
        for (i, f) in output.fields().iter().enumerate().skip(1 + self.spec.keys) {
            out.push(if own.contains(&i) {
                Arc::clone(&columns[i - own.start])
            } else {
                new_null_array(f.data_type(), rows)
            });
        }
        Ok(RecordBatch::try_new(Arc::clone(output), out)?)
    }

    /// Rows of `side` (and only those): passed on, or run through the side's operators.
    fn side_rows(&mut self, side: usize, batch: &RecordBatch, out: &mut Collector) -> Result<()> {
        let spec = &self.spec.sides[side];
        let columns = &batch.columns()[spec.input.clone()];
        match &spec.ops {
            None => {
                let keys = batch.columns()[1..=self.spec.keys].to_vec();
                let laid = self.lay_out(side, keys, columns, batch.num_rows())?;
                out.emit(laid);
                Ok(())
            }
            Some(ops) => {
                let input = RecordBatch::try_new(Arc::clone(&ops.schema), columns.to_vec())?;
                self.run_side(side, Message::Data(input), out)
            }
        }
    }

    /// Runs `msg` through the operators of `side`; lays out the rows they emit, notes the
    /// watermark they forward, passes on what they reject and count.
    fn run_side(&mut self, side: usize, msg: Message, out: &mut Collector) -> Result<()> {
        let Some(chain) = self.chains[side].as_mut() else {
            return Ok(());
        };
        let mut inner = Collector::default();
        chain.process(msg, &mut inner)?;
        for r in inner.take_rejected() {
            out.reject(r);
        }
        let counts = inner.take_counts();
        out.count_late(counts.late);
        out.count_duplicates(counts.duplicates);
        out.add_state_rows_by_side(counts.state_rows);
        let ops = self.spec.sides[side]
            .ops
            .as_ref()
            .expect("a side with a chain");
        for m in inner.take_messages() {
            match m {
                Message::Data(b) => {
                    let keys = ops.keys.iter().map(|&k| Arc::clone(b.column(k))).collect();
                    let laid = self.lay_out(side, keys, b.columns(), b.num_rows())?;
                    out.emit(laid);
                }
                Message::Watermark(w) => self.side_watermarks[side] = Some(w.0),
                // This operator forwards its own barriers and end.
                Message::Barrier(_) | Message::End => {}
            }
        }
        Ok(())
    }

    /// Forwards the least of the sides' watermarks, once each side has one.
    fn forward_watermark(&mut self, out: &mut Collector) {
        let mut least: Option<i64> = None;
        for side in 0..2 {
            let w = if self.chains[side].is_some() {
                self.side_watermarks[side]
            } else {
                self.watermark
            };
            let Some(w) = w else { return };
            least = Some(least.map_or(w, |l| l.min(w)));
        }
        if let Some(w) = least
            && self.forwarded.is_none_or(|f| w > f)
        {
            self.forwarded = Some(w);
            out.emit_watermark(EventTime(w));
        }
    }
}

impl Operator for JoinSides {
    fn name(&self) -> &str {
        "join_sides"
    }

    fn process_batch(&mut self, batch: RecordBatch, out: &mut Collector) -> Result<()> {
        let left = eq(batch.column(0), &UInt8Array::new_scalar(0))?;
        match left.true_count() {
            n if n == batch.num_rows() => self.side_rows(0, &batch, out),
            0 => self.side_rows(1, &batch, out),
            _ => {
                self.side_rows(0, &filter_record_batch(&batch, &left)?, out)?;
                let right = not(&left)?;
                self.side_rows(1, &filter_record_batch(&batch, &right)?, out)
            }
        }
    }

    fn on_watermark(&mut self, t: EventTime, out: &mut Collector) -> Result<()> {
        self.watermark = Some(self.watermark.map_or(t.0, |w| w.max(t.0)));
        for side in 0..2 {
            self.run_side(side, Message::Watermark(t), out)?;
        }
        self.forward_watermark(out);
        Ok(())
    }

    fn on_barrier(&mut self, barrier: crate::message::Barrier, out: &mut Collector) -> Result<()> {
        for side in 0..2 {
            self.run_side(side, Message::Barrier(barrier), out)?;
        }
        out.emit_barrier(barrier);
        Ok(())
    }

    fn on_close(&mut self, out: &mut Collector) -> Result<()> {
        for side in 0..2 {
            self.run_side(side, Message::End, out)?;
        }
        Ok(())
    }

    fn checkpointable(&self) -> bool {
        self.chains.iter().flatten().all(|c| c.checkpointable())
    }

    /// State: values `watermark`, `forwarded`, `<side>.watermark` (what the side's operators
    /// forwarded), and each side operator's state under `<side>.<operator>.`, with its
    /// layout version as value `<side>.<operator>.version`.
    fn snapshot(&mut self) -> Result<Option<OperatorState>> {
        let mut state = OperatorState {
            version: STATE_VERSION,
            ..Default::default()
        };
        let values = &mut state.values;
        if let Some(w) = self.watermark {
            values.insert("watermark".into(), w);
        }
        if let Some(w) = self.forwarded {
            values.insert("forwarded".into(), w);
        }
        for side in 0..2 {
            if let Some(w) = self.side_watermarks[side] {
                state.values.insert(format!("{side}.watermark"), w);
            }
            let Some(chain) = self.chains[side].as_mut() else {
                continue;
            };
            for (op, s) in chain.snapshot()?.into_iter().enumerate() {
                let Some(s) = s else { continue };
                let prefix = format!("{side}.{op}.");
                state
                    .values
                    .insert(format!("{prefix}version"), i64::from(s.version));
                for (k, v) in s.values {
                    state.values.insert(format!("{prefix}{k}"), v);
                }
                for (k, t) in s.tables {
                    state.tables.insert(format!("{prefix}{k}"), t);
                }
            }
        }
        Ok(Some(state))
    }

    fn restore(&mut self, parts: Vec<OperatorState>, keep: &KeyFilter) -> Result<()> {
        check_state_version(self.name(), &parts, STATE_VERSION)?;
        let least = |key: &str| {
            parts
                .iter()
                .filter_map(|p| p.values.get(key).copied())
                .min()
        };
        self.watermark = least("watermark");
        self.forwarded = least("forwarded");
        for side in 0..2 {
            self.side_watermarks[side] = least(&format!("{side}.watermark"));
            let Some(chain) = self.chains[side].as_mut() else {
                continue;
            };
            let names: Vec<String> = chain.names().iter().map(|n| n.to_string()).collect();
            let per_op: Vec<Vec<OperatorState>> = names
                .iter()
                .enumerate()
                .map(|(op, name)| {
                    let prefix = format!("{side}.{op}.");
                    parts
                        .iter()
                        .filter_map(|p| unprefixed(p, &prefix, name))
                        .collect::<Result<Vec<_>>>()
                })
                .collect::<Result<_>>()?;
            let ops = self.spec.sides[side]
                .ops
                .as_ref()
                .expect("a side with a chain");
            chain.restore(per_op, &keep.selecting(ops.state_keys.clone()))?;
        }
        Ok(())
    }
}

/// The state of one side operator (`name`) inside `part`: its entries under `prefix`.
fn unprefixed(part: &OperatorState, prefix: &str, name: &str) -> Option<Result<OperatorState>> {
    let version = *part.values.get(&format!("{prefix}version"))?;
    let strip = |k: &String| k.strip_prefix(prefix).map(str::to_string);
    let values: BTreeMap<String, i64> = part
        .values
        .iter()
        .filter_map(|(k, v)| Some((strip(k)?, *v)))
        .filter(|(k, _)| k != "version")
        .collect();
    let tables = part
        .tables
        .iter()
        .filter_map(|(k, t)| Some((strip(k)?, t.clone())))
        .collect();
    Some(
        u32::try_from(version)
            .map_err(|_| EngineError::Checkpoint(format!("{prefix}version {version}")))
            .map(|version| OperatorState {
                operator: name.to_string(),
                version,
                values,
                tables,
            }),
    )
}
