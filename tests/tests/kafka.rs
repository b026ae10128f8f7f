//! The Kafka source against a real Kafka-protocol broker (tansu, started by
//! `scripts/services.sh`): JSON records produced by a real client land in windowed results
//! equal to the batch answer; malformed records land in the errors zone with their
//! topic/partition/offset; raw values are archived in the raw zone.

use std::time::Duration;

use futures::FutureExt;
use rdkafka::producer::FutureRecord;
use sluice_tests::{
    consume_from_beginning, create_topic, files_with_ext, kafka_brokers, pg_connect, producer,
    push_events, scalar, start_server, wait_for,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_records_from_kafka_land_in_windows_and_bad_ones_in_the_errors_zone() {
    let brokers = kafka_brokers();
    let topic = format!("orders-{}", std::process::id());
    create_topic(&brokers, &topic, 3).await;
    let producer = producer(&brokers);
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
    // Consumer lag per partition, fetch side: everything read, so 0 behind in each.
    let lag = wait_for("lag reported", Duration::from_secs(30), || async {
        let shown = client.simple_query("SHOW SOURCES").await.unwrap();
        shown.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => {
                let by_partition = r.get("lag_by_partition")?.to_string();
                (r.get("lag") == Some("0")).then_some(by_partition)
            }
            _ => None,
        })
    })
    .await;
    assert_eq!(lag, "0:0 1:0 2:0");
    let raw: usize = files_with_ext(&lake.path().join("raw/orders"), "ndjson")
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap().lines().count())
        .sum();
    // Two streams read the source, but raw values (and bad records) are written once.
    assert_eq!(raw, 305, "every record value archived once");
    server.shutdown().await;
}

