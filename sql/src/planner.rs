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
//! | `Aggregate` grouped by `window_start, window_end` | [`OpSpec::WindowAggregate`], after the merge |
//! | `Filter(row_number() = 1)` over `Window(row_number() OVER (PARTITION BY k …))` | [`OpSpec::Dedup`], after the merge |
//! | `Distinct::On` (`DISTINCT ON (k)`), `Distinct::All` (`SELECT DISTINCT`) | [`OpSpec::Dedup`] (+ projection), after the merge |
//!
//! Stateless operators over a `UNION ALL` are applied on every branch (they act row by
//! row, so this is the same result). Stateful operators run after the branches merge, with
//! the filters and projections above them. Everything else (aggregates without windows,
//! joins, ORDER BY, LIMIT) is refused with SQLSTATE 0A000 until the runtime can run it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use datafusion::common::TableReference;
use datafusion::common::tree_node::TreeNode;
use datafusion::datasource::empty::EmptyTable;
use datafusion::execution::context::ExecutionProps;
use datafusion::execution::context::SessionContext;
use datafusion::logical_expr::utils::{conjunction, split_conjunction};
use datafusion::logical_expr::{Distinct, Expr, LogicalPlan, Operator as BinaryOp};
use datafusion::physical_expr::aggregate::LoweredAggregateBuilder;
use datafusion::physical_expr::{PhysicalExpr, create_physical_expr, expressions::Column};
use datafusion::sql::parser::Statement as DFStatement;
use datafusion::sql::sqlparser::ast::Statement;
use sluice_engine::operators::{
    Dedup, DedupKeep, DedupSpec, Filter, JoinSides, JoinSidesSpec, LatePolicy, Lateness,
    Projection, SessionAggregate, StreamJoin, StreamJoinSpec, TemporalJoin, TemporalJoinSpec,
    Unnest, WindowAggregate, WindowAggregateSpec,
};
use sluice_engine::sink::{Compaction, FileRolling};
use sluice_engine::{Operator, OperatorChain, WithOptions};

use crate::error::{Result, SqlError};
use crate::parser::{CreateStream, ObjectKind};
use crate::window::{WINDOW_END, WINDOW_START, WindowKind, WindowTablePlanner};

