//! The `sluice` binary as users run it: `--help`, configuration from flags and environment,
//! the startup lines, a graceful stop on SIGTERM that flushes open files to the lake, and
//! `kill -9` in the middle of reading a Kafka topic losing nothing.

use std::process::Command;
use std::time::{Duration, Instant};

mod common;

use common::{Server, create_topic, kafka_brokers, produce_records, psql, serve_with, sluice};

/// Starts `sluice serve` on the local `lake`, configured from the environment.
fn serve(lake: &std::path::Path) -> (Server, u16) {
    serve_with(|cmd| {
        cmd.env("SLUICE_LAKE", lake); // configuration from the environment
    })
}

#[test]
fn help_explains_every_setting() {
    let out = sluice().args(["serve", "--help"]).output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "--lake",
        "SLUICE_LAKE",
        "--pg-listen",
        "SLUICE_PG_LISTEN",
        "--http-listen",
        "SLUICE_HTTP_LISTEN",
        "s3://",
        "127.0.0.1:6875",
    ] {
        assert!(
            help.contains(needle),
            "`sluice serve --help` does not mention {needle}:\n{help}"
        );
    }
    let out = sluice().arg("--bogus").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--bogus"));
}

#[test]
fn sigterm_flushes_open_files_and_a_restart_restores_the_catalog() {
    let lake = tempfile::tempdir().unwrap();
    let (child, port) = serve(lake.path());
    psql(
        port,
        "CREATE SOURCE clicks (user_id BIGINT NOT NULL, url TEXT, ts TIMESTAMP NOT NULL) WITH (connector = 'datagen', rows_per_second = '5000')",
    );
    // Files roll only every hour: anything in the lake after the stop was flushed by it.
    psql(
        port,
        "CREATE STREAM all_clicks WITH (rollover_interval = '1 hour') AS SELECT * FROM clicks",
    );
    let start = Instant::now();
    loop {
        let out = psql(port, "SHOW STREAMS");
        let rows_out: u64 = out.split('|').nth(4).unwrap().parse().unwrap();
        if rows_out > 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no rows after 30 s: {out}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(psql(port, "SELECT count(*) FROM all_clicks").trim(), "0");

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let mut child = child;
    let start = Instant::now();
    let exit = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "sluice did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "{exit:?}");

    let (mut child, port) = serve(lake.path());
    let kept: u64 = psql(port, "SELECT count(*) FROM all_clicks")
        .trim()
        .parse()
        .unwrap();
    assert!(kept > 0, "the rows held at SIGTERM were written");
    assert!(psql(port, "SHOW STREAMS").starts_with("all_clicks|running|clicks|"));
    child.kill().unwrap();
    child.wait().unwrap();
}

/// Produces orders `ids` to `topic` (JSON, one second apart in event time).
fn produce(brokers: &str, topic: &str, ids: std::ops::Range<u32>) {
    let records = ids.map(|id| {
        let value = format!(
            r#"{{"order_id":{id},"ts":"{}"}}"#,
            chrono_like_timestamp(u64::from(id))
        );
        (id.to_string(), value)
    });
    produce_records(brokers, topic, records);
}

/// 2024-05-01T08:00:00Z plus `seconds`, as RFC 3339.
fn chrono_like_timestamp(seconds: u64) -> String {
    let (h, m, s) = (8 + seconds / 3600, seconds / 60 % 60, seconds % 60);
    format!("2024-05-01T{h:02}:{m:02}:{s:02}Z")
}

#[test]
fn kill_9_while_reading_kafka_loses_nothing_and_duplicates_nothing() {
    let brokers = kafka_brokers();
    let topic = format!("kill-{}", std::process::id());
    create_topic(&brokers, &topic, 2);
    produce(&brokers, &topic, 0..20_000);

    let lake = tempfile::tempdir().unwrap();
    let (mut child, port) = serve(lake.path());
    psql(
        port,
        &format!(
            "CREATE SOURCE orders (order_id BIGINT NOT NULL, ts TIMESTAMP NOT NULL)
             WITH (connector = 'kafka', brokers = '{brokers}', topic = '{topic}', batch_size = '500')"
        ),
    );
    psql(
        port,
        "CREATE STREAM all_orders WITH (rollover_interval = '100 ms') AS SELECT * FROM orders",
    );
    // Kill it hard as soon as the first files landed: rows in flight and in open files die
    // with the process.
    let start = Instant::now();
    while psql(port, "SELECT count(*) FROM all_orders").trim() == "0" {
        assert!(start.elapsed() < Duration::from_secs(30), "nothing landed");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    // More records while it is down, then a restart on the same lake.
    produce(&brokers, &topic, 20_000..25_000);
    let (mut child, port) = serve(lake.path());
    let start = Instant::now();
    loop {
        let distinct: u64 = psql(port, "SELECT count(DISTINCT order_id) FROM all_orders")
            .trim()
            .parse()
            .unwrap();
        if distinct == 25_000 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{distinct} of 25000 orders after the restart"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The restart resumes from the last checkpoint: what landed before the kill is not
    // read again, what was in flight is.
    let rows: u64 = psql(port, "SELECT count(*) FROM all_orders")
        .trim()
        .parse()
        .unwrap();
    assert_eq!(rows, 25_000, "every order exactly once");
    child.kill().unwrap();
    child.wait().unwrap();
}

/// `SLUICE_LOG_FORMAT=json`: every log line is one JSON object (level, target, fields with
/// the message); an unknown format is refused at start, saying which there are.
#[test]
fn json_logs_are_one_object_per_line() {
    let lake = tempfile::tempdir().unwrap();
    let log = tempfile::NamedTempFile::new().unwrap();
    let stderr = log.reopen().unwrap();
    let (mut server, pg) = serve_with(|cmd| {
        cmd.env("SLUICE_LAKE", lake.path())
            .env("SLUICE_LOG_FORMAT", "json")
            .env("SLUICE_LOG", "debug")
            .stderr(stderr);
    });
    psql(
        pg,
        "CREATE SOURCE ticks (n BIGINT NOT NULL) WITH (connector = 'datagen', max_rows = '10', rows_per_second = '0');
         CREATE STREAM all_ticks AS SELECT * FROM ticks",
    );
    std::thread::sleep(Duration::from_millis(500));
    let _ = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status();
    let _ = server.wait();
    let text = std::fs::read_to_string(log.path()).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() > 3, "{text}");
    for line in &lines {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not one JSON object ({e}): {line}"));
        assert!(v["level"].is_string() && v["target"].is_string(), "{line}");
        assert!(v["fields"]["message"].is_string(), "{line}");
    }

    let out = sluice()
        .args(["serve", "--lake", lake.path().to_str().unwrap()])
        .env("SLUICE_LOG_FORMAT", "xml")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("SLUICE_LOG_FORMAT=xml is not known: use `json` or `text`"),
        "{err}"
    );
}
