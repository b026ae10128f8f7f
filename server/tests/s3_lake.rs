//! The lake on an S3 server (moto, started by `scripts/services.sh`): `sluice serve --lake
//! s3://…` with the standard AWS environment variables; the processed zone read back by
//! pyarrow and DuckDB with Hive partitioning equals what `SELECT` over psql answers, and the
//! generated Athena DDL, parsed by sqlglot's Athena dialect, matches the Parquet schema.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{aws_env as aws, python_with_aws as python, service_env as env};

fn psql(port: u16, sql: &str) -> String {
    common::psql(port, sql).trim().to_string()
}

fn serve(lake: &str, endpoint: &str) -> (common::Server, u16) {
    common::serve_with(|cmd| {
        cmd.args(["--lake", lake]);
        aws(cmd, endpoint);
    })
}

#[test]
fn a_stream_on_s3_reads_back_with_duckdb_and_pyarrow_and_its_athena_ddl_parses() {
    let endpoint = env("SLUICE_TEST_S3");
    let bucket = format!("lake-{}", std::process::id());
    python(
        "import boto3, sys; boto3.client('s3', endpoint_url=sys.argv[1]).create_bucket(Bucket=sys.argv[2])",
        &[&endpoint, &bucket],
        &endpoint,
    );
    let (mut child, port) = serve(&format!("s3://{bucket}/prod"), &endpoint);
    // 30 000 clicks, one every 0.5 s from 07:30: about four hours, five hourly partitions.
    psql(
        port,
        "CREATE SOURCE clicks (user_id BIGINT NOT NULL, url TEXT, ts TIMESTAMP NOT NULL,
                               WATERMARK FOR ts AS ts)
         WITH (connector = 'datagen', rows_per_second = '0', max_rows = '30000', seed = '7',
               start_time = '2024-05-01T07:30:00Z', time_step = '500 ms', fields.user_id.max = '50')",
    );
    psql(
        port,
        "CREATE STREAM per_10min WITH (rollover_interval = '200 ms') AS
           SELECT user_id, window_start, window_end, count(*) AS n
           FROM TUMBLE(clicks, ts, INTERVAL '10 minutes') GROUP BY user_id, window_start, window_end",
    );
    let started = Instant::now();
    let (rows, total) = loop {
        let out = psql(port, "SELECT count(*), coalesce(sum(n), 0) FROM per_10min");
        let (rows, total) = out.split_once('|').unwrap();
        let (rows, total): (i64, i64) = (rows.parse().unwrap(), total.parse().unwrap());
        if total == 30_000 {
            break (rows, total);
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "only {total} clicks counted after 90 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let hours: i64 = psql(
        port,
        "SELECT count(DISTINCT date_trunc('hour', window_start)) FROM per_10min",
    )
    .parse()
    .unwrap();
    assert_eq!(hours, 5);

    let ddl = psql(port, "SHOW CREATE TABLE per_10min FOR ATHENA");
    // Partition projection starts at the first event's day, not in 1970.
    assert!(
        ddl.contains("'projection.dt.range' = '2024-05-01,NOW'"),
        "{ddl}"
    );
    let dir = tempfile::tempdir().unwrap();
    let ddl_file = dir.path().join("ddl.sql");
    std::fs::write(&ddl_file, &ddl).unwrap();
    // The same DDL lies next to the data, where Athena does not read it (written when the
    // stream was created, with today's date, and again once files landed on an earlier day).
    let started = Instant::now();
    loop {
        let stored = python(
            "import boto3, sys; print(boto3.client('s3', endpoint_url=sys.argv[1]).get_object(Bucket=sys.argv[2], Key=sys.argv[3])['Body'].read().decode(), end='')",
            &[
                &endpoint,
                &bucket,
                "prod/processed/per_10min/_athena_table.sql",
            ],
            &endpoint,
        );
        if stored.trim_end() == format!("{ddl};") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the stored DDL is not the stream's: {stored}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    let script = std::path::Path::new(&manifest_dir()).join("../tests/python/check_lake.py");
    let mut cmd = Command::new(env("SLUICE_TEST_PYTHON"));
    cmd.arg(script).args([
        &endpoint,
        &bucket,
        "prod",
        "per_10min",
        ddl_file.to_str().unwrap(),
        "n",
    ]);
    aws(&mut cmd, &endpoint);
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "check_lake.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // Row for row, pyarrow reads what psql answers.
    let psql_rows: Vec<serde_json::Value> = psql(
        port,
        "SELECT user_id, to_char(window_start, '%Y-%m-%d %H:%M:%S'), n FROM per_10min
         ORDER BY 1, 2, 3",
    )
    .lines()
    .map(|l| {
        let f: Vec<&str> = l.split('|').collect();
        serde_json::json!([
            f[0].parse::<i64>().unwrap(),
            f[1],
            f[2].parse::<i64>().unwrap()
        ])
    })
    .collect();
    assert_eq!(seen["pyarrow"]["all"], serde_json::Value::Array(psql_rows));

    // pyarrow and DuckDB see exactly the rows psql sees, in the five hourly partitions.
    for reader in ["pyarrow", "duckdb"] {
        assert_eq!(seen[reader]["rows"], rows, "{reader}: {seen}");
        assert_eq!(seen[reader]["sum"], total, "{reader}: {seen}");
    }
    assert_eq!(seen["duckdb"]["partitions"], hours);
    let partitions = seen["pyarrow"]["partitions"].as_array().unwrap();
    assert_eq!(
        partitions.first().unwrap(),
        "2024-05-01/07",
        "{partitions:?}"
    );
    assert_eq!(partitions.len() as i64, hours);

    // The DDL: the stream's columns with the Athena types of the Parquet columns, Hive
    // partitions, Parquet, the stream's processed prefix on S3, partition projection.
    let athena = &seen["sqlglot"];
    assert_eq!(athena["table"], "per_10min");
    assert_eq!(
        athena["columns"],
        serde_json::json!([
            ["user_id", "bigint"],
            ["window_start", "timestamp"],
            ["window_end", "timestamp"],
            ["n", "bigint"]
        ])
    );
    let parquet: Vec<(String, String)> = seen["pyarrow"]["file_schema"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f[0].as_str().unwrap().into(), f[1].as_str().unwrap().into()))
        .collect();
    let expected_parquet = [
        ("user_id", "int64"),
        ("window_start", "timestamp[us, tz=UTC]"),
        ("window_end", "timestamp[us, tz=UTC]"),
        ("n", "int64"),
    ];
    assert_eq!(
        parquet,
        expected_parquet.map(|(n, t)| (n.to_string(), t.to_string()))
    );
    assert_eq!(
        athena["partitioned_by"],
        serde_json::json!([["dt", "string"], ["hour", "string"]])
    );
    assert_eq!(
        athena["location"],
        format!("s3://{bucket}/prod/processed/per_10min/")
    );
    assert_eq!(athena["stored_as_parquet"], true);
    // Partition projection: Athena computes the partitions, no MSCK REPAIR ever.
    let properties = &athena["properties"];
    assert_eq!(properties["projection.enabled"], "true", "{properties}");
    assert_eq!(properties["projection.dt.format"], "yyyy-MM-dd");
    assert_eq!(properties["projection.hour.digits"], "2");
    assert_eq!(
        properties["storage.location.template"],
        format!("s3://{bucket}/prod/processed/per_10min/dt=${{dt}}/hour=${{hour}}")
    );

    child.kill().unwrap();
    child.wait().unwrap();
}

/// The package's directory in the checkout being tested, read when the test runs: a
/// compile-time `env!` would name the checkout the cached test binary was built in.
fn manifest_dir() -> String {
    std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR is set by cargo test")
}
