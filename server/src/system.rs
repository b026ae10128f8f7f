//! Sluice's own state as relations: `sluice.sources`, `sluice.streams` and `sluice.sinks`
//! hold what `SHOW SOURCES/STREAMS/SINKS` show, computed when a query scans them, so a
//! Grafana panel or any client can filter, join and chart them with SQL.

use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use datafusion::catalog::Session;
use datafusion::datasource::TableProvider;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::error::DataFusionError;
use datafusion::logical_expr::{Expr, TableType};
use datafusion::physical_plan::ExecutionPlan;
use futures::future::BoxFuture;

/// Computes a system relation's rows.
pub type Rows = Arc<dyn Fn() -> BoxFuture<'static, crate::Result<RecordBatch>> + Send + Sync>;

/// One system relation.
pub struct SystemTable {
    schema: SchemaRef,
    rows: Rows,
}

impl SystemTable {
    /// A relation of `schema` whose rows `rows` computes at each scan.
    pub fn new(schema: SchemaRef, rows: Rows) -> Self {
        Self { schema, rows }
    }
}

impl std::fmt::Debug for SystemTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SystemTable")
            .field("columns", &self.schema.fields().len())
            .finish()
    }
}

#[async_trait]
impl TableProvider for SystemTable {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::View
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        let batch = (self.rows)()
            .await
            .map_err(|e| DataFusionError::External(Box::new(e)))?;
        Ok(MemorySourceConfig::try_new_exec(
            &[vec![batch]],
            Arc::clone(&self.schema),
            projection.cloned(),
        )?)
    }
}
