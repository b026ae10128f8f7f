//! The `sluice` binary.

use std::net::SocketAddr;
use std::time::Duration;

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

    /// Address of the Postgres-protocol listener (database: sluice; superuser: sluice).
    /// Port 0 picks a free port (printed at startup). An address other than loopback needs
    /// a password (SLUICE_PASSWORD or --password-file).
    #[arg(long, env = "SLUICE_PG_LISTEN", default_value = "127.0.0.1:6875")]
    pg_listen: SocketAddr,

    /// Address of the HTTP listener: POST /v1/sources/{name}/events, GET /health.
    /// Port 0 picks a free port (printed at startup). An address other than loopback needs
    /// a password.
    #[arg(long, env = "SLUICE_HTTP_LISTEN", default_value = "127.0.0.1:6876")]
    http_listen: SocketAddr,

    /// How long the lake's writer lease lasts without renewal (renewed every third of
    /// it). One server writes a lake; another started on the same lake is a standby that
    /// serves queries and takes over once the writer's lease has expired.
    #[arg(long, env = "SLUICE_LEASE_TTL", default_value = "15s", value_parser = parse_lease)]
    lease_ttl: Duration,

    /// How long an ad-hoc statement may run before it is stopped (SQLSTATE 57014), unless
    /// its session sets its own (`SET statement_timeout = '30s'`). 0: no limit.
    #[arg(long, env = "SLUICE_STATEMENT_TIMEOUT", default_value = "0", value_parser = parse_duration)]
    statement_timeout: Duration,

    /// Postgres connections at once; the next are refused (53300 too many clients).
    #[arg(long, env = "SLUICE_PG_MAX_CONNECTIONS", default_value_t = 100)]
    pg_max_connections: usize,

    /// A Postgres connection that has not finished its startup (sent its user and
    /// database) after this long is closed.
    #[arg(long, env = "SLUICE_PG_STARTUP_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pg_startup_timeout: Duration,

    /// HTTP connections at once; the next get 503.
    #[arg(long, env = "SLUICE_HTTP_MAX_CONNECTIONS", default_value_t = 512)]
    http_max_connections: usize,

    /// An HTTP connection that sends or receives nothing for this long is closed (a
    /// half-sent request, an idle keep-alive connection). 0: never.
    #[arg(long, env = "SLUICE_HTTP_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    http_idle_timeout: Duration,

    /// How many checkpoints to keep in the lake (`_sluice/checkpoints/`): when the newest is
    /// damaged, the server starts from the newest one that reads.
    #[arg(long, env = "SLUICE_CHECKPOINT_RETENTION", default_value_t = sluice_engine::checkpoint::DEFAULT_RETENTION as u64,
          value_parser = clap::value_parser!(u64).range(1..))]
    checkpoint_retention: u64,

    /// The memory all ad-hoc queries may hold together (e.g. 4GB); a query that needs
    /// more fails alone. Default: a quarter of the machine's memory.
    #[arg(long, env = "SLUICE_QUERY_MEMORY", value_parser = parse_bytes)]
    query_memory: Option<u64>,

    /// Registers every stream's table in this AWS Glue Data Catalog database (created if
    /// missing): columns, Parquet SerDe, dt/hour partition keys with partition projection,
    /// location. Region, endpoint and credentials come from the AWS environment, as for S3.
    #[arg(long, env = "SLUICE_GLUE_DATABASE", value_name = "NAME")]
    glue_database: Option<String>,

    /// A file holding the superuser's password (its first line), instead of SLUICE_PASSWORD.
    /// With a password every Postgres login is checked with SCRAM-SHA-256 and every HTTP
    /// request needs credentials (Basic, or a bearer token); without one, logins are
    /// trusted and the server listens on loopback addresses only.
    #[arg(long, value_name = "FILE", conflicts_with = "password")]
    password_file: Option<std::path::PathBuf>,

    /// The superuser's password (prefer --password-file: the environment is readable by
    /// the user's other processes).
    #[arg(
        long = "password",
        env = "SLUICE_PASSWORD",
        hide_env_values = true,
        hide = true
    )]
    password: Option<String>,

    /// TLS certificate chain (PEM) for both listeners: pgwire answers SSLRequest
    /// (sslmode=require / verify-full), HTTP becomes HTTPS. Needs --tls-key.
    #[arg(
        long,
        env = "SLUICE_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    tls_cert: Option<std::path::PathBuf>,

    /// The TLS certificate's private key (PEM).
    #[arg(
        long,
        env = "SLUICE_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    tls_key: Option<std::path::PathBuf>,

    /// The key that seals CREATE SECRET values in the lake's catalog: a long random string
    /// (e.g. `openssl rand -base64 32`); the same one every start.
    #[arg(
        long = "secret-key",
        env = "SLUICE_SECRET_KEY",
        hide_env_values = true,
        hide = true
    )]
    secret_key: Option<String>,
}

