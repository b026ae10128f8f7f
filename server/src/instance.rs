//! [`Sluice`]: one server instance — its lake, catalog, running pipelines — and the
//! execution of every statement a client sends.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use datafusion::common::ParamValues;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::logical_expr::LogicalPlan;
use datafusion::physical_plan::SendableRecordBatchStream;
use datafusion::sql::parser::Statement as DFStatement;
use datafusion::sql::sqlparser::ast::{Expr as SqlExpr, Set, SetExpr, Statement, Value};
use sluice_connectors::lake::{Lake, Zone, athena_ddl, lake_schema, today};
use sluice_engine::checkpoint::{Coordinator, Fence, NoFence};
use sluice_engine::connector::ConnectorRegistry;
use sluice_engine::push::PushSource;
use sluice_sql::access::{AccessStatement, Privilege};
use sluice_sql::parser::{CreateSink, CreateSource, CreateStream};
use sluice_sql::{ObjectKind, Relation, SluiceStatement, SqlError, parse_sql, source_def};
use tokio_util::sync::CancellationToken;

use crate::access::AccessControl;
use crate::adhoc::{AdHoc, PARTITION_COLUMNS};
use crate::catalog::{self, Entry};
use crate::error::{Result, ServerError};
use crate::lease::WriterLease;
use crate::query_runtime;
use crate::runtime::{
    Input, RunningSink, RunningSource, RunningStream, start_sink, start_source, start_stream,
};
use crate::session::Session;
use crate::show;

/// How long `DROP` waits for a pipeline to flush and stop.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// How often streams checkpoint unless they say otherwise (`checkpoint_interval`).
pub const DEFAULT_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(10);

/// What one statement returned.
pub enum Outcome {
    /// A command completed; the tag is what Postgres calls it (`CREATE SOURCE`, `SET`, …).
    Command(String),
    /// Rows.
    Rows {
        /// Their schema.
        schema: SchemaRef,
        /// The rows.
        batches: Vec<RecordBatch>,
    },
    /// Rows of a query, produced while they are sent.
    Stream {
        /// Their schema.
        schema: SchemaRef,
        /// The rows, batch by batch.
        stream: SendableRecordBatchStream,
    },
    /// `COPY (query) TO STDOUT`: a query's rows, to be sent in a COPY format.
    CopyOut {
        /// Their schema.
        schema: SchemaRef,
        /// The rows, batch by batch.
        stream: SendableRecordBatchStream,
        /// How they are written.
        format: crate::copy::CopyFormat,
    },
}

/// What a statement takes and returns, without running it (a prepared statement's
/// `Describe`).
#[derive(Debug, Clone, Default)]
pub struct Described {
    /// Its parameters `$1`, `$2`, …, in order: the type each must have, where the plan
    /// tells (`None`: any; the value's own type is taken).
    pub parameters: Vec<Option<DataType>>,
    /// The rows it returns (`None`: it returns none).
    pub schema: Option<SchemaRef>,
}

impl Described {
    /// A statement without parameters that returns rows of `schema`, if any.
    pub fn rows(schema: Option<SchemaRef>) -> Self {
        Self {
            parameters: vec![],
            schema,
        }
    }

    /// An ad-hoc query's parameters and rows, planned in `adhoc` (its columns named as
    /// Postgres names them; `current_setting` with the server's values: only the plan's
    /// shape matters here).
    pub async fn query(adhoc: &AdHoc, mut stmt: DFStatement) -> Result<Self> {
        let names = crate::pg_compat::column_names(&stmt);
        // Settings first: two of them inlined as equal literals are then aliased apart.
        crate::pg_compat::inline_settings(&mut stmt, |n| Session::default().setting(n))?;
        crate::pg_compat::alias_duplicate_names(&mut stmt);
        let plan = adhoc.plan(stmt, &Default::default()).await?;
        Self::of(&plan, names.as_deref())
    }

    /// A planned query's parameters and rows, its columns named `names` if given (see
    /// [`crate::pg_compat::column_names`]).
    pub fn of(plan: &LogicalPlan, names: Option<&[String]>) -> Result<Self> {
        let types = plan.get_parameter_types()?;
        let mut parameters = vec![];
        for (name, ty) in types {
            let index = name
                .strip_prefix('$')
                .and_then(|n| n.parse::<usize>().ok())
                .filter(|n| *n >= 1)
                .ok_or_else(|| {
                    SqlError::NotSupported(format!(
                        "parameter `{name}`: write parameters as $1, $2, …"
                    ))
                })?;
            if parameters.len() < index {
                parameters.resize(index, None);
            }
            parameters[index - 1] = ty;
        }
        // Where DataFusion leaves a parameter untyped, Postgres' rules: `LIMIT $n` /
        // `OFFSET $n` take a count, `$n::type` (and `CAST($n AS type)`) is of that type.
        use datafusion::logical_expr::Expr as LExpr;
        let mut infer = |e: &LExpr, ty: &DataType| {
            if let LExpr::Placeholder(p) = e
                && let Some(i) = p.id.strip_prefix('$').and_then(|n| n.parse::<usize>().ok())
                && let Some(slot @ None) = parameters.get_mut(i.wrapping_sub(1))
            {
                *slot = Some(ty.clone());
            }
        };
        plan.apply(|node| {
            if let LogicalPlan::Limit(limit) = node {
                for e in [&limit.skip, &limit.fetch].into_iter().flatten() {
                    infer(e, &DataType::Int64);
                }
            }
            node.apply_expressions(|expr| {
                expr.apply(|e| {
                    match e {
                        LExpr::Cast(c) => infer(&c.expr, c.field.data_type()),
                        LExpr::TryCast(c) => infer(&c.expr, c.field.data_type()),
                        _ => {}
                    }
                    Ok(TreeNodeRecursion::Continue)
                })
            })?;
            Ok(TreeNodeRecursion::Continue)
        })?;
        Ok(Self {
            parameters,
            schema: Some(crate::pg_compat::rename(
                &Arc::new(plan.schema().as_arrow().clone()),
                names,
            )),
        })
    }
}

impl std::fmt::Debug for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Command(tag) => f.debug_tuple("Command").field(tag).finish(),
            Outcome::Rows { schema, batches } => f
                .debug_struct("Rows")
                .field("columns", &schema.fields().len())
                .field("batches", &batches.len())
                .finish(),
            Outcome::Stream { schema, .. } => f
                .debug_struct("Stream")
                .field("columns", &schema.fields().len())
                .finish(),
            Outcome::CopyOut { schema, format, .. } => f
                .debug_struct("CopyOut")
                .field("columns", &schema.fields().len())
                .field("format", format)
                .finish(),
        }
    }
}

impl Outcome {
    /// Collects a streamed result into [`Outcome::Rows`] (for callers that want all rows).
    pub async fn collect(self) -> Result<Outcome> {
        match self {
            Outcome::Stream { schema, stream } | Outcome::CopyOut { schema, stream, .. } => {
                let batches = futures::TryStreamExt::try_collect(stream).await?;
                Ok(Outcome::Rows { schema, batches })
            }
            other => Ok(other),
        }
    }
}

/// A running Sluice: cheap to clone, shared by every connection.
#[derive(Clone, Debug)]
pub struct Sluice {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    lake: Lake,
    /// The connectors this build provides.
    connectors: ConnectorRegistry,
    adhoc: AdHoc,
    state: tokio::sync::Mutex<State>,
    /// Every object by name, readable without waiting for a DDL statement to finish (the
    /// HTTP front door looks sources up here).
    directory: RwLock<HashMap<String, Named>>,
    shutdown: CancellationToken,
    /// Checkpoints of every stream that takes part.
    checkpoints: Coordinator,
    /// Closed while the catalog is restored: readers start once every stream is back.
    readers_gate: tokio::sync::watch::Sender<bool>,
    /// The writer lease this instance holds (`None`: the lake has no other writer).
    lease: Option<WriterLease>,
    /// Roles, privileges, policies, tokens and secrets.
    access: Arc<AccessControl>,
    /// Each stream's table over its processed files.
    tables: Arc<crate::lake_tables::LakeTables>,
}

