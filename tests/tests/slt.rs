//! Runs the `.slt` files in `tests/slt/` against an in-process Sluice, one fresh lake per file.
//!
//! Besides SQL, the harness understands commands of its own (each inside `statement ok`):
//! - `WAIT FOR STREAM <name>` — waits (up to 60 s) until the stream is no longer running, i.e.
//!   its bounded input ended and every file was written. Use it after a stream over a bounded
//!   `datagen` source (`max_rows`) before querying what landed.
//! - `PUSH <source>` followed by lines of JSON — ingests those lines through the `http`
//!   source's real ingest path (raw zone, decoding, errors zone, watermark), as one request.
//!   Streaming scenarios are written this way: the event times of the pushed rows move the
//!   watermark (each push is followed by the watermark its rows imply).
//! - `WAIT FOR <n> ROWS IN <stream>` — waits (up to 60 s) until `SELECT count(*)` over the
//!   stream's files is `n` (give the stream a short `rollover_interval`).
//!
//! Errors read `SQLSTATE: message`, so a file can match both:
//! `statement error 42P07: source `x` already exists`.

use std::path::PathBuf;
use std::time::Duration;

use arrow::util::display::{ArrayFormatter, FormatOptions};
use async_trait::async_trait;
use sluice_server::{Outcome, Sluice};
use sqllogictest::{AsyncDB, ColumnType, DBOutput};

#[derive(Debug)]
struct SltError {
    state: String,
    message: String,
}

impl std::fmt::Display for SltError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.state, self.message)
    }
}

impl std::error::Error for SltError {}

struct SluiceDb {
    sluice: Sluice,
}