/// The Java client's default partitioner for keyed records: `toPositive(murmur2(key)) % n`.
fn java_partition(key: &[u8], partitions: i32) -> i32 {
    const M: u32 = 0x5bd1_e995;
    let mut h: u32 = 0x9747_b28c ^ key.len() as u32;
    let mut chunks = key.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M) ^ k;
    }
    let rest = chunks.remainder();
    if rest.len() == 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    ((h & 0x7fff_ffff) % partitions as u32) as i32
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_sink_delivers_a_stream_keyed_like_the_java_client() {
    use futures::StreamExt;
    use rdkafka::Message as _;

    let brokers = kafka_brokers();
    let topic = format!("big-orders-{}", std::process::id());
    create_topic(&brokers, &topic, 4).await;
    let lake = tempfile::tempdir().unwrap();
    let server = start_server(lake.path()).await;
    let client = pg_connect(server.pg_addr).await;
    client
        .batch_execute(&format!(
            "CREATE SOURCE orders (order_id TEXT NOT NULL, customer TEXT NOT NULL, amount BIGINT, ts TIMESTAMP NOT NULL)
             WITH (connector = 'http');
             CREATE STREAM big_orders AS SELECT order_id, customer, amount, ts FROM orders WHERE amount >= 100;
             CREATE SINK big_out FROM big_orders
             WITH (connector = 'kafka', brokers = '{brokers}', topic = '{topic}', key = 'customer', format = 'json',
                   header.customer = 'customer', header.amount = 'amount')"
        ))
        .await
        .unwrap();
    let sinks = client.simple_query("SHOW SINKS").await.unwrap();
    let row = sinks
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .expect("one sink");
    assert_eq!(
        (0..4).map(|i| row.get(i).unwrap()).collect::<Vec<_>>(),
        ["big_out", "kafka", "big_orders", "running"]
    );
    // The stream cannot go while the sink reads it.
    let err = client
        .batch_execute("DROP STREAM big_orders")
        .await
        .unwrap_err();
    assert_eq!(err.code().unwrap().code(), "2BP01", "{err}");

    // 200 orders from 20 customers; half of them big.
    let body: Vec<String> = (0..200)
        .map(|i| {
            format!(
                r#"{{"order_id":"o{i}","customer":"customer-{}","amount":{},"ts":"2024-05-01T08:00:{:02}Z"}}"#,
                i % 20,
                if i % 2 == 0 { 150 } else { 50 },
                i % 60
            )
        })
        .collect();
    assert_eq!(push_events(server.http_addr, "orders", &body).await, 200);

    let consumer = consume_from_beginning(&brokers, &topic, 4);
    let mut seen = std::collections::BTreeMap::new();
    let mut stream = consumer.stream();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while seen.len() < 100 {
        let m = tokio::time::timeout_at(deadline, stream.next())
            .await
            .expect("100 records within 60 s")
            .unwrap()
            .unwrap();
        let value: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
        let key = m.key().expect("keyed");
        assert_eq!(value["customer"].as_str().unwrap().as_bytes(), key);
        assert!(value["amount"].as_i64().unwrap() >= 100, "{value}");
        assert_eq!(
            m.partition(),
            java_partition(key, 4),
            "record for {} in partition {}",
            String::from_utf8_lossy(key),
            m.partition()
        );
        // `header.<name>` columns as headers, as text; exactly-once delivery names each
        // record `<sink>/<epoch>/<row>`.
        use rdkafka::message::Headers as _;
        let mut headers: Vec<(String, Vec<u8>)> = m
            .headers()
            .expect("headers")
            .iter()
            .map(|h| (h.key.to_string(), h.value.unwrap().to_vec()))
            .collect();
        let (name, id) = headers.pop().expect("a delivery header");
        assert_eq!(name, sluice_connectors::kafka::DELIVERY_HEADER);
        assert!(String::from_utf8(id).unwrap().starts_with("big_out/"));
        assert_eq!(
            headers,
            [
                (
                    "amount".to_string(),
                    value["amount"].to_string().into_bytes()
                ),
                ("customer".to_string(), key.to_vec()),
            ]
        );
        let order = value["order_id"].as_str().unwrap().to_string();
        assert!(seen.insert(order, m.partition()).is_none(), "a duplicate");
    }
    // Every partition got some customers.
    let partitions: std::collections::BTreeSet<i32> = seen.values().copied().collect();
    assert!(partitions.len() > 1, "{partitions:?}");
    let delivered = wait_for("the sink's counter", Duration::from_secs(30), || async {
        let shown = client.simple_query("SHOW SINKS").await.unwrap();
        shown.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => {
                let n = r.get("rows_delivered")?.to_string();
                (n == "100").then_some(n)
            }
            _ => None,
        })
    })
    .await;
    assert_eq!(delivered, "100");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csv_records_from_kafka_decode_by_column_order() {
    let brokers = kafka_brokers();
    let topic = format!("csv-{}", std::process::id());
    create_topic(&brokers, &topic, 1).await;
    let producer = producer(&brokers);
    use rdkafka::message::{Header, OwnedHeaders};
    let headers = |pairs: &[(&'static str, Option<&'static str>)]| {
        pairs.iter().fold(OwnedHeaders::new(), |h, (key, value)| {
            h.insert(Header { key, value: *value })
        })
    };
    for (key, value, headers) in [
        (
            Some("a"),
            "1,alice,2024-05-01T08:00:00Z",
            headers(&[("trace", Some("t-1")), ("tenant", Some("acme"))]),
        ),
        (
            Some("b"),
            "2,\"bob, jr\",2024-05-01T08:00:01Z",
            headers(&[("trace", None)]),
        ),
        (Some("c"), "three,carol,2024-05-01T08:00:02Z", headers(&[])),
        (None, "4,,2024-05-01T08:00:03Z", headers(&[])),
    ] {
        let mut record = FutureRecord::<str, str>::to(&topic)
            .payload(value)
            .headers(headers)
            .timestamp(1_714_550_400_000);
        if let Some(key) = key {
            record = record.key(key);
        }
        producer
            .send(record, Duration::from_secs(10))
            .await
            .expect("acknowledged");
    }
    let lake = tempfile::tempdir().unwrap();
    let server = start_server(lake.path()).await;
    let client = pg_connect(server.pg_addr).await;
    client
        .batch_execute(&format!(
            "CREATE SOURCE people (id BIGINT NOT NULL, _kafka_offset BIGINT, name TEXT,
                                   _kafka_key TEXT, ts TIMESTAMP NOT NULL, _kafka_partition INT,
                                   _kafka_timestamp TIMESTAMP,
                                   _kafka_headers TEXT)
             WITH (connector = 'kafka', brokers = '{brokers}', topic = '{topic}', format = 'csv');
             CREATE STREAM all_people WITH (rollover_interval = '100 ms') AS SELECT * FROM people"
        ))
        .await
        .unwrap();
    wait_for("three people", Duration::from_secs(30), || async {
        (scalar(&client, "SELECT count(*) FROM all_people").await == 3).then_some(())
    })
    .await;
    let rows = client
        .query(
            "SELECT id, coalesce(name, '(null)'), _kafka_offset, coalesce(_kafka_key, '(none)'),
                    _kafka_partition, CAST(_kafka_timestamp AS TEXT)
             FROM all_people ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    let got: Vec<(i64, String, i64, String, i32, String)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
        .collect();
    let at = "2024-05-01T08:00:00Z".to_string();
    assert_eq!(
        got,
        [
            (1, "alice".into(), 0, "a".into(), 0, at.clone()),
            (2, "bob, jr".into(), 1, "b".into(), 0, at.clone()),
            (4, "(null)".into(), 3, "(none)".into(), 0, at)
        ]
    );
    let errors = wait_for("the bad row", Duration::from_secs(30), || async {
        let text: String = files_with_ext(&lake.path().join("errors/people"), "jsonl")
            .iter()
            .map(|f| std::fs::read_to_string(f).unwrap())
            .collect();
        (!text.is_empty()).then_some(text)
    })
    .await;
    // Headers as a JSON object; a header without a value is null.
    let rows = client
        .query("SELECT _kafka_headers FROM all_people ORDER BY id", &[])
        .await
        .unwrap();
    let got: Vec<&str> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(
        got,
        [
            r#"{"tenant":"acme","trace":"t-1"}"#,
            r#"{"trace":null}"#,
            "{}"
        ]
    );
    assert!(errors.contains("three,carol"), "{errors}");
    assert!(errors.contains("partition 0 offset 2"), "{errors}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_partition_stops_holding_windows_after_idle_timeout() {
    let brokers = kafka_brokers();
    let topic = format!("idle-{}", std::process::id());
    create_topic(&brokers, &topic, 2).await;
    let producer = producer(&brokers);
    // Everything goes to partition 0; partition 1 stays empty.
    for (amount, ts) in [(1, "00:00:01"), (2, "00:00:05"), (4, "00:00:30")] {
        let value = format!(r#"{{"amount":{amount},"ts":"2024-05-01T{ts}Z"}}"#);
        producer
            .send(
                FutureRecord::<(), str>::to(&topic)
                    .partition(0)
                    .payload(&value),
                Duration::from_secs(10),
            )
            .await
            .expect("acknowledged");
    }
    let lake = tempfile::tempdir().unwrap();
    let server = start_server(lake.path()).await;
    let client = pg_connect(server.pg_addr).await;
    client
        .batch_execute(&format!(
            "CREATE SOURCE payments (amount BIGINT NOT NULL, ts TIMESTAMP NOT NULL,
                                     WATERMARK FOR ts AS ts - INTERVAL '1 second')
             WITH (connector = 'kafka', brokers = '{brokers}', topic = '{topic}', idle_timeout = '500 ms');
             CREATE STREAM totals WITH (rollover_interval = '100 ms') AS
               SELECT window_start, window_end, sum(amount) AS amount
               FROM TUMBLE(payments, ts, INTERVAL '10 seconds') GROUP BY window_start, window_end"
        ))
        .await
        .unwrap();
    let first = wait_for("the first window", Duration::from_secs(30), || async {
        let rows = client
            .query("SELECT amount FROM totals", &[])
            .await
            .unwrap();
        rows.first().map(|r| r.get::<_, i64>(0))
    })
    .await;
    assert_eq!(first, 3);
    server.shutdown().await;
}

/// The offsets the consumer group `group` committed on `topic`'s partition 0, if any.
fn committed_offset(brokers: &str, group: &str, topic: &str) -> Option<i64> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition(topic, 0);
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .ok()?;
    match committed.elements().first()?.offset() {
        rdkafka::Offset::Offset(o) => Some(o),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archived_offsets_are_committed_and_start_committed_resumes_there() {
    let brokers = kafka_brokers();
    let topic = format!("committed-{}", std::process::id());
    create_topic(&brokers, &topic, 1).await;
    let producer = producer(&brokers);
    let send = |ids: std::ops::Range<i64>| {
        let (producer, topic) = (producer.clone(), topic.clone());
        async move {
            for id in ids {
                let value = format!(r#"{{"id":{id},"ts":"2024-05-01T08:00:00Z"}}"#);
                producer
                    .send(
                        FutureRecord::<str, str>::to(&topic).payload(&value),
                        Duration::from_secs(10),
                    )
                    .await
                    .expect("acknowledged");
            }
        }
    };
    send(0..100).await;
    let lake = tempfile::tempdir().unwrap();
    let server = start_server(lake.path()).await;
    let client = pg_connect(server.pg_addr).await;
    let source = |start: &str| {
        format!(
            "CREATE SOURCE ids (id BIGINT NOT NULL, ts TIMESTAMP NOT NULL)
             WITH (connector = 'kafka', brokers = '{brokers}', topic = '{topic}', raw_zone = 'true',
                   start = '{start}')"
        )
    };
    client.batch_execute(&source("earliest")).await.unwrap();
    // Once a checkpoint made the archived records durable, the group has their offsets.
    let group = "sluice-ids";
    wait_for(
        "the archived offsets to be committed",
        Duration::from_secs(60),
        || async { (committed_offset(&brokers, group, &topic) == Some(100)).then_some(()) },
    )
    .await;
    client.batch_execute("DROP SOURCE ids").await.unwrap();
    send(100..150).await;
    // A source starting at the committed offsets sees only what was not archived yet.
    client.batch_execute(&source("committed")).await.unwrap();
    client
        .batch_execute(
            "CREATE STREAM fresh WITH (rollover_interval = '200 ms') AS SELECT id FROM ids",
        )
        .await
        .unwrap();
    let (n, min): (i64, i64) = wait_for("the new records", Duration::from_secs(60), || async {
        let row = client
            .query_one("SELECT count(*), coalesce(min(id), -1) FROM fresh", &[])
            .await
            .ok()?;
        let n: i64 = row.get(0);
        (n >= 50).then(|| (n, row.get(1)))
    })
    .await;
    assert_eq!(
        (n, min),
        (50, 100),
        "only the 50 records produced after the commit"
    );
    let err = client
        .batch_execute(&source("stored").replace("ids", "other"))
        .await
        .unwrap_err();
    assert!(
        err.as_db_error()
            .unwrap()
            .message()
            .contains("'earliest', 'latest' or 'committed'"),
        "{err}"
    );
    server.shutdown().await;
}

/// Produces `{"id": n}` for each `n` of `ids`, to partition `n % partitions`, all in flight
/// together (one at a time, each would wait for its acknowledgement).
fn produce_ids(
    producer: rdkafka::producer::FutureProducer,
    topic: String,
    ids: std::ops::Range<i64>,
    partitions: i64,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let sends = ids.map(move |id| {
        let (producer, topic) = (producer.clone(), topic.clone());
        async move {
            let value = format!(r#"{{"id":{id}}}"#);
            producer
                .send(
                    FutureRecord::<(), str>::to(&topic)
                        .partition((id % partitions) as i32)
                        .payload(&value),
                    Duration::from_secs(10),
                )
                .await
                .expect("acknowledged");
        }
    });
    futures::future::join_all(sends.collect::<Vec<_>>()).map(|_| ())
}

/// The rows the source read (`SHOW SOURCES`), if it is listed.
async fn source_events(client: &tokio_postgres::Client, source: &str) -> Option<i64> {
    let shown = client.simple_query("SHOW SOURCES").await.unwrap();
    shown.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) if r.get("name") == Some(source) => {
            r.get("rows_in")?.parse().ok()
        }
        _ => None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_created_while_the_source_runs_reads_from_the_start_then_joins_it() {
    let brokers = kafka_brokers();
    let topic = format!("late-{}", std::process::id());
    create_topic(&brokers, &topic, 3).await;
    let producer = producer(&brokers);
    let produce = |ids| produce_ids(producer.clone(), topic.clone(), ids, 3);
    produce(0..3_000).await;
    let lake = tempfile::tempdir().unwrap();
    let server = start_server(lake.path()).await;
    let client = pg_connect(server.pg_addr).await;
    // Small batches: the later stream's reader is many batches behind the source's.
    client
        .batch_execute(&format!(
            "CREATE SOURCE ids (id BIGINT NOT NULL)
             WITH (connector = 'kafka', brokers = '{brokers}', topic = '{topic}', batch_size = '50');
             CREATE STREAM early WITH (rollover_interval = '100 ms') AS SELECT id FROM ids"
        ))
        .await
        .unwrap();
    let count = |stream: &'static str| {
        let client = &client;
        async move { scalar(client, &format!("SELECT count(*) FROM {stream}")).await }
    };
    wait_for("the first records", Duration::from_secs(60), || async {
        (count("early").await == 3_000).then_some(())
    })
    .await;
    // More records arrive while the second stream catches up and joins.
    let more = tokio::spawn(produce(3_000..6_000));
    client
        .batch_execute(
            "CREATE STREAM later WITH (rollover_interval = '100 ms') AS SELECT id FROM ids",
        )
        .await
        .unwrap();
    more.await.unwrap();
    produce(6_000..6_300).await;
    for stream in ["early", "later"] {
        wait_for(stream, Duration::from_secs(60), || async {
            (count(stream).await >= 6_300).then_some(())
        })
        .await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for stream in ["early", "later"] {
        let summary = client
            .query_one(
                &format!("SELECT count(*), count(DISTINCT id), min(id), max(id) FROM {stream}"),
                &[],
            )
            .await
            .unwrap();
        let got: (i64, i64, i64, i64) = (
            summary.get(0),
            summary.get(1),
            summary.get(2),
            summary.get(3),
        );
        assert_eq!(got, (6_300, 6_300, 0, 6_299), "{stream}: every record once");
    }
    // One reader decodes for both streams: the source counts each record once.
    assert_eq!(source_events(&client, "ids").await, Some(6_300));
    // Joined: `SHOW STREAMS` no longer says it is catching up.
    let shown = client.simple_query("SHOW STREAMS").await.unwrap();
    let inputs = shown.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) if r.get("name") == Some("later") => {
            r.get("inputs").map(str::to_string)
        }
        _ => None,
    });
    assert_eq!(inputs.as_deref(), Some("ids"));
    server.shutdown().await;
}

/// The `id`s in a message's rows, if it carries rows.
fn ids_of(msg: &sluice_engine::Message) -> Vec<i64> {
    match msg {
        sluice_engine::Message::Data(batch) => batch
            .column(0)
            .as_any()
            .downcast_ref::<arrow::array::Int64Array>()
            .expect("id is BIGINT")
            .values()
            .to_vec(),
        _ => vec![],
    }
}

/// The connector's parts directly, with a checkpoint coordinator on a local lake: a backfill
/// reader checkpointed half way through the topic and then stopped (as in a crash) resumes
/// from its checkpoint's position and joins the source's reader, which went on meanwhile;
/// what it delivered before the checkpoint and after the restart is every record once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_resumed_from_its_checkpoint_joins_with_every_record_once() {
    use std::sync::Arc;

    use sluice_engine::checkpoint::{Coordinator, StreamRegistration};
    use sluice_engine::connector::SourceFeed;
    use sluice_engine::{FanOut, Message, SourceContext};

    let brokers = kafka_brokers();
    let topic = format!("resume-{}", std::process::id());
    // One partition: the backfill joins the source's reader part way through the log.
    create_topic(&brokers, &topic, 1).await;
    let producer = producer(&brokers);
    let produce = |ids| produce_ids(producer.clone(), topic.clone(), ids, 1);
    // (Not a multiple of the batch size: the two readers' batches do not line up.)
    produce(0..2_005).await;

    let dir = tempfile::tempdir().unwrap();
    let lake = sluice_connectors::lake::Lake::open(dir.path().to_str().unwrap()).unwrap();
    let schema = Arc::new(arrow::datatypes::Schema::new(vec![
        arrow::datatypes::Field::new("id", arrow::datatypes::DataType::Int64, false),
    ]));
    let options = [
        ("connector", "kafka"),
        ("brokers", brokers.as_str()),
        ("topic", topic.as_str()),
        ("batch_size", "10"),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()));
    let config = sluice_connectors::registry(&lake)
        .source(
            sluice_engine::WithOptions::new("source `ids`", options),
            &schema,
        )
        .unwrap();
    let context = |output: FanOut, checkpoint| SourceContext {
        checkpoint,
        ..sluice_tests::source_context(output)
    };
    // The source's shared reader, and how a stream that starts later catches up with it.
    let open = || match config
        .open(
            "ids",
            Arc::clone(&schema),
            context(FanOut::new("ids"), None),
        )
        .unwrap()
    {
        SourceFeed::Shared {
            reader,
            backfill: Some(backfill),
        } => (reader, backfill),
        other => {
            panic!("a kafka source at `earliest` has a shared reader and backfills: {other:?}")
        }
    };
    let (reader, backfill) = open();
    let coordinator = Coordinator::open(
        Arc::new(lake.clone()),
        Duration::from_secs(3600),
        Arc::new(sluice_engine::checkpoint::NoFence),
    )
    .await
    .unwrap();
    let registration = |name: &str, writer: bool| StreamRegistration {
        name: name.into(),
        sql: format!("-- {name}"),
        readers: vec!["ids".into()],
        parallelism: 0,
        writer,
        interval: Duration::from_secs(3600),
        timeout: None,
    };

    // The source's reader reads everything so far (publishing to no one yet).
    let mut source_ck = coordinator
        .register(registration("source:ids", true))
        .await
        .unwrap();
    let hub = FanOut::new("ids");
    let shared_ctx = context(hub.clone(), source_ck.readers.remove("ids"));
    let read = Arc::clone(&shared_ctx.metrics);
    let shared = tokio::spawn(reader.run(shared_ctx));
    wait_for("the source's reader", Duration::from_secs(30), || async {
        (read.snapshot().rows_in == 2_005).then_some(())
    })
    .await;

    // A stream starts: its backfill reader reads from the start. Its output is read slowly,
    // so it is still backfilling when the checkpoint's barrier comes.
    let mut stream_ck = coordinator
        .register(registration("s", false))
        .await
        .unwrap();
    let out = FanOut::new("s");
    let mut rx = out.subscribe(4);
    let ctx = context(out.clone(), stream_ck.readers.remove("ids"));
    let cancel = ctx.cancel.clone();
    let progress = Arc::clone(&ctx.metrics);
    let first = tokio::spawn(backfill.reader().run(ctx));
    let mut before_barrier = vec![];
    for _ in 0..3 {
        before_barrier.extend(ids_of(&rx.recv().await.unwrap()));
    }
    // How far behind it is (`SHOW STREAMS` says so).
    let behind: i64 = progress
        .snapshot()
        .partition_lag
        .iter()
        .map(|(_, n)| n)
        .sum();
    assert!(behind > 1_500, "{behind} behind the source's reader");
    coordinator.trigger();
    let epoch = loop {
        match rx.recv().await.unwrap() {
            Message::Barrier(b) => break b.epoch,
            m => before_barrier.extend(ids_of(&m)),
        }
    };
    // (How many rows precede it depends on how soon the coordinator task runs after the
    // trigger; on a loaded machine that is over a thousand.)
    assert!(
        before_barrier.len() < 2_005,
        "the barrier came mid-backfill ({} rows before it)",
        before_barrier.len()
    );
    coordinator.wait_for(epoch).await;
    // A crash: the stream, the source's reader and the coordinator stop; what the stream
    // delivered after the barrier is lost with it. Records keep arriving.
    cancel.cancel();
    drop(rx); // (a reader waiting for room in its output sees the stream gone)
    first.await.unwrap().unwrap();
    shared.abort();
    let _ = shared.await;
    drop(coordinator);
    produce(2_005..3_000).await;

    // The restart: the source's reader resumes from the checkpoint, and the stream's
    // backfill from its own position there; it must deliver exactly what followed it.
    let coordinator = Coordinator::open(
        Arc::new(lake.clone()),
        Duration::from_secs(3600),
        Arc::new(sluice_engine::checkpoint::NoFence),
    )
    .await
    .unwrap();
    let (mut shared_reader, backfill) = open();
    let position = |ck: &sluice_engine::checkpoint::StreamCheckpoints| {
        ck.restored
            .as_ref()
            .and_then(|r| r.positions.get("ids").cloned())
            .expect("the checkpoint holds the reader's position")
    };
    let mut source_ck = coordinator
        .register(registration("source:ids", true))
        .await
        .unwrap();
    shared_reader.restore(&position(&source_ck)).unwrap();
    // Another stream reads the source slowly: the source's reader is still going through
    // the new records when the backfill joins it, so the backfill stops part way through a
    // batch of its own.
    let hub = FanOut::new("ids");
    let mut slow = hub.subscribe(1);
    tokio::spawn(async move {
        while slow.recv().await.is_some() {
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    });
    let shared = tokio::spawn(shared_reader.run(context(hub, source_ck.readers.remove("ids"))));
    let mut stream_ck = coordinator
        .register(registration("s", false))
        .await
        .unwrap();
    let mut reader = backfill.reader();
    reader.restore(&position(&stream_ck)).unwrap();
    let out = FanOut::new("s");
    let mut rx = out.subscribe(64);
    let ctx = context(out, stream_ck.readers.remove("ids"));
    let cancel = ctx.cancel.clone();
    let progress = Arc::clone(&ctx.metrics);
    let second = tokio::spawn(reader.run(ctx));
    let mut after = vec![];
    tokio::time::timeout(Duration::from_secs(60), async {
        while before_barrier.len() + after.len() < 3_000 {
            after.extend(ids_of(&rx.recv().await.expect("the reader goes on")));
        }
    })
    .await
    .expect("every record within a minute");
    // Nothing more comes (no duplicate after the last one).
    produce(3_000..3_001).await;
    let next = loop {
        let ids = ids_of(&rx.recv().await.unwrap());
        if !ids.is_empty() {
            break ids;
        }
    };
    assert_eq!(next, vec![3_000]);
    assert!(
        progress.snapshot().partition_lag.is_empty(),
        "joined: no longer behind"
    );
    let mut every: Vec<i64> = before_barrier.into_iter().chain(after).collect();
    every.sort_unstable();
    assert_eq!(every, (0..3_000).collect::<Vec<_>>(), "every record once");
    cancel.cancel();
    second.await.unwrap().unwrap();
    shared.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_created_while_a_kafka_source_runs_delivers_the_whole_topic_exactly_once() {
    use futures::StreamExt;
    use rdkafka::Message as _;

    let brokers = kafka_brokers();
    let (input, output) = (
        format!("sink-in-{}", std::process::id()),
        format!("sink-out-{}", std::process::id()),
    );
    create_topic(&brokers, &input, 2).await;
    create_topic(&brokers, &output, 2).await;
    let producer = producer(&brokers);
    let produce = |ids| produce_ids(producer.clone(), input.clone(), ids, 2);
    produce(0..300).await;
    let lake = tempfile::tempdir().unwrap();
    let server = start_server(lake.path()).await;
    let client = pg_connect(server.pg_addr).await;
    // The stream only makes checkpoints (which commit the sink's transactions) frequent.
    client
        .batch_execute(&format!(
            "CREATE SOURCE ids (id BIGINT NOT NULL)
             WITH (connector = 'kafka', brokers = '{brokers}', topic = '{input}', batch_size = '50');
             CREATE STREAM ticks WITH (checkpoint_interval = '300 ms') AS SELECT id FROM ids"
        ))
        .await
        .unwrap();
    wait_for("the source's reader", Duration::from_secs(30), || async {
        (source_events(&client, "ids").await == Some(300)).then_some(())
    })
    .await;
    client
        .batch_execute(&format!(
            "CREATE SINK ids_out FROM ids
             WITH (connector = 'kafka', brokers = '{brokers}', topic = '{output}', key = 'id', format = 'json')"
        ))
        .await
        .unwrap();
    let sinks = client.simple_query("SHOW SINKS").await.unwrap();
    let delivery = sinks.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get("delivery").map(str::to_string),
        _ => None,
    });
    assert_eq!(delivery.as_deref(), Some("exactly_once"));
    produce(300..400).await;

    let consumer = consume_from_beginning(&brokers, &output, 2);
    let mut stream = consumer.stream();
    let mut ids = vec![];
    tokio::time::timeout(Duration::from_secs(60), async {
        while ids.len() < 400 {
            let m = stream.next().await.unwrap().unwrap();
            let value: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
            ids.push(value["id"].as_i64().unwrap());
        }
    })
    .await
    .unwrap_or_else(|_| panic!("400 records on the topic, got {}", ids.len()));
    // A little longer: nothing is delivered twice.
    let extra = tokio::time::timeout(Duration::from_secs(2), stream.next()).await;
    assert!(extra.is_err(), "a record beyond the 400");
    ids.sort_unstable();
    assert_eq!(ids, (0..400).collect::<Vec<_>>(), "the whole topic, once");
    server.shutdown().await;
}

