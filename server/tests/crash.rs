//! Exactly-once across crashes: `sluice serve` is killed with SIGKILL at random moments
//! while a Kafka source → dedup → 10-second windows → lake pipeline runs, and restarted each
//! time on the same lake; at the end the processed zone holds exactly the reference answer.
//! Also: HTTP ingest, datagen pipelines, an interval join and a temporal join of a Kafka and
//! an HTTP source, and the compaction of closed hours (on a local lake and on S3).

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{Server, create_topic, kafka_brokers, produce_records, psql, serve_with};

/// 2024-05-01T08:00:00Z in µs (a multiple of 10 s).
const T0: i64 = 1_714_550_400_000_000;
const ORDERS: i64 = 24_000;

fn serve(lake: &std::path::Path) -> (Server, u16) {
    serve_with(|cmd| {
        cmd.env("SLUICE_LAKE", lake);
    })
}

/// Starts `sluice serve` on `lake` and runs `statements` there.
fn serve_running(lake: &std::path::Path, statements: &[&str]) -> (Server, u16) {
    let (child, port) = serve(lake);
    for sql in statements {
        psql(port, sql);
    }
    (child, port)
}

/// Order `i`: 10 ms after the previous one in event time, ± 2 s of disorder.
fn order(i: i64) -> (i64, i64) {
    let jitter_ms = (i * 7919) % 401 - 200;
    let ts = T0 + i * 10_000 + jitter_ms * 10_000;
    (ts, i % 97)
}

fn json(id: i64, amount: i64, ts: i64) -> (String, String) {
    let t = chrono::DateTime::from_timestamp_micros(ts).unwrap();
    (
        id.to_string(),
        format!(
            r#"{{"order_id":{id},"amount":{amount},"ts":"{}"}}"#,
            t.format("%Y-%m-%dT%H:%M:%S%.6fZ")
        ),
    )
}

/// The records in production order: every order, every fifth one sent again 50 orders
/// later (an identical duplicate), then sentinels far enough ahead to close every window.
fn records() -> Vec<(String, String)> {
    let mut out = vec![];
    for i in 0..ORDERS {
        let (ts, amount) = order(i);
        out.push(json(i, amount, ts));
        let d = i - 50;
        if d >= 0 && d % 5 == 0 {
            let (ts, amount) = order(d);
            out.push(json(d, amount, ts));
        }
        if i % BAD_EVERY == 0 {
            out.push((i.to_string(), format!("{{\"order_id\": {i}, broken")));
        }
    }
    // Sentinels under several keys, so that every partition's watermark passes the end.
    for k in 0..16 {
        out.push(json(10_000_000 + k, 0, T0 + ORDERS * 10_000 + 60_000_000));
    }
    out
}

/// Every this many orders a record that is not JSON follows (errors zone, not windows).
const BAD_EVERY: i64 = 2_000;

/// Lines in the files with extension `ext` under `dir`.
fn lines_under(dir: &std::path::Path, ext: &str) -> usize {
    let mut n = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == ext) {
                n += std::fs::read_to_string(&p).unwrap().lines().count();
            }
        }
    }
    n
}

/// The reference: per 10-second window (start, in seconds since the epoch), the number of
/// distinct orders and their total amount.
fn reference() -> BTreeMap<i64, (i64, i64)> {
    let mut windows: BTreeMap<i64, (i64, i64)> = BTreeMap::new();
    for i in 0..ORDERS {
        let (ts, amount) = order(i);
        let start = ts.div_euclid(10_000_000) * 10;
        let w = windows.entry(start).or_default();
        w.0 += 1;
        w.1 += amount;
    }
    windows
}

fn landed(port: u16) -> BTreeMap<i64, (i64, i64)> {
    psql(
        port,
        "SELECT to_unixtime(window_start), n, total FROM revenue ORDER BY window_start",
    )
    .lines()
    .filter(|l| !l.is_empty())
    .map(|l| {
        let v: Vec<i64> = l.split('|').map(|c| c.parse().unwrap()).collect();
        (v[0], (v[1], v[2]))
    })
    .collect()
}

