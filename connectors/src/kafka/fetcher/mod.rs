//! [`Fetcher`]: the source's own Kafka fetch client, the hot path of a `kafka` source.
//!
//! librdkafka hands records over one at a time: for each it allocates an operation and a
//! message, queues them under locks and frees them again, which cost a kafka source about
//! as much CPU as decoding its JSON. This client fetches with the Fetch API itself and
//! reads whole record batches out of the response: a record costs a few varints and one
//! copy of its value into the batch being filled ([`super::source::Records`]).
//!
//! Measured in one run (2026-12-06, release, 2 threads, `sluice-bench --pipelines kafka`,
//! 3 M JSON bids → 10 s tumble → lake, alternating `SLUICE_BENCH_KAFKA_FETCHER`): this client
//! 3.70 / 3.19 / 3.67 M events per CPU-second, librdkafka's fetch 2.52 / 2.23 / 2.34 M —
//! 1.47× on average, every round. That difference is the reason this client exists; it
//! goes if librdkafka closes it.
//!
//! librdkafka (the reader's `BaseConsumer`) still does everything else: metadata (which
//! broker leads which partition), start offsets (earliest / latest / committed), and the
//! consumer group's offset commits. This client is used only where it speaks what the
//! cluster needs: plaintext connections (a source with `properties.security.protocol`
//! other than `plaintext`, or any `sasl.*` / `ssl.*` property, fetches with librdkafka).
//!
//! Semantics kept from librdkafka's consumer: `isolation.level` (`read_committed` by
//! default: records of aborted transactions and transaction markers are skipped), an
//! out-of-range position resets to the source's `start` (earliest or latest), the
//! partition's lag is its high watermark from the last fetch minus the position. A broker
//! that fails or stops leading a partition is retried after fresh metadata; errors that
//! retrying cannot fix end the reader with the broker's error code.

mod protocol;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read as _, Write as _};
use std::net::{TcpStream, ToSocketAddrs as _};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_engine::retry::RetryPolicy;

use rdkafka::Message as _;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};
use sluice_engine::EngineError;

use super::StartPosition;
use super::source::{FetchedRecord, LagReporter, Polled, Records, Wants, append};
use protocol::{FetchLimits, PartitionFetch, ProtocolError, RecordView};

/// Bytes fetched per partition and per response at most (librdkafka's defaults).
const PARTITION_MAX_BYTES: i32 = 1 << 20;
const RESPONSE_MAX_BYTES: i32 = 50 << 20;
/// How long the broker may hold a fetch when there is nothing to read (an idle topic costs
/// no CPU); also how often the fetcher looks at whether its reader is still there.
const QUIET_WAIT: Duration = Duration::from_millis(100);
/// Before retrying a broker that failed.
const RETRY_BACKOFF: Duration = Duration::from_millis(500);
/// A retried error is logged at most this often.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Whether the source's librdkafka `properties` leave it to this client: plaintext only.
pub(super) fn speaks(properties: &[(String, String)]) -> bool {
    properties.iter().all(|(k, v)| {
        let k = k.to_ascii_lowercase();
        if k == "security.protocol" {
            v.eq_ignore_ascii_case("plaintext")
        } else {
            !(k.starts_with("sasl.") || k.starts_with("ssl."))
        }
    })
}

/// Fetches the partitions of one topic on a thread of its own; see the module docs.
pub(super) struct Fetcher {
    pub(super) name: String,
    pub(super) topic: String,
    /// Metadata, watermarks, committed offsets; its event queue is drained here.
    pub(super) consumer: Arc<BaseConsumer<LagReporter>>,
    /// Where an out-of-range position resets to.
    pub(super) start: StartPosition,
    /// 1 for `read_committed`, 0 for `read_uncommitted`.
    pub(super) isolation: i8,
    pub(super) batch_size: usize,
    pub(super) linger: Duration,
    pub(super) wants: Wants,
    /// The source's metrics, when this reader reports the lag.
    pub(super) lag: Option<Arc<sluice_engine::Metrics>>,
    /// The next offset to fetch, per partition.
    pub(super) positions: BTreeMap<i32, i64>,
}

