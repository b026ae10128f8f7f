//! Differential tests of the stateful operators, the acceptance test of event-time
//! processing: each stream query is planned by Sluice's planner and run by its stream task
//! over random events — out of order, cut into batches at random, under a random watermark
//! delay, some of them late, in 1–3 subtasks — and what lands in the lake (the Parquet files
//! of the processed zone, read back) must equal what DataFusion returns for the same query in
//! batch over the events that were on time.
//!
//! Every event carries `arrival_wm`, the watermark in force when its batch arrived, so the
//! batch reference can say which events (or, for windows, which of an event's windows) were
//! on time by the operators' own rule: a window is late once the watermark (minus allowed
//! lateness) reached its end; a session or dedup row once the watermark passed its event time.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{ArrayRef, Int64Array, TimestampMicrosecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;
use proptest::prelude::*;
use sluice_connectors::lake::{Lake, ParquetLakeWriter};
use sluice_engine::checkpoint::{
    CheckpointHandle, CheckpointStore, Coordinator, OperatorState, StreamRegistration,
};
use sluice_engine::pipeline::{StreamTask, TaskWiring};
use sluice_engine::sink::FileRolling;
use sluice_engine::sink::run_sink;
use sluice_engine::{EventTime, FanOut, Message};
use sluice_sql::parser::SluiceStatement;
use sluice_sql::window::WindowTablePlanner;
use sluice_sql::{ObjectKind, Relation, parse_sql, plan_stream};
use sluice_tests::{files_with_ext, read_parquet};
use tokio_util::sync::CancellationToken;

/// 2024-01-01T00:00:00Z, µs.
const T0: i64 = 1_704_067_200_000_000;
/// `arrival_wm` before the first watermark.
const NO_WATERMARK: i64 = T0 - 86_400_000_000;

/// Event times, disorder and watermark delays are multiples of this (500 ms), so that
/// boundaries are hit exactly: rows at a window's end, gaps equal to the session gap, ties
/// in event time, windows ending exactly at the watermark.
const STEP: i64 = 500_000;

/// One generated event: key, value, dedup id, event time (steps after T0), and how far
/// (steps) behind its event time it may arrive.
type Generated = (i64, Option<i64>, i64, i64, i64);

fn schema() -> SchemaRef {
    let ts = || DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    Arc::new(Schema::new(vec![
        Field::new("k", DataType::Int64, false),
        Field::new("v", DataType::Int64, true),
        Field::new("id", DataType::Int64, false),
        Field::new("seq", DataType::Int64, false),
        Field::new("arrival_wm", ts(), false),
        Field::new("ts", ts(), false),
    ]))
}

/// An input in arrival order, cut into batches, with the watermark after each batch.
struct Input {
    batches: Vec<RecordBatch>,
    watermarks: Vec<i64>,
}

/// Orders the events by arrival, cuts them at `cuts`, and computes watermarks as the
/// sources do: after each batch, the largest event time seen minus `delay`.
fn arrange(events: &[Generated], cuts: &[bool], delay: i64) -> Input {
    let mut rows: Vec<(i64, i64, Option<i64>, i64, i64)> = events
        .iter()
        .map(|&(k, v, id, step, disorder)| {
            let ts = T0 + step * STEP;
            (ts + disorder * STEP, k, v, id, ts)
        })
        .collect();
    // A stable sort: events due at the same moment arrive in generation order.
    rows.sort_by_key(|r| r.0);
    let mut input = Input {
        batches: vec![],
        watermarks: vec![],
    };
    let (mut wm, mut max_ts) = (NO_WATERMARK, i64::MIN);
    let mut start = 0;
    for end in 1..=rows.len() {
        if end < rows.len() && !cuts[end % cuts.len()] {
            continue;
        }
        let chunk = &rows[start..end];
        let ts = |f: &dyn Fn(usize) -> i64| -> ArrayRef {
            Arc::new(
                TimestampMicrosecondArray::from_iter_values((0..chunk.len()).map(f))
                    .with_timezone("UTC"),
            )
        };
        let batch = RecordBatch::try_new(
            schema(),
            vec![
                Arc::new(Int64Array::from_iter_values(chunk.iter().map(|r| r.1))),
                Arc::new(Int64Array::from_iter(chunk.iter().map(|r| r.2))),
                Arc::new(Int64Array::from_iter_values(chunk.iter().map(|r| r.3))),
                Arc::new(Int64Array::from_iter_values(start as i64..end as i64)),
                ts(&|_| wm),
                ts(&|i| chunk[i].4),
            ],
        )
        .unwrap();
        max_ts = chunk.iter().map(|r| r.4).fold(max_ts, i64::max);
        wm = wm.max(max_ts - delay);
        input.batches.push(batch);
        input.watermarks.push(wm);
        start = end;
    }
    input
}

