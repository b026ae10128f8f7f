//! Helpers of the tests that run the `sluice` binary.

#![allow(dead_code)] // each test file uses its own subset

use std::io::{BufRead, BufReader};
use std::ops::{Deref, DerefMut};
use std::process::{Child, Command, Stdio};

/// The `sluice` binary under test.
pub fn sluice() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
}

/// Runs `sql` with `psql` against the server on `port`; its unaligned, tuples-only output.
pub fn psql(port: u16, sql: &str) -> String {
    run_psql(port, sql).unwrap_or_else(|e| panic!("psql `{sql}`: {e}"))
}

/// Runs `sql` with `psql`: its unaligned, tuples-only output, or its error output.
pub fn run_psql(port: u16, sql: &str) -> Result<String, String> {
    let out = Command::new("psql")
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1"])
        .args(["-p", &port.to_string(), "-U", "sluice", "sluice", "-c", sql])
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run `psql` ({e}): install the PostgreSQL client (scripts/test.sh does)")
        });
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(String::from_utf8(out.stdout).unwrap())
}

/// A running `sluice serve`, killed when dropped: a test that fails leaves no server behind.
pub struct Server(Child);

impl Deref for Server {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl DerefMut for Server {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl From<Child> for Server {
    fn from(child: Child) -> Self {
        Self(child)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `sluice serve` on free ports with `lake` (set by `configure`, which may add more
/// environment); returns the server and its pg port once it listens.
pub fn serve_with(configure: impl FnOnce(&mut Command)) -> (Server, u16) {
    let (child, pg, _) = serve_ports(configure);
    (child, pg)
}

/// As [`serve_with`]; returns the pg and the HTTP ports.
pub fn serve_ports(configure: impl FnOnce(&mut Command)) -> (Server, u16, u16) {
    let mut cmd = sluice();
    cmd.args([
        "serve",
        "--pg-listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    configure(&mut cmd);
    let mut child = Server(cmd.spawn().expect("sluice starts"));
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let mut port = None;
    let mut http = None;
    for line in stdout.lines() {
        let line = line.unwrap();
        if let Some(addr) = line.strip_prefix("sluice: pgwire listening on ") {
            port = Some(addr.rsplit(':').next().unwrap().parse().unwrap());
        }
        if let Some(addr) = line.strip_prefix("sluice: http listening on ") {
            http = Some(addr.trim().rsplit(':').next().unwrap().parse().unwrap());
            break;
        }
    }
    (
        child,
        port.expect("the startup lines name the pg address"),
        http.expect("the startup lines name the http address"),
    )
}

/// The Kafka-protocol broker of the test services (`scripts/services.sh`); panics without.
pub fn kafka_brokers() -> String {
    std::env::var("SLUICE_TEST_KAFKA").unwrap_or_else(|_| {
        panic!("SLUICE_TEST_KAFKA is not set: run scripts/test.sh, which starts a Kafka-protocol broker")
    })
}

/// Creates `topic` with `partitions` partitions.
pub fn create_topic(brokers: &str, topic: &str, partitions: i32) {
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        rdkafka::ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .create()
            .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let created = runtime
        .block_on(admin.create_topics(
            &[rdkafka::admin::NewTopic::new(
                topic,
                partitions,
                rdkafka::admin::TopicReplication::Fixed(1),
            )],
            &rdkafka::admin::AdminOptions::new(),
        ))
        .unwrap();
    assert!(created.iter().all(|r| r.is_ok()), "{created:?}");
}

/// Produces `(key, value)` records to `topic` and waits until all are acknowledged.
pub fn produce_records(
    brokers: &str,
    topic: &str,
    records: impl IntoIterator<Item = (String, String)>,
) {
    use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
    let producer: ThreadedProducer<DefaultProducerContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("acks", "all")
        .create()
        .expect("a producer");
    for (key, value) in records {
        let mut record = BaseRecord::to(topic).key(&key).payload(&value);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, r)) => {
                    record = r;
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
            }
        }
    }
    producer
        .flush(std::time::Duration::from_secs(30))
        .expect("acknowledged");
}

/// Every record value on `topic` as a `read_committed` consumer sees it, from the beginning
/// of each partition to its end.
pub fn read_topic(brokers: &str, topic: &str) -> Vec<Vec<u8>> {
    use rdkafka::Message as _;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let timeout = std::time::Duration::from_secs(10);
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("test-reader-{topic}"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .create()
        .expect("a consumer");
    let metadata = consumer.fetch_metadata(Some(topic), timeout).unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    let mut open = std::collections::BTreeSet::new();
    for p in metadata.topics().iter().flat_map(|t| t.partitions()) {
        let (low, high) = consumer.fetch_watermarks(topic, p.id(), timeout).unwrap();
        if high > low {
            tpl.add_partition_offset(topic, p.id(), rdkafka::Offset::Offset(low))
                .unwrap();
            open.insert(p.id());
        }
    }
    let mut values = vec![];
    if open.is_empty() {
        return values;
    }
    consumer.assign(&tpl).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !open.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "{topic}: no end in sight"
        );
        match consumer.poll(std::time::Duration::from_millis(500)) {
            None => {}
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                open.remove(&p);
            }
            Some(Err(e)) => panic!("reading {topic}: {e}"),
            Some(Ok(m)) => values.push(m.payload().unwrap_or_default().to_vec()),
        }
    }
    values
}

/// A variable `scripts/services.sh start` sets (a service's address); panics, saying how to
/// start the services, when it is missing.
pub fn service_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: run the tests with scripts/test.sh, which starts the services, \
             or first `eval \"$(scripts/services.sh start)\"`"
        )
    })
}

/// The AWS environment pointing at the test services' S3/SQS/Glue server `endpoint`.
pub fn aws_env(cmd: &mut Command, endpoint: &str) {
    cmd.env("AWS_ENDPOINT_URL", endpoint)
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1");
}

/// Runs `script` (`python -c`) with `args` in the test services' Python, the AWS
/// environment pointing at `endpoint`; its standard output (it must succeed).
pub fn python_with_aws(script: &str, args: &[&str], endpoint: &str) -> String {
    let mut cmd = Command::new(service_env("SLUICE_TEST_PYTHON"));
    cmd.args(["-c", script]).args(args);
    aws_env(&mut cmd, endpoint);
    let out = cmd.output().expect("the test Python runs");
    assert!(
        out.status.success(),
        "python: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Each hour partition of `stream` in `lake` (a directory, or `s3://…` on the test S3
/// server `endpoint`), as `tests/python/partitions.py` describes it with DuckDB and pyarrow:
/// `"dt/hour"` → files, rows, distinct `ts`, the sum of `checksum`, the latest `ts`, whether
/// `ts` ascends through the files, and the `_SUCCESS` marker — of the partitions `hours`
/// only (`dt/hour`; all when empty).
pub fn lake_partitions(
    lake: &str,
    stream: &str,
    checksum: &str,
    endpoint: Option<&str>,
    hours: &[&str],
) -> serde_json::Map<String, serde_json::Value> {
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/python/partitions.py");
    let mut cmd = Command::new(service_env("SLUICE_TEST_PYTHON"));
    cmd.arg(script).args([lake, stream, checksum]);
    cmd.arg(endpoint.unwrap_or_default()).arg(hours.join(","));
    if let Some(e) = endpoint {
        aws_env(&mut cmd, e);
    }
    let out = cmd.output().expect("the test Python runs");
    assert!(
        out.status.success(),
        "partitions.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}
