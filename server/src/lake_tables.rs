//! Each stream's table over its processed files, kept in step with the data: the
//! `_athena_table.sql` file next to them and, with `--glue-database`, its table in the Glue
//! Data Catalog. The `dt` partition projection starts at the stream's first event date
//! rather than 1970 (a query without a `dt` filter then projects the days the stream has,
//! not some 20 000 days).
//!
//! A stream's table is published when the stream is created or restored, starting at the
//! earliest `dt` folder its processed prefix holds (today for a stream without data yet),
//! and published again once a file lands on an earlier day (a backfill, late rows):
//! [`LakeTables::sync`] runs every [`SYNC_INTERVAL`] and compares the earliest day the lake's
//! writers committed to ([`sluice_connectors::lake::LakeStats::first_day`]) with the
//! published one. A failed write or Glue call never stops the stream: it is retried (Glue
//! with a backoff up to [`MAX_GLUE_BACKOFF`]), counted, and shown in `SHOW STREAMS`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::datatypes::SchemaRef;
use sluice_connectors::lake::{
    ATHENA_DDL_FILE, GlueCatalog, Lake, PartitionMarker, Zone, athena_ddl, today, write_athena_ddl,
};
use sluice_engine::checkpoint::Fence;
use tokio_util::sync::CancellationToken;

use crate::error::{Result, ServerError};

/// How often [`LakeTables::sync`] runs.
pub const SYNC_INTERVAL: Duration = Duration::from_secs(2);

/// The longest wait between two attempts at a failing Glue table.
pub const MAX_GLUE_BACKOFF: Duration = Duration::from_secs(60);

/// Where a stream's Glue table stands.
#[derive(Debug, Default, Clone)]
struct GlueState {
    /// The first day of the table as last registered (`None`: not registered yet).
    registered: Option<String>,
    /// The last failure, while failing.
    error: Option<String>,
    /// Failed calls so far.
    failures: u64,
    /// No attempt before this (after a failure).
    next_try: Option<Instant>,
}

impl GlueState {
    /// A Glue call for `stream`'s `what` (table, partition) failed: counted, shown, and
    /// retried after a backoff doubling from [`SYNC_INTERVAL`] up to [`MAX_GLUE_BACKOFF`].
    fn failed(&mut self, stream: &str, what: &str, e: &dyn std::fmt::Display) {
        self.failures += 1;
        let wait = SYNC_INTERVAL
            .saturating_mul(1 << self.failures.min(5))
            .min(MAX_GLUE_BACKOFF);
        tracing::warn!(
            stream,
            failures = self.failures,
            "Glue {what} (retried in {wait:?}): {e}"
        );
        self.error = Some(e.to_string());
        self.next_try = Some(Instant::now() + wait);
    }
}

/// One stream's table.
#[derive(Debug)]
struct Table {
    /// The rows as they are in the lake.
    schema: SchemaRef,
    /// The first day its projection should start at.
    wanted: String,
    /// The first day of the DDL file last written (`None`: nothing yet, or it failed).
    written: Option<String>,
    /// A type Athena lacks: no table can describe the stream (not retried).
    unsupported: bool,
    glue: GlueState,
    /// Partitions marked complete whose Glue partition is not written yet, by (dt, hour).
    finals: std::collections::BTreeMap<(String, String), PartitionMarker>,
}

/// The tables of every stream. See the module docs.
#[derive(Debug)]
pub struct LakeTables {
    lake: Lake,
    glue: Option<GlueCatalog>,
    /// The writer lease: a process that may have lost it writes nothing more.
    fence: Arc<dyn Fence>,
    tables: std::sync::Mutex<HashMap<String, Table>>,
    /// One publication at a time (the last write of a table is its newest description).
    publishing: tokio::sync::Mutex<()>,
}

impl LakeTables {
    /// The tables of the streams of `lake`, registered in `glue` too when given; nothing is
    /// written once `fence` says the writer lease may be lost.
    pub fn new(lake: Lake, glue: Option<GlueCatalog>, fence: Arc<dyn Fence>) -> Self {
        Self {
            lake,
            glue,
            fence,
            tables: std::sync::Mutex::default(),
            publishing: tokio::sync::Mutex::new(()),
        }
    }