/// An entry of the name directory.
#[derive(Debug, Clone)]
enum Named {
    /// A push source and its receiving end.
    Push(Arc<dyn PushSource>),
    /// Another kind of source.
    Source,
    /// A stream.
    Stream,
    /// A sink.
    Sink,
}

#[derive(Debug, Default)]
struct State {
    sources: BTreeMap<String, RunningSource>,
    streams: BTreeMap<String, RunningStream>,
    sinks: BTreeMap<String, RunningSink>,
    /// The catalog, in creation order.
    entries: Vec<Entry>,
    /// Catalog entries that could not be restored at startup, and why (by name).
    unrestored: BTreeMap<String, String>,
}

impl State {
    /// (name, reason) of the catalog's `kind` entries that could not be restored.
    fn unrestored_of(&self, kind: ObjectKind) -> Vec<(String, String)> {
        self.entries
            .iter()
            .filter(|e| e.kind == kind.to_string())
            .filter_map(|e| Some((e.name.clone(), self.unrestored.get(&e.name)?.clone())))
            .collect()
    }

    /// (name, connector, reason) of the catalog's sources that could not be restored.
    fn unrestored_sources(&self) -> Vec<(String, String, String)> {
        self.unrestored_of(ObjectKind::Source)
            .into_iter()
            .map(|(name, reason)| {
                let connector = self
                    .entries
                    .iter()
                    .find(|e| e.name == name)
                    .and_then(|e| parse_sql(&e.sql).ok())
                    .and_then(|mut s| match s.pop() {
                        Some(SluiceStatement::CreateSource(c)) => c
                            .options
                            .iter()
                            .find(|(k, _)| k == "connector")
                            .map(|(_, v)| v.clone()),
                        _ => None,
                    })
                    .unwrap_or_default();
                (name, connector, reason)
            })
            .collect()
    }

    fn kind_of(&self, name: &str) -> Option<ObjectKind> {
        if self.sources.contains_key(name) {
            Some(ObjectKind::Source)
        } else if self.streams.contains_key(name) {
            Some(ObjectKind::Stream)
        } else if self.sinks.contains_key(name) {
            Some(ObjectKind::Sink)
        } else {
            None
        }
    }

    /// Whether `CREATE <kind> [IF NOT EXISTS] name` has nothing to do: `Ok(true)` if an
    /// object of that kind exists and `IF NOT EXISTS` was given, an error if the name is
    /// taken otherwise, `Ok(false)` if it is free.
    fn exists_already(&self, name: &str, kind: ObjectKind, if_not_exists: bool) -> Result<bool> {
        match self.kind_of(name) {
            None => Ok(false),
            Some(k) if k == kind && if_not_exists => Ok(true),
            Some(k) => {
                Err(SqlError::DuplicateObject(format!("{k} `{name}` already exists")).into())
            }
        }
    }

    fn relations(&self) -> BTreeMap<String, Relation> {
        let mut r = BTreeMap::new();
        for (n, s) in &self.sources {
            r.insert(
                n.clone(),
                Relation {
                    kind: ObjectKind::Source,
                    schema: Arc::clone(&s.def.schema),
                    event_time_column: s.def.watermark.as_ref().map(|w| w.column.clone()),
                    primary_key: s.def.create.primary_key.clone(),
                },
            );
        }
        for (n, s) in &self.streams {
            r.insert(
                n.clone(),
                Relation {
                    kind: ObjectKind::Stream,
                    schema: Arc::clone(&s.plan.output_schema),
                    event_time_column: s.plan.event_time_column.clone(),
                    primary_key: s.plan.primary_key.clone(),
                },
            );
        }
        r
    }

    /// Streams and sinks reading `name`.
    fn readers_of(&self, name: &str) -> Vec<(ObjectKind, String)> {
        let streams = self
            .streams
            .iter()
            .filter(|(_, s)| s.plan.inputs.contains(name))
            .map(|(n, _)| (ObjectKind::Stream, n.clone()));
        let sinks = self
            .sinks
            .iter()
            .filter(|(_, s)| s.create.from == name)
            .map(|(n, _)| (ObjectKind::Sink, n.clone()));
        streams.chain(sinks).collect()
    }

    /// What a stream or sink reading `name` subscribes to.
    fn input(&self, name: &str) -> Option<Input> {
        self.sources
            .get(name)
            .map(RunningSource::input)
            .or_else(|| {
                self.streams.get(name).map(|s| Input::Hub {
                    hub: s.fanout.clone(),
                    idle_timeout: None,
                    checkpointed: s.checkpointed,
                })
            })
    }
}

impl Sluice {
    /// Opens the lake at `lake_location` as its only writer (tests and tools that run no
    /// second server) and restores every source and stream of its catalog.
    pub async fn open(lake_location: &str) -> Result<Sluice> {
        Self::open_as_writer(
            Lake::open(lake_location)?,
            None,
            sluice_engine::checkpoint::DEFAULT_RETENTION,
            Arc::default(),
            None,
        )
        .await
    }

    /// Opens `lake` as the holder of its writer `lease` (every commit is fenced by it; see
    /// [`crate::lease`]), keeping its newest `checkpoint_retention` checkpoints, and restores
    /// every source and stream of its catalog; `access` takes the catalog's roles and grants;
    /// each stream's table is registered in `glue` too when given.
    pub async fn open_as_writer(
        lake: Lake,
        lease: Option<WriterLease>,
        checkpoint_retention: usize,
        access: Arc<AccessControl>,
        glue: Option<sluice_connectors::lake::GlueCatalog>,
    ) -> Result<Sluice> {
        let fence: Arc<dyn Fence> = match &lease {
            Some(l) => Arc::new(l.clone()),
            None => Arc::new(NoFence),
        };
        // The catalog before anything is written: a lake that lost it is not started on.
        let catalog::Catalog {
            entries,
            access: stored,
        } = catalog::load(&lake).await?;
        access.replace(stored);
        // Recovery first: finish the last checkpoint's commit, drop what never committed.
        let checkpoints = Coordinator::open(
            Arc::new(lake.clone()),
            DEFAULT_CHECKPOINT_INTERVAL,
            Arc::clone(&fence),
        )
        .await?;
        checkpoints.set_retention(checkpoint_retention);
        let sluice = Sluice {
            inner: Arc::new(Inner {
                lease,
                checkpoints,
                readers_gate: tokio::sync::watch::channel(false).0,
                adhoc: AdHoc::new(lake.clone()),
                tables: Arc::new(crate::lake_tables::LakeTables::new(
                    lake.clone(),
                    glue,
                    Arc::clone(&fence),
                )),
                connectors: sluice_connectors::registry(&lake),
                lake,
                state: tokio::sync::Mutex::new(State::default()),
                directory: RwLock::default(),
                shutdown: CancellationToken::new(),
                access,
            }),
        };
        sluice.register_system_relations()?;
        sluice.inner.tables.spawn(sluice.inner.shutdown.clone());
        for e in entries {
            let restored = match parse_sql(&e.sql) {
                Ok(mut stmts) if stmts.len() == 1 => match stmts.remove(0) {
                    SluiceStatement::CreateSource(c) => sluice.create_source(*c, None).await,
                    SluiceStatement::CreateStream(c) => sluice.create_stream(*c, None).await,
                    SluiceStatement::CreateSink(c) => sluice.create_sink(*c, None).await,
                    other => Err(ServerError::Internal(format!(
                        "unexpected catalog statement {other:?}"
                    ))),
                },
                Ok(_) => Err(ServerError::Internal(
                    "catalog entry is not one statement".into(),
                )),
                Err(err) => Err(err.into()),
            };
            match restored {
                Ok(_) => tracing::info!(kind = %e.kind, name = %e.name, "restored"),
                Err(err) => {
                    // Keep the definition in the catalog so that it is not lost at the next
                    // DDL statement; the user can fix the cause and restart, or DROP it.
                    tracing::error!(kind = %e.kind, name = %e.name, error = %err, "cannot restore; it stays in the catalog but does not run");
                    let mut state = sluice.inner.state.lock().await;
                    state.unrestored.insert(e.name.clone(), err.to_string());
                    state.entries.push(e);
                }
            }
        }
        // What http sources stored after the last checkpoint goes to the streams again, now
        // that they are all back.
        {
            let mut state = sluice.inner.state.lock().await;
            for source in state.sources.values_mut() {
                if let Some(position) = source.replay_from.take() {
                    replay(source, &position).await;
                }
            }
        }
        sluice.inner.readers_gate.send_replace(true);
        Ok(sluice)
    }

