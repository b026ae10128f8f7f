//! Avro over Kafka against real services started by `scripts/services.sh`: a Kafka-protocol
//! broker (tansu) and a Confluent-compatible schema registry. Records are encoded by hand from
//! the Avro specification and framed the Confluent way (magic byte, schema id), produced with
//! a real client, and must land in windows equal to the batch answer; writer schemas evolve
//! (fields reordered, added, dropped; other timestamp units); undecodable records land in the
//! errors zone.

use std::time::Duration;

use rdkafka::producer::FutureRecord;
use sluice_tests::avro::{confluent, double, long, string};
use sluice_tests::{
    consume_from_beginning, create_topic, error_lines, files_with_ext, kafka_brokers, pg_connect,
    producer, push_events, register_schema, scalar, schema_registry, start_server, wait_for,
};

/// 2024-05-01T08:00:00Z in ms.
const BASE_MS: i64 = 1_714_550_400_000;

const V1: &str = r#"{"type":"record","name":"Payment","namespace":"shop","fields":[
    {"name":"payment_id","type":"string"},
    {"name":"amount","type":"double"},
    {"name":"ts","type":{"type":"long","logicalType":"timestamp-millis"}}]}"#;

/// Fields reordered, `customer` added, `channel` that the source does not declare, and event
/// time in microseconds.
const V2: &str = r#"{"type":"record","name":"Payment","namespace":"shop","fields":[
    {"name":"ts","type":{"type":"long","logicalType":"timestamp-micros"}},
    {"name":"channel","type":"string"},
    {"name":"payment_id","type":"string"},
    {"name":"customer","type":["null","string"],"default":null},
    {"name":"amount","type":"double"}]}"#;

/// Lacks `payment_id`, which the source declares NOT NULL.
const NO_ID: &str = r#"{"type":"record","name":"Payment","namespace":"shop","fields":[
    {"name":"amount","type":"double"},
    {"name":"ts","type":{"type":"long","logicalType":"timestamp-millis"}}]}"#;

fn v1(id: u32, payment: &str, amount: f64, ts_ms: i64) -> Vec<u8> {
    let mut out = confluent(id);
    string(&mut out, payment);
    double(&mut out, amount);
    long(&mut out, ts_ms);
    out
}

