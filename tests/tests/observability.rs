//! `GET /metrics`, `GET /ready` and the shipped Grafana dashboard against a real server: a
//! Kafka source with bad records feeds a windowed stream and a Kafka sink; the scraped
//! counters equal what was produced, the lag falls to 0 once the source caught up, a failed
//! stream shows `up` 0 and is named by `/ready`, every metric the dashboard queries is
//! exported, and promtool accepts the exposition.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::producer::FutureRecord;
use sluice_tests::{create_topic, kafka_brokers, pg_connect, producer, start_server, wait_for};

/// One scrape: each series (name and labels as written) → its value.
struct Scrape {
    text: String,
    series: BTreeMap<String, f64>,
}

impl Scrape {
    async fn of(http: std::net::SocketAddr) -> Self {
        let text = reqwest::get(format!("http://{http}/metrics"))
            .await
            .expect("GET /metrics")
            .text()
            .await
            .unwrap();
        let series = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|l| {
                let (k, v) = l.rsplit_once(' ').expect("series value");
                (k.to_string(), v.parse::<f64>().expect("a number"))
            })
            .collect();
        Self { text, series }
    }

    /// The value of `name` with exactly `labels` (in the order the exporter writes them).
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let key = if labels.is_empty() {
            name.to_string()
        } else {
            let l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
            format!("{name}{{{}}}", l.join(","))
        };
        self.series.get(&key).copied()
    }

    /// The sum over the series of `name` whose labels include `label`.
    fn sum(&self, name: &str, label: &str) -> f64 {
        self.series
            .iter()
            .filter(|(k, _)| k.starts_with(&format!("{name}{{")) && k.contains(label))
            .map(|(_, v)| v)
            .sum()
    }

    /// The metric families it exports (`# TYPE` lines).
    fn families(&self) -> Vec<(String, String)> {
        self.text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| {
                let (n, t) = l.split_once(' ')?;
                Some((n.to_string(), t.to_string()))
            })
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_a_kafka_pipeline_did_and_ready_names_a_failed_stream() {
    let brokers = kafka_brokers();
    let topic = format!("metrics-{}", std::process::id());
    let out_topic = format!("metrics-out-{}", std::process::id());
    create_topic(&brokers, &topic, 2).await;
    create_topic(&brokers, &out_topic, 1).await;
    let producer = producer(&brokers);
    let mut bytes = 0usize;
    // 200 good records over 200 s of event time in two partitions, then 3 bad ones.
    let mut values: Vec<(i32, String)> = (0..200i64)
        .map(|i| {
            let ts = chrono::DateTime::from_timestamp(1_714_550_400 + i, 0).unwrap();
            (
                (i % 2) as i32,
                format!(r#"{{"user_id":{},"ts":"{}"}}"#, i % 5, ts.to_rfc3339()),
            )
        })
        .collect();
    values.push((0, "not json".into()));
    values.push((1, r#"{"user_id":"x","ts":"2024-05-01T08:00:00Z"}"#.into()));
    values.push((1, r#"{"ts":"2024-05-01T08:00:00Z"}"#.into()));
    for (partition, value) in &values {
        bytes += value.len();
        producer
            .send(
                FutureRecord::<(), str>::to(&topic)
                    .partition(*partition)
                    .payload(value),
                Duration::from_secs(10),
            )
            .await
            .expect("acknowledged");
    }

    let lake = tempfile::tempdir().unwrap();
    let server = start_server(lake.path()).await;
    let http = server.http_addr;
    let pg = pg_connect(server.pg_addr).await;
    pg.batch_execute(&format!(
        "CREATE SOURCE clicks (user_id BIGINT NOT NULL, ts TIMESTAMP NOT NULL,
                               WATERMARK FOR ts AS ts - INTERVAL '1 second')
             WITH (connector = 'kafka', brokers = '{brokers}', topic = '{topic}', idle_timeout = '1 s');
         CREATE STREAM per_minute WITH (checkpoint_interval = '300 ms', rollover_interval = '100 ms') AS
           SELECT user_id, window_start, window_end, count(*) AS n
           FROM TUMBLE(clicks, ts, INTERVAL '1 minute') GROUP BY user_id, window_start, window_end;
         CREATE SINK per_minute_out FROM per_minute
           WITH (connector = 'kafka', brokers = '{brokers}', topic = '{out_topic}')"
    ))
    .await
    .unwrap();

    // Every series exists at once, before the counts settle.
    let first = Scrape::of(http).await;
    for name in [
        "sluice_source_records_total",
        "sluice_stream_up",
        "sluice_sink_rows_delivered_total",
        "sluice_checkpoint_failures_total",
        "sluice_pg_sessions",
    ] {
        assert!(
            first.text.contains(&format!("\n{name}")),
            "{name} is exported from the start"
        );
    }

    // The source read everything: 200 rows, 3 to the errors zone, every byte counted.
    let scrape = wait_for("the source's counts", Duration::from_secs(60), || async {
        let s = Scrape::of(http).await;
        let done = s.get("sluice_source_records_total", &[("source", "clicks")]) == Some(200.0)
            && s.get("sluice_source_errors_total", &[("source", "clicks")]) == Some(3.0)
            && s.sum("sluice_source_lag_records", "source=\"clicks\"") == 0.0
            && s.get("sluice_source_lag_seconds", &[("source", "clicks")]) == Some(0.0);
        done.then_some(s)
    })
    .await;
    assert_eq!(
        scrape.get("sluice_source_bytes_total", &[("source", "clicks")]),
        Some(bytes as f64)
    );
    for p in ["0", "1"] {
        assert_eq!(
            scrape.get(
                "sluice_source_lag_records",
                &[("source", "clicks"), ("partition", p)]
            ),
            Some(0.0),
            "partition {p} caught up"
        );
    }
    assert_eq!(
        scrape.get("sluice_stream_rows_in_total", &[("stream", "per_minute")]),
        Some(200.0)
    );
    assert_eq!(
        scrape.get("sluice_stream_up", &[("stream", "per_minute")]),
        Some(1.0)
    );

    // Closed windows (200 s of events: minutes 0..2 closed for 5 users, minute 3 still
    // open) reach the stream's output, the lake and the sink; checkpoints complete.
    let scrape = wait_for(
        "windows out, checkpointed and delivered",
        Duration::from_secs(60),
        || async {
            let s = Scrape::of(http).await;
            let out = s.get("sluice_stream_rows_out_total", &[("stream", "per_minute")])?;
            let delivered = s.get(
                "sluice_sink_rows_delivered_total",
                &[("sink", "per_minute_out")],
            )?;
            let files = s.get(
                "sluice_lake_files_committed_total",
                &[("zone", "processed"), ("name", "per_minute")],
            )?;
            (out == 15.0
                && delivered == out
                && files >= 1.0
                && s.get("sluice_checkpoint_last_completed_timestamp_seconds", &[])? > 0.0)
                .then_some(s)
        },
    )
    .await;
    assert!(
        scrape
            .get("sluice_checkpoint_duration_seconds_count", &[])
            .unwrap()
            >= 1.0
    );
    assert!(
        scrape
            .get("sluice_event_to_lake_seconds_count", &[])
            .unwrap()
            >= 1.0
    );
    assert!(
        scrape
            .get("sluice_checkpoint_interval_seconds", &[])
            .unwrap()
            > 0.0
    );
    assert!(
        scrape
            .get(
                "sluice_lake_bytes_committed_total",
                &[("zone", "processed"), ("name", "per_minute")]
            )
            .unwrap()
            > 0.0
    );
    assert!(scrape.get("sluice_pg_sessions", &[]).unwrap() >= 1.0);
    assert!(scrape.get("process_resident_memory_bytes", &[]).unwrap() > 0.0);
    assert_eq!(
        scrape.get("sluice_sink_errors_total", &[("sink", "per_minute_out")]),
        Some(0.0)
    );

    // HTTP answers by source and code; a name that is no source counts under none.
    let client = reqwest::Client::new();
    for _ in 0..2 {
        let status = client
            .post(format!("http://{http}/v1/sources/nowhere/events"))
            .header("content-type", "application/json")
            .body("{}")
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 404);
    }
    let status = client
        .post(format!("http://{http}/v1/sources/clicks/events"))
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 409, "not an http source");
    let scrape = Scrape::of(http).await;
    assert_eq!(
        scrape.get(
            "sluice_http_requests_total",
            &[("source", ""), ("code", "404")]
        ),
        Some(2.0)
    );
    assert_eq!(
        scrape.get(
            "sluice_http_requests_total",
            &[("source", "clicks"), ("code", "409")]
        ),
        Some(1.0)
    );

    // Every metric the shipped dashboard queries is exported (histograms by their series).
    let exported: Vec<String> = scrape
        .families()
        .into_iter()
        .flat_map(|(name, kind)| {
            if kind == "histogram" {
                ["_bucket", "_sum", "_count"]
                    .iter()
                    .map(|s| format!("{name}{s}"))
                    .collect()
            } else {
                vec![name]
            }
        })
        .collect();
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/grafana/sluice.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let mut queried = vec![];
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            queried.extend(metric_names(target["expr"].as_str().unwrap()));
        }
    }
    assert!(queried.len() > 20, "{queried:?}");
    let missing: Vec<&String> = queried.iter().filter(|n| !exported.contains(n)).collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics the server does not export: {missing:?}"
    );

    // promtool reads the exposition without complaint.
    let mut check = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; scripts/test.sh installs it)");
    use std::io::Write as _;
    check
        .stdin
        .take()
        .unwrap()
        .write_all(scrape.text.as_bytes())
        .unwrap();
    let checked = check.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );

    // A stream whose source fails (its topic does not exist): `up` 0, `/ready` names it.
    let ready = reqwest::get(format!("http://{http}/ready")).await.unwrap();
    assert_eq!(ready.status(), 200);
    pg.batch_execute(&format!(
        "CREATE SOURCE missing (id BIGINT) WITH (connector = 'kafka', brokers = '{brokers}', topic = 'no-such-topic-{}');
         CREATE STREAM doomed AS SELECT * FROM missing",
        std::process::id()
    ))
    .await
    .unwrap();
    wait_for(
        "the failed stream's up = 0",
        Duration::from_secs(60),
        || async {
            let s = Scrape::of(http).await;
            (s.get("sluice_stream_up", &[("stream", "doomed")]) == Some(0.0)).then_some(())
        },
    )
    .await;
    let ready = reqwest::get(format!("http://{http}/ready")).await.unwrap();
    assert_eq!(ready.status(), 503);
    let body: serde_json::Value = ready.json().await.unwrap();
    let failed = body["failed"].as_array().unwrap();
    // Both are named, the stream's reason carrying its source's.
    for (kind, name) in [("source", "missing"), ("stream", "doomed")] {
        assert!(
            failed.iter().any(|f| f["kind"] == kind
                && f["name"] == name
                && f["reason"]
                    .as_str()
                    .unwrap()
                    .contains("the topic does not exist")),
            "{kind} {name}: {body}"
        );
    }
    server.shutdown().await;
}

/// The metric names in a PromQL expression: identifiers starting `sluice_` or `process_`.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = vec![];
    let mut rest = expr;
    while let Some(i) = rest.find(|c: char| c.is_ascii_alphabetic() || c == '_') {
        let word: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[i + word.len()..];
        if word.starts_with("sluice_") || word.starts_with("process_") {
            names.push(word);
        }
    }
    names
}
