//! The `sluice` binary as users run it: `--help`, configuration from flags and environment,
//! the startup lines, and a graceful stop on SIGTERM that flushes open files to the lake.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn sluice() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
}

fn psql(port: u16, sql: &str) -> String {
    let out = Command::new("psql")
        .args([
            "-X",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
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
        "psql `{sql}`: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Starts `sluice serve` on free ports and returns the child and its pg port.
fn serve(lake: &std::path::Path) -> (Child, u16) {
    let mut child = sluice()
        .args([
            "serve",
            "--pg-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .env("SLUICE_LAKE", lake) // configuration from the environment
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("sluice starts");
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let mut port = None;
    for line in stdout.lines() {
        let line = line.unwrap();
        if let Some(addr) = line.strip_prefix("sluice: pgwire listening on ") {
            port = Some(addr.rsplit(':').next().unwrap().parse().unwrap());
        }
        if line.starts_with("sluice: http listening on ") {
            break;
        }
    }
    (child, port.expect("the startup lines name the pg address"))
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
