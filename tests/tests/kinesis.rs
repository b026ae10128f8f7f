//! Kinesis against a real Kinesis API server (kinesalite, started by `scripts/services.sh`):
//! records put by the AWS SDK into a stream whose shard is split, then merged back, midway
//! flow through a Sluice stream into a Kinesis sink; read back from the sink's stream, every
//! record is there once, in order per key.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::{PutRecordsRequestEntry, ShardIteratorType, StreamStatus};
use sluice_tests::{kinesis_client, kinesis_endpoint, pg_connect, scalar, start_server, wait_for};

async fn create_stream(client: &Client, name: &str, shards: i32) {
    client
        .create_stream()
        .stream_name(name)
        .shard_count(shards)
        .send()
        .await
        .expect("CreateStream");
    wait_active(client, name).await;
}

async fn wait_active(client: &Client, name: &str) {
    wait_for(
        &format!("stream {name} active"),
        Duration::from_secs(30),
        || async {
            let d = client
                .describe_stream_summary()
                .stream_name(name)
                .send()
                .await
                .ok()?;
            let status = d.stream_description_summary()?.stream_status().clone();
            (status == StreamStatus::Active).then_some(())
        },
    )
    .await;
}

/// Puts shipments `range` (order `o{i % 12}`, one second apart) as JSON records keyed by order.
async fn put_shipments(client: &Client, stream: &str, range: std::ops::Range<i64>) {
    let entries: Vec<PutRecordsRequestEntry> = range
        .map(|i| {
            let order = format!("o{}", i % 12);
            let ts = chrono::DateTime::from_timestamp(1_714_550_400 + i, 0).unwrap();
            let json = format!(
                r#"{{"order_id":"{order}","seq":{i},"status":"step {i}","ts":"{}"}}"#,
                ts.to_rfc3339()
            );
            PutRecordsRequestEntry::builder()
                .data(Blob::new(json))
                .partition_key(order)
                .build()
                .unwrap()
        })
        .collect();
    let out = client
        .put_records()
        .stream_name(stream)
        .set_records(Some(entries))
        .send()
        .await
        .expect("PutRecords");
    assert_eq!(out.failed_record_count().unwrap_or(0), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_cross_a_shard_split_and_a_kinesis_sink_once_and_in_key_order() {
    let endpoint = kinesis_endpoint();
    let client = kinesis_client();
    let pid = std::process::id();
    let (input, output) = (format!("shipments-{pid}"), format!("shipments-out-{pid}"));
    create_stream(&client, &input, 2).await;
    create_stream(&client, &output, 1).await;

    // The pipeline runs before the first record: the sink reads stream `enriched` from when
    // it is created, so it must exist before `enriched` has rows.
    let lake = tempfile::tempdir().unwrap();
    let server = start_server(lake.path()).await;
    let pg = pg_connect(server.pg_addr).await;
    pg.batch_execute(&format!(
        "CREATE SOURCE shipments (order_id TEXT NOT NULL, seq BIGINT NOT NULL, status TEXT,
                                  ts TIMESTAMP NOT NULL, _kinesis_shard_id TEXT,
                                  WATERMARK FOR ts AS ts - INTERVAL '5 seconds')
         WITH (connector = 'kinesis', stream = '{input}', endpoint = '{endpoint}',
               start = 'trim_horizon', poll_interval = '100 ms');
         CREATE STREAM all_shipments WITH (rollover_interval = '100 ms') AS SELECT * FROM shipments;
         CREATE STREAM enriched AS SELECT order_id, seq, upper(status) AS status, ts FROM shipments;
         CREATE SINK shipments_out FROM enriched
         WITH (connector = 'kinesis', stream = '{output}', partition_key = 'order_id',
               endpoint = '{endpoint}')"
    ))
    .await
    .unwrap();

    // 60 shipments, then shard 0 splits in two, then 60 more (those of shard 0's keys land
    // in its children).
    put_shipments(&client, &input, 0..60).await;
    let shards = client
        .list_shards()
        .stream_name(&input)
        .send()
        .await
        .unwrap();
    let parent = &shards.shards()[0];
    let range = parent.hash_key_range().unwrap();
    let (lo, hi): (u128, u128) = (
        range.starting_hash_key().parse().unwrap(),
        range.ending_hash_key().parse().unwrap(),
    );
    client
        .split_shard()
        .stream_name(&input)
        .shard_to_split(parent.shard_id())
        .new_starting_hash_key((lo + (hi - lo) / 2).to_string())
        .send()
        .await
        .expect("SplitShard");
    wait_active(&client, &input).await;
    put_shipments(&client, &input, 60..120).await;
    // Then the two children merge back into one, and 60 more.
    let listed = client
        .list_shards()
        .stream_name(&input)
        .send()
        .await
        .unwrap();
    let children: Vec<&str> = listed
        .shards()
        .iter()
        .filter(|s| s.parent_shard_id() == Some(parent.shard_id()))
        .map(|s| s.shard_id())
        .collect();
    assert_eq!(children.len(), 2);
    client
        .merge_shards()
        .stream_name(&input)
        .shard_to_merge(children[0])
        .adjacent_shard_to_merge(children[1])
        .send()
        .await
        .expect("MergeShards");
    wait_active(&client, &input).await;
    put_shipments(&client, &input, 120..180).await;
    let all_shards = client
        .list_shards()
        .stream_name(&input)
        .send()
        .await
        .unwrap();
    assert_eq!(
        all_shards.shards().len(),
        5,
        "two shards, one split in two, merged back"
    );

    wait_for("every shipment", Duration::from_secs(60), || async {
        (scalar(&pg, "SELECT count(*) FROM all_shipments").await == 180).then_some(())
    })
    .await;
    assert_eq!(
        scalar(&pg, "SELECT count(DISTINCT seq) FROM all_shipments").await,
        180
    );
    // The children of the split were read, as well as the parent.
    let shards_read = scalar(
        &pg,
        "SELECT count(DISTINCT _kinesis_shard_id) FROM all_shipments",
    )
    .await;
    assert!(shards_read >= 4, "records from {shards_read} shards");

    // Read the sink's stream back with the SDK: every shipment once, each key in order.
    let shard = client
        .list_shards()
        .stream_name(&output)
        .send()
        .await
        .unwrap()
        .shards()[0]
        .shard_id()
        .to_string();
    let mut iterator = client
        .get_shard_iterator()
        .stream_name(&output)
        .shard_id(&shard)
        .shard_iterator_type(ShardIteratorType::TrimHorizon)
        .send()
        .await
        .unwrap()
        .shard_iterator()
        .unwrap()
        .to_string();
    let mut by_key: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while seen.len() < 180 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} records in the sink's stream",
            seen.len()
        );
        let out = client
            .get_records()
            .shard_iterator(&iterator)
            .send()
            .await
            .unwrap();
        for r in out.records() {
            let v: serde_json::Value = serde_json::from_slice(r.data().as_ref()).unwrap();
            let (key, seq) = (v["order_id"].as_str().unwrap(), v["seq"].as_i64().unwrap());
            assert_eq!(r.partition_key(), Some(key));
            assert_eq!(v["status"], format!("STEP {seq}"));
            assert!(seen.insert(seq), "seq {seq} delivered twice");
            by_key.entry(key.to_string()).or_default().push(seq);
        }
        iterator = out.next_shard_iterator().unwrap().to_string();
        if out.records().is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    for (key, seqs) in &by_key {
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "{key} out of order: {seqs:?}"
        );
    }
    assert_eq!(by_key.len(), 12);

    // Lag from MillisBehindLatest: caught up.
    wait_for("lag reported", Duration::from_secs(30), || async {
        let shown = pg.simple_query("SHOW SOURCES").await.unwrap();
        shown.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => (r.get("lag") == Some("0")).then_some(()),
            _ => None,
        })
    })
    .await;
    server.shutdown().await;
}