/// `events`, and `versions`: the same events, read as the versions of their key `k`
/// (a relation with a primary key, for temporal joins; every branch reads the one source).
fn relations() -> BTreeMap<String, Relation> {
    let relation = |primary_key: Vec<String>| Relation {
        kind: ObjectKind::Source,
        schema: schema(),
        event_time_column: Some("ts".into()),
        primary_key,
    };
    BTreeMap::from([
        ("events".to_string(), relation(vec![])),
        ("versions".to_string(), relation(vec!["k".into()])),
    ])
}

/// Runs `sql` (a `CREATE STREAM`) over `input` with Sluice's planner and its stream task —
/// branches, merge, the stateful chain in `parallelism` subtasks routed by key — fed through
/// a real `FanOut`, a watermark after each batch, then `End`, into the lake writer. Returns
/// the rows of the Parquet files written.
async fn run_stream(sql: &str, input: &Input, parallelism: usize) -> Vec<String> {
    run_stream_counting_rejects(sql, input, parallelism).await.0
}

/// [`run_stream`], and how many rows the stream rejected (late ones, here).
async fn run_stream_counting_rejects(
    sql: &str,
    input: &Input,
    parallelism: usize,
) -> (Vec<String>, usize) {
    let stmt = match parse_sql(sql).unwrap().pop().unwrap() {
        SluiceStatement::CreateStream(c) => c,
        other => panic!("not a CREATE STREAM: {other:?}"),
    };
    let plan = plan_stream(&stmt, &relations()).await.unwrap();
    let parallelism = if plan.partition_keys.is_empty() {
        1
    } else {
        parallelism
    };
    let source = FanOut::new("events");
    let output = FanOut::new("s");
    let (bad_tx, mut bad_rx) = tokio::sync::mpsc::channel(16);
    let task = stream_task(
        &plan,
        &source,
        &output,
        parallelism,
        None,
        bad_tx,
        CancellationToken::new(),
        vec![],
    );
    let lake_dir = tempfile::tempdir().unwrap();
    let lake = Lake::open(lake_dir.path().to_str().unwrap()).unwrap();
    let writer = lake_writer(lake, &plan);
    let written = tokio::spawn(run_sink(output.subscribe(16), Box::new(writer)));
    let rejected = tokio::spawn(async move {
        let mut n = 0;
        while let Some(rows) = bad_rx.recv().await {
            n += rows.len();
        }
        n
    });
    let running = tokio::spawn(task.run());
    for (batch, wm) in input.batches.iter().zip(&input.watermarks) {
        source.send(Message::Data(batch.clone())).await;
        source.send(Message::Watermark(EventTime(*wm))).await;
    }
    source.send(Message::End).await;
    running.await.unwrap().unwrap();
    written.await.unwrap().unwrap();
    let batches: Vec<RecordBatch> = files_with_ext(&lake_dir.path().join("processed/s"), "parquet")
        .iter()
        .flat_map(|f| read_parquet(f))
        .collect();
    (rows(&batches), rejected.await.unwrap())
}

/// The stream task of `plan` in `parallelism` subtasks (resuming from `restored`, the
/// operator states of a checkpoint), every branch reading `source`, writing to `output`: as
/// the server builds it ([`sluice_engine::pipeline::PipelineSpec::build`]).
#[allow(clippy::too_many_arguments)]
fn stream_task(
    plan: &sluice_sql::StreamPlan,
    source: &FanOut,
    output: &FanOut,
    parallelism: usize,
    restored: Option<&[Vec<OperatorState>]>,
    bad_records: tokio::sync::mpsc::Sender<Vec<sluice_engine::BadRecord>>,
    cancel: CancellationToken,
    checkpoints: Vec<CheckpointHandle>,
) -> StreamTask {
    let mut spec = plan.pipeline("test");
    spec.parallelism = parallelism;
    spec.build(
        |_| Ok((source.subscribe(16), None)),
        TaskWiring {
            output: output.clone(),
            metrics: Arc::default(),
            bad_records,
            cancel,
            checkpoints,
            restored,
        },
    )
    .expect("the checkpoint restores")
}

