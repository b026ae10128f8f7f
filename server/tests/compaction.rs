//! Compaction of closed hour partitions and their `_SUCCESS` markers, on moto's S3 and Glue:
//! a stream fed over several hours of event time has, per closed hour, at most
//! ⌈bytes / target_file_size⌉ files, sorted by event time, holding exactly the rows a stream
//! without compaction wrote (checked with DuckDB: count and checksum), a marker naming them
//! with the row count and the latest event time, and a Glue partition saying it is complete.
//! (Killed during compaction: `crash.rs`.)

mod common;

use std::time::{Duration, Instant};

use common::{aws_env as aws, lake_partitions, python_with_aws as python, service_env as env};
use serde_json::Value;

fn psql(port: u16, sql: &str) -> String {
    common::psql(port, sql).trim().to_string()
}

/// One event-time hour per 1.8 s: 2 000 rows a second, a second of event time apart.
const SOURCE: &str =
    "CREATE SOURCE clicks (user_id BIGINT NOT NULL, url TEXT, ts TIMESTAMP NOT NULL,
                               WATERMARK FOR ts AS ts)
         WITH (connector = 'datagen', rows_per_second = '2000', batch_size = '200', seed = '7',
               start_time = '2024-05-01T07:00:00Z', time_step = '1 second',
               fields.user_id.max = '50')";

const TARGET: u64 = 16 * 1024;

/// The Glue partition (dt, hour) of `database.table`'s parameters (`Null`: none).
fn glue_partition(endpoint: &str, database: &str, table: &str, dt: &str, hour: &str) -> Value {
    let out = python(
        r#"
import boto3, json, sys
glue = boto3.client('glue', endpoint_url=sys.argv[1])
try:
    p = glue.get_partition(DatabaseName=sys.argv[2], TableName=sys.argv[3],
                           PartitionValues=[sys.argv[4], sys.argv[5]])['Partition']
except (glue.exceptions.EntityNotFoundException):
    print('null')
    sys.exit(0)
print(json.dumps({'parameters': p.get('Parameters', {}),
                  'location': p['StorageDescriptor']['Location']}))
"#,
        &[endpoint, database, table, dt, hour],
        endpoint,
    );
    serde_json::from_str(out.trim()).unwrap()
}

