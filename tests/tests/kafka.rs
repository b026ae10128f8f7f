//! The Kafka source against a real Kafka-protocol broker (tansu, started by
//! `scripts/services.sh`): JSON records produced by a real client land in windowed results
//! equal to the batch answer; malformed records land in the errors zone with their
//! topic/partition/offset; raw values are archived in the raw zone.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};
use sluice_tests::{files_with_ext, kafka_brokers, pg_connect, start_server, wait_for};

async fn scalar(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

async fn create_topic(brokers: &str, topic: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("an admin client");
    let results = admin
        .create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("CreateTopics answered");
    for r in results {
        r.expect("the topic is created");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_records_from_kafka_land_in_windows_and_bad_ones_in_the_errors_zone() {
    let brokers = kafka_brokers();
    let topic = format!("orders-{}", std::process::id());
    create_topic(&brokers, &topic, 3).await;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("acks", "all")
        .create()
        .expect("a producer");
    let send = |partition: i32, key: String, value: String| {
        let producer = producer.clone();
        let topic = topic.clone();
        async move {
            producer
                .send(
                    FutureRecord::to(&topic)
                        .partition(partition)
                        .key(&key)
                        .payload(&value),
                    Duration::from_secs(10),
                )
                .await
                .expect("the broker acknowledges");
        }
    };
    // 300 orders over 3.5 minutes of event time, spread over the partitions by customer.
    for i in 0..300i64 {
        let t = chrono::DateTime::from_timestamp_millis(1_714_550_400_000 + i * 700).unwrap();
        let customer = i % 3;
        send(
            customer as i32,
            customer.to_string(),
            format!(
                r#"{{"customer_id":{customer},"amount":{i},"ts":"{}"}}"#,
                t.to_rfc3339()
            ),
        )
        .await;
    }
    // Two bad records, in partition 1.
    send(1, "x".into(), "not json".into()).await;
    send(
        1,
        "x".into(),
        r#"{"customer_id":"one","amount":1,"ts":"2024-05-01T08:00:00Z"}"#.into(),
    )
    .await;

    let lake = tempfile::tempdir().unwrap();
    let server = start_server(lake.path()).await;
    let client = pg_connect(server.pg_addr).await;
    client
        .batch_execute(&format!(
            "CREATE SOURCE orders (customer_id BIGINT NOT NULL, amount BIGINT NOT NULL, ts TIMESTAMP NOT NULL,
                                   WATERMARK FOR ts AS ts - INTERVAL '5 seconds')
             WITH (connector = 'kafka', brokers = '{brokers}', topic = '{topic}', format = 'json',
                   start = 'earliest', raw_zone = 'true');
             CREATE STREAM all_orders WITH (rollover_interval = '100 ms') AS SELECT * FROM orders;
             CREATE STREAM revenue_10s WITH (rollover_interval = '100 ms') AS
               SELECT customer_id, window_start, window_end, count(*) AS n, sum(amount) AS revenue
               FROM TUMBLE(orders, ts, INTERVAL '10 seconds') GROUP BY customer_id, window_start, window_end"
        ))
        .await
        .unwrap();
    // The watermark is the smallest over the partitions: move every partition far ahead.
    for p in 0..3 {
        send(
            p,
            "late".into(),
            r#"{"customer_id":9,"amount":0,"ts":"2024-05-01T09:00:00Z"}"#.to_string(),
        )
        .await;
    }

    wait_for("every window", Duration::from_secs(60), || async {
        let n = scalar(&client, "SELECT coalesce(sum(n), 0) FROM revenue_10s").await;
        (n == 300).then_some(())
    })
    .await;
    wait_for("every order", Duration::from_secs(60), || async {
        (scalar(&client, "SELECT count(*) FROM all_orders").await == 303).then_some(())
    })
    .await;
    // Each window equals the batch answer over the same orders.
    let diff = "WITH b AS (SELECT customer_id, window_start, window_end, count(*) AS n, sum(amount) AS revenue
                           FROM TUMBLE(all_orders, ts, INTERVAL '10 seconds')
                           WHERE ts < '2024-05-01T09:00:00Z'
                           GROUP BY customer_id, window_start, window_end),
                     s AS (SELECT customer_id, window_start, window_end, n, revenue FROM revenue_10s)
                SELECT (SELECT count(*) FROM (SELECT * FROM s EXCEPT ALL SELECT * FROM b) AS x)
                     + (SELECT count(*) FROM (SELECT * FROM b EXCEPT ALL SELECT * FROM s) AS y)";
    assert_eq!(scalar(&client, diff).await, 0);

    // The bad records, with where they came from; raw values archived, bad ones included.
    let errors = wait_for("the bad records", Duration::from_secs(30), || async {
        let text: String = files_with_ext(&lake.path().join("errors/orders"), "jsonl")
            .iter()
            .map(|f| std::fs::read_to_string(f).unwrap())
            .collect();
        (text.lines().count() >= 2).then_some(text)
    })
    .await;
    assert_eq!(errors.lines().count(), 2, "{errors}");
    assert!(
        errors.contains(&format!("kafka topic {topic} partition 1 offset 100")),
        "{errors}"
    );
    assert!(errors.contains("not json"), "{errors}");
    let raw: usize = files_with_ext(&lake.path().join("raw/orders"), "ndjson")
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap().lines().count())
        .sum();
    // Two streams read the source, but raw values (and bad records) are written once.
    assert_eq!(raw, 305, "every record value archived once");
    server.shutdown().await;
}
