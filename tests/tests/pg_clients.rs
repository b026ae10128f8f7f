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

/// What BI tools send when they connect and browse, verbatim: DBeaver's and Metabase's from
/// datafusion-postgres' corpus (its `tests/dbeaver.rs`, `tests/metabase.rs`), Grafana's
/// PostgreSQL data source (its connection test, table and column lookups, and a time-series
/// panel's query with `$__timeGroupAlias` and `$__timeFilter` expanded). Every one must run.
const BI_TOOL_QUERIES: &[(&str, &str)] = &[
    ("dbeaver", "SET extra_float_digits = 3"),
    ("dbeaver", "SET application_name = 'PostgreSQL JDBC Driver'"),
    (
        "dbeaver",
        "SET application_name = 'DBeaver 25.1.5 - Main <postgres>'",
    ),
    ("dbeaver", "SELECT current_schema(),session_user"),
    (
        "dbeaver",
        "SELECT n.oid,n.*,d.description FROM pg_catalog.pg_namespace n LEFT OUTER JOIN pg_catalog.pg_description d ON d.objoid=n.oid AND d.objsubid=0 AND d.classoid='pg_namespace'::regclass ORDER BY nspname",
    ),
    (
        "dbeaver",
        "SELECT n.nspname = ANY(current_schemas(true)), n.nspname, t.typname FROM pg_catalog.pg_type t JOIN pg_catalog.pg_namespace n ON t.typnamespace = n.oid WHERE t.oid = 1034",
    ),
    (
        "dbeaver",
        "SELECT typinput='pg_catalog.array_in'::regproc as is_array, typtype, typname, pg_type.oid   FROM pg_catalog.pg_type   LEFT JOIN (select ns.oid as nspoid, ns.nspname, r.r           from pg_namespace as ns           join ( select s.r, (current_schemas(false))[s.r] as nspname                    from generate_series(1, array_upper(current_schemas(false), 1)) as s(r) ) as r          using ( nspname )        ) as sp     ON sp.nspoid = typnamespace  WHERE pg_type.oid = 1034  ORDER BY sp.r, pg_type.oid DESC",
    ),
    ("dbeaver", "SHOW search_path"),
    (
        "dbeaver",
        "SELECT db.oid,db.* FROM pg_catalog.pg_database db WHERE datname='postgres'",
    ),
    ("dbeaver", "SELECT version()"),
    (
        "dbeaver",
        "SELECT * FROM pg_catalog.pg_enum WHERE 1<>1 LIMIT 1",
    ),
    (
        "dbeaver",
        "SELECT reltype FROM pg_catalog.pg_class WHERE 1<>1 LIMIT 1",
    ),
    (
        "dbeaver",
        "SELECT t.oid,t.*,c.relkind,format_type(nullif(t.typbasetype, 0), t.typtypmod) as base_type_name, d.description FROM pg_catalog.pg_type t LEFT OUTER JOIN pg_catalog.pg_type et ON et.oid=t.typelem LEFT OUTER JOIN pg_catalog.pg_class c ON c.oid=t.typrelid LEFT OUTER JOIN pg_catalog.pg_description d ON t.oid=d.objoid WHERE t.typname IS NOT NULL AND (c.relkind IS NULL OR c.relkind = 'c') AND (et.typcategory IS NULL OR et.typcategory <> 'C')",
    ),
    ("metabase", "SET extra_float_digits = 2"),
    (
        "metabase",
        "SET application_name = 'Metabase v0.55.1 [f8f63fdf-d8f8-4573-86ea-4fe4a9548041]'",
    ),
    ("metabase", "SHOW TRANSACTION ISOLATION LEVEL"),
    (
        "metabase",
        "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL READ UNCOMMITTED",
    ),
    (
        "metabase",
        r#"SELECT nspname AS "TABLE_SCHEM", current_database() AS "TABLE_CATALOG" FROM pg_catalog.pg_namespace  WHERE nspname <> 'pg_toast' AND (nspname !~ '^pg_temp_'  OR nspname = (pg_catalog.current_schemas(true))[1]) AND (nspname !~ '^pg_toast_temp_'  OR nspname = replace((pg_catalog.current_schemas(true))[1], 'pg_temp_', 'pg_toast_temp_'))  ORDER BY "TABLE_SCHEM""#,
    ),
    (
        "metabase",
        r#"with table_privileges as (
         select
           NULL as role,
           t.schemaname as schema,
           t.objectname as table,
           pg_catalog.has_any_column_privilege(current_user, '"' || replace(t.schemaname, '"', '""') || '"' || '.' || '"' || replace(t.objectname, '"', '""') || '"',  'update') as update,
           pg_catalog.has_any_column_privilege(current_user, '"' || replace(t.schemaname, '"', '""') || '"' || '.' || '"' || replace(t.objectname, '"', '""') || '"',  'select') as select,
           pg_catalog.has_any_column_privilege(current_user, '"' || replace(t.schemaname, '"', '""') || '"' || '.' || '"' || replace(t.objectname, '"', '""') || '"',  'insert') as insert,
           pg_catalog.has_table_privilege(     current_user, '"' || replace(t.schemaname, '"', '""') || '"' || '.' || '"' || replace(t.objectname, '"', '""') || '"',  'delete') as delete
         from (
           select schemaname, tablename as objectname from pg_catalog.pg_tables
           union
           select schemaname, viewname as objectname from pg_catalog.pg_views
           union
           select schemaname, matviewname as objectname from pg_catalog.pg_matviews
         ) t
         where t.schemaname !~ '^pg_'
           and t.schemaname <> 'information_schema'
           and pg_catalog.has_schema_privilege(current_user, t.schemaname, 'usage')
        )
        select t.*
        from table_privileges t"#,
    ),
    (
        "metabase",
        r#"SELECT "n"."nspname" AS "schema", "c"."relname" AS "name", CASE "c"."relkind" WHEN 'r' THEN 'TABLE' WHEN 'p' THEN 'PARTITIONED TABLE' WHEN 'v' THEN 'VIEW' WHEN 'f' THEN 'FOREIGN TABLE' WHEN 'm' THEN 'MATERIALIZED VIEW' ELSE NULL END AS "type", "d"."description" AS "description", "stat"."n_live_tup" AS "estimated_row_count" FROM "pg_catalog"."pg_class" AS "c" INNER JOIN "pg_catalog"."pg_namespace" AS "n" ON "c"."relnamespace" = "n"."oid" LEFT JOIN "pg_catalog"."pg_description" AS "d" ON ("c"."oid" = "d"."objoid") AND ("d"."objsubid" = '0') AND ("d"."classoid" = 'pg_class'::regclass) LEFT JOIN "pg_stat_user_tables" AS "stat" ON ("n"."nspname" = "stat"."schemaname") AND ("c"."relname" = "stat"."relname") WHERE ("c"."relnamespace" = "n"."oid") AND ("n"."nspname" !~ '^pg_') AND ("n"."nspname" <> 'information_schema') AND c.relkind in ('r', 'p', 'v', 'f', 'm') AND ("n"."nspname" IN ('public')) ORDER BY "type" ASC, "schema" ASC, "name" ASC"#,
    ),
    (
        "metabase",
        "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL READ COMMITTED",
    ),
    ("metabase", "show timezone"),
    ("grafana", "SELECT 1"),
    (
        "grafana",
        r#"select quote_ident(table_schema) || '.' || quote_ident(table_name) as "table" from information_schema.tables where quote_ident(table_schema) not in ('information_schema', 'pg_catalog') and table_type = 'BASE TABLE' order by 1"#,
    ),
    (
        "grafana",
        r#"select quote_ident(column_name) as "column", data_type as "type" from information_schema.columns where quote_ident(table_name) = 'clicks_all'"#,
    ),
    (
        "grafana",
        r#"SELECT floor(extract(epoch from ts)/60)*60 AS "time", count(*) AS "clicks" FROM clicks_all WHERE ts BETWEEN '2000-01-01T00:00:00Z' AND '2100-01-01T00:00:00Z' GROUP BY 1 ORDER BY 1"#,
    ),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_time_queries_of_dbeaver_metabase_and_grafana_run() {
    let lake = tempfile::tempdir().unwrap();
    let (server, pg) = server_with_clicks(lake.path()).await;
    let mut failed = vec![];
    for (tool, query) in BI_TOOL_QUERIES {
        if let Err(e) = pg.simple_query(query).await {
            let reason = e
                .as_db_error()
                .map_or_else(|| e.to_string(), |d| d.message().to_string());
            failed.push(format!("{tool}: {reason}\n    {query}"));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} failed:\n{}",
        failed.len(),
        BI_TOOL_QUERIES.len(),
        failed.join("\n")
    );
    // The stream is among the tables the tools list.
    let tables = pg
        .simple_query(
            BI_TOOL_QUERIES
                .iter()
                .find(|(t, q)| *t == "grafana" && q.contains("information_schema.tables"))
                .unwrap()
                .1,
        )
        .await
        .unwrap();
    let names: Vec<&str> = tables
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0),
            _ => None,
        })
        .collect();
    assert!(names.contains(&"public.clicks_all"), "{names:?}");
    drop(server);
}

