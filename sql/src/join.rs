//! Streaming joins: a logical `Join` → the two sides as branches, padded into one merged
//! input, and a [`StreamJoin`](sluice_engine::operators::StreamJoin) after the merge.
//!
//! A join runs only when event time bounds it (else its state would only grow):
//! - **interval join**: the condition bounds the right side's event time by the left's from
//!   both sides (`s.ts BETWEEN o.ts AND o.ts + INTERVAL '1' HOUR`, `o.ts > s.ts - …`, any
//!   direction, `<`/`<=`/`>`/`>=`/`BETWEEN`);
//! - **window join**: both sides are windowed (`TUMBLE`/`HOP`/`CUMULATE`) and joined on
//!   `window_start` and `window_end` (and keys); a side may aggregate per window first
//!   (Nexmark q8), its aggregation then running after the merge in front of the join
//!   ([`OpSpec::JoinSides`]; see `join_side`).
//!
//! Anything else (a regular join) is refused, naming these forms.
//!
//! The merged input: `side` (UInt8), the equi-join keys `__key0…`, the left side's columns
//! `__l0…`, the right side's `__r0…` (those of the other side NULL). Each side's branches end
//! with the projection that pads them so; an aggregated side's branches send its
//! aggregation's input columns instead, which `JoinSides` turns into the side's columns.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::common::TableReference;
use datafusion::common::{DFSchema, JoinType, ScalarValue};
use datafusion::execution::context::ExecutionProps;
use datafusion::logical_expr::LogicalPlan;
use datafusion::logical_expr::utils::split_conjunction;
use datafusion::logical_expr::{Expr, ExprSchemable, Operator as BinaryOp};
use datafusion::physical_expr::expressions::{BinaryExpr, CastExpr, Column, Literal};
use datafusion::physical_expr::{PhysicalExpr, create_physical_expr};
use sluice_engine::operators::{
    JoinKind, JoinSideSpec, JoinSidesSpec, SideOpsSpec, StreamJoinSpec, TemporalJoinSpec,
};

use crate::error::{Result, SqlError};
use crate::planner::{
    BranchPlan, OpSpec, Relation, StatefulOptions, Translated, needs_event_time, translate_stream,
};
use crate::temporal::Temporal;
use crate::window::{WINDOW_END, WINDOW_START};

fn unbounded() -> SqlError {
    SqlError::NotSupported(
        "a regular JOIN of unbounded inputs would keep every row forever: bound it in event time \
         with an interval join (ON o.k = s.k AND s.ts BETWEEN o.ts AND o.ts + INTERVAL '1' HOUR) \
         or a window join (both sides TUMBLE/HOP/CUMULATE, ON l.window_start = r.window_start \
         AND l.window_end = r.window_end AND …)"
            .into(),
    )
}

/// A term `column + offset` (µs) of a time condition; `column` indexes the join's output.
fn linear(e: &Expr, schema: &DFSchema) -> Option<(usize, i64)> {
    match e {
        Expr::Column(c) => Some((schema.index_of_column(c).ok()?, 0)),
        Expr::Cast(c) if matches!(c.field.data_type(), DataType::Timestamp(..)) => {
            linear(&c.expr, schema)
        }
        Expr::BinaryExpr(b) if matches!(b.op, BinaryOp::Plus | BinaryOp::Minus) => {
            let (col, base) = linear(&b.left, schema)?;
            let d = interval_micros(&b.right)?;
            let d = if b.op == BinaryOp::Minus { -d } else { d };
            Some((col, base.checked_add(d)?))
        }
        _ => None,
    }
}

/// A constant interval's length in µs (months have none).
fn interval_micros(e: &Expr) -> Option<i64> {
    let Expr::Literal(v, _) = e else {
        return None;
    };
    match v {
        ScalarValue::IntervalMonthDayNano(Some(i)) if i.months == 0 => {
            Some(i64::from(i.days) * 86_400_000_000 + i.nanoseconds / 1_000)
        }
        ScalarValue::IntervalDayTime(Some(i)) => {
            Some(i64::from(i.days) * 86_400_000_000 + i64::from(i.milliseconds) * 1_000)
        }
        ScalarValue::DurationMicrosecond(Some(d)) => Some(*d),
        ScalarValue::DurationMillisecond(Some(d)) => d.checked_mul(1_000),
        ScalarValue::DurationSecond(Some(d)) => d.checked_mul(1_000_000),
        _ => None,
    }
}