/// Rows in the processed zone, duplicates included.
fn landed_rows(port: u16) -> i64 {
    psql(port, "SELECT count(*) FROM revenue")
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn kill_9_at_random_moments_loses_nothing_and_duplicates_nothing() {
    let brokers = kafka_brokers();
    let topic = format!("crash-{}", std::process::id());
    create_topic(&brokers, &topic, 2);
    let lake = tempfile::tempdir().unwrap();

    let (mut child, port) = serve(lake.path());
    psql(
        port,
        &format!(
            "CREATE SOURCE orders (order_id BIGINT NOT NULL, amount BIGINT NOT NULL, ts TIMESTAMP NOT NULL,
                                   WATERMARK FOR ts AS ts - INTERVAL '5 seconds')
             WITH (connector = 'kafka', brokers = '{brokers}', topic = '{topic}', batch_size = '200',
                   raw_zone = 'true')"
        ),
    );
    psql(
        port,
        "CREATE STREAM unique_orders WITH (checkpoint_interval = '300 ms', dedup_ttl = '1 minute') AS
         SELECT order_id, amount, ts FROM (
             SELECT *, ROW_NUMBER() OVER (PARTITION BY order_id ORDER BY ts) AS rn FROM orders)
         WHERE rn = 1",
    );
    psql(
        port,
        "CREATE STREAM revenue WITH (checkpoint_interval = '300 ms') AS
         SELECT window_start, window_end, count(*) AS n, sum(amount) AS total
         FROM TUMBLE(unique_orders, ts, INTERVAL '10 seconds')
         GROUP BY window_start, window_end",
    );
    // The windows also go to a topic, exactly once (a transaction per epoch).
    let out_topic = format!("crash-out-{}", std::process::id());
    create_topic(&brokers, &out_topic, 3);
    psql(
        port,
        &format!(
            "CREATE SINK revenue_out FROM revenue
             WITH (connector = 'kafka', brokers = '{brokers}', topic = '{out_topic}',
                   key = 'window_start', format = 'json')"
        ),
    );
    // The orders arrive over several seconds, while the server is killed and restarted.
    let producer = {
        let (brokers, topic) = (brokers.clone(), topic.clone());
        std::thread::spawn(move || {
            for chunk in records().chunks(1_000) {
                produce_records(&brokers, &topic, chunk.iter().cloned());
                std::thread::sleep(Duration::from_millis(250));
            }
        })
    };
    // A small LCG: the moments differ from run to run; the seed is printed to replay one.
    let mut seed = std::process::id() as u64;
    println!("kill moments seed: {seed}");
    let mut next = || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) % 1_500
    };
    for round in 0..5 {
        std::thread::sleep(Duration::from_millis(300 + next()));
        child.kill().unwrap(); // SIGKILL: no shutdown, no final checkpoint
        child.wait().unwrap();
        println!("killed (round {round})");
        let port;
        (child, port) = serve(lake.path());
        if round == 0 {
            // A stream created while the source runs reads the topic from the start with a
            // reader of its own, then joins the source's reader: killed in either phase.
            psql(
                port,
                "CREATE STREAM late_orders WITH (checkpoint_interval = '300 ms') AS
                 SELECT order_id FROM orders",
            );
        }
    }
    producer.join().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let (mut child, port) = serve(lake.path());

    let expected = reference();
    let start = Instant::now();
    let mut got = landed(port);
    while got.len() < expected.len() && start.elapsed() < Duration::from_secs(90) {
        std::thread::sleep(Duration::from_millis(250));
        got = landed(port);
    }
    let rows = landed_rows(port);
    // The sink's topic: every window once, as a `read_committed` consumer sees it.
    let mut delivered = on_topic(&brokers, &out_topic);
    while delivered.len() < expected.len() && start.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(250));
        delivered = on_topic(&brokers, &out_topic);
    }
    // The source's raw and errors zones: every record archived once, every bad one reported
    // once, however often the archiver was killed.
    let (produced, bad) = (
        records().len(),
        (ORDERS as usize).div_ceil(BAD_EVERY as usize),
    );
    let mut raw = lines_under(&lake.path().join("raw/orders"), "ndjson");
    let mut errors = lines_under(&lake.path().join("errors/orders"), "jsonl");
    while (raw < produced || errors < bad) && start.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(250));
        raw = lines_under(&lake.path().join("raw/orders"), "ndjson");
        errors = lines_under(&lake.path().join("errors/orders"), "jsonl");
    }
    let late_rows = || -> usize {
        psql(port, "SELECT count(*) FROM late_orders")
            .trim()
            .parse()
            .unwrap()
    };
    let mut late = late_rows();
    while late < produced - bad && start.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(250));
        late = late_rows();
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(
        late,
        produced - bad,
        "a stream created while the source ran: every good record exactly once"
    );
    assert_eq!(raw, produced, "raw zone: every record exactly once");
    assert_eq!(errors, bad, "errors zone: every bad record exactly once");
    assert_eq!(
        rows,
        expected.len() as i64,
        "every window exactly once (got {} distinct windows)",
        got.len()
    );
    let wrong: Vec<_> = expected
        .iter()
        .filter(|(w, v)| got.get(w) != Some(v))
        .map(|(w, v)| format!("window {w}: expected {v:?}, got {:?}", got.get(w)))
        .collect();
    assert!(
        wrong.is_empty(),
        "{} windows differ: {wrong:#?}",
        wrong.len()
    );
    let mut on_topic_once = BTreeMap::new();
    for (w, v) in &delivered {
        assert!(
            on_topic_once.insert(*w, *v).is_none(),
            "window {w} is on the topic more than once ({} records for {} windows)",
            delivered.len(),
            expected.len()
        );
    }
    assert_eq!(
        on_topic_once, expected,
        "the sink's topic holds every window once"
    );
}