/// The brokers fetched from: forgotten after a failure, found again from fresh metadata.
#[derive(Default)]
struct Brokers {
    leaders: Option<Leaders>,
    connections: HashMap<i32, Connection>,
}

/// Which broker leads each partition, and where each broker is.
struct Leaders {
    of: BTreeMap<i32, i32>,
    address: HashMap<i32, String>,
}

/// One broker connection.
struct Connection {
    stream: TcpStream,
    correlation: i32,
    request: Vec<u8>,
    response: Vec<u8>,
}

/// Why one round of fetching failed.
enum Failure {
    /// Retry after fresh metadata (a broker down, a leader moved).
    Retry(String),
    /// Give up: the reader ends with this error.
    Fatal(EngineError),
}

impl From<ProtocolError> for Failure {
    fn from(e: ProtocolError) -> Self {
        Failure::Retry(e.to_string())
    }
}

impl Fetcher {
    /// The position of each of `partitions`: `resume` where it names one, else the
    /// fetcher's start position. Blocking (asks the brokers).
    pub(super) fn resolve_positions(
        &mut self,
        partitions: &[i32],
        resume: &BTreeMap<i32, i64>,
    ) -> Result<(), KafkaError> {
        let mut committed = BTreeMap::new();
        if self.start == StartPosition::Committed {
            let mut tpl = TopicPartitionList::new();
            for p in partitions {
                tpl.add_partition(&self.topic, *p);
            }
            let offsets = self
                .consumer
                .committed_offsets(tpl, Duration::from_secs(10))?;
            for e in offsets.elements() {
                if let Offset::Offset(o) = e.offset() {
                    committed.insert(e.partition(), o);
                }
            }
        }
        for p in partitions {
            let at = match (resume.get(p), committed.get(p)) {
                (Some(o), _) | (None, Some(o)) => *o,
                (None, None) => self.reset_position(*p)?,
            };
            self.positions.insert(*p, at);
        }
        Ok(())
    }

    /// Where partition `p` starts without a position: its first offset, or with
    /// `start = 'latest'` its end.
    fn reset_position(&self, p: i32) -> Result<i64, KafkaError> {
        let (low, high) =
            self.consumer
                .fetch_watermarks(&self.topic, p, Duration::from_secs(10))?;
        Ok(match self.start {
            StartPosition::Latest => high,
            StartPosition::Earliest | StartPosition::Committed => low,
        })
    }