/// Lines in the files with extension `ext` under `dir`.
fn lines_under(dir: &std::path::Path, ext: &str) -> usize {
    sluice_tests::files_with_ext(dir, ext)
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap().lines().count())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_resumes_every_shard_from_the_checkpoint() {
    let client = kinesis_client();
    let endpoint = kinesis_endpoint();
    let input = format!("resume-{}", std::process::id());
    create_stream(&client, &input, 2).await;
    put_shipments(&client, &input, 0..60).await;
    let lake = tempfile::tempdir().unwrap();
    let definitions = format!(
        "CREATE SOURCE shipments (order_id TEXT NOT NULL, seq BIGINT NOT NULL, status TEXT,
                                  ts TIMESTAMP NOT NULL)
         WITH (connector = 'kinesis', stream = '{input}', endpoint = '{endpoint}',
               start = 'trim_horizon', poll_interval = '100 ms', raw_zone = 'true');
         CREATE STREAM all_shipments WITH (rollover_interval = '100 ms') AS SELECT * FROM shipments"
    );
    let server = start_server(lake.path()).await;
    let pg = pg_connect(server.pg_addr).await;
    pg.batch_execute(&definitions).await.unwrap();
    wait_for("the first shipments", Duration::from_secs(60), || async {
        (scalar(&pg, "SELECT count(*) FROM all_shipments").await == 60).then_some(())
    })
    .await;
    server.shutdown().await;

    // More records while it is down; the restarted server reads on from its checkpoint.
    put_shipments(&client, &input, 60..100).await;
    let server = start_server(lake.path()).await;
    let pg = pg_connect(server.pg_addr).await;
    wait_for("every shipment", Duration::from_secs(60), || async {
        (scalar(&pg, "SELECT count(*) FROM all_shipments").await >= 100).then_some(())
    })
    .await;
    // A moment for anything read twice to show.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        scalar(&pg, "SELECT count(*) FROM all_shipments").await,
        100,
        "every shipment exactly once"
    );
    assert_eq!(
        scalar(&pg, "SELECT count(DISTINCT seq) FROM all_shipments").await,
        100
    );
    let raw = wait_for("the raw zone", Duration::from_secs(30), || async {
        let n = lines_under(&lake.path().join("raw/shipments"), "ndjson");
        (n >= 100).then_some(n)
    })
    .await;
    assert_eq!(raw, 100, "the raw zone holds every record once");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_stream_fails_its_readers_and_open_windows_are_not_published_half_full() {
    let client = kinesis_client();
    let endpoint = kinesis_endpoint();
    let input = format!("deleted-{}", std::process::id());
    create_stream(&client, &input, 1).await;
    // One record a second for 60 s: with 5 s of watermark delay, the windows up to 00:50 close
    // and the one from 00:50 stays open.
    put_shipments(&client, &input, 0..60).await;
    let lake = tempfile::tempdir().unwrap();
    let definitions = format!(
        "CREATE SOURCE shipments (order_id TEXT NOT NULL, seq BIGINT NOT NULL, status TEXT,
                                  ts TIMESTAMP NOT NULL, WATERMARK FOR ts AS ts - INTERVAL '5 seconds')
         WITH (connector = 'kinesis', stream = '{input}', endpoint = '{endpoint}',
               start = 'trim_horizon', poll_interval = '100 ms');
         CREATE STREAM per_order WITH (checkpoint_interval = '200 ms') AS
         SELECT order_id, window_start, count(*) AS n
         FROM TUMBLE(shipments, ts, INTERVAL '10 seconds')
         GROUP BY order_id, window_start, window_end"
    );
    let server = start_server(lake.path()).await;
    let pg = pg_connect(server.pg_addr).await;
    pg.batch_execute(&definitions).await.unwrap();
    let closed = "SELECT count(*) FROM per_order";
    wait_for("the closed windows", Duration::from_secs(60), || async {
        (scalar(&pg, closed).await == 50).then_some(())
    })
    .await;

    client
        .delete_stream()
        .stream_name(&input)
        .send()
        .await
        .expect("DeleteStream");
    let status = sluice_tests::wait_stream_done(&pg, "per_order").await;
    assert!(
        status.starts_with("failed") && status.contains("no longer exists"),
        "{status}"
    );
    // A moment for anything published late to show.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        scalar(&pg, closed).await,
        50,
        "the closed windows, and not the open one"
    );
    assert_eq!(
        scalar(
            &pg,
            "SELECT count(*) FROM per_order WHERE window_start >= TIMESTAMP '2024-05-01 08:00:50'"
        )
        .await,
        0
    );
    assert_eq!(
        scalar(&pg, "SELECT count(*) FROM per_order WHERE n <> 1").await,
        0
    );
    server.shutdown().await;
}