/// The bounds `a <= r - l <= b` the condition puts on the right side's time `r` relative
/// to the left's `l` (output column indices `lt`, `rt`), where it gives them.
fn time_bounds(
    filter: Option<&Expr>,
    schema: &DFSchema,
    lt: usize,
    rt: usize,
) -> (Option<i64>, Option<i64>) {
    let (mut lower, mut upper): (Option<i64>, Option<i64>) = (None, None);
    let mut note = |op: BinaryOp, a: &Expr, b: &Expr| {
        let (Some((ca, oa)), Some((cb, ob))) = (linear(a, schema), linear(b, schema)) else {
            return;
        };
        // a + oa  op  b + ob, as r - l  op'  c.
        let (op, c) = if ca == rt && cb == lt {
            (op, ob - oa)
        } else if ca == lt && cb == rt {
            let flipped = match op {
                BinaryOp::Lt => BinaryOp::Gt,
                BinaryOp::LtEq => BinaryOp::GtEq,
                BinaryOp::Gt => BinaryOp::Lt,
                BinaryOp::GtEq => BinaryOp::LtEq,
                other => other,
            };
            (flipped, oa - ob)
        } else {
            return;
        };
        match op {
            BinaryOp::Lt | BinaryOp::LtEq => upper = Some(upper.map_or(c, |u| u.min(c))),
            BinaryOp::Gt | BinaryOp::GtEq => lower = Some(lower.map_or(c, |l| l.max(c))),
            _ => {}
        }
    };
    for c in filter.map(split_conjunction).unwrap_or_default() {
        match c {
            Expr::BinaryExpr(b)
                if matches!(
                    b.op,
                    BinaryOp::Lt | BinaryOp::LtEq | BinaryOp::Gt | BinaryOp::GtEq
                ) =>
            {
                note(b.op, &b.left, &b.right)
            }
            Expr::Between(b) if !b.negated => {
                note(BinaryOp::GtEq, &b.expr, &b.low);
                note(BinaryOp::LtEq, &b.expr, &b.high);
            }
            _ => {}
        }
    }
    (lower, upper)
}

/// The event-time column of a side's branches (the same in each).
fn side_time(branches: &[BranchPlan], what: &str) -> Result<usize> {
    let first = branches[0].event_time;
    match first {
        Some(i) if branches.iter().all(|b| b.event_time == first) => Ok(i),
        _ => Err(SqlError::Invalid(format!(
            "a streaming join needs the event-time column of its {what} input: keep it in that side's select list"
        ))),
    }
}

/// `e` (a timestamp) as µs.
fn micros_of(e: Arc<dyn PhysicalExpr>, schema: &Schema) -> Result<Arc<dyn PhysicalExpr>> {
    let cast: Arc<dyn PhysicalExpr> = Arc::new(CastExpr::new(e, DataType::Int64, None));
    cast.data_type(schema)?;
    Ok(cast)
}

fn kind_name(kind: JoinKind) -> &'static str {
    match kind {
        JoinKind::Inner => "inner",
        JoinKind::Left => "left outer",
        JoinKind::Right => "right outer",
        JoinKind::Full => "full outer",
    }
}

/// The name a side of a join goes by (its alias, else its table), and its table's name.
fn side_names(plan: &LogicalPlan) -> Option<(String, String)> {
    match plan {
        LogicalPlan::SubqueryAlias(a) => {
            let table = side_names(&a.input).map(|(_, t)| t).unwrap_or_default();
            Some((a.alias.table().to_string(), table))
        }
        LogicalPlan::TableScan(s) => {
            let t = s.table_name.table().to_string();
            Some((t.clone(), t))
        }
        LogicalPlan::Projection(p) => side_names(&p.input),
        LogicalPlan::Filter(f) => side_names(&f.input),
        _ => None,
    }
}

