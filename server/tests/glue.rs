//! Stream tables in the Glue Data Catalog (moto's, started by `scripts/services.sh`):
//! `sluice serve --lake s3://… --glue-database NAME` registers each stream's table — its
//! columns, `dt`/`hour` partition keys, Parquet SerDe, location, and partition projection
//! from the stream's first event date — updates it when the stream is created again with
//! other columns, keeps it on `DROP STREAM` and deletes it on `DROP STREAM … WITH
//! (drop_table = 'true')`. A Glue that fails never stops a stream: the failures are
//! retried, counted in `/metrics` and shown in `SHOW STREAMS`.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{aws_env as aws, python_with_aws as python, service_env as env};

fn psql(port: u16, sql: &str) -> String {
    common::psql(port, sql).trim().to_string()
}

fn create_bucket(endpoint: &str, bucket: &str) {
    python(
        "import boto3, sys; boto3.client('s3', endpoint_url=sys.argv[1]).create_bucket(Bucket=sys.argv[2])",
        &[endpoint, bucket],
        endpoint,
    );
}

/// The Glue table `database.name` as boto3 reads it (`Null` when there is none).
fn glue_table(endpoint: &str, database: &str, name: &str) -> serde_json::Value {
    let out = python(
        r#"
import boto3, json, sys
glue = boto3.client('glue', endpoint_url=sys.argv[1])
try:
    t = glue.get_table(DatabaseName=sys.argv[2], Name=sys.argv[3])['Table']
except (glue.exceptions.EntityNotFoundException):
    print('null')
    sys.exit(0)
sd = t['StorageDescriptor']
print(json.dumps({
    'columns': [[c['Name'], c['Type']] for c in sd['Columns']],
    'partition_keys': [[c['Name'], c['Type']] for c in t.get('PartitionKeys', [])],
    'location': sd['Location'],
    'input_format': sd['InputFormat'],
    'serde': sd['SerdeInfo']['SerializationLibrary'],
    'table_type': t.get('TableType'),
    'parameters': t.get('Parameters', {}),
}))
"#,
        &[endpoint, database, name],
        endpoint,
    );
    serde_json::from_str(out.trim()).unwrap()
}

