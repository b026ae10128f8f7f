//! The `kafka` pipeline: Nexmark-shaped bids as JSON records on a real Kafka-protocol broker
//! → the kafka source → 10-second tumbling count + sum per auction → the lake (Parquet).
//!
//! The bids are produced first (not measured); then the clock and the process's CPU time run
//! from the start of the source until every record was consumed and the last window and file
//! are written. The broker runs in its own process, so the CPU figure is Sluice's alone.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use sluice_connectors::datagen::DatagenConfig;
use sluice_connectors::kafka::{FetchClient, KafkaConfig, KafkaReader, StartPosition};
use sluice_connectors::lake::{Lake, ParquetLakeWriter, RecordZone, Zone};
use sluice_engine::SourceReader as _;
use sluice_engine::pipeline::TaskWiring;
use sluice_engine::sink::FileRolling;
use sluice_engine::sink::run_sink;
use sluice_engine::{FanOut, Message, SourceContext};
use tokio_util::sync::CancellationToken;

use crate::{Args, BIDS, Measured, TUMBLE, cpu_time, source_of};

const PARTITIONS: i32 = 2;

/// Nexmark-shaped bids as JSON lines, as arrow-json's writer prints them, a batch at a time.
struct BidLines {
    generator: sluice_connectors::datagen::DatagenReader,
    left: u64,
}

impl BidLines {
    fn new(n: u64, args: &Args) -> anyhow::Result<Self> {
        let sql = BIDS.replace(
            "rows_per_second = '0'",
            &format!(
                "rows_per_second = '0', max_rows = '{n}', batch_size = '{}'",
                args.batch_size
            ),
        );
        let def = source_of(&sql)?;
        let mut options = sluice_engine::WithOptions::new(
            "source `bids`",
            def.create
                .options
                .iter()
                .filter(|(k, _)| k != "connector")
                .cloned(),
        );
        let config = DatagenConfig::try_new(&mut options, &def.schema)?;
        Ok(Self {
            generator: sluice_connectors::datagen::DatagenReader::new(
                config,
                Arc::clone(&def.schema),
            ),
            left: n,
        })
    }

    /// The next (up to) 8192 bids, one JSON object per line; `None` after the last.
    fn next_chunk(&mut self) -> anyhow::Result<Option<Vec<u8>>> {
        if self.left == 0 {
            return Ok(None);
        }
        let batch = self.generator.next_batch(self.left.min(8192) as usize)?;
        self.left -= batch.num_rows() as u64;
        let mut json = Vec::new();
        {
            let mut w = arrow::json::LineDelimitedWriter::new(&mut json);
            w.write(&batch)?;
            w.finish()?;
        }
        Ok(Some(json))
    }
}

/// The lines of `json`.
fn lines(json: &[u8]) -> impl Iterator<Item = &[u8]> {
    json.split(|b| *b == b'\n').filter(|l| !l.is_empty())
}

/// The `json` pipeline: the same bids, already in memory, through the kafka source's JSON
/// decoder (the flat fast path, arrow-json where it declines) in batches of `--batch-size`:
/// the decoding rate alone, no transport.
pub async fn decode_only(args: &Args, messy: bool) -> anyhow::Result<Measured> {
    let def = source_of(BIDS)?;
    let mut decoder = sluice_connectors::formats::Decoder::new(
        &sluice_connectors::formats::RecordFormat::Json,
        Arc::clone(&def.schema),
    )?;
    let all = bids_in_memory(args, messy)?;
    let records: Vec<&[u8]> = lines(&all).collect();
    let (start_wall, start_cpu) = (Instant::now(), cpu_time());
    let mut events = 0u64;
    for chunk in records.chunks(args.batch_size.max(1)) {
        let decoded = decoder.decode(chunk).await?;
        anyhow::ensure!(decoded.errors.is_empty(), "bad bids: {:?}", decoded.errors);
        events += decoded.batch.num_rows() as u64;
    }
    let (wall, cpu) = (start_wall.elapsed(), cpu_time() - start_cpu);
    anyhow::ensure!(events == args.events, "decoded {events} of {}", args.events);
    Ok(Measured::throughput(
        if messy {
            "messy JSON bids -> sluice JSON decoder"
        } else {
            "bids as JSON -> sluice JSON decoder (no kafka)"
        },
        events,
        wall,
        cpu,
    ))
}