/// Translates a join (see the module docs).
pub(crate) fn join_stream(
    j: &datafusion::logical_expr::Join,
    relations: &BTreeMap<String, Relation>,
    props: &ExecutionProps,
    opts: &StatefulOptions,
) -> Result<Translated> {
    let lateness = opts.lateness;
    let temporal_of = |p: &LogicalPlan| -> Option<(&Temporal, String)> {
        let (name, table) = side_names(p)?;
        opts.temporal
            .iter()
            .find(|t| t.relation == name || t.relation == table)
            .map(|t| (t, table))
    };
    if temporal_of(&j.left).is_some() {
        return Err(SqlError::NotSupported(
            "FOR SYSTEM_TIME AS OF goes on the right side of the join (the versioned table)".into(),
        ));
    }
    let temporal = temporal_of(&j.right);
    let kind = match j.join_type {
        JoinType::Inner => JoinKind::Inner,
        JoinType::Left => JoinKind::Left,
        JoinType::Right => JoinKind::Right,
        JoinType::Full => JoinKind::Full,
        other => {
            return Err(SqlError::NotSupported(format!(
                "streaming {other} joins are not supported: INNER, LEFT, RIGHT and FULL OUTER are"
            )));
        }
    };
    let mut left = join_side(&j.left, relations, props, opts)?;
    let mut right = join_side(&j.right, relations, props, opts)?;
    needs_event_time(&left.branches, relations, "a streaming join")?;
    needs_event_time(&right.branches, relations, "a streaming join")?;
    let (ls, rs) = (j.left.schema(), j.right.schema());
    let nl = ls.fields().len();
    let aggregated = !left.ops.is_empty() || !right.ops.is_empty();

    // Window join: both sides' window bounds among the keys.
    let is_col = |e: &Expr, schema: &DFSchema, i: usize| matches!(e, Expr::Column(c) if schema.index_of_column(c).ok() == Some(i));
    let window_pair = |which: fn((usize, usize)) -> usize| {
        let (Some(lw), Some(rw)) = (left.window, right.window) else {
            return false;
        };
        j.on.iter()
            .any(|(l, r)| is_col(l, ls, which(lw)) && is_col(r, rs, which(rw)))
    };
    let window_join = window_pair(|w| w.0) && window_pair(|w| w.1);
    if aggregated && (temporal.is_some() || !window_join) {
        return Err(SqlError::NotSupported(
            "a join side that aggregates joins in a window join only: both sides windowed \
             alike and joined on their window_start and window_end (Nexmark q8's shape)"
                .into(),
        ));
    }
    // An interval join's time columns: each side's event time (kept in the plan when the
    // condition reads it).
    let times = match (
        side_time(&left.branches, "left"),
        side_time(&right.branches, "right"),
    ) {
        (Ok(lt), Ok(rt)) if !aggregated => Some((lt, rt)),
        _ => None,
    };
    let (lower, upper) = match times {
        Some((lt, rt)) => time_bounds(j.filter.as_ref(), &j.schema, lt, nl + rt),
        None => (None, None),
    };
    let bounds = match (window_join, lower, upper) {
        _ if temporal.is_some() => None,
        (true, _, _) => None,
        (false, Some(a), Some(b)) if a <= b => Some((a, b)),
        (false, Some(_), Some(_)) => {
            return Err(SqlError::Invalid(
                "the join's time bounds leave no interval: nothing could ever match".into(),
            ));
        }
        (false, _, _) => return Err(unbounded()),
    };

    // The join's input (each side's output columns), and what the branches send (the same,
    // but for an aggregated side what its aggregation reads).
    let mut fields = vec![Field::new("side", DataType::UInt8, false)];
    for (i, (l, r)) in j.on.iter().enumerate() {
        let (tl, tr) = (l.get_type(ls)?, r.get_type(rs)?);
        if tl != tr {
            return Err(SqlError::NotSupported(format!(
                "join keys `{l}` ({tl}) and `{r}` ({tr}) differ in type: cast one to the other's"
            )));
        }
        fields.push(Field::new(format!("__key{i}"), tl, true));
    }
    let keys = j.on.len();
    let side_fields = |prefix: &str, schema: &Schema| -> Vec<Field> {
        schema
            .fields()
            .iter()
            .enumerate()
            .map(|(i, f)| Field::new(format!("{prefix}{i}"), f.data_type().clone(), true))
            .collect()
    };
    let layout = |l: &Schema, r: &Schema| -> SchemaRef {
        let mut all = fields.clone();
        all.extend(side_fields("__l", l));
        all.extend(side_fields("__r", r));
        Arc::new(Schema::new(all))
    };
    let merged = layout(ls.as_arrow(), rs.as_arrow());
    let wire = layout(&left.wire, &right.wire);
    let left_start = 1 + keys;
    let right_start = left_start + ls.fields().len();

    // Each side's branches end with the projection that pads them into what they send.
    let right_wire_start = left_start + left.wire.fields().len();
    let pad = |side: u8, s: &mut JoinSideBranches| -> Result<()> {
        let on: Vec<&Expr> =
            j.on.iter()
                .map(|(l, r)| if side == 0 { l } else { r })
                .collect();
        let mut exprs: Vec<Arc<dyn PhysicalExpr>> =
            vec![Arc::new(Literal::new(ScalarValue::UInt8(Some(side))))];
        for (i, e) in on.iter().enumerate() {
            exprs.push(match &s.aggregate_keys {
                Some(k) => Arc::clone(&k[i]),
                None => {
                    let schema = if side == 0 { ls } else { rs };
                    create_physical_expr(e, schema, props, &Default::default())?
                }
            });
        }
        let start = if side == 0 {
            left_start
        } else {
            right_wire_start
        };
        let own = start..start + s.wire.fields().len();
        for (i, f) in wire.fields().iter().enumerate().skip(left_start) {
            exprs.push(if own.contains(&i) {
                Arc::new(Column::new(s.wire.field(i - start).name(), i - start))
            } else {
                Arc::new(Literal::new(ScalarValue::try_from(f.data_type())?))
            });
        }
        for b in s.branches.iter_mut() {
            b.ops.push(OpSpec::Project {
                exprs: exprs.clone(),
                schema: Arc::clone(&wire),
            });
            b.event_time = None;
        }
        Ok(())
    };
    left.aggregate_keys = left.keys_for(&j.on, ls, 0)?;
    right.aggregate_keys = right.keys_for(&j.on, rs, 1)?;
    pad(0, &mut left)?;
    pad(1, &mut right)?;
    let (left_window, right_window) = (left.window, right.window);
    let sides = aggregated
        .then(|| join_sides(j, &left, &right, &wire, &merged))
        .transpose()?;
    let (left, right) = (left.branches, right.branches);

    if let Some((t, table)) = temporal {
        return temporal_join(
            j,
            relations,
            props,
            opts,
            kind,
            (t, &table),
            times,
            (left, right),
            Arc::clone(&merged),
            (left_start, right_start),
        );
    }

    // When a stored row can no longer match; its event time; the output's.
    let col = |i: usize| Arc::new(Column::new(merged.field(i).name(), i)) as Arc<dyn PhysicalExpr>;
    // A window join side's bounds (start, end) among its columns.
    let window_of = |side: usize| -> Result<(usize, usize)> {
        let w = if side == 0 { left_window } else { right_window };
        w.ok_or_else(|| SqlError::Internal("a window join side without its window".into()))
    };
    let plus = |e: Arc<dyn PhysicalExpr>, d: i64| -> Result<Arc<dyn PhysicalExpr>> {
        let micros = micros_of(e, &merged)?;
        Ok(Arc::new(BinaryExpr::new(
            micros,
            BinaryOp::Plus,
            Arc::new(Literal::new(ScalarValue::Int64(Some(d)))),
        )))
    };
    let (expiry, time, description) = match bounds {
        Some((a, b)) => {
            let (lt, rt) = times.expect("bounds come from the time columns");
            (
                [
                    plus(col(left_start + lt), b)?,
                    plus(col(right_start + rt), -a)?,
                ],
                [col(left_start + lt), col(right_start + rt)],
                format!(
                    "interval join ({}; {r} between {l} {} and {l} {})",
                    kind_name(kind),
                    signed(a),
                    signed(b),
                    r = qualified(&j.schema, nl + rt),
                    l = qualified(&j.schema, lt),
                ),
            )
        }
        None => {
            // A row can only meet rows of its window: none on time once the horizon
            // reaches the window's end.
            let (le, re) = (
                plus(col(left_start + window_of(0)?.1), -1)?,
                plus(col(right_start + window_of(1)?.1), -1)?,
            );
            (
                [Arc::clone(&le), Arc::clone(&re)],
                [le, re],
                format!("window join ({})", kind_name(kind)),
            )
        }
    };
    let keys_shown: Vec<String> = j.on.iter().map(|(l, r)| format!("{l} = {r}")).collect();
    let description = format!("{description} on [{}]", keys_shown.join(", "));
    let filter = j
        .filter
        .as_ref()
        .map(|f| {
            let e = create_physical_expr(f, &j.schema, props, &Default::default())?;
            fixed_intervals(e, j.schema.as_arrow())
        })
        .transpose()?;
    let output: SchemaRef = Arc::new(j.schema.as_arrow().clone());
    // The output's event time: the left side's (the right's for a RIGHT join; none for a
    // FULL join, whose rows may lack either): its time column, or its window's start.
    let side_output_time = |side: usize| -> Result<(usize, Arc<dyn PhysicalExpr>)> {
        let start = if side == 0 { left_start } else { right_start };
        let i = match times {
            Some((lt, rt)) if bounds.is_some() => {
                if side == 0 {
                    lt
                } else {
                    rt
                }
            }
            _ => window_of(side)?.0,
        };
        Ok((i, col(start + i)))
    };
    let (output_time, post_event_time) = match kind {
        JoinKind::Inner | JoinKind::Left => {
            let (i, e) = side_output_time(0)?;
            (Some((0, e)), Some(i))
        }
        JoinKind::Right => {
            let (i, e) = side_output_time(1)?;
            (Some((1, e)), Some(nl + i))
        }
        JoinKind::Full => (None, None),
    };
    let spec = StreamJoinSpec {
        kind,
        keys,
        left: left_start..right_start,
        right: right_start..merged.fields().len(),
        time,
        expiry,
        filter,
        output,
        output_time,
        lateness,
        bounds,
    };
    let mut branches = left;
    branches.extend(right);
    let mut post: Vec<OpSpec> = sides.into_iter().collect();
    post.push(OpSpec::Join {
        spec,
        input: Arc::clone(&merged),
        description,
    });
    Ok(Translated {
        branches,
        post,
        merge_schema: Some(wire),
        post_event_time,
    })
}

