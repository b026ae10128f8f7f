//! Statements as Postgres clients write them. psql's `\d`, DBeaver, Grafana and JDBC's
//! `DatabaseMetaData` send catalog queries in Postgres' own dialect (`OPERATOR(pg_catalog.~)`,
//! `'t'::regclass`, `ANY(array)`, …); `datafusion-pg-catalog`'s compatibility parser
//! rewrites them into what DataFusion plans against the `pg_catalog` it installs
//! ([`crate::adhoc::AdHoc::new`]).

use std::sync::LazyLock;

use datafusion::sql::parser::Statement as DFStatement;
use datafusion_pg_catalog::sql::PostgresCompatibilityParser;
use sluice_sql::{SluiceStatement, SqlError, parse_sql};

static PARSER: LazyLock<PostgresCompatibilityParser> =
    LazyLock::new(PostgresCompatibilityParser::new);

/// Fragments of client catalog queries that the compatibility parser does not cover, and
/// what Sluice answers in their place (compared with runs of whitespace as one space).
/// Each names the client that sends it.
const FRAGMENTS: &[(&str, &str)] = &[
    // psql 15+ `\d+`: a relation's storage options, its TOAST table's included. Sluice's
    // relations have none (`pg_class` has no `reloptions`); psql's plain `\d` sends `''`.
    (
        "pg_catalog.array_to_string(c.reloptions || array(select 'toast.' || x from pg_catalog.unnest(tc.reloptions) x), ', ')",
        "''",
    ),
    // DBeaver (pgJDBC's type lookup): whether a type is an array, by its input function.
    // The catalog's `typinput` holds the function's name (as Postgres displays a regproc);
    // the crate's `::regproc` rewrite yields an oid, which that name cannot be compared with.
    (
        "typinput='pg_catalog.array_in'::regproc",
        "typinput='array_in'",
    ),
];

/// `sql` with the [`FRAGMENTS`] it holds replaced (and its whitespace runs made single
/// spaces), if it holds any.
fn replace_fragments(sql: &str) -> Option<String> {
    let squeezed = sql.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut out = None::<String>;
    for (from, to) in FRAGMENTS {
        let text = out.as_deref().unwrap_or(&squeezed);
        if text.contains(from) {
            out = Some(text.replace(from, to));
        }
    }
    out
}

/// Parses `sql` as Sluice does. Text of plain SQL statements only (no Sluice DDL, none of
/// DataFusion's own) that reads the Postgres catalog (`pg_…`, `information_schema`, `reg…`
/// casts) is read again by the compatibility parser: its token rewrites of the catalog
/// queries clients send verbatim, then its statement rewrites. Other queries are left as
/// written (the rewrites are for catalog queries; Sluice's own table functions such as
/// `TUMBLE(stream, …)` must reach the planner untouched). Text that Sluice's parser refuses
/// as a syntax error is tried with the compatibility parser and taken if it yields queries
/// (or `COPY … TO STDOUT`) only (DDL is never read that way). Other errors (a statement
/// too deeply nested, an invalid name) stand: the compatibility parser never sees such
/// text.
pub fn parse(sql: &str) -> Result<Vec<SluiceStatement>, SqlError> {
    let replaced = reads_catalog(sql).then(|| replace_fragments(sql)).flatten();
    let sql = replaced.as_deref().unwrap_or(sql);
    match parse_sql(sql) {
        Ok(stmts) => {
            let plain = stmts.iter().all(|s| {
                matches!(s, SluiceStatement::Other(o) if matches!(**o, DFStatement::Statement(_)))
            });
            if plain
                && reads_catalog(sql)
                && let Ok(compat) = PARSER.parse(sql)
                && compat.len() == stmts.len()
            {
                return Ok(compat.into_iter().map(statement).collect());
            }
            Ok(stmts)
        }
        Err(e @ SqlError::Syntax { .. }) => match PARSER.parse(sql) {
            Ok(stmts) if !stmts.is_empty() && stmts.iter().all(readable) => {
                Ok(stmts.into_iter().map(statement).collect())
            }
            _ => Err(e),
        },
        Err(e) => Err(e),
    }
}