/// What the planner needs to know of a relation a stream may read.
#[derive(Debug, Clone)]
pub struct Relation {
    /// Source or stream.
    pub kind: ObjectKind,
    /// Its rows.
    pub schema: SchemaRef,
    /// Its event-time column, if it has one.
    pub event_time_column: Option<String>,
    /// Its primary key (`PRIMARY KEY (…)` of a source): each row is the new version of its
    /// key. Empty: none.
    pub primary_key: Vec<String>,
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
    /// One row per element of a list column (a `HOP` or `CUMULATE` row's windows).
    Unnest {
        /// The list column.
        column: usize,
        /// The output schema: the input's, with the element type at `column`.
        schema: SchemaRef,
        /// A `NULL` list gives one row with `NULL` (else none).
        preserve_nulls: bool,
    },
    /// Aggregate per event-time window (after the branches merge).
    WindowAggregate {
        /// What to compute.
        spec: WindowAggregateSpec,
        /// The schema of its input.
        input: SchemaRef,
    },
    /// Aggregate per session window (after the branches merge).
    SessionAggregate {
        /// What to compute (as for tumbling windows; rows carry their one-row sessions).
        spec: WindowAggregateSpec,
        /// The session gap, µs.
        gap: i64,
        /// The schema of its input.
        input: SchemaRef,
    },
    /// Keep one row per key (after the branches merge).
    Dedup {
        /// What to keep.
        spec: DedupSpec,
        /// The schema of its input.
        input: SchemaRef,
    },
    /// Join each left row with the right side's version at its time (after the branches
    /// merge; see [`TemporalJoin`]).
    TemporalJoin {
        /// What to compute.
        spec: TemporalJoinSpec,
        /// The schema of its input (the merged sides).
        input: SchemaRef,
        /// For `EXPLAIN`.
        description: String,
    },
    /// Run a join side's own operators (a window aggregation and what follows it) before
    /// the join (after the branches merge; see [`JoinSides`]).
    JoinSides {
        /// The layout.
        spec: JoinSidesSpec,
        /// Each side's operators (none for a side that only passes through).
        ops: [Vec<OpSpec>; 2],
        /// The schema of its input (the merged sides as the branches send them).
        input: SchemaRef,
        /// The input's join key columns the rows are routed by: all but the window's bounds
        /// (a side's window aggregation keeps its groups by its GROUP BY keys, which hold
        /// these).
        routed: Vec<usize>,
    },
    /// Join the two sides' rows (after the branches merge; see [`StreamJoin`]).
    Join {
        /// What to compute.
        spec: StreamJoinSpec,
        /// The schema of its input (the merged sides).
        input: SchemaRef,
        /// For `EXPLAIN`: the kind, keys and bounds.
        description: String,
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
            OpSpec::Unnest {
                column,
                schema,
                preserve_nulls,
            } => Box::new(Unnest::new(*column, Arc::clone(schema), *preserve_nulls)),
            OpSpec::WindowAggregate { spec, input } => {
                Box::new(WindowAggregate::try_new(spec.clone(), input, origin)?)
            }
            OpSpec::SessionAggregate { spec, gap, input } => Box::new(SessionAggregate::try_new(
                spec.clone(),
                *gap,
                input,
                origin,
            )?),
            OpSpec::Dedup { spec, input } => Box::new(Dedup::try_new(spec.clone(), input, origin)?),
            OpSpec::JoinSides { spec, ops, .. } => {
                let chain = |ops: &[OpSpec]| -> Result<Option<OperatorChain>> {
                    if ops.is_empty() {
                        return Ok(None);
                    }
                    let ops = ops
                        .iter()
                        .map(|o| o.instantiate(origin))
                        .collect::<Result<Vec<_>>>()?;
                    Ok(Some(OperatorChain::new(ops)))
                };
                Box::new(JoinSides::new(
                    spec.clone(),
                    [chain(&ops[0])?, chain(&ops[1])?],
                )?)
            }
            OpSpec::Join { spec, input, .. } => {
                Box::new(StreamJoin::new(spec.clone(), input, origin)?)
            }
            OpSpec::TemporalJoin { spec, input, .. } => {
                Box::new(TemporalJoin::new(spec.clone(), input, origin)?)
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
            OpSpec::Unnest { column, schema, .. } => {
                format!("unnest({})", schema.field(*column).name())
            }
            OpSpec::WindowAggregate { spec, .. } => {
                let groups: Vec<String> = spec.group_exprs.iter().map(|e| e.to_string()).collect();
                let aggs: Vec<String> = spec
                    .aggregates
                    .iter()
                    .map(|a| a.name().to_string())
                    .collect();
                format!(
                    "window_aggregate(group by [{}]; {}{})",
                    groups.join(", "),
                    aggs.join(", "),
                    describe_lateness(&spec.lateness)
                )
            }
            OpSpec::SessionAggregate { spec, gap, .. } => {
                let groups: Vec<String> = spec.key_exprs().iter().map(|e| e.to_string()).collect();
                let aggs: Vec<String> = spec
                    .aggregates
                    .iter()
                    .map(|a| a.name().to_string())
                    .collect();
                format!(
                    "session_aggregate(gap {:?}; key [{}]; {}{})",
                    std::time::Duration::from_micros(*gap as u64),
                    groups.join(", "),
                    aggs.join(", "),
                    describe_lateness(&spec.lateness)
                )
            }
            OpSpec::JoinSides { ops, .. } => {
                let sides: Vec<String> = ["left", "right"]
                    .iter()
                    .zip(ops)
                    .filter(|(_, ops)| !ops.is_empty())
                    .map(|(side, ops)| {
                        let ops: Vec<String> = ops.iter().map(OpSpec::describe).collect();
                        format!("{side}: {}", ops.join(" -> "))
                    })
                    .collect();
                format!("join sides ({})", sides.join("; "))
            }
            OpSpec::Join { description, .. } | OpSpec::TemporalJoin { description, .. } => {
                description.clone()
            }
            OpSpec::Dedup { spec, .. } => {
                let keys: Vec<String> = spec.keys.iter().map(|e| e.to_string()).collect();
                let keep = match spec.keep {
                    DedupKeep::FirstArrival => "first arrival",
                    DedupKeep::EarliestEventTime => "earliest event time",
                };
                format!(
                    "dedup(key [{}]; keep {keep}; ttl {:?}{})",
                    keys.join(", "),
                    std::time::Duration::from_micros(spec.ttl.max(0) as u64),
                    describe_lateness(&spec.lateness)
                )
            }
        }
    }
}

fn describe_lateness(l: &Lateness) -> String {
    let mut s = String::new();
    if l.allowed > 0 {
        let _ = write!(
            s,
            "; allowed lateness {:?}",
            std::time::Duration::from_micros(l.allowed as u64)
        );
    }
    if l.policy == LatePolicy::Drop {
        s.push_str("; late rows dropped");
    }
    s
}

/// Settings of a stream's stateful operators, from its `WITH` options.
#[derive(Debug, Clone, Default)]
pub(crate) struct StatefulOptions {
    pub(crate) lateness: Lateness,
    /// `dedup_ttl`, µs.
    dedup_ttl: i64,
    /// The gap of the query's `SESSION` window, µs, if it has one.
    session_gap: Option<i64>,
    /// The relations the query reads `FOR SYSTEM_TIME AS OF`.
    pub(crate) temporal: Vec<crate::temporal::Temporal>,
}

