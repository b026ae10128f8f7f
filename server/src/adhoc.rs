//! Ad-hoc queries: DataFusion over the Parquet files that streams landed in the lake.
//!
//! Each stream is a `ListingTable` over `processed/<stream>/` with the Hive partition
//! columns `dt` and `hour` (strings, pruned by DataFusion) — the very files and layout
//! Athena reads. Sources have no stored rows; they are registered as tables that explain
//! this when scanned, so `SELECT … FROM a_source` gets a useful error instead of "not found".

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::AsArray;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use async_trait::async_trait;
use datafusion::catalog::Session;
use datafusion::common::TableReference;
use datafusion::datasource::TableProvider;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::error::DataFusionError;
use datafusion::execution::cache::cache_manager::CacheManagerConfig;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::logical_expr::{Expr, LogicalPlan, TableType};
use datafusion::physical_plan::{ExecutionPlan, SendableRecordBatchStream};
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion::sql::parser::Statement as DFStatement;
use datafusion_pg_catalog::pg_catalog::context::EmptyContextProvider;
use sluice_connectors::lake::{Lake, Zone, lake_schema};

use crate::error::Result;
use crate::query_runtime;

/// The schema of Sluice's own relations (`sluice.streams`, …).
pub const SYSTEM_SCHEMA: &str = "sluice";

/// The partition columns every stream's table has.
pub const PARTITION_COLUMNS: [&str; 2] = ["dt", "hour"];

/// The DataFusion context ad-hoc queries run in.
#[derive(Clone)]
pub struct AdHoc {
    ctx: SessionContext,
    lake: Lake,
    /// Relations' comments (their `CREATE` statements) for `obj_description`.
    comments: Arc<crate::pg_compat::Comments>,
    /// What each registered name is: `source` or `stream` (for privilege checks).
    kinds: Arc<std::sync::RwLock<BTreeMap<String, &'static str>>>,
}

impl std::fmt::Debug for AdHoc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdHoc")
            .field("lake", &self.lake.location())
            .finish()
    }
}

impl AdHoc {
    /// A context reading `lake`.
    pub fn new(lake: Lake) -> Self {
        let config = SessionConfig::new()
            .with_information_schema(true)
            .with_default_catalog_and_schema("sluice", "public");
        // DataFusion caches file listings forever by default; streams add files all the
        // time, so every query lists afresh. (Invalidating on each file commit would keep a
        // cache correct; worth it once listing cost shows on S3.)
        let cache = CacheManagerConfig::default().with_list_files_cache_limit(0);
        let runtime = RuntimeEnvBuilder::new()
            .with_cache_manager(cache)
            .with_memory_pool(query_runtime::memory_pool())
            .build_arc()
            .expect("a runtime environment with default settings builds");
        let ctx = SessionContext::new_with_config_rt(config, runtime);
        ctx.register_relation_planner(Arc::new(sluice_sql::window::WindowTablePlanner::default()))
            .expect("registering a relation planner on a new context cannot fail");
        ctx.register_object_store(lake.store_url(), lake.store());
        // `pg_catalog` (pg_class, pg_attribute, pg_namespace, …, read from this context's
        // catalog, so streams and sources appear as they are registered) and the functions
        // Postgres clients call when they connect.
        datafusion_pg_catalog::setup_pg_catalog(&ctx, "sluice", EmptyContextProvider)
            .expect("pg_catalog installs on a new context");
        for f in crate::pg_compat::comment_functions() {
            ctx.register_udf(f);
        }
        let comments: Arc<crate::pg_compat::Comments> = Arc::default();
        ctx.register_udf(crate::pg_compat::obj_description_function(Arc::clone(
            &comments,
        )));
        ctx.register_udf(crate::pg_compat::version_function());
        ctx.register_udf(crate::pg_compat::to_regtype_function());
        ctx.register_udf(crate::pg_compat::pg_type_is_visible_function());
        ctx.register_udf(crate::pg_compat::pg_size_pretty_function());
        for f in crate::pg_compat::relation_size_functions() {
            ctx.register_udf(f);
        }
        Self {
            ctx,
            lake,
            comments,
            kinds: Arc::default(),
        }
    }