/// The lake writer of `plan`'s stream `s`.
fn lake_writer(lake: Lake, plan: &sluice_sql::StreamPlan) -> ParquetLakeWriter {
    ParquetLakeWriter::new(
        lake,
        "s",
        &plan.output_schema,
        plan.event_time_column.as_deref(),
        FileRolling::default(),
        Arc::default(),
    )
}

/// DataFusion's batch answer to `sql` over every event of `input`.
async fn run_batch(sql: &str, input: &Input) -> Vec<String> {
    let ctx = SessionContext::new();
    ctx.register_relation_planner(Arc::new(WindowTablePlanner::default()))
        .unwrap();
    let table = MemTable::try_new(schema(), vec![input.batches.clone()]).unwrap();
    ctx.register_table("events", Arc::new(table)).unwrap();
    // Through Sluice's parser, which resolves the window functions' table arguments.
    let stmt = match parse_sql(sql).unwrap().pop().unwrap() {
        SluiceStatement::Other(stmt) => *stmt,
        other => panic!("not a query: {other:?}"),
    };
    let plan = ctx.state().statement_to_plan(stmt).await.unwrap();
    let batches = ctx
        .execute_logical_plan(plan)
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    rows(&batches)
}

/// Every row as text, sorted.
fn rows(batches: &[RecordBatch]) -> Vec<String> {
    let options = FormatOptions::default().with_null("NULL");
    let mut out = vec![];
    for b in batches {
        let fmt: Vec<_> = b
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &options).unwrap())
            .collect();
        for i in 0..b.num_rows() {
            let cells: Vec<String> = fmt.iter().map(|f| f.value(i).to_string()).collect();
            out.push(cells.join(" | "));
        }
    }
    out.sort();
    out
}

