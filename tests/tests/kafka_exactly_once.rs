//! The exactly-once Kafka sink's commit phase against a real broker (tansu, started by
//! `scripts/services.sh`): epochs a crashed run had committed but not delivered are sent
//! after the restart, and rows the crashed run had already put on the topic are not sent
//! again. (The crash tests in `server/tests/crash.rs` kill a real server; this one builds the
//! moment between "checkpoint committed" and "transaction committed" on purpose.)

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arrow::array::{Int64Array, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use rdkafka::Message as _;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureRecord, Producer};
use sluice_connectors::formats::RecordFormat;
use sluice_connectors::kafka::{
    DELIVERY_HEADER, Delivery, KafkaSink, KafkaSinkConfig, SinkCheckpoint,
};
use sluice_connectors::lake::Lake;
use sluice_engine::Sink;
use sluice_engine::checkpoint::{
    CheckpointStore, Coordinator, NoFence, StreamRegistration, write_ipc,
};
use sluice_tests::{create_topic, kafka_brokers, producer};

const PARTITIONS: i32 = 3;

fn rows(n: i64) -> RecordBatch {
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("customer", DataType::Utf8, false),
    ]));
    RecordBatch::try_new(
        schema,
        vec![
            Arc::new(Int64Array::from_iter_values(0..n)),
            Arc::new(StringArray::from_iter_values(
                (0..n).map(|i| format!("c{}", i % 7)),
            )),
        ],
    )
    .unwrap()
}

fn end_offsets(brokers: &str, topic: &str) -> BTreeMap<i32, i64> {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    (0..PARTITIONS)
        .map(|p| {
            let (_, high) = consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .unwrap();
            (p, high)
        })
        .collect()
}