impl SluiceDb {
    async fn wait_for_stream(&self, name: &str) -> Result<(), SltError> {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let mut out = self.sluice.execute("SHOW STREAMS").await;
            if let Some(Ok(Outcome::Rows { batches, .. })) = out.pop() {
                let rows = format_rows(&batches);
                match rows.iter().find(|r| r[0] == name) {
                    None => {
                        return Err(SltError {
                            state: "42P01".into(),
                            message: format!("stream `{name}` does not exist"),
                        });
                    }
                    Some(r) if r[1] != "running" => return Ok(()),
                    Some(_) => {}
                }
            }
            if std::time::Instant::now() > deadline {
                return Err(SltError {
                    state: "57014".into(),
                    message: format!("stream `{name}` still running after 60 s"),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl SluiceDb {
    async fn push(&self, source: &str, body: &str) -> Result<(), SltError> {
        let fail = |state: &str, message: String| SltError {
            state: state.into(),
            message,
        };
        let ingest = self
            .sluice
            .push_source(source)
            .map_err(|e| fail("55000", e))?
            .ok_or_else(|| fail("42P01", format!("no http source `{source}`")))?;
        let report = ingest
            .ingest(bytes::Bytes::from(body.to_string()), "slt", None)
            .await
            .map_err(|e| fail("22000", e.to_string()))?;
        if !report.rejected.is_empty() {
            return Err(fail(
                "22000",
                format!("PUSH {source}: rejected lines {:?}", report.rejected),
            ));
        }
        Ok(())
    }

    async fn wait_for_rows(&self, stream: &str, n: usize) -> Result<(), SltError> {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let sql = format!("SELECT count(*) FROM {stream}");
        loop {
            let mut out = self.sluice.execute(&sql).await;
            let count = match out.pop() {
                Some(Ok(o)) => match o.collect().await {
                    Ok(Outcome::Rows { batches, .. }) => format_rows(&batches)[0][0].clone(),
                    other => format!("{:?}", other.map(|_| ())),
                },
                Some(Err(e)) => {
                    return Err(SltError {
                        state: e.sqlstate().to_string(),
                        message: e.to_string(),
                    });
                }
                None => String::new(),
            };
            if count == n.to_string() {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                return Err(SltError {
                    state: "57014".into(),
                    message: format!("`{stream}` has {count} rows after 60 s, not {n}"),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn format_rows(batches: &[arrow::record_batch::RecordBatch]) -> Vec<Vec<String>> {
    let options = FormatOptions::default().with_null("NULL");
    let mut rows = vec![];
    for b in batches {
        let formatters: Vec<_> = b
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &options).expect("formattable"))
            .collect();
        for i in 0..b.num_rows() {
            rows.push(
                formatters
                    .iter()
                    .map(|f| {
                        let v = f.value(i).to_string();
                        if v.is_empty() {
                            "(empty)".to_string()
                        } else {
                            v
                        }
                    })
                    .collect(),
            );
        }
    }
    rows
}

/// A result column's type letter in a `query` record: `T` text (and timestamps), `I` integer,
/// `R` floating point or decimal, `B` boolean, `?` anything else. Only regeneration uses
/// them (the comparison ignores types): they say what the query returns.
#[derive(Debug, Clone, PartialEq, Eq)]
enum SltType {
    Text,
    Integer,
    Real,
    Boolean,
    Any,
}

impl SltType {
    fn of(t: &arrow::datatypes::DataType) -> Self {
        use arrow::datatypes::DataType as D;
        match t {
            D::Boolean => Self::Boolean,
            D::Int8 | D::Int16 | D::Int32 | D::Int64 => Self::Integer,
            D::UInt8 | D::UInt16 | D::UInt32 | D::UInt64 => Self::Integer,
            D::Float16 | D::Float32 | D::Float64 => Self::Real,
            D::Decimal128(..) | D::Decimal256(..) => Self::Real,
            D::Utf8 | D::LargeUtf8 | D::Utf8View | D::Timestamp(..) | D::Date32 | D::Date64 => {
                Self::Text
            }
            _ => Self::Any,
        }
    }
}

impl ColumnType for SltType {
    fn from_char(value: char) -> Option<Self> {
        Some(match value {
            'T' => Self::Text,
            'I' => Self::Integer,
            'R' => Self::Real,
            'B' => Self::Boolean,
            _ => Self::Any,
        })
    }

    fn to_char(&self) -> char {
        match self {
            Self::Text => 'T',
            Self::Integer => 'I',
            Self::Real => 'R',
            Self::Boolean => 'B',
            Self::Any => '?',
        }
    }
}

#[async_trait]
impl AsyncDB for SluiceDb {
    type Error = SltError;
    type ColumnType = SltType;

    async fn run(&mut self, sql: &str) -> Result<DBOutput<SltType>, SltError> {
        let trimmed = sql.trim().trim_end_matches(';');
        if let Some(name) = trimmed.strip_prefix("WAIT FOR STREAM ") {
            self.wait_for_stream(name.trim()).await?;
            return Ok(DBOutput::StatementComplete(0));
        }
        if let Some(rest) = trimmed.strip_prefix("PUSH ") {
            let (name, body) = rest.split_once('\n').unwrap_or((rest, ""));
            self.push(name.trim(), body).await?;
            return Ok(DBOutput::StatementComplete(0));
        }
        if let Some(rest) = trimmed.strip_prefix("WAIT FOR ")
            && let Some((n, stream)) = rest.split_once(" ROWS IN ")
        {
            let n: usize = n.trim().parse().map_err(|_| SltError {
                state: "42601".into(),
                message: format!("WAIT FOR <n> ROWS IN <stream>: `{n}` is not a number"),
            })?;
            self.wait_for_rows(stream.trim(), n).await?;
            return Ok(DBOutput::StatementComplete(0));
        }
        // `AS <user>` on the first line: the rest runs in a session of that user.
        let session = sluice_server::session::Session::default();
        let mut sql = sql;
        if let Some(rest) = trimmed.strip_prefix("AS ")
            && let Some((user, statement)) = rest.split_once('\n')
        {
            let user = user.trim();
            session.log_in(user, self.sluice.access().is_superuser(user));
            sql = statement;
        }
        let mut results = self.sluice.execute_in(sql, &session).await;
        let last = match results.pop() {
            Some(Ok(o)) => Some(o.collect().await),
            other => other,
        };
        match last {
            None => Ok(DBOutput::StatementComplete(0)),
            Some(Ok(Outcome::Command(_))) => Ok(DBOutput::StatementComplete(0)),
            Some(Ok(Outcome::Stream { .. } | Outcome::CopyOut { .. })) => {
                unreachable!("collected above")
            }
            Some(Ok(Outcome::Rows { schema, batches })) => Ok(DBOutput::Rows {
                types: schema
                    .fields()
                    .iter()
                    .map(|f| SltType::of(f.data_type()))
                    .collect(),
                rows: format_rows(&batches),
            }),
            Some(Err(e)) => Err(SltError {
                state: e.sqlstate().to_string(),
                message: e.to_string(),
            }),
        }
    }

    async fn shutdown(&mut self) {
        self.sluice.shutdown().await;
    }

    fn engine_name(&self) -> &str {
        "sluice"
    }

    async fn sleep(dur: Duration) {
        tokio::time::sleep(dur).await;
    }

    fn error_sql_state(err: &SltError) -> Option<String> {
        Some(err.state.clone())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slt_files() {
    let dir = PathBuf::from(manifest_dir()).join("slt");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("tests/slt exists")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "slt"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no .slt files in {}", dir.display());
    let mut failures = vec![];
    // `SLUICE_SLT_REGENERATE=1`: write the results this build gives into the files instead of
    // comparing with them (review the diff; CI fails when regenerating changes a file).
    let regenerate = std::env::var_os("SLUICE_SLT_REGENERATE").is_some_and(|v| v == "1");
    for file in &files {
        let lake = tempfile::tempdir().expect("a temporary lake");
        let sluice = Sluice::open(lake.path().to_str().expect("UTF-8 path"))
            .await
            .expect("the lake opens");
        let mut runner = sqllogictest::Runner::new(move || {
            let sluice = sluice.clone();
            async move { Ok(SluiceDb { sluice }) }
        });
        if regenerate {
            // Rewrites the file with the results this build gives (`scripts/regenerate-slt.sh`).
            if let Err(e) = runner
                .update_test_file(
                    file,
                    " ",
                    sqllogictest::default_validator,
                    sqllogictest::default_normalizer,
                    sqllogictest::default_column_validator,
                )
                .await
            {
                failures.push(format!("{}: {e}", file.display()));
            }
        } else {
            match runner.run_file_async(file).await {
                Ok(()) => println!("ok   {}", file.display()),
                Err(e) => {
                    println!("FAIL {}\n{e}", file.display());
                    failures.push(format!("{}: {e}", file.display()));
                }
            }
        }
        runner.shutdown_async().await;
    }
    assert!(
        failures.is_empty(),
        "{} slt file(s) failed:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

/// The package's directory in the checkout being tested, read when the test runs: a
/// compile-time `env!` would name the checkout the cached test binary was built in.
fn manifest_dir() -> String {
    std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR is set by cargo test")
}