    /// Runs until the receiving side goes away or an error retrying cannot fix.
    pub(super) fn run(
        mut self,
        tx: tokio::sync::mpsc::Sender<Polled>,
        spares: std::sync::mpsc::Receiver<Records>,
    ) {
        let mut out = Output {
            batch: Records::default(),
            first_at: None,
            tx,
            spares,
            gone: false,
        };
        let mut brokers = Brokers::default();
        let mut last_warning: Option<Instant> = None;
        // A source outlives a broker outage, as librdkafka's consumer does: no give-up, the
        // shared policy's capped, jittered waits (a restarted cluster is not hit by every
        // fetcher at once).
        let mut retry = RetryPolicy {
            initial: RETRY_BACKOFF / 4,
            max_delay: RETRY_BACKOFF * 4,
            max_attempts: None,
            give_up_after: None,
        }
        .start();
        let mut had_records = false;
        let mut scratch = Vec::new();
        let mut lag: BTreeMap<i32, i64> = BTreeMap::new();
        loop {
            if out.tx.is_closed() {
                return;
            }
            if let Err(e) = self.serve_consumer_events() {
                let _ = out.tx.blocking_send(Err(e));
                return;
            }
            let round = self.round(&mut brokers, &mut out, had_records, &mut scratch, &mut lag);
            had_records = match round {
                Ok(_) if out.gone => return,
                Ok(got) => {
                    retry.reset();
                    got
                }
                Err(Failure::Fatal(e)) => {
                    let _ = out.tx.blocking_send(Err(e));
                    return;
                }
                Err(Failure::Retry(why)) => {
                    if last_warning.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
                        tracing::warn!(source = %self.name, "kafka fetch: {why} (retrying)");
                        last_warning = Some(Instant::now());
                    }
                    brokers = Brokers::default();
                    std::thread::sleep(retry.next_delay().unwrap_or(RETRY_BACKOFF));
                    false
                }
            };
            if let Some(metrics) = &self.lag
                && !lag.is_empty()
            {
                metrics.set_partition_lag(lag.iter().map(|(p, l)| (*p, *l)).collect());
            }
            let lingered = out.first_at.is_some_and(|at| at.elapsed() >= self.linger);
            if out.batch.len() > 0 && (lingered || !had_records) && !out.ship() {
                return;
            }
        }
    }

    /// The consumer's own events (commit results, errors): it fetches nothing itself. Its
    /// errors (a broker it cannot reach for metadata or commits) are the client's to
    /// retry; they are logged, and fetching goes on.
    fn serve_consumer_events(&self) -> Result<(), EngineError> {
        match self.consumer.poll(Duration::ZERO) {
            None => Ok(()),
            Some(Err(e)) => {
                tracing::warn!(source = %self.name, "kafka client: {e}");
                Ok(())
            }
            Some(Ok(m)) => Err(EngineError::Internal(format!(
                "kafka source `{}`: librdkafka fetched record {} of partition {} itself",
                self.name,
                m.offset(),
                m.partition()
            ))),
        }
    }

    /// One fetch from each broker leading a partition; appends what came to `out`, which
    /// ships it whenever it is full. Returns whether any records came.
    fn round(
        &mut self,
        brokers: &mut Brokers,
        out: &mut Output,
        had_records: bool,
        scratch: &mut Vec<u8>,
        lag: &mut BTreeMap<i32, i64>,
    ) -> Result<bool, Failure> {
        if brokers.leaders.is_none() {
            brokers.leaders = Some(self.leaders()?);
        }
        let Brokers {
            leaders,
            connections,
        } = brokers;
        let leaders = leaders.as_ref().expect("just set");
        let mut by_broker: BTreeMap<i32, Vec<PartitionFetch>> = BTreeMap::new();
        for (p, at) in &self.positions {
            let Some(broker) = leaders.of.get(p) else {
                return Err(Failure::Retry(format!("partition {p} has no leader")));
            };
            by_broker.entry(*broker).or_default().push(PartitionFetch {
                partition: *p,
                offset: *at,
                max_bytes: PARTITION_MAX_BYTES,
            });
        }
        let wait = match out.first_at {
            Some(at) => self.linger.saturating_sub(at.elapsed()),
            None if had_records => Duration::ZERO,
            None => QUIET_WAIT,
        };
        let limits = FetchLimits {
            max_wait_ms: wait.as_millis() as i32,
            min_bytes: 1,
            max_bytes: RESPONSE_MAX_BYTES,
            isolation: self.isolation,
        };
        let mut got = false;
        for (broker, partitions) in by_broker {
            let connection = match connections.entry(broker) {
                std::collections::hash_map::Entry::Occupied(c) => c.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => {
                    let address = leaders.address.get(&broker).ok_or_else(|| {
                        Failure::Retry(format!("broker {broker} is not in the metadata"))
                    })?;
                    v.insert(Connection::open(address, wait)?)
                }
            };
            let body = connection
                .fetch(&self.name, &self.topic, &partitions, limits)
                .map_err(|e| Failure::Retry(format!("broker {broker}: {e}")))?;
            let (_, data) = protocol::fetch_response(body, &self.topic)?;
            for part in data {
                let Some(position) = self.positions.get(&part.partition).copied() else {
                    continue;
                };
                match part.error {
                    0 => {}
                    1 => {
                        // OFFSET_OUT_OF_RANGE: the records were deleted, or the position is
                        // past the end; start over as the source's `start` says.
                        let at = self.reset_position(part.partition).map_err(|e| {
                            Failure::Retry(format!("partition {}: {e}", part.partition))
                        })?;
                        tracing::warn!(source = %self.name, partition = part.partition,
                            "kafka fetch: offset {position} is out of range; resuming at {at}");
                        self.positions.insert(part.partition, at);
                        continue;
                    }
                    // Retriable: the topic or leader is moving (UNKNOWN_TOPIC_OR_PARTITION,
                    // LEADER_NOT_AVAILABLE, NOT_LEADER_OR_FOLLOWER, REQUEST_TIMED_OUT,
                    // REPLICA_NOT_AVAILABLE, NETWORK_EXCEPTION, KAFKA_STORAGE_ERROR, the
                    // leader epoch errors, OFFSET_NOT_AVAILABLE).
                    3 | 5 | 6 | 7 | 9 | 13 | 56 | 74 | 75 | 78 => {
                        return Err(Failure::Retry(format!(
                            "partition {}: broker error code {}",
                            part.partition, part.error
                        )));
                    }
                    code => {
                        return Err(Failure::Fatal(EngineError::external(
                            format!(
                                "kafka source `{}`: fetching partition {} of `{}`",
                                self.name, part.partition, self.topic
                            ),
                            format!(
                                "broker error code {code} (see the Kafka protocol's error codes)"
                            ),
                        )));
                    }
                }
                let next = self.take_records(&part, position, out, scratch, &mut got)?;
                if out.gone {
                    return Ok(got);
                }
                self.positions.insert(part.partition, next);
                lag.insert(part.partition, (part.high_watermark - next).max(0));
            }
        }
        Ok(got)
    }

    /// Appends the records of one partition's data at or past `position` to `batch`,
    /// skipping transaction markers and, with `read_committed`, aborted transactions.
    /// Returns the partition's next position.
    fn take_records(
        &self,
        part: &protocol::PartitionData<'_>,
        mut position: i64,
        out: &mut Output,
        scratch: &mut Vec<u8>,
        got: &mut bool,
    ) -> Result<i64, Failure> {
        // Aborted transactions by first offset; a producer's records are skipped from its
        // first offset until its abort marker.
        let mut aborted: Vec<(i64, i64)> = part.aborted.iter().map(|(p, o)| (*o, *p)).collect();
        aborted.sort_unstable();
        let mut aborted = aborted.into_iter().peekable();
        let mut aborting: HashSet<i64> = HashSet::new();
        for b in protocol::batches(part.records) {
            let (header, data) = b?;
            let next = header.next_offset();
            if next <= position {
                continue; // before the position (a batch the broker sent whole)
            }
            if header.is_transactional() {
                while let Some((_, producer)) = aborted.next_if(|(first, _)| *first < next) {
                    aborting.insert(producer);
                }
            }
            if header.is_control() {
                if aborting.contains(&header.producer_id) {
                    let mut abort = false;
                    protocol::records(&header, data, scratch, |r| {
                        // The control record's key: version (i16), type (i16; 0 is abort).
                        abort |= r.key.is_some_and(|k| k.len() >= 4 && k[2..4] == [0, 0]);
                    })?;
                    if abort {
                        aborting.remove(&header.producer_id);
                    }
                }
            } else if !(self.isolation == 1
                && header.is_transactional()
                && aborting.contains(&header.producer_id))
            {
                let wants = self.wants;
                let partition = part.partition;
                let mut failed = None;
                protocol::records(&header, data, scratch, |r| {
                    if r.offset < position || out.gone || failed.is_some() {
                        return;
                    }
                    if let Err(e) = out.push(&Native { partition, r }, wants, self.batch_size) {
                        failed = Some(e);
                    }
                })?;
                if let Some(e) = failed {
                    return Err(e.into());
                }
                if out.gone {
                    return Ok(position);
                }
                *got = true;
            }
            position = next;
        }
        Ok(position)
    }

    /// Which broker leads each partition of the topic, from the cluster's metadata.
    fn leaders(&self) -> Result<Leaders, Failure> {
        let metadata = self
            .consumer
            .fetch_metadata(Some(&self.topic), Duration::from_secs(10))
            .map_err(|e| Failure::Retry(format!("metadata: {e}")))?;
        let address = metadata
            .brokers()
            .iter()
            .map(|b| (b.id(), format!("{}:{}", b.host(), b.port())))
            .collect();
        let of = metadata
            .topics()
            .iter()
            .filter(|t| t.name() == self.topic)
            .flat_map(|t| t.partitions())
            .filter(|p| p.leader() >= 0)
            .map(|p| (p.id(), p.leader()))
            .collect();
        Ok(Leaders { of, address })
    }
}

