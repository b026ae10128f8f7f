//! Window table functions in `FROM`: `TUMBLE(relation, time_column, INTERVAL '…')`.
//!
//! Planned by a DataFusion [`RelationPlanner`] into an ordinary logical plan: the input
//! relation with two more columns,
//!
//! ```text
//! window_start = date_bin(size, time_column, '1970-01-01T00:00:00Z')
//! window_end   = window_start + size
//! ```
//!
//! so window assignment is a stateless projection that every existing operator runs, and
//! `GROUP BY …, window_start, window_end` sees ordinary columns. Windows are aligned to the
//! Unix epoch in UTC, as in Flink and RisingWave. An input that already has `window_start`
//! and `window_end` (windows over windows) gets the new window's columns in their place.
//!
//! DataFusion loads only the tables it finds as relations in the statement, so the parser
//! first rewrites `TUMBLE(t, …)` to `TUMBLE((SELECT * FROM t), …)` ([`rewrite_table_args`]);
//! a subquery is accepted as the first argument too.
//!
//! Not yet: `HOP` and `SESSION` (one input row → several windows, and merging windows), the
//! Flink form `TABLE(TUMBLE(TABLE t, DESCRIPTOR(ts), …))`, and windowed aggregation itself.

use std::sync::Arc;

use datafusion::common::{DFSchema, ScalarValue};
use datafusion::error::{DataFusionError, Result};
use datafusion::functions::expr_fn::date_bin;
use datafusion::logical_expr::planner::{
    PlannedRelation, RelationPlanner, RelationPlannerContext, RelationPlanning,
};
use datafusion::logical_expr::{Expr, LogicalPlanBuilder, col, lit};
use std::ops::ControlFlow;

use datafusion::sql::sqlparser::ast::{
    Expr as SqlExpr, FunctionArg, FunctionArgExpr, Ident, Query, SetExpr, TableFactor, VisitMut,
    VisitorMut,
};
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::parser::Parser;

/// The window table functions (planned or refused here).
const WINDOW_FUNCTIONS: [&str; 4] = ["tumble", "hop", "session", "cumulate"];

/// Rewrites the relation argument of every window table function in `node` from a name
/// to a subquery, `TUMBLE(t, …)` → `TUMBLE((SELECT * FROM t), …)`, so that DataFusion
/// resolves `t` like any table the statement reads.
pub fn rewrite_table_args<V: VisitMut>(node: &mut V) {
    struct Rewrite;
    impl VisitorMut for Rewrite {
        type Break = ();
        fn pre_visit_table_factor(&mut self, factor: &mut TableFactor) -> ControlFlow<()> {
            if let TableFactor::Table {
                name,
                args: Some(args),
                ..
            } = factor
                && WINDOW_FUNCTIONS.contains(&name.to_string().to_ascii_lowercase().as_str())
                && let Some(FunctionArg::Unnamed(FunctionArgExpr::Expr(first))) =
                    args.args.first_mut()
                && let SqlExpr::Identifier(table) = first
                && let Some(query) = select_all_from(table)
            {
                *first = SqlExpr::Subquery(query);
            }
            ControlFlow::Continue(())
        }
    }
    let _ = node.visit(&mut Rewrite);
}

/// The relation a `SELECT … FROM t` reads, for messages; `the input` otherwise.
fn relation_name(q: &Query) -> String {
    if let SetExpr::Select(select) = q.body.as_ref()
        && let [from] = select.from.as_slice()
        && from.joins.is_empty()
        && let TableFactor::Table { name, .. } = &from.relation
    {
        return format!("`{name}`");
    }
    "the input".to_string()
}

fn select_all_from(table: &Ident) -> Option<Box<Query>> {
    let dialect = PostgreSqlDialect {};
    Parser::new(&dialect)
        .try_with_sql(&format!("SELECT * FROM {table}"))
        .and_then(|mut p| p.parse_query())
        .ok()
}

/// The output column holding a window's start.
pub const WINDOW_START: &str = "window_start";
/// The output column holding a window's end (exclusive).
pub const WINDOW_END: &str = "window_end";

