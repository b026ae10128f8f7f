//! Column types of `CREATE SOURCE`: SQL type names → Arrow types.
//!
//! DataFusion's own mapping (`SqlToRel::build_schema`) decides what a type name means, so
//! every type DataFusion knows is accepted with its usual meaning. The result is then
//! normalised to what Sluice stores: every timestamp is `Timestamp(Microsecond, "UTC")`
//! (Athena-readable Parquet, no nanoseconds) and strings are `Utf8`.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::common::TableReference;
use datafusion::config::ConfigOptions;
use datafusion::error::DataFusionError;
use datafusion::logical_expr::planner::ContextProvider;
use datafusion::logical_expr::{AggregateUDF, ScalarUDF, TableSource, WindowUDF};
use datafusion::sql::planner::SqlToRel;
use datafusion::sql::sqlparser::ast::{ColumnDef, ColumnOption};

use crate::error::{Result, SqlError};

/// Builds the Arrow schema of a source from its column definitions.
pub fn source_schema(owner: &str, columns: &[ColumnDef]) -> Result<SchemaRef> {
    for c in columns {
        for o in &c.options {
            if !matches!(o.option, ColumnOption::Null | ColumnOption::NotNull) {
                return Err(SqlError::NotSupported(format!(
                    "{owner}: column `{}`: `{}` is not supported on a source column (only NULL / NOT NULL)",
                    c.name, o.option
                )));
            }
        }
    }
    let provider = NoTables(ConfigOptions::default());
    let planner = SqlToRel::new(&provider);
    let schema = planner
        .build_schema(columns.to_vec())
        .map_err(|e| match e.find_root() {
            DataFusionError::NotImplemented(m) | DataFusionError::Plan(m) => {
                SqlError::UndefinedType(format!("{owner}: {m}"))
            }
            _ => SqlError::from(e),
        })?;
    let mut seen = std::collections::HashSet::new();
    for f in schema.fields() {
        if !seen.insert(f.name().clone()) {
            return Err(SqlError::Invalid(format!(
                "{owner}: column `{}` is declared twice",
                f.name()
            )));
        }
    }
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .map(|f| {
            let f = f.as_ref().clone();
            let t = storage_type(f.data_type());
            f.with_data_type(t)
        })
        .collect();
    Ok(Arc::new(Schema::new(fields)))
}

/// The type Sluice stores for a declared type.
pub fn storage_type(t: &DataType) -> DataType {
    match t {
        DataType::Timestamp(_, _) => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        DataType::Utf8View | DataType::LargeUtf8 => DataType::Utf8,
        DataType::BinaryView | DataType::LargeBinary => DataType::Binary,
        other => other.clone(),
    }
}

/// A context with no tables and no functions: enough to map type names.
struct NoTables(ConfigOptions);

impl ContextProvider for NoTables {
    fn get_table_source(
        &self,
        name: TableReference,
    ) -> datafusion::error::Result<Arc<dyn TableSource>> {
        Err(DataFusionError::Plan(format!("table `{name}` not found")))
    }
    fn get_function_meta(&self, _: &str) -> Option<Arc<ScalarUDF>> {
        None
    }
    fn get_higher_order_meta(
        &self,
        _: &str,
    ) -> Option<Arc<datafusion::logical_expr::HigherOrderUDF>> {
        None
    }
    fn get_aggregate_meta(&self, _: &str) -> Option<Arc<AggregateUDF>> {
        None
    }
    fn get_window_meta(&self, _: &str) -> Option<Arc<WindowUDF>> {
        None
    }
    fn get_variable_type(&self, _: &[String]) -> Option<DataType> {
        None
    }
    fn options(&self) -> &ConfigOptions {
        &self.0
    }
    fn udf_names(&self) -> Vec<String> {
        vec![]
    }
    fn higher_order_function_names(&self) -> Vec<String> {
        vec![]
    }
    fn udaf_names(&self) -> Vec<String> {
        vec![]
    }
    fn udwf_names(&self) -> Vec<String> {
        vec![]
    }
}
