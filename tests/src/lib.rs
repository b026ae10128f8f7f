//! Helpers for Sluice's cross-crate integration tests.
//!
//! Tests start real servers (pgwire and HTTP on 127.0.0.1, port 0) on a temporary lake and
//! talk to them with real clients: `tokio-postgres`, the `psql` binary, HTTP, and the
//! `parquet` reader over the files that landed. A client that is missing (e.g. `psql`) fails
//! the test with instructions; nothing is skipped silently.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sluice_server::{RunningServer, ServerConfig};

/// Starts a server on `lake` with both listeners on free loopback ports.
pub async fn start_server(lake: &Path) -> RunningServer {
    let config = ServerConfig {
        lake: lake.display().to_string(),
        pg_listen: "127.0.0.1:0".parse().expect("static address"),
        http_listen: "127.0.0.1:0".parse().expect("static address"),
    };
    sluice_server::start(&config)
        .await
        .expect("the server starts")
}

/// Connects with tokio-postgres as user `sluice` to database `sluice`.
pub async fn pg_connect(addr: std::net::SocketAddr) -> tokio_postgres::Client {
    let conn = format!(
        "host={} port={} user=sluice dbname=sluice",
        addr.ip(),
        addr.port()
    );
    let (client, connection) = tokio_postgres::connect(&conn, tokio_postgres::NoTls)
        .await
        .expect("tokio-postgres connects");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// Runs `sql` through the real `psql` binary (unaligned, tuples only) and returns stdout.
/// Fails with instructions when psql is not installed.
pub fn psql(addr: std::net::SocketAddr, sql: &str) -> String {
    let out = std::process::Command::new("psql")
        .args([
            "-X",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            &addr.ip().to_string(),
            "-p",
            &addr.port().to_string(),
            "-U",
            "sluice",
            "sluice",
            "-c",
            sql,
        ])
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run `psql` ({e}): install the PostgreSQL client (scripts/test.sh does)")
        });
    assert!(
        out.status.success(),
        "psql failed on `{sql}`: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("psql prints UTF-8")
}

/// Polls `check` every 50 ms until it returns `Some`, failing after `timeout` with `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `SHOW STREAMS` reports `stream` as no longer running; returns its status.
pub async fn wait_stream_done(client: &tokio_postgres::Client, stream: &str) -> String {
    wait_for(
        &format!("stream `{stream}` to finish"),
        Duration::from_secs(60),
        || async {
            let rows = client.simple_query("SHOW STREAMS").await.ok()?;
            rows.iter().find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r)
                    if r.get("name") == Some(stream) && r.get("status") != Some("running") =>
                {
                    r.get("status").map(str::to_string)
                }
                _ => None,
            })
        },
    )
    .await
}

/// Every file under `dir` with extension `ext`, sorted.
pub fn files_with_ext(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == ext) {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Reads a Parquet file completely with the `parquet` crate's Arrow reader.
pub fn read_parquet(path: &Path) -> Vec<arrow::record_batch::RecordBatch> {
    let file = std::fs::File::open(path).expect("the file opens");
    parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .expect("a valid Parquet file")
        .build()
        .expect("a reader")
        .collect::<Result<Vec<_>, _>>()
        .expect("readable batches")
}

/// The Kafka-protocol broker the tests use (`SLUICE_TEST_KAFKA`, set by `scripts/test.sh`
/// through `scripts/services.sh`). Panics when it is not set: a test that needs a broker
/// never passes without one.
pub fn kafka_brokers() -> String {
    std::env::var("SLUICE_TEST_KAFKA").unwrap_or_else(|_| {
        panic!(
            "SLUICE_TEST_KAFKA is not set: run the tests with scripts/test.sh, which starts a \
             Kafka-protocol broker, or first `eval \"$(scripts/services.sh start)\"`"
        )
    })
}
