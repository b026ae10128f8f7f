//! Golden checkpoint files: the state every stateful operator writes, committed under
//! `tests/golden/<case>/`, so that a change of state layout — an operator's own, or a
//! DataFusion accumulator's `state()` after an upgrade — fails here instead of failing a
//! restore in production.
//!
//! For each case: a fresh pipeline takes the first half of a fixed input and is snapshotted;
//! the snapshot must equal the committed one (same operator, version, values and tables). The
//! committed snapshot is then restored into another fresh pipeline, both take the second
//! half and end, and they must emit the same rows.
//!
//! After a deliberate layout change: bump the operator's `STATE_VERSION` (restoring an old
//! layout must then either work or be refused with a clear error) and regenerate with
//! `SLUICE_GOLDEN_REGENERATE=1 cargo test -p sluice-tests --test golden_state`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use arrow::array::{ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, SchemaRef, TimeUnit};
use sluice_engine::checkpoint::{KeyFilter, OperatorState, read_ipc, write_ipc};
use sluice_engine::{Collector, EventTime, Message, OperatorChain};
use sluice_sql::parser::SluiceStatement;
use sluice_sql::{ObjectKind, Relation, parse_sql, plan_stream, source_def};

const SOURCE: &str = "CREATE SOURCE t (k BIGINT NOT NULL, s TEXT, v DOUBLE, ts TIMESTAMP NOT NULL,
    WATERMARK FOR ts AS ts - INTERVAL '1 second') WITH (connector = 'http')";

/// (case, the stream) — one per stateful operator, and the aggregates whose accumulator
/// state layouts DataFusion defines.
const CASES: &[(&str, &str)] = &[
    (
        "window_aggregate",
        "CREATE STREAM w AS SELECT k, window_start, window_end, count(*) AS n, sum(v) AS total,
            avg(v) AS mean, min(v) AS low, max(s) AS high, stddev(v) AS sd,
            approx_distinct(s) AS distinct_s, count(DISTINCT s) AS exact_distinct,
            first_value(s ORDER BY ts) AS first_s, array_agg(k) AS ks
         FROM TUMBLE(t, ts, INTERVAL '10 seconds') GROUP BY k, window_start, window_end",
    ),
    (
        // A boolean key among others (DataFusion's multi-column group table).
        "boolean_key_aggregate",
        "CREATE STREAM b AS SELECT k > 5 AS big, k % 3 AS r, window_start, window_end,
            count(*) AS n FROM TUMBLE(t, ts, INTERVAL '10 seconds')
         GROUP BY k > 5, k % 3, window_start, window_end",
    ),
    (
        "hop_aggregate",
        "CREATE STREAM h AS SELECT window_start, window_end, count(*) AS n, sum(k) AS keys
         FROM HOP(t, ts, INTERVAL '5 seconds', INTERVAL '20 seconds')
         GROUP BY window_start, window_end",
    ),
    (
        "session_aggregate",
        "CREATE STREAM s AS SELECT k, window_start, window_end, count(*) AS n, sum(v) AS total
         FROM SESSION(t, ts, INTERVAL '3 seconds') GROUP BY k, window_start, window_end",
    ),
    (
        "dedup_first",
        "CREATE STREAM d WITH (dedup_ttl = '1 minute') AS SELECT DISTINCT ON (k) k, s, ts FROM t",
    ),
    (
        "dedup_earliest",
        "CREATE STREAM e WITH (dedup_ttl = '1 minute') AS SELECT k, s, v, ts FROM (
            SELECT *, row_number() OVER (PARTITION BY k ORDER BY ts) AS rn FROM t) WHERE rn = 1",
    ),
    (
        "interval_join",
        "CREATE STREAM j AS SELECT a.k, a.v, b.v AS bv, a.ts FROM t a LEFT JOIN t b
         ON a.k = b.k AND b.ts > a.ts AND b.ts <= a.ts + INTERVAL '2 seconds'",
    ),
    (
        "temporal_join",
        "CREATE STREAM tj AS SELECT e.k, e.ts, w.s AS version_s FROM t e
         LEFT JOIN versions FOR SYSTEM_TIME AS OF e.ts AS w ON e.k = w.k",
    ),
    (
        "window_join_of_aggregates",
        "CREATE STREAM q8 AS SELECT a.k, a.starttime, a.n, b.total
         FROM (SELECT k, window_start AS starttime, window_end AS endtime, count(*) AS n
               FROM TUMBLE(t, ts, INTERVAL '10 seconds') GROUP BY k, window_start, window_end) a
         JOIN (SELECT k, window_start AS starttime, window_end AS endtime, sum(v) AS total
               FROM TUMBLE(t, ts, INTERVAL '10 seconds') GROUP BY k, window_start, window_end) b
         ON a.k = b.k AND a.starttime = b.starttime AND a.endtime = b.endtime",
    ),
];