/// Where fetched records go: the batch being filled, shipped to the reader when full.
struct Output {
    batch: Records,
    /// When the batch's first record came.
    first_at: Option<Instant>,
    tx: tokio::sync::mpsc::Sender<Polled>,
    /// Batches the reader handed back, emptied, to be filled again.
    spares: std::sync::mpsc::Receiver<Records>,
    /// The reader went away.
    gone: bool,
}

impl Output {
    /// Appends `r`; ships the batch once it holds `batch_size` records.
    fn push(
        &mut self,
        r: &Native<'_>,
        wants: Wants,
        batch_size: usize,
    ) -> Result<(), ProtocolError> {
        let first = self.batch.len() == 0;
        append(&mut self.batch, r, wants)?;
        if first {
            self.first_at = Some(Instant::now());
        }
        if self.batch.len() >= batch_size {
            self.ship();
        }
        Ok(())
    }

    /// Hands the batch to the reader and takes a spare in its place; `false` (and `gone`)
    /// when the reader is gone.
    fn ship(&mut self) -> bool {
        let next = self.spares.try_recv().unwrap_or_default();
        let batch = std::mem::replace(&mut self.batch, next);
        self.first_at = None;
        self.gone = self.tx.blocking_send(Ok(batch)).is_err();
        !self.gone
    }
}