/// Plans `TUMBLE(…)` in `FROM`. Register it on every session that plans Sluice SQL.
#[derive(Debug, Default)]
pub struct WindowTablePlanner;

impl RelationPlanner for WindowTablePlanner {
    fn plan_relation(
        &self,
        relation: TableFactor,
        context: &mut dyn RelationPlannerContext,
    ) -> Result<RelationPlanning> {
        let TableFactor::Table {
            name,
            args: Some(args),
            alias,
            ..
        } = &relation
        else {
            return Ok(RelationPlanning::Original(Box::new(relation)));
        };
        let function = name.to_string().to_ascii_lowercase();
        match function.as_str() {
            "tumble" => {}
            "hop" | "session" | "cumulate" => {
                return Err(DataFusionError::NotImplemented(format!(
                    "the {} window is not supported yet (TUMBLE is)",
                    function.to_uppercase()
                )));
            }
            _ => return Ok(RelationPlanning::Original(Box::new(relation))),
        }
        let usage = "TUMBLE(relation, time_column, INTERVAL '<size>')";
        let exprs: Vec<&SqlExpr> = args
            .args
            .iter()
            .map(|a| match a {
                FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => Ok(e),
                other => Err(DataFusionError::Plan(format!(
                    "{usage}: unexpected argument `{other}`"
                ))),
            })
            .collect::<Result<_>>()?;
        let [input_expr, SqlExpr::Identifier(time), size] = exprs.as_slice() else {
            return Err(DataFusionError::Plan(format!(
                "expected {usage}, got TUMBLE({})",
                args.args
                    .iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        };

        // The input: a subquery (what `rewrite_table_args` makes of a table name).
        let (table, input_factor) = match input_expr {
            SqlExpr::Subquery(q) => (
                relation_name(q),
                TableFactor::Derived {
                    lateral: false,
                    subquery: q.clone(),
                    alias: None,
                    sample: None,
                },
            ),
            other => {
                return Err(DataFusionError::Plan(format!(
                    "expected {usage}: the first argument must name a source or stream, got `{other}`"
                )));
            }
        };
        let input = context.plan(input_factor)?;
        let time_column = context.normalize_ident(time.clone());
        let time_field = input
            .schema()
            .field_with_unqualified_name(&time_column)
            .map_err(|_| {
                DataFusionError::Plan(format!("TUMBLE: {table} has no column `{time_column}`"))
            })?;
        if !matches!(
            time_field.data_type(),
            arrow::datatypes::DataType::Timestamp(..)
        ) {
            return Err(DataFusionError::Plan(format!(
                "TUMBLE: the time column `{time_column}` must be a TIMESTAMP, not {}",
                time_field.data_type()
            )));
        }
        let size = match context.sql_to_expr((*size).clone(), &DFSchema::empty())? {
            Expr::Literal(ScalarValue::IntervalMonthDayNano(Some(i)), _)
                if i.months == 0
                    && (i.days > 0 || i.nanoseconds > 0)
                    && i.days >= 0
                    && i.nanoseconds >= 0 =>
            {
                ScalarValue::IntervalMonthDayNano(Some(i))
            }
            other => {
                return Err(DataFusionError::Plan(format!(
                    "TUMBLE: the window size must be a positive INTERVAL of days or less, e.g. INTERVAL '10 seconds'; got {other}"
                )));
            }
        };
        let origin = lit(ScalarValue::TimestampMicrosecond(
            Some(0),
            Some(Arc::from("UTC")),
        ));
        let start = date_bin(lit(size.clone()), col(time_column.as_str()), origin);
        // An input that is itself windowed (windows over windows) gets the new window's
        // columns in place of its own.
        let mut exprs: Vec<Expr> = input
            .schema()
            .columns()
            .into_iter()
            .filter(|c| c.name != WINDOW_START && c.name != WINDOW_END)
            .map(Expr::Column)
            .collect();
        exprs.push(start.clone().alias(WINDOW_START));
        exprs.push((start + lit(size)).alias(WINDOW_END));
        let plan = LogicalPlanBuilder::from(input).project(exprs)?.build()?;
        Ok(RelationPlanning::Planned(Box::new(PlannedRelation::new(
            plan,
            alias.clone(),
        ))))
    }
}