/// Every compression codec a producer may use (none, gzip, snappy, lz4, zstd) reads back
/// record for record: value, key, headers, partition and offset, with the source's own fetch
/// client and with librdkafka's. Records are produced all in flight together so that each
/// record batch holds many of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_of_every_compression_codec_read_back_with_their_metadata() {
    use rdkafka::message::{Header, OwnedHeaders};
    let brokers = kafka_brokers();
    let topic = format!("codecs-{}", std::process::id());
    create_topic(&brokers, &topic, 2).await;
    const CODECS: [&str; 5] = ["none", "gzip", "snappy", "lz4", "zstd"];
    const PER_CODEC: i64 = 400;
    for (c, codec) in CODECS.iter().enumerate() {
        let producer: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("acks", "all")
            .set("compression.type", *codec)
            .set("linger.ms", "20")
            .create()
            .expect("a producer");
        let sends = (0..PER_CODEC).map(|i| {
            let id = c as i64 * PER_CODEC + i;
            let (producer, topic) = (producer.clone(), topic.clone());
            async move {
                // Repetitive text so that compression has something to do.
                let value = format!(
                    r#"{{"id":{id},"codec":"{codec}","note":"{}"}}"#,
                    "abc".repeat(id as usize % 50)
                );
                let key = format!("k{id}");
                let headers = OwnedHeaders::new().insert(Header {
                    key: "codec",
                    value: Some(*codec),
                });
                producer
                    .send(
                        FutureRecord::to(&topic)
                            .partition((id % 2) as i32)
                            .key(&key)
                            .payload(&value)
                            .headers(headers),
                        Duration::from_secs(10),
                    )
                    .await
                    .expect("acknowledged");
            }
        });
        futures::future::join_all(sends.collect::<Vec<_>>()).await;
    }
    let total = CODECS.len() as i64 * PER_CODEC;

    let lake = tempfile::tempdir().unwrap();
    let server = start_server(lake.path()).await;
    let client = pg_connect(server.pg_addr).await;
    // Once with the source's own fetch client, once with librdkafka's.
    for fetcher in ["builtin", "librdkafka"] {
        client
            .batch_execute(&format!(
                "CREATE SOURCE records_{fetcher} (id BIGINT NOT NULL, codec TEXT NOT NULL, note TEXT NOT NULL,
                                        _kafka_key TEXT, _kafka_partition INT, _kafka_offset BIGINT,
                                        _kafka_headers TEXT)
                 WITH (connector = 'kafka', brokers = '{brokers}', topic = '{topic}', format = 'json',
                       fetcher = '{fetcher}');
                 CREATE STREAM all_{fetcher} WITH (rollover_interval = '100 ms') AS
                   SELECT * FROM records_{fetcher}"
            ))
            .await
            .unwrap();
    }
    for fetcher in ["builtin", "librdkafka"] {
        let all = format!("all_{fetcher}");
        wait_for(
            &format!("every record ({fetcher})"),
            Duration::from_secs(60),
            || async {
                (scalar(&client, &format!("SELECT count(*) FROM {all}")).await == total)
                    .then_some(())
            },
        )
        .await;
        // Each record once, with the key, header, note and partition it was produced with.
        let wrong = format!(
            "SELECT count(*) FROM {all}
             WHERE _kafka_key <> 'k' || CAST(id AS TEXT)
                OR _kafka_headers <> '{{\"codec\":\"' || codec || '\"}}'
                OR codec <> (ARRAY['none', 'gzip', 'snappy', 'lz4', 'zstd'])[id / {PER_CODEC} + 1]
                OR note <> repeat('abc', CAST(id % 50 AS INT))
                OR _kafka_partition <> id % 2"
        );
        assert_eq!(scalar(&client, &wrong).await, 0, "{fetcher}");
        assert_eq!(
            scalar(&client, &format!("SELECT count(DISTINCT id) FROM {all}")).await,
            total,
            "{fetcher}"
        );
        // Offsets 0, 1, 2, … in each partition, none skipped or repeated.
        let rows = client
            .query(
                &format!(
                    "SELECT _kafka_partition, count(DISTINCT _kafka_offset), min(_kafka_offset),
                            max(_kafka_offset)
                     FROM {all} GROUP BY _kafka_partition ORDER BY _kafka_partition"
                ),
                &[],
            )
            .await
            .unwrap();
        let got: Vec<(i32, i64, i64, i64)> = rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect();
        let half = total / 2;
        assert_eq!(
            got,
            [(0, half, 0, half - 1), (1, half, 0, half - 1)],
            "{fetcher}"
        );
        assert!(
            files_with_ext(
                &lake.path().join(format!("errors/records_{fetcher}")),
                "jsonl"
            )
            .is_empty(),
            "no record fails to decode ({fetcher})"
        );
    }
    server.shutdown().await;
}