/// A protocol fuzz test: after a valid startup, connections send random frontend messages —
/// random type bytes and bodies, lengths that lie (too short, too long, negative, huge),
/// messages cut off mid-way — then hang up. The server answers each with an error or closes
/// it, and goes on: a session opened before the storm still works after it, and a new one
/// connects and queries. (Seeded: a failure names the seed that reproduces it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_and_truncated_protocol_messages_close_only_their_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let lake = tempfile::tempdir().unwrap();
    let server = start_server(lake.path()).await;
    let before = pg_connect(server.pg_addr).await;
    let startup = {
        let params = b"user\0sluice\0database\0sluice\0\0";
        let mut m = ((8 + params.len()) as i32).to_be_bytes().to_vec();
        m.extend_from_slice(&196_608i32.to_be_bytes()); // protocol 3.0
        m.extend_from_slice(params);
        m
    };
    // xorshift64*: deterministic, no dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }
    const TYPES: &[u8] = b"QPBEDSCHXFdcfp";
    for seed in 1..=150u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let mut wire = startup.clone();
        for _ in 0..1 + rng.below(4) {
            let kind = if rng.below(5) == 0 {
                rng.next() as u8
            } else {
                TYPES[rng.below(TYPES.len() as u64) as usize]
            };
            let body: Vec<u8> = (0..rng.below(64))
                .map(|_| match rng.below(4) {
                    0 => 0,
                    1 => b'$',
                    _ => rng.next() as u8,
                })
                .collect();
            let len: i32 = match rng.below(6) {
                0 => -(rng.below(1 << 20) as i32),
                1 => i32::MAX - rng.below(100) as i32,
                2 => rng.below(4) as i32,
                3 => (body.len() + 4 + rng.below(16) as usize) as i32,
                _ => (body.len() + 4) as i32,
            };
            wire.push(kind);
            wire.extend_from_slice(&len.to_be_bytes());
            wire.extend_from_slice(&body);
        }
        if rng.below(3) == 0 {
            let cut = startup.len() + rng.below((wire.len() - startup.len()) as u64) as usize;
            wire.truncate(cut);
        }
        let mut s = tokio::net::TcpStream::connect(server.pg_addr)
            .await
            .unwrap();
        let _ = s.write_all(&wire).await;
        // Read what it answers until it closes or goes quiet.
        let mut buf = [0u8; 4096];
        while let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf)).await
        {
            if n == 0 {
                break;
            }
        }
        drop(s);
        if seed % 50 == 0 {
            let fresh = pg_connect(server.pg_addr).await;
            assert_eq!(scalar(&fresh, "SELECT 1").await, 1, "after seed {seed}");
        }
    }
    assert_eq!(
        scalar(&before, "SELECT 2").await,
        2,
        "the session opened before"
    );
    let after = pg_connect(server.pg_addr).await;
    assert_eq!(scalar(&after, "SELECT 3").await, 3);
    server.shutdown().await;
}