/// The windows on the sink's topic, one entry per record: (start in seconds, (n, total)).
fn on_topic(brokers: &str, topic: &str) -> Vec<(i64, (i64, i64))> {
    common::read_topic(brokers, topic)
        .iter()
        .map(|v| {
            let row: serde_json::Value = serde_json::from_slice(v).unwrap();
            let start = row["window_start"].as_str().expect("window_start as text");
            let start = chrono::NaiveDateTime::parse_from_str(&start[..19], "%Y-%m-%dT%H:%M:%S")
                .unwrap_or_else(|e| panic!("window_start {start}: {e}"));
            (
                start.and_utc().timestamp(),
                (row["n"].as_i64().unwrap(), row["total"].as_i64().unwrap()),
            )
        })
        .collect()
}

/// Kills the server `rounds` times at moments drawn from `seed`, restarting it on `lake`
/// each time; returns the last server, still running.
fn kill_and_restart(
    lake: &std::path::Path,
    mut child: Server,
    rounds: usize,
    seed: u64,
) -> (Server, u16) {
    let mut seed = seed;
    println!("kill moments seed: {seed}");
    let mut next = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) % 1_500
    };
    let mut port = 0;
    for round in 0..rounds {
        std::thread::sleep(Duration::from_millis(300 + next()));
        child.kill().unwrap(); // SIGKILL: no shutdown, no final checkpoint
        child.wait().unwrap();
        println!("killed (round {round})");
        (child, port) = serve(lake);
    }
    (child, port)
}

/// Waits until `done` holds for the status of `stream` in `SHOW STREAMS`; its line.
fn wait_status(port: u16, stream: &str, done: impl Fn(&str) -> bool) -> String {
    let start = Instant::now();
    loop {
        let out = psql(port, "SHOW STREAMS");
        let line = out
            .lines()
            .find(|l| l.split('|').next() == Some(stream))
            .unwrap_or_else(|| panic!("no stream `{stream}` in {out}"));
        if done(line.split('|').nth(1).unwrap_or_default()) {
            return line.to_string();
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "stream `{stream}` is still at: {line}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until `SHOW STREAMS` says `stream` finished.
fn wait_finished(port: u16, stream: &str) {
    wait_status(port, stream, |status| {
        assert!(!status.starts_with("failed"), "stream `{stream}` {status}");
        status == "finished"
    });
}

const DATAGEN_PIPELINE: &[&str] = &[
    "CREATE SOURCE readings (sensor BIGINT NOT NULL, reading_id BIGINT NOT NULL, value BIGINT, ts TIMESTAMP NOT NULL,
                             WATERMARK FOR ts AS ts - INTERVAL '2 seconds')
     WITH (connector = 'datagen', rows_per_second = '25000', max_rows = '150000', batch_size = '1000',
           seed = '11', start_time = '2024-05-01T00:00:00Z', time_step = '1 ms',
           fields.sensor.max = '20', fields.reading_id.max = '100000', fields.value.max = '1000')",
    "CREATE STREAM unique_readings WITH (checkpoint_interval = '300 ms', dedup_ttl = '10 minutes') AS
     SELECT DISTINCT ON (reading_id) reading_id, sensor, value, ts FROM readings",
    "CREATE STREAM per_sensor WITH (checkpoint_interval = '300 ms') AS
     SELECT sensor, window_start, count(*) AS n, sum(value) AS total
     FROM TUMBLE(readings, ts, INTERVAL '10 seconds')
     GROUP BY sensor, window_start, window_end",
];

/// What both streams wrote: the windows row by row, and a digest of the unique readings.
fn per_sensor(port: u16) -> Vec<String> {
    let mut rows: Vec<String> = psql(
        port,
        "SELECT sensor, to_unixtime(window_start), n, total FROM per_sensor ORDER BY 1, 2, 3, 4",
    )
    .lines()
    .map(str::to_string)
    .collect();
    rows.push(psql(
        port,
        "SELECT count(*), count(DISTINCT reading_id), sum(value), sum(sensor * reading_id) FROM unique_readings",
    ));
    rows
}

#[test]
fn datagen_pipelines_killed_at_random_moments_write_what_an_uninterrupted_run_writes() {
    // The reference: the same pipeline, run straight through on a lake of its own.
    let reference_lake = tempfile::tempdir().unwrap();
    let (mut child, port) = serve_running(reference_lake.path(), DATAGEN_PIPELINE);
    wait_finished(port, "unique_readings");
    wait_finished(port, "per_sensor");
    let expected = per_sensor(port);
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        expected.len() > 100,
        "a meaningful reference: {} rows",
        expected.len()
    );

    let lake = tempfile::tempdir().unwrap();
    let (child, _) = serve_running(lake.path(), DATAGEN_PIPELINE);
    let (mut child, port) = kill_and_restart(lake.path(), child, 4, u64::from(std::process::id()));
    wait_finished(port, "unique_readings");
    wait_finished(port, "per_sensor");
    let got = per_sensor(port);
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(got.len(), expected.len(), "rows: every window once");
    let differ: Vec<String> = expected
        .iter()
        .zip(&got)
        .filter(|(e, g)| e != g)
        .take(10)
        .map(|(e, g)| format!("expected {e}, got {g}"))
        .collect();
    assert!(
        differ.is_empty(),
        "the windows differ from the uninterrupted run: {differ:#?}"
    );
}

/// Starts `sluice serve` on `lake`: the server, its pg and HTTP ports.
fn serve_http(lake: &std::path::Path) -> (Server, u16, u16) {
    common::serve_ports(|cmd| {
        cmd.env("SLUICE_LAKE", lake);
    })
}

/// Kills the server four times at moments drawn from `seed` (SIGKILL: no shutdown, no final
/// checkpoint), restarting it on `lake` each time and telling clients its new HTTP port;
/// returns the last server, still running, and its pg port.
fn kill_and_restart_http(
    lake: &std::path::Path,
    mut child: Server,
    http_port: &std::sync::atomic::AtomicU16,
    seed: u64,
) -> (Server, u16) {
    let mut seed = seed;
    println!("kill moments seed: {seed}");
    let mut port = 0;
    for round in 0..4 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        std::thread::sleep(Duration::from_millis(300 + (seed >> 33) % 1_500));
        child.kill().unwrap();
        child.wait().unwrap();
        println!("killed (round {round})");
        let (c, p, h) = serve_http(lake);
        (child, port) = (c, p);
        http_port.store(h, std::sync::atomic::Ordering::Relaxed);
    }
    (child, port)
}

