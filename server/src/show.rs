//! The rows of `SHOW SOURCES`, `SHOW STREAMS` and `DESCRIBE`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use arrow::array::{ArrayRef, BooleanArray, Int64Array, StringArray, TimestampMicrosecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;

use sluice_engine::checkpoint::CheckpointHealth;

use crate::runtime::{RunningSink, RunningSource, RunningStream, get};

fn ts_field(name: &str) -> Field {
    Field::new(
        name,
        DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        true,
    )
}

/// Columns of `SHOW SOURCES`.
pub fn sources_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("name", DataType::Utf8, false),
        Field::new("connector", DataType::Utf8, false),
        Field::new("status", DataType::Utf8, false),
        Field::new("rows_in", DataType::Int64, false),
        Field::new("errors", DataType::Int64, false),
        ts_field("last_event_time"),
        ts_field("watermark"),
        Field::new("lag", DataType::Int64, true),
        Field::new("lag_by_partition", DataType::Utf8, true),
    ]))
}

/// Columns of `SHOW STREAMS`.
pub fn streams_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("name", DataType::Utf8, false),
        Field::new("status", DataType::Utf8, false),
        Field::new("inputs", DataType::Utf8, false),
        Field::new("rows_in", DataType::Int64, false),
        Field::new("rows_out", DataType::Int64, false),
        Field::new("errors", DataType::Int64, false),
        Field::new("late_events", DataType::Int64, false),
        Field::new("duplicates", DataType::Int64, false),
        Field::new("files", DataType::Int64, false),
        ts_field("last_event_time"),
        ts_field("watermark"),
        Field::new("checkpoints", DataType::Utf8, false),
        Field::new("state_rows", DataType::Int64, false),
        Field::new("state_rows_left", DataType::Int64, false),
        Field::new("state_rows_right", DataType::Int64, false),
        Field::new("glue", DataType::Utf8, true),
    ]))
}

/// Columns of `DESCRIBE`.
pub fn describe_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("column_name", DataType::Utf8, false),
        Field::new("data_type", DataType::Utf8, false),
        Field::new("is_nullable", DataType::Boolean, false),
        Field::new("event_time", DataType::Boolean, false),
    ]))
}

fn ts(values: Vec<Option<i64>>) -> ArrayRef {
    Arc::new(TimestampMicrosecondArray::from(values).with_timezone("UTC"))
}

fn i64s(values: Vec<u64>) -> ArrayRef {
    Arc::new(Int64Array::from_iter_values(
        values.into_iter().map(|v| v as i64),
    ))
}

fn strings(values: Vec<String>) -> ArrayRef {
    Arc::new(StringArray::from_iter_values(values))
}

/// The status of a catalog entry that could not be restored at startup.
fn unrestored_status(reason: &str) -> String {
    format!("not running: cannot restore: {reason}")
}