/// One side of a join, translated: its branches, and for a side that aggregates, the
/// operators that run after the merge, in front of the join ([`OpSpec::JoinSides`]).
struct JoinSideBranches {
    branches: Vec<BranchPlan>,
    /// What its branches send: the side's columns, or for an aggregated side what its
    /// aggregation reads.
    wire: SchemaRef,
    /// An aggregated side's operators: its window aggregation, then filters and projections.
    ops: Vec<OpSpec>,
    /// Its window's bounds (start, end) among the side's columns, if it is windowed.
    window: Option<(usize, usize)>,
    /// An aggregated side's join key computed from what its branches send (GROUP BY keys).
    aggregate_keys: Option<Vec<Arc<dyn PhysicalExpr>>>,
    /// For an aggregated side, per join key: its column among the side's columns, and its
    /// place among the aggregation's state keys (`None` for the window's bounds).
    key_columns: Vec<(usize, Option<usize>)>,
}

/// Translates one side of a join: its branches, and for a side that aggregates per window
/// (Nexmark q8's sides), the aggregation and what follows it.
fn join_side(
    plan: &LogicalPlan,
    relations: &BTreeMap<String, Relation>,
    props: &ExecutionProps,
    opts: &StatefulOptions,
) -> Result<JoinSideBranches> {
    let t = translate_stream(plan, relations, props, opts)?;
    let schema = plan.schema();
    if t.post.is_empty() {
        let bound = |name: &str| schema.index_of_column_by_name(None, name);
        return Ok(JoinSideBranches {
            branches: t.branches,
            wire: Arc::new(schema.as_arrow().clone()),
            ops: vec![],
            window: bound(WINDOW_START).zip(bound(WINDOW_END)),
            aggregate_keys: None,
            key_columns: vec![],
        });
    }
    let refused = || {
        SqlError::NotSupported(
            "a side of a join may aggregate per window (GROUP BY …, window_start, window_end of \
             TUMBLE, HOP or CUMULATE), then filter and project; for other stateful operations \
             on a side (deduplication, session windows, another join), make that side a stream \
             of its own and join the stream"
                .into(),
        )
    };
    let Some(OpSpec::WindowAggregate { spec, .. }) = t.post.first() else {
        return Err(refused());
    };
    if !t.post[1..]
        .iter()
        .all(|o| matches!(o, OpSpec::Filter { .. } | OpSpec::Project { .. }))
    {
        return Err(refused());
    }
    let find =
        |g: usize| (0..schema.fields().len()).find(|&i| aggregate_column(&t.post, i) == Some(g));
    let window = find(spec.window_start).zip(find(spec.window_end));
    let wire = t
        .merge_schema
        .ok_or_else(|| SqlError::Internal("an aggregation without its input schema".into()))?;
    Ok(JoinSideBranches {
        branches: t.branches,
        wire,
        ops: t.post,
        window,
        aggregate_keys: None,
        key_columns: vec![],
    })
}

