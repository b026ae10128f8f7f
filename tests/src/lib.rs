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
        lease_ttl: sluice_server::lease::DEFAULT_LEASE_TTL,
        statement_timeout: std::time::Duration::ZERO,
        checkpoint_retention: sluice_engine::checkpoint::DEFAULT_RETENTION,
        glue_database: None,
        connections: Default::default(),
        security: Default::default(),
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

/// The first column of the single row `sql` returns, as a BIGINT.
pub async fn scalar(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

/// A Kafka producer waiting for every replica's acknowledgement.
pub fn producer(brokers: &str) -> rdkafka::producer::FutureProducer {
    rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("acks", "all")
        .create()
        .expect("a producer")
}

/// Creates `topic` with `partitions` partitions.
pub async fn create_topic(brokers: &str, topic: &str, partitions: i32) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("an admin client");
    let results = admin
        .create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("CreateTopics answered");
    for r in results {
        r.expect("the topic is created");
    }
}

/// The Confluent-compatible schema registry the tests use (`SLUICE_TEST_SCHEMA_REGISTRY`,
/// set by `scripts/services.sh`). Panics when it is not set.
pub fn schema_registry() -> String {
    std::env::var("SLUICE_TEST_SCHEMA_REGISTRY").unwrap_or_else(|_| {
        panic!(
            "SLUICE_TEST_SCHEMA_REGISTRY is not set: run the tests with scripts/test.sh, which \
             starts a schema registry, or first `eval \"$(scripts/services.sh start)\"`"
        )
    })
}

/// Registers the Avro `schema` under `subject` with the registry's REST API; its id.
pub async fn register_schema(registry: &str, subject: &str, schema: &str) -> u32 {
    let answer: serde_json::Value = reqwest::Client::new()
        .post(format!("{registry}/subjects/{subject}/versions"))
        .header("Content-Type", "application/vnd.schemaregistry.v1+json")
        .json(&serde_json::json!({ "schema": schema }))
        .send()
        .await
        .expect("the registry answers")
        .error_for_status()
        .expect("the schema is registered")
        .json()
        .await
        .expect("a JSON answer");
    answer["id"].as_u64().expect("an id") as u32
}

/// Avro binary encoding, written out by hand from the specification (so the tests do not
/// check arrow-avro against itself).
pub mod avro {
    /// A `long` (or `int`): zig-zag, then base-128 varint.
    pub fn long(out: &mut Vec<u8>, v: i64) {
        let mut n = ((v << 1) ^ (v >> 63)) as u64;
        while n >= 0x80 {
            out.push((n as u8) | 0x80);
            n >>= 7;
        }
        out.push(n as u8);
    }

    /// A `string` (or `bytes`): its length as a long, then its bytes.
    pub fn string(out: &mut Vec<u8>, s: &str) {
        long(out, s.len() as i64);
        out.extend_from_slice(s.as_bytes());
    }

    /// A `double`: 8 bytes, little-endian IEEE 754.
    pub fn double(out: &mut Vec<u8>, v: f64) {
        out.extend_from_slice(&v.to_le_bytes());
    }

    /// The Confluent framing: magic byte 0, then the schema id as 4 big-endian bytes.
    pub fn confluent(id: u32) -> Vec<u8> {
        let mut out = vec![0];
        out.extend_from_slice(&id.to_be_bytes());
        out
    }

    /// Reads a `long` at `*pos`, advancing it.
    pub fn read_long(bytes: &[u8], pos: &mut usize) -> i64 {
        let (mut n, mut shift) = (0u64, 0);
        loop {
            let b = bytes[*pos];
            *pos += 1;
            n |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                break;
            }
            shift += 7;
        }
        ((n >> 1) as i64) ^ -((n & 1) as i64)
    }

    /// Reads a `string` at `*pos`, advancing it.
    pub fn read_string(bytes: &[u8], pos: &mut usize) -> String {
        let len = read_long(bytes, pos) as usize;
        let s = String::from_utf8(bytes[*pos..*pos + len].to_vec()).expect("UTF-8");
        *pos += len;
        s
    }
}

/// The Kinesis API server the tests use (`SLUICE_TEST_KINESIS`, set by
/// `scripts/services.sh`). Panics when it is not set.
pub fn kinesis_endpoint() -> String {
    std::env::var("SLUICE_TEST_KINESIS").unwrap_or_else(|_| {
        panic!(
            "SLUICE_TEST_KINESIS is not set: run the tests with scripts/test.sh, which starts \
             kinesalite, or first `eval \"$(scripts/services.sh start)\"`"
        )
    })
}

/// A Kinesis client of the test server, with the dummy credentials it accepts.
pub fn kinesis_client() -> aws_sdk_kinesis::Client {
    use aws_sdk_kinesis::config::{Credentials, Region};
    let config = aws_sdk_kinesis::Config::builder()
        .behavior_version_latest()
        .endpoint_url(kinesis_endpoint())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("test", "test", None, None, "tests"))
        .build();
    aws_sdk_kinesis::Client::from_conf(config)
}

/// Every line of the errors zone of `name` in the local `lake`, parsed.
pub fn error_lines(lake: &Path, name: &str) -> Vec<serde_json::Value> {
    files_with_ext(&lake.join("errors").join(name), "jsonl")
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// POSTs `lines` (NDJSON) to the HTTP source `source`; the status code.
pub async fn push_events(http: std::net::SocketAddr, source: &str, lines: &[String]) -> u16 {
    reqwest::Client::new()
        .post(format!("http://{http}/v1/sources/{source}/events"))
        .header("Content-Type", "application/x-ndjson")
        .body(lines.join("\n"))
        .send()
        .await
        .expect("the HTTP server answers")
        .status()
        .as_u16()
}

/// A consumer assigned every one of `partitions` partitions of `topic`, from the beginning.
pub fn consume_from_beginning(
    brokers: &str,
    topic: &str,
    partitions: i32,
) -> rdkafka::consumer::StreamConsumer {
    use rdkafka::consumer::Consumer as _;
    let consumer: rdkafka::consumer::StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("test-reader-{topic}"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("a consumer");
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, rdkafka::Offset::Beginning)
            .expect("a partition");
    }
    consumer.assign(&tpl).expect("assigned");
    consumer
}

/// The connectors of this build, on a scratch lake (for validating `CREATE SOURCE` options
/// without a server).
pub fn connectors() -> sluice_engine::connector::ConnectorRegistry {
    let dir = std::env::temp_dir().join("sluice-test-connectors");
    let lake = sluice_connectors::lake::Lake::open(dir.to_str().expect("a UTF-8 temp dir"))
        .expect("a scratch lake");
    sluice_connectors::registry(&lake)
}

/// What a source reader run directly by a test is given: it publishes to `output`, without a
/// watermark or checkpoints; its bad records are drained (they are counted in its metrics).
/// Call inside a tokio runtime.
pub fn source_context(output: sluice_engine::FanOut) -> sluice_engine::SourceContext {
    let (bad_records, mut rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move { while rx.recv().await.is_some() {} });
    sluice_engine::SourceContext {
        output,
        metrics: std::sync::Arc::default(),
        bad_records,
        cancel: tokio_util::sync::CancellationToken::new(),
        watermark: None,
        checkpoint: None,
    }
}
