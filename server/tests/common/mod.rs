//! Helpers of the tests that run the `sluice` binary.

#![allow(dead_code)] // each test file uses its own subset

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

/// The `sluice` binary under test.
pub fn sluice() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
}

/// Runs `sql` with `psql` against the server on `port`; its unaligned, tuples-only output.
pub fn psql(port: u16, sql: &str) -> String {
    let out = Command::new("psql")
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1"])
        .args(["-p", &port.to_string(), "-U", "sluice", "sluice", "-c", sql])
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

/// Starts `sluice serve` on free ports with `lake` (set by `configure`, which may add more
/// environment); returns the child and its pg port once it listens.
pub fn serve_with(configure: impl FnOnce(&mut Command)) -> (Child, u16) {
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
    let mut child = cmd.spawn().expect("sluice starts");
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