/// Splits are explicit in the connector traits: a topic's partitions are its splits, and two
/// readers of one source opened for disjoint sets of them read disjoint records that together
/// are the topic — what handing some of a source's splits to another process needs. A set
/// naming no partition of the topic fails the reader with the partitions it has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_opened_for_disjoint_partitions_read_the_topic_once_between_them() {
    use std::collections::BTreeSet;
    use std::sync::Arc;

    use arrow::datatypes::{DataType, Field, Schema};
    use sluice_engine::connector::{SourceFeed, Splits};
    use sluice_engine::{FanOut, Message};

    let brokers = kafka_brokers();
    let topic = format!("splits-{}", std::process::id());
    create_topic(&brokers, &topic, 4).await;
    produce_ids(producer(&brokers), topic.clone(), 0..400, 4).await;

    let dir = tempfile::tempdir().unwrap();
    let lake = sluice_connectors::lake::Lake::open(dir.path().to_str().unwrap()).unwrap();
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("_kafka_partition", DataType::Int32, false),
    ]));
    let options = [
        ("connector", "kafka"),
        ("brokers", brokers.as_str()),
        ("topic", topic.as_str()),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()));
    let spec = sluice_connectors::registry(&lake)
        .source(
            sluice_engine::WithOptions::new("source `ids`", options),
            &schema,
        )
        .unwrap();
    assert_eq!(spec.splits().await.unwrap(), ["0", "1", "2", "3"]);

    let context = sluice_tests::source_context;
    let open = |splits: &Splits| match spec
        .open_splits(
            "ids",
            Arc::clone(&schema),
            context(FanOut::new("ids")),
            splits,
        )
        .unwrap()
    {
        SourceFeed::Shared { reader, .. } => reader,
        other => panic!("a kafka source has a shared reader: {other:?}"),
    };
    // Runs a shared reader for `splits` until it read `expect` rows: (id, partition) pairs.
    let read = |splits: Splits, expect: usize| {
        let output = FanOut::new("ids");
        let mut rx = output.subscribe(64);
        let ctx = context(output);
        let cancel = ctx.cancel.clone();
        let run = tokio::spawn(open(&splits).run(ctx));
        async move {
            let mut got = vec![];
            while got.len() < expect {
                tokio::select! {
                    m = rx.recv() => {
                        if let Some(Message::Data(b)) = m {
                            let partitions = b.column(1).as_any().downcast_ref::<arrow::array::Int32Array>().unwrap();
                            got.extend(ids_of(&Message::Data(b.clone())).into_iter().zip(partitions.values().iter().copied()));
                        }
                    }
                    r = tokio::time::sleep(Duration::from_secs(30)) => panic!("{splits:?}: {} of {expect} rows after 30 s ({r:?})", got.len()),
                }
            }
            cancel.cancel();
            let _ = run.await;
            got
        }
    };
    let even = read(Splits::only(["0", "2"]), 200).await;
    let odd = read(Splits::only(["1", "3"]), 200).await;
    assert!(
        even.iter()
            .all(|(id, p)| [0, 2].contains(p) && id % 4 == *p as i64)
    );
    assert!(
        odd.iter()
            .all(|(id, p)| [1, 3].contains(p) && id % 4 == *p as i64)
    );
    let all: BTreeSet<i64> = even.iter().chain(&odd).map(|(id, _)| *id).collect();
    assert_eq!(all, (0..400).collect(), "every record once between them");
    assert_eq!(even.len() + odd.len(), 400);

    // A set naming none of the partitions: the reader fails, saying which there are.
    let err = open(&Splits::only(["7"]))
        .run(context(FanOut::new("ids")))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("names none of the topic's partitions (0, 1, 2, 3)"),
        "{err}"
    );
}