/// The gap of the `SESSION` window among `used`, if any; refuses a session mixed with other
/// windows (which window would a `GROUP BY window_start, window_end` mean?).
fn session_gap(used: &[WindowKind]) -> Result<Option<i64>> {
    let mut gaps = used.iter().filter_map(|w| match w {
        WindowKind::Session { gap_micros } => Some(*gap_micros),
        _ => None,
    });
    let Some(gap) = gaps.next() else {
        return Ok(None);
    };
    if gaps.any(|g| g != gap)
        || used
            .iter()
            .any(|w| !matches!(w, WindowKind::Session { .. }))
    {
        return Err(SqlError::NotSupported(
            "a SESSION window cannot be combined with other windows in one stream yet: \
             chain two streams instead"
                .into(),
        ));
    }
    Ok(Some(gap))
}

/// One input of a stream and its operators.
#[derive(Debug, Clone)]
pub struct BranchPlan {
    /// The source or stream it reads.
    pub input: String,
    /// Its operators, first to last.
    pub ops: Vec<OpSpec>,
    /// Index of the event-time column in this branch's output, if it is carried through.
    pub(crate) event_time: Option<usize>,
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
    /// The key a stateful `post` chain is partitioned by (expressions over `merge_schema`);
    /// empty when it cannot be partitioned (no stateful operator, or no key).
    pub partition_keys: Vec<Arc<dyn PhysicalExpr>>,
    /// How many subtasks run the `post` chain, each with the rows of its keys.
    pub parallelism: usize,
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
    pub writer: FileRolling,
    /// The `checkpoint_interval` option: `Some(0)` turns checkpoints off for the stream;
    /// `None`: the server's default, but at least as often as files roll.
    pub checkpoint_interval: Option<std::time::Duration>,
    /// The `checkpoint_timeout` option: how long an epoch may wait for this stream before it
    /// is aborted (`None`: ten intervals, at least a minute).
    pub checkpoint_timeout: Option<std::time::Duration>,
    /// The `primary_key` option: the columns whose values a row is the new version of (the
    /// stream is then a changelog a temporal join can read `FOR SYSTEM_TIME AS OF`).
    pub primary_key: Vec<String>,
}

impl StreamPlan {
    /// The pipeline the engine builds the stream's task from; `origin` names the stream in
    /// errors-zone records.
    pub fn pipeline(&self, origin: &str) -> sluice_engine::pipeline::PipelineSpec {
        use sluice_engine::pipeline::{BranchSpec, ChainFactory, PipelineSpec};
        let factory = |ops: &[OpSpec]| -> ChainFactory {
            let (ops, origin) = (ops.to_vec(), origin.to_string());
            Arc::new(move || {
                let ops = ops
                    .iter()
                    .map(|o| o.instantiate(&origin).map_err(SqlError::into_engine))
                    .collect::<sluice_engine::Result<Vec<_>>>()?;
                Ok(sluice_engine::OperatorChain::new(ops))
            })
        };
        PipelineSpec {
            name: self.name.clone(),
            branches: self
                .branches
                .iter()
                .map(|b| BranchSpec {
                    input: b.input.clone(),
                    chain: factory(&b.ops),
                })
                .collect(),
            post: factory(&self.post),
            partition_keys: self.partition_keys.clone(),
            parallelism: self.parallelism.max(1),
            merge_schema: Arc::clone(&self.merge_schema),
            event_time_column: self
                .event_time_column
                .as_ref()
                .and_then(|c| self.output_schema.index_of(c).ok()),
        }
    }

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
            let keys: Vec<String> = self.partition_keys.iter().map(|k| k.to_string()).collect();
            let parallel = if self.parallelism > 1 {
                format!(
                    " (in {} subtasks, rows routed by hash of [{}])",
                    self.parallelism,
                    keys.join(", ")
                )
            } else {
                String::new()
            };
            let _ = writeln!(s, "  after merge{parallel}: {}", ops.join(" -> "));
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
        if let Some(c) = &self.writer.compaction {
            let _ = write!(
                s,
                ", hours compacted {:?} after they end",
                std::time::Duration::from_micros(c.closes_after_micros() as u64)
            );
        }
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
    let mut writer = FileRolling::default();
    if let Some(d) = opts.take_duration("rollover_interval")? {
        if d.is_zero() {
            return Err(opts
                .bad("rollover_interval", "0", "a positive duration")
                .into());
        }
        writer.rollover_interval = d;
    }
    let checkpoint_interval = opts.take_duration("checkpoint_interval")?;
    let checkpoint_timeout = opts.take_duration("checkpoint_timeout")?;
    if checkpoint_timeout.is_some_and(|d| d.is_zero()) {
        return Err(opts
            .bad("checkpoint_timeout", "0", "a positive duration")
            .into());
    }
    if let Some(b) = opts.take_bytes("target_file_size")? {
        if b < 1024 {
            return Err(opts
                .bad("target_file_size", &b.to_string(), "at least 1KB")
                .into());
        }
        writer.target_file_size = b;
    }
    let compaction_on = opts.take_bool("compaction")?;
    let compaction_delay = opts.take_duration("compaction_delay")?;
    if compaction_on == Some(false) && compaction_delay.is_some() {
        return Err(SqlError::InvalidOption(format!(
            "{owner}: option `compaction_delay` applies when compaction is on, and \
             `compaction = 'off'` turns it off"
        )));
    }
    if compaction_on == Some(true) && checkpoint_interval.is_some_and(|d| d.is_zero()) {
        return Err(SqlError::InvalidOption(format!(
            "{owner}: option `compaction` needs checkpoints (compacted files replace the old \
             ones in a checkpoint's commit), and `checkpoint_interval = '0s'` turns them off"
        )));
    }
    let event_time_override = opts.take_str("event_time_column");
    let mut stateful = StatefulOptions::default();
    let micros = |d: std::time::Duration| i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
    let lateness_given = opts.contains("allowed_lateness") || opts.contains("late_events");
    if let Some(d) = opts.take_duration("allowed_lateness")? {
        stateful.lateness.allowed = micros(d);
    }
    if let Some(p) = opts.take_str("late_events") {
        stateful.lateness.policy = match p.to_ascii_lowercase().as_str() {
            "errors" => LatePolicy::ErrorsZone,
            "drop" => LatePolicy::Drop,
            _ => {
                return Err(opts
                    .bad("late_events", &p, "'errors' (the default) or 'drop'")
                    .into());
            }
        };
    }
    let parallelism: Option<usize> = opts.take_parsed("parallelism", "a positive integer")?;
    if parallelism == Some(0) {
        return Err(opts.bad("parallelism", "0", "a positive integer").into());
    }
    let primary_key: Vec<String> = opts
        .take_str("primary_key")
        .map(|k| k.split(',').map(|c| c.trim().to_string()).collect())
        .unwrap_or_default();
    let dedup_ttl_given = opts.contains("dedup_ttl");
    if let Some(d) = opts.take_duration("dedup_ttl")? {
        stateful.dedup_ttl = micros(d);
    }
    opts.finish()?;
    // On by default wherever there are checkpoints to swap the files through.
    if compaction_on != Some(false) && !checkpoint_interval.is_some_and(|d| d.is_zero()) {
        writer.compaction = Some(Compaction {
            allowed_lateness: std::time::Duration::from_micros(
                u64::try_from(stateful.lateness.allowed).unwrap_or(0),
            ),
            delay: compaction_delay.unwrap_or(Compaction::DEFAULT_DELAY),
        });
    }