/// Rows `from..to` of the fixed input: 12 keys at a time (new ones every 50 rows, so each
/// half has keys of its own and keys of the other), event time every 400 ms with a little
/// disorder, text and doubles with nulls.
fn input(schema: &SchemaRef, from: i64, to: i64) -> RecordBatch {
    let rows: Vec<i64> = (from..to).collect();
    let k: Int64Array = rows
        .iter()
        .map(|i| Some((i * 7) % 12 + (i / 50) * 100))
        .collect();
    let s: StringArray = rows
        .iter()
        .map(|i| (i % 5 != 0).then(|| format!("s{}", (i * 13) % 9)))
        .collect();
    let v: Float64Array = rows
        .iter()
        .map(|i| (i % 4 != 1).then_some((*i as f64) * 1.25 - 30.0))
        .collect();
    let ts_micros: Int64Array = rows
        .iter()
        .map(|i| Some(1_700_000_000_000_000 + i * 400_000 - (i % 3) * 150_000))
        .collect();
    let ts = arrow::compute::cast(
        &arrow::compute::cast(
            &ts_micros,
            &DataType::Timestamp(TimeUnit::Microsecond, None),
        )
        .unwrap(),
        schema.field(3).data_type(),
    )
    .unwrap();
    let columns: Vec<ArrayRef> = vec![Arc::new(k), Arc::new(s), Arc::new(v), ts];
    RecordBatch::try_new(Arc::clone(schema), columns).unwrap()
}

/// The watermark after rows `..to` (the source's: largest event time − 1 s).
fn watermark_after(to: i64) -> EventTime {
    EventTime(1_700_000_000_000_000 + (to - 1) * 400_000 - 1_000_000)
}

/// A stream's operators: a stream of one branch as one chain (that branch's operators, then
/// the stateful part); a stream of several (a join) as its branches' chains (stateless, each
/// fed every input batch) and the chain after their merge, whose state is the snapshot.
struct Pipeline {
    branches: Vec<OperatorChain>,
    chain: OperatorChain,
}

/// The stream `sql` over `t` (and `versions`: `t`'s rows read as versions of key `k`).
async fn pipeline(sql: &str, schema: &SchemaRef) -> Pipeline {
    let SluiceStatement::CreateStream(stream) = parse_sql(sql).unwrap().remove(0) else {
        panic!("not a CREATE STREAM")
    };
    let relation = |primary_key: Vec<String>| Relation {
        kind: ObjectKind::Source,
        schema: Arc::clone(schema),
        event_time_column: Some("ts".into()),
        primary_key,
    };
    let relations = BTreeMap::from([
        ("t".to_string(), relation(vec![])),
        ("versions".to_string(), relation(vec!["k".into()])),
    ]);
    let plan = plan_stream(&stream, &relations).await.unwrap();
    let chain = |ops: &mut dyn Iterator<Item = &sluice_sql::OpSpec>| {
        OperatorChain::new(ops.map(|o| o.instantiate("golden").unwrap()).collect())
    };
    if plan.branches.len() == 1 {
        return Pipeline {
            branches: vec![],
            chain: chain(&mut plan.branches[0].ops.iter().chain(&plan.post)),
        };
    }
    Pipeline {
        branches: plan
            .branches
            .iter()
            .map(|b| chain(&mut b.ops.iter()))
            .collect(),
        chain: chain(&mut plan.post.iter()),
    }
}

