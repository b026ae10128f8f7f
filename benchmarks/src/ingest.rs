//! `ingest`: HTTP ingest latency while ad-hoc queries run — a whole server, in this process.
//!
//! An `http` source with a stream to the lake takes POSTs of 500 events, one after another,
//! while nothing else runs, then while `--sessions` Postgres sessions each run a CPU-heavy
//! query in a loop — once with ad-hoc queries on their own runtime (what `sluice serve`
//! does) and once on the streams' runtime (as before it existed), in one run. Every POST
//! must accept exactly its 500 events and every query must return its exact count, or the
//! figures mean nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Events per POST.
const EVENTS_PER_POST: usize = 500;
/// What each session runs, and its answer.
const QUERY: &str = "SELECT count(*) FROM range(0, 2000000) WHERE value % 7 <> 3";
const QUERY_ANSWER: i64 = 2_000_000 - 285_714;

/// Runs the benchmark; prints one line per phase.
pub async fn run(sessions: usize, posts: usize) -> anyhow::Result<()> {
    let lake = tempfile::tempdir()?;
    let config = sluice_server::ServerConfig {
        lake: lake.path().display().to_string(),
        pg_listen: "127.0.0.1:0".parse()?,
        http_listen: "127.0.0.1:0".parse()?,
        lease_ttl: sluice_server::lease::DEFAULT_LEASE_TTL,
        statement_timeout: Duration::ZERO,
        checkpoint_retention: sluice_engine::checkpoint::DEFAULT_RETENTION,
        glue_database: None,
        connections: sluice_server::connections::ConnectionLimits {
            pg_max: sessions + 10,
            ..Default::default()
        },
        security: Default::default(),
    };
    let server = sluice_server::start(&config)
        .await
        .context("the server starts")?;
    let (pg, http) = (server.pg_addr, server.http_addr);
    let admin = connect(pg).await?;
    admin
        .batch_execute(
            "CREATE SOURCE events (id BIGINT NOT NULL, amount BIGINT, ts TIMESTAMP NOT NULL,
                                   WATERMARK FOR ts AS ts - INTERVAL '1 second')
             WITH (connector = 'http');
             CREATE STREAM landed AS SELECT * FROM events",
        )
        .await?;
    let client = reqwest::Client::new();
    let url = format!("http://{http}/v1/sources/events/events");
    let mut next_id = 0u64;
    println!(
        "{:<46} {:>8} {:>9} {:>9} {:>9} {:>9} {:>10}",
        "ingest: 500-event POSTs", "posts", "p50 ms", "p95 ms", "p99 ms", "max ms", "queries/s"
    );
    let report = |name: &str, mut lat: Vec<Duration>, queries_per_s: f64| {
        lat.sort();
        let at = |q: f64| lat[((lat.len() as f64 - 1.0) * q).round() as usize].as_secs_f64() * 1e3;
        println!(
            "{:<46} {:>8} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>10.1}",
            name,
            lat.len(),
            at(0.5),
            at(0.95),
            at(0.99),
            at(1.0),
            queries_per_s
        );
    };
    let baseline = posts_timed(&client, &url, posts, &mut next_id).await?;
    report("no query sessions", baseline, 0.0);
    for dedicated in [true, false] {
        sluice_server::query_runtime::set_dedicated(dedicated);
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let mut running = Vec::with_capacity(sessions);
        for _ in 0..sessions {
            let c = connect(pg).await?;
            let (stop, done) = (Arc::clone(&stop), Arc::clone(&done));
            running.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let n: i64 = c.query_one(QUERY, &[]).await?.get(0);
                    if n != QUERY_ANSWER {
                        bail!("the query counted {n}, not {QUERY_ANSWER}");
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            }));
        }
        // Let every session get going.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let before = done.load(Ordering::Relaxed);
        let phase = Instant::now();
        let lat = posts_timed(&client, &url, posts, &mut next_id).await?;
        let queries =
            (done.load(Ordering::Relaxed) - before) as f64 / phase.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        for r in running {
            r.await??;
        }
        report(
            if dedicated {
                "with query sessions, queries on their runtime"
            } else {
                "with query sessions, queries on the streams'"
            },
            lat,
            queries,
        );
    }
    sluice_server::query_runtime::set_dedicated(true);
    server.shutdown().await;
    Ok(())
}

pub(crate) async fn connect(pg: std::net::SocketAddr) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(
        &format!(
            "host={} port={} user=sluice dbname=sluice",
            pg.ip(),
            pg.port()
        ),
        tokio_postgres::NoTls,
    )
    .await?;
    tokio::spawn(connection);
    Ok(client)
}

/// `posts` POSTs of [`EVENTS_PER_POST`] events, one after another; each one's latency.
async fn posts_timed(
    client: &reqwest::Client,
    url: &str,
    posts: usize,
    next_id: &mut u64,
) -> anyhow::Result<Vec<Duration>> {
    let mut lat = Vec::with_capacity(posts);
    for _ in 0..posts {
        let body: String = (0..EVENTS_PER_POST)
            .map(|_| {
                *next_id += 1;
                format!(
                    "{{\"id\":{},\"amount\":{},\"ts\":{}}}\n",
                    next_id,
                    *next_id % 100,
                    1_714_550_400_000_000 + *next_id as i64 * 1000
                )
            })
            .collect();
        let start = Instant::now();
        let response = client
            .post(url)
            .header("Content-Type", "application/x-ndjson")
            .body(body)
            .send()
            .await?;
        let status = response.status();
        let answer: serde_json::Value = response.json().await?;
        lat.push(start.elapsed());
        if status != 200 || answer["accepted"] != EVENTS_PER_POST {
            bail!("a POST was not taken whole: {status} {answer}");
        }
    }
    Ok(lat)
}
