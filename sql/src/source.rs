//! `CREATE SOURCE` → a validated [`SourceDef`].

use arrow::datatypes::{DataType, SchemaRef};
use datafusion::sql::sqlparser::ast::{BinaryOperator, Expr, Value};
use std::sync::Arc;

use sluice_engine::WithOptions;
use sluice_engine::connector::{ConnectorRegistry, SourceSpec};
use sluice_engine::options::parse_duration;
use sluice_engine::source::WatermarkSpec;

use crate::error::{Result, SqlError};
use crate::parser::{CreateSource, ident};
use crate::types::source_schema;

/// A validated source: its schema, event time and connector configuration.
#[derive(Debug, Clone)]
pub struct SourceDef {
    /// The statement, as given (re-run on restart).
    pub create: CreateSource,
    /// The source's name.
    pub name: String,
    /// The rows it produces.
    pub schema: SchemaRef,
    /// Its declared watermark, if any.
    pub watermark: Option<WatermarkSpec>,
    /// The connector and its options.
    pub config: Arc<dyn SourceSpec>,
}

/// Validates a `CREATE SOURCE`: the columns, the watermark and the connector options (by
/// the connector `connectors` names).
pub fn source_def(stmt: &CreateSource, connectors: &ConnectorRegistry) -> Result<SourceDef> {
    let owner = format!("source `{}`", stmt.name);
    if stmt.columns.is_empty() {
        return Err(SqlError::Invalid(format!(
            "{owner}: declare at least one column"
        )));
    }
    let schema = source_schema(&owner, &stmt.columns)?;
    for k in &stmt.primary_key {
        if schema.index_of(k).is_err() {
            return Err(SqlError::Invalid(format!(
                "{owner}: PRIMARY KEY names `{k}`, which is not one of its columns"
            )));
        }
    }
    let watermark = match &stmt.watermark {
        None => None,
        Some((col, expr)) => {
            let field = schema.field_with_name(col).map_err(|_| {
                SqlError::Invalid(format!(
                    "{owner}: WATERMARK FOR `{col}`: the source has no column `{col}`"
                ))
            })?;
            if !matches!(field.data_type(), DataType::Timestamp(..)) {
                return Err(SqlError::Invalid(format!(
                    "{owner}: WATERMARK FOR `{col}`: the column must be a TIMESTAMP, not {}",
                    field.data_type()
                )));
            }
            let delay_micros = watermark_delay(&owner, col, expr)?;
            Some(WatermarkSpec {
                column: col.clone(),
                delay_micros,
                idle_timeout: None,
            })
        }
    };
    let mut opts = WithOptions::new(owner.clone(), stmt.options.iter().cloned());
    let idle_timeout = opts.take_duration("idle_timeout")?;
    let watermark = match (watermark, idle_timeout) {
        (Some(w), Some(d)) if !d.is_zero() => Some(WatermarkSpec {
            idle_timeout: Some(d),
            ..w
        }),
        (Some(_), Some(_)) => {
            return Err(opts.bad("idle_timeout", "0", "a positive duration").into());
        }
        (None, Some(_)) => {
            return Err(SqlError::InvalidOption(format!(
                "{owner}: option `idle_timeout` applies to sources with a WATERMARK"
            )));
        }
        (w, None) => w,
    };
    let config = connectors.source(opts, &schema)?;
    Ok(SourceDef {
        create: stmt.clone(),
        name: stmt.name.clone(),
        schema,
        watermark,
        config,
    })
}

/// The delay of `WATERMARK FOR col AS col [- INTERVAL '…']`, in microseconds.
fn watermark_delay(owner: &str, col: &str, expr: &Expr) -> Result<i64> {
    let unsupported = || {
        SqlError::NotSupported(format!(
            "{owner}: WATERMARK FOR `{col}` AS {expr}: the expression must be `{col}` or `{col} - INTERVAL '<duration>'`"
        ))
    };
    let is_col = |e: &Expr| matches!(e, Expr::Identifier(i) if ident(i) == col);
    if is_col(expr) {
        return Ok(0);
    }
    let Expr::BinaryOp {
        left,
        op: BinaryOperator::Minus,
        right,
    } = expr
    else {
        return Err(unsupported());
    };
    if !is_col(left) {
        return Err(unsupported());
    }
    let Expr::Interval(interval) = right.as_ref() else {
        return Err(unsupported());
    };
    let text = match interval.value.as_ref() {
        Expr::Value(v) => match &v.value {
            Value::SingleQuotedString(s) => s.clone(),
            Value::Number(n, _) => n.clone(),
            _ => return Err(unsupported()),
        },
        _ => return Err(unsupported()),
    };
    let text = match &interval.leading_field {
        Some(unit) => format!("{text} {unit}"),
        None => text,
    };
    let d = parse_duration(&text).ok_or_else(|| {
        SqlError::Invalid(format!(
            "{owner}: WATERMARK FOR `{col}`: cannot read the interval '{text}' (write e.g. INTERVAL '5 seconds')"
        ))
    })?;
    Ok(d.as_micros() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parser::{SluiceStatement, parse_sql};

    fn def(sql: &str) -> Result<SourceDef> {
        let SluiceStatement::CreateSource(c) = parse_sql(sql).unwrap().remove(0) else {
            panic!()
        };
        let lake = tempfile::tempdir().unwrap();
        let lake = sluice_connectors::lake::Lake::open(lake.path().to_str().unwrap()).unwrap();
        source_def(&c, &sluice_connectors::registry(&lake))
    }

    #[test]
    fn schema_and_watermark() {
        let d = def(
            "CREATE SOURCE clicks (user_id BIGINT NOT NULL, url TEXT, ts TIMESTAMP NOT NULL, \
             WATERMARK FOR ts AS ts - INTERVAL '2 seconds') WITH (connector = 'datagen')",
        )
        .unwrap();
        assert_eq!(
            d.schema.to_string(),
            "Field { \"user_id\": Int64 }, Field { \"url\": nullable Utf8 }, Field { \"ts\": Timestamp(µs, \"UTC\") }"
        );
        assert_eq!(d.watermark.unwrap().delay_micros, 2_000_000);
        let flink = def("CREATE SOURCE o (ts TIMESTAMP(3) NOT NULL, WATERMARK FOR ts AS ts - INTERVAL '5' SECOND) \
             WITH (connector = 'http')")
        .unwrap();
        assert_eq!(flink.watermark.unwrap().delay_micros, 5_000_000);
    }

    #[test]
    fn errors_name_the_problem() {
        let e = def("CREATE SOURCE o (a TEXT) WITH (connector = 'htp')").unwrap_err();
        assert_eq!(e.sqlstate(), "22023");
        // (Which connectors follow depends on the connectors crate's features.)
        assert!(
            e.to_string()
                .starts_with("source `o`: connector `htp` is not known (available: datagen, http"),
            "{e}"
        );
        let e = def("CREATE SOURCE o (a TEXT, WATERMARK FOR a AS a) WITH (connector = 'http')")
            .unwrap_err();
        assert!(e.to_string().contains("must be a TIMESTAMP"), "{e}");
        let e = def("CREATE SOURCE o (a FOO) WITH (connector = 'http')").unwrap_err();
        assert_eq!(e.sqlstate(), "42704", "{e}");
    }
}