/// A statement the compatibility parser may read when Sluice's parser cannot: a query, or
/// `COPY … TO STDOUT` (DataFusion's parser takes `COPY` as its own `COPY … TO 'file'`).
fn readable(s: &datafusion::sql::sqlparser::ast::Statement) -> bool {
    use datafusion::sql::sqlparser::ast::{CopyTarget, Statement};
    match s {
        Statement::Query(_) => true,
        Statement::Copy { to, target, .. } => *to && matches!(target, CopyTarget::Stdout),
        _ => false,
    }
}

fn statement(s: datafusion::sql::sqlparser::ast::Statement) -> SluiceStatement {
    SluiceStatement::Other(Box::new(DFStatement::Statement(Box::new(s))))
}

/// Whether `sql` names the Postgres catalog (what the compatibility rewrites are for).
fn reads_catalog(sql: &str) -> bool {
    let lower = sql.to_ascii_lowercase();
    [
        "pg_",
        "information_schema",
        "::reg",
        "regclass",
        "regtype",
        "regproc",
    ]
    .iter()
    .any(|w| lower.contains(w))
}

/// Replaces each `current_setting('name')` in `stmt` by the setting's value (`setting`
/// looks it up in the session); an unknown name is an error, as in Postgres.
pub fn inline_settings(
    stmt: &mut DFStatement,
    setting: impl Fn(&str) -> Option<String>,
) -> Result<(), SqlError> {
    use std::ops::ControlFlow;

    use datafusion::sql::sqlparser::ast::{
        Expr, FunctionArg, FunctionArgExpr, FunctionArguments, Value, ValueWithSpan,
        visit_expressions_mut,
    };
    let DFStatement::Statement(s) = stmt else {
        return Ok(());
    };
    let flow = visit_expressions_mut(s.as_mut(), |e| {
        let Expr::Function(f) = e else {
            return ControlFlow::Continue(());
        };
        // `current_user`, `session_user`, `current_role`, `user`: the session's user.
        if matches!(f.args, FunctionArguments::None)
            && let [part] = f.name.0.as_slice()
            && let Some(i) = part.as_ident()
            && ["current_user", "session_user", "current_role", "user"]
                .iter()
                .any(|n| i.value.eq_ignore_ascii_case(n))
            && let Some(user) = setting("session_authorization")
        {
            *e = Expr::value(Value::SingleQuotedString(user));
            return ControlFlow::Continue(());
        }
        let is_it = f
            .name
            .0
            .last()
            .and_then(|p| p.as_ident())
            .is_some_and(|i| i.value.eq_ignore_ascii_case("current_setting"));
        let FunctionArguments::List(list) = &f.args else {
            return ControlFlow::Continue(());
        };
        let name = match list.args.first() {
            Some(FunctionArg::Unnamed(FunctionArgExpr::Expr(Expr::Value(ValueWithSpan {
                value: Value::SingleQuotedString(n),
                ..
            }))))
                if is_it =>
            {
                n.clone()
            }
            _ => return ControlFlow::Continue(()),
        };
        match setting(&name) {
            Some(v) => {
                *e = Expr::value(Value::SingleQuotedString(v));
                ControlFlow::Continue(())
            }
            None => ControlFlow::Break(name),
        }
    });
    match flow {
        ControlFlow::Break(name) => Err(SqlError::InvalidOption(format!(
            "unrecognized configuration parameter \"{name}\""
        ))),
        ControlFlow::Continue(()) => Ok(()),
    }
}

/// The names Postgres gives a query's result columns, where they differ from DataFusion's
/// (`count` for `count(*)`, `?column?` for `1 + 1`, a column's own name for `t.x`); `None`
/// where the query's shape does not say (a `*`, a statement other than a query): the plan's
/// names stand. Postgres' rule: an alias; else a column reference's last name; a function
/// call's name; a cast's operand's name (or its type's); `?column?` for anything else. A
/// `UNION` takes its first branch's names.
pub fn column_names(stmt: &DFStatement) -> Option<Vec<String>> {
    use datafusion::sql::sqlparser::ast::{SelectItem, SetExpr, Statement};
    fn body(e: &SetExpr) -> Option<Vec<String>> {
        match e {
            SetExpr::Select(s) => s
                .projection
                .iter()
                .map(|item| match item {
                    SelectItem::UnnamedExpr(e) => Some(expr_name(e)),
                    SelectItem::ExprWithAlias { alias, .. } => Some(alias.value.clone()),
                    _ => None,
                })
                .collect(),
            SetExpr::Query(q) => body(&q.body),
            SetExpr::SetOperation { left, .. } => body(left),
            _ => None,
        }
    }
    match stmt {
        DFStatement::Statement(s) => match s.as_ref() {
            Statement::Query(q) => body(&q.body),
            _ => None,
        },
        _ => None,
    }
}

