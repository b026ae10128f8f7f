//! `pg-params`: an ad-hoc query through the extended protocol (prepared once, a parameter
//! bound per execution, as drivers do) against the same query through the simple protocol
//! (the value written into the text), interleaved in one run over one server in this
//! process. Every answer is checked against the count of the generated rows, computed apart
//! from the server, or the figures mean nothing.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use arrow::array::AsArray;
use arrow::datatypes::Int64Type;

/// The source: a fixed number of deterministic clicks, 20 users.
const SOURCE: &str =
    "CREATE SOURCE clicks (user_id BIGINT NOT NULL, url TEXT, ts TIMESTAMP NOT NULL)
    WITH (connector = 'datagen', rows_per_second = '0', max_rows = '20000', seed = '3',
          start_time = '2024-05-01T00:00:00Z', time_step = '10 ms',
          fields.user_id.min = '1', fields.user_id.max = '20')";
const ROWS: i64 = 20_000;

/// Runs `queries` of each protocol, interleaved; prints one line per protocol.
pub async fn run(queries: usize) -> anyhow::Result<()> {
    // The answer per user, from the generator itself.
    let mut expected: BTreeMap<i64, i64> = BTreeMap::new();
    crate::expect::generated(SOURCE, |batch| {
        let users = batch
            .column_by_name("user_id")
            .context("user_id")?
            .as_primitive::<Int64Type>();
        for i in 0..users.len() {
            *expected.entry(users.value(i)).or_default() += 1;
        }
        Ok(())
    })
    .await?;
    let lake = tempfile::tempdir()?;
    let config = sluice_server::ServerConfig {
        lake: lake.path().display().to_string(),
        pg_listen: "127.0.0.1:0".parse()?,
        http_listen: "127.0.0.1:0".parse()?,
        lease_ttl: sluice_server::lease::DEFAULT_LEASE_TTL,
        statement_timeout: Duration::ZERO,
        checkpoint_retention: sluice_engine::checkpoint::DEFAULT_RETENTION,
        glue_database: None,
        connections: Default::default(),
        security: Default::default(),
    };
    let server = sluice_server::start(&config)
        .await
        .context("the server starts")?;
    let client = crate::ingest::connect(server.pg_addr).await?;
    client
        .batch_execute(&format!(
            "{SOURCE}; CREATE STREAM clicks_all WITH (checkpoint_interval = '200 ms') AS SELECT * FROM clicks"
        ))
        .await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let n: i64 = client
            .query_one("SELECT count(*) FROM clicks_all", &[])
            .await?
            .get(0);
        if n == ROWS {
            break;
        }
        if Instant::now() > deadline {
            bail!("the stream holds {n} of {ROWS} rows after two minutes");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let prepared = client
        .prepare("SELECT count(*) FROM clicks_all WHERE user_id = $1")
        .await?;
    let (mut simple, mut extended) = (Vec::new(), Vec::new());
    for i in 0..queries {
        let user = (i % 20) as i64 + 1;
        let want = expected.get(&user).copied().unwrap_or(0);
        // Alternate which goes first, so neither always finds the caches warm.
        for extended_first in [i % 2 == 0, i % 2 != 0] {
            if extended_first {
                let t = Instant::now();
                let got: i64 = client.query_one(&prepared, &[&user]).await?.get(0);
                extended.push(t.elapsed());
                if got != want {
                    bail!("extended protocol, user {user}: {got} rows, want {want}");
                }
            } else {
                let t = Instant::now();
                let rows = client
                    .simple_query(&format!(
                        "SELECT count(*) FROM clicks_all WHERE user_id = {user}"
                    ))
                    .await?;
                simple.push(t.elapsed());
                let got = rows.iter().find_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0)?.parse::<i64>().ok(),
                    _ => None,
                });
                if got != Some(want) {
                    bail!("simple protocol, user {user}: {got:?} rows, want {want}");
                }
            }
        }
    }
    println!(
        "{:<46} {:>8} {:>9} {:>9} {:>9}",
        "pg-params: count over a stream's files", "queries", "p50 ms", "p99 ms", "max ms"
    );
    for (name, mut lat) in [
        ("  simple protocol, value in the text", simple),
        ("  extended protocol, prepared + $1", extended),
    ] {
        lat.sort();
        let at = |q: f64| lat[((lat.len() as f64 - 1.0) * q).round() as usize].as_secs_f64() * 1e3;
        println!(
            "{:<46} {:>8} {:>9.2} {:>9.2} {:>9.2}",
            name,
            lat.len(),
            at(0.5),
            at(0.99),
            at(1.0)
        );
    }
    server.shutdown().await;
    Ok(())
}