/// Every record on `topic`: (its delivery header, its value).
fn on_topic(brokers: &str, topic: &str) -> Vec<(String, serde_json::Value)> {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("check-{topic}"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(topic, p, rdkafka::Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut open: std::collections::BTreeSet<i32> = (0..PARTITIONS).collect();
    let mut out = vec![];
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !open.is_empty() {
        assert!(std::time::Instant::now() < deadline, "no end of {topic}");
        match consumer.poll(Duration::from_millis(500)) {
            None => {}
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                open.remove(&p);
            }
            Some(Err(e)) => panic!("{e}"),
            Some(Ok(m)) => {
                let tag = m
                    .headers()
                    .and_then(|h| {
                        h.iter()
                            .find(|h| h.key == DELIVERY_HEADER)
                            .and_then(|h| h.value)
                            .map(|v| String::from_utf8(v.to_vec()).unwrap())
                    })
                    .unwrap_or_default();
                out.push((tag, serde_json::from_slice(m.payload().unwrap()).unwrap()));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn epochs_owed_at_a_crash_are_delivered_once_and_rows_already_sent_are_not_resent() {
    let brokers = kafka_brokers();
    let topic = format!("eo-sink-{}", std::process::id());
    create_topic(&brokers, &topic, PARTITIONS).await;
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::open(dir.path().to_str().unwrap()).unwrap();
    let store: Arc<dyn CheckpointStore> = Arc::new(lake.clone());

    // The crashed run: checkpoint 8 was the last committed; epochs 7 and 8 of sink `out`
    // were committed but not delivered. Delivery of 7 had begun: the topic's end offsets were
    // saved, and rows 0..10 of its 25 reached the topic (a broker that does not isolate
    // transactions shows them; here a plain producer writes them, with the sink's headers).
    store
        .put(
            "_sluice/checkpoints/00000000000000000008/manifest.json",
            r#"{"version":1,"epoch":8,"completed_at_micros":0,"streams":{}}"#.into(),
        )
        .await
        .unwrap();
    let pending = "_sluice/sinks/out/pending";
    store
        .put(
            &format!("{pending}/00000000000000000007.arrow"),
            write_ipc(&rows(25)).unwrap(),
        )
        .await
        .unwrap();
    store
        .put(
            &format!("{pending}/00000000000000000008.arrow"),
            write_ipc(&rows(4)).unwrap(),
        )
        .await
        .unwrap();
    let before = serde_json::to_vec(&end_offsets(&brokers, &topic)).unwrap();
    store
        .put(
            &format!("{pending}/00000000000000000007.offsets.json"),
            before.into(),
        )
        .await
        .unwrap();
    let p = producer(&brokers);
    let send = |tag: String, id: i64| {
        let p = p.clone();
        let topic = topic.clone();
        async move {
            let value = format!(r#"{{"id":{id},"customer":"c{}"}}"#, id % 7);
            let key = format!("c{}", id % 7);
            p.send(
                FutureRecord::to(&topic).key(&key).payload(&value).headers(
                    OwnedHeaders::new().insert(Header {
                        key: DELIVERY_HEADER,
                        value: Some(tag.as_bytes()),
                    }),
                ),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
        }
    };
    for i in 0..10 {
        send(format!("out/00000000000000000007/{i}"), i).await;
    }
    // Records of another sink and of another epoch with the same row numbers do not count.
    send("other/00000000000000000007/12".into(), 12).await;
    send("out/00000000000000000006/13".into(), 13).await;
    p.flush(Duration::from_secs(10)).unwrap();

    // The restart: the sink registers with the coordinator and finishes what is owed.
    let coordinator = Coordinator::open(
        Arc::clone(&store),
        Duration::from_secs(3600),
        Arc::new(NoFence),
    )
    .await
    .unwrap();
    let registered = coordinator
        .register(StreamRegistration {
            name: "out".into(),
            sql: "CREATE SINK out FROM s".into(),
            readers: vec![],
            parallelism: 0,
            writer: true,
            interval: Duration::from_secs(3600),
            timeout: None,
        })
        .await
        .unwrap();
    // Manifest 8 was the last; opening claims 9 (fencing), so this one takes part from 10.
    assert_eq!(registered.writer.first_epoch(), 10);
    let config = KafkaSinkConfig {
        brokers: brokers.clone(),
        topic: topic.clone(),
        key: Some("customer".into()),
        format: RecordFormat::Json,
        headers: vec![],
        properties: vec![],
        delivery: Some(Delivery::ExactlyOnce),
        transactional_id: None,
    };
    let delivered: Arc<AtomicU64> = Arc::default();
    let mut sink = KafkaSink::exactly_once(
        "out",
        config,
        SinkCheckpoint {
            store: Arc::clone(&store),
            commits: coordinator.commit_watch(),
            handle: registered.writer,
            delivered: Arc::clone(&delivered),
        },
    )
    .unwrap();
    // Its input ends at once: closing waits until everything owed is delivered.
    tokio::time::timeout(Duration::from_secs(120), sink.close())
        .await
        .expect("delivered within 2 minutes")
        .unwrap();

    let records = on_topic(&brokers, &topic);
    let mut per_tag: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for (tag, value) in &records {
        per_tag
            .entry(tag.clone())
            .or_default()
            .push(value["id"].as_i64().unwrap());
    }
    for (epoch, n) in [("00000000000000000007", 25), ("00000000000000000008", 4)] {
        for i in 0..n {
            let tag = format!("out/{epoch}/{i}");
            assert_eq!(
                per_tag.get(&tag).map(Vec::as_slice),
                Some(&[i][..]),
                "{tag}: once, carrying row {i}"
            );
        }
    }
    assert_eq!(records.len(), 25 + 4 + 2, "nothing else: {per_tag:?}");
    // Both epochs count as delivered, once each, whole.
    assert_eq!(delivered.load(Ordering::Relaxed), 25 + 4);
    // Delivered epochs are forgotten.
    assert_eq!(store.list(pending).await.unwrap(), Vec::<String>::new());
}