/// A timestamp (µs) as the JSON of a record writes it.
fn ts_text(us: i64) -> String {
    chrono::DateTime::from_timestamp_micros(us)
        .unwrap()
        .format("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string()
}

/// POSTs `body` to the server's HTTP port; the response status, or `None` when the server
/// is not there (killed) or the connection broke.
fn post(port: u16, path: &str, body: &str) -> Option<u16> {
    post_once(port, path, None, body)
}

/// [`post`] with an `Idempotency-Key`, if given.
fn post_once(port: u16, path: &str, key: Option<&str>, body: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let key = key
        .map(|k| format!("Idempotency-Key: {k}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-ndjson\r\n{key}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(request.as_bytes()).ok()?;
    let mut response = String::new();
    s.read_to_string(&mut response).ok()?;
    response.split(' ').nth(1)?.parse().ok()
}

#[test]
fn http_ingest_killed_at_random_moments_keeps_every_acknowledged_event_exactly_once() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};

    let lake = tempfile::tempdir().unwrap();
    let (child, port, http) = serve_http(lake.path());
    psql(
        port,
        "CREATE SOURCE events (id BIGINT NOT NULL, ts TIMESTAMP NOT NULL,
                               WATERMARK FOR ts AS ts - INTERVAL '1 second')
         WITH (connector = 'http')",
    );
    psql(
        port,
        "CREATE STREAM landed WITH (checkpoint_interval = '300 ms') AS SELECT id, ts FROM events",
    );
    psql(
        port,
        "CREATE STREAM per_second WITH (checkpoint_interval = '300 ms') AS
         SELECT window_start, count(*) AS n FROM TUMBLE(events, ts, INTERVAL '1 second')
         GROUP BY window_start, window_end",
    );

    // A client posting 50 events a request, never retrying: what was acknowledged must land
    // once; what was not may land (stored before the kill) but only once.
    let http_port = Arc::new(AtomicU16::new(http));
    let stop = Arc::new(AtomicBool::new(false));
    let client = {
        let (http_port, stop) = (Arc::clone(&http_port), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut acknowledged = vec![];
            let mut batch = 0i64;
            while !stop.load(Ordering::Relaxed) {
                let ids: Vec<i64> = (batch * 50..batch * 50 + 50).collect();
                let body: String = ids
                    .iter()
                    .map(|id| {
                        let ts = chrono::DateTime::from_timestamp_micros(T0 + id * 1_000).unwrap();
                        format!(
                            "{{\"id\":{id},\"ts\":\"{}\"}}\n",
                            ts.format("%Y-%m-%dT%H:%M:%S%.6fZ")
                        )
                    })
                    .collect();
                let port = http_port.load(Ordering::Relaxed);
                if post(port, "/v1/sources/events/events", &body) == Some(200) {
                    acknowledged.extend(ids);
                }
                batch += 1;
                std::thread::sleep(Duration::from_millis(3));
            }
            (acknowledged, batch * 50)
        })
    };
    let (mut child, port) = kill_and_restart_http(
        lake.path(),
        child,
        &http_port,
        u64::from(std::process::id()),
    );
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let (acknowledged, sent) = client.join().unwrap();
    // A sentinel far ahead closes every window.
    let sentinel = chrono::DateTime::from_timestamp_micros(T0 + sent * 1_000 + 60_000_000).unwrap();
    assert_eq!(
        post(
            http_port.load(Ordering::Relaxed),
            "/v1/sources/events/events",
            &format!(
                "{{\"id\":-1,\"ts\":\"{}\"}}\n",
                sentinel.format("%Y-%m-%dT%H:%M:%SZ")
            )
        ),
        Some(200)
    );
    let landed_ids = |port: u16| -> Vec<i64> {
        psql(port, "SELECT id FROM landed WHERE id >= 0 ORDER BY id")
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| l.parse().unwrap())
            .collect()
    };
    // Until every acknowledged event landed (a count is not enough: events stored before a
    // kill but not acknowledged land too, so the count can be reached first).
    let start = Instant::now();
    let all_landed = |ids: &[i64]| {
        let landed: std::collections::BTreeSet<i64> = ids.iter().copied().collect();
        acknowledged.iter().all(|id| landed.contains(id))
    };
    let mut ids = landed_ids(port);
    while !all_landed(&ids) && start.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(200));
        ids = landed_ids(port);
    }
    // The windows: every event once, counted once.
    let counted: i64 = loop {
        let n: i64 = psql(port, "SELECT coalesce(sum(n), 0) FROM per_second")
            .trim()
            .parse()
            .unwrap();
        if n >= ids.len() as i64 || start.elapsed() > Duration::from_secs(60) {
            break n;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    child.kill().unwrap();
    child.wait().unwrap();
    println!(
        "{} events sent, {} acknowledged, {} landed",
        sent,
        acknowledged.len(),
        ids.len()
    );
    assert!(acknowledged.len() > 1_000, "the client got through");
    let mut distinct = ids.clone();
    distinct.dedup();
    assert_eq!(distinct.len(), ids.len(), "an event landed twice");
    let landed: std::collections::BTreeSet<i64> = ids.iter().copied().collect();
    let lost: Vec<&i64> = acknowledged
        .iter()
        .filter(|id| !landed.contains(id))
        .collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged events lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    assert!(
        ids.iter().all(|id| *id < sent),
        "only events that were sent"
    );
    assert_eq!(
        counted,
        ids.len() as i64,
        "the windows count every landed event once"
    );
}

/// A datagen → 10-second windows pipeline whose stream fails when it emits the first window
/// from 00:02:00 (its average overflows DECIMAL(38, 4): an error of the window, not of a row),
/// next to the same windows without the failure.
const FAILING_PIPELINE: &[&str] = &[
    "CREATE SOURCE readings (sensor BIGINT NOT NULL, reading_id BIGINT NOT NULL, value BIGINT, ts TIMESTAMP NOT NULL,
                             WATERMARK FOR ts AS ts - INTERVAL '2 seconds')
     WITH (connector = 'datagen', rows_per_second = '25000', max_rows = '150000', batch_size = '1000',
           seed = '5', start_time = '2024-05-01T00:00:00Z', time_step = '1 ms',
           fields.sensor.max = '20', fields.reading_id.max = '100000', fields.value.max = '1000')",
    "CREATE STREAM complete WITH (checkpoint_interval = '300 ms') AS
     SELECT sensor, window_start, count(*) AS n, sum(value) AS total
     FROM TUMBLE(readings, ts, INTERVAL '10 seconds')
     GROUP BY sensor, window_start, window_end",
    "CREATE STREAM failing WITH (checkpoint_interval = '1 s') AS
     SELECT sensor, window_start, count(*) AS n,
            avg(CASE WHEN ts < TIMESTAMP '2024-05-01 00:02:00' THEN CAST(0 AS DECIMAL(38, 0))
                     ELSE CAST('10000000000000000000000000000000000' AS DECIMAL(38, 0)) END) AS overflows,
            sum(value) AS total
     FROM TUMBLE(readings, ts, INTERVAL '10 seconds')
     GROUP BY sensor, window_start, window_end",
];