    let ctx = SessionContext::new();
    // DISTINCT and DISTINCT ON stay as they are (a dedup), not rewritten into aggregates.
    ctx.remove_optimizer_rule("replace_distinct_aggregate");
    let (window_planner, windows_used) = WindowTablePlanner::streaming();
    ctx.register_relation_planner(Arc::new(window_planner))?;
    for (name, rel) in relations {
        ctx.register_table(
            TableReference::bare(name.as_str()),
            Arc::new(EmptyTable::new(Arc::clone(&rel.schema))),
        )?;
    }
    // `FOR SYSTEM_TIME AS OF` is Sluice's to plan: DataFusion plans the join without it —
    // and without pruning columns (both sides keep the times the join reads) or pushing the
    // join's conditions into the versioned side (a version is looked up first, then the
    // condition applies to it: filtering the versions would bring back superseded ones).
    let mut query = stmt.query.clone();
    stateful.temporal = crate::temporal::take_versions(&mut query);
    if !stateful.temporal.is_empty() {
        ctx.remove_optimizer_rule("optimize_projections");
        ctx.remove_optimizer_rule("push_down_filter");
    }
    let state = ctx.state();
    let plan = state
        .statement_to_plan(DFStatement::Statement(Box::new(Statement::Query(query))))
        .await?;
    let plan = state.optimize(&plan)?;
    let windows_used = windows_used
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    stateful.session_gap = session_gap(&windows_used)?;
    let props = ExecutionProps::new();
    let Translated {
        branches,
        post,
        merge_schema,
        post_event_time,
    } = translate_stream(&plan, relations, &props, &stateful)?;
    let has = |f: fn(&OpSpec) -> bool| post.iter().any(f);
    if stateful.session_gap.is_some() && !has(|o| matches!(o, OpSpec::SessionAggregate { .. })) {
        return Err(SqlError::NotSupported(
            "a SESSION window must be aggregated: GROUP BY <keys>, window_start, window_end \
             (a session's bounds are only known once it closes)"
                .into(),
        ));
    }
    if dedup_ttl_given && !has(|o| matches!(o, OpSpec::Dedup { .. })) {
        return Err(SqlError::InvalidOption(format!(
            "{owner}: option `dedup_ttl` applies to streams that deduplicate \
             (ROW_NUMBER() … = 1, DISTINCT ON, DISTINCT), and this one does not"
        )));
    }
    if lateness_given && post.is_empty() {
        return Err(SqlError::InvalidOption(format!(
            "{owner}: options `allowed_lateness` and `late_events` apply to streams with windows \
             or dedup, and this one has neither (nothing in it can be late)"
        )));
    }
    let partition_keys = match post.first() {
        Some(OpSpec::WindowAggregate { spec, .. } | OpSpec::SessionAggregate { spec, .. }) => {
            spec.key_exprs()
        }
        Some(OpSpec::Dedup { spec, .. }) => spec.keys.clone(),
        Some(OpSpec::TemporalJoin { spec, .. }) => (1..=spec.keys)
            .map(|i| {
                Arc::new(Column::new(&merge_schema_field(&post, i), i)) as Arc<dyn PhysicalExpr>
            })
            .collect(),
        Some(OpSpec::JoinSides { routed, input, .. }) => routed
            .iter()
            .map(|&i| Arc::new(Column::new(input.field(i).name(), i)) as Arc<dyn PhysicalExpr>)
            .collect(),
        Some(OpSpec::Join { spec, .. }) => (1..=spec.keys)
            .map(|i| {
                Arc::new(Column::new(&merge_schema_field(&post, i), i)) as Arc<dyn PhysicalExpr>
            })
            .collect(),
        _ => vec![],
    };
    let parallelism = match parallelism {
        Some(n) if n > 1 && post.is_empty() => {
            return Err(SqlError::InvalidOption(format!(
                "{owner}: option `parallelism` applies to streams with windows or dedup \
                 (stateless streams run in one task per input)"
            )));
        }
        Some(n) if n > 1 && partition_keys.is_empty() => {
            return Err(SqlError::InvalidOption(format!(
                "{owner}: option `parallelism`: this aggregation has no key besides the window \
                 to divide its rows by, so it runs in one subtask"
            )));
        }
        Some(n) => n,
        None if partition_keys.is_empty() => 1,
        None => default_parallelism(),
    };
    let output_schema: SchemaRef = Arc::new(plan.schema().as_arrow().clone());
    let merge_schema = merge_schema.unwrap_or_else(|| Arc::clone(&output_schema));
    if let Some(c) = primary_key
        .iter()
        .find(|c| c.is_empty() || output_schema.index_of(c).is_err())
    {
        let columns: Vec<&str> = output_schema
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .collect();
        return Err(SqlError::InvalidOption(format!(
            "{owner}: option `primary_key` names `{c}`, which is not one of its columns ({})",
            columns.join(", ")
        )));
    }
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
        partition_keys,
        parallelism,
        merge_schema,
        output_schema,
        event_time_column,
        inputs,
        writer,
        checkpoint_interval,
        checkpoint_timeout,
        primary_key,
    })
}

