//! Window table functions in `FROM`: `TUMBLE(relation, time_column, INTERVAL '<size>')` and
//! `HOP(relation, time_column, INTERVAL '<slide>', INTERVAL '<size>')`.
//!
//! Planned by a DataFusion [`RelationPlanner`] into an ordinary logical plan: the input
//! relation with two more columns,
//!
//! ```text
//! window_start = time_column floored to a multiple of size (µs since the epoch)
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
//! Flink's form `TABLE(TUMBLE(TABLE t, DESCRIPTOR(ts), INTERVAL '10' SECOND))` is accepted
//! too: sqlparser has no grammar for `TABLE t` as an argument, so [`rewrite_flink_form`]
//! turns it into `TUMBLE(t, ts, INTERVAL '10' SECOND)` token by token before parsing.
//!
//! `HOP` puts each row in `k = size / slide` windows: it is planned as one row-expanding
//! step — a projection adding the list of the row's window starts
//! (`generate_series(floor(t, slide) − (k − 1)·slide, floor(t, slide), slide)`), an `UNNEST`
//! of it (the stream runs `engine::operators::Unnest`), and a projection computing the
//! bounds —, so a 1-hour window sliding every minute costs one `take` per column, not 60
//! branches.
//!
//! `SESSION(relation, time_column, INTERVAL '<gap>')` (streams only): sessions are per group
//! key, so they cannot be a projection. Each row gets its own one-row session,
//! `window_start` = its event time and `window_end` = event time + gap, and the planner
//! records the gap ([`WindowTablePlanner::streaming`]); the stream planner then runs the
//! `GROUP BY …, window_start, window_end` as a session aggregation, which merges the
//! overlapping sessions of each key. Ad hoc, where no such operator runs, `SESSION` is
//! refused.
//!
//! `CUMULATE(relation, time_column, INTERVAL '<step>', INTERVAL '<size>')` (Flink's): the
//! windows of each size-long period start with it and end every step; a row is in those that
//! end after it — the same row-expanding step as `HOP`, over the list of window ends from
//! the row's own step's end to the period's end.

use std::sync::{Arc, Mutex};

use arrow::datatypes::{DataType, TimeUnit};
use datafusion::common::UnnestOptions;
use datafusion::common::{DFSchema, ScalarValue};
use datafusion::error::{DataFusionError, Result};
use datafusion::functions_nested::expr_fn::gen_series;
use datafusion::logical_expr::planner::{
    PlannedRelation, RelationPlanner, RelationPlannerContext, RelationPlanning,
};
use datafusion::logical_expr::{Expr, LogicalPlanBuilder, cast, col, lit};
use std::ops::ControlFlow;

use datafusion::sql::sqlparser::ast::{
    Expr as SqlExpr, FunctionArg, FunctionArgExpr, Ident, Query, SetExpr, TableFactor, VisitMut,
    VisitorMut,
};
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::parser::Parser;
use datafusion::sql::sqlparser::tokenizer::{Token, TokenWithSpan};

/// Rewrites Flink's `TABLE(<window fn>(TABLE t, DESCRIPTOR(c), …))` to
/// `<window fn>(t, c, …)`. Tokens keep their spans, so error positions still point into the
/// text the user wrote; anything else passes through unchanged.
pub fn rewrite_flink_form(mut tokens: Vec<TokenWithSpan>) -> Vec<TokenWithSpan> {
    let is_word = |t: &Token, w: &str| matches!(t, Token::Word(word) if word.quote_style.is_none() && word.value.eq_ignore_ascii_case(w));
    loop {
        let sig: Vec<usize> = (0..tokens.len())
            .filter(|&k| !matches!(tokens[k].token, Token::Whitespace(_)))
            .collect();
        let found = sig.windows(4).find(|w| {
            is_word(&tokens[w[0]].token, "TABLE")
                && tokens[w[1]].token == Token::LParen
                && WINDOW_FUNCTIONS
                    .iter()
                    .any(|f| is_word(&tokens[w[2]].token, f))
                && tokens[w[3]].token == Token::LParen
        });
        let Some(&[table_kw, outer_open, _, inner_open]) = found else {
            return tokens;
        };
        let (Some(outer_close), Some(inner_close)) = (
            matching_paren(&tokens, outer_open),
            matching_paren(&tokens, inner_open),
        ) else {
            return tokens; // unbalanced: let the parser report it
        };
        let mut remove = vec![table_kw, outer_open, outer_close];
        let inner: Vec<usize> = sig
            .iter()
            .copied()
            .filter(|&k| k > inner_open && k < inner_close)
            .collect();
        let mut depth = 0usize;
        for (n, &k) in inner.iter().enumerate() {
            match &tokens[k].token {
                Token::LParen => depth += 1,
                Token::RParen => depth = depth.saturating_sub(1),
                t if depth == 0 && is_word(t, "TABLE") => remove.push(k),
                t if depth == 0 && is_word(t, "DESCRIPTOR") => {
                    if let Some(&open) = inner.get(n + 1)
                        && tokens[open].token == Token::LParen
                        && let Some(close) = matching_paren(&tokens, open)
                    {
                        remove.extend([k, open, close]);
                    }
                }
                _ => {}
            }
        }
        remove.sort_unstable();
        remove.dedup();
        for k in remove.into_iter().rev() {
            tokens.remove(k);
        }
    }
}

