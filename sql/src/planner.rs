//! `CREATE STREAM … AS SELECT` → a [`StreamPlan`] of operator specs.
//!
//! DataFusion plans and optimises the query against the schemas of the sources and streams
//! it reads (registered as empty tables); each node of the optimised `LogicalPlan` then
//! becomes a runtime operator spec:
//!
//! | logical node      | runtime                                              |
//! |-------------------|------------------------------------------------------|
//! | `TableScan`       | a branch reading that source or stream (+ projection) |
//! | `Filter`          | [`OpSpec::Filter`]: a DataFusion physical predicate   |
//! | `Projection`      | [`OpSpec::Project`]: DataFusion physical expressions  |
//! | `SubqueryAlias`   | nothing (names only)                                  |
//! | `Union` (ALL)     | one branch per input, merged by the stream task       |
//!
//! Stateless operators over a `UNION ALL` are applied on every branch (they act row by
//! row, so this is the same result). Everything else (aggregates without windows, joins,
//! ORDER BY, LIMIT) is refused with SQLSTATE 0A000 until the runtime can run it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use datafusion::common::TableReference;
use datafusion::common::tree_node::TreeNode;
use datafusion::datasource::empty::EmptyTable;
use datafusion::execution::context::ExecutionProps;
use datafusion::execution::context::SessionContext;
use datafusion::logical_expr::{Expr, LogicalPlan};
use datafusion::physical_expr::aggregate::LoweredAggregateBuilder;
use datafusion::physical_expr::{PhysicalExpr, create_physical_expr, expressions::Column};
use datafusion::sql::parser::Statement as DFStatement;
use datafusion::sql::sqlparser::ast::Statement;
use sluice_connectors::lake::LakeWriterConfig;
use sluice_engine::operators::{Filter, Projection, WindowAggregate, WindowAggregateSpec};
use sluice_engine::{Operator, WithOptions};

use crate::error::{Result, SqlError};
use crate::parser::{CreateStream, ObjectKind};
use crate::window::{WINDOW_END, WINDOW_START, WindowTablePlanner};

/// What the planner needs to know of a relation a stream may read.
#[derive(Debug, Clone)]
pub struct Relation {
    /// Source or stream.
    pub kind: ObjectKind,
    /// Its rows.
    pub schema: SchemaRef,
    /// Its event-time column, if it has one.
    pub event_time_column: Option<String>,
}

/// One runtime operator, ready to instantiate.
#[derive(Debug, Clone)]
pub enum OpSpec {
    /// Keep rows where the predicate is true.
    Filter {
        /// Boolean expression over the input.
        predicate: Arc<dyn PhysicalExpr>,
    },
    /// Compute output columns.
    Project {
        /// One expression per output column.
        exprs: Vec<Arc<dyn PhysicalExpr>>,
        /// The output schema.
        schema: SchemaRef,
    },
    /// Aggregate per event-time window (after the branches merge).
    WindowAggregate {
        /// What to compute.
        spec: WindowAggregateSpec,
        /// The schema of its input.
        input: SchemaRef,
    },
}

impl OpSpec {
    /// Builds the runtime operator; `origin` names the stream in errors-zone records.
    pub fn instantiate(&self, origin: &str) -> Result<Box<dyn Operator>> {
        Ok(match self {
            OpSpec::Filter { predicate } => Box::new(Filter::new(Arc::clone(predicate), origin)),
            OpSpec::Project { exprs, schema } => {
                Box::new(Projection::new(exprs.clone(), Arc::clone(schema), origin))
            }
            OpSpec::WindowAggregate { spec, input } => {
                Box::new(WindowAggregate::try_new(spec.clone(), input, origin)?)
            }
        })
    }