/// The aggregation's output column that column `i` of an aggregated side is (through the
/// filters and projections after the aggregation), if it is one.
fn aggregate_column(ops: &[OpSpec], mut i: usize) -> Option<usize> {
    for op in ops[1..].iter().rev() {
        if let OpSpec::Project { exprs, .. } = op {
            i = exprs.get(i)?.downcast_ref::<Column>()?.index();
        }
    }
    Some(i)
}

impl JoinSideBranches {
    /// For an aggregated side: its join key (side `side` of `on`) over what its branches
    /// send — each key must be one of its GROUP BY columns — and notes where each is
    /// among its columns and its aggregation's state keys.
    fn keys_for(
        &mut self,
        on: &[(Expr, Expr)],
        schema: &DFSchema,
        side: usize,
    ) -> Result<Option<Vec<Arc<dyn PhysicalExpr>>>> {
        let Some(OpSpec::WindowAggregate { spec, .. }) = self.ops.first() else {
            return Ok(None);
        };
        let mut exprs = vec![];
        for pair in on {
            let e = if side == 0 { &pair.0 } else { &pair.1 };
            let column = match e {
                Expr::Column(c) => schema.index_of_column(c).ok(),
                _ => None,
            };
            let group = column
                .and_then(|i| aggregate_column(&self.ops, i))
                .filter(|&g| g < spec.group_exprs.len());
            let (Some(column), Some(group)) = (column, group) else {
                return Err(SqlError::NotSupported(format!(
                    "`{e}` joins an aggregated side: its join keys must be its GROUP BY columns \
                     (as they are, not computed from them)"
                )));
            };
            // Its place among the GROUP BY keys without the window's bounds
            // (`WindowAggregateSpec::key_exprs`).
            let window = |g: usize| g == spec.window_start || g == spec.window_end;
            let state_key = (!window(group)).then(|| (0..group).filter(|&g| !window(g)).count());
            self.key_columns.push((column, state_key));
            exprs.push(Arc::clone(&spec.group_exprs[group]));
        }
        Ok(Some(exprs))
    }
}