    /// `source` or `stream`, if `name` is one of those registered here.
    pub fn kind(&self, name: &str) -> Option<&'static str> {
        self.kinds
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .copied()
    }

    fn set_kind(&self, name: &str, kind: Option<&'static str>) {
        let mut kinds = self.kinds.write().unwrap_or_else(|e| e.into_inner());
        match kind {
            Some(k) => kinds.insert(name.to_string(), k),
            None => kinds.remove(name),
        };
    }

    /// Sets the comment of relation `name` (a source's or stream's `CREATE` statement, which
    /// `obj_description(oid, 'pg_class')` then answers), once it is registered.
    pub async fn comment(&self, name: &str, comment: &str) {
        self.comments.set(name, comment);
        // The oid `pg_catalog` gives it (it keeps an oid once given).
        let sql = "SELECT c.oid, c.relname FROM pg_catalog.pg_class c \
                   JOIN pg_catalog.pg_namespace n ON c.relnamespace = n.oid \
                   WHERE n.nspname = 'public'";
        let found = async {
            let batches = self.ctx.sql(sql).await?.collect().await?;
            let mut pairs = vec![];
            for b in batches {
                let oids = arrow::compute::cast(b.column(0), &DataType::Int64)?;
                let oids = oids.as_primitive::<arrow::datatypes::Int64Type>();
                let names = arrow::compute::cast(b.column(1), &DataType::Utf8)?;
                let names = names.as_string::<i32>();
                for i in 0..b.num_rows() {
                    pairs.push((oids.value(i), names.value(i).to_string()));
                }
            }
            Ok::<_, DataFusionError>(pairs)
        };
        match found.await {
            Ok(pairs) => self.comments.learn(pairs),
            Err(e) => tracing::warn!(relation = name, "cannot read pg_class for comments: {e}"),
        }
    }

    /// Checks that `user` may read every source and stream `stmt` reads (wherever it
    /// reads them: joins, subqueries, `EXPLAIN`, `COPY (…)`), and puts the user's row
    /// policies on them.
    pub fn guard(
        &self,
        access: &crate::access::AccessControl,
        user: &str,
        stmt: &mut DFStatement,
    ) -> Result<()> {
        use sluice_sql::access::{Privilege, relations_read, restrict};
        match stmt {
            DFStatement::Statement(s) => {
                let s = s.as_mut();
                let mut filters = BTreeMap::new();
                for name in relations_read(s) {
                    let Some(kind) = self.kind(&name) else {
                        continue; // not a source or stream: planning says what it is
                    };
                    access.require(user, Privilege::Select, Some((kind, &name)))?;
                    if let Some(f) = access.row_filter(user, &name)? {
                        filters.insert(name, f);
                    }
                }
                if !filters.is_empty() && restrict(s, &filters).is_none() {
                    return Err(crate::ServerError::PermissionDenied(format!(
                        "a row policy of user \"{user}\" cannot be applied to this query"
                    )));
                }
                Ok(())
            }
            DFStatement::Explain(e) => self.guard(access, user, &mut e.statement),
            // Refused before they run (ad-hoc statements are queries).
            _ => Ok(()),
        }
    }

    /// Makes stream `name` (rows of `schema`) queryable.
    pub fn register_stream(&self, name: &str, schema: &Schema) -> Result<()> {
        let url = ListingTableUrl::parse(self.lake.dir_url(Zone::Processed, name))?;
        let options = ListingOptions::new(Arc::new(ParquetFormat::default()))
            .with_file_extension(".parquet")
            .with_table_partition_cols(
                PARTITION_COLUMNS
                    .iter()
                    .map(|c| (c.to_string(), DataType::Utf8))
                    .collect(),
            );
        let config = ListingTableConfig::new(url)
            .with_listing_options(options)
            .with_schema(lake_schema(schema));
        let table = ListingTable::try_new(config)?;
        self.ctx
            .register_table(TableReference::bare(name), Arc::new(table))?;
        self.set_kind(name, Some("stream"));
        Ok(())
    }

    /// Registers system relation `sluice.<name>` (see [`crate::system`]).
    pub fn register_system(&self, name: &str, table: crate::system::SystemTable) -> Result<()> {
        let catalog = self
            .ctx
            .catalog("sluice")
            .ok_or_else(|| DataFusionError::Plan("catalog `sluice` is missing".into()))?;
        if catalog.schema(SYSTEM_SCHEMA).is_none() {
            catalog.register_schema(
                SYSTEM_SCHEMA,
                Arc::new(datafusion::catalog::MemorySchemaProvider::new()),
            )?;
        }
        self.ctx.register_table(
            TableReference::partial(SYSTEM_SCHEMA, name),
            Arc::new(table),
        )?;
        Ok(())
    }

    /// Registers source `name` as a table that explains it holds no rows.
    pub fn register_source(&self, name: &str, schema: SchemaRef) -> Result<()> {
        self.ctx.register_table(
            TableReference::bare(name),
            Arc::new(UnboundedSource {
                name: name.to_string(),
                schema,
            }),
        )?;
        self.set_kind(name, Some("source"));
        Ok(())
    }

    /// Forgets a source or stream.
    pub fn deregister(&self, name: &str) -> Result<()> {
        self.comments.remove(name);
        self.set_kind(name, None);
        self.ctx.deregister_table(TableReference::bare(name))?;
        Ok(())
    }

    /// The shared DataFusion options (a copy).
    pub fn options(&self) -> datafusion::config::ConfigOptions {
        self.ctx.state().config_options().as_ref().clone()
    }

    /// A context for one query: the shared one, with a session's `datafusion.*` `options`
    /// applied to a copy of its settings (the tables are shared).
    fn session_ctx(&self, options: &BTreeMap<String, String>) -> Result<SessionContext> {
        if options.is_empty() {
            return Ok(self.ctx.clone());
        }
        let mut state = self.ctx.state();
        for (k, v) in options {
            state.config_mut().options_mut().set(k, v)?;
        }
        Ok(SessionContext::new_with_state(state))
    }

    /// Plans a statement (without running it) with a session's `options`, on the query
    /// runtime.
    pub async fn plan(
        &self,
        stmt: DFStatement,
        options: &BTreeMap<String, String>,
    ) -> Result<LogicalPlan> {
        let state = self.session_ctx(options)?.state();
        query_runtime::run(async move { Ok(state.statement_to_plan(stmt).await?) }).await
    }

    /// Starts a planned statement on the query runtime; its rows come as a stream of
    /// batches, so a large result never sits in memory whole. Dropping the stream stops it.
    ///
    /// A query that fails before its first row because a file it listed is gone — a
    /// compaction replaced the partition's files meanwhile — runs again (up to
    /// [`MISSING_FILE_RETRIES`] times): it then lists the new files. (Once rows have gone
    /// to the client, such a failure reaches it.)
    pub async fn run(
        &self,
        plan: LogicalPlan,
        options: &BTreeMap<String, String>,
    ) -> Result<(SchemaRef, SendableRecordBatchStream)> {
        use futures::StreamExt;
        let mut attempt = 0;
        loop {
            let ctx = self.session_ctx(options)?;
            let plan = plan.clone();
            let (schema, mut rows) = query_runtime::run(async move {
                let df = ctx.execute_logical_plan(plan).await?;
                let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
                let stream = df.execute_stream().await?;
                Ok((schema, query_runtime::forward(stream)))
            })
            .await?;
            let first = rows.next().await;
            if let Some(Err(e)) = &first
                && attempt < MISSING_FILE_RETRIES
                && is_missing_file(e)
            {
                attempt += 1;
                tracing::debug!(
                    attempt,
                    "a file the query listed is gone (compacted): running it again: {e}"
                );
                continue;
            }
            let rows = futures::stream::iter(first).chain(rows);
            return Ok((
                Arc::clone(&schema),
                Box::pin(
                    datafusion::physical_plan::stream::RecordBatchStreamAdapter::new(schema, rows),
                ),
            ));
        }
    }
}