    fn describe(&self) -> String {
        match self {
            OpSpec::Filter { predicate } => format!("filter({predicate})"),
            OpSpec::Project { exprs, schema } => {
                let cols: Vec<String> = exprs
                    .iter()
                    .zip(schema.fields())
                    .map(|(e, f)| {
                        let e = e.to_string();
                        let plain = e.split('@').next() == Some(f.name().as_str());
                        if plain {
                            e
                        } else {
                            format!("{e} AS {}", f.name())
                        }
                    })
                    .collect();
                format!("project({})", cols.join(", "))
            }
            OpSpec::WindowAggregate { spec, .. } => {
                let groups: Vec<String> = spec.group_exprs.iter().map(|e| e.to_string()).collect();
                let aggs: Vec<String> = spec
                    .aggregates
                    .iter()
                    .map(|a| a.name().to_string())
                    .collect();
                format!(
                    "window_aggregate(group by [{}]; {})",
                    groups.join(", "),
                    aggs.join(", ")
                )
            }
        }
    }
}

/// One input of a stream and its operators.
#[derive(Debug, Clone)]
pub struct BranchPlan {
    /// The source or stream it reads.
    pub input: String,
    /// Its operators, first to last.
    pub ops: Vec<OpSpec>,
    /// Index of the event-time column in this branch's output, if it is carried through.
    event_time: Option<usize>,
}

/// A planned stream, ready to run.
#[derive(Debug, Clone)]
pub struct StreamPlan {
    /// The stream's name.
    pub name: String,
    /// Its branches (one per input; several for `UNION ALL`).
    pub branches: Vec<BranchPlan>,
    /// Operators after the branches merge (stateful ones, and what follows them).
    pub post: Vec<OpSpec>,
    /// Schema of the branches' output, where they merge (the output schema when `post` is
    /// empty).
    pub merge_schema: SchemaRef,
    /// Schema of its output.
    pub output_schema: SchemaRef,
    /// The output column carrying event time (partitions the lake, drives watermarks).
    pub event_time_column: Option<String>,
    /// The sources and streams it reads.
    pub inputs: BTreeSet<String>,
    /// How its lake files roll.
    pub writer: LakeWriterConfig,
}

impl StreamPlan {
    /// A readable description of the pipeline (the output of `EXPLAIN CREATE STREAM`).
    pub fn explain(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "stream {}", self.name);
        for (i, b) in self.branches.iter().enumerate() {
            let _ = write!(s, "  branch {i}: {}", b.input);
            for op in &b.ops {
                let _ = write!(s, " -> {}", op.describe());
            }
            s.push('\n');
        }
        if !self.post.is_empty() {
            let ops: Vec<String> = self.post.iter().map(OpSpec::describe).collect();
            let _ = writeln!(s, "  after merge: {}", ops.join(" -> "));
        }
        let cols: Vec<String> = self
            .output_schema
            .fields()
            .iter()
            .map(|f| {
                format!(
                    "{} {}{}",
                    f.name(),
                    f.data_type(),
                    if f.is_nullable() { "" } else { " NOT NULL" }
                )
            })
            .collect();
        let _ = writeln!(s, "  output: {}", cols.join(", "));
        let _ = write!(
            s,
            "  event time: {}; lake: processed/{}/ rollover {:?}, target {} bytes",
            self.event_time_column
                .as_deref()
                .unwrap_or("(arrival time)"),
            self.name,
            self.writer.rollover_interval,
            self.writer.target_file_size
        );
        s
    }
}