/// Waits until `SHOW STREAMS` says `stream` failed; its line.
fn wait_failed(port: u16, stream: &str) -> String {
    wait_status(port, stream, |status| status.starts_with("failed"))
}

/// The rows of a stream of [`FAILING_PIPELINE`], one line each.
fn windows_of(port: u16, stream: &str) -> Vec<String> {
    psql(
        port,
        &format!(
            "SELECT sensor, to_unixtime(window_start), n, total FROM {stream} ORDER BY 1, 2, 3, 4"
        ),
    )
    .lines()
    .map(str::to_string)
    .collect()
}

/// Every row of `got` is a complete window of `complete`, and none is there twice.
fn assert_complete_windows_once(got: &[String], complete: &[String]) {
    let mut seen = std::collections::BTreeSet::new();
    for row in got {
        let key: Vec<&str> = row.split('|').take(2).collect();
        assert!(seen.insert(key.join("|")), "window published twice: {row}");
        assert!(
            complete.contains(row),
            "published a window that is not complete: {row}"
        );
    }
}

#[test]
fn a_stream_that_fails_publishes_nothing_past_its_last_checkpoint() {
    let lake = tempfile::tempdir().unwrap();
    let (mut child, port) = serve_running(lake.path(), FAILING_PIPELINE);
    wait_finished(port, "complete");
    let line = wait_status(port, "complete", |_| true);
    assert!(
        line.contains("|every 300ms|"),
        "checkpoints keep up: {line}"
    );
    let line = wait_failed(port, "failing");
    assert!(line.contains("Overflow"), "why it failed: {line}");
    let complete = windows_of(port, "complete");
    assert!(complete.len() > 200, "{} windows", complete.len());
    let first = windows_of(port, "failing");
    assert!(
        !first.is_empty() && first.len() < complete.len(),
        "the windows before the failure are published, and only those: {} of {}",
        first.len(),
        complete.len()
    );
    assert_complete_windows_once(&first, &complete);

    // A restart resumes the stream from its last checkpoint; it fails at the same row, and
    // what it wrote again since that checkpoint is not published twice.
    child.kill().unwrap();
    child.wait().unwrap();
    let (mut child, port) = serve(lake.path());
    wait_failed(port, "failing");
    let second = windows_of(port, "failing");
    child.kill().unwrap();
    child.wait().unwrap();
    assert_complete_windows_once(&second, &complete);
    assert!(second.len() >= first.len());
}