/// A source's and a stream's description (psql's `\d+`, `\dt+`, `obj_description`) is the
/// statement that created it; `sluice.sources/streams/sinks` carry it in `sql` (sinks are no
/// relations, so that is where theirs is).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relations_are_described_by_the_statements_that_made_them() {
    let lake = tempfile::tempdir().unwrap();
    let (server, pg) = server_with_clicks(lake.path()).await;
    let described = |relation: &'static str| {
        let pg = &pg;
        async move {
            let row = pg
                .query_one(
                    "SELECT obj_description(c.oid, 'pg_class') FROM pg_catalog.pg_class c WHERE c.relname = $1",
                    &[&relation],
                )
                .await
                .unwrap();
            row.get::<_, Option<String>>(0).unwrap_or_default()
        }
    };
    let source = described("clicks").await;
    assert!(source.starts_with("CREATE SOURCE clicks"), "{source}");
    assert!(source.contains("'datagen'"), "{source}");
    let stream = described("clicks_all").await;
    assert!(stream.starts_with("CREATE STREAM clicks_all"), "{stream}");
    // psql shows it, for one relation and for all.
    let out = sluice_tests::psql(server.pg_addr, "\\dt+ clicks_all");
    assert!(out.contains("CREATE STREAM clicks_all"), "{out}");
    let out = sluice_tests::psql(server.pg_addr, "\\dt+");
    assert!(
        out.contains("CREATE STREAM clicks_all") && out.contains("CREATE SOURCE clicks"),
        "{out}"
    );
    let out = sluice_tests::psql(
        server.pg_addr,
        "SELECT relname, pg_size_pretty(pg_table_size(oid)), pg_size_pretty(8192::bigint) FROM pg_catalog.pg_class WHERE relnamespace = (SELECT oid FROM pg_catalog.pg_namespace WHERE nspname = 'public') ORDER BY relname",
    );
    assert!(
        out.contains("clicks||8192 bytes") && out.contains("clicks_all||8192 bytes"),
        "{out}"
    );
    for (relation, name) in [("sources", "clicks"), ("streams", "clicks_all")] {
        let sql: String = pg
            .query_one(
                &format!("SELECT sql FROM sluice.{relation} WHERE name = $1"),
                &[&name],
            )
            .await
            .unwrap()
            .get(0);
        assert!(sql.starts_with("CREATE"), "{relation}: {sql}");
    }
    drop(server);
}