/// A proxy in front of the Kinesis API server that tells which reader calls `GetRecords` on
/// which shard: every `GetShardIterator` starts a chain of iterators (one reader of one
/// shard), each `GetRecords` answer's next iterator continues it.
mod calls {
    use std::collections::{BTreeMap, BTreeSet, HashMap};
    use std::sync::{Arc, Mutex};

    use axum::body::Bytes;
    use axum::http::{HeaderMap, StatusCode};

    #[derive(Default)]
    struct State {
        /// Iterator → (shard, chain).
        iterators: HashMap<String, (String, u64)>,
        chains: u64,
        /// Per shard, the chains that called `GetRecords` since the last [`Counter::take`].
        callers: BTreeMap<String, BTreeSet<u64>>,
    }

    /// The proxy's record of calls.
    #[derive(Clone)]
    pub struct Counter {
        state: Arc<Mutex<State>>,
        /// The proxy's address (`http://127.0.0.1:port`).
        pub endpoint: String,
    }

    impl Counter {
        /// Per shard, how many readers called `GetRecords` on it since the last call.
        pub fn take(&self) -> BTreeMap<String, usize> {
            let mut state = self.state.lock().unwrap();
            std::mem::take(&mut state.callers)
                .into_iter()
                .map(|(shard, chains)| (shard, chains.len()))
                .collect()
        }
    }