    fn tables(&self) -> std::sync::MutexGuard<'_, HashMap<String, Table>> {
        self.tables.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes the table of `stream`, whose lake rows have `schema` (created or restored;
    /// a stream created again with another schema updates it): its DDL file now, its Glue
    /// table from the next [`LakeTables::sync`] (a slow or failing Glue never holds up a
    /// `CREATE STREAM`).
    pub async fn register(&self, stream: &str, schema: SchemaRef) {
        let listed = match self.lake.first_partition_day(stream).await {
            Ok(day) => day,
            Err(e) => {
                tracing::warn!(stream, "cannot list its partitions: {e}");
                None
            }
        };
        let committed = self.lake.stats().first_day(stream);
        let wanted = [listed, committed]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or_else(today);
        let glue = self
            .tables()
            .remove(stream)
            .map(|t| GlueState {
                registered: None,
                ..t.glue
            })
            .unwrap_or_default();
        self.tables().insert(
            stream.to_string(),
            Table {
                schema,
                wanted,
                written: None,
                unsupported: false,
                glue,
                finals: Default::default(),
            },
        );
        self.sync_one(stream, false).await;
    }

    /// A partition of `marker.stream` is final (compacted, its `_SUCCESS` marker written):
    /// with Glue, its partition is written with the marker's figures from the next
    /// [`LakeTables::sync`] on (retried like the table).
    pub fn partition_final(&self, marker: &PartitionMarker) {
        if self.glue.is_none() {
            return;
        }
        if let Some(t) = self.tables().get_mut(&marker.stream) {
            t.finals
                .insert((marker.dt.clone(), marker.hour.clone()), marker.clone());
        }
    }

    /// Forgets `stream` (dropped): its files and table stay.
    pub fn forget(&self, stream: &str) {
        self.tables().remove(stream);
    }

    /// Removes the table of a dropped stream: its DDL file and its Glue table (its data
    /// stays).
    pub async fn drop_table(&self, stream: &str) -> Result<()> {
        let _one = self.publishing.lock().await;
        self.fence.check()?;
        self.tables().remove(stream);
        let file = self.lake.dir(Zone::Processed, stream).join(ATHENA_DDL_FILE);
        self.lake.delete(&file).await?;
        if let Some(glue) = &self.glue {
            glue.delete_table(stream).await.map_err(|e| {
                ServerError::External(format!(
                    "stream `{stream}` is dropped, but its Glue table is not: {e}"
                ))
            })?;
        }
        Ok(())
    }

    /// The first day of `stream`'s projection (for `SHOW CREATE TABLE … FOR ATHENA`).
    pub fn first_day(&self, stream: &str) -> Option<String> {
        let committed = self.lake.stats().first_day(stream);
        let tables = self.tables();
        let wanted = tables.get(stream).map(|t| t.wanted.clone());
        [wanted, committed].into_iter().flatten().min()
    }

    /// Where `stream`'s Glue table stands, for `SHOW STREAMS`: `None` without Glue;
    /// `registered in <db>`, `registering`, or the failures and the last error while
    /// failing.
    pub fn glue_status(&self, stream: &str) -> Option<String> {
        let glue = self.glue.as_ref()?;
        let tables = self.tables();
        let t = tables.get(stream)?;
        Some(match (&t.glue.error, &t.glue.registered) {
            (Some(e), _) => format!("retrying ({} failed): {e}", t.glue.failures),
            (None, Some(_)) => format!("registered in {}", glue.database()),
            (None, None) if t.unsupported => "not registered: a type Glue lacks".into(),
            (None, None) => "registering".into(),
        })
    }

    /// Failed Glue calls per stream, for the metrics.
    pub fn glue_failures(&self) -> Vec<(String, u64)> {
        if self.glue.is_none() {
            return vec![];
        }
        self.tables()
            .iter()
            .map(|(name, t)| (name.clone(), t.glue.failures))
            .collect()
    }

    /// One round: publishes again every table whose stream committed a file to a day
    /// before its projection's first day, or whose last publication failed.
    pub async fn sync(&self) {
        let names: Vec<String> = self.tables().keys().cloned().collect();
        for name in names {
            self.sync_one(&name, true).await;
        }
    }

    /// Publishes `stream`'s table where it is behind: its DDL file, and its Glue table
    /// when `with_glue` (and a Glue catalog is configured, and no backoff is running).
    async fn sync_one(&self, stream: &str, with_glue: bool) {
        let _one = self.publishing.lock().await;
        let committed = self.lake.stats().first_day(stream);
        let (schema, day, write_file, call_glue) = {
            let mut tables = self.tables();
            let Some(t) = tables.get_mut(stream) else {
                return;
            };
            if let Some(c) = committed
                && c < t.wanted
            {
                t.wanted = c;
            }
            if t.unsupported {
                return;
            }
            let write_file = t.written.as_ref() != Some(&t.wanted);
            let call_glue = with_glue
                && self.glue.is_some()
                && t.glue.registered.as_ref() != Some(&t.wanted)
                && t.glue.next_try.is_none_or(|n| Instant::now() >= n);
            (
                Arc::clone(&t.schema),
                t.wanted.clone(),
                write_file,
                call_glue,
            )
        };
        if !write_file && !call_glue {
            self.sync_partitions(stream, with_glue).await;
            return;
        }
        // A writer that may have lost its lease (paused past it, say) writes nothing more.
        if self.fence.check().is_err() {
            return;
        }
        let ddl = match athena_ddl(&self.lake, stream, &schema, &day, None) {
            Ok(ddl) => ddl,
            Err(e) => {
                // A type Athena lacks only costs the table.
                tracing::warn!(stream, "no Athena table: {e}");
                if let Some(t) = self.tables().get_mut(stream) {
                    t.unsupported = true;
                }
                return;
            }
        };
        if write_file {
            let written = match write_athena_ddl(&self.lake, stream, &ddl).await {
                Ok(_) => Some(day.clone()),
                Err(e) => {
                    tracing::warn!(stream, "cannot write the Athena DDL (retried): {e}");
                    None
                }
            };
            if let Some(t) = self.tables().get_mut(stream) {
                t.written = written;
            }
        }
        if let (true, Some(glue)) = (call_glue, &self.glue) {
            let result = match glue.ensure_database().await {
                Ok(()) => glue.upsert_table(&self.lake, stream, &schema, &day).await,
                Err(e) => Err(e),
            };
            let mut tables = self.tables();
            let Some(t) = tables.get_mut(stream) else {
                return;
            };
            match result {
                Ok(()) => {
                    t.glue.registered = Some(day);
                    t.glue.error = None;
                    t.glue.next_try = None;
                }
                Err(e) => t.glue.failed(stream, "table", &e),
            }
        }
        self.sync_partitions(stream, with_glue).await;
    }

    /// Writes the Glue partitions of `stream` marked final since the last round, once its
    /// table is registered (a failure counts, and waits like the table's).
    async fn sync_partitions(&self, stream: &str, with_glue: bool) {
        let Some(glue) = self.glue.as_ref().filter(|_| with_glue) else {
            return;
        };
        let (schema, finals) = {
            let tables = self.tables();
            let Some(t) = tables.get(stream) else {
                return;
            };
            let ready =
                t.glue.registered.is_some() && t.glue.next_try.is_none_or(|n| Instant::now() >= n);
            if !ready || t.finals.is_empty() {
                return;
            }
            (Arc::clone(&t.schema), t.finals.clone())
        };
        if self.fence.check().is_err() {
            return;
        }
        for (key, marker) in finals {
            let result = glue
                .upsert_partition(&self.lake, stream, &schema, &marker)
                .await;
            let mut tables = self.tables();
            let Some(t) = tables.get_mut(stream) else {
                return;
            };
            match result {
                Ok(()) => {
                    // Unless marked again meanwhile (a reopened hour, compacted again).
                    if t.finals.get(&key) == Some(&marker) {
                        t.finals.remove(&key);
                    }
                }
                Err(e) => {
                    t.glue.failed(stream, "partition", &e);
                    return;
                }
            }
        }
        if let Some(t) = self.tables().get_mut(stream) {
            t.glue.error = None;
        }
    }

    /// Runs [`LakeTables::sync`] every [`SYNC_INTERVAL`] until `shutdown`.
    pub fn spawn(self: &Arc<Self>, shutdown: CancellationToken) {
        let tables = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SYNC_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => tables.sync().await,
                }
            }
        });
    }
}