/// What `msg` is once through the branches (a batch goes through each).
fn through_branches(p: &mut Pipeline, msg: Message) -> Vec<Message> {
    if p.branches.is_empty() {
        return vec![msg];
    }
    let Message::Data(batch) = msg else {
        return vec![msg];
    };
    let mut merged = vec![];
    for b in &mut p.branches {
        let mut out = Collector::default();
        b.process(Message::Data(batch.clone()), &mut out).unwrap();
        merged.extend(out.take_messages());
    }
    merged
}

/// Runs `msgs` through `p`; returns the rows it emitted, as sorted text lines.
fn run(p: &mut Pipeline, msgs: Vec<Message>) -> Vec<String> {
    let mut rows = vec![];
    let msgs: Vec<Message> = msgs
        .into_iter()
        .flat_map(|m| through_branches(p, m))
        .collect();
    for m in msgs {
        let mut out = Collector::default();
        p.chain.process(m, &mut out).unwrap();
        for m in out.take_messages() {
            if let Message::Data(b) = m {
                let text = arrow::util::pretty::pretty_format_batches(&[b])
                    .unwrap()
                    .to_string();
                rows.extend(
                    text.lines()
                        .filter(|l| l.starts_with("| "))
                        .skip(1)
                        .map(str::to_string),
                );
            }
        }
    }
    rows.sort();
    rows
}

/// A table's rows as text lines, sorted.
fn sorted_rows(t: &RecordBatch) -> Vec<String> {
    let text = arrow::util::pretty::pretty_format_batches(std::slice::from_ref(t))
        .unwrap()
        .to_string();
    let mut rows: Vec<String> = text
        .lines()
        .filter(|l| l.starts_with("| "))
        .skip(1)
        .map(str::to_string)
        .collect();
    rows.sort();
    rows
}

fn golden_dir(case: &str) -> PathBuf {
    let root = std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo test");
    PathBuf::from(root).join("golden").join(case)
}

/// `state.json` (operator, version, values, table files per operator of the chain) and one
/// Arrow IPC file per table.
fn write_golden(case: &str, states: &[Option<OperatorState>]) {
    let dir = golden_dir(case);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut index = vec![];
    for (i, s) in states.iter().enumerate() {
        let Some(s) = s else {
            index.push(serde_json::Value::Null);
            continue;
        };
        let mut tables = serde_json::Map::new();
        for (name, batch) in &s.tables {
            let file = format!("op{i}-{name}.arrow");
            std::fs::write(dir.join(&file), write_ipc(batch).unwrap()).unwrap();
            tables.insert(name.clone(), file.into());
        }
        index.push(serde_json::json!({
            "operator": s.operator,
            "version": s.version,
            "values": s.values,
            "tables": tables,
        }));
    }
    let json = serde_json::to_string_pretty(&index).unwrap();
    std::fs::write(dir.join("state.json"), json + "\n").unwrap();
}

fn read_golden(case: &str) -> Vec<Option<OperatorState>> {
    let dir = golden_dir(case);
    let text = std::fs::read_to_string(dir.join("state.json")).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (generate it with SLUICE_GOLDEN_REGENERATE=1)",
            dir.display()
        )
    });
    let index: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    index
        .into_iter()
        .map(|entry| {
            if entry.is_null() {
                return None;
            }
            let tables = entry["tables"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(name, file)| {
                    let path = dir.join(file.as_str().unwrap());
                    let bytes = bytes::Bytes::from(std::fs::read(&path).unwrap());
                    (
                        name.clone(),
                        read_ipc(&bytes, &path.display().to_string()).unwrap(),
                    )
                })
                .collect();
            Some(OperatorState {
                operator: entry["operator"].as_str().unwrap().to_string(),
                version: entry["version"].as_u64().unwrap() as u32,
                values: serde_json::from_value(entry["values"].clone()).unwrap(),
                tables,
            })
        })
        .collect()
}