/// A `SET` of a setting Sluice does not know (drivers send their own) is accepted with a
/// notice, not an error; the settings drivers send on connect pass silently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_settings_are_accepted_with_a_notice() {
    let lake = tempfile::tempdir().unwrap();
    let server = start_server(lake.path()).await;
    let addr = server.pg_addr;
    let out = Command::new("psql")
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h"])
        .arg(addr.ip().to_string())
        .args(["-p", &addr.port().to_string(), "-U", "sluice", "sluice"])
        .args([
            "-c",
            "SET lock_timeout = '5s'",
            "-c",
            "SET application_name = 'x'",
            "-c",
            "SHOW lock_timeout",
        ])
        .output()
        .expect("psql");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.matches("NOTICE:").count(),
        1,
        "one notice, for lock_timeout only: {stderr}"
    );
    assert!(
        stderr
            .contains("setting \"lock_timeout\" is not known to Sluice: accepted, with no effect"),
        "{stderr}"
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().last(),
        Some("5s"),
        "SHOW gives it back"
    );
    server.shutdown().await;
}

/// Columns of one name are allowed, as in Postgres (`SELECT version(), pg_catalog.version()`,
/// `SELECT 1, 1`), and keep Postgres' names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_select_list_may_repeat_a_column_name() {
    let lake = tempfile::tempdir().unwrap();
    let (server, pg) = server_with_clicks(lake.path()).await;
    for (sql, names) in [
        (
            "SELECT version(), pg_catalog.version()",
            vec!["version", "version"],
        ),
        ("SELECT 1, 1", vec!["?column?", "?column?"]),
        (
            "SELECT count(*), count(*), max(user_id) AS count FROM clicks_all",
            vec!["count", "count", "count"],
        ),
    ] {
        // Both protocols: the extended one describes the statement first.
        let rows = pg
            .query(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        let got: Vec<&str> = rows[0].columns().iter().map(|c| c.name()).collect();
        assert_eq!(got, names, "{sql}");
        pg.simple_query(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    let rows = pg
        .query("SELECT count(*), count(*) FROM clicks_all", &[])
        .await
        .unwrap();
    assert_eq!(rows[0].get::<_, i64>(0), 500);
    assert_eq!(rows[0].get::<_, i64>(1), 500);
    drop(server);
}
