//! Recovery beyond one crash: a restart on a quiet topic emits what its checkpoint owes,
//! one lake has one writer (a second server is a standby and takes over), a paused writer
//! that lost its lease commits nothing, and `DROP STREAM` commits what the stream emitted.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Server, create_topic, kafka_brokers, produce_records, psql, run_psql, serve_ports};

/// 2024-05-01T08:00:00Z in µs.
const T0: i64 = 1_714_550_400_000_000;

/// Starts `sluice serve` on `lake` with a short writer lease; (server, pg port, http port).
fn serve(lake: &std::path::Path) -> (Server, u16, u16) {
    serve_ports(|cmd| {
        cmd.env("SLUICE_LAKE", lake).args(["--lease-ttl", "2s"]);
    })
}

/// Runs `sql` with psql; its error output when it fails.
fn psql_err(port: u16, sql: &str) -> String {
    let out = Command::new("psql")
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1"])
        .args(["-p", &port.to_string(), "-U", "sluice", "sluice", "-c", sql])
        .output()
        .expect("psql runs");
    assert!(!out.status.success(), "`{sql}` should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// One event: `(key, json)` with event time `T0 + i * 7 ms` ± 0.9 s, amount `i % 13`: out of
/// order by less than the watermark's 2 s delay, so no row is late however the reader batches.
fn event(i: i64) -> (String, String) {
    let jitter_ms = (i * 7919) % 1801 - 900;
    let ts = T0 + i * 7_000 + jitter_ms * 1_000;
    let t = chrono::DateTime::from_timestamp_micros(ts).unwrap();
    (
        (i % 50).to_string(),
        format!(
            r#"{{"id":{},"amount":{},"ts":"{}"}}"#,
            i % 9_000,
            i % 13,
            t.format("%Y-%m-%dT%H:%M:%S%.6fZ")
        ),
    )
}

const EVENTS: i64 = 40_000;

/// A record two hours after the events, under key `k`.
fn sentinel(k: i64) -> (String, String) {
    let t = chrono::DateTime::from_timestamp_micros(T0 + 7_200_000_000).unwrap();
    (
        k.to_string(),
        format!(
            r#"{{"id":{},"amount":0,"ts":"{}"}}"#,
            1_000_000 + k,
            t.format("%Y-%m-%dT%H:%M:%S%.6fZ")
        ),
    )
}

/// The batch answer: per 10-second window (start in s), (count, sum); per 10 s / 2 s hop
/// window, the count; and the number of distinct ids.
#[allow(clippy::type_complexity)]
fn reference() -> (BTreeMap<i64, (i64, i64)>, BTreeMap<i64, i64>, usize) {
    let (mut tumble, mut hop) = (BTreeMap::new(), BTreeMap::new());
    let mut ids = std::collections::BTreeSet::new();
    for i in 0..EVENTS {
        let jitter_ms = (i * 7919) % 1801 - 900;
        let ts = T0 + i * 7_000 + jitter_ms * 1_000;
        let w: &mut (i64, i64) = tumble.entry(ts.div_euclid(10_000_000) * 10).or_default();
        w.0 += 1;
        w.1 += i % 13;
        let slide = ts.div_euclid(2_000_000) * 2;
        for k in 0..5 {
            *hop.entry(slide - 2 * k).or_default() += 1;
        }
        ids.insert(i % 9_000);
    }
    (tumble, hop, ids.len())
}

fn source_and_streams(brokers: &str, topic: &str) -> Vec<String> {
    vec![
        format!(
            "CREATE SOURCE events (id BIGINT NOT NULL, amount BIGINT NOT NULL, ts TIMESTAMP NOT NULL,
                                   WATERMARK FOR ts AS ts - INTERVAL '2 seconds')
             WITH (connector = 'kafka', brokers = '{brokers}', topic = '{topic}', batch_size = '500')"
        ),
        "CREATE STREAM tumble WITH (checkpoint_interval = '400 ms') AS
         SELECT window_start, count(*) AS n, sum(amount) AS total
         FROM TUMBLE(events, ts, INTERVAL '10 seconds') GROUP BY window_start, window_end"
            .into(),
        "CREATE STREAM hop WITH (checkpoint_interval = '400 ms') AS
         SELECT window_start, count(*) AS n
         FROM HOP(events, ts, INTERVAL '2 seconds', INTERVAL '10 seconds') GROUP BY window_start, window_end"
            .into(),
        "CREATE STREAM once WITH (checkpoint_interval = '400 ms', dedup_ttl = '5 minutes') AS
         SELECT id, ts FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY id ORDER BY ts) AS rn FROM events)
         WHERE rn = 1"
            .into(),
    ]
}

