//! [`Node`]: what the front doors talk to — the lake's writer ([`Sluice`]), or a standby
//! that serves ad-hoc queries over the lake and waits to take over (see [`crate::lease`]).
//!
//! A standby runs no pipeline. It answers queries over the files the writer lands (its
//! tables follow the catalog the writer keeps in the lake), `SHOW STATUS`, and session
//! statements; DDL, `SHOW STREAMS` and HTTP ingest get a clear "standby; the writer is …"
//! error (SQLSTATE 25006, HTTP 503). When the lease expires it recovers the last checkpoint
//! and becomes the writer.

use std::sync::{Arc, Mutex, RwLock};

use datafusion::common::ParamValues;
use sluice_connectors::lake::Lake;
use sluice_engine::push::PushSource;
use sluice_sql::{ObjectKind, Relation, SluiceStatement, parse_sql, source_def};

use crate::query_runtime;
use crate::session::Session;

use crate::access::AccessControl;
use crate::adhoc::AdHoc;
use crate::catalog;
use crate::error::{Result, ServerError};
use crate::instance::{Described, Outcome, Sluice, is_query, run_adhoc};
use crate::lease::LeaseRecord;

/// A server's role in its lake, shared by every connection.
#[derive(Debug, Clone)]
pub struct Node {
    role: Arc<RwLock<Role>>,
    /// Who may log in and do what (the writer's, or the catalog's as a standby reads it).
    access: Arc<AccessControl>,
}

#[derive(Debug, Clone)]
enum Role {
    Standby(Arc<StandbyView>),
    Writer(Sluice),
}

/// A standby's read-only view of the lake.
#[derive(Debug)]
pub struct StandbyView {
    lake: Lake,
    /// The writer, as the lease says (updated while the standby watches it).
    holder: Arc<Mutex<LeaseRecord>>,
    /// Ad-hoc tables, rebuilt when the writer's catalog changes: (its bytes, the context).
    adhoc: tokio::sync::Mutex<Option<(Vec<u8>, AdHoc)>>,
    /// Follows the catalog's roles and grants.
    access: Arc<AccessControl>,
}

impl Node {
    /// The writer of its lake.
    pub fn writer(sluice: Sluice) -> Self {
        Self {
            access: Arc::clone(sluice.access()),
            role: Arc::new(RwLock::new(Role::Writer(sluice))),
        }
    }

    /// A standby of `lake`, whose writer is `holder`; `access` follows the lake's catalog
    /// (and is the writer's once this server takes over).
    pub fn standby(
        lake: Lake,
        holder: Arc<Mutex<LeaseRecord>>,
        access: Arc<AccessControl>,
    ) -> Self {
        let view = StandbyView {
            lake,
            holder,
            adhoc: tokio::sync::Mutex::new(None),
            access: Arc::clone(&access),
        };
        Self {
            role: Arc::new(RwLock::new(Role::Standby(Arc::new(view)))),
            access,
        }
    }

    /// Who may log in and do what.
    pub fn access(&self) -> &Arc<AccessControl> {
        &self.access
    }

    /// Brings a standby's roles and grants up to the catalog in the lake (a login may be
    /// of a user the writer made since); the writer's are always current.
    pub async fn refresh_access(&self) {
        if let Role::Standby(v) = self.role()
            && let Err(e) = v.adhoc().await
        {
            tracing::warn!(error = %e, "standby: cannot read the catalog");
        }
    }

    /// Becomes the writer (after a takeover).
    pub fn promote(&self, sluice: Sluice) {
        *self.role.write().unwrap_or_else(|e| e.into_inner()) = Role::Writer(sluice);
    }