    /// Starts a proxy forwarding to `upstream`.
    pub async fn proxy(upstream: String) -> Counter {
        let state: Arc<Mutex<State>> = Arc::default();
        let client = reqwest::Client::new();
        let app = {
            let state = Arc::clone(&state);
            axum::Router::new().fallback(move |headers: HeaderMap, body: Bytes| {
                let (state, client, upstream) =
                    (Arc::clone(&state), client.clone(), upstream.clone());
                async move { forward(&state, &client, &upstream, headers, body).await }
            })
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Counter { state, endpoint }
    }

    async fn forward(
        state: &Mutex<State>,
        client: &reqwest::Client,
        upstream: &str,
        headers: HeaderMap,
        body: Bytes,
    ) -> (StatusCode, HeaderMap, Bytes) {
        let target = headers
            .get("x-amz-target")
            .and_then(|t| t.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let mut request = client.post(upstream).body(body.clone());
        for (name, value) in &headers {
            if name != "host" && name != "content-length" {
                request = request.header(name, value);
            }
        }
        let response = request
            .send()
            .await
            .expect("the Kinesis API server answers");
        let status = StatusCode::from_u16(response.status().as_u16()).unwrap();
        let mut out_headers = HeaderMap::new();
        for (name, value) in response.headers() {
            if name != "content-length" && name != "transfer-encoding" {
                out_headers.insert(name, value.clone());
            }
        }
        let answer = response.bytes().await.unwrap();
        let json = |b: &[u8]| serde_json::from_slice::<serde_json::Value>(b).unwrap_or_default();
        let text =
            |v: &serde_json::Value, k: &str| v.get(k).and_then(|s| s.as_str()).map(str::to_string);
        let (request, reply) = (json(&body), json(&answer));
        let mut s = state.lock().unwrap();
        if target.ends_with(".GetShardIterator") && status.is_success() {
            s.chains += 1;
            let chain = s.chains;
            let shard = text(&request, "ShardId").expect("GetShardIterator names a shard");
            let iterator = text(&reply, "ShardIterator").expect("an iterator");
            s.iterators.insert(iterator, (shard, chain));
        } else if target.ends_with(".GetRecords") {
            let iterator = text(&request, "ShardIterator").expect("GetRecords has an iterator");
            let (shard, chain) = s
                .iterators
                .get(&iterator)
                .cloned()
                .expect("a known iterator");
            s.callers.entry(shard.clone()).or_default().insert(chain);
            if let Some(next) = text(&reply, "NextShardIterator") {
                s.iterators.insert(next, (shard, chain));
            }
        }
        (status, out_headers, answer)
    }
}

/// One reader per source: three streams (two created while the source runs, so they first
/// catch up with a backfill reader of their own) read every record once, and once they have
/// caught up each shard has exactly one caller of `GetRecords`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_streams_of_one_source_read_each_shard_once() {
    let client = kinesis_client();
    let counter = calls::proxy(kinesis_endpoint()).await;
    let input = format!("shared-{}", std::process::id());
    create_stream(&client, &input, 2).await;
    put_shipments(&client, &input, 0..200).await;
    let lake = tempfile::tempdir().unwrap();
    let server = start_server(lake.path()).await;
    let pg = pg_connect(server.pg_addr).await;
    let endpoint = &counter.endpoint;
    pg.batch_execute(&format!(
        "CREATE SOURCE shipments (order_id TEXT NOT NULL, seq BIGINT NOT NULL, status TEXT,
                                  ts TIMESTAMP NOT NULL, _kinesis_shard_id TEXT)
         WITH (connector = 'kinesis', stream = '{input}', endpoint = '{endpoint}',
               start = 'trim_horizon', poll_interval = '100 ms');
         CREATE STREAM first WITH (checkpoint_interval = '200 ms') AS SELECT * FROM shipments"
    ))
    .await
    .unwrap();
    let count = |stream: &str| format!("SELECT count(*) FROM {stream}");
    wait_for("the first stream", Duration::from_secs(60), || async {
        (scalar(&pg, &count("first")).await == 200).then_some(())
    })
    .await;
    for stream in ["second", "third"] {
        pg.batch_execute(&format!(
            "CREATE STREAM {stream} WITH (checkpoint_interval = '200 ms') AS
             SELECT * FROM shipments WHERE seq >= 0"
        ))
        .await
        .unwrap();
        // More while it catches up (the second time, the same records again).
        put_shipments(&client, &input, 200..260).await;
        put_shipments(&client, &input, 260..300).await;
    }
    put_shipments(&client, &input, 300..400).await;
    let total = 200 + 2 * 100 + 100;
    for stream in ["first", "second", "third"] {
        wait_for(stream, Duration::from_secs(60), || async {
            (scalar(&pg, &count(stream)).await >= total).then_some(())
        })
        .await;
    }
    // Every stream has every record exactly once (seq 0..400, 200..300 put twice), across
    // both shards.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for stream in ["first", "second", "third"] {
        let rows = scalar(&pg, &count(stream)).await;
        let distinct = scalar(
            &pg,
            &format!("SELECT count(DISTINCT (seq, status)) FROM {stream}"),
        )
        .await;
        assert_eq!((rows, distinct), (total, 400), "{stream}");
        let shards = scalar(
            &pg,
            &format!("SELECT count(DISTINCT _kinesis_shard_id) FROM {stream}"),
        )
        .await;
        assert_eq!(shards, 2, "{stream} reads both shards");
    }

    // Caught up: from now on, one caller per shard, however many streams read the source.
    counter.take();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let callers = counter.take();
    assert_eq!(callers.len(), 2, "both shards are read: {callers:?}");
    assert!(
        callers.values().all(|n| *n == 1),
        "GetRecords callers per shard: {callers:?}"
    );
    server.shutdown().await;
}