fn v2(id: u32, payment: &str, customer: Option<&str>, amount: f64, ts_ms: i64) -> Vec<u8> {
    let mut out = confluent(id);
    long(&mut out, ts_ms * 1000);
    string(&mut out, "web");
    string(&mut out, payment);
    match customer {
        None => long(&mut out, 0),
        Some(c) => {
            long(&mut out, 1);
            string(&mut out, c);
        }
    }
    double(&mut out, amount);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn avro_records_resolve_their_writer_schemas_and_land_in_windows() {
    let brokers = kafka_brokers();
    let registry = schema_registry();
    let topic = format!("payments-{}", std::process::id());
    let subject = format!("{topic}-value");
    create_topic(&brokers, &topic, 2).await;
    let id1 = register_schema(&registry, &subject, V1).await;
    let id2 = register_schema(&registry, &subject, V2).await;
    let no_id = register_schema(&registry, &format!("{topic}-other"), NO_ID).await;
    assert!(id1 != id2 && id2 != no_id);

    let producer = producer(&brokers);
    let send = |partition: i32, value: Vec<u8>| {
        let producer = producer.clone();
        let topic = topic.clone();
        async move {
            producer
                .send(
                    FutureRecord::<(), _>::to(&topic)
                        .partition(partition)
                        .payload(&value),
                    Duration::from_secs(10),
                )
                .await
                .expect("the broker acknowledges");
        }
    };
    // 200 payments over 100 s of event time: even ones written with V1, odd ones with V2.
    for i in 0..200i64 {
        let ts = BASE_MS + i * 500;
        let payment = format!("p{i}");
        let value = if i % 2 == 0 {
            v1(id1, &payment, i as f64, ts)
        } else {
            let customer = format!("c{}", i % 5);
            v2(id2, &payment, Some(&customer), i as f64, ts)
        };
        send((i % 2) as i32, value).await;
    }
    // Bad records, all in partition 0 (offsets 100..=103).
    send(0, b"{\"not\": \"avro\"}".to_vec()).await;
    send(0, v1(9999, "p-unknown", 1.0, BASE_MS)).await;
    let mut truncated = v1(id1, "p-truncated", 1.0, BASE_MS);
    truncated.truncate(9);
    send(0, truncated).await;
    let mut lacking = confluent(no_id);
    double(&mut lacking, 1.0);
    long(&mut lacking, BASE_MS);
    send(0, lacking).await;

    let lake = tempfile::tempdir().unwrap();
    let server = start_server(lake.path()).await;
    let client = pg_connect(server.pg_addr).await;
    client
        .batch_execute(&format!(
            "CREATE SOURCE payments (payment_id TEXT NOT NULL, customer TEXT, amount DOUBLE NOT NULL,
                                     ts TIMESTAMP NOT NULL, WATERMARK FOR ts AS ts - INTERVAL '5 seconds')
             WITH (connector = 'kafka', brokers = '{brokers}', topic = '{topic}', format = 'avro',
                   schema_registry = '{registry}', raw_zone = 'true');
             CREATE STREAM all_payments WITH (rollover_interval = '100 ms') AS SELECT * FROM payments;
             CREATE STREAM totals_10s WITH (rollover_interval = '100 ms') AS
               SELECT window_start, window_end, count(*) AS n, sum(amount) AS total,
                      count(customer) AS with_customer
               FROM TUMBLE(payments, ts, INTERVAL '10 seconds') GROUP BY window_start, window_end"
        ))
        .await
        .unwrap();
    // Move both partitions' event time far ahead so every window closes.
    for p in 0..2 {
        send(p, v1(id1, "ahead", 0.0, BASE_MS + 3_600_000)).await;
    }

    wait_for("every window", Duration::from_secs(60), || async {
        let n = scalar(&client, "SELECT coalesce(sum(n), 0) FROM totals_10s").await;
        (n == 200).then_some(())
    })
    .await;
    wait_for("every payment", Duration::from_secs(60), || async {
        (scalar(&client, "SELECT count(*) FROM all_payments").await == 202).then_some(())
    })
    .await;
    // Both writer schemas resolved onto the declared columns: event time in either unit,
    // `customer` NULL where the writer schema has no such field.
    let row = client
        .query_one(
            "SELECT payment_id, customer, amount, CAST(ts AS TEXT) FROM all_payments WHERE payment_id = 'p7'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, Option<&str>>(1), Some("c2"));
    assert_eq!(row.get::<_, f64>(2), 7.0);
    assert_eq!(row.get::<_, &str>(3), "2024-05-01T08:00:03.500Z");
    let row = client
        .query_one(
            "SELECT customer, CAST(ts AS TEXT) FROM all_payments WHERE payment_id = 'p8'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, Option<&str>>(0), None);
    assert_eq!(row.get::<_, &str>(1), "2024-05-01T08:00:04Z");
    // Windows equal the batch answer over the same payments.
    let diff = "WITH b AS (SELECT window_start, window_end, count(*) AS n, sum(amount) AS total,
                                  count(customer) AS with_customer
                           FROM TUMBLE(all_payments, ts, INTERVAL '10 seconds')
                           WHERE payment_id <> 'ahead' GROUP BY window_start, window_end),
                     s AS (SELECT window_start, window_end, n, total, with_customer FROM totals_10s)
                SELECT (SELECT count(*) FROM (SELECT * FROM s EXCEPT ALL SELECT * FROM b) AS x)
                     + (SELECT count(*) FROM (SELECT * FROM b EXCEPT ALL SELECT * FROM s) AS y)";
    assert_eq!(scalar(&client, diff).await, 0);
    assert_eq!(
        scalar(&client, "SELECT sum(with_customer) FROM totals_10s").await,
        100
    );

    // The bad records, each with its reason and origin, payloads in base64.
    let errors = wait_for("the bad records", Duration::from_secs(30), || async {
        let lines = error_lines(lake.path(), "payments");
        (lines.len() >= 4).then_some(lines)
    })
    .await;
    assert_eq!(errors.len(), 4, "{errors:?}");
    let reason_at = |offset: i64| -> String {
        let origin = format!("kafka topic {topic} partition 0 offset {offset}");
        let line = errors
            .iter()
            .find(|l| l["origin"] == origin.as_str())
            .unwrap_or_else(|| panic!("no error from {origin}: {errors:?}"));
        assert_eq!(line["payload_encoding"], "base64");
        line["reason"].as_str().unwrap().to_string()
    };
    assert!(reason_at(100).contains("not Confluent-framed Avro"));
    assert!(reason_at(101).contains("schema id 9999 is not in the schema registry"));
    assert!(reason_at(102).contains("does not decode"));
    assert!(reason_at(103).contains("`payment_id` is NOT NULL"));
    // The payload is the value as produced, base64 encoded.
    let first = errors
        .iter()
        .find(|l| {
            l["reason"]
                .as_str()
                .unwrap()
                .contains("not Confluent-framed")
        })
        .unwrap();
    use base64::Engine as _;
    let payload = base64::engine::general_purpose::STANDARD
        .decode(first["payload"].as_str().unwrap())
        .unwrap();
    assert_eq!(payload, b"{\"not\": \"avro\"}");

    // Raw values archived as received, each after its 4-byte length.
    let mut raw = 0;
    for f in files_with_ext(&lake.path().join("raw/payments"), "avro-frames") {
        let bytes = std::fs::read(f).unwrap();
        let mut pos = 0;
        while pos < bytes.len() {
            let len = u32::from_be_bytes(bytes[pos..pos + 4].try_into().unwrap()) as usize;
            pos += 4 + len;
            raw += 1;
        }
        assert_eq!(pos, bytes.len());
    }
    assert_eq!(raw, 206, "every record value archived once");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_avro_sink_registers_its_schema_and_its_records_read_back() {
    use futures::StreamExt;
    use rdkafka::Message as _;
    use sluice_tests::avro::{read_long, read_string};

    let brokers = kafka_brokers();
    let registry = schema_registry();
    let topic = format!("big-payments-{}", std::process::id());
    create_topic(&brokers, &topic, 2).await;
    let lake = tempfile::tempdir().unwrap();
    let server = start_server(lake.path()).await;
    let client = pg_connect(server.pg_addr).await;
    client
        .batch_execute(&format!(
            "CREATE SOURCE orders (order_id TEXT NOT NULL, customer TEXT, amount BIGINT NOT NULL, ts TIMESTAMP NOT NULL)
             WITH (connector = 'http');
             CREATE STREAM big_orders AS SELECT order_id, customer, amount, ts FROM orders WHERE amount >= 100;
             CREATE SINK big_out FROM big_orders
             WITH (connector = 'kafka', brokers = '{brokers}', topic = '{topic}', key = 'order_id',
                   format = 'avro', schema_registry = '{registry}')"
        ))
        .await
        .unwrap();
    // 60 orders, every other one big; every third without a customer.
    let body: Vec<String> = (0..60)
        .map(|i| {
            let customer = if i % 3 == 0 { "null".to_string() } else { format!("\"c{}\"", i % 7) };
            format!(
                r#"{{"order_id":"o{i}","customer":{customer},"amount":{},"ts":"2024-05-01T08:00:{:02}.250Z"}}"#,
                if i % 2 == 0 { 100 + i } else { 1 },
                i
            )
        })
        .collect();
    assert_eq!(push_events(server.http_addr, "orders", &body).await, 200);

    // The registered schema: a record named after the sink, the stream's columns in order.
    let latest: serde_json::Value =
        wait_for("the registered schema", Duration::from_secs(30), || async {
            let r = reqwest::get(format!("{registry}/subjects/{topic}-value/versions/latest"))
                .await
                .ok()?;
            r.status().is_success().then_some(())?;
            r.json().await.ok()
        })
        .await;
    let id = latest["id"].as_u64().unwrap() as u32;
    let schema: serde_json::Value =
        serde_json::from_str(latest["schema"].as_str().unwrap()).unwrap();
    assert_eq!(schema["name"], "big_out");
    assert_eq!(schema["namespace"], "sluice");
    let fields = schema["fields"].as_array().unwrap();
    let names: Vec<&str> = fields.iter().map(|f| f["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["order_id", "customer", "amount", "ts"]);
    // The branch of `customer`'s union that holds the string.
    let customer_branches = fields[1]["type"].as_array().expect("a nullable union");
    let string_branch = customer_branches
        .iter()
        .position(|t| t == "string")
        .expect("a string branch") as i64;

    // Read back with a real consumer; decode each record by hand.
    let consumer = consume_from_beginning(&brokers, &topic, 2);
    let mut stream = consumer.stream();
    let mut seen = std::collections::BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while seen.len() < 30 {
        let m = tokio::time::timeout_at(deadline, stream.next())
            .await
            .expect("30 records within 60 s")
            .unwrap()
            .unwrap();
        let value = m.payload().unwrap();
        assert_eq!(value[0], 0, "the Confluent magic byte");
        assert_eq!(u32::from_be_bytes(value[1..5].try_into().unwrap()), id);
        let mut pos = 5;
        let order = read_string(value, &mut pos);
        assert_eq!(m.key(), Some(order.as_bytes()));
        let i: i64 = order[1..].parse().unwrap();
        let customer = if read_long(value, &mut pos) == string_branch {
            Some(read_string(value, &mut pos))
        } else {
            None
        };
        assert_eq!(customer, (i % 3 != 0).then(|| format!("c{}", i % 7)));
        assert_eq!(read_long(value, &mut pos), 100 + i);
        // timestamp-micros
        assert_eq!(
            read_long(value, &mut pos),
            1_714_550_400_000_000 + i * 1_000_000 + 250_000
        );
        assert_eq!(pos, value.len(), "nothing after the record");
        assert!(seen.insert(i), "a duplicate");
    }

    // And Sluice reads its own output back through the registry.
    client
        .batch_execute(&format!(
            "CREATE SOURCE big_back (order_id TEXT NOT NULL, customer TEXT, amount BIGINT NOT NULL, ts TIMESTAMP NOT NULL)
             WITH (connector = 'kafka', brokers = '{brokers}', topic = '{topic}', format = 'avro',
                   schema_registry = '{registry}');
             CREATE STREAM back WITH (rollover_interval = '100 ms') AS SELECT * FROM big_back"
        ))
        .await
        .unwrap();
    wait_for("the records read back", Duration::from_secs(60), || async {
        (scalar(&client, "SELECT count(*) FROM back").await == 30).then_some(())
    })
    .await;
    let diff = "SELECT (SELECT count(*) FROM (SELECT * FROM back EXCEPT ALL SELECT * FROM big_orders) AS x)
                     + (SELECT count(*) FROM (SELECT * FROM big_orders EXCEPT ALL SELECT * FROM back) AS y)";
    wait_for(
        "the stream's rows in the lake",
        Duration::from_secs(30),
        || async { (scalar(&client, diff).await == 0).then_some(()) },
    )
    .await;
    server.shutdown().await;
}
