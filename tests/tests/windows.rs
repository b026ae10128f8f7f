//! Windowed aggregation over pushed events: windows close when the watermark passes them,
//! late events go to the errors zone, and windows over windows agree with the batch answer.

use std::time::Duration;

use sluice_tests::{files_with_ext, pg_connect, scalar, start_server, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_close_on_the_watermark_and_chain_into_coarser_windows() {
    let lake = tempfile::tempdir().unwrap();
    let server = start_server(lake.path()).await;
    let client = pg_connect(server.pg_addr).await;
    client
        .batch_execute(
            "CREATE SOURCE orders (customer_id BIGINT NOT NULL, amount BIGINT NOT NULL, ts TIMESTAMP NOT NULL,
                                   WATERMARK FOR ts AS ts - INTERVAL '5 seconds')
             WITH (connector = 'http');
             CREATE STREAM all_orders WITH (rollover_interval = '100 ms') AS SELECT * FROM orders;
             CREATE STREAM revenue_10s WITH (rollover_interval = '100 ms') AS
               SELECT customer_id, window_start, window_end, count(*) AS n, sum(amount) AS revenue
               FROM TUMBLE(orders, ts, INTERVAL '10 seconds') GROUP BY customer_id, window_start, window_end;
             CREATE STREAM revenue_1m WITH (rollover_interval = '100 ms') AS
               SELECT customer_id, window_start, window_end, sum(n) AS n, sum(revenue) AS revenue
               FROM TUMBLE(revenue_10s, window_start, INTERVAL '1 minute') GROUP BY customer_id, window_start, window_end",
        )
        .await
        .unwrap();
    let url = format!("http://{}/v1/sources/orders/events", server.http_addr);
    let http = reqwest::Client::new();
    // 300 orders, one every 0.7 s over 3.5 minutes, in ten requests.
    let lines: Vec<String> = (0..300)
        .map(|i| {
            let t = chrono::DateTime::from_timestamp_millis(1_714_550_400_000 + i * 700).unwrap();
            format!(
                r#"{{"customer_id":{},"amount":{},"ts":"{}"}}"#,
                i % 3,
                i,
                t.to_rfc3339()
            )
        })
        .collect();
    let push = |body: String| {
        let request = http
            .post(&url)
            .header("Content-Type", "application/x-ndjson")
            .body(body);
        async move {
            let status = request.send().await.unwrap().status().as_u16();
            assert_eq!(status, 200, "every record is accepted by the source");
        }
    };
    for chunk in lines.chunks(30) {
        push(chunk.join("\n")).await;
    }
    // A late event (its 10-second window closed long ago): accepted by the source, rejected
    // by the window aggregation into the errors zone.
    push(r#"{"customer_id":1,"amount":5,"ts":"2024-05-01T08:00:01Z"}"#.into()).await;
    // One event far ahead moves the watermark past every window.
    push(r#"{"customer_id":9,"amount":0,"ts":"2024-05-01T09:00:00Z"}"#.into()).await;

    wait_for("every minute window", Duration::from_secs(30), || async {
        let n = scalar(&client, "SELECT coalesce(sum(n), 0) FROM revenue_1m").await;
        // The far-future event's own window is still open; the late one was rejected.
        (n == 300).then_some(())
    })
    .await;
    // Each window emitted once, equal to the batch answer over the orders (without the late
    // one and the far-future one, whose window is still open).
    let diff = |streamed: &str, minutes: i64| {
        format!(
            "WITH b AS (SELECT customer_id, window_start, window_end, count(*) AS n, sum(amount) AS revenue
                        FROM TUMBLE(all_orders, ts, INTERVAL '{minutes} seconds')
                        WHERE ts < '2024-05-01T09:00:00Z' AND ts <> '2024-05-01T08:00:01Z'
                        GROUP BY customer_id, window_start, window_end),
                  s AS (SELECT customer_id, window_start, window_end, n, revenue FROM {streamed})
             SELECT (SELECT count(*) FROM (SELECT * FROM s EXCEPT ALL SELECT * FROM b) AS x)
                  + (SELECT count(*) FROM (SELECT * FROM b EXCEPT ALL SELECT * FROM s) AS y)"
        )
    };
    wait_for("all_orders files", Duration::from_secs(30), || async {
        (scalar(&client, "SELECT count(*) FROM all_orders").await == 302).then_some(())
    })
    .await;
    assert_eq!(scalar(&client, &diff("revenue_10s", 10)).await, 0);
    assert_eq!(scalar(&client, &diff("revenue_1m", 60)).await, 0);

    // The late event is in the errors zone of the stream that rejected it, with its reason.
    let errors = wait_for(
        "the late event in the errors zone",
        Duration::from_secs(30),
        || async {
            let files = files_with_ext(&lake.path().join("errors/revenue_10s"), "jsonl");
            let text: String = files
                .iter()
                .map(|f| std::fs::read_to_string(f).unwrap())
                .collect();
            (!text.is_empty()).then_some(text)
        },
    )
    .await;
    assert_eq!(errors.lines().count(), 1, "{errors}");
    assert!(
        errors.contains("late: its window ended at 2024-05-01T08:00:10"),
        "{errors}"
    );
    server.shutdown().await;
}

/// The `SHOW STREAMS` row of `stream`, as text.
async fn show_stream(client: &tokio_postgres::Client, stream: &str) -> Vec<String> {
    let rows = client.simple_query("SHOW STREAMS").await.unwrap();
    rows.iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some(stream) => Some(
                (0..r.len())
                    .map(|i| r.get(i).unwrap_or("NULL").to_string())
                    .collect(),
            ),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no stream {stream}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedup_counts_duplicates_and_late_events_and_honours_late_events_drop() {
    let lake = tempfile::tempdir().unwrap();
    let server = start_server(lake.path()).await;
    let client = pg_connect(server.pg_addr).await;
    client
        .batch_execute(
            "CREATE SOURCE events (id BIGINT NOT NULL, ts TIMESTAMP NOT NULL,
                                   WATERMARK FOR ts AS ts - INTERVAL '2 seconds')
             WITH (connector = 'http');
             CREATE STREAM once WITH (rollover_interval = '100 ms') AS
               SELECT DISTINCT ON (id) * FROM events;
             CREATE STREAM once_quiet WITH (rollover_interval = '100 ms', late_events = 'drop') AS
               SELECT * FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY id ORDER BY ts) AS rn FROM events)
               WHERE rn = 1",
        )
        .await
        .unwrap();
    let url = format!("http://{}/v1/sources/events/events", server.http_addr);
    let http = reqwest::Client::new();
    let event = |id: i64, ms: i64| {
        let t = chrono::DateTime::from_timestamp_millis(1_714_550_400_000 + ms).unwrap();
        format!(r#"{{"id":{id},"ts":"{}"}}"#, t.to_rfc3339())
    };
    // 200 events, each delivered twice (a retrying producer), 100 ms apart.
    for chunk in (0..200).collect::<Vec<i64>>().chunks(50) {
        let body: Vec<String> = chunk
            .iter()
            .flat_map(|&i| [event(i, i * 100), event(i, i * 100)])
            .collect();
        let status = http
            .post(&url)
            .header("Content-Type", "application/x-ndjson")
            .body(body.join("\n"))
            .send()
            .await
            .unwrap();
        assert_eq!(status.status().as_u16(), 200);
    }
    // Then one event from long ago (late), and one far ahead that closes everything.
    for body in [event(1000, -60_000), event(2000, 3_600_000)] {
        let status = http
            .post(&url)
            .header("Content-Type", "application/x-ndjson")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(status.status().as_u16(), 200);
    }
    for stream in ["once", "once_quiet"] {
        wait_for("every id once", Duration::from_secs(30), || async {
            let sql = format!("SELECT count(*), count(DISTINCT id) FROM {stream} WHERE id < 1000");
            let row = client.query_one(&sql, &[]).await.unwrap();
            (row.get::<_, i64>(0) == 200 && row.get::<_, i64>(1) == 200).then_some(())
        })
        .await;
    }
    // name, status, inputs, rows_in, rows_out, errors, late_events, duplicates, …
    let counters = |stream: &'static str| {
        let client = &client;
        wait_for(
            "every event counted",
            Duration::from_secs(30),
            move || async move {
                let row = show_stream(client, stream).await;
                // The late event came after every duplicate (counted when processed).
                (row[3] == "402" && row[6] != "0").then_some(row)
            },
        )
    };
    let once = counters("once").await;
    assert_eq!(&once[5..8], ["1", "1", "200"], "{once:?}");
    let quiet = counters("once_quiet").await;
    assert_eq!(
        &quiet[5..8],
        ["0", "1", "200"],
        "dropped, not an error: {quiet:?}"
    );

    let late = wait_for("the late event", Duration::from_secs(30), || async {
        let files = files_with_ext(&lake.path().join("errors/once"), "jsonl");
        let text: String = files
            .iter()
            .map(|f| std::fs::read_to_string(f).unwrap())
            .collect();
        (!text.is_empty()).then_some(text)
    })
    .await;
    assert!(
        late.contains("late: event time 2024-05-01T07:59:00"),
        "{late}"
    );
    assert!(
        files_with_ext(&lake.path().join("errors/once_quiet"), "jsonl").is_empty(),
        "late_events = 'drop' writes nothing to the errors zone"
    );
    server.shutdown().await;
}
