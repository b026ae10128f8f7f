//! HTTP ingestion against a real server: valid, invalid, mixed, malformed and oversized
//! bodies; what lands in the raw, errors and processed zones.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use sluice_tests::{files_with_ext, pg_connect, start_server, wait_for};

async fn setup() -> (
    tempfile::TempDir,
    sluice_server::RunningServer,
    tokio_postgres::Client,
    String,
) {
    let lake = tempfile::tempdir().unwrap();
    let server = start_server(lake.path()).await;
    let client = pg_connect(server.pg_addr).await;
    client
        .batch_execute(
            "CREATE SOURCE orders (order_id TEXT NOT NULL, amount DOUBLE, ts TIMESTAMP NOT NULL,
                                   WATERMARK FOR ts AS ts - INTERVAL '5 seconds')
             WITH (connector = 'http', max_request_size = '64KB');
             CREATE STREAM orders_out WITH (rollover_interval = '100 ms') AS SELECT * FROM orders",
        )
        .await
        .unwrap();
    let url = format!("http://{}/v1/sources/orders/events", server.http_addr);
    (lake, server, client, url)
}

async fn post(url: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(url)
        .header("Content-Type", "application/x-ndjson")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

async fn landed(client: &tokio_postgres::Client, expected: i64) {
    wait_for(
        &format!("{expected} rows in orders_out"),
        Duration::from_secs(30),
        || async {
            let n: i64 = client
                .query_one("SELECT count(*) FROM orders_out", &[])
                .await
                .ok()?
                .get(0);
            (n == expected).then_some(())
        },
    )
    .await;
}

fn error_lines(lake: &Path) -> Vec<Value> {
    sluice_tests::error_lines(lake, "orders")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_ndjson_and_json_arrays_are_stored_and_processed() {
    let (lake, server, client, url) = setup().await;
    let ndjson = "{\"order_id\":\"a\",\"amount\":1.5,\"ts\":\"2024-05-01T12:00:00Z\"}\n\
                  {\"order_id\":\"b\",\"amount\":null,\"ts\":\"2024-05-01T12:30:00Z\"}\n";
    assert_eq!(
        post(&url, ndjson).await,
        (200, serde_json::json!({"accepted": 2, "rejected": []}))
    );
    let array = r#"[{"order_id":"c","amount":3,"ts":"2024-05-01T13:00:00Z"}]"#;
    assert_eq!(post(&url, array).await.0, 200);
    landed(&client, 3).await;

    // Partitioned by the event time of the rows, not by arrival.
    let mut parts: Vec<String> =
        files_with_ext(&lake.path().join("processed/orders_out"), "parquet")
            .iter()
            .map(|f| {
                f.parent()
                    .unwrap()
                    .strip_prefix(lake.path())
                    .unwrap()
                    .display()
                    .to_string()
            })
            .collect();
    parts.sort();
    parts.dedup();
    assert_eq!(
        parts,
        [
            "processed/orders_out/dt=2024-05-01/hour=12",
            "processed/orders_out/dt=2024-05-01/hour=13"
        ]
    );
    // The raw zone keeps each body exactly as received.
    let raw: Vec<String> = files_with_ext(&lake.path().join("raw/orders"), "ndjson")
        .iter()
        .chain(files_with_ext(&lake.path().join("raw/orders"), "json").iter())
        .map(|f| std::fs::read_to_string(f).unwrap())
        .collect();
    assert_eq!(raw.len(), 2);
    assert!(raw.contains(&ndjson.to_string()) && raw.contains(&array.to_string()));
    assert!(error_lines(lake.path()).is_empty());
    let row = client
        .query_one(
            "SELECT string_agg(order_id, ',' ORDER BY order_id), sum(amount) FROM orders_out",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "a,b,c");
    assert_eq!(row.get::<_, f64>(1), 4.5);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_bodies_keep_good_lines_and_report_each_bad_one() {
    let (lake, server, client, url) = setup().await;
    let body = "{\"order_id\":\"a\",\"amount\":1,\"ts\":\"2024-05-01T12:00:00Z\"}\n\
                {\"order_id\":\"b\",\"amount\":\"lots\",\"ts\":\"2024-05-01T12:00:00Z\"}\n\
                \n\
                {\"amount\":2,\"ts\":\"2024-05-01T12:00:00Z\"}\n\
                {\"order_id\":\"c\", \n\
                {\"order_id\":\"d\",\"amount\":4,\"ts\":\"not a time\"}\n\
                {\"order_id\":\"e\",\"amount\":5,\"ts\":\"2024-05-01T12:00:05Z\"}";
    let (status, json) = post(&url, body).await;
    assert_eq!(status, 422);
    assert_eq!(json["accepted"], 2);
    let lines: Vec<u64> = json["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["line"].as_u64().unwrap())
        .collect();
    assert_eq!(lines, [2, 4, 5, 6]);
    assert_eq!(
        json["rejected"][1]["reason"],
        "missing value for NOT NULL column `order_id`"
    );
    landed(&client, 2).await;

    let errors = error_lines(lake.path());
    assert_eq!(errors.len(), 4);
    let e = errors
        .iter()
        .find(|e| e["origin"].as_str().unwrap().ends_with("line 2"))
        .unwrap();
    assert_eq!(
        e["payload"],
        "{\"order_id\":\"b\",\"amount\":\"lots\",\"ts\":\"2024-05-01T12:00:00Z\"}"
    );
    assert!(e["reason"].as_str().unwrap().contains("amount"), "{e}");
    assert!(e["received_at"].as_str().unwrap().ends_with('Z'));

    // All-bad bodies: 422, nothing accepted, everything in the errors zone.
    let (status, json) = post(&url, "{\"x\":1}\n{\"y\":2}").await;
    assert_eq!((status, json["accepted"].as_u64()), (422, Some(0)));
    assert_eq!(error_lines(lake.path()).len(), 6);

    let shown = client.simple_query("SHOW SOURCES").await.unwrap();
    let errors_col = shown.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get("errors").map(str::to_string),
        _ => None,
    });
    assert_eq!(errors_col.as_deref(), Some("6"));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_oversized_and_misdirected_requests_get_clear_answers() {
    let (lake, server, _client, url) = setup().await;
    // Not a JSON array: 400, stored whole in the errors zone.
    let (status, json) = post(&url, "[{\"order_id\":\"a\"").await;
    assert_eq!(status, 400);
    assert!(
        json["error"]
            .as_str()
            .unwrap()
            .starts_with("the body is not a valid JSON array")
    );
    assert_eq!(error_lines(lake.path()).len(), 1);
    // Empty body.
    assert_eq!(post(&url, "\n\n").await.0, 400);
    // Over the source's max_request_size (64 KiB): 413, with and without Content-Length.
    let big = "x".repeat(70 * 1024);
    assert_eq!(post(&url, big.clone()).await.0, 413);
    let chunks: Vec<Result<String, std::io::Error>> =
        (0..70).map(|_| Ok("y".repeat(1024))).collect();
    let streamed = reqwest::Body::wrap_stream(futures::stream::iter(chunks));
    assert_eq!(post(&url, streamed).await.0, 413);
    // Unknown source; a source that is not an http source.
    let other = url.replace("/orders/", "/nope/");
    assert_eq!(post(&other, "{}").await.0, 404);
    let (status, json) = post(&url.replace("/orders/", "/orders_out/"), "{}").await;
    assert_eq!(status, 409, "{json}");
    // Health.
    let health = reqwest::get(format!("http://{}/health", server.http_addr))
        .await
        .unwrap();
    assert_eq!(health.status().as_u16(), 200);
    server.shutdown().await;
}
