//! What a careless or hostile client sends does not crash the server, poison the lake or
//! leave half-made objects behind: deep SQL, bad names, deep JSON, bodies of other content
//! types, payloads that are not UTF-8.

mod common;

use std::io::{Read, Write};
use std::process::Command;
use std::time::Duration;

use common::{Server, psql, serve_ports};

fn serve(lake: &std::path::Path) -> (Server, u16, u16) {
    serve_ports(|cmd| {
        cmd.env("SLUICE_LAKE", lake);
    })
}

/// psql to the server on `port`: unaligned, tuples only, stopping at the first error, which
/// it prints with its SQLSTATE.
fn psql_command(port: u16) -> Command {
    let mut cmd = Command::new("psql");
    cmd.args([
        "-X",
        "-A",
        "-t",
        "-v",
        "ON_ERROR_STOP=1",
        "-v",
        "VERBOSITY=verbose",
    ])
    .args([
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-U",
        "sluice",
        "sluice",
    ]);
    cmd
}

/// Runs `sql` with psql (given on its standard input: long statements exceed an
/// argument's length); `Ok(output)`, or `Err(the SQLSTATE and message)`.
fn sql(port: u16, sql: &str) -> Result<String, String> {
    let mut child = psql_command(port)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("psql runs");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(sql.as_bytes()).unwrap();
    stdin.write_all(b";\n").unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// POSTs `body` with `content_type` (none if `None`); (status, response body).
fn post(port: u16, path: &str, content_type: Option<&str>, body: &[u8]) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let ct = content_type
        .map(|t| format!("Content-Type: {t}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{ct}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut response = Vec::new();
    s.read_to_end(&mut response).unwrap();
    let response = String::from_utf8_lossy(&response).into_owned();
    let code = response.split(' ').nth(1).unwrap().parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

fn alive(port: u16) {
    assert_eq!(
        psql(port, "SELECT 41 + 1").trim(),
        "42",
        "the server still answers"
    );
}

#[test]
fn deep_sql_is_refused_or_run_never_a_crash() {
    let lake = tempfile::tempdir().unwrap();
    let (_server, port, _) = serve(lake.path());
    // Runs: deep, but within the limit (planned on the query runtime's deep stacks; a
    // default 2 MiB stack overflows at about 300 terms in a debug build).
    let chain = format!("SELECT 1{}", " + 1".repeat(1_000));
    assert_eq!(sql(port, &chain).unwrap().trim(), "1001");
    let concat = format!("SELECT length('a'{})", " || 'a'".repeat(1_500));
    assert_eq!(sql(port, &concat).unwrap().trim(), "1501");
    // Refused with SQLSTATE 54001, before any tree is built.
    for deep in [
        format!("SELECT 1{}", " + 1".repeat(6_000)),
        format!("SELECT 1 WHERE 1 = 0{}", " OR 1 = 0".repeat(4_000)),
        format!("SELECT 'a'{}", " || 'a'".repeat(20_000)),
    ] {
        let err = sql(port, &deep).unwrap_err();
        assert!(err.contains("54001"), "{err}");
        assert!(err.contains("statement too complex"), "{err}");
        alive(port);
    }
    // A stream with a deep expression plans, runs and restores.
    psql(
        port,
        "CREATE SOURCE r (v BIGINT, ts TIMESTAMP NOT NULL, WATERMARK FOR ts AS ts)
         WITH (connector = 'datagen', rows_per_second = '100000', max_rows = '500', fields.v.max = '3')",
    );
    psql(
        port,
        &format!(
            "CREATE STREAM deep AS SELECT v{} AS x FROM r",
            " + v".repeat(1_000)
        ),
    );
    alive(port);
}

#[test]
fn names_follow_one_rule_and_a_refused_create_leaves_nothing() {
    let lake = tempfile::tempdir().unwrap();
    let (mut server, port, _) = serve(lake.path());
    psql(
        port,
        "CREATE SOURCE r (v BIGINT) WITH (connector = 'datagen', max_rows = '10')",
    );
    let long = "a".repeat(64);
    for name in [
        "\"\"",
        "\"../../etc\"",
        "\"/etc\"",
        "\"a/b\"",
        "\"a%2Fb\"",
        "\".\"",
        "\"订单\"",
        "\"a\nb\"",
        "\"a\tb\"",
        long.as_str(),
    ] {
        let err = sql(port, &format!("CREATE STREAM {name} AS SELECT * FROM r")).unwrap_err();
        assert!(err.contains("42602"), "{name}: {err}");
        let err = sql(
            port,
            &format!("CREATE SOURCE {name} (v BIGINT) WITH (connector = 'http')"),
        )
        .unwrap_err();
        assert!(err.contains("42602"), "{name}: {err}");
    }
    // Nothing runs, nothing is in the catalog or the lake.
    assert_eq!(psql(port, "SHOW STREAMS").trim(), "");
    std::thread::sleep(Duration::from_millis(500));
    let processed = lake.path().join("processed");
    let written: Vec<_> = std::fs::read_dir(&processed)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(written.is_empty(), "{written:?}");
    // And the server restarts on that lake.
    server.kill().unwrap();
    server.wait().unwrap();
    let (_server, port, _) = serve(lake.path());
    alive(port);
    // A name of 63 bytes is fine.
    psql(
        port,
        &format!("CREATE STREAM {} AS SELECT * FROM r", "b".repeat(63)),
    );
}

#[test]
fn deep_json_bodies_other_content_types_and_invalid_utf8_are_turned_away_cleanly() {
    let lake = tempfile::tempdir().unwrap();
    let (mut server, port, http) = serve(lake.path());
    psql(
        port,
        "CREATE SOURCE h (d DOUBLE, t TEXT, ts TIMESTAMP) WITH (connector = 'http')",
    );
    let path = "/v1/sources/h/events";
    let ndjson = Some("application/x-ndjson");
    // Content types a web page can send without a CORS preflight are refused (and so is
    // none); nothing is stored.
    for ct in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        None,
    ] {
        let (code, body) = post(http, path, ct, b"{\"d\":1}\n");
        assert_eq!(code, 415, "{ct:?}: {body}");
    }
    assert!(!lake.path().join("raw").join("h").exists());
    assert_eq!(
        post(
            http,
            path,
            Some("application/json; charset=utf-8"),
            b"[{\"d\":1}]"
        )
        .0,
        200
    );
    // 2 000 000 levels of nesting in each column type: rejected, server up.
    for column in ["d", "t", "ts"] {
        for (open, close) in [("[", "]"), ("{\"a\":", "}")] {
            let levels = 2_000_000 / open.len();
            let body = format!(
                "{{\"{column}\":{}1{}}}\n{{\"d\":2}}\n",
                open.repeat(levels),
                close.repeat(levels)
            );
            let (code, answer) = post(http, path, ndjson, body.as_bytes());
            assert_eq!(code, 422, "{answer}");
            assert!(
                answer.contains("deeper than 64 levels"),
                "{}",
                &answer[..answer.len().min(400)]
            );
            assert!(answer.contains("\"accepted\":1"), "the good line is kept");
        }
    }
    alive(port);
    // A line that is not UTF-8 is kept byte for byte, as base64.
    let invalid = b"{\"t\":\"\xff\xfe\"}\n";
    assert_eq!(post(http, path, ndjson, invalid).0, 422);
    let kept = errors_zone(lake.path(), "h");
    let line = kept
        .iter()
        .find(|l| l["payload_encoding"] == "base64")
        .expect("the invalid line in the errors zone, as base64");
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(line["payload"].as_str().unwrap())
        .unwrap();
    assert_eq!(bytes, &invalid[..invalid.len() - 1]);
    // The bodies are in the raw zone: a restart replays them without crashing.
    server.kill().unwrap();
    server.wait().unwrap();
    let (_server, port, _) = serve(lake.path());
    alive(port);
}

/// The errors-zone lines of `source` in the lake at `root`.
fn errors_zone(root: &std::path::Path, source: &str) -> Vec<serde_json::Value> {
    let mut lines = vec![];
    let mut dirs = vec![root.join("errors").join(source)];
    while let Some(dir) = dirs.pop() {
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "jsonl") {
                for l in std::fs::read_to_string(&p).unwrap().lines() {
                    lines.push(serde_json::from_str(l).unwrap());
                }
            }
        }
    }
    lines
}