/// The index of the `)` closing the `(` at `open`.
fn matching_paren(tokens: &[TokenWithSpan], open: usize) -> Option<usize> {
    let mut depth = 0usize;
    for (k, t) in tokens.iter().enumerate().skip(open) {
        match t.token {
            Token::LParen => depth += 1,
            Token::RParen => {
                depth -= 1;
                if depth == 0 {
                    return Some(k);
                }
            }
            _ => {}
        }
    }
    None
}

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

/// A window table function a statement used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowKind {
    /// `TUMBLE`.
    Tumble,
    /// `HOP`.
    Hop,
    /// `CUMULATE`.
    Cumulate,
    /// `SESSION` with this gap, in microseconds.
    Session {
        /// The gap that ends a session.
        gap_micros: i64,
    },
}

/// Plans `TUMBLE(…)`, `HOP(…)` and (for streams) `SESSION(…)` in `FROM`. Register it on every
/// session that plans Sluice SQL.
#[derive(Debug, Default)]
pub struct WindowTablePlanner {
    /// Where the windows used are recorded; `None` for ad-hoc queries (no `SESSION`).
    used: Option<Arc<Mutex<Vec<WindowKind>>>>,
}

impl WindowTablePlanner {
    /// A planner for stream queries, and the list it records the windows used in.
    pub fn streaming() -> (Self, Arc<Mutex<Vec<WindowKind>>>) {
        let used = Arc::new(Mutex::new(Vec::new()));
        (
            Self {
                used: Some(Arc::clone(&used)),
            },
            used,
        )
    }