/// The `arrow-json` pipeline, the reference the others are judged by: the same bids through
/// arrow-json's own decoder, fed as newline-delimited JSON in batches of `--batch-size`
/// records (its best case: one contiguous buffer per batch, no per-record calls).
pub async fn arrow_json_only(args: &Args, messy: bool) -> anyhow::Result<Measured> {
    let def = source_of(BIDS)?;
    let mut decoder = arrow::json::ReaderBuilder::new(Arc::clone(&def.schema))
        .with_batch_size(args.batch_size.max(1))
        .build_decoder()?;
    let all = bids_in_memory(args, messy)?;
    // Byte ranges of `--batch-size` lines each, cut up front (not measured).
    let mut chunks = Vec::new();
    let (mut from, mut in_chunk) = (0, 0);
    for (i, b) in all.iter().enumerate() {
        if *b == b'\n' {
            in_chunk += 1;
            if in_chunk == args.batch_size.max(1) {
                chunks.push(&all[from..=i]);
                (from, in_chunk) = (i + 1, 0);
            }
        }
    }
    if from < all.len() {
        chunks.push(&all[from..]);
    }
    let (start_wall, start_cpu) = (Instant::now(), cpu_time());
    let mut events = 0u64;
    for chunk in chunks {
        let mut rest = chunk;
        while !rest.is_empty() {
            let read = decoder.decode(rest)?;
            rest = &rest[read..];
            if let Some(batch) = decoder.flush()? {
                events += batch.num_rows() as u64;
            }
        }
    }
    if let Some(batch) = decoder.flush()? {
        events += batch.num_rows() as u64;
    }
    let (wall, cpu) = (start_wall.elapsed(), cpu_time() - start_cpu);
    anyhow::ensure!(events == args.events, "decoded {events} of {}", args.events);
    Ok(Measured::throughput(
        if messy {
            "messy JSON bids -> arrow-json decoder"
        } else {
            "bids as JSON -> arrow-json decoder (reference)"
        },
        events,
        wall,
        cpu,
    ))
}

/// `args.events` bids as newline-delimited JSON, generated up front (not measured) in
/// batches of the source's size; `messy`: as real producers write them (see [`mess_up`]).
fn bids_in_memory(args: &Args, messy: bool) -> anyhow::Result<Vec<u8>> {
    let mut generated = BidLines::new(args.events, args)?;
    let mut all = Vec::new();
    while let Some(json) = generated.next_chunk()? {
        if messy {
            for (i, line) in lines(&json).enumerate() {
                all.extend_from_slice(&mess_up(line, i)?);
                all.push(b'\n');
            }
        } else {
            all.extend_from_slice(&json);
        }
    }
    Ok(all)
}

/// One bid as a producer that is not arrow-json's writer might send it: keys in alphabetical
/// order (not the columns'), an explicit `null` now and then, fields the schema does not
/// have (one nested), and strings with escapes (`\"`, `\\`, `\/`, `\u00e9`, `\t`).
fn mess_up(line: &[u8], i: usize) -> anyhow::Result<Vec<u8>> {
    let mut bid: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(line)?;
    if let Some(serde_json::Value::String(url)) = bid.get_mut("url") {
        url.push_str("?q=\"caf\u{e9}\"\\/\t");
    }
    if i.is_multiple_of(7) {
        bid.insert("channel".into(), serde_json::Value::Null);
    }
    bid.insert(
        "referrer_context".into(),
        serde_json::json!({"tags": ["a", "b"], "depth": {"n": i % 3}}),
    );
    bid.insert("session_id".into(), serde_json::json!(format!("s-{i}")));
    // serde_json's map keeps keys sorted: auction, bidder, channel, extra, price, … — not the
    // schema's order (auction, bidder, price, channel, url, ts, extra).
    // serde_json writes é as UTF-8 and / bare; a producer may escape them.
    let text = String::from_utf8(serde_json::to_vec(&bid)?)?
        .replace('é', "\\u00e9")
        .replace("\\\\/", "\\\\\\/");
    Ok(text.into_bytes())
}

/// Produces `n` bids as JSON records, round robin over the partitions.
async fn produce(brokers: &str, topic: &str, n: u64, args: &Args) -> anyhow::Result<()> {
    let mut generator = BidLines::new(n, args)?;
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "20")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        .set("compression.type", "lz4")
        .create()?;
    let mut i = 0i32;
    while let Some(json) = generator.next_chunk()? {
        for line in lines(&json) {
            i = (i + 1) % PARTITIONS;
            let mut record = BaseRecord::<(), [u8]>::to(topic).payload(line).partition(i);
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((_, r)) => {
                        record = r;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
        }
    }
    producer.flush(Duration::from_secs(120))?;
    Ok(())
}