/// The operator that runs the aggregated sides of a window join after the merge: its
/// input is what the branches send (`wire`), its output the join's input (`merged`). Rows
/// are routed by the join keys other than the window's bounds (each aggregated side's
/// groups hold them).
fn join_sides(
    j: &datafusion::logical_expr::Join,
    left: &JoinSideBranches,
    right: &JoinSideBranches,
    wire: &SchemaRef,
    merged: &SchemaRef,
) -> Result<OpSpec> {
    let keys = j.on.len();
    let routed: Vec<usize> = (0..keys)
        .filter(|&i| {
            [left, right]
                .iter()
                .all(|s| s.ops.is_empty() || s.key_columns[i].1.is_some())
        })
        .collect();
    let side_spec = |s: &JoinSideBranches, input: usize, output: Range<usize>| JoinSideSpec {
        input: input..input + s.wire.fields().len(),
        output,
        ops: (!s.ops.is_empty()).then(|| SideOpsSpec {
            schema: Arc::clone(&s.wire),
            keys: s.key_columns.iter().map(|k| k.0).collect(),
            state_keys: routed
                .iter()
                .map(|&i| s.key_columns[i].1.expect("routed keys are state keys"))
                .collect(),
        }),
    };
    let (nl, nr) = (
        j.left.schema().fields().len(),
        j.right.schema().fields().len(),
    );
    let start = 1 + keys;
    let spec = JoinSidesSpec {
        keys,
        sides: [
            side_spec(left, start, start..start + nl),
            side_spec(
                right,
                start + left.wire.fields().len(),
                start + nl..start + nl + nr,
            ),
        ],
        output: Arc::clone(merged),
    };
    Ok(OpSpec::JoinSides {
        spec,
        ops: [left.ops.clone(), right.ops.clone()],
        input: Arc::clone(wire),
        routed: routed.iter().map(|i| i + 1).collect(),
    })
}

/// `+ 1h`, `- 30s`, `+ 0s`, `+ 250ms`.
fn signed(micros: i64) -> String {
    let m = micros.unsigned_abs();
    if m == 0 {
        return "+ 0s".into();
    }
    let amount = [
        (3_600_000_000, "h"),
        (60_000_000, "m"),
        (1_000_000, "s"),
        (1_000, "ms"),
    ]
    .iter()
    .find(|(unit, _)| m.is_multiple_of(*unit))
    .map_or(format!("{m}us"), |(unit, name)| {
        format!("{}{name}", m / unit)
    });
    format!("{} {amount}", if micros < 0 { "-" } else { "+" })
}

/// `o.ts`: column `i` of the join's output as the query names it.
fn qualified(schema: &DFSchema, i: usize) -> String {
    match schema.qualified_field(i) {
        (Some(q), f) => format!("{q}.{}", f.name()),
        (None, f) => f.name().clone(),
    }
}