/// Plans `stmt` against the relations that exist (`relations`, by name).
pub async fn plan_stream(
    stmt: &CreateStream,
    relations: &BTreeMap<String, Relation>,
) -> Result<StreamPlan> {
    let owner = format!("stream `{}`", stmt.name);
    let mut opts = WithOptions::new(owner.clone(), stmt.options.iter().cloned());
    let mut writer = LakeWriterConfig::default();
    if let Some(d) = opts.take_duration("rollover_interval")? {
        if d.is_zero() {
            return Err(opts
                .bad("rollover_interval", "0", "a positive duration")
                .into());
        }
        writer.rollover_interval = d;
    }
    if let Some(b) = opts.take_bytes("target_file_size")? {
        if b < 1024 {
            return Err(opts
                .bad("target_file_size", &b.to_string(), "at least 1KB")
                .into());
        }
        writer.target_file_size = b;
    }
    let event_time_override = opts.take_str("event_time_column");
    opts.finish()?;

    let ctx = SessionContext::new();
    ctx.register_relation_planner(Arc::new(WindowTablePlanner))?;
    for (name, rel) in relations {
        ctx.register_table(
            TableReference::bare(name.as_str()),
            Arc::new(EmptyTable::new(Arc::clone(&rel.schema))),
        )?;
    }
    let state = ctx.state();
    let plan = state
        .statement_to_plan(DFStatement::Statement(Box::new(Statement::Query(
            stmt.query.clone(),
        ))))
        .await?;
    let plan = state.optimize(&plan)?;
    let props = ExecutionProps::new();
    let Translated {
        branches,
        post,
        merge_schema,
        post_event_time,
    } = translate_stream(&plan, relations, &props)?;
    let output_schema: SchemaRef = Arc::new(plan.schema().as_arrow().clone());
    let merge_schema = merge_schema.unwrap_or_else(|| Arc::clone(&output_schema));
    let inputs: BTreeSet<String> = branches.iter().map(|b| b.input.clone()).collect();
    if inputs.contains(&stmt.name) {
        return Err(SqlError::Invalid(format!("{owner} cannot read itself")));
    }
    let event_time_column = match event_time_override {
        Some(c) => {
            let f = output_schema.field_with_name(&c).map_err(|_| {
                SqlError::InvalidOption(format!(
                    "{owner}: option `event_time_column`: the stream has no column `{c}`"
                ))
            })?;
            if !matches!(f.data_type(), arrow::datatypes::DataType::Timestamp(..)) {
                return Err(SqlError::InvalidOption(format!(
                    "{owner}: option `event_time_column`: `{c}` is not a timestamp"
                )));
            }
            Some(c)
        }
        // After a window aggregation the window's start is the event time.
        None if !post.is_empty() => post_event_time.map(|i| output_schema.field(i).name().clone()),
        None => {
            let first = branches[0].event_time;
            first
                .filter(|_| branches.iter().all(|b| b.event_time == first))
                .map(|i| output_schema.field(i).name().clone())
        }
    };
    Ok(StreamPlan {
        name: stmt.name.clone(),
        branches,
        post,
        merge_schema,
        output_schema,
        event_time_column,
        inputs,
        writer,
    })
}

/// A translated plan: branches of stateless operators, then what runs after they merge.
struct Translated {
    branches: Vec<BranchPlan>,
    post: Vec<OpSpec>,
    merge_schema: Option<SchemaRef>,
    /// Index of the event-time column in the post chain's output.
    post_event_time: Option<usize>,
}

/// Translates the top of a plan: a window aggregation and the filters and projections above
/// it run after the merge; everything below it (or a plan without one) goes to the branches.
fn translate_stream(
    plan: &LogicalPlan,
    relations: &BTreeMap<String, Relation>,
    props: &ExecutionProps,
) -> Result<Translated> {
    let has_aggregate = |p: &LogicalPlan| {
        p.exists(|n| Ok(matches!(n, LogicalPlan::Aggregate(_))))
            .unwrap_or(false)
    };
    match plan {
        LogicalPlan::Aggregate(agg) => {
            let branches = translate(&agg.input, relations, props)?;
            let input: SchemaRef = Arc::new(agg.input.schema().as_arrow().clone());
            let spec = window_aggregate(agg, props).ok_or_else(|| {
                SqlError::NotSupported(format!(
                    "streaming {} is not supported yet: group by a window (window_start, window_end of TUMBLE or HOP)",
                    describe_node(plan)
                ))
            })??;
            // Windows close when the watermark passes them: without event time on every
            // input, an unbounded input would never emit and its state would only grow.
            if let Some(b) = branches.iter().find(|b| {
                relations
                    .get(&b.input)
                    .is_none_or(|r| r.event_time_column.is_none())
            }) {
                return Err(SqlError::Invalid(format!(
                    "windowed aggregation needs event time, but `{}` has none: declare \
                     `WATERMARK FOR <column> AS <column> - INTERVAL '…'` on the source",
                    b.input
                )));
            }
            let post_event_time = agg.schema.as_arrow().index_of(WINDOW_START).ok();
            Ok(Translated {
                branches,
                post: vec![OpSpec::WindowAggregate {
                    spec,
                    input: Arc::clone(&input),
                }],
                merge_schema: Some(input),
                post_event_time,
            })
        }
        LogicalPlan::Filter(f) if has_aggregate(&f.input) => {
            let mut t = translate_stream(&f.input, relations, props)?;
            let predicate =
                create_physical_expr(&f.predicate, f.input.schema(), props, &Default::default())?;
            t.post.push(OpSpec::Filter { predicate });
            Ok(t)
        }
        LogicalPlan::Projection(p) if has_aggregate(&p.input) => {
            let mut t = translate_stream(&p.input, relations, props)?;
            t.post_event_time = carried_column(p, t.post_event_time);
            t.post.push(projection(p, props)?);
            Ok(t)
        }
        LogicalPlan::SubqueryAlias(s) if has_aggregate(&s.input) => {
            translate_stream(&s.input, relations, props)
        }
        _ => Ok(Translated {
            branches: translate(plan, relations, props)?,
            post: vec![],
            merge_schema: None,
            post_event_time: None,
        }),
    }
}

