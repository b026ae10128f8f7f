//! Starting the listeners of a Sluice instance (what `sluice serve` does).

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::error::{Result, ServerError};
use crate::instance::Sluice;

/// Where to put the lake and the listeners.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The lake location (local directory or `s3://bucket/prefix`).
    pub lake: String,
    /// Postgres-protocol listener address (port 0: any free port).
    pub pg_listen: SocketAddr,
    /// HTTP listener address (port 0: any free port).
    pub http_listen: SocketAddr,
}

/// A started server.
#[derive(Debug)]
pub struct RunningServer {
    /// The instance.
    pub sluice: Sluice,
    /// Where the Postgres-protocol listener is bound.
    pub pg_addr: SocketAddr,
    /// Where the HTTP listener is bound.
    pub http_addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

/// Binds both listeners, opens the lake (restoring its catalog) and starts serving.
pub async fn start(config: &ServerConfig) -> Result<RunningServer> {
    let bind = |what: &'static str, addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|e| ServerError::Internal(format!("cannot listen on {addr} ({what}): {e}")))
    };
    let pg = bind("--pg-listen", config.pg_listen).await?;
    let http = bind("--http-listen", config.http_listen).await?;
    let local = |l: &TcpListener| {
        l.local_addr()
            .map_err(|e| ServerError::Internal(e.to_string()))
    };
    let (pg_addr, http_addr) = (local(&pg)?, local(&http)?);
    let sluice = Sluice::open(&config.lake).await?;
    let app = crate::http::router(sluice.clone());
    let tasks = vec![
        tokio::spawn(crate::pg::serve(pg, sluice.clone())),
        tokio::spawn(async move {
            if let Err(e) = axum::serve(http, app).await {
                tracing::error!(error = %e, "http listener failed");
            }
        }),
    ];
    Ok(RunningServer {
        sluice,
        pg_addr,
        http_addr,
        tasks,
    })
}

impl RunningServer {
    /// Stops accepting connections, then stops every pipeline, flushing it to the lake.
    pub async fn shutdown(self) {
        for t in &self.tasks {
            t.abort();
        }
        self.sluice.shutdown().await;
    }
}