/// psql with several `-c` statements in one session; (success, stdout, stderr).
fn psql_session(port: u16, statements: &[&str]) -> (bool, String, String) {
    let mut cmd = psql_command(port);
    for s in statements {
        cmd.args(["-c", s]);
    }
    let out = cmd.output().expect("psql runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A query that runs for minutes unless stopped.
const ENDLESS: &str = "SELECT count(*) FROM range(1, 1000000000000)";

#[test]
fn statements_are_governed_per_session() {
    let lake = tempfile::tempdir().unwrap();
    let (_server, port, _) = serve(lake.path());
    // statement_timeout: the session's own, in Postgres's forms.
    let started = std::time::Instant::now();
    let (ok, _, err) = psql_session(port, &["SET statement_timeout = '300ms'", ENDLESS]);
    assert!(!ok);
    assert!(err.contains("57014"), "{err}");
    assert!(
        err.contains("canceling statement due to statement timeout"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(60));
    let (ok, _, err) = psql_session(port, &["SET statement_timeout TO 200", ENDLESS]);
    assert!(!ok && err.contains("57014"), "{err}");
    let (ok, _, err) = psql_session(port, &["SET statement_timeout = 'soon'"]);
    assert!(!ok && err.contains("22023"), "{err}");
    // A CancelRequest (psql sends one on SIGINT) stops the running query.
    let child = Command::new("psql")
        .args([
            "-X",
            "-A",
            "-t",
            "-v",
            "VERBOSITY=verbose",
            "-h",
            "127.0.0.1",
        ])
        .args([
            "-p",
            &port.to_string(),
            "-U",
            "sluice",
            "sluice",
            "-c",
            ENDLESS,
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("57014") && err.contains("canceling statement due to user request"),
        "{err}"
    );
    // SET datafusion.* changes its own session only.
    let (ok, out, err) = psql_session(
        port,
        &[
            "SET datafusion.execution.batch_size = 1234",
            "SHOW datafusion.execution.batch_size",
        ],
    );
    assert!(ok, "{err}");
    assert!(out.contains("1234"), "{out}");
    let (ok, out, err) = psql_session(port, &["SHOW datafusion.execution.batch_size"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("8192"),
        "another session keeps the default: {out}"
    );
    let (ok, _, err) = psql_session(port, &["SET datafusion.execution.no_such_option = 1"]);
    assert!(!ok && err.contains("22023"), "{err}");
    // Ad-hoc statements are read-only.
    let (ok, _, err) = psql_session(port, &["SELECT 1 AS x INTO t"]);
    assert!(!ok && err.contains("0A000"), "{err}");
    alive(port);
}

#[test]
fn a_lost_catalog_stops_the_start_and_an_unrestorable_stream_shows_why() {
    let lake = tempfile::tempdir().unwrap();
    let (mut server, port, _) = serve(lake.path());
    psql(
        port,
        "CREATE SOURCE r (v BIGINT, ts TIMESTAMP NOT NULL, WATERMARK FOR ts AS ts)
         WITH (connector = 'datagen', rows_per_second = '100000', max_rows = '1000')",
    );
    psql(port, "CREATE STREAM kept AS SELECT * FROM r");
    psql(port, "CREATE STREAM broken AS SELECT * FROM r");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while psql(port, "SELECT count(*) FROM kept").trim() != "1000" {
        assert!(std::time::Instant::now() < deadline, "kept lands its rows");
        std::thread::sleep(Duration::from_millis(100));
    }
    server.kill().unwrap();
    server.wait().unwrap();

    // A stream whose definition no longer plans: the server starts, and says why.
    let catalog = lake.path().join("_sluice").join("catalog.json");
    let text = std::fs::read_to_string(&catalog).unwrap();
    let damaged = text.replace(
        "CREATE STREAM broken AS SELECT * FROM r",
        "CREATE STREAM broken AS SELECT * FROM gone",
    );
    assert_ne!(
        text, damaged,
        "the catalog holds the statement as written: {text}"
    );
    std::fs::write(&catalog, damaged).unwrap();
    let (mut server, port, _) = serve(lake.path());
    let streams = psql(port, "SHOW STREAMS");
    let broken = streams
        .lines()
        .find(|l| l.starts_with("broken|"))
        .unwrap_or_else(|| panic!("broken is listed: {streams}"));
    assert!(
        broken.contains("not running: cannot restore:") && broken.contains("gone"),
        "{broken}"
    );
    assert!(streams.lines().any(|l| l.starts_with("kept|")), "{streams}");
    psql(port, "DROP STREAM broken");
    assert!(!psql(port, "SHOW STREAMS").contains("broken"));
    server.kill().unwrap();
    server.wait().unwrap();

    // Without its catalog, a lake that holds data is not started on.
    std::fs::remove_file(&catalog).unwrap();
    let out = common::sluice()
        .args([
            "serve",
            "--pg-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .env("SLUICE_LAKE", lake.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("holds data") && err.contains("_sluice/catalog.json"),
        "{err}"
    );
    assert!(!err.contains("bug"), "{err}");
}

#[test]
fn connections_are_limited_and_stalled_ones_are_closed() {
    use std::net::TcpStream;
    let lake = tempfile::tempdir().unwrap();
    let (_server, port, http) = serve_ports(|cmd| {
        cmd.env("SLUICE_LAKE", lake.path()).args([
            "--pg-max-connections",
            "3",
            "--pg-startup-timeout",
            "1s",
            "--http-max-connections",
            "3",
            "--http-idle-timeout",
            "1s",
        ]);
    });
    // Three connections that never finish their startup fill the pg listener.
    let idle: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let err = sql(port, "SELECT 1").unwrap_err();
    assert!(err.contains("too many clients"), "{err}");
    // After the startup timeout they are closed, and clients get in again.
    std::thread::sleep(Duration::from_millis(1500));
    for mut s in idle {
        let mut buf = [0u8; 1];
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(s.read(&mut buf).unwrap_or(0), 0, "closed by the server");
    }
    alive(port);

    // The same for HTTP: half-sent requests fill it, the next connection gets 503, and
    // the stalled ones are closed after the idle timeout.
    let half: Vec<TcpStream> = (0..3)
        .map(|_| {
            let mut s = TcpStream::connect(("127.0.0.1", http)).unwrap();
            s.write_all(b"POST /v1/sources/x/events HTTP/1.1\r\nHost: a\r\n")
                .unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut s = TcpStream::connect(("127.0.0.1", http)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    std::thread::sleep(Duration::from_millis(1500));
    drop(half);
    let health = {
        let mut s = TcpStream::connect(("127.0.0.1", http)).unwrap();
        s.write_all(b"GET /health HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let body: serde_json::Value =
        serde_json::from_str(health.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    let c = &body["connections"];
    assert!(c["pg"]["refused"].as_u64().unwrap() >= 1, "{body}");
    assert!(c["pg"]["timed_out"].as_u64().unwrap() >= 3, "{body}");
    assert!(c["http"]["refused"].as_u64().unwrap() >= 1, "{body}");
    assert!(c["http"]["timed_out"].as_u64().unwrap() >= 3, "{body}");
}

/// The files under `dir`, recursively.
fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![];
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                dirs.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

/// POSTs `body` with an `Idempotency-Key`; (status, response body).
fn post_keyed(port: u16, key: &str, body: &[u8]) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let head = format!(
        "POST /v1/sources/h/events HTTP/1.1\r\nHost: a\r\nContent-Type: application/x-ndjson\r\nIdempotency-Key: {key}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let code = response.split(' ').nth(1).unwrap().parse().unwrap();
    (
        code,
        response.split("\r\n\r\n").nth(1).unwrap_or("").to_string(),
    )
}

#[test]
fn a_retried_post_with_the_same_idempotency_key_is_stored_once() {
    let lake = tempfile::tempdir().unwrap();
    let (mut server, port, http) = serve(lake.path());
    psql(
        port,
        "CREATE SOURCE h (a BIGINT NOT NULL) WITH (connector = 'http')",
    );
    let raw = lake.path().join("raw").join("h");
    let body = b"{\"a\":1}\n{\"a\":\"x\"}\n{\"a\":3}\n";
    let first = post_keyed(http, "order-42", body);
    assert_eq!(first.0, 422, "{}", first.1);
    // The retry gets the first answer; the body is not stored again.
    assert_eq!(post_keyed(http, "order-42", body), first);
    assert_eq!(files_under(&raw).len(), 1);
    // Another key is another request.
    assert_eq!(post_keyed(http, "order-43", b"{\"a\":5}\n").0, 200);
    assert_eq!(files_under(&raw).len(), 2);
    // A malformed body's answer is kept too.
    let bad = post_keyed(http, "order-44", b"[{\"a\":1}");
    assert_eq!(bad.0, 400);
    assert_eq!(post_keyed(http, "order-44", b"[{\"a\":1}"), bad);
    assert_eq!(files_under(&raw).len(), 3);
    assert_eq!(post_keyed(http, &"k".repeat(300), body).0, 400);
    server.kill().unwrap();
    server.wait().unwrap();

    // A first attempt that stored the body and then died (its marker has no answer): after
    // a restart the retry is answered from the stored body, which is not stored again.
    let marker = lake.path().join("_sluice/idempotency/h").join(format!(
        "{}.json",
        "order-42"
            .bytes()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    ));
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&marker).unwrap()).unwrap();
    m["outcome"] = serde_json::Value::Null;
    std::fs::write(&marker, m.to_string()).unwrap();
    let (_server, _, http) = serve(lake.path());
    assert_eq!(post_keyed(http, "order-42", body), first);
    assert_eq!(files_under(&raw).len(), 3);
}

/// A Postgres startup message for user and database `sluice`.
fn startup_message() -> Vec<u8> {
    let mut body = 196_608u32.to_be_bytes().to_vec();
    for s in ["user", "sluice", "database", "sluice"] {
        body.extend_from_slice(s.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut msg = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    msg.extend(body);
    msg
}

/// One frontend message: `tag`, its length, `payload`.
fn message(tag: u8, payload: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&((payload.len() + 4) as u32).to_be_bytes());
    m.extend_from_slice(payload);
    m
}

#[test]
fn malformed_postgres_messages_end_only_their_connection() {
    let lake = tempfile::tempdir().unwrap();
    let (_server, port, _) = serve(lake.path());
    let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(std::process::id());
    println!("pgwire fuzz seed: {seed}");
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let tags = b"QPBEDSCHXFdcfp\0\xff";
    for round in 0..300 {
        let mut bytes = vec![];
        // A third without a valid startup: raw garbage, or a startup with a wild length.
        match round % 3 {
            0 => {
                let n = (next() % 64) as usize;
                bytes.extend((0..n).map(|_| next() as u8));
                bytes.extend_from_slice(&(next() as u32).to_be_bytes());
            }
            _ => {
                bytes.extend(startup_message());
                for _ in 0..(1 + next() % 4) {
                    let tag = tags[(next() % tags.len() as u64) as usize];
                    let n = (next() % 48) as usize;
                    let payload: Vec<u8> = (0..n).map(|_| next() as u8).collect();
                    let mut m = message(tag, &payload);
                    match next() % 4 {
                        // A length that lies: too long, too short, huge.
                        0 => m[1..5].copy_from_slice(&(next() as u32).to_be_bytes()),
                        1 => m.truncate(1 + (next() as usize % m.len())),
                        _ => {}
                    }
                    bytes.extend(m);
                }
            }
        }
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
            panic!("round {round}: the server no longer accepts connections");
        };
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let _ = s.write_all(&bytes);
        let mut sink = [0u8; 4096];
        let _ = s.read(&mut sink);
    }
    alive(port);
    // A statement far larger than any buffer, split across writes, is still answered.
    let big = format!("SELECT length('{}')", "x".repeat(4 << 20));
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(&startup_message()).unwrap();
    let mut q = big.into_bytes();
    q.push(0);
    s.write_all(&message(b'Q', &q)).unwrap();
    alive(port);
}

#[test]
fn a_query_over_the_memory_limit_fails_alone() {
    let lake = tempfile::tempdir().unwrap();
    let (_server, port, _) = serve_ports(|cmd| {
        cmd.env("SLUICE_LAKE", lake.path())
            .args(["--query-memory", "20MB"]);
    });
    // Operators that can spill do, and finish.
    assert_eq!(
        sql(port, "SELECT count(DISTINCT value) FROM range(0, 2000000)")
            .unwrap()
            .trim(),
        "2000000"
    );
    // One that cannot fails, with out_of_memory; the server and other queries go on.
    let err = sql(
        port,
        "SELECT array_agg(value) IS NULL FROM range(0, 5000000)",
    )
    .unwrap_err();
    assert!(err.contains("53200"), "{err}");
    alive(port);
}

/// GETs `path`; the response body.
fn get(port: u16, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let head = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    s.write_all(head.as_bytes()).unwrap();
    let mut response = Vec::new();
    s.read_to_end(&mut response).unwrap();
    let response = String::from_utf8_lossy(&response).into_owned();
    response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

/// The server's CPU time so far, from its own `/metrics`.
fn cpu_seconds(http: u16) -> f64 {
    get(http, "/metrics")
        .lines()
        .find_map(|l| l.strip_prefix("process_cpu_seconds_total "))
        .expect("process_cpu_seconds_total is exported")
        .trim()
        .parse()
        .unwrap()
}

/// A client that disappears in the middle of a query (killed: it sends no CancelRequest)
/// leaves no work running: the server's CPU time stops growing.
#[test]
fn a_client_that_disappears_mid_query_leaves_no_work_running() {
    let lake = tempfile::tempdir().unwrap();
    let (_server, port, http) = serve(lake.path());
    let mut child = psql_command(port)
        .args(["-c", ENDLESS])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let busy = cpu_seconds(http);
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        cpu_seconds(http) - busy > 0.5,
        "the query runs (the test's premise)"
    );
    child.kill().unwrap();
    let _ = child.wait();
    std::thread::sleep(Duration::from_secs(1));
    let after = cpu_seconds(http);
    std::thread::sleep(Duration::from_secs(2));
    let idle = cpu_seconds(http) - after;
    assert!(
        idle < 0.5,
        "{idle} s of CPU in 2 s after the client went away"
    );
    alive(port);
}