/// The spec of a window aggregation, or `None` if `agg` does not group by a window.
fn window_aggregate(
    agg: &datafusion::logical_expr::Aggregate,
    props: &ExecutionProps,
) -> Option<Result<WindowAggregateSpec>> {
    let is_column =
        |e: &Expr, name: &str| matches!(e.clone().unalias(), Expr::Column(c) if c.name == name);
    let window_end = agg
        .group_expr
        .iter()
        .position(|e| is_column(e, WINDOW_END))?;
    agg.group_expr
        .iter()
        .position(|e| is_column(e, WINDOW_START))?;
    Some((|| {
        let input = agg.input.schema();
        let group_exprs = agg
            .group_expr
            .iter()
            .map(|e| create_physical_expr(e, input, props, &Default::default()))
            .collect::<datafusion::error::Result<Vec<_>>>()?;
        let mut aggregates = Vec::with_capacity(agg.aggr_expr.len());
        for e in &agg.aggr_expr {
            let name = match e {
                Expr::Alias(a) => a.name.clone(),
                other => other.schema_name().to_string(),
            };
            let lowered = LoweredAggregateBuilder::new(
                e,
                input,
                input.as_arrow(),
                props,
                &Default::default(),
            )
            .with_name(name)
            .with_human_display(e.human_display().to_string())
            .build()?;
            let (aggregate, filter, order_by) =
                (lowered.aggregate, lowered.filter, lowered.order_bys);
            if filter.is_some() {
                return Err(SqlError::NotSupported(
                    "FILTER (WHERE …) on an aggregate is not supported in streams yet".into(),
                ));
            }
            if !order_by.is_empty() {
                return Err(SqlError::NotSupported(
                    "ORDER BY inside an aggregate is not supported in streams yet".into(),
                ));
            }
            aggregates.push(aggregate);
        }
        let spec = WindowAggregateSpec {
            group_exprs,
            window_end,
            aggregates,
            schema: Arc::new(agg.schema.as_arrow().clone()),
        };
        // Fail now on aggregates that cannot run on these types.
        WindowAggregate::try_new(spec.clone(), input.as_arrow(), "validation")?;
        Ok(spec)
    })())
}

