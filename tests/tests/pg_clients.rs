//! Postgres drivers against a real Sluice over a socket: the extended query protocol with
//! parameters (`$1`, …), declared and inferred parameter types, text and binary results,
//! prepared statements and row-limited fetches; psql's catalog commands, settings, COPY.
//! tokio-postgres and psql here; psycopg 3, asyncpg and SQLAlchemy's inspector in
//! `tests/python/pg_drivers.py` (installed by `scripts/services.sh`); pgJDBC in
//! `tests/java/JdbcSession.java` (Debian's libpostgresql-jdbc-java, installed by
//! `scripts/test.sh`).

use std::process::Command;
use std::time::Duration;

use sluice_tests::{pg_connect, scalar, start_server, wait_for};

/// A server with stream `clicks_all`: 500 generated clicks (user_id 1..20).
async fn server_with_clicks(
    lake: &std::path::Path,
) -> (sluice_server::RunningServer, tokio_postgres::Client) {
    let server = start_server(lake).await;
    let pg = pg_connect(server.pg_addr).await;
    pg.batch_execute(
        "CREATE SOURCE clicks (user_id BIGINT NOT NULL, url TEXT, ts TIMESTAMP NOT NULL)
             WITH (connector = 'datagen', rows_per_second = '0', max_rows = '500', seed = '1',
                   fields.user_id.min = '1', fields.user_id.max = '20');
         CREATE STREAM clicks_all WITH (checkpoint_interval = '200 ms') AS SELECT * FROM clicks",
    )
    .await
    .unwrap();
    wait_for("the clicks", Duration::from_secs(60), || async {
        (scalar(&pg, "SELECT count(*) FROM clicks_all").await == 500).then_some(())
    })
    .await;
    (server, pg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_binds_parameters_of_inferred_and_declared_types() {
    let lake = tempfile::tempdir().unwrap();
    let (server, pg) = server_with_clicks(lake.path()).await;
    let inline = scalar(
        &pg,
        "SELECT count(*) FROM clicks_all WHERE user_id > 10 AND url <> 'x'",
    )
    .await;
    // Inferred: user_id is BIGINT, url TEXT.
    let st = pg
        .prepare("SELECT count(*) FROM clicks_all WHERE user_id > $1 AND url <> $2")
        .await
        .unwrap();
    assert_eq!(
        st.params(),
        [
            tokio_postgres::types::Type::INT8,
            tokio_postgres::types::Type::TEXT
        ]
    );
    let n: i64 = pg.query_one(&st, &[&10i64, &"x"]).await.unwrap().get(0);
    assert_eq!(n, inline);
    // The same statement again, other values.
    let none: i64 = pg.query_one(&st, &[&100i64, &"x"]).await.unwrap().get(0);
    assert_eq!(none, 0);
    // Declared in Parse: an INT4 where the plan would have no type (DataFusion's integer
    // literals are BIGINT, so the sum is one).
    let st = pg
        .prepare_typed("SELECT $1 + 1", &[tokio_postgres::types::Type::INT4])
        .await
        .unwrap();
    assert_eq!(st.params(), [tokio_postgres::types::Type::INT4]);
    let v: i64 = pg.query_one(&st, &[&41i32]).await.unwrap().get(0);
    assert_eq!(v, 42);
    // LIMIT takes a count.
    let rows = pg
        .query(
            "SELECT user_id FROM clicks_all ORDER BY ts, url LIMIT $1",
            &[&3i64],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 3);
    // Parameters in DDL are refused with a SQLSTATE, and the session goes on.
    let ddl = pg
        .prepare_typed(
            "CREATE STREAM s AS SELECT * FROM clicks WHERE user_id > $1",
            &[tokio_postgres::types::Type::INT8],
        )
        .await
        .unwrap();
    let err = pg.execute(&ddl, &[&1i64]).await.unwrap_err();
    let db = err.as_db_error().expect("a Postgres error");
    assert_eq!(db.code().code(), "0A000", "{db:?}");
    assert!(db.message().contains("queries only"), "{db:?}");
    assert_eq!(scalar(&pg, "SELECT 1").await, 1);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_asyncpg_and_sqlalchemy_sessions() {
    let lake = tempfile::tempdir().unwrap();
    let (server, _pg) = server_with_clicks(lake.path()).await;
    let python = std::env::var("SLUICE_TEST_PYTHON")
        .expect("SLUICE_TEST_PYTHON is not set: run the tests with scripts/test.sh");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/pg_drivers.py");
    let out = Command::new(python)
        .arg(script)
        .arg(server.pg_addr.ip().to_string())
        .arg(server.pg_addr.port().to_string())
        .output()
        .expect("the test Python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "pg_drivers.py failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("ok asyncpg cursor in batches of 7"),
        "{stdout}"
    );
    server.shutdown().await;
}

/// psql's own catalog commands (their queries go through `pg_catalog`), the settings
/// clients read at connect, and Postgres' names for result columns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_lists_and_describes_streams_and_reads_settings() {
    use sluice_tests::psql;
    let lake = tempfile::tempdir().unwrap();
    let (server, _pg) = server_with_clicks(lake.path()).await;
    let addr = server.pg_addr;
    // (`psql -A -t`: unaligned rows, `|` between fields, no headers.)
    let tables = psql(addr, "\\dt");
    assert!(tables.contains("public|clicks_all|table|"), "{tables}");
    assert!(tables.contains("public|clicks|table|"), "{tables}");
    let described = psql(addr, "\\d clicks_all");
    for column in [
        "user_id|bigint||not null|",
        "url|text|||",
        "ts|timestamp with time zone||not null|",
        "dt|text||not null|",
        "hour|text||not null|",
    ] {
        assert!(described.contains(column), "{column} in:\n{described}");
    }
    let verbose = psql(addr, "\\d+ clicks_all");
    assert!(
        verbose.contains("user_id|bigint||not null||plain|"),
        "{verbose}"
    );
    assert!(psql(addr, "\\l").contains("sluice|"));
    assert!(psql(addr, "\\dn").contains("public|"));
    assert!(psql(addr, "\\conninfo").contains("database \"sluice\" as user \"sluice\""));
    assert_eq!(psql(addr, "SHOW server_version").trim(), "16.6");
    assert_eq!(
        psql(addr, "SHOW TRANSACTION ISOLATION LEVEL").trim(),
        "read committed"
    );
    let version = psql(addr, "SELECT version()");
    assert!(
        version.starts_with("PostgreSQL 16.6 ") && version.contains("Sluice"),
        "{version}"
    );
    assert_eq!(
        psql(
            addr,
            "SET application_name = 'grafana'; SHOW application_name"
        )
        .trim(),
        "SET\ngrafana"
    );
    assert_eq!(
        psql(addr, "SELECT current_setting('server_version_num')").trim(),
        "160006"
    );
    assert_eq!(
        psql(
            addr,
            "SELECT table_name FROM information_schema.tables \
             WHERE table_schema = 'public' AND table_name LIKE 'clicks%' ORDER BY 1"
        )
        .trim(),
        "clicks\nclicks_all"
    );
    // Sluice's state as relations (what SHOW shows), for SQL and dashboards.
    assert_eq!(
        psql(
            addr,
            "SELECT s.name, t.name, t.rows_out FROM sluice.sources s \
             JOIN sluice.streams t ON t.inputs = s.name ORDER BY 2"
        )
        .trim(),
        "clicks|clicks_all|500"
    );
    assert_eq!(psql(addr, "SELECT count(*) FROM sluice.sinks").trim(), "0");
    // COPY (query) TO STDOUT, as `\copy` and drivers' copy APIs use it: CSV with a header,
    // and text (tab-separated, `\N` for NULL).
    let csv = psql(
        addr,
        "COPY (SELECT user_id, url, NULL::text AS missing, '' AS empty, 'a,\"b\"' AS quoted \
         FROM clicks_all WHERE user_id = 3 ORDER BY ts, url LIMIT 2) TO STDOUT WITH (FORMAT csv, HEADER)",
    );
    let urls = psql(
        addr,
        "SELECT url FROM clicks_all WHERE user_id = 3 ORDER BY ts, url LIMIT 2",
    );
    let urls: Vec<&str> = urls.lines().collect();
    assert_eq!(
        csv,
        format!(
            "user_id,url,missing,empty,quoted\n3,{},,\"\",\"a,\"\"b\"\"\"\n3,{},,\"\",\"a,\"\"b\"\"\"\n",
            urls[0], urls[1]
        )
    );
    let text = psql(
        addr,
        "\\copy (SELECT user_id, NULL::text, 'tab\there' FROM clicks_all WHERE user_id = 3 ORDER BY ts LIMIT 1) TO STDOUT",
    );
    assert_eq!(text, "3\t\\N\ttab\\there\n");
    // Column names as Postgres gives them.
    let pg = pg_connect(addr).await;
    let row = pg
        .query_one(
            "SELECT count(*), 1 + 1, max(user_id) AS top, current_database() FROM clicks_all",
            &[],
        )
        .await
        .unwrap();
    let names: Vec<&str> = row.columns().iter().map(|c| c.name()).collect();
    assert_eq!(names, ["count", "?column?", "top", "current_database"]);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgjdbc_session() {
    let jar = std::env::var("SLUICE_TEST_PGJDBC_JAR").expect(
        "SLUICE_TEST_PGJDBC_JAR is not set: run the tests with scripts/test.sh, which installs pgJDBC",
    );
    let lake = tempfile::tempdir().unwrap();
    let (server, _pg) = server_with_clicks(lake.path()).await;
    let classes = tempfile::tempdir().unwrap();
    let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("java/JdbcSession.java");
    let javac = Command::new("javac")
        .arg("-d")
        .arg(classes.path())
        .arg(&source)
        .output()
        .expect("javac runs (scripts/test.sh installs a JDK)");
    assert!(
        javac.status.success(),
        "javac: {}",
        String::from_utf8_lossy(&javac.stderr)
    );
    let classpath = format!("{jar}:{}", classes.path().display());
    let out = Command::new("java")
        .args(["-cp", &classpath, "JdbcSession"])
        .arg(server.pg_addr.ip().to_string())
        .arg(server.pg_addr.port().to_string())
        .output()
        .expect("java runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "JdbcSession failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("ok setFetchSize 50 over 500 rows"),
        "{stdout}"
    );
    server.shutdown().await;
}