#[test]
fn closed_hours_are_compacted_sorted_marked_complete_and_registered_in_glue() {
    let endpoint = env("SLUICE_TEST_S3");
    let bucket = format!("compact-{}", std::process::id());
    let database = format!("compacted_{}", std::process::id());
    python(
        "import boto3, sys; boto3.client('s3', endpoint_url=sys.argv[1]).create_bucket(Bucket=sys.argv[2])",
        &[&endpoint, &bucket],
        &endpoint,
    );
    let lake = format!("s3://{bucket}/prod");
    let (mut child, port, http) = common::serve_ports(|cmd| {
        cmd.args(["--lake", &lake])
            .args(["--glue-database", &database]);
        aws(cmd, &endpoint);
    });
    psql(port, SOURCE);
    psql(
        port,
        &format!(
            "CREATE STREAM compacted WITH (rollover_interval = '200 ms', checkpoint_interval = '200 ms',
                                           compaction_delay = '0 s', target_file_size = '{TARGET}')
             AS SELECT user_id, url, ts FROM clicks"
        ),
    );
    psql(
        port,
        "CREATE STREAM plain WITH (rollover_interval = '200 ms', checkpoint_interval = '200 ms',
                                   compaction = 'off')
         AS SELECT user_id, url, ts FROM clicks",
    );
    let explain = psql(
        port,
        "EXPLAIN CREATE STREAM e WITH (compaction_delay = '10 minutes') AS SELECT * FROM clicks",
    );
    assert!(
        explain.contains("hours compacted 600s after they end"),
        "{explain}"
    );

    // Hours 07 and 08 close as the watermark passes 09:00; each is then compacted.
    let closed = ["2024-05-01/07", "2024-05-01/08"];
    let checksum = "hash(user_id, url, ts)";
    let started = Instant::now();
    let compacted = loop {
        let p = lake_partitions(&lake, "compacted", checksum, Some(&endpoint), &closed);
        if closed
            .iter()
            .all(|h| p.get(*h).is_some_and(|p| !p["marker"].is_null()))
        {
            break p;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "hours not marked complete: {p:#?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let plain = lake_partitions(&lake, "plain", checksum, Some(&endpoint), &closed);
    for hour in closed {
        let (c, p) = (&compacted[hour], &plain[hour]);
        // Exactly the rows the uncompacted stream has: one per second of the hour.
        assert_eq!(c["rows"], 3600, "{hour}: {c:#}");
        assert_eq!(c["distinct_ts"], 3600, "{hour}: {c:#}");
        assert_eq!(c["rows"], p["rows"], "{hour}");
        assert_eq!(c["checksum"], p["checksum"], "{hour}");
        assert_eq!(c["max_ts"], p["max_ts"], "{hour}");
        let files = c["files"].as_array().unwrap();
        let bytes: u64 = files.iter().map(|f| f[1].as_u64().unwrap()).sum();
        assert!(
            files.len() as u64 <= bytes.div_ceil(TARGET),
            "{hour}: {} files of {bytes} bytes",
            files.len()
        );
        assert!(
            p["files"].as_array().unwrap().len() > files.len(),
            "{hour}: compaction left no fewer files: {p:#} vs {c:#}"
        );
        assert_eq!(c["ascending"], true, "{hour}: not sorted by event time");
        // The marker names exactly the files, with the rows and the latest event time.
        let m = &c["marker"];
        assert_eq!(m["rows"], 3600, "{m:#}");
        assert_eq!(m["max_event_time"], c["max_ts"], "{m:#}");
        assert_eq!(m["stream"], "compacted");
        assert_eq!(m["bytes"].as_u64(), Some(bytes));
        let names: Vec<&Value> = files.iter().map(|f| &f[0]).collect();
        let mut marked: Vec<&Value> = m["files"].as_array().unwrap().iter().collect();
        marked.sort_by_key(|v| v.as_str().unwrap().to_string());
        assert_eq!(marked, names);
        assert!(p["marker"].is_null(), "no marker without compaction");
    }

    // The Glue partition says the hour is complete.
    let started = Instant::now();
    let partition = loop {
        let p = glue_partition(&endpoint, &database, "compacted", "2024-05-01", "07");
        if !p.is_null() {
            break p;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no Glue partition for dt=2024-05-01/hour=07"
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    let params = &partition["parameters"];
    assert_eq!(params["sluice.complete"], "true", "{partition:#}");
    assert_eq!(params["sluice.rows"], "3600", "{partition:#}");
    assert_eq!(
        params["sluice.max_event_time"], compacted["2024-05-01/07"]["max_ts"],
        "{partition:#}"
    );
    assert_eq!(
        partition["location"],
        format!("{lake}/processed/compacted/dt=2024-05-01/hour=07/").as_str()
    );

    // The server's own queries see each row once.
    assert_eq!(
        psql(
            port,
            "SELECT count(*), count(DISTINCT ts) FROM compacted
             WHERE ts < TIMESTAMP '2024-05-01 09:00:00'"
        ),
        "7200|7200"
    );
    let metrics = String::from_utf8(
        std::process::Command::new("curl")
            .args(["-s", &format!("http://127.0.0.1:{http}/metrics")])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(
        metrics.lines().any(|l| l
            .starts_with("sluice_lake_compactions_total{stream=\"compacted\"}")
            && !l.ends_with(" 0")),
        "{metrics}"
    );
    child.kill().unwrap();
}

#[test]
fn compaction_options_are_checked() {
    let lake = tempfile::tempdir().unwrap();
    let (mut child, port) = common::serve_with(|cmd| {
        cmd.env("SLUICE_LAKE", lake.path());
    });
    psql(port, SOURCE);
    for (sql, says) in [
        (
            "CREATE STREAM s WITH (compaction = 'sometimes') AS SELECT * FROM clicks",
            "`true` or `false`",
        ),
        (
            "CREATE STREAM s WITH (compaction = 'off', compaction_delay = '1 minute') AS SELECT * FROM clicks",
            "compaction_delay` applies when compaction is on",
        ),
        (
            "CREATE STREAM s WITH (compaction = 'on', checkpoint_interval = '0s') AS SELECT * FROM clicks",
            "needs checkpoints",
        ),
        (
            "CREATE STREAM s WITH (compaction_dalay = '1 minute') AS SELECT * FROM clicks",
            "did you mean `compaction_delay`",
        ),
    ] {
        let err = common::run_psql(port, sql).unwrap_err();
        assert!(err.contains(says), "{sql}: {err}");
        assert!(err.contains("22023") || err.contains("ERROR"), "{err}");
    }
    child.kill().unwrap();
}

/// POSTs newline-delimited JSON `body` to the HTTP ingest of `source`; the status code.
fn post(http: u16, source: &str, body: &str) -> String {
    let out = std::process::Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
        .args([
            "-H",
            "Content-Type: application/x-ndjson",
            "--data-binary",
            body,
        ])
        .arg(format!(
            "http://127.0.0.1:{http}/v1/sources/{source}/events"
        ))
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap()
}

/// Events `(id, seconds after 2024-05-01T07:00Z)` as ingest bodies take them.
fn events(rows: &[(i64, i64)]) -> String {
    const T0: i64 = 1_714_546_800; // 2024-05-01T07:00:00Z
    rows.iter()
        .map(|(id, s)| {
            let t = chrono::DateTime::from_timestamp(T0 + s, 0).unwrap();
            format!(
                "{{\"id\":{id},\"ts\":\"{}\"}}\n",
                t.format("%Y-%m-%dT%H:%M:%SZ")
            )
        })
        .collect()
}

#[test]
fn a_late_row_reopens_a_complete_hour_which_is_compacted_and_marked_again() {
    let lake = tempfile::tempdir().unwrap();
    let root = lake.path().to_str().unwrap().to_string();
    let (mut child, port, http) = common::serve_ports(|cmd| {
        cmd.env("SLUICE_LAKE", &root);
    });
    psql(
        port,
        "CREATE SOURCE events (id BIGINT NOT NULL, ts TIMESTAMP NOT NULL, WATERMARK FOR ts AS ts)
         WITH (connector = 'http')",
    );
    psql(
        port,
        "CREATE STREAM kept WITH (checkpoint_interval = '200 ms', compaction_delay = '0 s')
         AS SELECT id, ts FROM events",
    );
    let hour = "2024-05-01/07";
    let wait_marker = |rows: u64| {
        let started = Instant::now();
        loop {
            let p = lake_partitions(&root, "kept", "hash(id, ts)", None, &[hour]);
            let p = &p[hour];
            let named: Vec<&Value> = p["marker"]["files"]
                .as_array()
                .map(|a| a.iter().collect())
                .unwrap_or_default();
            let files: Vec<&Value> = p["files"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| &f[0])
                .collect();
            if p["marker"]["rows"] == rows && named == files {
                return p.clone();
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "hour {hour} not final with {rows} rows: {p:#}"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    };
    // Three files of the hour (each post lands before a checkpoint closes its file), then an
    // event past its end: the watermark closes it.
    for part in 0..3 {
        let rows: Vec<(i64, i64)> = (part * 100..part * 100 + 100)
            .map(|i| (i, i * 10))
            .collect();
        assert_eq!(post(http, "events", &events(&rows)), "200");
        std::thread::sleep(Duration::from_millis(400));
    }
    assert_eq!(post(http, "events", &events(&[(999, 5400)])), "200");
    let first = wait_marker(300);
    assert_eq!(first["files"].as_array().unwrap().len(), 1, "{first:#}");
    assert_eq!(first["rows"], 300);

    // A late row (the stream has no window to drop it): the hour opens again, is compacted
    // again with it, and its marker rewritten.
    assert_eq!(post(http, "events", &events(&[(1000, 1799)])), "200");
    let second = wait_marker(301);
    assert_eq!(second["rows"], 301);
    assert_eq!(second["distinct_ts"], 301);
    assert_eq!(second["ascending"], true);
    assert_eq!(second["files"].as_array().unwrap().len(), 1, "{second:#}");
    assert_ne!(second["files"], first["files"], "rewritten");
    assert_eq!(
        psql(
            port,
            "SELECT count(*) FROM kept WHERE dt = '2024-05-01' AND hour = '07'"
        ),
        "301"
    );
    child.kill().unwrap();
}