/// `SHOW SOURCES`; `unrestored`: (name, connector, reason) of sources of the catalog that
/// could not be restored.
pub fn sources<'a>(
    sources: impl Iterator<Item = &'a RunningSource>,
    unrestored: &[(String, String, String)],
) -> Result<RecordBatch, ArrowError> {
    let (mut name, mut connector, mut status, mut rows, mut errors, mut last, mut wm) =
        (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    let (mut lag, mut by_partition) = (vec![], vec![]);
    for (n, c, reason) in unrestored {
        name.push(n.clone());
        connector.push(c.clone());
        status.push(unrestored_status(reason));
        rows.push(0);
        errors.push(0);
        last.push(None);
        wm.push(None);
        lag.push(None);
        by_partition.push(None);
    }
    for s in sources {
        let m = s.metrics.snapshot();
        name.push(s.def.name.clone());
        connector.push(s.def.config.connector().to_string());
        status.push(get(&s.status).to_string());
        rows.push(m.rows_in);
        errors.push(m.bad_records);
        last.push(m.last_event_time.map(|t| t.micros()));
        wm.push(m.watermark.map(|t| t.micros()));
        if m.partition_lag.is_empty() {
            lag.push(None);
            by_partition.push(None);
        } else {
            lag.push(Some(m.partition_lag.iter().map(|(_, l)| *l).sum::<i64>()));
            let parts: Vec<String> = m
                .partition_lag
                .iter()
                .map(|(p, l)| format!("{p}:{l}"))
                .collect();
            by_partition.push(Some(parts.join(" ")));
        }
    }
    RecordBatch::try_new(
        sources_schema(),
        vec![
            strings(name),
            strings(connector),
            strings(status),
            i64s(rows),
            i64s(errors),
            ts(last),
            ts(wm),
            Arc::new(Int64Array::from(lag)),
            Arc::new(StringArray::from(by_partition)),
        ],
    )
}

/// The server's last checkpoint, as `SHOW STREAMS` reports it.
#[derive(Debug, Clone, Copy)]
pub struct LastCheckpoint {
    /// Its epoch (0: none yet).
    pub epoch: u64,
    /// How long ago it completed (with none, since the server started).
    pub age: Duration,
}

impl LastCheckpoint {
    /// The coordinator's last checkpoint.
    pub fn of(c: &sluice_engine::checkpoint::Coordinator) -> Self {
        Self {
            epoch: c.last_completed(),
            age: c.last_completed_at().elapsed(),
        }
    }
}

/// A stream's `checkpoints` column: its interval; a warning when the server's last
/// checkpoint is more than three intervals old (a participant slow to report holds
/// checkpoints back until `checkpoint_timeout` aborts the epoch); and how many epochs were
/// aborted for want of this stream's reports, with the last reason.
fn checkpoints_text(
    interval: Option<Duration>,
    last: LastCheckpoint,
    health: Option<&CheckpointHealth>,
) -> String {
    let Some(every) = interval else {
        return "off".to_string();
    };
    let mut text = format!("every {every:?}");
    if last.age > (every * 3).max(Duration::from_secs(3)) {
        let age = last.age.as_secs_f64();
        match last.epoch {
            0 => text.push_str(&format!("; behind: none completed in {age:.0}s")),
            e => text.push_str(&format!("; behind: last (#{e}) completed {age:.0}s ago")),
        }
    }
    if let Some(h) = health.filter(|h| h.aborted > 0) {
        text.push_str(&format!("; {} aborted", h.aborted));
        if let Some(reason) = &h.last_abort {
            text.push_str(&format!(", last {reason}"));
        }
    }
    text
}

/// A stream's inputs; one it is still catching up with says how far behind it is
/// (`orders (catching up: 120000 behind)`).
fn inputs_text(s: &RunningStream) -> String {
    s.plan
        .inputs
        .iter()
        .map(|input| {
            let behind: Option<i64> = s
                .backfills
                .iter()
                .filter(|(source, _)| source == input)
                .map(|(_, m)| m.snapshot().partition_lag)
                .find(|lag| !lag.is_empty())
                .map(|lag| lag.iter().map(|(_, n)| n).sum());
            match behind {
                Some(n) => format!("{input} (catching up: {n} behind)"),
                None => input.clone(),
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// `SHOW STREAMS`; `last_checkpoint` is the server's (one epoch for all streams).
pub fn streams<'a>(
    streams: impl Iterator<Item = &'a RunningStream>,
    unrestored: &[(String, String)],
    last_checkpoint: LastCheckpoint,
    health: impl Fn(&str) -> Option<CheckpointHealth>,
    glue: impl Fn(&str) -> Option<String>,
) -> Result<RecordBatch, ArrowError> {
    let mut glue_status: Vec<Option<String>> = vec![];
    let mut cols: (Vec<String>, Vec<String>, Vec<String>) = (vec![], vec![], vec![]);
    let (mut rin, mut rout, mut errors, mut files, mut last, mut wm) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let (mut late, mut duplicates, mut checkpoints) = (vec![], vec![], vec![]);
    // Total, left side, right side.
    let mut state_rows: [Vec<i64>; 3] = [vec![], vec![], vec![]];
    for (name, reason) in unrestored {
        cols.0.push(name.clone());
        cols.1.push(unrestored_status(reason));
        cols.2.push(String::new());
        for v in [
            &mut rin,
            &mut rout,
            &mut errors,
            &mut late,
            &mut duplicates,
            &mut files,
        ] {
            v.push(0);
        }
        last.push(None);
        wm.push(None);
        checkpoints.push("off".to_string());
        for v in &mut state_rows {
            v.push(0);
        }
        glue_status.push(None);
    }
    for s in streams {
        checkpoints.push(checkpoints_text(
            s.checkpoint_interval,
            last_checkpoint,
            health(&s.plan.name).as_ref(),
        ));
        let m = s.metrics.snapshot();
        cols.0.push(s.plan.name.clone());
        cols.1.push(get(&s.status).to_string());
        cols.2.push(inputs_text(s));
        rin.push(m.rows_in);
        rout.push(m.rows_out);
        errors.push(m.bad_records);
        late.push(m.late_events);
        duplicates.push(m.duplicates);
        let [left, right] = m.state_rows.map(|n| n.max(0));
        state_rows[0].push(left + right);
        state_rows[1].push(left);
        state_rows[2].push(right);
        glue_status.push(glue(&s.plan.name));
        files.push(s.files_written.load(Ordering::Relaxed));
        last.push(m.last_event_time.map(|t| t.micros()));
        wm.push(m.watermark.map(|t| t.micros()));
    }
    RecordBatch::try_new(
        streams_schema(),
        vec![
            strings(cols.0),
            strings(cols.1),
            strings(cols.2),
            i64s(rin),
            i64s(rout),
            i64s(errors),
            i64s(late),
            i64s(duplicates),
            i64s(files),
            ts(last),
            ts(wm),
            strings(checkpoints),
        ]
        .into_iter()
        .chain(
            state_rows
                .into_iter()
                .map(|v| Arc::new(arrow::array::Int64Array::from(v)) as ArrayRef),
        )
        .chain([Arc::new(StringArray::from(glue_status)) as ArrayRef])
        .collect(),
    )
}

/// `DESCRIBE` of a relation with `schema` whose event-time column is `event_time`.
pub fn describe(schema: &Schema, event_time: Option<&str>) -> Result<RecordBatch, ArrowError> {
    let names = schema.fields().iter().map(|f| f.name().clone()).collect();
    let types = schema
        .fields()
        .iter()
        .map(|f| sql_type(f.data_type()))
        .collect();
    let nullable: BooleanArray = schema
        .fields()
        .iter()
        .map(|f| Some(f.is_nullable()))
        .collect();
    let et: BooleanArray = schema
        .fields()
        .iter()
        .map(|f| Some(Some(f.name().as_str()) == event_time))
        .collect();
    RecordBatch::try_new(
        describe_schema(),
        vec![
            strings(names),
            strings(types),
            Arc::new(nullable),
            Arc::new(et),
        ],
    )
}

/// The SQL name of an Arrow type, as users declare it.
pub fn sql_type(t: &DataType) -> String {
    match t {
        DataType::Boolean => "BOOLEAN".into(),
        DataType::Int8 | DataType::Int16 => "SMALLINT".into(),
        DataType::Int32 => "INTEGER".into(),
        DataType::Int64 => "BIGINT".into(),
        DataType::UInt8 | DataType::UInt16 | DataType::UInt32 | DataType::UInt64 => {
            format!("{t} (unsigned)")
        }
        DataType::Float32 => "REAL".into(),
        DataType::Float64 => "DOUBLE".into(),
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => "TEXT".into(),
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView => "BYTEA".into(),
        DataType::Timestamp(_, Some(_)) => "TIMESTAMP".into(),
        DataType::Timestamp(_, None) => "TIMESTAMP (no time zone)".into(),
        DataType::Date32 | DataType::Date64 => "DATE".into(),
        DataType::Decimal128(p, s) | DataType::Decimal256(p, s) => format!("DECIMAL({p},{s})"),
        other => other.to_string(),
    }
}

/// Columns of `SHOW SINKS`.
pub fn sinks_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("name", DataType::Utf8, false),
        Field::new("connector", DataType::Utf8, false),
        Field::new("from", DataType::Utf8, false),
        Field::new("status", DataType::Utf8, false),
        Field::new("delivery", DataType::Utf8, false),
        Field::new("rows_delivered", DataType::Int64, false),
    ]))
}