/// (stream query, batch reference over the on-time events).
const CASES: &[(&str, &str)] = &[
    (
        "CREATE STREAM s AS
         SELECT k, window_start, window_end, count(*) AS n, sum(v) AS total, min(v) AS lo,
                max(v) AS hi, count(DISTINCT v) AS distinct_v, round(avg(v), 6) AS mean
         FROM TUMBLE(events, ts, INTERVAL '10 seconds') GROUP BY k, window_start, window_end",
        "SELECT k, window_start, window_end, count(*), sum(v), min(v), max(v), count(DISTINCT v),
                round(avg(v), 6)
         FROM TUMBLE(events, ts, INTERVAL '10 seconds') WHERE window_end > arrival_wm
         GROUP BY k, window_start, window_end",
    ),
    (
        // Aggregates that depend on order (ORDER BY inside the aggregate) or on floating
        // point (rounded).
        "CREATE STREAM s AS
         SELECT k, window_start, window_end, first_value(v ORDER BY ts, seq) AS f,
                last_value(v ORDER BY ts, seq) AS l, array_agg(v ORDER BY ts, seq) AS vs,
                round(stddev(v), 6) AS sd, bool_or(v > 40) AS big
         FROM TUMBLE(events, ts, INTERVAL '10 seconds') GROUP BY k, window_start, window_end",
        "SELECT k, window_start, window_end, first_value(v ORDER BY ts, seq),
                last_value(v ORDER BY ts, seq), array_agg(v ORDER BY ts, seq), round(stddev(v), 6),
                bool_or(v > 40)
         FROM TUMBLE(events, ts, INTERVAL '10 seconds') WHERE window_end > arrival_wm
         GROUP BY k, window_start, window_end",
    ),
    (
        "CREATE STREAM s WITH (allowed_lateness = '3 seconds') AS
         SELECT k, window_start, window_end, count(*) AS n, sum(v) AS total
         FROM TUMBLE(events, ts, INTERVAL '10 seconds') GROUP BY k, window_start, window_end",
        "SELECT k, window_start, window_end, count(*), sum(v)
         FROM TUMBLE(events, ts, INTERVAL '10 seconds')
         WHERE window_end > arrival_wm - INTERVAL '3 seconds'
         GROUP BY k, window_start, window_end",
    ),
    (
        "CREATE STREAM s AS
         SELECT k, window_start, window_end, count(*) AS n, max(v) AS hi, sum(v) AS total
         FROM HOP(events, ts, INTERVAL '5 seconds', INTERVAL '15 seconds')
         GROUP BY k, window_start, window_end HAVING count(*) > 1",
        "SELECT k, window_start, window_end, count(*), max(v), sum(v)
         FROM HOP(events, ts, INTERVAL '5 seconds', INTERVAL '15 seconds')
         WHERE window_end > arrival_wm
         GROUP BY k, window_start, window_end HAVING count(*) > 1",
    ),
    (
        "CREATE STREAM s AS
         SELECT k, window_start, window_end, count(*) AS n, sum(v) AS total
         FROM TABLE(CUMULATE(TABLE events, DESCRIPTOR(ts), INTERVAL '5' SECOND, INTERVAL '20' SECOND))
         GROUP BY k, window_start, window_end",
        "SELECT k, window_start, window_end, count(*), sum(v)
         FROM CUMULATE(events, ts, INTERVAL '5 seconds', INTERVAL '20 seconds')
         WHERE window_end > arrival_wm
         GROUP BY k, window_start, window_end",
    ),
    (
        "CREATE STREAM s AS
         SELECT k, window_start, window_end, count(*) AS n, sum(v) AS total, max(v) AS hi,
                last_value(id ORDER BY ts, seq) AS last_id
         FROM SESSION(events, ts, INTERVAL '4 seconds') GROUP BY k, window_start, window_end",
        "WITH on_time AS (SELECT * FROM events WHERE ts >= arrival_wm),
         marked AS (
             SELECT *, CASE WHEN lag(ts) OVER (PARTITION BY k ORDER BY ts) + INTERVAL '4 seconds' > ts
                            THEN 0 ELSE 1 END AS starts_session
             FROM on_time),
         numbered AS (
             SELECT *, sum(starts_session) OVER (PARTITION BY k ORDER BY ts ROWS UNBOUNDED PRECEDING) AS session
             FROM marked)
         SELECT k, min(ts), max(ts) + INTERVAL '4 seconds', count(*), sum(v), max(v),
                last_value(id ORDER BY ts, seq)
         FROM numbered GROUP BY k, session",
    ),
    (
        "CREATE STREAM s WITH (dedup_ttl = '1 day') AS
         SELECT id, k, v, ts FROM (
             SELECT *, ROW_NUMBER() OVER (PARTITION BY id ORDER BY ts) AS rn FROM events)
         WHERE rn = 1",
        "SELECT id, k, v, ts FROM (
             SELECT *, ROW_NUMBER() OVER (PARTITION BY id ORDER BY ts, seq) AS rn
             FROM events WHERE ts >= arrival_wm)
         WHERE rn = 1",
    ),
    (
        // First arrival: with a day of dedup_ttl nothing here is too late to dedup.
        "CREATE STREAM s WITH (dedup_ttl = '1 day') AS SELECT DISTINCT ON (id) id, k, v, ts FROM events",
        "SELECT DISTINCT ON (id) id, k, v, ts FROM events ORDER BY id, seq",
    ),
    (
        // Interval join (a self-join: each event with those of its key up to 3 s later).
        "CREATE STREAM s AS
         SELECT a.k, a.seq AS a_seq, b.seq AS b_seq, a.v + b.v AS vv, a.ts, b.ts AS b_ts
         FROM events a JOIN events b
         ON a.k = b.k AND b.ts BETWEEN a.ts AND a.ts + INTERVAL '3 seconds'",
        "SELECT a.k, a.seq, b.seq, a.v + b.v, a.ts, b.ts
         FROM events a JOIN events b
         ON a.k = b.k AND b.ts BETWEEN a.ts AND a.ts + INTERVAL '3 seconds'
         WHERE a.ts >= a.arrival_wm AND b.ts >= b.arrival_wm",
    ),
    (
        // Left outer, bounds the other way round and strict, a condition besides them:
        // events without a match are kept (once the watermark passes their bound).
        "CREATE STREAM s AS
         SELECT a.k, a.seq AS a_seq, b.seq AS b_seq, a.ts
         FROM events a LEFT JOIN events b
         ON a.k = b.k AND a.ts > b.ts - INTERVAL '2 seconds' AND a.ts < b.ts AND b.v > 10",
        "SELECT a.k, a.seq, b.seq, a.ts
         FROM events a LEFT JOIN events b
         ON a.k = b.k AND a.ts > b.ts - INTERVAL '2 seconds' AND a.ts < b.ts AND b.v > 10
            AND b.ts >= b.arrival_wm
         WHERE a.ts >= a.arrival_wm",
    ),
    (
        // Window join: events of a key in the same 10 s window.
        "CREATE STREAM s AS
         SELECT a.k, a.window_start, a.window_end, a.seq AS a_seq, b.seq AS b_seq
         FROM TUMBLE(events, ts, INTERVAL '10 seconds') a
         JOIN TUMBLE(events, ts, INTERVAL '10 seconds') b
         ON a.k = b.k AND a.window_start = b.window_start AND a.window_end = b.window_end",
        "SELECT a.k, a.window_start, a.window_end, a.seq, b.seq
         FROM TUMBLE(events, ts, INTERVAL '10 seconds') a
         JOIN TUMBLE(events, ts, INTERVAL '10 seconds') b
         ON a.k = b.k AND a.window_start = b.window_start AND a.window_end = b.window_end
         WHERE a.window_end > a.arrival_wm AND b.window_end > b.arrival_wm",
    ),
    (
        // Window join of aggregated sides (Nexmark q8's shape), LEFT, one side filtered
        // after its aggregation and grouped by more than the join key (its state is divided
        // by the join key alone on restore): per key, 10 s window and `v > 20`, the count of
        // events (where more than one), with the sum of the key's events over 10.
        "CREATE STREAM s AS
         SELECT a.k, a.starttime, a.n, b.total
         FROM (SELECT k, window_start AS starttime, window_end AS endtime, count(*) AS n
               FROM TUMBLE(events, ts, INTERVAL '10 seconds')
               GROUP BY v > 20, k, window_start, window_end HAVING count(*) > 1) a
         LEFT JOIN (SELECT k, window_start AS starttime, window_end AS endtime, sum(v) AS total
               FROM TUMBLE(events, ts, INTERVAL '10 seconds') WHERE v > 10
               GROUP BY window_start, window_end, k) b
         ON a.k = b.k AND a.starttime = b.starttime AND a.endtime = b.endtime",
        "SELECT a.k, a.starttime, a.n, b.total
         FROM (SELECT k, window_start AS starttime, window_end AS endtime, count(*) AS n
               FROM TUMBLE(events, ts, INTERVAL '10 seconds') WHERE window_end > arrival_wm
               GROUP BY v > 20, k, window_start, window_end HAVING count(*) > 1) a
         LEFT JOIN (SELECT k, window_start AS starttime, window_end AS endtime, sum(v) AS total
               FROM TUMBLE(events, ts, INTERVAL '10 seconds')
               WHERE v > 10 AND window_end > arrival_wm
               GROUP BY window_start, window_end, k) b
         ON a.k = b.k AND a.starttime = b.starttime AND a.endtime = b.endtime",
    ),
    (
        // Temporal join: each event with the latest version of its key at its time (ties in
        // time: the last to arrive), against an as-of reference of window functions.
        "CREATE STREAM s AS
         SELECT e.seq AS e_seq, e.k, e.ts, v.seq AS v_seq, v.v AS vv
         FROM events e JOIN versions FOR SYSTEM_TIME AS OF e.ts AS v ON e.k = v.k",
        "WITH on_time AS (SELECT * FROM events WHERE ts >= arrival_wm),
         candidates AS (
             SELECT e.seq AS e_seq, e.k, e.ts, v.seq AS v_seq, v.v AS vv,
                    row_number() OVER (PARTITION BY e.seq ORDER BY v.ts DESC, v.seq DESC) AS rn
             FROM on_time e JOIN on_time v ON e.k = v.k AND v.ts <= e.ts)
         SELECT e_seq, k, ts, v_seq, vv FROM candidates WHERE rn = 1",
    ),
    (
        // … and kept without one (LEFT): the versions start at some events' own times, so
        // events of a key before its first version find none.
        "CREATE STREAM s AS
         SELECT e.seq AS e_seq, e.k, v.seq AS v_seq
         FROM events e LEFT JOIN versions AS v FOR SYSTEM_TIME AS OF e.ts
         ON e.k = v.k AND v.v > 25",
        "WITH on_time AS (SELECT * FROM events WHERE ts >= arrival_wm),
         candidates AS (
             SELECT e.seq AS e_seq, e.k, v.seq AS v_seq, v.v AS vv,
                    row_number() OVER (PARTITION BY e.seq ORDER BY v.ts DESC, v.seq DESC) AS rn
             FROM on_time e LEFT JOIN on_time v ON e.k = v.k AND v.ts <= e.ts)
         SELECT e_seq, k, CASE WHEN vv > 25 THEN v_seq END FROM candidates WHERE rn = 1",
    ),
];

