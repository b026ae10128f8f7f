//! Starting the listeners of a Sluice instance (what `sluice serve` does).

use std::net::SocketAddr;
use std::time::Duration;

use sluice_connectors::lake::Lake;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use std::sync::Arc;

use crate::access::AccessControl;
use crate::connections::{ConnectionLimits, Connections, HttpListener, Limit};
use crate::error::{Result, ServerError};
use crate::instance::Sluice;
use crate::lease::{self, Acquired, Candidate, WriterLease};
use crate::node::Node;

/// Where to put the lake and the listeners.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The lake location (local directory or `s3://bucket/prefix`).
    pub lake: String,
    /// Postgres-protocol listener address (port 0: any free port).
    pub pg_listen: SocketAddr,
    /// HTTP listener address (port 0: any free port).
    pub http_listen: SocketAddr,
    /// How long the writer lease lasts without renewal (`--lease-ttl`).
    pub lease_ttl: Duration,
    /// How long a statement may run unless its session sets `statement_timeout` (zero: no
    /// limit; `--statement-timeout`).
    pub statement_timeout: Duration,
    /// How many checkpoints to keep (`--checkpoint-retention`).
    pub checkpoint_retention: usize,
    /// Connection limits and timeouts of both listeners.
    pub connections: ConnectionLimits,
    /// Passwords, secrets and TLS.
    pub security: Security,
    /// The Glue database streams' tables are registered in (`--glue-database`).
    pub glue_database: Option<String>,
}

/// The security settings of a server (see [`crate::access`] and [`crate::tls`]).
#[derive(Debug, Clone, Default)]
pub struct Security {
    /// The superuser's password (`SLUICE_PASSWORD`); none: logins are trusted, and the
    /// listeners must be on loopback addresses.
    pub password: Option<String>,
    /// The key that seals secrets (`SLUICE_SECRET_KEY`).
    pub secret_key: Option<String>,
    /// TLS for both listeners.
    pub tls: Option<crate::tls::TlsFiles>,
}

/// A started server.
#[derive(Debug)]
pub struct RunningServer {
    /// Writer or standby.
    pub node: Node,
    /// The lake's location, for messages.
    pub lake: String,
    /// Where the Postgres-protocol listener is bound.
    pub pg_addr: SocketAddr,
    /// Where the HTTP listener is bound.
    pub http_addr: SocketAddr,
    /// `Some(writer)` if this server started as the lake's writer, `None` as a standby.
    pub started_as_writer: bool,
    /// Cancelled when this server loses the writer lease after holding it: it must stop
    /// at once, committing nothing more.
    pub lease_lost: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

/// Binds both listeners, opens the lake and takes its writer lease (restoring the catalog
/// and running every pipeline), or serves as a standby until the lease expires.
pub async fn start(config: &ServerConfig) -> Result<RunningServer> {
    let security = &config.security;
    if security.password.is_none() {
        for (flag, addr) in [
            ("--pg-listen", config.pg_listen),
            ("--http-listen", config.http_listen),
        ] {
            if !addr.ip().is_loopback() {
                return Err(ServerError::External(format!(
                    "refusing to listen on {addr} ({flag}) without a password: anyone who reaches it \
                     could do anything. Set SLUICE_PASSWORD (or --password-file) to require logins, \
                     or listen on a loopback address (127.0.0.1, ::1)"
                )));
            }
        }
    }
    let tls = security
        .tls
        .as_ref()
        .map(crate::tls::Tls::load)
        .transpose()?;
    let access = Arc::new(AccessControl::new(
        security.password.as_deref(),
        security.secret_key.as_deref(),
    ));
    let bind = |what: &'static str, addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|e| ServerError::External(format!("cannot listen on {addr} ({what}): {e}")))
    };
    let pg = bind("--pg-listen", config.pg_listen).await?;
    let http = bind("--http-listen", config.http_listen).await?;
    let local = |l: &TcpListener| {
        l.local_addr()
            .map_err(|e| ServerError::External(e.to_string()))
    };
    let (pg_addr, http_addr) = (local(&pg)?, local(&http)?);
    let lake = Lake::open(&config.lake)?;
    let glue = match &config.glue_database {
        Some(db) => Some(sluice_connectors::lake::GlueCatalog::connect(db).await?),
        None => None,
    };
    let me = Candidate {
        pg: pg_addr.to_string(),
        http: http_addr.to_string(),
        ttl: config.lease_ttl,
    };
    let lease_lost = CancellationToken::new();
    let forward = |lease: &WriterLease| {
        let (lost, ours) = (lease.lost(), lease_lost.clone());
        tokio::spawn(async move {
            lost.cancelled().await;
            ours.cancel();
        });
    };
    let (node, started_as_writer) = match lease::acquire(&lake, me).await? {
        Acquired::Writer(lease) => {
            forward(&lease);
            let sluice = Sluice::open_as_writer(
                lake.clone(),
                Some(lease),
                config.checkpoint_retention,
                Arc::clone(&access),
                glue.clone(),
            )
            .await?;
            (Node::writer(sluice), true)
        }
        Acquired::Standby(standby) => {
            let holder = standby
                .holder
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .describe();
            tracing::info!(
                "standby: the lake's writer is {holder}; serving queries, taking over when its lease expires"
            );
            let node = Node::standby(
                lake.clone(),
                Arc::clone(&standby.holder),
                Arc::clone(&access),
            );
            let promoted = node.clone();
            let lost = lease_lost.clone();
            let lake = lake.clone();
            let retention = config.checkpoint_retention;
            let access = Arc::clone(&access);
            let glue = glue.clone();
            tokio::spawn(async move {
                let lease = match standby.take_over().await {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!("standby: cannot take the writer lease: {e}");
                        return;
                    }
                };
                let (from, to) = (lease.lost(), lost.clone());
                tokio::spawn(async move {
                    from.cancelled().await;
                    to.cancel();
                });
                tracing::info!("standby: taking over as the lake's writer");
                match Sluice::open_as_writer(lake, Some(lease), retention, access, glue).await {
                    Ok(sluice) => promoted.promote(sluice),
                    Err(e) => {
                        tracing::error!("cannot take over the lake: {e}");
                        lost.cancel();
                    }
                }
            });
            (node, false)
        }
    };
    let limits = config.connections;
    let (pg_limit, http_limit) = (Limit::new(limits.pg_max), Limit::new(limits.http_max));
    let counters = Connections {
        pg: Arc::clone(&pg_limit.counters),
        http: Arc::clone(&http_limit.counters),
    };
    let app = crate::http::router(node.clone(), counters);
    let http = HttpListener::new(http, http_limit, limits.http_idle)
        .with_tls(tls.as_ref().map(|t| t.http.clone()));
    let tasks = vec![
        tokio::spawn(crate::pg::serve(
            pg,
            node.clone(),
            config.statement_timeout,
            pg_limit,
            limits.pg_startup_timeout,
            tls.map(|t| t.pg),
        )),
        tokio::spawn(async move {
            if let Err(e) = axum::serve(http, app).await {
                tracing::error!(error = %e, "http listener failed");
            }
        }),
    ];
    Ok(RunningServer {
        node,
        lake: lake.location().to_string(),
        pg_addr,
        http_addr,
        started_as_writer,
        lease_lost,
        tasks,
    })
}

impl RunningServer {
    /// Stops accepting connections, then stops every pipeline, flushing it to the lake.
    pub async fn shutdown(self) {
        for t in &self.tasks {
            t.abort();
        }
        self.node.shutdown().await;
    }
}