/// `SHOW SINKS`; `unrestored`: (name, reason) of sinks of the catalog that could not be
/// restored.
pub fn sinks<'a>(
    sinks: impl Iterator<Item = &'a RunningSink>,
    unrestored: &[(String, String)],
) -> Result<RecordBatch, ArrowError> {
    let (mut name, mut connector, mut from, mut status) = (vec![], vec![], vec![], vec![]);
    let (mut delivery, mut delivered) = (vec![], vec![]);
    for (n, reason) in unrestored {
        name.push(n.clone());
        connector.push(String::new());
        from.push(String::new());
        status.push(unrestored_status(reason));
        delivery.push(String::new());
        delivered.push(0);
    }
    for s in sinks {
        name.push(s.create.name.clone());
        connector.push(s.config.connector().to_string());
        from.push(s.create.from.clone());
        status.push(get(&s.status).to_string());
        delivery.push(
            if s.exactly_once {
                "exactly_once"
            } else {
                "at_least_once"
            }
            .to_string(),
        );
        delivered.push(s.delivered.load(Ordering::Relaxed));
    }
    RecordBatch::try_new(
        sinks_schema(),
        vec![
            strings(name),
            strings(connector),
            strings(from),
            strings(status),
            strings(delivery),
            i64s(delivered),
        ],
    )
}