/// Renames each select-list item whose Postgres name an earlier item of its select list
/// has too (`SELECT version(), pg_catalog.version()`, `SELECT 1, 1`): DataFusion refuses two
/// columns of one name, Postgres does not. Call after [`column_names`], which keeps the
/// Postgres names for the wire.
pub fn alias_duplicate_names(stmt: &mut DFStatement) {
    use datafusion::sql::sqlparser::ast::{Ident, SelectItem, SetExpr, Statement};
    fn body(e: &mut SetExpr) {
        match e {
            SetExpr::Select(s) => {
                let names: Vec<Option<String>> = s
                    .projection
                    .iter()
                    .map(|item| match item {
                        SelectItem::UnnamedExpr(e) => Some(expr_name(e)),
                        SelectItem::ExprWithAlias { alias, .. } => Some(alias.value.clone()),
                        _ => None,
                    })
                    .collect();
                for (i, item) in s.projection.iter_mut().enumerate() {
                    let Some(name) = &names[i] else { continue };
                    if !names[..i].iter().any(|n| n.as_ref() == Some(name)) {
                        continue; // the first of its name keeps it
                    }
                    let expr = match &*item {
                        SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => {
                            e.clone()
                        }
                        _ => continue,
                    };
                    *item = SelectItem::ExprWithAlias {
                        expr,
                        alias: Ident::with_quote('"', format!("{name} #{}", i + 1)),
                    };
                }
            }
            SetExpr::Query(q) => body(&mut q.body),
            SetExpr::SetOperation { left, right, .. } => {
                body(left);
                body(right);
            }
            _ => {}
        }
    }
    if let DFStatement::Statement(s) = stmt
        && let Statement::Query(q) = s.as_mut()
    {
        body(&mut q.body);
    }
}

fn expr_name(e: &datafusion::sql::sqlparser::ast::Expr) -> String {
    use datafusion::sql::sqlparser::ast::{DataType, Expr};
    const UNNAMED: &str = "?column?";
    match e {
        Expr::Identifier(i) => i.value.clone(),
        Expr::CompoundIdentifier(parts) => parts.last().map_or(UNNAMED.into(), |i| i.value.clone()),
        Expr::Function(f) => f
            .name
            .0
            .last()
            .and_then(|p| p.as_ident())
            .map_or(UNNAMED.into(), |i| i.value.to_ascii_lowercase()),
        Expr::Nested(inner) => expr_name(inner),
        Expr::Cast {
            expr, data_type, ..
        } => match expr_name(expr) {
            n if n != UNNAMED => n,
            _ => match data_type {
                DataType::Int(_) | DataType::Integer(_) | DataType::Int4(_) => "int4".into(),
                DataType::BigInt(_) | DataType::Int8(_) => "int8".into(),
                DataType::SmallInt(_) | DataType::Int2(_) => "int2".into(),
                DataType::Text => "text".into(),
                DataType::Varchar(_) => "varchar".into(),
                DataType::Boolean | DataType::Bool => "bool".into(),
                DataType::Double(_) | DataType::DoublePrecision | DataType::Float8 => {
                    "float8".into()
                }
                DataType::Real | DataType::Float4 => "float4".into(),
                DataType::Date => "date".into(),
                DataType::Timestamp(..) => "timestamp".into(),
                DataType::Numeric(_) | DataType::Decimal(_) => "numeric".into(),
                _ => UNNAMED.into(),
            },
        },
        Expr::Case { .. } => "case".into(),
        Expr::Extract { .. } => "extract".into(),
        Expr::Exists { .. } => "exists".into(),
        _ => UNNAMED.into(),
    }
}