/// The name of column `i` of the input of the first `post` operator (a join's).
fn merge_schema_field(post: &[OpSpec], i: usize) -> String {
    match post.first() {
        Some(OpSpec::Join { input, .. } | OpSpec::TemporalJoin { input, .. }) => {
            input.field(i).name().clone()
        }
        _ => String::new(),
    }
}

/// Subtasks of a stateful stream when it does not say: one per core.
fn default_parallelism() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// A translated plan: branches of stateless operators, then what runs after they merge.
pub(crate) struct Translated {
    pub(crate) branches: Vec<BranchPlan>,
    pub(crate) post: Vec<OpSpec>,
    pub(crate) merge_schema: Option<SchemaRef>,
    /// Index of the event-time column in the post chain's output.
    pub(crate) post_event_time: Option<usize>,
}

/// Translates the top of a plan: a stateful node (window aggregation, dedup) and the
/// filters and projections above it run after the merge; everything below it (or a plan
/// without one) goes to the branches.
pub(crate) fn translate_stream(
    plan: &LogicalPlan,
    relations: &BTreeMap<String, Relation>,
    props: &ExecutionProps,
    opts: &StatefulOptions,
) -> Result<Translated> {
    let has_stateful = |p: &LogicalPlan| {
        p.exists(|n| {
            Ok(matches!(
                n,
                LogicalPlan::Aggregate(_)
                    | LogicalPlan::Window(_)
                    | LogicalPlan::Distinct(_)
                    | LogicalPlan::Join(_)
            ))
        })
        .unwrap_or(false)
    };
    match plan {
        LogicalPlan::Aggregate(agg) => {
            let branches = translate(&agg.input, relations, props)?;
            let input: SchemaRef = Arc::new(agg.input.schema().as_arrow().clone());
            let spec = window_aggregate(agg, props, opts).ok_or_else(|| {
                SqlError::NotSupported(format!(
                    "streaming {} is not supported yet: group by a window (window_start, window_end of TUMBLE, HOP or SESSION)",
                    describe_node(plan)
                ))
            })??;
            // Windows close when the watermark passes them: without event time on every
            // input, an unbounded input would never emit and its state would only grow.
            needs_event_time(&branches, relations, "windowed aggregation")?;
            let post_event_time = agg.schema.as_arrow().index_of(WINDOW_START).ok();
            let op = match opts.session_gap {
                Some(gap) => OpSpec::SessionAggregate {
                    spec,
                    gap,
                    input: Arc::clone(&input),
                },
                None => OpSpec::WindowAggregate {
                    spec,
                    input: Arc::clone(&input),
                },
            };
            Ok(Translated {
                branches,
                post: vec![op],
                merge_schema: Some(input),
                post_event_time,
            })
        }
        LogicalPlan::Filter(f) if matches!(f.input.as_ref(), LogicalPlan::Window(_)) => {
            let LogicalPlan::Window(w) = f.input.as_ref() else {
                unreachable!("matched above")
            };
            row_number_dedup(f, w, relations, props, opts)
        }
        LogicalPlan::Distinct(d) => distinct_dedup(d, relations, props, opts),
        LogicalPlan::Join(j) => crate::join::join_stream(j, relations, props, opts),
        // The ORDER BY of a `DISTINCT ON` only chooses the row kept (the dedup reads it);
        // the order of an unbounded output means nothing.
        LogicalPlan::Sort(sort)
            if sort.fetch.is_none()
                && matches!(sort.input.as_ref(), LogicalPlan::Distinct(Distinct::On(_))) =>
        {
            translate_stream(&sort.input, relations, props, opts)
        }
        LogicalPlan::Filter(f) if has_stateful(&f.input) => {
            let mut t = translate_stream(&f.input, relations, props, opts)?;
            let predicate =
                create_physical_expr(&f.predicate, f.input.schema(), props, &Default::default())?;
            t.post.push(OpSpec::Filter { predicate });
            Ok(t)
        }
        LogicalPlan::Projection(p) if has_stateful(&p.input) => {
            let mut t = translate_stream(&p.input, relations, props, opts)?;
            t.post_event_time = carried_column(p, t.post_event_time);
            t.post.push(projection(p, props)?);
            Ok(t)
        }
        LogicalPlan::SubqueryAlias(s) if has_stateful(&s.input) => {
            translate_stream(&s.input, relations, props, opts)
        }
        _ => Ok(Translated {
            branches: translate(plan, relations, props)?,
            post: vec![],
            merge_schema: None,
            post_event_time: None,
        }),
    }
}