/// A size such as `512MB`, `4GB`.
fn parse_bytes(s: &str) -> Result<u64, String> {
    sluice_engine::options::parse_bytes(s)
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("`{s}` is not a size (e.g. 512MB, 4GB)"))
}

/// A lease's duration: at least 300 ms.
fn parse_lease(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_millis(300) {
        return Err(format!("`{s}` is too short for a lease: at least 300ms"));
    }
    Ok(d)
}

/// A duration such as `15s`, `500ms`, `2m`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (e.g. 15s, 500ms, 1m)"))?;
    let d = match unit.trim() {
        "ms" => Duration::from_millis(n),
        "s" | "" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        other => return Err(format!("unknown unit `{other}` in `{s}`: use ms, s or m")),
    };
    Ok(d)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
    };
    // `SLUICE_LOG_FORMAT=json`: one JSON object per line, for log shippers; the default is
    // for people.
    match std::env::var("SLUICE_LOG_FORMAT").as_deref() {
        Ok("json") => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter())
            .with_writer(std::io::stderr)
            .init(),
        Ok("text") | Ok("") | Err(std::env::VarError::NotPresent) => tracing_subscriber::fmt()
            .with_env_filter(filter())
            .with_writer(std::io::stderr)
            .init(),
        Ok(other) => {
            eprintln!("sluice: SLUICE_LOG_FORMAT={other} is not known: use `json` or `text`");
            std::process::exit(2);
        }
        Err(std::env::VarError::NotUnicode(_)) => {
            eprintln!("sluice: SLUICE_LOG_FORMAT is not text: use `json` or `text`");
            std::process::exit(2);
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("sluice")
        // Streams evaluate their expressions here: as deep as the planner allows (see
        // `sluice_server::query_runtime`), which takes less stack than planning them.
        .thread_stack_size(64 << 20)
        .build()
        .context("cannot start the async runtime")?;
    match cli.command {
        Command::Serve(args) => runtime.block_on(serve(args)),
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let password = match &args.password_file {
        Some(path) => {
            let text = match std::fs::read_to_string(path) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!(
                        "sluice: cannot read --password-file {}: {e}",
                        path.display()
                    );
                    std::process::exit(2);
                }
            };
            Some(text.lines().next().unwrap_or_default().to_string())
        }
        None => args.password.clone(),
    };
    if password.as_deref() == Some("") {
        eprintln!(
            "sluice: the superuser's password is empty: set one, or unset it to trust logins on loopback"
        );
        std::process::exit(2);
    }
    let config = ServerConfig {
        lake: args.lake.clone(),
        pg_listen: args.pg_listen,
        http_listen: args.http_listen,
        lease_ttl: args.lease_ttl,
        statement_timeout: args.statement_timeout,
        checkpoint_retention: args.checkpoint_retention as usize,
        glue_database: args.glue_database.clone().filter(|d| !d.is_empty()),
        connections: sluice_server::connections::ConnectionLimits {
            pg_max: args.pg_max_connections,
            pg_startup_timeout: args.pg_startup_timeout,
            http_max: args.http_max_connections,
            http_idle: args.http_idle_timeout,
        },
        security: sluice_server::server::Security {
            password,
            secret_key: args.secret_key.clone().filter(|k| !k.is_empty()),
            tls: match (&args.tls_cert, &args.tls_key) {
                (Some(cert), Some(key)) => Some(sluice_server::tls::TlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                }),
                _ => None,
            },
        },
    };
    if let Some(bytes) = args.query_memory {
        sluice_server::query_runtime::set_memory_limit(bytes as usize);
    }
    let server = match sluice_server::start(&config).await {
        Ok(s) => s,
        // A port in use, an unreachable bucket…: said as what it is, no backtrace.
        Err(e) => {
            eprintln!("sluice: cannot start with the lake at {}: {e}", args.lake);
            std::process::exit(1);
        }
    };
    // These lines are the startup contract that scripts and tests read.
    // (The http line comes last: readers may stop reading there.)
    println!("sluice: lake {}", server.lake);
    if !server.started_as_writer {
        println!(
            "sluice: standby (another server writes this lake; this one takes over when its lease expires)"
        );
    }
    println!("sluice: pgwire listening on {}", server.pg_addr);
    println!("sluice: http listening on {}", server.http_addr);
    let lost = server.lease_lost.clone();
    tokio::select! {
        _ = shutdown_signal() => {}
        _ = lost.cancelled() => {
            // Another server writes the lake now: stop at once, committing nothing more
            // (no final checkpoint, no flush).
            eprintln!("sluice: lost the lake's writer lease to another server; stopping");
            std::process::exit(3);
        }
    }
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