/// `schema` with the fields named `names` (when there is one name per field); Arrow allows
/// the duplicates Postgres results may have (`SELECT count(a), count(b)`).
pub fn rename(
    schema: &arrow::datatypes::SchemaRef,
    names: Option<&[String]>,
) -> arrow::datatypes::SchemaRef {
    let Some(names) = names.filter(|n| n.len() == schema.fields().len()) else {
        return std::sync::Arc::clone(schema);
    };
    let fields: Vec<arrow::datatypes::Field> = schema
        .fields()
        .iter()
        .zip(names)
        .map(|(f, n)| f.as_ref().clone().with_name(n.clone()))
        .collect();
    std::sync::Arc::new(arrow::datatypes::Schema::new_with_metadata(
        fields,
        schema.metadata().clone(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fragments_are_replaced_whatever_the_whitespace() {
        let sql = "SELECT c.relispartition, pg_catalog.array_to_string(c.reloptions || array(select 'toast.' || x\n  from pg_catalog.unnest(tc.reloptions) x), ', ')\n, c.reltablespace FROM pg_catalog.pg_class c";
        assert_eq!(
            replace_fragments(sql).as_deref(),
            Some("SELECT c.relispartition, '' , c.reltablespace FROM pg_catalog.pg_class c")
        );
        assert_eq!(replace_fragments("SELECT 1"), None);
    }

    fn names(sql: &str) -> Option<Vec<String>> {
        match parse(sql).unwrap().remove(0) {
            SluiceStatement::Other(s) => column_names(&s),
            _ => None,
        }
    }

    #[test]
    fn result_columns_are_named_as_postgres_names_them() {
        let n = |v: &[&str]| Some(v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(
            names(
                "SELECT count(*), 1 + 1, t.user_id, url AS u, sum(x), (y), z::text, 1::int, CASE WHEN a THEN 1 END FROM t"
            ),
            n(&[
                "count", "?column?", "user_id", "u", "sum", "y", "z", "int4", "case"
            ])
        );
        assert_eq!(
            names("SELECT a FROM t UNION ALL SELECT b FROM u"),
            n(&["a"])
        );
        assert_eq!(names("SELECT * FROM t"), None);
        assert_eq!(
            names("SELECT count(*) FROM pg_catalog.pg_class WHERE current_setting('x') = ''"),
            n(&["count"])
        );
        assert_eq!(names("SET x = 1"), None);
    }
}

/// Comments on relations, as `obj_description(oid, 'pg_class')` answers them (psql's
/// `\d+`, `\dt+`): a source's or stream's comment is the statement that created it.
#[derive(Debug, Default)]
pub struct Comments {
    /// Relation name → comment.
    by_name: std::sync::RwLock<std::collections::HashMap<String, String>>,
    /// `pg_class` oid → relation name, as learnt from the catalog ([`Comments::learn`]).
    names: std::sync::RwLock<std::collections::HashMap<i64, String>>,
}

impl Comments {
    /// Sets `name`'s comment.
    pub fn set(&self, name: &str, comment: &str) {
        write(&self.by_name).insert(name.to_string(), comment.to_string());
    }

    /// Forgets `name`'s comment.
    pub fn remove(&self, name: &str) {
        write(&self.by_name).remove(name);
        write(&self.names).retain(|_, n| n != name);
    }

    /// Learns the oids `pg_class` gives relations: (oid, name) pairs.
    pub fn learn(&self, pairs: impl IntoIterator<Item = (i64, String)>) {
        let mut names = write(&self.names);
        for (oid, name) in pairs {
            names.insert(oid, name);
        }
    }

    fn of(&self, oid: i64) -> Option<String> {
        let name = read(&self.names).get(&oid)?.clone();
        read(&self.by_name).get(&name).cloned()
    }
}

fn read<T>(l: &std::sync::RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(l: &std::sync::RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

/// `obj_description(oid[, catalog])`: the comment of a relation (`pg_class`, the default
/// catalog) from [`Comments`]; NULL for other objects and relations without one.
#[derive(Debug)]
struct ObjDescription {
    comments: std::sync::Arc<Comments>,
    signature: datafusion::logical_expr::Signature,
}

impl PartialEq for ObjDescription {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.comments, &other.comments)
    }
}

impl Eq for ObjDescription {}

impl std::hash::Hash for ObjDescription {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        std::sync::Arc::as_ptr(&self.comments).hash(state);
    }
}

impl datafusion::logical_expr::ScalarUDFImpl for ObjDescription {
    fn name(&self) -> &str {
        "obj_description"
    }

    fn signature(&self) -> &datafusion::logical_expr::Signature {
        &self.signature
    }

    fn return_type(
        &self,
        _args: &[arrow::datatypes::DataType],
    ) -> datafusion::error::Result<arrow::datatypes::DataType> {
        Ok(arrow::datatypes::DataType::Utf8)
    }

    fn invoke_with_args(
        &self,
        args: datafusion::logical_expr::ScalarFunctionArgs,
    ) -> datafusion::error::Result<datafusion::logical_expr::ColumnarValue> {
        use arrow::array::{Array, AsArray};
        use datafusion::logical_expr::ColumnarValue;
        let n = args.number_rows;
        let mut arrays = ColumnarValue::values_to_arrays(&args.args)?.into_iter();
        let oids = arrow::compute::cast(
            &arrays.next().unwrap_or_else(|| {
                arrow::array::new_null_array(&arrow::datatypes::DataType::Int64, n)
            }),
            &arrow::datatypes::DataType::Int64,
        )?;
        let oids = oids.as_primitive::<arrow::datatypes::Int64Type>();
        let catalogs = arrays
            .next()
            .map(|c| arrow::compute::cast(&c, &arrow::datatypes::DataType::Utf8))
            .transpose()?;
        let out: arrow::array::StringArray = (0..oids.len())
            .map(|i| {
                let relation = catalogs.as_ref().is_none_or(|c| {
                    let c = c.as_string::<i32>();
                    c.is_valid(i) && c.value(i).eq_ignore_ascii_case("pg_class")
                });
                (relation && oids.is_valid(i))
                    .then(|| self.comments.of(oids.value(i)))
                    .flatten()
            })
            .collect();
        Ok(ColumnarValue::Array(std::sync::Arc::new(out)))
    }
}

/// `obj_description`, reading `comments`.
pub fn obj_description_function(
    comments: std::sync::Arc<Comments>,
) -> datafusion::logical_expr::ScalarUDF {
    datafusion::logical_expr::ScalarUDF::new_from_impl(ObjDescription {
        comments,
        signature: datafusion::logical_expr::Signature::variadic_any(
            datafusion::logical_expr::Volatility::Stable,
        ),
    })
}

/// Postgres functions clients call that have nothing to say in Sluice: comments on
/// columns and shared objects (`col_description`, `shobj_description`) are NULL, as for an
/// object without a comment.
#[derive(Debug, PartialEq, Eq, Hash)]
struct NoComment {
    name: &'static str,
    signature: datafusion::logical_expr::Signature,
}

impl datafusion::logical_expr::ScalarUDFImpl for NoComment {
    fn name(&self) -> &str {
        self.name
    }

    fn signature(&self) -> &datafusion::logical_expr::Signature {
        &self.signature
    }

    fn return_type(
        &self,
        _args: &[arrow::datatypes::DataType],
    ) -> datafusion::error::Result<arrow::datatypes::DataType> {
        Ok(arrow::datatypes::DataType::Utf8)
    }

    fn invoke_with_args(
        &self,
        _args: datafusion::logical_expr::ScalarFunctionArgs,
    ) -> datafusion::error::Result<datafusion::logical_expr::ColumnarValue> {
        Ok(datafusion::logical_expr::ColumnarValue::Scalar(
            datafusion::common::ScalarValue::Utf8(None),
        ))
    }
}

/// `col_description` and `shobj_description`, which answer NULL (no column or shared
/// object in Sluice has a comment), to register on a context.
pub fn comment_functions() -> Vec<datafusion::logical_expr::ScalarUDF> {
    ["col_description", "shobj_description"]
        .into_iter()
        .map(|name| {
            datafusion::logical_expr::ScalarUDF::new_from_impl(NoComment {
                name,
                signature: datafusion::logical_expr::Signature::variadic_any(
                    datafusion::logical_expr::Volatility::Stable,
                ),
            })
        })
        .collect()
}

/// What `version()` answers: a Postgres version string clients parse (SQLAlchemy, JDBC and
/// Metabase read the major version from it), naming Sluice and DataFusion too.
pub fn version_string() -> String {
    format!(
        "PostgreSQL {} on {}-{} (Sluice {}, Apache DataFusion {})",
        crate::session::SERVER_SETTINGS
            .iter()
            .find(|(n, _)| *n == "server_version")
            .map_or("16", |(_, v)| v),
        std::env::consts::ARCH,
        std::env::consts::OS,
        env!("CARGO_PKG_VERSION"),
        datafusion::DATAFUSION_VERSION,
    )
}

/// `version()`, as [`version_string`] (DataFusion's own says only "Apache DataFusion …").
pub fn version_function() -> datafusion::logical_expr::ScalarUDF {
    let version = version_string();
    datafusion::logical_expr::create_udf(
        "version",
        vec![],
        arrow::datatypes::DataType::Utf8,
        datafusion::logical_expr::Volatility::Immutable,
        std::sync::Arc::new(move |_| {
            Ok(datafusion::logical_expr::ColumnarValue::Scalar(
                datafusion::common::ScalarValue::Utf8(Some(version.clone())),
            ))
        }),
    )
}

/// The oids of Postgres' built-in types clients look up by name (`to_regtype`).
const TYPE_OIDS: &[(&str, i32)] = &[
    ("bool", 16),
    ("bytea", 17),
    ("int8", 20),
    ("int2", 21),
    ("int4", 23),
    ("text", 25),
    ("oid", 26),
    ("json", 114),
    ("float4", 700),
    ("float8", 701),
    ("varchar", 1043),
    ("date", 1082),
    ("time", 1083),
    ("timestamp", 1114),
    ("timestamptz", 1184),
    ("interval", 1186),
    ("numeric", 1700),
    ("uuid", 2950),
    ("jsonb", 3802),
];

/// `to_regtype(name)`: the oid of a built-in type, NULL for a type Sluice does not have
/// (what psycopg's `TypeInfo.fetch` — SQLAlchemy asks for `hstore` at connect — expects).
pub fn to_regtype_function() -> datafusion::logical_expr::ScalarUDF {
    use arrow::array::{Array, AsArray, Int32Array};
    use datafusion::logical_expr::ColumnarValue;
    datafusion::logical_expr::create_udf(
        "to_regtype",
        vec![arrow::datatypes::DataType::Utf8],
        arrow::datatypes::DataType::Int32,
        datafusion::logical_expr::Volatility::Stable,
        std::sync::Arc::new(|args: &[ColumnarValue]| {
            let names = args[0].to_array(1)?;
            let names = names.as_string::<i32>();
            let oid = |name: &str| {
                let name = name.rsplit('.').next().unwrap_or(name).trim_matches('"');
                TYPE_OIDS
                    .iter()
                    .find(|(n, _)| n.eq_ignore_ascii_case(name))
                    .map(|(_, o)| *o)
            };
            let oids: Int32Array = (0..names.len())
                .map(|i| (!names.is_null(i)).then(|| oid(names.value(i))).flatten())
                .collect();
            Ok(ColumnarValue::Array(std::sync::Arc::new(oids)))
        }),
    )
}

/// `pg_type_is_visible(oid)`: true — every type Sluice has is in `pg_catalog`, which is
/// always on the search path (SQLAlchemy's inspector asks when it reads columns).
pub fn pg_type_is_visible_function() -> datafusion::logical_expr::ScalarUDF {
    use arrow::array::{Array, BooleanArray};
    use datafusion::logical_expr::ColumnarValue;
    datafusion::logical_expr::create_udf(
        "pg_type_is_visible",
        vec![arrow::datatypes::DataType::Int32],
        arrow::datatypes::DataType::Boolean,
        datafusion::logical_expr::Volatility::Stable,
        std::sync::Arc::new(|args: &[ColumnarValue]| {
            let oids = match &args[0] {
                ColumnarValue::Scalar(v) => {
                    return Ok(ColumnarValue::Scalar(
                        datafusion::common::ScalarValue::Boolean((!v.is_null()).then_some(true)),
                    ));
                }
                ColumnarValue::Array(a) => a,
            };
            let visible: BooleanArray = (0..oids.len())
                .map(|i| (!oids.is_null(i)).then_some(true))
                .collect();
            Ok(ColumnarValue::Array(std::sync::Arc::new(visible)))
        }),
    )
}

/// `pg_size_pretty(bigint)`: a size in bytes as Postgres writes it (`8192 bytes`, `16 kB`,
/// `3 MB`: below ten units stay in the smaller unit, halves round away from zero).
pub fn pg_size_pretty_function() -> datafusion::logical_expr::ScalarUDF {
    use arrow::array::{Array, AsArray, StringArray};
    use datafusion::logical_expr::ColumnarValue;
    datafusion::logical_expr::create_udf(
        "pg_size_pretty",
        vec![arrow::datatypes::DataType::Int64],
        arrow::datatypes::DataType::Utf8,
        datafusion::logical_expr::Volatility::Immutable,
        std::sync::Arc::new(|args: &[ColumnarValue]| {
            use datafusion::common::ScalarValue;
            let sizes = match &args[0] {
                // A constant (`pg_table_size` answers one): one answer for every row.
                ColumnarValue::Scalar(v) => {
                    let size = match v.cast_to(&arrow::datatypes::DataType::Int64)? {
                        ScalarValue::Int64(n) => n,
                        _ => None,
                    };
                    return Ok(ColumnarValue::Scalar(ScalarValue::Utf8(
                        size.map(size_pretty),
                    )));
                }
                ColumnarValue::Array(a) => a,
            };
            let sizes = sizes.as_primitive::<arrow::datatypes::Int64Type>();
            let out: StringArray = (0..sizes.len())
                .map(|i| sizes.is_valid(i).then(|| size_pretty(sizes.value(i))))
                .collect();
            Ok(ColumnarValue::Array(std::sync::Arc::new(out)))
        }),
    )
}

/// Postgres' `pg_size_pretty` of `size` bytes.
fn size_pretty(size: i64) -> String {
    const LIMIT: i64 = 10 * 1024;
    const LIMIT2: i64 = LIMIT * 2 - 1;
    let half_rounded = |x: i64| (x + if x < 0 { -1 } else { 1 }) / 2;
    if size.abs() < LIMIT {
        return format!("{size} bytes");
    }
    // One extra bit is kept for the rounding.
    let mut s = size >> 9;
    for unit in ["kB", "MB", "GB", "TB"] {
        if s.abs() < LIMIT2 {
            return format!("{} {unit}", half_rounded(s));
        }
        s >>= 10;
    }
    format!("{} PB", half_rounded(s))
}

/// `pg_table_size(oid)` and `pg_total_relation_size(oid)`: NULL — a stream's size is the
/// size of its files in the lake, which this does not list (psql's `\dt+` shows no size).
pub fn relation_size_functions() -> Vec<datafusion::logical_expr::ScalarUDF> {
    use datafusion::logical_expr::ColumnarValue;
    [
        "pg_table_size",
        "pg_total_relation_size",
        "pg_relation_size",
    ]
    .into_iter()
    .map(|name| {
        datafusion::logical_expr::create_udf(
            name,
            vec![arrow::datatypes::DataType::Int64],
            arrow::datatypes::DataType::Int64,
            datafusion::logical_expr::Volatility::Stable,
            std::sync::Arc::new(|_args: &[ColumnarValue]| {
                Ok(ColumnarValue::Scalar(
                    datafusion::common::ScalarValue::Int64(None),
                ))
            }),
        )
    })
    .collect()
}

#[cfg(test)]
mod size_tests {
    #[test]
    fn sizes_read_as_postgres_writes_them() {
        for (size, text) in [
            (0, "0 bytes"),
            (10239, "10239 bytes"),
            (10240, "10 kB"),
            (10_484_735, "10239 kB"),
            (10_485_759, "10 MB"),
            (10_485_760, "10 MB"),
            (1_610_612_736, "1536 MB"),
            (-20_480, "-20 kB"),
        ] {
            assert_eq!(super::size_pretty(size), text, "{size}");
        }
    }
}