/// A join of the right side `FOR SYSTEM_TIME AS OF` a left column (or `PROCTIME()`): see
/// [`sluice_engine::operators::TemporalJoin`].
#[allow(clippy::too_many_arguments)]
fn temporal_join(
    j: &datafusion::logical_expr::Join,
    relations: &BTreeMap<String, Relation>,
    props: &ExecutionProps,
    opts: &StatefulOptions,
    kind: JoinKind,
    (temporal, table): (&Temporal, &str),
    times: Option<(usize, usize)>,
    (left, right): (Vec<BranchPlan>, Vec<BranchPlan>),
    merged: SchemaRef,
    (left_start, right_start): (usize, usize),
) -> Result<Translated> {
    let left_outer = match kind {
        JoinKind::Inner => false,
        JoinKind::Left => true,
        _ => {
            return Err(SqlError::NotSupported(
                "a temporal join is INNER or LEFT (each left row looks up its version)".into(),
            ));
        }
    };
    let ls = j.left.schema();
    let key = relations
        .get(table)
        .map(|r| r.primary_key.clone())
        .unwrap_or_default();
    if key.is_empty() {
        return Err(SqlError::Invalid(format!(
            "`{table}` is read FOR SYSTEM_TIME AS OF but has no primary key: declare PRIMARY KEY (…) on it (a stream: WITH (primary_key = '…')); each row is then the new version of its key"
        )));
    }
    let mut joined_on: Vec<String> =
        j.on.iter()
            .filter_map(|(_, r)| match r {
                Expr::Column(c) => Some(c.name.clone()),
                _ => None,
            })
            .collect();
    joined_on.sort();
    let mut wanted = key.clone();
    wanted.sort();
    if joined_on != wanted || j.on.len() != key.len() {
        return Err(SqlError::Invalid(format!(
            "a temporal join looks versions up by `{table}`'s primary key ({}): join on exactly those columns",
            key.join(", ")
        )));
    }
    let Some((_, rt)) = times else {
        return Err(SqlError::Invalid(format!(
            "a temporal join needs the event time of both sides: keep them in the select list (`{table}`'s versions are ordered by it)"
        )));
    };
    let col = |i: usize| Arc::new(Column::new(merged.field(i).name(), i)) as Arc<dyn PhysicalExpr>;
    let (as_of, as_of_index, shown) = match &temporal.as_of {
        None => (None, times.map(|(lt, _)| lt), "processing time".to_string()),
        Some(e) => {
            let (qualifier, name) = match e {
                datafusion::sql::sqlparser::ast::Expr::Identifier(i) => (None, i.value.clone()),
                datafusion::sql::sqlparser::ast::Expr::CompoundIdentifier(parts) => (
                    parts.iter().rev().nth(1).map(|p| p.value.clone()),
                    parts.last().map(|p| p.value.clone()).unwrap_or_default(),
                ),
                other => {
                    return Err(SqlError::NotSupported(format!(
                        "FOR SYSTEM_TIME AS OF {other}: give a time column of the other side (o.ts) or PROCTIME()"
                    )));
                }
            };
            let q = qualifier.as_deref().map(TableReference::bare);
            let i = ls
                .index_of_column_by_name(q.as_ref(), &name.to_lowercase())
                .ok_or_else(|| {
                    SqlError::Invalid(format!(
                        "FOR SYSTEM_TIME AS OF {e}: not a column of the join's other side"
                    ))
                })?;
            (Some(col(left_start + i)), Some(i), e.to_string())
        }
    };
    let filter = j
        .filter
        .as_ref()
        .map(|f| create_physical_expr(f, &j.schema, props, &Default::default()))
        .transpose()?;
    let keys_shown: Vec<String> = j.on.iter().map(|(l, r)| format!("{l} = {r}")).collect();
    let description = format!(
        "temporal join ({}; {} as of {shown}) on [{}]",
        kind_name(kind),
        temporal.relation,
        keys_shown.join(", ")
    );
    let spec = TemporalJoinSpec {
        left_outer,
        keys: j.on.len(),
        left: left_start..right_start,
        right: right_start..merged.fields().len(),
        as_of,
        version_time: col(right_start + rt),
        filter,
        output: Arc::new(j.schema.as_arrow().clone()),
        lateness: opts.lateness,
    };
    let mut branches = left;
    branches.extend(right);
    Ok(Translated {
        branches,
        post: vec![OpSpec::TemporalJoin {
            spec,
            input: Arc::clone(&merged),
            description,
        }],
        merge_schema: Some(merged),
        post_event_time: as_of_index,
    })
}

/// `expr` with each `timestamp ± INTERVAL` whose interval is a fixed length (no months, no
/// days) made `timestamp ± duration` of the timestamp's unit: the same values, but a plain
/// addition per row instead of arrow's calendar arithmetic (time-zone lookups per row, about a
/// tenth of an interval join's CPU in its profile).
pub(crate) fn fixed_intervals(
    expr: Arc<dyn PhysicalExpr>,
    schema: &Schema,
) -> Result<Arc<dyn PhysicalExpr>> {
    use datafusion::common::tree_node::{Transformed, TreeNode};
    let rewritten = expr.transform_up(|e| {
        let Some(b) = e.downcast_ref::<BinaryExpr>() else {
            return Ok(Transformed::no(e));
        };
        if !matches!(b.op(), BinaryOp::Plus | BinaryOp::Minus) {
            return Ok(Transformed::no(e));
        }
        let DataType::Timestamp(unit, _) = b.left().data_type(schema)? else {
            return Ok(Transformed::no(e));
        };
        let Some(duration) = b
            .right()
            .downcast_ref::<Literal>()
            .and_then(|l| fixed_duration(l.value(), &unit))
        else {
            return Ok(Transformed::no(e));
        };
        Ok(Transformed::yes(Arc::new(BinaryExpr::new(
            Arc::clone(b.left()),
            *b.op(),
            Arc::new(Literal::new(duration)),
        )) as Arc<dyn PhysicalExpr>))
    })?;
    Ok(rewritten.data)
}