impl Connection {
    fn open(address: &str, wait: Duration) -> Result<Self, Failure> {
        let retry = |e: &dyn std::fmt::Display| Failure::Retry(format!("broker {address}: {e}"));
        let to = address
            .to_socket_addrs()
            .map_err(|e| retry(&e))?
            .next()
            .ok_or_else(|| retry(&"no address"))?;
        let stream =
            TcpStream::connect_timeout(&to, Duration::from_secs(10)).map_err(|e| retry(&e))?;
        stream.set_nodelay(true).map_err(|e| retry(&e))?;
        // A fetch may be held `wait` (at most QUIET_WAIT or the linger); past this the broker
        // is taken for gone.
        stream
            .set_read_timeout(Some(wait.max(QUIET_WAIT) + Duration::from_secs(30)))
            .map_err(|e| retry(&e))?;
        Ok(Self {
            stream,
            correlation: 0,
            request: Vec::new(),
            response: Vec::new(),
        })
    }

    /// Sends one Fetch request and returns the response body.
    fn fetch(
        &mut self,
        client_id: &str,
        topic: &str,
        partitions: &[PartitionFetch],
        limits: FetchLimits,
    ) -> std::io::Result<&[u8]> {
        self.correlation = self.correlation.wrapping_add(1);
        protocol::fetch_request(
            &mut self.request,
            self.correlation,
            client_id,
            topic,
            partitions,
            limits,
        );
        self.stream.write_all(&self.request)?;
        let mut size = [0u8; 4];
        self.stream.read_exact(&mut size)?;
        let size = i32::from_be_bytes(size);
        let size = usize::try_from(size)
            .map_err(|_| std::io::Error::other(format!("response of {size} bytes")))?;
        if self.response.len() < size {
            self.response.resize(size, 0);
        }
        self.stream.read_exact(&mut self.response[..size])?;
        let body = &self.response[..size];
        if body.len() < 4 || body[..4] != self.correlation.to_be_bytes() {
            return Err(std::io::Error::other("response to another request"));
        }
        Ok(body)
    }
}

/// A record of a fetched batch, as the batch being filled takes it.
struct Native<'a> {
    partition: i32,
    r: RecordView<'a>,
}

impl FetchedRecord for Native<'_> {
    type Error = ProtocolError;
    fn partition(&self) -> i32 {
        self.partition
    }
    fn offset(&self) -> i64 {
        self.r.offset
    }
    fn payload(&self) -> Option<&[u8]> {
        self.r.value
    }
    fn key(&self) -> Option<&[u8]> {
        self.r.key
    }
    fn timestamp(&self) -> Option<i64> {
        self.r.timestamp
    }
    fn headers(&self, mut each: impl FnMut(&str, Option<&[u8]>)) -> Result<(), ProtocolError> {
        protocol::headers(&self.r, |k, v| each(&String::from_utf8_lossy(k), v))
    }
}