/// An interval join of a Kafka source (orders) and an HTTP source (shipments), killed at
/// random moments: every order shipped within its bound is joined exactly once.
#[test]
fn an_interval_join_killed_at_random_moments_joins_every_pair_exactly_once() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU16, Ordering};

    const N: i64 = 4_000;
    let brokers = kafka_brokers();
    let topic = format!("join-crash-{}", std::process::id());
    create_topic(&brokers, &topic, 1);
    let lake = tempfile::tempdir().unwrap();
    let (child, port, http) = serve_http(lake.path());
    psql(
        port,
        &format!(
            "CREATE SOURCE orders (order_id BIGINT NOT NULL, ts TIMESTAMP NOT NULL,
                                   WATERMARK FOR ts AS ts - INTERVAL '30 seconds')
             WITH (connector = 'kafka', brokers = '{brokers}', topic = '{topic}', batch_size = '200');
             CREATE SOURCE shipments (order_id BIGINT NOT NULL, carrier TEXT NOT NULL, ts TIMESTAMP NOT NULL,
                                      WATERMARK FOR ts AS ts - INTERVAL '30 seconds')
             WITH (connector = 'http');
             CREATE STREAM shipped WITH (checkpoint_interval = '300 ms') AS
             SELECT o.order_id, s.carrier, o.ts FROM orders o JOIN shipments s
             ON o.order_id = s.order_id AND s.ts BETWEEN o.ts AND o.ts + INTERVAL '10' SECOND"
        ),
    );
    // Order i at 10 ms steps; its shipment 5 s later (even i: within the bound) or 20 s
    // later (odd i: outside it).
    let order_ts = |i: i64| T0 + i * 10_000;
    let ship_ts = move |i: i64| order_ts(i) + if i % 2 == 0 { 5_000_000 } else { 20_000_000 };
    let producer = {
        let (brokers, topic) = (brokers.clone(), topic.clone());
        std::thread::spawn(move || {
            for chunk in (0..N).collect::<Vec<_>>().chunks(200) {
                let records = chunk.iter().map(|&i| {
                    (
                        i.to_string(),
                        format!(r#"{{"order_id":{i},"ts":"{}"}}"#, ts_text(order_ts(i))),
                    )
                });
                produce_records(&brokers, &topic, records);
                std::thread::sleep(Duration::from_millis(300));
            }
        })
    };
    // Shipments over HTTP, 50 a request, each retried (same Idempotency-Key) until taken.
    let http_port = Arc::new(AtomicU16::new(http));
    let shipper = {
        let http_port = Arc::clone(&http_port);
        std::thread::spawn(move || {
            for batch in 0..N / 50 {
                let body: String = (batch * 50..batch * 50 + 50)
                    .map(|i| {
                        format!(
                            "{{\"order_id\":{i},\"carrier\":\"c{}\",\"ts\":\"{}\"}}\n",
                            i % 3,
                            ts_text(ship_ts(i))
                        )
                    })
                    .collect();
                let key = format!("shipments-{batch}");
                while post_once(
                    http_port.load(Ordering::Relaxed),
                    "/v1/sources/shipments/events",
                    Some(&key),
                    &body,
                ) != Some(200)
                {
                    std::thread::sleep(Duration::from_millis(50));
                }
                std::thread::sleep(Duration::from_millis(75));
            }
        })
    };
    // Killed while both sides arrive (about 6 s each).
    let (mut child, port) = kill_and_restart_http(
        lake.path(),
        child,
        &http_port,
        u64::from(std::process::id()) ^ 0x5eed,
    );
    producer.join().unwrap();
    shipper.join().unwrap();
    let joined = |port: u16| -> Vec<i64> {
        psql(port, "SELECT order_id FROM shipped ORDER BY order_id")
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| l.parse().unwrap())
            .collect()
    };
    let expected: Vec<i64> = (0..N).filter(|i| i % 2 == 0).collect();
    let start = Instant::now();
    let mut got = joined(port);
    while got.len() < expected.len() && start.elapsed() < Duration::from_secs(90) {
        std::thread::sleep(Duration::from_millis(250));
        got = joined(port);
    }
    // A moment more: anything joined twice would land now.
    std::thread::sleep(Duration::from_secs(1));
    let got = joined(port);
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(got.len(), expected.len(), "every pair, once");
    assert_eq!(got, expected);
}