/// How often a query is run again when a file it listed was gone before its first row.
pub const MISSING_FILE_RETRIES: usize = 3;

/// Whether `e` says an object the query listed does not exist (anywhere in its chain).
fn is_missing_file(e: &DataFusionError) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(object_store::Error::NotFound { .. }) = c.downcast_ref::<object_store::Error>()
        {
            return true;
        }
        if let Some(DataFusionError::ObjectStore(inner)) = c.downcast_ref::<DataFusionError>()
            && matches!(**inner, object_store::Error::NotFound { .. })
        {
            return true;
        }
        cause = c.source();
    }
    // Errors that keep only the message of what they wrap (Parquet's, Arrow's).
    let text = e.to_string();
    text.contains("Object at location") && text.contains("not found")
}

/// A source seen from an ad-hoc query: it has a schema but no stored rows.
#[derive(Debug)]
struct UnboundedSource {
    name: String,
    schema: SchemaRef,
}

#[async_trait]
impl TableProvider for UnboundedSource {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        _projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        Err(DataFusionError::NotImplemented(format!(
            "`{0}` is a source: its rows are not stored, so it cannot be queried ad hoc. \
             Query a stream that reads it, e.g. CREATE STREAM {0}_all AS SELECT * FROM {0}",
            self.name
        )))
    }
}

/// The schema a stream's ad-hoc table has: its columns, then `dt` and `hour`.
pub fn queryable_schema(schema: &Schema) -> Schema {
    let mut fields: Vec<Field> = lake_schema(schema)
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    for c in PARTITION_COLUMNS {
        fields.push(Field::new(c, DataType::Utf8, false));
    }
    Schema::new(fields)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gone() -> object_store::Error {
        object_store::Error::NotFound {
            path: "processed/s/dt=2024-05-01/hour=07/1.parquet".into(),
            source: "404".into(),
        }
    }

    #[test]
    fn a_file_gone_is_told_apart_however_it_is_wrapped() {
        assert!(is_missing_file(&DataFusionError::ObjectStore(Box::new(
            gone()
        ))));
        let parquet = parquet::errors::ParquetError::External(Box::new(gone()));
        assert!(is_missing_file(&DataFusionError::External(Box::new(
            parquet
        ))));
        let arrow = arrow::error::ArrowError::ExternalError(Box::new(gone()));
        assert!(is_missing_file(
            &DataFusionError::ArrowError(Box::new(arrow), None).context("scanning")
        ));
        assert!(!is_missing_file(&DataFusionError::Plan(
            "no such table".into()
        )));
        let denied = object_store::Error::PermissionDenied {
            path: "x".into(),
            source: "403".into(),
        };
        assert!(!is_missing_file(&DataFusionError::ObjectStore(Box::new(
            denied
        ))));
    }
}