/// The columns of `SHOW STATUS`.
pub fn status_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("role", DataType::Utf8, false),
        Field::new("lake", DataType::Utf8, false),
        Field::new("writer_pg", DataType::Utf8, false),
        Field::new("writer_http", DataType::Utf8, false),
        Field::new("lease_generation", DataType::Int64, true),
    ]))
}

/// `SHOW STATUS`: `role` is `writer` or `standby`; the writer's addresses and the lease
/// generation as the lease says (empty and NULL for a lake without a lease).
pub fn status(
    role: &str,
    lake: &str,
    pg: &str,
    http: &str,
    generation: Option<i64>,
) -> crate::Result<crate::Outcome> {
    let schema = status_schema();
    let batch = RecordBatch::try_new(
        Arc::clone(&schema),
        vec![
            Arc::new(StringArray::from(vec![role])),
            Arc::new(StringArray::from(vec![lake])),
            Arc::new(StringArray::from(vec![pg])),
            Arc::new(StringArray::from(vec![http])),
            Arc::new(arrow::array::Int64Array::from(vec![generation])),
        ],
    )
    .map_err(|e| crate::ServerError::Internal(e.to_string()))?;
    Ok(crate::Outcome::Rows {
        schema,
        batches: vec![batch],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_warn_only_when_the_last_is_three_intervals_old() {
        let every = Some(Duration::from_secs(10));
        let last = |epoch, secs| LastCheckpoint {
            epoch,
            age: Duration::from_secs(secs),
        };
        assert_eq!(checkpoints_text(None, last(3, 100), None), "off");
        assert_eq!(checkpoints_text(every, last(3, 29), None), "every 10s");
        assert_eq!(
            checkpoints_text(every, last(3, 45), None),
            "every 10s; behind: last (#3) completed 45s ago"
        );
        assert_eq!(
            checkpoints_text(every, last(0, 45), None),
            "every 10s; behind: none completed in 45s"
        );
        let aborted = CheckpointHealth {
            aborted: 2,
            last_abort: Some("epoch 7: subtask 0 did not report within 60s".into()),
        };
        assert_eq!(
            checkpoints_text(every, last(6, 5), Some(&aborted)),
            "every 10s; 2 aborted, last epoch 7: subtask 0 did not report within 60s"
        );
        assert_eq!(
            checkpoints_text(every, last(6, 5), Some(&CheckpointHealth::default())),
            "every 10s"
        );
        // Short intervals get a few seconds of slack.
        let fast = Some(Duration::from_millis(300));
        assert_eq!(checkpoints_text(fast, last(9, 2), None), "every 300ms");
    }
}