/// A temporal join of a Kafka source (orders) with an HTTP source of versions (customers'
/// tiers), killed at random moments: every order joined once, with the version in force at
/// its time.
#[test]
fn a_temporal_join_killed_at_random_moments_enriches_every_order_once() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU16, Ordering};

    const N: i64 = 3_000;
    const CUSTOMERS: i64 = 20;
    let brokers = kafka_brokers();
    let topic = format!("temporal-crash-{}", std::process::id());
    create_topic(&brokers, &topic, 1);
    let lake = tempfile::tempdir().unwrap();
    let (child, port, http) = serve_http(lake.path());
    psql(
        port,
        &format!(
            "CREATE SOURCE orders (order_id BIGINT NOT NULL, customer BIGINT NOT NULL, ts TIMESTAMP NOT NULL,
                                   WATERMARK FOR ts AS ts - INTERVAL '5 seconds')
             WITH (connector = 'kafka', brokers = '{brokers}', topic = '{topic}', batch_size = '200');
             CREATE SOURCE customers (customer BIGINT NOT NULL, tier TEXT NOT NULL, ts TIMESTAMP NOT NULL,
                                      PRIMARY KEY (customer), WATERMARK FOR ts AS ts - INTERVAL '5 seconds')
             WITH (connector = 'http');
             CREATE STREAM enriched WITH (checkpoint_interval = '300 ms') AS
             SELECT o.order_id, c.tier, o.ts FROM orders o
             JOIN customers FOR SYSTEM_TIME AS OF o.ts AS c ON o.customer = c.customer"
        ),
    );
    // Order i every 10 ms; every customer gets a new tier each second (`t<second>`), so
    // order i's tier is `t<i / 100>`.
    let order_ts = |i: i64| T0 + i * 10_000;
    let seconds = N / 100 + 1;
    let shipper_port = Arc::new(AtomicU16::new(http));
    let versions = {
        let port = Arc::clone(&shipper_port);
        std::thread::spawn(move || {
            // The sentinel at the end moves the watermark past every order.
            for s in 0..=seconds + 60 {
                let s = if s > seconds { 3_600 } else { s };
                let body: String = (0..CUSTOMERS)
                    .map(|c| {
                        format!(
                            "{{\"customer\":{c},\"tier\":\"t{s}\",\"ts\":\"{}\"}}\n",
                            ts_text(T0 + s * 1_000_000)
                        )
                    })
                    .collect();
                let key = format!("versions-{s}");
                while post_once(
                    port.load(Ordering::Relaxed),
                    "/v1/sources/customers/events",
                    Some(&key),
                    &body,
                ) != Some(200)
                {
                    std::thread::sleep(Duration::from_millis(50));
                }
                if s == 3_600 {
                    break;
                }
                std::thread::sleep(Duration::from_millis(150));
            }
        })
    };
    let producer = {
        let (brokers, topic) = (brokers.clone(), topic.clone());
        std::thread::spawn(move || {
            for chunk in (0..N).collect::<Vec<_>>().chunks(100) {
                let records = chunk.iter().map(|&i| {
                    (
                        i.to_string(),
                        format!(
                            r#"{{"order_id":{i},"customer":{},"ts":"{}"}}"#,
                            i % CUSTOMERS,
                            ts_text(order_ts(i))
                        ),
                    )
                });
                produce_records(&brokers, &topic, records);
                std::thread::sleep(Duration::from_millis(150));
            }
            // Far ahead: the orders' watermark passes them all.
            produce_records(
                &brokers,
                &topic,
                [(
                    "-1".to_string(),
                    format!(
                        r#"{{"order_id":-1,"customer":0,"ts":"{}"}}"#,
                        ts_text(T0 + 3_600_000_000)
                    ),
                )],
            );
        })
    };
    let (mut child, port) = kill_and_restart_http(
        lake.path(),
        child,
        &shipper_port,
        u64::from(std::process::id()) ^ 0x7e3,
    );
    producer.join().unwrap();
    versions.join().unwrap();
    let joined = |port: u16| -> Vec<(i64, String)> {
        psql(
            port,
            "SELECT order_id, tier FROM enriched WHERE order_id >= 0 ORDER BY order_id",
        )
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (id, tier) = l.split_once('|').unwrap();
            (id.parse().unwrap(), tier.to_string())
        })
        .collect()
    };
    let expected: Vec<(i64, String)> = (0..N).map(|i| (i, format!("t{}", i / 100))).collect();
    let start = Instant::now();
    let mut got = joined(port);
    while got.len() < expected.len() && start.elapsed() < Duration::from_secs(90) {
        std::thread::sleep(Duration::from_millis(250));
        got = joined(port);
    }
    std::thread::sleep(Duration::from_secs(1));
    let got = joined(port);
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(got.len(), expected.len(), "every order, once");
    assert_eq!(got, expected);
}