/// Runs the pipeline over `args.events` bids on the broker at `SLUICE_TEST_KAFKA`, as
/// `sluice serve` runs a Kafka source (its one reader: errors zone, raw zone off) with one
/// stream reading it.
pub async fn run(args: &Args, checkpoint: bool, librdkafka: bool) -> anyhow::Result<Measured> {
    let brokers = std::env::var("SLUICE_TEST_KAFKA").context(
        "the kafka pipeline needs a broker: `eval \"$(scripts/services.sh start)\"` sets SLUICE_TEST_KAFKA",
    )?;
    // A topic per run: a pipeline may be listed more than once.
    static RUNS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let topic = format!(
        "bench-bids-{}-{}{}",
        std::process::id(),
        RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        if checkpoint { "-ckpt" } else { "" }
    );
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()?;
    for r in admin
        .create_topics(
            &[NewTopic::new(
                &topic,
                PARTITIONS,
                TopicReplication::Fixed(1),
            )],
            &AdminOptions::new(),
        )
        .await?
    {
        r.map_err(|(t, e)| anyhow::anyhow!("creating topic {t}: {e}"))?;
    }
    let produce_start = Instant::now();
    produce(&brokers, &topic, args.events, args).await?;
    eprintln!(
        "  produced {} JSON bids to {topic} in {:.1} s (not measured)",
        args.events,
        produce_start.elapsed().as_secs_f64()
    );

    // The source, as `CREATE SOURCE … WITH (connector = 'kafka', …)` makes it.
    let def = source_of(BIDS)?;
    let config = KafkaConfig {
        brokers,
        topic,
        format: sluice_connectors::formats::RecordFormat::Json,
        start: StartPosition::Earliest,
        raw_zone: false,
        batch_size: args.batch_size,
        linger: Duration::from_millis(50),
        properties: std::env::var("SLUICE_BENCH_KAFKA_PROPS")
            .unwrap_or_default()
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        // `kafka-librdkafka` (or `SLUICE_BENCH_KAFKA_FETCHER=librdkafka`) measures the source
        // fetching with librdkafka: list both pipelines to compare the fetchers in one run.
        fetcher: match std::env::var("SLUICE_BENCH_KAFKA_FETCHER").as_deref() {
            _ if librdkafka => FetchClient::Librdkafka,
            Ok("librdkafka") => FetchClient::Librdkafka,
            Ok("builtin") => FetchClient::Builtin,
            Ok("auto") | Err(_) => FetchClient::Auto,
            Ok(other) => anyhow::bail!(
                "SLUICE_BENCH_KAFKA_FETCHER={other}: expected auto, builtin or librdkafka"
            ),
        },
    };
    let plan = crate::plan_over_clicks(TUMBLE, &def).await?;
    let cancel = CancellationToken::new();
    let source_out = FanOut::new("clicks");
    let (bad_tx, mut bad_rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move { while bad_rx.recv().await.is_some() {} });
    let lake_dir = tempfile::tempdir()?;
    let lake = Lake::open(lake_dir.path().to_str().context("UTF-8 temp dir")?)?;
    let (reader, _joinable) = KafkaReader::shared(
        "clicks",
        config,
        Arc::clone(&def.schema),
        None,
        RecordZone::new(lake.clone(), Zone::Errors, "clicks"),
    );
    // With checkpoints: the source's position and files, the stream's window state and
    // staged files, to the same local lake; the barriers reach the stream through the hub.
    let (coordinator, mut source_registered, mut registered) = if checkpoint {
        let c = sluice_engine::checkpoint::Coordinator::open(
            Arc::new(lake.clone()),
            args.checkpoint_interval,
            Arc::new(sluice_engine::checkpoint::NoFence),
        )
        .await?;
        let source = c
            .register(sluice_engine::checkpoint::StreamRegistration {
                name: "source:clicks".into(),
                sql: BIDS.into(),
                readers: vec!["clicks".into()],
                parallelism: 0,
                writer: true,
                interval: args.checkpoint_interval,
                timeout: None,
            })
            .await?;
        let r = c
            .register(sluice_engine::checkpoint::StreamRegistration {
                name: "per_auction".into(),
                sql: TUMBLE.into(),
                readers: vec![],
                parallelism: 1,
                writer: true,
                interval: args.checkpoint_interval,
                timeout: None,
            })
            .await?;
        (Some(c), Some(source), Some(r))
    } else {
        (None, None, None)
    };
    let durations = Arc::new(std::sync::Mutex::new(Vec::<Duration>::new()));
    if let Some(c) = coordinator.clone() {
        let durations = Arc::clone(&durations);
        tokio::spawn(async move {
            let mut next = 1;
            loop {
                c.wait_for(next).await;
                durations
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(c.last_duration());
                next = c.last_completed() + 1;
            }
        });
    }
    let ctx = SourceContext {
        output: source_out.clone(),
        metrics: Arc::default(),
        bad_records: bad_tx.clone(),
        cancel: cancel.clone(),
        checkpoint: source_registered
            .as_mut()
            .and_then(|r| r.readers.remove("clicks")),
        watermark: def.watermark.clone(),
    };
    let out = FanOut::new("per_auction");
    // As the server builds it, in one subtask.
    let mut spec = plan.pipeline("bench");
    spec.parallelism = 1;
    let task = spec.build(
        |_| {
            Ok((
                source_out.subscribe(sluice_engine::DEFAULT_CHANNEL_CAPACITY),
                None,
            ))
        },
        TaskWiring {
            output: out.clone(),
            metrics: Arc::default(),
            bad_records: bad_tx,
            cancel: CancellationToken::new(),
            checkpoints: registered
                .as_mut()
                .map(|r| std::mem::take(&mut r.subtasks))
                .unwrap_or_default(),
            restored: None,
        },
    )?;
    let files = Arc::new(AtomicU64::new(0));
    let mut writer = ParquetLakeWriter::new(
        lake,
        "per_auction",
        &plan.output_schema,
        plan.event_time_column.as_deref(),
        FileRolling::default(),
        Arc::clone(&files),
    );
    if let Some(r) = registered {
        writer = writer.with_checkpoints(r.writer, CancellationToken::new());
    }
    let sink = tokio::spawn(run_sink(
        out.subscribe(sluice_engine::DEFAULT_CHANNEL_CAPACITY),
        Box::new(writer),
    ));

    let start_wall = Instant::now();
    let start_cpu = cpu_time();
    let stream = tokio::spawn(task.run());
    let consumed = Arc::clone(&ctx.metrics);
    let source = tokio::spawn(async move {
        let r = Box::new(reader).run(ctx).await;
        source_out.send(Message::End).await;
        r
    });
    // A topic never ends: stop the source once every record was read.
    while consumed.snapshot().rows_in < args.events {
        if source.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    cancel.cancel();
    source.await??;
    stream.await??;
    sink.await??;
    let wall = start_wall.elapsed();
    let cpu = cpu_time() - start_cpu;
    let events = consumed.snapshot().rows_in;
    anyhow::ensure!(
        events == args.events,
        "consumed {events} of {} records",
        args.events
    );
    // (With checkpoints the last files wait for an epoch the stopped reader will not join.)
    anyhow::ensure!(
        checkpoint || files.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "no Parquet file written"
    );
    // The windows in the lake, against the same bids folded without Sluice's operators:
    // each one written must be exact, and every window that closed before the input
    // ended must be there (with checkpoints, the files of the last epoch are not published:
    // the stopped reader never joins it).
    let sql = BIDS.replace(
        "rows_per_second = '0'",
        &format!(
            "rows_per_second = '0', max_rows = '{}', batch_size = '{}'",
            args.events, args.batch_size
        ),
    );
    let expected = crate::expect::windows(&sql, 10_000_000, 10_000_000).await?;
    let mut written = vec![];
    crate::parquet_files(&lake_dir.path().join("processed"), &mut |b| {
        written.push(b);
        Ok(())
    })?;
    let produced = crate::expect::produced_windows(&written, "bids", Some("volume"))?;
    let wrong: Vec<_> = produced
        .iter()
        .filter(|(k, v)| expected.get(k) != Some(v))
        .take(5)
        .collect();
    anyhow::ensure!(
        wrong.is_empty(),
        "windows in the lake differ from the expectation: {wrong:?}"
    );
    if !checkpoint {
        let last_end = expected.keys().map(|(_, _, end)| *end).max().unwrap_or(0);
        let missing = expected
            .keys()
            .filter(|k| k.2 < last_end && !produced.contains_key(k))
            .count();
        anyhow::ensure!(missing == 0, "{missing} closed windows are not in the lake");
    }
    let name = match (checkpoint, librdkafka) {
        (true, _) => "  same, checkpoints (offsets, open windows)",
        (false, true) => "  same, librdkafka fetching",
        (false, false) => "kafka JSON bids -> 10s tumble -> lake",
    };
    Ok(Measured {
        checkpoints: checkpoint
            .then(|| std::mem::take(&mut *durations.lock().unwrap_or_else(|e| e.into_inner()))),
        ..Measured::throughput(name, events, wall, cpu)
    })
}