/// A stream's shards are its splits: two readers of one source, each opened for one shard,
/// read disjoint records (each only its shard's) that together are the stream, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_opened_for_one_shard_each_read_the_stream_once_between_them() {
    use std::sync::{Arc, Mutex};

    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{DataType, Field, Int64Type, Schema};
    use sluice_engine::connector::{SourceFeed, Splits};
    use sluice_engine::{FanOut, Message};

    let client = kinesis_client();
    let input = format!("split-readers-{}", std::process::id());
    create_stream(&client, &input, 2).await;
    put_shipments(&client, &input, 0..120).await;

    let dir = tempfile::tempdir().unwrap();
    let lake = sluice_connectors::lake::Lake::open(dir.path().to_str().unwrap()).unwrap();
    let schema = Arc::new(Schema::new(vec![
        Field::new("seq", DataType::Int64, false),
        Field::new("_kinesis_shard_id", DataType::Utf8, false),
    ]));
    let endpoint = kinesis_endpoint();
    let options = [
        ("connector", "kinesis"),
        ("stream", input.as_str()),
        ("endpoint", endpoint.as_str()),
        ("poll_interval", "100 ms"),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()));
    let spec = sluice_connectors::registry(&lake)
        .source(
            sluice_engine::WithOptions::new("source `shipments`", options),
            &schema,
        )
        .unwrap();
    let shards = spec.splits().await.unwrap();
    assert_eq!(shards.len(), 2, "{shards:?}");

    let read: Arc<Mutex<Vec<(i64, String, String)>>> = Arc::default(); // (seq, shard, reader)
    let mut cancels = vec![];
    for shard in &shards {
        let context = sluice_tests::source_context;
        let SourceFeed::Shared { reader, .. } = spec
            .open_splits(
                "shipments",
                Arc::clone(&schema),
                context(FanOut::new("shipments")),
                &Splits::only([shard.clone()]),
            )
            .unwrap()
        else {
            panic!("a kinesis source has a shared reader")
        };
        let output = FanOut::new("shipments");
        let mut rx = output.subscribe(64);
        let ctx = context(output);
        cancels.push(ctx.cancel.clone());
        tokio::spawn(reader.run(ctx));
        let (read, shard) = (Arc::clone(&read), shard.clone());
        tokio::spawn(async move {
            while let Some(m) = rx.recv().await {
                if let Message::Data(b) = m {
                    let seqs = b.column(0).as_primitive::<Int64Type>();
                    let ids = b.column(1).as_string::<i32>();
                    let mut read = read.lock().unwrap();
                    for i in 0..b.num_rows() {
                        assert!(seqs.is_valid(i));
                        read.push((seqs.value(i), ids.value(i).to_string(), shard.clone()));
                    }
                }
            }
        });
    }
    wait_for("both shards read", Duration::from_secs(60), || async {
        (read.lock().unwrap().len() >= 120).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await; // nothing more comes
    for c in cancels {
        c.cancel();
    }
    let read = read.lock().unwrap().clone();
    assert_eq!(read.len(), 120, "every record once");
    let seqs: BTreeSet<i64> = read.iter().map(|(s, _, _)| *s).collect();
    assert_eq!(seqs, (0..120).collect(), "every record once");
    for (seq, shard, reader) in &read {
        assert_eq!(
            shard, reader,
            "record {seq} read by the reader of another shard"
        );
    }
    for shard in &shards {
        assert!(
            read.iter().any(|(_, s, _)| s == shard),
            "shard {shard} had records (12 keys over 2 shards)"
        );
    }
}
