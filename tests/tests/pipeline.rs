//! End to end over real sockets: datagen → stream → Parquet in the lake, read back through
//! tokio-postgres (simple and extended protocol), the `psql` binary, and the `parquet` crate.

use std::time::Duration;

use arrow::array::{Array, TimestampMicrosecondArray};
use arrow::datatypes::{DataType, TimeUnit};
use sluice_tests::{
    files_with_ext, pg_connect, psql, read_parquet, start_server, wait_for, wait_stream_done,
};
use tokio_postgres::SimpleQueryMessage;

const SOURCE: &str = "CREATE SOURCE clicks (
    user_id BIGINT NOT NULL, url TEXT, ts TIMESTAMP NOT NULL,
    WATERMARK FOR ts AS ts - INTERVAL '2 seconds'
) WITH (connector = 'datagen', rows_per_second = '0', max_rows = '50000', seed = '9',
        start_time = '2024-06-01T00:00:00Z', time_step = '1 second', null_rate = '0.2')";

fn first_value(msgs: &[SimpleQueryMessage]) -> String {
    msgs.iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .expect("a row")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datagen_stream_lands_in_the_lake_and_every_client_sees_the_same_rows() {
    let lake = tempfile::tempdir().unwrap();
    let server = start_server(lake.path()).await;
    let client = pg_connect(server.pg_addr).await;
    client.batch_execute(SOURCE).await.unwrap();
    client
        .batch_execute(
            "CREATE STREAM clean_clicks AS SELECT user_id, lower(url) AS url, ts FROM clicks WHERE url IS NOT NULL",
        )
        .await
        .unwrap();
    assert_eq!(wait_stream_done(&client, "clean_clicks").await, "finished");

    // Extended protocol (binary results) through tokio-postgres.
    let row = client
        .query_one(
            "SELECT count(*), count(DISTINCT dt || hour) FROM clean_clicks",
            &[],
        )
        .await
        .unwrap();
    let (count, partitions): (i64, i64) = (row.get(0), row.get(1));
    // 50 000 rows, 20 % NULL urls filtered out (seeded: exact), over 50 000 s ≈ 13.9 h.
    assert!((39_000..41_000).contains(&count), "count {count}");
    assert_eq!(partitions, 14);

    // Simple protocol, and the real psql binary, agree.
    let simple = client
        .simple_query("SELECT count(*) FROM clean_clicks")
        .await
        .unwrap();
    assert_eq!(first_value(&simple), count.to_string());
    let addr = server.pg_addr;
    let via_psql =
        tokio::task::spawn_blocking(move || psql(addr, "SELECT count(*) FROM clean_clicks"))
            .await
            .unwrap();
    assert_eq!(via_psql.trim(), count.to_string());

    // The Parquet files themselves: complete, Athena-typed, in the partition of their rows.
    let files = files_with_ext(&lake.path().join("processed/clean_clicks"), "parquet");
    assert_eq!(files.len(), 14, "one file per hour partition: {files:?}");
    let mut rows_in_files = 0;
    for f in &files {
        let batches = read_parquet(f);
        let dir = f.parent().unwrap();
        let hour = dir
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .strip_prefix("hour=")
            .unwrap();
        let dt = dir
            .parent()
            .unwrap()
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .strip_prefix("dt=")
            .unwrap();
        for b in &batches {
            assert_eq!(
                b.schema().field_with_name("ts").unwrap().data_type(),
                &DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
            );
            assert_eq!(b.column(2).null_count(), 0);
            let ts = b
                .column(2)
                .as_any()
                .downcast_ref::<TimestampMicrosecondArray>()
                .unwrap();
            for v in ts.iter().flatten() {
                let t = chrono::DateTime::from_timestamp_micros(v).unwrap();
                assert_eq!(t.format("%Y-%m-%d").to_string(), dt);
                assert_eq!(t.format("%H").to_string(), hour);
            }
            rows_in_files += b.num_rows();
        }
    }
    assert_eq!(rows_in_files as i64, count);

    // Results stream to the client; an error while producing them is a Postgres error.
    let err = client
        .query("SELECT CAST(url AS BIGINT) FROM clean_clicks", &[])
        .await
        .unwrap_err();
    let db = err
        .as_db_error()
        .expect("a Postgres error, not a broken connection");
    assert_eq!(db.code().code(), "22P02", "{db:?}");
    assert!(
        db.message().contains("Cannot cast string"),
        "{}",
        db.message()
    );
    let row = client
        .query_one("SELECT count(url) FROM clean_clicks", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), count);
    // Nothing half-written or staged is left behind: only Parquet, and the Athena DDL.
    let all: Vec<_> = walk(lake.path().join("processed").as_path());
    assert!(
        all.iter()
            .all(|p| p.extension().is_some_and(|e| e == "parquet")
                || p.ends_with("processed/clean_clicks/_athena_table.sql")),
        "{all:?}"
    );
    server.shutdown().await;
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.path().is_dir() {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_grow_while_a_stream_runs_and_stop_after_drop() {
    let lake = tempfile::tempdir().unwrap();
    let server = start_server(lake.path()).await;
    let client = pg_connect(server.pg_addr).await;
    client
        .batch_execute(
            "CREATE SOURCE ticks (n BIGINT NOT NULL, ts TIMESTAMP NOT NULL) WITH (connector = 'datagen', rows_per_second = '2000');
             CREATE STREAM all_ticks WITH (rollover_interval = '200 ms') AS SELECT * FROM ticks",
        )
        .await
        .unwrap();
    let first = wait_for("rows to land", Duration::from_secs(30), || async {
        count(&client).await.filter(|n| *n > 0)
    })
    .await;
    wait_for("the count to grow", Duration::from_secs(30), || async {
        count(&client).await.filter(|n| *n > first)
    })
    .await;

    client.batch_execute("DROP STREAM all_ticks").await.unwrap();
    let files = files_with_ext(&lake.path().join("processed/all_ticks"), "parquet").len();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        files_with_ext(&lake.path().join("processed/all_ticks"), "parquet").len(),
        files,
        "no file is written after DROP returns"
    );
    let err = client
        .simple_query("SELECT count(*) FROM all_ticks")
        .await
        .unwrap_err();
    assert_eq!(err.code().unwrap().code(), "42P01");
    server.shutdown().await;
}

async fn count(c: &tokio_postgres::Client) -> Option<i64> {
    let r = c
        .simple_query("SELECT count(*) FROM all_ticks")
        .await
        .ok()?;
    Some(first_value(&r).parse::<i64>().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_catalog_survives_a_restart() {
    let lake = tempfile::tempdir().unwrap();
    let server = start_server(lake.path()).await;
    let client = pg_connect(server.pg_addr).await;
    client.batch_execute(SOURCE).await.unwrap();
    client
        .batch_execute("CREATE STREAM s1 AS SELECT user_id, ts FROM clicks WHERE user_id < 500")
        .await
        .unwrap();
    wait_stream_done(&client, "s1").await;
    let before: i64 = client
        .query_one("SELECT count(*) FROM s1", &[])
        .await
        .unwrap()
        .get(0);
    server.shutdown().await;

    let server = start_server(lake.path()).await;
    let client = pg_connect(server.pg_addr).await;
    let describe = client.simple_query("DESCRIBE s1").await.unwrap();
    let cols: Vec<String> = describe
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .collect();
    assert_eq!(cols, ["user_id", "ts"]);
    // The restored stream resumes from its checkpoint: it had read its whole input, so it
    // finishes at once and nothing lands twice.
    wait_stream_done(&client, "s1").await;
    let after: i64 = client
        .query_one("SELECT count(*) FROM s1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(after, before);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_reach_clients_with_sqlstate_and_position() {
    let lake = tempfile::tempdir().unwrap();
    let server = start_server(lake.path()).await;
    let client = pg_connect(server.pg_addr).await;

    let err = client
        .batch_execute(
            "CREATE SOURCE o (a BIGINT) WITH (connector = 'datagen', rows_per_secnd = '1')",
        )
        .await
        .unwrap_err();
    let db = err.as_db_error().unwrap();
    assert_eq!(db.code().code(), "22023");
    assert!(
        db.message().contains("did you mean `rows_per_second`"),
        "{}",
        db.message()
    );

    let err = client
        .batch_execute("CREATE STREAM s AS\n  SELEC x FROM clicks")
        .await
        .unwrap_err();
    let db = err.as_db_error().unwrap();
    assert_eq!(db.code().code(), "42601");
    assert!(
        matches!(db.position(), Some(tokio_postgres::error::ErrorPosition::Original(p)) if *p > 0)
    );

    // Extended protocol: the error comes back at Parse time.
    let err = client.prepare("SELEC 1").await.unwrap_err();
    assert_eq!(err.code().unwrap().code(), "42601");
    // Parameters are bound (tests/tests/pg_clients.rs has the drivers' sessions).
    let row = client
        .query_one("SELECT $1::BIGINT", &[&7i64])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 7);
    // A value that is not of the parameter's type is an error with a SQLSTATE.
    let text_param = client
        .prepare_typed(
            "SELECT $1::BIGINT + 1",
            &[tokio_postgres::types::Type::TEXT],
        )
        .await
        .unwrap();
    let err = client.query(&text_param, &[&"seven"]).await.unwrap_err();
    assert!(err.code().is_some(), "{err}");
    // The connection is still usable after every error.
    let row = client.query_one("SELECT 40 + 2", &[]).await.unwrap();
    assert_eq!(row.get::<_, i64>(0), 42);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_wire_closes_only_that_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let lake = tempfile::tempdir().unwrap();
    let server = start_server(lake.path()).await;
    for junk in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &[0xff; 64][..],
        &[0, 0, 0, 8, 0, 3, 0, 0][..], // startup with no parameters
        &[0x7f, 0xff, 0xff, 0xff, 0, 3][..], // absurd length
    ] {
        let mut s = tokio::net::TcpStream::connect(server.pg_addr)
            .await
            .unwrap();
        s.write_all(junk).await.unwrap();
        let mut buf = [0u8; 256];
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
    }
    let client = pg_connect(server.pg_addr).await;
    assert_eq!(
        client
            .query_one("SELECT 1", &[])
            .await
            .unwrap()
            .get::<_, i64>(0),
        1
    );
    // Wrong user and database are refused with Postgres's codes.
    let bad_user = tokio_postgres::connect(
        &format!(
            "host=127.0.0.1 port={} user=root dbname=sluice",
            server.pg_addr.port()
        ),
        tokio_postgres::NoTls,
    )
    .await
    .err()
    .expect("refused");
    assert_eq!(bad_user.code().unwrap().code(), "28000");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unrestorable_catalog_entry_is_kept_until_dropped() {
    let lake = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(lake.path().join("_sluice")).unwrap();
    // A definition this build cannot run (a connector it does not have).
    let bad = "CREATE SOURCE legacy (a TEXT) WITH ('connector' = 'kafka')";
    let catalog = serde_json::json!({"version": 1, "entries": [{"kind": "source", "name": "legacy", "sql": bad}]});
    let path = lake.path().join("_sluice/catalog.json");
    std::fs::write(&path, catalog.to_string()).unwrap();

    let server = start_server(lake.path()).await;
    let client = pg_connect(server.pg_addr).await;
    client
        .batch_execute("CREATE SOURCE fresh (a TEXT) WITH (connector = 'http')")
        .await
        .unwrap();
    let stored = std::fs::read_to_string(&path).unwrap();
    assert!(
        stored.contains("legacy") && stored.contains("fresh"),
        "{stored}"
    );

    client.batch_execute("DROP SOURCE legacy").await.unwrap();
    let stored = std::fs::read_to_string(&path).unwrap();
    assert!(
        !stored.contains("legacy") && stored.contains("fresh"),
        "{stored}"
    );
    server.shutdown().await;
}