/// An interval of fixed length as a duration in `unit` (`None`: it has months or days, or
/// does not divide into the unit).
fn fixed_duration(v: &ScalarValue, unit: &arrow::datatypes::TimeUnit) -> Option<ScalarValue> {
    use arrow::datatypes::TimeUnit;
    let nanos: i128 = match v {
        ScalarValue::IntervalMonthDayNano(Some(i)) if i.months == 0 && i.days == 0 => {
            i128::from(i.nanoseconds)
        }
        ScalarValue::IntervalDayTime(Some(i)) if i.days == 0 => {
            i128::from(i.milliseconds) * 1_000_000
        }
        _ => return None,
    };
    let per: i128 = match unit {
        TimeUnit::Second => 1_000_000_000,
        TimeUnit::Millisecond => 1_000_000,
        TimeUnit::Microsecond => 1_000,
        TimeUnit::Nanosecond => 1,
    };
    if nanos % per != 0 {
        return None;
    }
    let n = Some(i64::try_from(nanos / per).ok()?);
    Some(match unit {
        TimeUnit::Second => ScalarValue::DurationSecond(n),
        TimeUnit::Millisecond => ScalarValue::DurationMillisecond(n),
        TimeUnit::Microsecond => ScalarValue::DurationMicrosecond(n),
        TimeUnit::Nanosecond => ScalarValue::DurationNanosecond(n),
    })
}

#[cfg(test)]
mod tests {
    use arrow::array::{RecordBatch, TimestampMicrosecondArray};
    use arrow::datatypes::{IntervalMonthDayNano, TimeUnit};

    use super::*;

    #[test]
    fn fixed_intervals_become_durations_with_the_same_values() {
        let ts = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
        let schema = Schema::new(vec![
            Field::new("a", ts.clone(), true),
            Field::new("b", ts, true),
        ]);
        let values = |v: Vec<Option<i64>>| {
            Arc::new(TimestampMicrosecondArray::from(v).with_timezone("UTC"))
                as arrow::array::ArrayRef
        };
        let batch = RecordBatch::try_new(
            Arc::new(schema.clone()),
            vec![
                values(vec![Some(0), Some(1_000), None, Some(86_400_000_000)]),
                values(vec![
                    Some(20_000),
                    Some(21_001),
                    Some(5),
                    Some(86_400_020_000),
                ]),
            ],
        )
        .unwrap();
        let col = |n: &str, i| Arc::new(Column::new(n, i)) as Arc<dyn PhysicalExpr>;
        let interval = |months, days, nanos| {
            Arc::new(Literal::new(ScalarValue::IntervalMonthDayNano(Some(
                IntervalMonthDayNano::new(months, days, nanos),
            )))) as Arc<dyn PhysicalExpr>
        };
        // b <= a + INTERVAL '20' MILLISECOND, and b > a - INTERVAL '1' DAY (kept: a day).
        let within = Arc::new(BinaryExpr::new(
            col("b", 1),
            BinaryOp::LtEq,
            Arc::new(BinaryExpr::new(
                col("a", 0),
                BinaryOp::Plus,
                interval(0, 0, 20_000_000),
            )),
        )) as Arc<dyn PhysicalExpr>;
        let after = Arc::new(BinaryExpr::new(
            col("b", 1),
            BinaryOp::Gt,
            Arc::new(BinaryExpr::new(
                col("a", 0),
                BinaryOp::Minus,
                interval(0, 1, 0),
            )),
        )) as Arc<dyn PhysicalExpr>;
        let both = Arc::new(BinaryExpr::new(within, BinaryOp::And, after)) as Arc<dyn PhysicalExpr>;
        let fixed = fixed_intervals(Arc::clone(&both), &schema).unwrap();
        let shown = fixed.to_string();
        // 20 ms as 20 000 µs; the day (not a fixed length in every time zone) stays.
        assert!(shown.contains("a@0 + 20000 AND"), "{shown}");
        assert!(shown.contains("days: 1"), "{shown}");
        let eval = |e: &Arc<dyn PhysicalExpr>| {
            e.evaluate(&batch)
                .unwrap()
                .into_array(batch.num_rows())
                .unwrap()
        };
        assert_eq!(eval(&fixed).as_ref(), eval(&both).as_ref());
        assert_eq!(fixed.data_type(&schema).unwrap(), DataType::Boolean);
        // A sub-unit interval is left alone.
        let odd = Arc::new(BinaryExpr::new(
            col("a", 0),
            BinaryOp::Plus,
            interval(0, 0, 1),
        )) as Arc<dyn PhysicalExpr>;
        assert!(
            fixed_intervals(odd, &schema)
                .unwrap()
                .to_string()
                .contains("IntervalMonthDayNano")
        );
    }
}
