//! Fuzz-style properties of the SQL front end: any text — token soup, truncated statements,
//! deep nesting, long chains — is parsed and planned to an answer (a plan or an error with a
//! SQLSTATE), never a panic or a stack overflow.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use proptest::prelude::*;
use sluice_sql::{ObjectKind, Relation, SluiceStatement, parse_sql, plan_stream};

/// Stack of the threads that plan: the server plans on threads with deep stacks too.
const PLANNING_STACK: usize = 256 << 20;

fn token() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec![
            "SELECT", "FROM", "WHERE", "GROUP", "BY", "ORDER", "AS", "AND", "OR", "NOT", "IN",
            "CASE", "WHEN", "THEN", "ELSE", "END", "UNION", "ALL", "JOIN", "ON", "WITH", "CREATE",
            "STREAM", "SOURCE", "SINK", "DROP", "SHOW", "TUMBLE", "HOP", "INTERVAL", "NULL",
            "count(*)", "sum", "ROW_NUMBER()", "OVER", "PARTITION", "(", ")", ",", ";", "+", "-",
            "*", "/", "=", "<", "||", "::", "'x'", "'2024-05-01'", "1", "2.5", "t", "a", "b",
            "ts", "window_start", "\"quoted\"", "$1", "[", "]",
        ]).prop_map(str::to_string),
        1 => (1usize..3000).prop_map(|n| "(".repeat(n)),
        1 => (1usize..6000).prop_map(|n| "1 + ".repeat(n) + "1"),
        1 => (1usize..4000).prop_map(|n| "a = 1 OR ".repeat(n) + "a = 2"),
        1 => "[ -~]{0,40}",
    ]
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::collection::vec(token(), 0..40).prop_map(|t| t.join(" ")),
        // A valid statement, cut anywhere.
        (
            prop::sample::select(vec![
                "SELECT a, count(*) FROM t WHERE b > 1 GROUP BY a",
                "CREATE STREAM s AS SELECT window_start, count(*) AS n FROM TUMBLE(t, ts, INTERVAL '10 seconds') GROUP BY window_start, window_end",
                "CREATE STREAM d AS SELECT * FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY a ORDER BY ts) AS rn FROM t) WHERE rn = 1",
                "CREATE SOURCE x (a BIGINT, ts TIMESTAMP NOT NULL, WATERMARK FOR ts AS ts - INTERVAL '1 second') WITH (connector = 'http')",
            ]),
            any::<prop::sample::Index>(),
        )
            .prop_map(|(s, cut)| {
                let mut end = cut.index(s.len() + 1);
                while !s.is_char_boundary(end) {
                    end -= 1;
                }
                s[..end].to_string()
            }),
    ]
}

fn relations() -> BTreeMap<String, Relation> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("a", DataType::Int64, true),
        Field::new("b", DataType::Int64, true),
        Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Microsecond, None),
            false,
        ),
    ]));
    BTreeMap::from([(
        "t".to_string(),
        Relation {
            kind: ObjectKind::Source,
            schema,
            event_time_column: Some("ts".into()),
            primary_key: vec![],
        },
    )])
}

/// Parses `sql` and plans every `CREATE STREAM` in it, on a deep-stacked thread.
fn parse_and_plan(sql: String) -> Result<(), String> {
    std::thread::Builder::new()
        .stack_size(PLANNING_STACK)
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            match parse_sql(&sql) {
                Ok(statements) => {
                    for s in statements {
                        if let SluiceStatement::CreateStream(c) = s
                            && let Err(e) = runtime.block_on(plan_stream(&c, &relations()))
                        {
                            assert!(!e.sqlstate().is_empty());
                        }
                    }
                    Ok(())
                }
                Err(e) => {
                    assert_eq!(e.sqlstate().len(), 5, "{e}");
                    Err(e.to_string())
                }
            }
        })
        .unwrap()
        .join()
        .map_err(|_| "panicked".to_string())?
        .or(Ok(()))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn any_text_parses_and_plans_to_an_answer(sql in text()) {
        prop_assert_eq!(parse_and_plan(sql), Ok(()));
    }
}
