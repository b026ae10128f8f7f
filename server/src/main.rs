//! The `sluice` binary.

use std::net::SocketAddr;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sluice_server::ServerConfig;

/// Sluice: streaming SQL on Apache Arrow and DataFusion.
///
/// Register unbounded sources (CREATE SOURCE), run continuous queries over them
/// (CREATE STREAM … AS SELECT) whose results land as Hive-partitioned Parquet in a lake, and
/// query what landed, all from psql.
#[derive(Debug, Parser)]
#[command(name = "sluice", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server: Postgres wire protocol for SQL, HTTP for ingestion and health.
    ///
    /// Connect with: psql -h 127.0.0.1 -p 6875 -U sluice sluice
    Serve(ServeArgs),
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Where the lake lives: a local directory (created if missing) or s3://bucket/prefix
    /// (credentials, region and endpoint from the usual AWS_* variables). Sources, streams
    /// and their data survive restarts: the catalog is kept in the lake.
    #[arg(long, env = "SLUICE_LAKE", default_value = "./sluice-lake")]
    lake: String,

    /// Address of the Postgres-protocol listener (user and database: sluice; no password).
    /// Port 0 picks a free port (printed at startup).
    #[arg(long, env = "SLUICE_PG_LISTEN", default_value = "127.0.0.1:6875")]
    pg_listen: SocketAddr,

    /// Address of the HTTP listener: POST /v1/sources/{name}/events, GET /health.
    /// Port 0 picks a free port (printed at startup).
    #[arg(long, env = "SLUICE_HTTP_LISTEN", default_value = "127.0.0.1:6876")]
    http_listen: SocketAddr,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("sluice")
        .build()
        .context("cannot start the async runtime")?;
    match cli.command {
        Command::Serve(args) => runtime.block_on(serve(args)),
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = ServerConfig {
        lake: args.lake.clone(),
        pg_listen: args.pg_listen,
        http_listen: args.http_listen,
    };
    let server = sluice_server::start(&config)
        .await
        .with_context(|| format!("cannot start with the lake at {}", args.lake))?;
    // These lines are the startup contract that scripts and tests read.
    println!("sluice: lake {}", server.sluice.lake().location());
    println!("sluice: pgwire listening on {}", server.pg_addr);
    println!("sluice: http listening on {}", server.http_addr);
    shutdown_signal().await;
    tracing::info!("shutting down: flushing pipelines to the lake");
    server.shutdown().await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