/// What the three streams landed: (tumble, hop, rows of `once`, distinct ids of `once`).
#[allow(clippy::type_complexity)]
fn landed(port: u16) -> (BTreeMap<i64, (i64, i64)>, BTreeMap<i64, i64>, usize, usize) {
    let rows = |sql: &str| -> Vec<Vec<i64>> {
        psql(port, sql)
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| l.split('|').map(|c| c.parse().unwrap()).collect())
            .collect()
    };
    let tumble = rows("SELECT to_unixtime(window_start), n, total FROM tumble")
        .into_iter()
        .map(|r| (r[0], (r[1], r[2])))
        .collect();
    let hop = rows("SELECT to_unixtime(window_start), n FROM hop")
        .into_iter()
        .map(|r| (r[0], r[1]))
        .collect();
    let once = rows("SELECT count(*), count(DISTINCT id) FROM once");
    (tumble, hop, once[0][0] as usize, once[0][1] as usize)
}

/// psql's unaligned output of `sql` with its header line; `None` when it fails.
fn run_psql_header(port: u16, sql: &str) -> Option<String> {
    let out = Command::new("psql")
        .args(["-X", "-A", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1"])
        .args(["-P", "footer=off", "-p", &port.to_string()])
        .args(["-U", "sluice", "sluice", "-c", sql])
        .output()
        .expect("psql runs");
    out.status
        .success()
        .then(|| String::from_utf8(out.stdout).unwrap())
}

/// The rows of `SHOW <what>` as column → value maps (psql's unaligned output with header).
fn show(port: u16, what: &str) -> Vec<BTreeMap<String, String>> {
    let text = run_psql_header(port, &format!("SHOW {what}"))
        .unwrap_or_else(|| panic!("SHOW {what} fails"));
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or_default().split('|').collect();
    lines
        .map(|l| {
            header
                .iter()
                .zip(l.split('|'))
                .map(|(h, v)| (h.to_string(), v.to_string()))
                .collect()
        })
        .collect()
}

/// A value of `SHOW SOURCES` / `SHOW STREAMS` for `name`, by column name.
fn shown(port: u16, what: &str, name: &str, column: &str) -> String {
    try_shown(port, what, name, column)
        .unwrap_or_else(|| panic!("no {column} of {name} in SHOW {what}"))
}

/// The same, `None` while there is no such row (or no server).
fn try_shown(port: u16, what: &str, name: &str, column: &str) -> Option<String> {
    let text = run_psql_header(port, &format!("SHOW {what}"))?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or_default().split('|').collect();
    let name_at = header.iter().position(|h| *h == "name")?;
    let column_at = header.iter().position(|h| *h == column)?;
    lines
        .map(|l| l.split('|').collect::<Vec<_>>())
        .find(|r| r.get(name_at) == Some(&name))
        .and_then(|r| r.get(column_at).map(|v| v.to_string()))
}

/// The names `SHOW STREAMS` lists.
fn stream_names(port: u16) -> Vec<String> {
    show(port, "STREAMS")
        .into_iter()
        .filter_map(|r| r.get("name").cloned())
        .collect()
}

#[test]
fn a_restart_on_a_quiet_topic_emits_every_window_and_row_its_checkpoint_owes() {
    let brokers = kafka_brokers();
    let (tumble_ref, hop_ref, ids) = reference();
    // Rounds: the kill comes right after the source drained the topic, right after the
    // first window fired, and at random moments from the first statement on — while the
    // streams are being created, backfill and join the running reader (seeded; the seed
    // is printed).
    let mut seed = u64::from(std::process::id());
    println!("kill moments seed: {seed}");
    for round in 0..6 {
        let topic = format!("quiet-{}-{round}", std::process::id());
        create_topic(&brokers, &topic, 4);
        // The whole topic is there before the server starts; nothing comes after. Last,
        // sentinels two hours later on every partition (keys 0..49): the watermark passes
        // every window of the events, and never reaches the sentinels' own.
        produce_records(&brokers, &topic, (0..EVENTS).map(event));
        produce_records(&brokers, &topic, (0..50).map(sentinel));
        let lake = tempfile::tempdir().unwrap();
        let (mut child, port, _) = serve(lake.path());
        let statements = source_and_streams(&brokers, &topic);
        let start = Instant::now();
        // The killer watches from the first statement on, while the streams are created.
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let random = Duration::from_millis((seed >> 33) % 1_500);
        let pid = child.id();
        let killer = std::thread::spawn(move || {
            let moment = match round {
                0 => "the source drained",
                1 => "the first window fired",
                _ => "a random moment",
            };
            loop {
                let now = match round {
                    0 => try_shown(port, "SOURCES", "events", "rows_in")
                        .is_some_and(|n| n == (EVENTS + 50).to_string()),
                    1 => try_shown(port, "STREAMS", "tumble", "rows_out").is_some_and(|n| n != "0"),
                    _ => start.elapsed() >= random,
                };
                if now {
                    break;
                }
                assert!(start.elapsed() < Duration::from_secs(60), "{moment}");
                std::thread::sleep(Duration::from_millis(2));
            }
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            println!(
                "round {round}: killed after {:?}: {moment}",
                start.elapsed()
            );
        });
        for (k, sql) in statements.iter().enumerate() {
            if run_psql(port, sql).is_err() {
                break; // killed meanwhile
            }
            if k > 0 {
                // Later streams backfill and join the running reader.
                std::thread::sleep(Duration::from_millis(150));
            }
        }
        killer.join().unwrap();
        child.wait().unwrap();
        let (mut child, port, _) = serve(lake.path());
        // What the killed server had not created yet, this one does.
        let known = stream_names(port);
        let missing_source = show(port, "SOURCES").is_empty();
        for (k, sql) in statements.iter().enumerate() {
            let name = ["events", "tumble", "hop", "once"][k];
            if (k == 0 && missing_source) || (k > 0 && !known.iter().any(|n| n == name)) {
                psql(port, sql);
            }
        }
        let mut got = landed(port);
        let deadline = Instant::now() + Duration::from_secs(60);
        while (got.0 != tumble_ref || got.1 != hop_ref || got.3 < ids) && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(250));
            got = landed(port);
        }
        let watermark = shown(port, "STREAMS", "tumble", "watermark");
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(
            got.0.len(),
            tumble_ref.len(),
            "round {round}: tumble windows"
        );
        assert_eq!(got.0, tumble_ref, "round {round}: tumble");
        assert_eq!(got.1, hop_ref, "round {round}: hop");
        assert_eq!(got.2, got.3, "round {round}: no id twice");
        assert_eq!(got.3, ids, "round {round}: every id");
        assert!(
            !watermark.is_empty(),
            "round {round}: SHOW STREAMS shows the watermark"
        );
    }
}