/// One event-time hour a second; `compacted` compacts each hour as soon as the watermark
/// passes its end, `plain` keeps the files as written.
const COMPACTING: &[&str] = &[
    "CREATE SOURCE readings (sensor BIGINT NOT NULL, value BIGINT, ts TIMESTAMP NOT NULL,
                             WATERMARK FOR ts AS ts)
     WITH (connector = 'datagen', rows_per_second = '3600', batch_size = '100', seed = '5',
           start_time = '2024-05-01T00:00:00Z', time_step = '1 second', fields.sensor.max = '20')",
    "CREATE STREAM compacted WITH (checkpoint_interval = '300 ms', compaction_delay = '0 s',
                                   target_file_size = '32KB')
     AS SELECT sensor, value, ts FROM readings",
    "CREATE STREAM plain WITH (checkpoint_interval = '300 ms', compaction = 'off')
     AS SELECT sensor, value, ts FROM readings",
];

#[test]
fn kill_9_during_compactions_loses_and_duplicates_nothing() {
    let lake = tempfile::tempdir().unwrap();
    let root = lake.path().to_str().unwrap();
    compactions_killed(root, None, |cmd| {
        cmd.env("SLUICE_LAKE", root);
    });
}

#[test]
fn kill_9_during_compactions_on_s3_loses_and_duplicates_nothing() {
    let endpoint = common::service_env("SLUICE_TEST_S3");
    let bucket = format!("killcompact-{}", std::process::id());
    common::python_with_aws(
        "import boto3, sys; boto3.client('s3', endpoint_url=sys.argv[1]).create_bucket(Bucket=sys.argv[2])",
        &[&endpoint, &bucket],
        &endpoint,
    );
    let lake = format!("s3://{bucket}/prod");
    compactions_killed(&lake, Some(&endpoint), |cmd| {
        cmd.args(["--lake", &lake]);
        common::aws_env(cmd, &endpoint);
    });
}

/// Runs [`COMPACTING`] on `root` (on the S3 server `endpoint`, if given; `configure` points
/// the server there), kills the server five times at random moments, then checks the first
/// six hours: compacted, final, and holding exactly the rows of the uncompacted stream.
fn compactions_killed(
    root: &str,
    endpoint: Option<&str>,
    configure: impl Fn(&mut std::process::Command),
) {
    let (mut child, port) = serve_with(&configure);
    for sql in COMPACTING {
        psql(port, sql);
    }
    // Hours close and are compacted about once a second: the kills land before, during and
    // after compactions and their commits.
    let mut seed = u64::from(std::process::id());
    println!("kill moments seed: {seed}");
    for round in 0..5 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        std::thread::sleep(Duration::from_millis(300 + (seed >> 33) % 1_500));
        child.kill().unwrap(); // SIGKILL: no shutdown, no final checkpoint
        child.wait().unwrap();
        println!("killed (round {round})");
        (child, _) = serve_with(&configure);
    }
    let checksum = "hash(sensor, value, ts)";
    let hours: Vec<String> = (0..6).map(|h| format!("2024-05-01/{h:02}")).collect();
    let only: Vec<&str> = hours.iter().map(String::as_str).collect();
    let started = Instant::now();
    let compacted = loop {
        let p = common::lake_partitions(root, "compacted", checksum, endpoint, &only);
        // Final: each hour's marker names exactly its files.
        let is_final = |p: &serde_json::Value| {
            let mut named: Vec<&str> = p["marker"]["files"]
                .as_array()
                .map(|a| a.iter().filter_map(|f| f.as_str()).collect())
                .unwrap_or_default();
            named.sort_unstable();
            let files: Vec<&str> = p["files"]
                .as_array()
                .map(|a| a.iter().filter_map(|f| f[0].as_str()).collect())
                .unwrap_or_default();
            !named.is_empty() && named == files
        };
        if hours.iter().all(|h| p.get(h).is_some_and(is_final)) {
            break p;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "hours not compacted: {p:#?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let plain = common::lake_partitions(root, "plain", checksum, endpoint, &only);
    child.kill().unwrap();
    child.wait().unwrap();
    for hour in &hours {
        let (c, p) = (&compacted[hour], &plain[hour]);
        assert_eq!(c["rows"], 3600, "{hour}: {c:#}");
        assert_eq!(c["distinct_ts"], 3600, "{hour}: duplicates: {c:#}");
        assert_eq!(p["rows"], 3600, "{hour}: {p:#}");
        assert_eq!(
            c["checksum"], p["checksum"],
            "{hour}: other rows than written"
        );
        assert_eq!(c["ascending"], true, "{hour}");
        let marker = &c["marker"];
        assert_eq!(marker["rows"], 3600, "{hour}: {marker:#}");
        let mut named: Vec<&str> = marker["files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_str().unwrap())
            .collect();
        named.sort_unstable();
        let files: Vec<&str> = c["files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f[0].as_str().unwrap())
            .collect();
        assert_eq!(
            named, files,
            "{hour}: the marker names the partition's files"
        );
    }
}