    fn role(&self) -> Role {
        self.role.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The instance, when this server is the writer.
    pub fn sluice(&self) -> Option<Sluice> {
        match self.role() {
            Role::Writer(s) => Some(s),
            Role::Standby(_) => None,
        }
    }

    /// `Ok` for the writer; for a standby, the error that names the writer.
    pub fn ready(&self) -> std::result::Result<(), String> {
        match self.role() {
            Role::Writer(s) => s.fenced().map_err(|e| e.to_string()),
            Role::Standby(v) => Err(v.refusal()),
        }
    }

    /// Executes every statement in `sql` in a client's `session` (see [`Sluice::execute`]),
    /// with the values of a query's parameters if it has some.
    pub async fn execute(
        &self,
        sql: &str,
        session: &Session,
        params: Option<ParamValues>,
    ) -> Vec<Result<Outcome>> {
        match self.role() {
            Role::Writer(s) => s.execute_bound(sql, session, params).await,
            Role::Standby(v) => v.execute(sql, session, params).await,
        }
    }

    /// The parameters `sql` takes and the rows it returns (see [`Sluice::describe`]).
    pub async fn describe(&self, sql: &str, session: &Session) -> Result<Described> {
        match self.role() {
            Role::Writer(s) => s.describe(sql, session).await,
            Role::Standby(v) => v.describe(sql, session).await,
        }
    }

    /// The receiving end of push source `name` (see [`Sluice::push_source`]); a standby
    /// refuses, naming the writer.
    pub fn push_source(
        &self,
        name: &str,
    ) -> std::result::Result<Option<Arc<dyn PushSource>>, IngestRefusal> {
        match self.role() {
            Role::Writer(s) => {
                s.fenced()
                    .map_err(|e| IngestRefusal::Unavailable(e.to_string()))?;
                s.push_source(name).map_err(IngestRefusal::Conflict)
            }
            Role::Standby(v) => Err(IngestRefusal::Unavailable(v.refusal())),
        }
    }

    /// Stops the pipelines of a writer (see [`Sluice::shutdown`]).
    pub async fn shutdown(&self) {
        if let Role::Writer(s) = self.role() {
            s.shutdown().await;
        }
    }
}

/// Why an ingest request is not taken.
#[derive(Debug)]
pub enum IngestRefusal {
    /// The name is not an `http` source (409).
    Conflict(String),
    /// This server is not the writer (503): the message names it.
    Unavailable(String),
}

impl StandbyView {
    fn holder(&self) -> LeaseRecord {
        self.holder
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// "this server is a standby; the writer is …".
    fn refusal(&self) -> String {
        format!(
            "this server is a standby; the writer is {}",
            self.holder().describe()
        )
    }

    async fn execute(
        &self,
        sql: &str,
        session: &Session,
        params: Option<ParamValues>,
    ) -> Vec<Result<Outcome>> {
        let stmts = match crate::pg_compat::parse(sql) {
            Ok(s) => s,
            Err(e) => return vec![Err(e.into())],
        };
        let mut out = vec![];
        for stmt in stmts {
            let r = self.statement(stmt, session, params.clone()).await;
            let failed = r.is_err();
            out.push(r);
            if failed {
                break;
            }
        }
        out
    }

    async fn statement(
        &self,
        stmt: SluiceStatement,
        session: &Session,
        params: Option<ParamValues>,
    ) -> Result<Outcome> {
        match stmt {
            SluiceStatement::ShowStatus => {
                let h = self.holder();
                crate::show::status(
                    "standby",
                    self.lake.location(),
                    &h.pg,
                    &h.http,
                    Some(h.generation as i64),
                )
            }
            SluiceStatement::Other(s) => {
                run_adhoc(&self.adhoc().await?, &self.access, *s, session, params).await
            }
            _ => Err(ServerError::Standby(format!(
                "{}: run DDL and SHOW there",
                self.refusal()
            ))),
        }
    }

    async fn describe(&self, sql: &str, session: &Session) -> Result<Described> {
        let mut stmts = crate::pg_compat::parse(sql)?;
        match stmts.pop() {
            Some(SluiceStatement::ShowStatus) => {
                Ok(Described::rows(Some(crate::show::status_schema())))
            }
            Some(SluiceStatement::Other(mut s)) if is_query(&s) => {
                let adhoc = self.adhoc().await?;
                adhoc.guard(&self.access, session.user(), &mut s)?;
                Described::query(&adhoc, *s).await
            }
            _ => Ok(Described::default()),
        }
    }

    /// The ad-hoc context over the writer's catalog as it is now in the lake.
    async fn adhoc(&self) -> Result<AdHoc> {
        let bytes = catalog::raw(&self.lake).await?.unwrap_or_default();
        let mut cached = self.adhoc.lock().await;
        if let Some((seen, adhoc)) = cached.as_ref()
            && *seen == bytes
        {
            return Ok(adhoc.clone());
        }
        let adhoc = AdHoc::new(self.lake.clone());
        let connectors = sluice_connectors::registry(&self.lake);
        let mut relations: std::collections::BTreeMap<String, Relation> = Default::default();
        let catalog = catalog::parse(&bytes)?;
        self.access.replace(catalog.access);
        for e in catalog.entries {
            let Ok(mut stmts) = parse_sql(&e.sql) else {
                continue;
            };
            // What cannot be planned here (the writer could not restore it either) is left out.
            match stmts.pop() {
                Some(SluiceStatement::CreateSource(c)) => {
                    if let Ok(def) = source_def(&c, &connectors) {
                        adhoc.register_source(&c.name, Arc::clone(&def.schema))?;
                        relations.insert(
                            c.name.clone(),
                            Relation {
                                kind: ObjectKind::Source,
                                schema: Arc::clone(&def.schema),
                                event_time_column: def.watermark.as_ref().map(|w| w.column.clone()),
                                primary_key: c.primary_key.clone(),
                            },
                        );
                    }
                }
                Some(SluiceStatement::CreateStream(c)) => {
                    if let Ok(plan) = query_runtime::plan_stream(&c, relations.clone()).await {
                        adhoc.register_stream(&c.name, &plan.output_schema)?;
                        relations.insert(
                            c.name.clone(),
                            Relation {
                                kind: ObjectKind::Stream,
                                schema: Arc::clone(&plan.output_schema),
                                event_time_column: plan.event_time_column.clone(),
                                primary_key: plan.primary_key.clone(),
                            },
                        );
                    }
                }
                _ => {}
            }
        }
        *cached = Some((bytes, adhoc.clone()));
        Ok(adhoc)
    }
}