fn translate(
    plan: &LogicalPlan,
    relations: &BTreeMap<String, Relation>,
    props: &ExecutionProps,
) -> Result<Vec<BranchPlan>> {
    match plan {
        LogicalPlan::TableScan(scan) => {
            let name = scan.table_name.table().to_string();
            let rel = relations
                .get(&name)
                .ok_or_else(|| SqlError::Internal(format!("planned a scan of unknown `{name}`")))?;
            if !scan.filters.is_empty() || scan.fetch.is_some() {
                return Err(SqlError::Internal("scan with pushed-down filters or limit".into()));
            }
            let full = &rel.schema;
            let mut event_time = rel
                .event_time_column
                .as_ref()
                .and_then(|c| full.index_of(c).ok());
            let mut ops = vec![];
            if let Some(indices) = &scan.projection
                && (indices.len() != full.fields().len()
                    || indices.iter().enumerate().any(|(i, j)| i != *j))
            {
                let exprs = indices
                    .iter()
                    .map(|&i| Arc::new(Column::new(full.field(i).name(), i)) as Arc<dyn PhysicalExpr>)
                    .collect();
                event_time = event_time.and_then(|e| indices.iter().position(|&i| i == e));
                ops.push(OpSpec::Project {
                    exprs,
                    schema: Arc::new(scan.projected_schema.as_arrow().clone()),
                });
            }
            Ok(vec![BranchPlan {
                input: name,
                ops,
                event_time,
            }])
        }
        LogicalPlan::Filter(f) => {
            let mut branches = translate(&f.input, relations, props)?;
            let predicate = create_physical_expr(&f.predicate, f.input.schema(), props, &Default::default())?;
            for b in &mut branches {
                b.ops.push(OpSpec::Filter {
                    predicate: Arc::clone(&predicate),
                });
            }
            Ok(branches)
        }
        LogicalPlan::Projection(p) => {
            let mut branches = translate(&p.input, relations, props)?;
            let op = projection(p, props)?;
            for b in &mut branches {
                b.event_time = carried_column(p, b.event_time);
                b.ops.push(op.clone());
            }
            Ok(branches)
        }
        LogicalPlan::SubqueryAlias(s) => translate(&s.input, relations, props),
        LogicalPlan::Union(u) => {
            let mut out = vec![];
            for input in &u.inputs {
                out.extend(translate(input, relations, props)?);
            }
            Ok(out)
        }
        LogicalPlan::EmptyRelation(_) | LogicalPlan::Values(_) => Err(SqlError::NotSupported(
            "a stream must read from a source or another stream (this query reads no table, or can never return a row)".into(),
        )),
        other => Err(SqlError::NotSupported(format!(
            "streaming {} is not supported yet: a stream can filter, project, compute scalar expressions and UNION ALL its inputs",
            describe_node(other)
        ))),
    }
}

/// The operator computing a logical projection.
fn projection(p: &datafusion::logical_expr::Projection, props: &ExecutionProps) -> Result<OpSpec> {
    let exprs = p
        .expr
        .iter()
        .map(|e| create_physical_expr(e, p.input.schema(), props, &Default::default()))
        .collect::<datafusion::error::Result<Vec<_>>>()?;
    Ok(OpSpec::Project {
        exprs,
        schema: Arc::new(p.schema.as_arrow().clone()),
    })
}

/// Where input column `column` ends up in the projection's output, if it is passed through
/// (possibly renamed).
fn carried_column(
    p: &datafusion::logical_expr::Projection,
    column: Option<usize>,
) -> Option<usize> {
    let column = column?;
    p.expr.iter().position(|e| {
        matches!(e.clone().unalias(), Expr::Column(c) if p.input.schema().index_of_column(&c).ok() == Some(column))
    })
}

fn describe_node(plan: &LogicalPlan) -> &'static str {
    match plan {
        LogicalPlan::Aggregate(a)
            if a.group_expr
                .iter()
                .any(|e| e.schema_name().to_string().contains(WINDOW_START)) =>
        {
            "windowed aggregation (GROUP BY window_start, window_end)"
        }
        LogicalPlan::Aggregate(_) => {
            "aggregation (GROUP BY, DISTINCT or an aggregate function) without a window"
        }
        LogicalPlan::Join(_) => "JOIN",
        LogicalPlan::Sort(_) => "ORDER BY",
        LogicalPlan::Limit(_) => "LIMIT",
        LogicalPlan::Window(_) => "a window function (OVER …)",
        LogicalPlan::Distinct(_) => "DISTINCT",
        LogicalPlan::Subquery(_) => "a subquery",
        LogicalPlan::Unnest(_) => "UNNEST",
        LogicalPlan::RecursiveQuery(_) => "a recursive query",
        _ => "this query shape",
    }
}