fn events() -> impl Strategy<Value = Vec<Generated>> {
    prop::collection::vec(
        (
            0i64..4,
            prop::option::weighted(0.9, 0i64..50),
            0i64..40,
            0i64..180,
            prop_oneof![3 => Just(0i64), 2 => 0i64..24],
        ),
        1..160,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn streamed_results_equal_the_batch_answer_over_on_time_events(
        events in events(),
        cuts in prop::collection::vec(prop::bool::weighted(0.2), 1..32),
        delay in 0i64..16,
        parallelism in 1usize..4,
    ) {
        let input = arrange(&events, &cuts, delay * STEP);
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        for (stream, batch) in CASES {
            let (streamed, expected) = runtime.block_on(async {
                (run_stream(stream, &input, parallelism).await, run_batch(batch, &input).await)
            });
            prop_assert_eq!(streamed, expected, "{}", stream);
        }
    }
}

/// Plans `sql` (a `CREATE STREAM`).
async fn plan(sql: &str) -> sluice_sql::StreamPlan {
    let stmt = match parse_sql(sql).unwrap().pop().unwrap() {
        SluiceStatement::CreateStream(c) => c,
        other => panic!("not a CREATE STREAM: {other:?}"),
    };
    plan_stream(&stmt, &relations()).await.unwrap()
}

/// One run of a checkpointing stream over `input[from..]`, on the lake in `dir`: registers
/// with a coordinator opened on that lake (recovering what an earlier run left), restores
/// what it hands back, feeds the batches, and either takes a checkpoint after batch `cut`,
/// feeds `extra` more batches and stops as a crash would (`stop: Some((cut, extra))`), or
/// runs to the end and lets the final checkpoint publish the last files. Returns the batch
/// to resume from.
async fn run_checkpointed(
    sql: &str,
    input: &Input,
    parallelism: usize,
    dir: &std::path::Path,
    stop: Option<(usize, usize)>,
) -> usize {
    let plan = plan(sql).await;
    let parallelism = if plan.partition_keys.is_empty() {
        1
    } else {
        parallelism
    };
    let lake = Lake::open(dir.to_str().unwrap()).unwrap();
    let store: Arc<dyn CheckpointStore> = Arc::new(lake.clone());
    let coordinator = Coordinator::open(
        store,
        std::time::Duration::from_secs(3600),
        Arc::new(sluice_engine::checkpoint::NoFence),
    )
    .await
    .unwrap();
    let mut ck = coordinator
        .register(StreamRegistration {
            name: "s".into(),
            sql: sql.into(),
            readers: vec!["events".into()],
            parallelism,
            writer: true,
            interval: std::time::Duration::from_secs(3600),
            timeout: None,
        })
        .await
        .unwrap();
    let restored = ck.restored.take();
    let from = restored.as_ref().map_or(0, |r| {
        r.positions["events"]["next"].as_u64().unwrap() as usize
    });
    let mut reader = ck.readers.remove("events").unwrap();
    let subtasks: Vec<CheckpointHandle> = ck.subtasks;
    let source = FanOut::new("events");
    let output = FanOut::new("s");
    let cancel = CancellationToken::new();
    let (bad_tx, mut bad_rx) = tokio::sync::mpsc::channel(16);
    let task = stream_task(
        &plan,
        &source,
        &output,
        parallelism,
        restored.as_ref().map(|r| r.operators.as_slice()),
        bad_tx,
        cancel.clone(),
        subtasks,
    );
    let writer = lake_writer(lake, &plan).with_checkpoints(ck.writer, cancel.clone());
    let written = tokio::spawn(run_sink(output.subscribe(16), Box::new(writer)));
    tokio::spawn(async move { while bad_rx.recv().await.is_some() {} });
    let running = tokio::spawn(task.run());
    let feed = |range: std::ops::Range<usize>| {
        let source = source.clone();
        let batches: Vec<_> = input.batches[range.clone()].to_vec();
        let wms: Vec<_> = input.watermarks[range].to_vec();
        async move {
            for (batch, wm) in batches.into_iter().zip(wms) {
                source.send(Message::Data(batch)).await;
                source.send(Message::Watermark(EventTime(wm))).await;
            }
        }
    };
    let n = input.batches.len();
    match stop {
        Some((cut, extra)) => {
            let cut = cut.min(n);
            feed(from..cut).await;
            coordinator.trigger();
            let epoch = reader.requested().await;
            reader
                .barrier(&source, epoch, serde_json::json!({ "next": cut }))
                .await;
            tokio::time::timeout(
                std::time::Duration::from_secs(30),
                coordinator.wait_for(epoch),
            )
            .await
            .expect("the checkpoint completes");
            // Rows after the checkpoint reach the writer, which must not publish them.
            feed(cut..(cut + extra).min(n)).await;
            cancel.cancel();
            running.await.unwrap().unwrap();
            written.await.unwrap().unwrap();
            cut
        }
        None => {
            feed(from..n).await;
            reader.finish(serde_json::json!({ "next": n }));
            source.send(Message::End).await;
            running.await.unwrap().unwrap();
            written.await.unwrap().unwrap();
            assert!(
                coordinator
                    .final_checkpoint(std::time::Duration::from_secs(30))
                    .await,
                "the final checkpoint completes"
            );
            n
        }
    }
}

/// The rows of the processed zone under `dir`.
fn lake_rows(dir: &std::path::Path) -> Vec<String> {
    let batches: Vec<RecordBatch> = files_with_ext(&dir.join("processed/s"), "parquet")
        .iter()
        .flat_map(|f| read_parquet(f))
        .collect();
    rows(&batches)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, failure_persistence: None, ..ProptestConfig::default() })]

    /// The golden harness of checkpoints: each stateful scenario (windows, sessions, dedup), stopped
    /// after a checkpoint with more rows already written after it, and restored — at the
    /// same or another parallelism — produces exactly what it produces when run straight
    /// through: nothing lost, nothing twice.
    #[test]
    fn a_stream_restored_from_a_checkpoint_writes_exactly_what_it_writes_uninterrupted(
        events in events(),
        cuts in prop::collection::vec(prop::bool::weighted(0.2), 1..32),
        delay in 0i64..16,
        before in 1usize..4,
        after in 1usize..4,
        cut in 0.0f64..1.0,
        extra in 0usize..6,
    ) {
        let input = arrange(&events, &cuts, delay * STEP);
        let cut = (cut * input.batches.len() as f64) as usize;
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        for (stream, _) in CASES {
            let (straight, restored) = runtime.block_on(async {
                let straight = run_stream_counting_rejects(stream, &input, before).await;
                let dir = tempfile::tempdir().unwrap();
                run_checkpointed(stream, &input, before, dir.path(), Some((cut, extra))).await;
                run_checkpointed(stream, &input, after, dir.path(), None).await;
                let errors = files_with_ext(&dir.path().join("errors/s"), "jsonl")
                    .iter()
                    .map(|f| std::fs::read_to_string(f).unwrap().lines().count())
                    .sum::<usize>();
                (straight, (lake_rows(dir.path()), errors))
            });
            prop_assert_eq!(restored, straight, "{} (parallelism {} then {}, checkpoint after batch {})", stream, before, after, cut);
        }
    }
}