/// Fails unless every branch reads an input with event time.
pub(crate) fn needs_event_time(
    branches: &[BranchPlan],
    relations: &BTreeMap<String, Relation>,
    what: &str,
) -> Result<()> {
    if let Some(b) = branches.iter().find(|b| {
        relations
            .get(&b.input)
            .is_none_or(|r| r.event_time_column.is_none())
    }) {
        return Err(SqlError::Invalid(format!(
            "{what} needs event time, but `{}` has none: declare \
             `WATERMARK FOR <column> AS <column> - INTERVAL '…'` on the source",
            b.input
        )));
    }
    Ok(())
}

/// The index of the event-time column where the branches merge, for a dedup: it bounds the
/// dedup's state in time.
fn dedup_event_time(
    branches: &[BranchPlan],
    relations: &BTreeMap<String, Relation>,
) -> Result<usize> {
    needs_event_time(branches, relations, "dedup")?;
    let first = branches[0].event_time;
    match first {
        Some(i) if branches.iter().all(|b| b.event_time == first) => Ok(i),
        _ => Err(SqlError::Invalid(
            "dedup needs the event-time column of its input: keep it in the select list below the dedup".into(),
        )),
    }
}

/// Which row a dedup keeps, given the ORDER BY that ranks a key's rows (after the key).
fn dedup_keep(
    order_by: &[datafusion::logical_expr::SortExpr],
    input: &datafusion::common::DFSchema,
    event_time: usize,
) -> Result<DedupKeep> {
    match order_by {
        [] => Ok(DedupKeep::FirstArrival),
        [sort]
            if sort.asc
                && matches!(&sort.expr, Expr::Column(c) if input.index_of_column(c).ok() == Some(event_time)) =>
        {
            Ok(DedupKeep::EarliestEventTime)
        }
        _ => Err(SqlError::NotSupported(format!(
            "a streaming dedup keeps the first row per key by arrival (no ORDER BY) or by event \
             time (ORDER BY `{}` ASC); ordering by {} is not supported (keeping another row would \
             need to retract rows already emitted)",
            input.field(event_time).name(),
            order_by
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// `… WHERE rn = 1` over `ROW_NUMBER() OVER (PARTITION BY k [ORDER BY ts]) AS rn`.
fn row_number_dedup(
    filter: &datafusion::logical_expr::Filter,
    window: &datafusion::logical_expr::Window,
    relations: &BTreeMap<String, Relation>,
    props: &ExecutionProps,
    opts: &StatefulOptions,
) -> Result<Translated> {
    let unsupported = window_functions_unsupported;
    let [Expr::WindowFunction(wf)] = window.window_expr.as_slice() else {
        return Err(unsupported());
    };
    if wf.fun.name() != "row_number" || !wf.params.args.is_empty() {
        return Err(unsupported());
    }
    if wf.params.partition_by.is_empty() {
        return Err(SqlError::NotSupported(
            "ROW_NUMBER() without PARTITION BY numbers the whole unbounded stream: \
             partition by the dedup key"
                .into(),
        ));
    }
    // The row-number column is the window node's last output column.
    let rn = window
        .schema
        .qualified_field(window.schema.fields().len() - 1);
    let is_rn = |e: &Expr| matches!(e, Expr::Column(c) if c.name == rn.1.name().as_str() && c.relation.as_ref() == rn.0);
    let is_one = |e: &Expr| matches!(e, Expr::Literal(v, _) if v.to_string() == "1");
    let mut rest = vec![];
    let mut found = false;
    for c in split_conjunction(&filter.predicate) {
        // rn = 1, rn <= 1, 1 = rn, 1 >= rn
        let keeps_first = match c {
            Expr::BinaryExpr(b) => {
                let rn_first = matches!(b.op, BinaryOp::Eq | BinaryOp::LtEq)
                    && is_rn(&b.left)
                    && is_one(&b.right);
                let one_first = matches!(b.op, BinaryOp::Eq | BinaryOp::GtEq)
                    && is_one(&b.left)
                    && is_rn(&b.right);
                rn_first || one_first
            }
            _ => false,
        };
        if keeps_first && !found {
            found = true;
        } else {
            rest.push(c.clone());
        }
    }
    if !found {
        return Err(unsupported());
    }
    let branches = translate(&window.input, relations, props)?;
    let event_time = dedup_event_time(&branches, relations)?;
    let input_schema = window.input.schema();
    let keep = dedup_keep(&wf.params.order_by, input_schema, event_time)?;
    let keys = wf
        .params
        .partition_by
        .iter()
        .map(|e| create_physical_expr(e, input_schema, props, &Default::default()))
        .collect::<datafusion::error::Result<Vec<_>>>()?;
    let input: SchemaRef = Arc::new(input_schema.as_arrow().clone());
    let mut post = vec![OpSpec::Dedup {
        spec: DedupSpec {
            keys,
            event_time,
            keep,
            ttl: opts.dedup_ttl,
            lateness: opts.lateness,
            schema: Arc::new(window.schema.as_arrow().clone()),
        },
        input: Arc::clone(&input),
    }];
    if let Some(predicate) = conjunction(rest) {
        post.push(OpSpec::Filter {
            predicate: create_physical_expr(
                &predicate,
                &window.schema,
                props,
                &Default::default(),
            )?,
        });
    }
    Ok(Translated {
        branches,
        post,
        merge_schema: Some(input),
        post_event_time: Some(event_time),
    })
}

fn window_functions_unsupported() -> SqlError {
    SqlError::NotSupported(
        "window functions (OVER …) are not supported in streams, except the dedup pattern \
         `SELECT * FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY key ORDER BY event_time) AS rn FROM t) WHERE rn = 1`"
            .into(),
    )
}

/// `SELECT DISTINCT ON (k) …` and `SELECT DISTINCT …`.
fn distinct_dedup(
    distinct: &Distinct,
    relations: &BTreeMap<String, Relation>,
    props: &ExecutionProps,
    opts: &StatefulOptions,
) -> Result<Translated> {
    let input_plan = distinct.input();
    let branches = translate(input_plan, relations, props)?;
    let event_time = dedup_event_time(&branches, relations)?;
    let input_schema = input_plan.schema();
    let input: SchemaRef = Arc::new(input_schema.as_arrow().clone());
    let physical = |exprs: &[Expr]| {
        exprs
            .iter()
            .map(|e| create_physical_expr(e, input_schema, props, &Default::default()))
            .collect::<datafusion::error::Result<Vec<_>>>()
    };
    let spec = |keys, keep| DedupSpec {
        keys,
        event_time,
        keep,
        ttl: opts.dedup_ttl,
        lateness: opts.lateness,
        schema: Arc::clone(&input),
    };
    match distinct {
        Distinct::All(_) => {
            let keys = (0..input.fields().len())
                .map(|i| Arc::new(Column::new(input.field(i).name(), i)) as Arc<dyn PhysicalExpr>)
                .collect();
            Ok(Translated {
                branches,
                post: vec![OpSpec::Dedup {
                    spec: spec(keys, DedupKeep::FirstArrival),
                    input: Arc::clone(&input),
                }],
                merge_schema: Some(input),
                post_event_time: Some(event_time),
            })
        }
        Distinct::On(on) => {
            // The ORDER BY starts with the ON expressions (DataFusion checks); what follows
            // ranks the rows of a key.
            let order = on.sort_expr.as_deref().unwrap_or_default();
            let ranking = order
                .get(on.on_expr.len().min(order.len())..)
                .unwrap_or_default();
            let keep = dedup_keep(ranking, input_schema, event_time)?;
            let exprs = physical(&on.select_expr)?;
            let post_event_time = on.select_expr.iter().position(|e| {
                matches!(e.clone().unalias(), Expr::Column(c) if input_schema.index_of_column(&c).ok() == Some(event_time))
            });
            Ok(Translated {
                branches,
                post: vec![
                    OpSpec::Dedup {
                        spec: spec(physical(&on.on_expr)?, keep),
                        input: Arc::clone(&input),
                    },
                    OpSpec::Project {
                        exprs,
                        schema: Arc::new(on.schema.as_arrow().clone()),
                    },
                ],
                merge_schema: Some(input),
                post_event_time,
            })
        }
    }
}

/// The spec of a window aggregation, or `None` if `agg` does not group by a window.
fn window_aggregate(
    agg: &datafusion::logical_expr::Aggregate,
    props: &ExecutionProps,
    opts: &StatefulOptions,
) -> Option<Result<WindowAggregateSpec>> {
    let is_column =
        |e: &Expr, name: &str| matches!(e.clone().unalias(), Expr::Column(c) if c.name == name);
    let window_end = agg
        .group_expr
        .iter()
        .position(|e| is_column(e, WINDOW_END))?;
    let window_start = agg
        .group_expr
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
            // ORDER BY inside an aggregate (`first_value(x ORDER BY ts)`) is part of
            // `aggregate`, whose accumulator is fed the ordering columns too.
            let (aggregate, filter) = (lowered.aggregate, lowered.filter);
            if filter.is_some() {
                return Err(SqlError::NotSupported(
                    "FILTER (WHERE …) on an aggregate is not supported in streams yet".into(),
                ));
            }
            aggregates.push(aggregate);
        }
        let spec = WindowAggregateSpec {
            group_exprs,
            window_start,
            window_end,
            lateness: opts.lateness,
            aggregates,
            schema: Arc::new(agg.schema.as_arrow().clone()),
        };
        // Fail now on aggregates that cannot run on these types.
        WindowAggregate::try_new(spec.clone(), input.as_arrow(), "validation")?;
        Ok(spec)
    })())
}

pub(crate) fn translate(
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
        LogicalPlan::Unnest(u) => {
            let mut branches = translate(&u.input, relations, props)?;
            let (column, op) = unnest(u)?;
            for b in &mut branches {
                // The unnested column is the list's: the event time is another one.
                b.event_time = b.event_time.filter(|e| *e != column);
                b.ops.push(op.clone());
            }
            Ok(branches)
        }
        LogicalPlan::Union(u) => {
            let mut out = vec![];
            for input in &u.inputs {
                out.extend(translate(input, relations, props)?);
            }
            Ok(out)
        }
        LogicalPlan::Window(_) => Err(window_functions_unsupported()),
        LogicalPlan::Join(_) => Err(SqlError::NotSupported(
            "streaming JOIN is not supported yet at this place: a stream runs one join, of two \
             sources or streams (with filters and projections on either side); to join more, \
             create a stream of the first join and join it in another"
                .into(),
        )),
        LogicalPlan::EmptyRelation(_) | LogicalPlan::Values(_) => Err(SqlError::NotSupported(
            "a stream must read from a source or another stream (this query reads no table, or can never return a row)".into(),
        )),
        other => Err(SqlError::NotSupported(format!(
            "streaming {} is not supported yet: a stream can filter, project, compute scalar expressions and UNION ALL its inputs",
            describe_node(other)
        ))),
    }
}

/// The operator of a logical `UNNEST` of one list column (what `HOP` and `CUMULATE` plan
/// to), and the column's index.
fn unnest(u: &datafusion::logical_expr::Unnest) -> Result<(usize, OpSpec)> {
    let unsupported = || {
        SqlError::NotSupported(
            "streaming UNNEST is supported for one list column at a time (the windows of HOP and CUMULATE)"
                .into(),
        )
    };
    let [(column, list)] = u.list_type_columns.as_slice() else {
        return Err(unsupported());
    };
    let in_place = u.dependency_indices.len() == u.input.schema().fields().len()
        && u.dependency_indices
            .iter()
            .enumerate()
            .all(|(i, d)| i == *d);
    if list.depth != 1 || !u.struct_type_columns.is_empty() || !in_place {
        return Err(unsupported());
    }
    Ok((
        *column,
        OpSpec::Unnest {
            column: *column,
            schema: Arc::new(u.schema.as_arrow().clone()),
            preserve_nulls: u.options.preserve_nulls(),
        },
    ))
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
            "aggregation (GROUP BY or an aggregate function) without a window"
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