    /// Its access control.
    pub fn access(&self) -> &Arc<AccessControl> {
        &self.inner.access
    }

    /// The lake this instance writes.
    pub fn lake(&self) -> &Lake {
        &self.inner.lake
    }

    /// The receiving end of push source `name`: `Ok(None)` if the source does not exist,
    /// `Err` if it is not a push source.
    pub fn push_source(
        &self,
        name: &str,
    ) -> std::result::Result<Option<Arc<dyn PushSource>>, String> {
        match self.directory().get(name) {
            Some(Named::Push(h)) => Ok(Some(Arc::clone(h))),
            Some(Named::Source) => Err(format!(
                "source `{name}` does not take events over HTTP: its connector reads them"
            )),
            Some(Named::Stream) => Err(format!("`{name}` is a stream, not a source")),
            Some(Named::Sink) => Err(format!("`{name}` is a sink, not a source")),
            None => Ok(None),
        }
    }

    fn directory(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Named>> {
        self.inner
            .directory
            .read()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// What a stream's lake writer calls when a partition is final: its Glue partition.
    fn on_final(&self) -> sluice_connectors::lake::OnFinal {
        let tables = Arc::clone(&self.inner.tables);
        Arc::new(move |marker| tables.partition_final(marker))
    }

    fn directory_mut(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Named>> {
        self.inner
            .directory
            .write()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Stops every pipeline, flushing what they hold to the lake.
    pub async fn shutdown(&self) {
        let mut state = self.inner.state.lock().await;
        let streams = std::mem::take(&mut state.streams);
        let sources = std::mem::take(&mut state.sources);
        let sinks = std::mem::take(&mut state.sinks);
        self.directory_mut().clear();
        // A last checkpoint first: the next start resumes exactly here (windows still open
        // stay open in the checkpoint rather than being emitted half full).
        if !self.inner.checkpoints.final_checkpoint(STOP_TIMEOUT).await {
            tracing::warn!(
                "the final checkpoint did not complete; the next start replays from the one before"
            );
        }
        // Stop sources first, so streams drain what is in flight and end on `End`; sinks
        // deliver what reaches them before their input ends.
        for (_, s) in sources {
            s.stop(STOP_TIMEOUT).await;
        }
        for (_, s) in streams {
            s.stop(STOP_TIMEOUT).await;
        }
        for (_, s) in sinks {
            s.drain(STOP_TIMEOUT).await;
        }
        self.inner.shutdown.cancel();
        if let Some(lease) = &self.inner.lease {
            lease.release(&self.inner.lake).await;
        }
    }

    /// Executes every statement in `sql`, in order, stopping at the first error (which is
    /// the last element then).
    pub async fn execute(&self, sql: &str) -> Vec<Result<Outcome>> {
        self.execute_in(sql, &Session::default()).await
    }

    /// [`Self::execute`] in a client's `session` (its settings apply to ad-hoc queries).
    pub async fn execute_in(&self, sql: &str, session: &Session) -> Vec<Result<Outcome>> {
        self.execute_bound(sql, session, None).await
    }

    /// [`Self::execute_in`] with the values of a query's parameters (`$1`, `$2`, …), bound
    /// over the extended query protocol.
    pub async fn execute_bound(
        &self,
        sql: &str,
        session: &Session,
        params: Option<ParamValues>,
    ) -> Vec<Result<Outcome>> {
        let stmts = match crate::pg_compat::parse(sql) {
            Ok(s) => s,
            Err(e) => return vec![Err(e.into())],
        };
        let mut out = Vec::with_capacity(stmts.len());
        for stmt in stmts {
            let r = self.execute_statement(stmt, session, params.clone()).await;
            let failed = r.is_err();
            out.push(r);
            if failed {
                break;
            }
        }
        out
    }

    /// The parameters `sql` (one statement) takes and the schema of the rows it returns,
    /// without running it (what `session`'s user may read only).
    pub async fn describe(&self, sql: &str, session: &Session) -> Result<Described> {
        let mut stmts = crate::pg_compat::parse(sql)?;
        if stmts.len() > 1 {
            return Err(SqlError::Syntax {
                message: "cannot insert multiple commands into a prepared statement".into(),
                position: None,
            }
            .into());
        }
        let Some(stmt) = stmts.pop() else {
            return Ok(Described::default());
        };
        Ok(Described::rows(match stmt {
            SluiceStatement::Other(mut s) if is_query(&s) => {
                self.inner
                    .adhoc
                    .guard(&self.inner.access, session.user(), &mut s)?;
                return Described::query(&self.inner.adhoc, *s).await;
            }
            SluiceStatement::Show(ObjectKind::Source) => Some(show::sources_schema()),
            SluiceStatement::Show(ObjectKind::Stream) => Some(show::streams_schema()),
            SluiceStatement::Show(ObjectKind::Sink) => Some(show::sinks_schema()),
            SluiceStatement::ShowStatus => Some(show::status_schema()),
            SluiceStatement::Describe(_) => Some(show::describe_schema()),
            SluiceStatement::ShowAthenaDdl(_) => Some(athena_schema()),
            SluiceStatement::ExplainStream(_) => Some(explain_schema()),
            _ => None,
        }))
    }

    async fn execute_statement(
        &self,
        stmt: SluiceStatement,
        session: &Session,
        params: Option<ParamValues>,
    ) -> Result<Outcome> {
        if params.is_some() && !matches!(stmt, SluiceStatement::Other(_)) {
            return Err(SqlError::NotSupported(
                "parameters ($1, $2, …) are taken by queries only; write the values into the statement".into(),
            )
            .into());
        }
        let user = session.user();
        let access = &self.inner.access;
        match stmt {
            SluiceStatement::CreateSource(c) => {
                access.require(user, Privilege::Create, None)?;
                access.check_secrets(user, &c.options)?;
                warn_clear_credentials(session, &c.options);
                self.create_source(*c, Some(user)).await
            }
            SluiceStatement::CreateStream(mut c) => {
                access.require(user, Privilege::Create, None)?;
                self.guard_stream(user, &mut c)?;
                self.create_stream(*c, Some(user)).await
            }
            SluiceStatement::CreateSink(mut c) => {
                access.require(user, Privilege::Create, None)?;
                access.check_secrets(user, &c.options)?;
                warn_clear_credentials(session, &c.options);
                if let Some(kind) = self.inner.adhoc.kind(&c.from) {
                    access.require(user, Privilege::Select, Some((kind, &c.from)))?;
                    // The user's policies travel with the rows: the sink delivers only those.
                    if let Some(policy) = access.row_filter(user, &c.from)? {
                        c.filter = Some(match c.filter.take() {
                            None => policy,
                            Some(own) => SqlExpr::BinaryOp {
                                left: Box::new(SqlExpr::Nested(Box::new(own))),
                                op: datafusion::sql::sqlparser::ast::BinaryOperator::And,
                                right: Box::new(SqlExpr::Nested(Box::new(policy))),
                            },
                        });
                    }
                }
                self.create_sink(*c, Some(user)).await
            }
            SluiceStatement::Access(a) => self.access_statement(user, *a).await,
            SluiceStatement::ExplainStream(mut c) => {
                self.guard_stream(user, &mut c)?;
                let state = self.inner.state.lock().await;
                let plan = query_runtime::plan_stream(&c, state.relations()).await?;
                let text = plan.explain();
                let schema = explain_schema();
                let batch = RecordBatch::try_new(
                    Arc::clone(&schema),
                    vec![Arc::new(arrow::array::StringArray::from_iter_values(
                        text.lines().collect::<Vec<_>>(),
                    ))],
                )
                .map_err(|e| ServerError::Internal(e.to_string()))?;
                Ok(Outcome::Rows {
                    schema,
                    batches: vec![batch],
                })
            }
            SluiceStatement::Drop {
                kind,
                names,
                if_exists,
                cascade,
                options,
            } => {
                let mut opts = sluice_engine::WithOptions::new(
                    format!("DROP {}", kind.to_string().to_uppercase()),
                    options,
                );
                let drop_table = match kind {
                    ObjectKind::Stream => opts.take_bool("drop_table")?.unwrap_or(false),
                    _ => false,
                };
                opts.finish()?;
                // (What does not exist is for the drop to report, or skip with IF EXISTS.)
                for name in names.iter().filter(|n| self.directory().contains_key(*n)) {
                    access.require_owner(user, &kind.to_string(), name)?;
                }
                let dropped = names.clone();
                let outcome = self.drop_objects(kind, names, if_exists, cascade).await?;
                if drop_table {
                    for name in dropped {
                        self.inner.tables.drop_table(&name).await?;
                    }
                }
                Ok(outcome)
            }
            SluiceStatement::ShowStatus => self.status(),
            SluiceStatement::Show(kind) => {
                let batch = self.show(kind).await?;
                Ok(Outcome::Rows {
                    schema: batch.schema(),
                    batches: vec![batch],
                })
            }
            SluiceStatement::Describe(name) => {
                let state = self.inner.state.lock().await;
                let batch = if let Some(s) = state.sources.get(&name) {
                    show::describe(
                        &s.def.schema,
                        s.def.watermark.as_ref().map(|w| w.column.as_str()),
                    )
                } else if let Some(s) = state.streams.get(&name) {
                    show::describe(&s.plan.output_schema, s.plan.event_time_column.as_deref())
                } else {
                    return Err(SqlError::UndefinedObject(format!(
                        "relation `{name}` does not exist"
                    ))
                    .into());
                }
                .map_err(|e| ServerError::Internal(e.to_string()))?;
                Ok(Outcome::Rows {
                    schema: batch.schema(),
                    batches: vec![batch],
                })
            }
            SluiceStatement::ShowAthenaDdl(name) => {
                let state = self.inner.state.lock().await;
                let Some(stream) = state.streams.get(&name) else {
                    let what = if state.sources.contains_key(&name) {
                        format!(
                            "`{name}` is a source: only streams land in the processed zone and have an Athena table"
                        )
                    } else {
                        format!("stream `{name}` does not exist")
                    };
                    return Err(SqlError::UndefinedObject(what).into());
                };
                let rows = lake_schema(&stream.plan.output_schema);
                let first_day = self.inner.tables.first_day(&name).unwrap_or_else(today);
                let ddl = athena_ddl(&self.inner.lake, &name, &rows, &first_day, None)
                    .map_err(|e| SqlError::NotSupported(e.to_string()))?;
                let schema = athena_schema();
                let batch = RecordBatch::try_new(
                    Arc::clone(&schema),
                    vec![Arc::new(arrow::array::StringArray::from(vec![ddl]))],
                )
                .map_err(|e| ServerError::Internal(e.to_string()))?;
                Ok(Outcome::Rows {
                    schema,
                    batches: vec![batch],
                })
            }
            SluiceStatement::Other(s) => {
                run_adhoc(&self.inner.adhoc, access, *s, session, params).await
            }
        }
    }

    /// Checks that `user` may read what stream `c` reads, and puts the user's row
    /// policies into its query (so the stream, and its catalog entry, carry them).
    fn guard_stream(&self, user: &str, c: &mut CreateStream) -> Result<()> {
        let access = &self.inner.access;
        let mut filters = BTreeMap::new();
        for name in sluice_sql::access::relations_read(&c.query) {
            let Some(kind) = self.inner.adhoc.kind(&name) else {
                continue; // planning says it does not exist
            };
            access.require(user, Privilege::Select, Some((kind, &name)))?;
            if let Some(f) = access.row_filter(user, &name)? {
                filters.insert(name, f);
            }
        }
        if !filters.is_empty() && sluice_sql::access::restrict(&mut c.query, &filters).is_none() {
            return Err(ServerError::PermissionDenied(format!(
                "stream `{}`: a row policy of user \"{user}\" cannot be applied to this query",
                c.name
            )));
        }
        Ok(())
    }

    /// Runs an access-control statement, storing the result in the catalog.
    async fn access_statement(&self, user: &str, stmt: AccessStatement) -> Result<Outcome> {
        let tag = stmt.tag();
        let state = self.inner.state.lock().await;
        let adhoc = &self.inner.adhoc;
        let (access, token) = self.inner.access.apply(user, &stmt, &|n| adhoc.kind(n))?;
        if let AccessStatement::CreatePolicy {
            name, on, using, ..
        } = &stmt
        {
            // A predicate that does not plan over the stream would fail every query of the
            // users it names: refused now instead.
            let sql = format!(
                "SELECT * FROM {} WHERE {using}",
                sluice_sql::parser::quote(on)
            );
            let planned = match crate::pg_compat::parse(&sql)?.pop() {
                Some(SluiceStatement::Other(q)) => {
                    adhoc.plan(*q, &Default::default()).await.map(|_| ())
                }
                _ => Err(ServerError::Internal(format!("`{sql}` is not a query"))),
            };
            if let Err(e) = planned {
                return Err(SqlError::Invalid(format!(
                    "policy `{name}` on `{on}`: USING ({using}): {e}"
                ))
                .into());
            }
        }
        self.fenced()?;
        catalog::store(&self.inner.lake, &state.entries, &access).await?;
        self.inner.access.replace(access);
        Ok(match token {
            None => Outcome::Command(tag),
            Some(t) => {
                let schema = Arc::new(Schema::new(vec![
                    Field::new("name", DataType::Utf8, false),
                    Field::new("token", DataType::Utf8, false),
                ]));
                let batch = RecordBatch::try_new(
                    Arc::clone(&schema),
                    vec![
                        Arc::new(arrow::array::StringArray::from(vec![t.name])),
                        Arc::new(arrow::array::StringArray::from(vec![t.token])),
                    ],
                )
                .map_err(|e| ServerError::Internal(e.to_string()))?;
                Outcome::Rows {
                    schema,
                    batches: vec![batch],
                }
            }
        })
    }

    /// Creates a source: `owner` made it now (it is stored), none when restored.
    async fn create_source(&self, c: CreateSource, owner: Option<&str>) -> Result<Outcome> {
        let persist = owner.is_some();
        if persist {
            // New objects only: the catalog may hold names from before the rule.
            sluice_sql::limits::check_name(ObjectKind::Source, &c.name)?;
        }
        let tag = Outcome::Command("CREATE SOURCE".into());
        let mut state = self.inner.state.lock().await;
        if state.exists_already(&c.name, ObjectKind::Source, c.if_not_exists)? {
            return Ok(tag);
        }
        // Secrets are opened for the connector only: the catalog keeps `SECRET name`.
        let revealed = CreateSource {
            options: self.inner.access.reveal_options(&c.options)?,
            ..c.clone()
        };
        let redact = |e: ServerError| self.inner.access.redact(&c.options, e);
        let def = source_def(&revealed, &self.inner.connectors).map_err(|e| redact(e.into()))?;
        let mut running = start_source(
            &self.inner.lake,
            def,
            &self.inner.shutdown,
            Some(&self.inner.checkpoints),
            &c.to_string(),
            &self.inner.readers_gate.subscribe(),
        )
        .await
        .map_err(redact)?;
        if running.push.is_some() && !persist && running.replay_from.is_none() {
            // Restored, and no checkpoint has it: no stream's output from it was committed,
            // so everything it stored is published again.
            running.replay_from = Some(serde_json::json!({ "seq": 0 }));
        }
        // At startup the replay waits until the streams reading the source are back.
        if persist && let Some(position) = running.replay_from.take() {
            replay(&running, &position).await;
        }
        self.inner
            .adhoc
            .register_source(&c.name, Arc::clone(&running.def.schema))?;
        let named = match &running.push {
            Some(h) => Named::Push(Arc::clone(h)),
            None => Named::Source,
        };
        self.directory_mut().insert(c.name.clone(), named);
        state.sources.insert(c.name.clone(), running);
        self.record(
            &mut state,
            ObjectKind::Source,
            &c.name,
            c.to_string(),
            owner,
        )
        .await?;
        Ok(tag)
    }

    /// Creates a stream: `owner` made it now (it is stored), none when restored.
    async fn create_stream(&self, c: CreateStream, owner: Option<&str>) -> Result<Outcome> {
        if owner.is_some() {
            // New objects only: the catalog may hold names from before the rule.
            sluice_sql::limits::check_name(ObjectKind::Stream, &c.name)?;
        }
        let tag = Outcome::Command("CREATE STREAM".into());
        let mut state = self.inner.state.lock().await;
        if state.exists_already(&c.name, ObjectKind::Stream, c.if_not_exists)? {
            return Ok(tag);
        }
        let plan = query_runtime::plan_stream(&c, state.relations()).await?;
        for col in PARTITION_COLUMNS {
            if plan.output_schema.field_with_name(col).is_ok() {
                return Err(SqlError::Invalid(format!(
                    "stream `{}`: column name `{col}` is reserved for the lake's partitions (dt, hour); rename it, e.g. `{col} AS {col}_`",
                    c.name
                ))
                .into());
            }
        }
        let schema = Arc::clone(&plan.output_schema);
        let running = {
            let st = &*state;
            start_stream(
                &self.inner.lake,
                c.clone(),
                plan,
                |n| st.input(n),
                crate::runtime::StreamEnv {
                    parent: &self.inner.shutdown,
                    coordinator: Some(&self.inner.checkpoints),
                    gate: &self.inner.readers_gate.subscribe(),
                    on_final: Some(self.on_final()),
                },
            )
            .await?
        };
        self.inner.adhoc.register_stream(&c.name, &schema)?;
        // The Athena table next to the data (a type Athena lacks only costs the file).
        self.inner
            .tables
            .register(&c.name, lake_schema(&schema))
            .await;
        self.directory_mut().insert(c.name.clone(), Named::Stream);
        state.streams.insert(c.name.clone(), running);
        self.record(
            &mut state,
            ObjectKind::Stream,
            &c.name,
            c.to_string(),
            owner,
        )
        .await?;
        Ok(tag)
    }

    /// Creates a sink: `owner` made it now (it is stored), none when restored.
    async fn create_sink(&self, c: CreateSink, owner: Option<&str>) -> Result<Outcome> {
        if owner.is_some() {
            // New objects only: the catalog may hold names from before the rule.
            sluice_sql::limits::check_name(ObjectKind::Sink, &c.name)?;
        }
        let tag = Outcome::Command("CREATE SINK".into());
        let mut state = self.inner.state.lock().await;
        if state.exists_already(&c.name, ObjectKind::Sink, c.if_not_exists)? {
            return Ok(tag);
        }
        let relations = state.relations();
        let Some(from) = relations.get(&c.from) else {
            return Err(SqlError::UndefinedObject(format!(
                "sink `{}`: there is no source or stream `{}`",
                c.name, c.from
            ))
            .into());
        };
        let filter = match &c.filter {
            Some(f) => Some(
                crate::runtime::row_filter(f, &from.schema)
                    .map_err(|e| SqlError::Invalid(format!("sink `{}`: WHERE {f}: {e}", c.name)))?,
            ),
            None => None,
        };
        // Secrets are opened for the connector only: the catalog keeps `SECRET name`.
        let opts = sluice_engine::WithOptions::new(
            format!("sink `{}`", c.name),
            self.inner.access.reveal_options(&c.options)?,
        );
        let config = self
            .inner
            .connectors
            .sink(opts, &from.schema)
            .map_err(|e| {
                let e = SqlError::InvalidOption(e.to_string()).into();
                self.inner.access.redact(&c.options, e)
            })?;
        let input = state
            .input(&c.from)
            .ok_or_else(|| ServerError::Internal(format!("`{}` is not running", c.from)))?;
        let checkpointed = input.checkpointed();
        let exactly_once = match config.exactly_once() {
            (_, Some(false)) => false,
            (capable, None) => capable && checkpointed,
            (_, Some(true)) if !checkpointed => {
                let what = if state.streams.contains_key(&c.from) {
                    format!(
                        "stream `{}` does not checkpoint (checkpoint_interval = '0 s'); \
                         let it checkpoint",
                        c.from
                    )
                } else {
                    format!(
                        "the sink would read source `{0}` with a reader of its own, outside \
                         checkpoints; read it through a stream (CREATE STREAM … AS SELECT * FROM {0})",
                        c.from
                    )
                };
                return Err(SqlError::InvalidOption(format!(
                    "sink `{}`: delivery = 'exactly_once' needs an input that checkpoints, but {what}, \
                     or use delivery = 'at_least_once'",
                    c.name
                ))
                .into());
            }
            (_, Some(true)) => true,
        };
        let running = start_sink(
            &self.inner.lake,
            c.clone(),
            config,
            input,
            &self.inner.shutdown,
            &self.inner.readers_gate.subscribe(),
            checkpointed.then_some((&self.inner.checkpoints, exactly_once)),
            filter,
        )
        .await
        .map_err(|e| self.inner.access.redact(&c.options, e))?;
        self.directory_mut().insert(c.name.clone(), Named::Sink);
        state.sinks.insert(c.name.clone(), running);
        self.record(&mut state, ObjectKind::Sink, &c.name, c.to_string(), owner)
            .await?;
        Ok(tag)
    }

    async fn drop_objects(
        &self,
        kind: ObjectKind,
        names: Vec<String>,
        if_exists: bool,
        cascade: bool,
    ) -> Result<Outcome> {
        let tag = Outcome::Command(format!("DROP {}", kind.to_string().to_uppercase()));
        let mut state = self.inner.state.lock().await;
        // Check everything before dropping anything.
        let mut order: Vec<(ObjectKind, String)> = Vec::new();
        for name in &names {
            match state.kind_of(name) {
                Some(k) if k == kind => {}
                Some(k) => {
                    return Err(SqlError::Invalid(format!(
                        "`{name}` is a {k}, not a {kind}: use DROP {}",
                        k.to_string().to_uppercase()
                    ))
                    .into());
                }
                // A catalog entry that could not be restored at startup: dropping it just
                // removes the definition.
                None if state
                    .entries
                    .iter()
                    .any(|e| e.name == *name && e.kind == kind.to_string()) =>
                {
                    state.entries.retain(|e| e.name != *name);
                    state.unrestored.remove(name);
                    continue;
                }
                None if if_exists => continue,
                None => {
                    return Err(SqlError::UndefinedObject(format!(
                        "{kind} `{name}` does not exist"
                    ))
                    .into());
                }
            }
            let readers = state.readers_of(name);
            let outside: Vec<&(ObjectKind, String)> =
                readers.iter().filter(|(_, r)| !names.contains(r)).collect();
            if !outside.is_empty() && !cascade {
                return Err(SqlError::DependentObjects(format!(
                    "cannot drop {kind} `{name}`: {} read{} it (use DROP … CASCADE to drop {} too)",
                    outside
                        .iter()
                        .map(|(k, s)| format!("{k} `{s}`"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    if outside.len() > 1 { "" } else { "s" },
                    if outside.len() > 1 { "them" } else { "it" },
                ))
                .into());
            }
            collect_drop_order(&state, kind, name, &mut order);
        }
        // Readers first: `order` lists dependents before what they read.
        let mut dropped = vec![];
        for (k, name) in order {
            match k {
                ObjectKind::Stream => {
                    if let Some(s) = state.streams.remove(&name) {
                        // What it emitted so far is committed first, as at shutdown: a
                        // checkpoint that covers it, then the stop (which discards only what
                        // follows that checkpoint).
                        if s.checkpointed
                            && tokio::time::timeout(
                                STOP_TIMEOUT,
                                self.inner.checkpoints.checkpoint_now(),
                            )
                            .await
                            .is_err()
                        {
                            tracing::warn!(stream = %name, "no checkpoint completed before the drop; what it emitted since the last one is not in the lake");
                        }
                        s.stop(STOP_TIMEOUT).await;
                    }
                    // Its checkpointed state goes too: a new stream of that name starts afresh.
                    self.inner.checkpoints.deregister(&name, false);
                    self.inner.tables.forget(&name);
                    // And what it staged after that checkpoint.
                    for (zone, dir) in [
                        (Zone::Internal, format!("staging/{name}")),
                        (Zone::Internal, format!("staging/errors/{name}")),
                    ] {
                        if let Err(e) = self.inner.lake.remove_dir(zone, &dir).await {
                            tracing::warn!(stream = %name, "cannot remove its staging folder: {e}");
                        }
                    }
                }
                ObjectKind::Source => {
                    if let Some(s) = state.sources.remove(&name) {
                        s.stop(STOP_TIMEOUT).await;
                    }
                    self.inner
                        .checkpoints
                        .deregister(&crate::runtime::source_participant(&name), false);
                }
                ObjectKind::Sink => {
                    if let Some(s) = state.sinks.remove(&name) {
                        s.stop(STOP_TIMEOUT).await;
                    }
                    // An exactly-once sink's undelivered epochs go too.
                    self.inner.checkpoints.deregister(&name, false);
                    crate::runtime::forget_sink(&self.inner.lake, &name).await;
                }
            }
            self.directory_mut().remove(&name);
            if k != ObjectKind::Sink {
                self.inner.adhoc.deregister(&name)?;
            }
            state.entries.retain(|e| e.name != name);
            dropped.push(name);
        }
        let mut access = self.inner.access.state();
        for name in &dropped {
            AccessControl::dropped(&mut access, name);
        }
        self.fenced()?;
        catalog::store(&self.inner.lake, &state.entries, &access).await?;
        self.inner.access.replace(access);
        Ok(tag)
    }

    /// Adds a created object to the catalog, and stores the catalog (with its owner) if
    /// someone made it now.
    async fn record(
        &self,
        state: &mut State,
        kind: ObjectKind,
        name: &str,
        sql: String,
        owner: Option<&str>,
    ) -> Result<()> {
        if matches!(kind, ObjectKind::Source | ObjectKind::Stream) {
            // psql's `\d+` and `\dt+` show it as the relation's description.
            self.inner.adhoc.comment(name, &sql).await;
        }
        state.entries.retain(|e| e.name != name);
        state.entries.push(Entry {
            kind: kind.to_string(),
            name: name.to_string(),
            sql,
        });
        if let Some(owner) = owner {
            let mut access = self.inner.access.state();
            AccessControl::owned(&mut access, name, owner);
            self.fenced()?;
            catalog::store(&self.inner.lake, &state.entries, &access).await?;
            self.inner.access.replace(access);
        }
        Ok(())
    }

    /// An error once this instance no longer holds the lake's writer lease.
    pub fn fenced(&self) -> Result<()> {
        match &self.inner.lease {
            Some(lease) if !lease.is_held() => Err(ServerError::Standby(format!(
                "this server lost the lake's writer lease (generation {}) and is stopping",
                lease.generation()
            ))),
            _ => Ok(()),
        }
    }

    /// The figures `GET /metrics` exports (see [`crate::metrics`]); the durations observed
    /// since the last call are taken.
    pub async fn vitals(&self) -> crate::metrics::Vitals {
        use crate::metrics::{StreamVitals, Vitals};
        let failed = |s: &crate::runtime::SharedStatus| {
            matches!(crate::runtime::get(s), crate::runtime::Status::Failed(_))
        };
        let state = self.inner.state.lock().await;
        let lake = self.inner.lake.stats();
        for name in state.streams.keys() {
            lake.register(Zone::Processed, name);
            lake.register(Zone::Errors, name);
        }
        for name in state.sources.keys() {
            lake.register(Zone::Errors, name);
        }
        let checkpoints = &self.inner.checkpoints;
        let glue_failures: HashMap<String, u64> =
            self.inner.tables.glue_failures().into_iter().collect();
        Vitals {
            sources: state
                .sources
                .values()
                .map(|s| (s.def.name.clone(), s.metrics.snapshot(), failed(&s.status)))
                .collect(),
            streams: state
                .streams
                .values()
                .map(|s| StreamVitals {
                    name: s.plan.name.clone(),
                    metrics: s.metrics.snapshot(),
                    failed: failed(&s.status),
                    state_bytes: checkpoints.state_bytes(&s.plan.name),
                    glue_failures: glue_failures.get(&s.plan.name).copied(),
                    compactions: s
                        .compactions
                        .done
                        .load(std::sync::atomic::Ordering::Relaxed),
                    compaction_failures: s
                        .compactions
                        .failed
                        .load(std::sync::atomic::Ordering::Relaxed),
                })
                .collect(),
            sinks: state
                .sinks
                .values()
                .map(|s| {
                    (
                        s.create.name.clone(),
                        s.delivered.load(std::sync::atomic::Ordering::Relaxed),
                        failed(&s.status),
                    )
                })
                .collect(),
            checkpoint_durations: checkpoints.take_durations(),
            checkpoint_last_completed: checkpoints
                .last_completed_unix_micros()
                .map(|t| t as f64 / 1e6),
            checkpoint_failures: checkpoints.aborted_total(),
            checkpoint_interval: checkpoints.interval(),
            lake: lake
                .committed()
                .into_iter()
                .map(|(zone, name, files, bytes)| (zone.dir(), name, files, bytes))
                .collect(),
            lake_latencies: lake.take_latencies(),
        }
    }

    /// The sources, streams and sinks that failed: (kind, name, why).
    pub async fn failures(&self) -> Vec<(&'static str, String, String)> {
        let state = self.inner.state.lock().await;
        let why = |s: &crate::runtime::SharedStatus| match crate::runtime::get(s) {
            crate::runtime::Status::Failed(reason) => Some(reason),
            _ => None,
        };
        let mut out = vec![];
        for s in state.sources.values() {
            if let Some(r) = why(&s.status) {
                out.push(("source", s.def.name.clone(), r));
            }
        }
        for s in state.streams.values() {
            if let Some(r) = why(&s.status) {
                out.push(("stream", s.plan.name.clone(), r));
            }
        }
        for s in state.sinks.values() {
            if let Some(r) = why(&s.status) {
                out.push(("sink", s.create.name.clone(), r));
            }
        }
        out
    }

    /// What `SHOW SOURCES/STREAMS/SINKS` shows (and `sluice.sources/streams/sinks` hold).
    async fn show(&self, kind: ObjectKind) -> Result<RecordBatch> {
        let state = self.inner.state.lock().await;
        let batch = match kind {
            ObjectKind::Source => {
                show::sources(state.sources.values(), &state.unrestored_sources())
            }
            ObjectKind::Stream => show::streams(
                state.streams.values(),
                &state.unrestored_of(ObjectKind::Stream),
                show::LastCheckpoint::of(&self.inner.checkpoints),
                |stream| self.inner.checkpoints.health(stream),
                |stream| self.inner.tables.glue_status(stream),
            ),
            ObjectKind::Sink => {
                show::sinks(state.sinks.values(), &state.unrestored_of(ObjectKind::Sink))
            }
        }
        .map_err(|e| ServerError::Internal(e.to_string()))?;
        Ok(batch)
    }

    /// Registers `sluice.sources`, `sluice.streams` and `sluice.sinks` (see
    /// [`crate::system`]); they hold a weak reference, so they never keep a stopped server
    /// alive.
    fn register_system_relations(&self) -> Result<()> {
        let relations = [
            ("sources", ObjectKind::Source, show::sources_schema()),
            ("streams", ObjectKind::Stream, show::streams_schema()),
            ("sinks", ObjectKind::Sink, show::sinks_schema()),
        ];
        for (name, kind, schema) in relations {
            // What `SHOW` shows, and the statement that made each object.
            let mut fields = schema.fields().to_vec();
            fields.push(Arc::new(Field::new("sql", DataType::Utf8, true)));
            let schema = Arc::new(Schema::new(fields));
            let weak = Arc::downgrade(&self.inner);
            let with_sql = Arc::clone(&schema);
            let rows: crate::system::Rows = Arc::new(move || {
                let (weak, schema) = (std::sync::Weak::clone(&weak), Arc::clone(&with_sql));
                Box::pin(async move {
                    let inner = weak.upgrade().ok_or_else(|| {
                        ServerError::Internal("the server is shutting down".into())
                    })?;
                    let sluice = Sluice { inner };
                    let shown = sluice.show(kind).await?;
                    let state = sluice.inner.state.lock().await;
                    let names = shown
                        .column(0)
                        .as_any()
                        .downcast_ref::<arrow::array::StringArray>()
                        .ok_or_else(|| {
                            ServerError::Internal("SHOW's first column is a name".into())
                        })?;
                    let sql: arrow::array::StringArray = names
                        .iter()
                        .map(|n| {
                            let n = n?;
                            state
                                .entries
                                .iter()
                                .find(|e| e.name == n)
                                .map(|e| e.sql.clone())
                        })
                        .collect();
                    let mut columns = shown.columns().to_vec();
                    columns.push(Arc::new(sql));
                    RecordBatch::try_new(schema, columns)
                        .map_err(|e| ServerError::Internal(e.to_string()))
                })
            });
            self.inner
                .adhoc
                .register_system(name, crate::system::SystemTable::new(schema, rows))?;
        }
        Ok(())
    }

    fn status(&self) -> Result<Outcome> {
        let (generation, pg, http) = match &self.inner.lease {
            Some(l) => {
                let r = l.record();
                (Some(r.generation as i64), r.pg, r.http)
            }
            None => (None, String::new(), String::new()),
        };
        show::status("writer", self.inner.lake.location(), &pg, &http, generation)
    }
}

/// Runs a statement that is not Sluice's own over the lake's tables in `adhoc`, in a
/// client's `session`: a read-only query, or a session statement clients send (`SET`,
/// `BEGIN`, …).
/// A NOTICE for each option that looks like a credential but is written in the statement
/// (and so stored in the catalog as written) rather than given as `SECRET name`.
fn warn_clear_credentials(session: &Session, options: &[(String, String)]) {
    for (key, value) in options {
        let k = key.to_ascii_lowercase();
        let credential = ["password", "secret", "token", "jaas", "private"]
            .iter()
            .any(|w| k.contains(w));
        if credential && sluice_sql::access::secret_name(value).is_none() {
            session.notice(format!(
                "option `{key}` is stored in the catalog as written: give it as SECRET name (CREATE SECRET name AS '…') to keep it sealed"
            ));
        }
    }
}

pub(crate) async fn run_adhoc(
    adhoc: &AdHoc,
    access: &AccessControl,
    stmt: DFStatement,
    session: &Session,
    params: Option<ParamValues>,
) -> Result<Outcome> {
    let (mut stmt, copy) = copy_out(stmt)?;
    adhoc.guard(access, session.user(), &mut stmt)?;
    if let DFStatement::Statement(s) = &stmt {
        match s.as_ref() {
            Statement::StartTransaction { .. } => return Ok(Outcome::Command("BEGIN".into())),
            Statement::Commit { .. } => return Ok(Outcome::Command("COMMIT".into())),
            Statement::Rollback { .. } => return Ok(Outcome::Command("ROLLBACK".into())),
            Statement::Set(set) => return set_variable(adhoc, set, session),
            Statement::ShowVariable { variable } => {
                let mut name = variable
                    .iter()
                    .map(|i| i.value.as_str())
                    .collect::<Vec<_>>()
                    .join(".");
                if name.eq_ignore_ascii_case("transaction.isolation.level") {
                    name = "transaction_isolation".into(); // Postgres' own spelling of it
                }
                if let Some(value) = session.setting(&name) {
                    return show_setting(&name, value);
                }
            }
            _ => {}
        }
    }
    if !is_query(&stmt) {
        return Err(SqlError::NotSupported(format!(
            "`{}` is not supported: Sluice's relations are sources (CREATE SOURCE) and streams (CREATE STREAM); other statements must be queries",
            statement_head(&stmt)
        ))
        .into());
    }
    if selects_into(&stmt) {
        return Err(SqlError::NotSupported(
            "SELECT … INTO is not supported: ad-hoc queries are read-only; to keep a query's rows, CREATE STREAM … AS SELECT".into(),
        )
        .into());
    }
    let options = session.options();
    let names = crate::pg_compat::column_names(&stmt);
    // Settings first: two of them inlined as equal literals are then aliased apart.
    crate::pg_compat::inline_settings(&mut stmt, |name| session.setting(name))?;
    crate::pg_compat::alias_duplicate_names(&mut stmt);
    let start = async {
        let mut plan = adhoc.plan(stmt, &options).await?;
        if let Some(params) = params {
            plan = plan.with_param_values(params)?;
        }
        adhoc.run(plan, &options).await
    };
    let (schema, stream) = match session.guard() {
        // A client's statement: stopped by its timeout or a CancelRequest, while planning
        // or while its rows stream.
        Some(guard) => {
            let (schema, stream) = guard.run(start).await?;
            (schema, guard.rows(stream))
        }
        None => start.await?,
    };
    // Postgres' names for the result columns (the batches keep the plan's).
    let schema = crate::pg_compat::rename(&schema, names.as_deref());
    Ok(match copy {
        Some(format) => Outcome::CopyOut {
            schema,
            stream,
            format,
        },
        None => Outcome::Stream { schema, stream },
    })
}

/// `COPY (query) TO STDOUT …`: the query and how its rows are written; other statements as
/// they are. Other forms of `COPY` are refused.
fn copy_out(stmt: DFStatement) -> Result<(DFStatement, Option<crate::copy::CopyFormat>)> {
    use datafusion::sql::sqlparser::ast::{CopySource, CopyTarget};
    let DFStatement::Statement(s) = stmt else {
        if let DFStatement::CopyTo(_) = stmt {
            return Err(SqlError::NotSupported(
                "COPY … TO a file is not supported: use COPY (query) TO STDOUT (psql: \\copy (query) TO 'file')".into(),
            )
            .into());
        }
        return Ok((stmt, None));
    };
    match *s {
        Statement::Copy {
            source,
            to,
            target,
            options,
            legacy_options,
            ..
        } => match (source, to, target) {
            (CopySource::Query(q), true, CopyTarget::Stdout) => {
                let format = crate::copy::CopyFormat::from_options(&options, &legacy_options)?;
                Ok((
                    DFStatement::Statement(Box::new(Statement::Query(q))),
                    Some(format),
                ))
            }
            (CopySource::Table { table_name, .. }, true, CopyTarget::Stdout) => Err(SqlError::NotSupported(format!(
                "COPY {table_name} TO STDOUT: write COPY (SELECT * FROM {table_name}) TO STDOUT"
            ))
            .into()),
            _ => Err(SqlError::NotSupported(
                "only COPY (query) TO STDOUT is supported: sources and streams are not written by COPY".into(),
            )
            .into()),
        },
        other => Ok((DFStatement::Statement(Box::new(other)), None)),
    }
}

/// `SET`: `statement_timeout` and `datafusion.*` options apply to the session alone;
/// the other settings clients send on connect (`extra_float_digits`, `application_name`…)
/// are accepted and have no effect.
fn set_variable(adhoc: &AdHoc, set: &Set, session: &Session) -> Result<Outcome> {
    let done = Ok(Outcome::Command("SET".into()));
    let Set::SingleAssignment {
        variable, values, ..
    } = set
    else {
        return done;
    };
    let name = variable.to_string().to_ascii_lowercase();
    let value = match values.as_slice() {
        [SqlExpr::Value(v)] => match &v.value {
            Value::SingleQuotedString(s) | Value::DoubleQuotedString(s) => s.clone(),
            other => other.to_string(),
        },
        [other] => other.to_string(),
        _ => values
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(","),
    };
    if name == "statement_timeout" {
        session.set_statement_timeout(parse_timeout(&value)?);
    } else if !name.starts_with("datafusion.") {
        // Drivers' connect-time settings: kept for SHOW, not acted on. One Sluice does not
        // know is taken too (drivers send their own), with a notice saying so.
        if !crate::session::SERVER_SETTINGS
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case(&name))
        {
            session.notice(format!(
                "setting \"{name}\" is not known to Sluice: accepted, with no effect"
            ));
        }
        session.set_setting(name, value);
    } else {
        // Checked on a copy of the shared options: an unknown name or a bad value is an
        // error now, not at the next query.
        let mut options = adhoc.options();
        options
            .set(&name, &value)
            .map_err(|e| SqlError::InvalidOption(e.to_string()))?;
        session.set_option(name, value);
    }
    done
}

/// `SHOW name`: one row, one text column named after the setting.
fn show_setting(name: &str, value: String) -> Result<Outcome> {
    let schema = Arc::new(Schema::new(vec![Field::new(
        name.to_ascii_lowercase(),
        DataType::Utf8,
        false,
    )]));
    let batch = RecordBatch::try_new(
        Arc::clone(&schema),
        vec![Arc::new(arrow::array::StringArray::from(vec![value]))],
    )
    .map_err(|e| ServerError::Internal(e.to_string()))?;
    Ok(Outcome::Rows {
        schema,
        batches: vec![batch],
    })
}

/// A `statement_timeout` value: Postgres's forms (`5000` ms, `'5s'`, `'1min'`, `0` none).
fn parse_timeout(value: &str) -> Result<std::time::Duration> {
    let v = value.trim();
    if let Ok(ms) = v.parse::<u64>() {
        return Ok(std::time::Duration::from_millis(ms));
    }
    sluice_engine::options::parse_duration(v).ok_or_else(|| {
        SqlError::InvalidOption(format!(
            "invalid value for parameter \"statement_timeout\": \"{value}\" (a duration such as '30s', '5min', or milliseconds; 0 for none)"
        ))
        .into()
    })
}

/// Whether a query writes its rows into a new table (`SELECT … INTO t`).
fn selects_into(stmt: &DFStatement) -> bool {
    fn set_expr(e: &SetExpr) -> bool {
        match e {
            SetExpr::Select(s) => s.into.is_some(),
            SetExpr::Query(q) => set_expr(&q.body),
            SetExpr::SetOperation { left, right, .. } => set_expr(left) || set_expr(right),
            _ => false,
        }
    }
    match stmt {
        DFStatement::Statement(s) => match s.as_ref() {
            Statement::Query(q) => set_expr(&q.body),
            _ => false,
        },
        DFStatement::Explain(e) => selects_into(&e.statement),
        _ => false,
    }
}

/// Appends `name` and (first) every stream reading it, transitively, to `order`.
/// Publishes again what a push source stored after `position`; a failure fails the
/// source (its raw zone still holds every acknowledged record).
async fn replay(source: &RunningSource, position: &serde_json::Value) {
    let Some(push) = &source.push else { return };
    if let Err(e) = push.replay(position).await {
        tracing::error!(source = %source.def.name, error = %e, "cannot replay what followed the last checkpoint");
        *source.status.lock().unwrap_or_else(|e| e.into_inner()) =
            crate::runtime::Status::Failed(format!("replaying after the last checkpoint: {e}"));
    }
}

fn collect_drop_order(
    state: &State,
    kind: ObjectKind,
    name: &str,
    order: &mut Vec<(ObjectKind, String)>,
) {
    for (k, reader) in state.readers_of(name) {
        collect_drop_order(state, k, &reader, order);
    }
    if !order.iter().any(|(_, n)| n == name) {
        order.push((kind, name.to_string()));
    }
}

pub(crate) fn is_query(stmt: &DFStatement) -> bool {
    match stmt {
        DFStatement::Statement(s) => matches!(
            s.as_ref(),
            Statement::Query(_)
                | Statement::Explain { .. }
                | Statement::ShowVariable { .. }
                | Statement::ShowTables { .. }
                | Statement::ShowColumns { .. }
        ),
        DFStatement::Explain(e) => is_query(&e.statement),
        _ => false,
    }
}

fn statement_head(stmt: &DFStatement) -> String {
    let text = stmt.to_string();
    text.split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

fn explain_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![Field::new("plan", DataType::Utf8, false)]))
}

/// The rows of `SHOW CREATE TABLE … FOR ATHENA`: one, the DDL.
fn athena_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![Field::new("ddl", DataType::Utf8, false)]))
}