/// The DATAGEN pipeline of the standby tests: a bounded source, a window per sensor.
const PIPELINE: &[&str] = &[
    "CREATE SOURCE readings (sensor BIGINT NOT NULL, value BIGINT, ts TIMESTAMP NOT NULL,
                             WATERMARK FOR ts AS ts - INTERVAL '2 seconds')
     WITH (connector = 'datagen', rows_per_second = '20000', max_rows = '120000', batch_size = '1000',
           seed = '5', start_time = '2024-05-01T00:00:00Z', time_step = '1 ms',
           fields.sensor.max = '20', fields.value.max = '1000')",
    "CREATE STREAM per_sensor WITH (checkpoint_interval = '300 ms') AS
     SELECT sensor, window_start, count(*) AS n, sum(value) AS total
     FROM TUMBLE(readings, ts, INTERVAL '10 seconds')
     GROUP BY sensor, window_start, window_end",
];

fn windows(port: u16) -> Vec<String> {
    psql(
        port,
        "SELECT sensor, to_unixtime(window_start), n, total FROM per_sensor ORDER BY 1, 2, 3, 4",
    )
    .lines()
    .map(str::to_string)
    .collect()
}

fn status(port: u16) -> String {
    show(port, "STATUS")[0]["role"].clone()
}

/// Waits until `per_sensor` on `port` finished; its windows.
fn finished_windows(port: u16) -> Vec<String> {
    let start = Instant::now();
    loop {
        let s = shown(port, "STREAMS", "per_sensor", "status");
        assert!(!s.starts_with("failed"), "per_sensor {s}");
        if s == "finished" {
            return windows(port);
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "per_sensor is {s}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn reference_windows() -> Vec<String> {
    let lake = tempfile::tempdir().unwrap();
    let (_child, port, _) = serve(lake.path());
    for sql in PIPELINE {
        psql(port, sql);
    }
    let w = finished_windows(port);
    assert!(w.len() > 100, "a meaningful reference: {} windows", w.len());
    w
}

fn http_status(port: u16, method: &str, path: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-ndjson\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let code = response.split(' ').nth(1).unwrap().parse().unwrap();
    (code, response)
}

#[test]
fn a_second_server_is_a_standby_and_takes_over_when_the_writer_dies() {
    let expected = reference_windows();
    let lake = tempfile::tempdir().unwrap();
    let (mut first, port1, _) = serve(lake.path());
    for sql in PIPELINE {
        psql(port1, sql);
    }
    psql(
        port1,
        "CREATE SOURCE pushed (x BIGINT) WITH (connector = 'http')",
    );
    std::thread::sleep(Duration::from_millis(800));
    let (_second, port2, http2) = serve(lake.path());
    assert_eq!(status(port1), "writer");
    assert_eq!(status(port2), "standby");
    let writer = show(port2, "STATUS")[0]["writer_pg"].clone();
    assert_eq!(
        writer,
        format!("127.0.0.1:{port1}"),
        "the standby names the writer"
    );
    // It runs no stream, refuses DDL and ingest naming the writer, answers queries.
    let err = psql_err(port2, "CREATE STREAM x AS SELECT * FROM readings");
    assert!(
        err.contains("standby") && err.contains(&port1.to_string()),
        "{err}"
    );
    assert!(psql_err(port2, "SHOW STREAMS").contains("standby"));
    let (code, body) = http_status(http2, "POST", "/v1/sources/pushed/events", "{\"x\":1}\n");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("standby"), "{body}");
    assert_eq!(http_status(http2, "GET", "/ready", "").0, 503);
    psql(port2, "SELECT count(*) FROM per_sensor");

    // The writer dies mid-run: the standby takes over within the lease TTL and finishes
    // the stream from the last checkpoint.
    std::thread::sleep(Duration::from_millis(1500));
    first.kill().unwrap();
    first.wait().unwrap();
    let killed = Instant::now();
    while status(port2) != "writer" {
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "the standby takes over"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("took over after {:?}", killed.elapsed());
    assert_eq!(http_status(http2, "GET", "/ready", "").0, 200);
    assert_eq!(
        finished_windows(port2),
        expected,
        "exactly the uninterrupted run's windows"
    );
}

fn signal(child: &Server, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig}");
}

#[test]
fn a_paused_writer_that_lost_its_lease_stops_and_commits_nothing() {
    let expected = reference_windows();
    let lake = tempfile::tempdir().unwrap();
    let (mut first, port1, _) = serve(lake.path());
    for sql in PIPELINE {
        psql(port1, sql);
    }
    let (second, port2, _) = serve(lake.path());
    assert_eq!(status(port2), "standby");
    std::thread::sleep(Duration::from_millis(1200));
    // A zombie: paused past its lease, while the standby takes over and finishes the work.
    signal(&first, "-STOP");
    let paused = Instant::now();
    while status(port2) != "writer" {
        assert!(
            paused.elapsed() < Duration::from_secs(10),
            "the standby takes over"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let got = finished_windows(port2);
    // The zombie wakes: it notices and stops, writing nothing more.
    let files = |dir: &std::path::Path| -> Vec<String> {
        let mut out = vec![];
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                if e.path().is_dir() {
                    stack.push(e.path());
                } else {
                    out.push(e.path().display().to_string());
                }
            }
        }
        out.sort();
        out
    };
    let processed = lake.path().join("processed");
    let before = files(&processed);
    signal(&first, "-CONT");
    let woke = Instant::now();
    let code = loop {
        if let Some(s) = first.try_wait().unwrap() {
            break s.code();
        }
        assert!(
            woke.elapsed() < Duration::from_secs(10),
            "the old writer stops"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(code, Some(3), "it exits saying it lost the lease");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        files(&processed),
        before,
        "nothing it did after waking reached the lake"
    );
    assert_eq!(got, expected, "exactly the uninterrupted run's windows");
    assert_eq!(windows(port2), expected);
    drop(second);
}

#[test]
fn drop_stream_commits_what_it_emitted() {
    let lake = tempfile::tempdir().unwrap();
    let (_child, port, http) = serve(lake.path());
    psql(
        port,
        "CREATE SOURCE pushes (id BIGINT NOT NULL, ts TIMESTAMP NOT NULL) WITH (connector = 'http')",
    );
    // Checkpoints far apart: nothing would be committed before the drop.
    psql(
        port,
        "CREATE STREAM kept WITH (checkpoint_interval = '1 hour', rollover_interval = '1 hour') AS
         SELECT id, ts FROM pushes WHERE id % 3 <> 0",
    );
    for b in 0..20 {
        let body: String = (0..500)
            .map(|i| {
                format!(
                    "{{\"id\":{},\"ts\":\"2024-05-01T00:00:00Z\"}}\n",
                    b * 500 + i
                )
            })
            .collect();
        assert_eq!(
            http_status(http, "POST", "/v1/sources/pushes/events", &body).0,
            200
        );
    }
    let start = Instant::now();
    let mut rows_out = String::new();
    // Every pushed row has gone through.
    while shown(port, "STREAMS", "kept", "rows_in") != "10000" {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the stream reads every row"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for _ in 0..3 {
        rows_out = shown(port, "STREAMS", "kept", "rows_out");
        std::thread::sleep(Duration::from_millis(100));
    }
    psql(port, "DROP STREAM kept");
    let rows: usize = {
        let mut n = 0;
        let mut stack = vec![lake.path().join("processed/kept")];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|x| x == "parquet") {
                    let f = std::fs::File::open(&p).unwrap();
                    let r = parquet::file::reader::SerializedFileReader::new(f).unwrap();
                    n += parquet::file::reader::FileReader::metadata(&r)
                        .file_metadata()
                        .num_rows() as usize;
                }
            }
        }
        n
    };
    assert_eq!(rows_out, "6666");
    assert_eq!(
        rows.to_string(),
        rows_out,
        "the lake holds exactly rows_out rows"
    );
    assert!(
        !lake.path().join("_sluice/staging/kept").exists(),
        "no staging folder stays behind"
    );
}