    fn record(&self, kind: WindowKind) {
        if let Some(used) = &self.used {
            used.lock().unwrap_or_else(|e| e.into_inner()).push(kind);
        }
    }
}

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
        let usage = match function.as_str() {
            "tumble" => "TUMBLE(relation, time_column, INTERVAL '<size>')",
            "hop" => "HOP(relation, time_column, INTERVAL '<slide>', INTERVAL '<size>')",
            "session" if self.used.is_some() => "SESSION(relation, time_column, INTERVAL '<gap>')",
            "session" => {
                return Err(DataFusionError::NotImplemented(
                    "SESSION windows are computed by streams (sessions form per GROUP BY key as \
                     rows arrive); create a stream with the session aggregation and query it"
                        .into(),
                ));
            }
            "cumulate" => "CUMULATE(relation, time_column, INTERVAL '<step>', INTERVAL '<size>')",
            _ => return Ok(RelationPlanning::Original(Box::new(relation))),
        };
        let name = function.to_uppercase();
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
        let (input_expr, time, slide, size) = match (function.as_str(), exprs.as_slice()) {
            ("tumble", [input, SqlExpr::Identifier(time), size]) => (input, time, size, size),
            ("hop", [input, SqlExpr::Identifier(time), slide, size]) => (input, time, slide, size),
            ("session", [input, SqlExpr::Identifier(time), gap]) => (input, time, gap, gap),
            ("cumulate", [input, SqlExpr::Identifier(time), step, size]) => {
                (input, time, step, size)
            }
            _ => {
                return Err(DataFusionError::Plan(format!(
                    "expected {usage}, got {name}({})",
                    args.args
                        .iter()
                        .map(|a| a.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
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
                DataFusionError::Plan(format!("{name}: {table} has no column `{time_column}`"))
            })?;
        if !matches!(time_field.data_type(), DataType::Timestamp(..)) {
            return Err(DataFusionError::Plan(format!(
                "{name}: the time column `{time_column}` must be a TIMESTAMP, not {}",
                time_field.data_type()
            )));
        }
        // An input that is itself windowed (windows over windows) gets the new window's
        // columns in place of its own.
        let columns: Vec<Expr> = input
            .schema()
            .columns()
            .into_iter()
            .filter(|c| c.name != WINDOW_START && c.name != WINDOW_END)
            .map(Expr::Column)
            .collect();
        // Window bounds are integer arithmetic on the µs value, which Arrow vectorises
        // (interval arithmetic on a zoned timestamp goes through the time zone row by row).
        let micros_utc = DataType::Timestamp(TimeUnit::Microsecond, Some(Arc::from("UTC")));
        let t = cast(
            cast(col(time_column.as_str()), micros_utc.clone()),
            DataType::Int64,
        );
        let timestamp = |e: Expr| cast(e, micros_utc.clone());
        if function == "session" {
            let gap = interval_micros(context, &name, "gap", size)?;
            self.record(WindowKind::Session { gap_micros: gap });
            // Each row's own session; the session aggregation merges them.
            let mut exprs = columns;
            exprs.push(timestamp(t.clone()).alias(WINDOW_START));
            exprs.push(timestamp(t + lit(gap)).alias(WINDOW_END));
            let plan = LogicalPlanBuilder::from(input).project(exprs)?.build()?;
            return Ok(RelationPlanning::Planned(Box::new(PlannedRelation::new(
                plan,
                alias.clone(),
            ))));
        }
        self.record(match function.as_str() {
            "hop" => WindowKind::Hop,
            "cumulate" => WindowKind::Cumulate,
            _ => WindowKind::Tumble,
        });
        let step_name = if function == "cumulate" {
            "step"
        } else {
            "slide"
        };
        let size = interval_micros(context, &name, "window size", size)?;
        let slide = interval_micros(context, &name, step_name, slide)?;
        if size % slide != 0 {
            return Err(DataFusionError::Plan(format!(
                "{name}: the window size must be a whole multiple of the {step_name}"
            )));
        }
        let windows_per_row = size / slide;
        if windows_per_row > 1000 {
            return Err(DataFusionError::Plan(format!(
                "{name}: a row would fall into {windows_per_row} windows; at most 1000 are supported"
            )));
        }

        // t floored to a multiple of `unit` (from the epoch; the double remainder floors
        // negative times too).
        let floor = |unit: i64| t.clone() - ((t.clone() % lit(unit) + lit(unit)) % lit(unit));
        if function == "tumble" {
            // One window per row: a projection.
            let start = floor(size);
            let mut exprs = columns;
            exprs.push(timestamp(start.clone()).alias(WINDOW_START));
            exprs.push(timestamp(start + lit(size)).alias(WINDOW_END));
            let plan = LogicalPlanBuilder::from(input).project(exprs)?.build()?;
            return Ok(RelationPlanning::Planned(Box::new(PlannedRelation::new(
                plan,
                alias.clone(),
            ))));
        }
        // One row-expanding step (see the module docs): a list of the row's windows — their
        // starts for HOP, their ends for CUMULATE —, unnested into one row each, and the
        // bounds computed from it.
        let (list, start, end) = if function == "cumulate" {
            // Windows of one size-long period all start at its start and end every step: a
            // row is in those that end after it, from its own step's end to the period's.
            let period = floor(size);
            let first_end = floor(slide) + lit(slide);
            let bound = col(WINDOWS);
            (
                gen_series(first_end, period.clone() + lit(size), lit(slide)),
                period,
                bound,
            )
        } else {
            // A row at time t is in the windows starting at bin(t) − i·slide, i = 0 … k − 1,
            // bin(t) being t floored to a multiple of the slide.
            let latest = floor(slide);
            let earliest = latest.clone() - lit((windows_per_row - 1) * slide);
            let bound = col(WINDOWS);
            (
                gen_series(earliest, latest, lit(slide)),
                bound.clone(),
                bound + lit(size),
            )
        };
        let mut listed = columns.clone();
        listed.push(list.alias(WINDOWS));
        let mut exprs = columns;
        exprs.push(timestamp(start).alias(WINDOW_START));
        exprs.push(timestamp(end).alias(WINDOW_END));
        let plan = LogicalPlanBuilder::from(input)
            .project(listed)?
            .unnest_column_with_options(WINDOWS, UnnestOptions::new().with_preserve_nulls(true))?
            .project(exprs)?
            .build()?;
        Ok(RelationPlanning::Planned(Box::new(PlannedRelation::new(
            plan,
            alias.clone(),
        ))))
    }
}

/// The list column a `HOP` or `CUMULATE` unnests (gone from the relation it plans).
const WINDOWS: &str = "__sluice_windows";

/// The length of a positive interval argument of `function`, in microseconds.
fn interval_micros(
    context: &mut dyn RelationPlannerContext,
    function: &str,
    what: &str,
    expr: &SqlExpr,
) -> Result<i64> {
    const NANOS_PER_DAY: i64 = 86_400_000_000_000;
    match context.sql_to_expr(expr.clone(), &DFSchema::empty())? {
        Expr::Literal(ScalarValue::IntervalMonthDayNano(Some(i)), _)
            if i.months == 0 && i.days >= 0 && i.nanoseconds >= 0 =>
        {
            let nanos = i64::from(i.days) * NANOS_PER_DAY + i.nanoseconds;
            if nanos >= 1000 && nanos % 1000 == 0 {
                return Ok(nanos / 1000);
            }
            Err(DataFusionError::Plan(format!(
                "{function}: the {what} must be a whole number of microseconds, at least one"
            )))
        }
        other => Err(DataFusionError::Plan(format!(
            "{function}: the {what} must be a positive INTERVAL of days or less, e.g. INTERVAL '10 seconds'; got {other}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use datafusion::sql::sqlparser::tokenizer::Tokenizer;

    use super::*;
    use crate::parser::{SluiceStatement, parse_sql};

    fn rewritten(sql: &str) -> String {
        let tokens = Tokenizer::new(&PostgreSqlDialect {}, sql)
            .tokenize_with_location()
            .unwrap();
        rewrite_flink_form(tokens)
            .iter()
            .map(|t| t.token.to_string())
            .collect()
    }

    #[test]
    fn flink_form_becomes_the_plain_call() {
        assert_eq!(
            rewritten(
                "SELECT * FROM TABLE(TUMBLE(TABLE orders, DESCRIPTOR(ts), INTERVAL '10' SECOND)) AS w"
            ),
            "SELECT * FROM TUMBLE( orders, ts, INTERVAL '10' SECOND) AS w"
        );
        // Other uses of TABLE and parentheses are left alone.
        let plain = "SELECT (1 + 2) FROM t WHERE x IN (SELECT y FROM TABLE_1)";
        assert_eq!(rewritten(plain), plain);
    }

    #[test]
    fn the_table_argument_becomes_a_subquery_and_errors_keep_positions() {
        let stmts = parse_sql("CREATE STREAM s AS SELECT * FROM TABLE(TUMBLE(TABLE o, DESCRIPTOR(ts), INTERVAL '1' MINUTE))")
            .unwrap();
        let SluiceStatement::CreateStream(c) = &stmts[0] else {
            panic!("{stmts:?}")
        };
        assert_eq!(
            c.query.to_string(),
            "SELECT * FROM TUMBLE((SELECT * FROM o), ts, INTERVAL '1' MINUTE)"
        );
        // `FORM` reads as a column alias, so the parser stops at `TUMBLE`: character 21 of
        // the text the user wrote (it would be 15 in the rewritten token stream).
        let err =
            parse_sql("SELECT 1 FORM TABLE(TUMBLE(TABLE o, DESCRIPTOR(ts), INTERVAL '1' MINUTE))")
                .unwrap_err();
        assert_eq!(err.position(), Some(21), "{err}");
    }
}