/// The differences between two snapshots, for the failure message.
fn differences(now: &[Option<OperatorState>], golden: &[Option<OperatorState>]) -> Vec<String> {
    let mut out = vec![];
    if now.len() != golden.len() {
        out.push(format!(
            "{} operators now, {} in the golden files",
            now.len(),
            golden.len()
        ));
    }
    for (i, (a, b)) in now.iter().zip(golden).enumerate() {
        match (a, b) {
            (None, None) => {}
            (Some(a), Some(b)) => {
                if (&a.operator, a.version, &a.values) != (&b.operator, b.version, &b.values) {
                    out.push(format!(
                        "operator {i}: now {} v{} {:?}, golden {} v{} {:?}",
                        a.operator, a.version, a.values, b.operator, b.version, b.values
                    ));
                }
                let names = |s: &OperatorState| s.tables.keys().cloned().collect::<Vec<_>>();
                if names(a) != names(b) {
                    out.push(format!(
                        "operator {i}: tables {:?} vs {:?}",
                        names(a),
                        names(b)
                    ));
                }
                for (name, t) in &a.tables {
                    match b.tables.get(name) {
                        Some(g) if g.schema() != t.schema() => out.push(format!(
                            "operator {i} table {name}: schema now {:?}, golden {:?}",
                            t.schema(),
                            g.schema()
                        )),
                        // (In any order: operators keep state in hash maps.)
                        Some(g) if sorted_rows(g) != sorted_rows(t) => {
                            out.push(format!("operator {i} table {name}: the rows differ"))
                        }
                        _ => {}
                    }
                }
            }
            _ => out.push(format!("operator {i}: stateful in one and not the other")),
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn golden_checkpoints_of_every_stateful_operator_match_and_restore() {
    let SluiceStatement::CreateSource(source) = parse_sql(SOURCE).unwrap().remove(0) else {
        panic!("not a CREATE SOURCE")
    };
    let schema = source_def(&source, &sluice_tests::connectors())
        .unwrap()
        .schema;
    let regenerate = std::env::var_os("SLUICE_GOLDEN_REGENERATE").is_some_and(|v| v == "1");
    let first = vec![
        Message::Data(input(&schema, 0, 60)),
        Message::Watermark(watermark_after(60)),
    ];
    let second = vec![
        Message::Data(input(&schema, 60, 130)),
        Message::Watermark(watermark_after(130)),
        Message::End,
    ];
    let mut failures = vec![];
    for (case, sql) in CASES {
        let mut original = pipeline(sql, &schema).await;
        run(&mut original, first.clone());
        let now = original.chain.snapshot().unwrap();
        assert!(
            now.iter().any(Option::is_some),
            "{case}: the pipeline has no stateful operator"
        );
        if regenerate {
            write_golden(case, &now);
        }
        let golden = read_golden(case);
        let diffs = differences(&now, &golden);
        if !diffs.is_empty() {
            failures.push(format!(
                "{case}: the state layout changed (bump the operator's STATE_VERSION and make \
                 restore read the old layout or refuse it, then regenerate):\n  {}",
                diffs.join("\n  ")
            ));
            continue;
        }
        // The golden state restores: a fresh pipeline from it emits what the original does.
        let mut restored = pipeline(sql, &schema).await;
        let parts: Vec<Vec<OperatorState>> = golden
            .into_iter()
            .map(|s| s.into_iter().collect())
            .collect();
        restored.chain.restore(parts, &KeyFilter::all()).unwrap();
        let after_restore = run(&mut restored, second.clone());
        let rest = run(&mut original, second.clone());
        assert!(!rest.is_empty(), "{case}: the second half emits rows");
        assert_eq!(
            after_restore, rest,
            "{case}: restored from the golden files"
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_of_an_unknown_layout_version_is_refused() {
    let SluiceStatement::CreateSource(source) = parse_sql(SOURCE).unwrap().remove(0) else {
        panic!("not a CREATE SOURCE")
    };
    let schema = source_def(&source, &sluice_tests::connectors())
        .unwrap()
        .schema;
    let (case, sql) = CASES[0];
    let mut golden = read_golden(case);
    for s in golden.iter_mut().flatten() {
        s.version += 1;
    }
    let mut chain = pipeline(sql, &schema).await;
    let parts: Vec<Vec<OperatorState>> = golden
        .into_iter()
        .map(|s| s.into_iter().collect())
        .collect();
    let err = chain
        .chain
        .restore(parts, &KeyFilter::all())
        .unwrap_err()
        .to_string();
    assert!(err.contains("state layout version 2"), "{err}");
}