/// Waits up to 30 s for the Glue table to satisfy `done`; the table.
fn wait_for_table(
    endpoint: &str,
    database: &str,
    name: &str,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let started = Instant::now();
    loop {
        let t = glue_table(endpoint, database, name);
        if done(&t) {
            return t;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{what}: the Glue table is {t}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

const SOURCE: &str = "CREATE SOURCE clicks (user_id BIGINT NOT NULL, url TEXT, ts TIMESTAMP NOT NULL,
                               WATERMARK FOR ts AS ts)
         WITH (connector = 'datagen', rows_per_second = '0', max_rows = '20000', seed = '7',
               start_time = '2024-05-01T07:30:00Z', time_step = '500 ms', fields.user_id.max = '50')";

#[test]
fn every_stream_has_its_glue_table_from_its_first_event_date_until_dropped_with_it() {
    let endpoint = env("SLUICE_TEST_S3");
    let bucket = format!("glue-{}", std::process::id());
    let database = format!("analytics_{}", std::process::id());
    create_bucket(&endpoint, &bucket);
    let (mut child, port) = common::serve_with(|cmd| {
        cmd.args(["--lake", &format!("s3://{bucket}/prod")])
            .args(["--glue-database", &database]);
        aws(cmd, &endpoint);
    });
    psql(port, SOURCE);
    psql(
        port,
        "CREATE STREAM per_10min WITH (rollover_interval = '200 ms') AS
           SELECT user_id, window_start, window_end, count(*) AS n
           FROM TUMBLE(clicks, ts, INTERVAL '10 minutes') GROUP BY user_id, window_start, window_end",
    );
    // Registered when created (from today: no data yet), then from the first event's day.
    let table = wait_for_table(&endpoint, &database, "per_10min", "from 2024-05-01", |t| {
        t["parameters"]["projection.dt.range"] == "2024-05-01,NOW"
    });
    let pairs = |v: &serde_json::Value| -> Vec<(String, String)> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p[0].as_str().unwrap().to_string(),
                    p[1].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let owned = |l: &[(&str, &str)]| -> Vec<(String, String)> {
        l.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    };
    assert_eq!(
        pairs(&table["columns"]),
        owned(&[
            ("user_id", "bigint"),
            ("window_start", "timestamp"),
            ("window_end", "timestamp"),
            ("n", "bigint")
        ])
    );
    assert_eq!(
        pairs(&table["partition_keys"]),
        owned(&[("dt", "string"), ("hour", "string")])
    );
    let location = format!("s3://{bucket}/prod/processed/per_10min/");
    assert_eq!(table["location"], location.as_str());
    assert_eq!(table["table_type"], "EXTERNAL_TABLE");
    assert_eq!(
        table["serde"],
        "org.apache.hadoop.hive.ql.io.parquet.serde.ParquetHiveSerDe"
    );
    assert_eq!(
        table["input_format"],
        "org.apache.hadoop.hive.ql.io.parquet.MapredParquetInputFormat"
    );
    let p = &table["parameters"];
    assert_eq!(p["classification"], "parquet");
    assert_eq!(p["projection.enabled"], "true");
    assert_eq!(p["projection.dt.type"], "date");
    assert_eq!(p["projection.hour.range"], "0,23");
    assert_eq!(
        p["storage.location.template"],
        format!("{location}dt=${{dt}}/hour=${{hour}}").as_str()
    );
    assert_eq!(
        psql(
            port,
            "SELECT glue FROM sluice.streams WHERE name = 'per_10min'"
        ),
        format!("registered in {database}")
    );

    // Dropped: the table stays (its data does). Created again with other columns: updated.
    psql(port, "DROP STREAM per_10min");
    assert!(!glue_table(&endpoint, &database, "per_10min").is_null());
    psql(
        port,
        "CREATE STREAM per_10min AS
           SELECT user_id, count(*) AS clicks, window_start
           FROM TUMBLE(clicks, ts, INTERVAL '10 minutes') GROUP BY user_id, window_start, window_end",
    );
    wait_for_table(&endpoint, &database, "per_10min", "new columns", |t| {
        t["columns"][1][0] == "clicks"
    });
    psql(port, "DROP STREAM per_10min WITH (drop_table = 'true')");
    assert!(glue_table(&endpoint, &database, "per_10min").is_null());
    let err = common::run_psql(port, "DROP STREAM nope WITH (drop_tabel = 'true')").unwrap_err();
    assert!(err.contains("did you mean `drop_table`"), "{err}");
    child.kill().unwrap();
}

#[test]
fn a_failing_glue_never_stops_a_stream_and_is_retried_counted_and_shown() {
    let endpoint = env("SLUICE_TEST_S3");
    let bucket = format!("noglue-{}", std::process::id());
    create_bucket(&endpoint, &bucket);
    // S3 answers; Glue's endpoint is a closed port.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let glue_endpoint = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let (mut child, port, http) = common::serve_ports(|cmd| {
        cmd.args(["--lake", &format!("s3://{bucket}/prod")])
            .args(["--glue-database", "analytics"]);
        aws(cmd, &endpoint);
        cmd.env("AWS_ENDPOINT_URL_GLUE", &glue_endpoint);
    });
    psql(port, SOURCE);
    psql(
        port,
        "CREATE STREAM copied WITH (rollover_interval = '200 ms') AS SELECT user_id, ts FROM clicks",
    );
    let started = Instant::now();
    loop {
        let rows: i64 = psql(port, "SELECT count(*) FROM copied").parse().unwrap();
        let status = psql(
            port,
            "SELECT glue FROM sluice.streams WHERE name = 'copied'",
        );
        let metrics = String::from_utf8(
            Command::new("curl")
                .args(["-s", &format!("http://127.0.0.1:{http}/metrics")])
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap();
        let failures = metrics
            .lines()
            .find(|l| l.starts_with("sluice_glue_failures_total{stream=\"copied\"}"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|n| n.parse::<f64>().ok())
            .unwrap_or(0.0);
        if rows == 20_000 && status.starts_with("retrying (") && failures >= 2.0 {
            assert!(status.contains("Glue"), "{status}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{rows} rows, Glue status `{status}`, {failures} failures counted"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    child.kill().unwrap();
}
