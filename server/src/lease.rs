//! One writer per lake: the writer lease, and how a standby takes over.
//!
//! ```text
//!  _sluice/lease/00000000000000000007.json   {"generation": 5, "holder": …, "pg": …, "http": …}
//!  _sluice/lease/00000000000000000008.json   renewal: the next number, same generation
//! ```
//!
//! The lease is a chain of numbered objects, each written with a conditional create
//! (`If-None-Match: *` on S3, a hard link on a local directory): whoever writes number
//! `n + 1` first holds the lease after `n`, and everybody else's create of that number
//! fails. The holder renews every `ttl / 3` by writing the next number; a renewal that
//! finds its number taken means another server took over. A server that is not the holder
//! is a **standby**: it watches the newest number and takes over (writes the next one, with
//! a new generation) once that number has not changed for `ttl` by its own clock — or at
//! once when the holder is a process of this machine that no longer exists (a `kill -9`
//! followed by a restart does not wait for the TTL).
//!
//! The holder counts the lease as held until `ttl` after the start of its last successful
//! renewal (by its own monotonic clock). A standby waits `ttl` from the moment it *saw*
//! that renewal, which is later, so the two never both believe they hold it — without
//! synchronised clocks. A holder that was paused (SIGSTOP, a long GC-like stall) finds its
//! deadline passed when it wakes: [`WriterLease`] as a [`Fence`] refuses every commit from
//! then on, and the server stops. Checkpoint commits are conditional writes too (see
//! `sluice_engine::checkpoint`), so even a commit already under way when the pause began
//! cannot land after a takeover.
//!
//! Why a chain of creates rather than one object updated with `If-Match`: object_store's
//! local file system does not implement `PutMode::Update`, and the lease must work the same
//! way on a local lake and on S3. Old numbers are deleted as the chain grows.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sluice_connectors::lake::{Lake, Zone};
use sluice_engine::EngineError;
use sluice_engine::checkpoint::Fence;
use tokio_util::sync::CancellationToken;

use crate::error::{Result, ServerError};

/// The default `--lease-ttl`.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(15);

/// How many numbers of the chain are kept (older ones are deleted).
const KEEP: u64 = 4;

/// What one number of the lease chain says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// Increments on every takeover; renewals keep it.
    pub generation: u64,
    /// The holder: unique per process start.
    pub holder: String,
    /// The holder's host name and process id (a dead holder on this machine is seen at once).
    pub host: String,
    /// Its process id.
    pub pid: u32,
    /// Where the holder takes Postgres connections.
    pub pg: String,
    /// Where the holder takes HTTP requests.
    pub http: String,
    /// When it was written (µs since the epoch, the holder's clock; informational).
    pub written_at_micros: i64,
    /// The holder's TTL, ms.
    pub ttl_ms: u64,
    /// The holder stopped and gave the lease up: the next server takes it at once.
    #[serde(default)]
    pub released: bool,
}

impl LeaseRecord {
    /// "the writer is … (pgwire), … (http)".
    pub fn describe(&self) -> String {
        format!("{} (pgwire), {} (http)", self.pg, self.http)
    }

    /// Whether the holder is a process of this machine that has exited.
    fn holder_is_gone(&self, host: &str) -> bool {
        if self.host != host || self.host.is_empty() {
            return false;
        }
        match std::fs::read_to_string(format!("/proc/{}/stat", self.pid)) {
            // A zombie (exited, not yet reaped) is gone too.
            Ok(stat) => stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
            Err(e) => e.kind() == std::io::ErrorKind::NotFound && cfg!(target_os = "linux"),
        }
    }
}

/// This process as a lease candidate.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// Its listeners, published in the lease so that standbys can name the writer.
    pub pg: String,
    /// Its HTTP listener.
    pub http: String,
    /// `--lease-ttl`.
    pub ttl: Duration,
}

/// The lease chain of one lake.
#[derive(Debug, Clone)]
struct Chain {
    lake: Lake,
}

impl Chain {
    fn path(&self, n: u64) -> object_store::path::Path {
        self.lake
            .dir(Zone::Internal, "lease")
            .join(format!("{n:020}.json"))
    }

    /// The newest number and its record.
    async fn newest(&self) -> Result<Option<(u64, LeaseRecord)>> {
        let mut numbers = self.numbers().await?;
        while let Some(n) = numbers.pop() {
            // Deleted by the holder's clean-up between the listing and the read: look again.
            let Some(bytes) = self.lake.get_opt(&self.path(n)).await? else {
                continue;
            };
            let record = serde_json::from_slice(&bytes).map_err(|e| {
                ServerError::Internal(format!("lease {n} of the lake is unreadable: {e}"))
            })?;
            return Ok(Some((n, record)));
        }
        Ok(None)
    }

    async fn numbers(&self) -> Result<Vec<u64>> {
        let dir = self.lake.dir(Zone::Internal, "lease");
        let mut numbers: Vec<u64> = self
            .lake
            .list(&dir)
            .await?
            .iter()
            .filter_map(|p| p.filename()?.strip_suffix(".json")?.parse().ok())
            .collect();
        numbers.sort_unstable();
        Ok(numbers)
    }

    /// Writes number `n`; false when somebody else wrote it first.
    async fn create(&self, n: u64, record: &LeaseRecord) -> Result<bool> {
        let bytes = serde_json::to_vec_pretty(record).expect("a lease record serialises");
        Ok(self.lake.put_if_absent(&self.path(n), bytes).await?)
    }

    /// Deletes the numbers older than `n - KEEP` (best effort).
    async fn trim(&self, n: u64) {
        let Ok(numbers) = self.numbers().await else {
            return;
        };
        for old in numbers.into_iter().filter(|o| o + KEEP < n) {
            if let Err(e) = self.lake.delete(&self.path(old)).await {
                tracing::debug!("cannot delete lease {old}: {e}");
            }
        }
    }
}

/// What this process knows of the lease it holds.
#[derive(Debug)]
struct Held {
    number: u64,
    record: LeaseRecord,
    /// Until when the lease counts as held (the start of the last renewal + ttl).
    deadline: Instant,
}

/// The lease this process holds: renewed in the background; a [`Fence`] for commits.
#[derive(Debug, Clone)]
pub struct WriterLease {
    held: Arc<Mutex<Held>>,
    /// Cancelled once the lease is lost (taken over, or not renewed in time).
    lost: CancellationToken,
}

impl WriterLease {
    /// The generation this process took the lease with.
    pub fn generation(&self) -> u64 {
        self.lock().record.generation
    }

    /// The record this process wrote.
    pub fn record(&self) -> LeaseRecord {
        self.lock().record.clone()
    }

    /// Cancelled once the lease is lost.
    pub fn lost(&self) -> CancellationToken {
        self.lost.clone()
    }

    /// Whether this process still holds the lease.
    pub fn is_held(&self) -> bool {
        !self.lost.is_cancelled() && Instant::now() < self.lock().deadline
    }

    /// Gives the lease up at a clean shutdown (after the final checkpoint): renewals stop
    /// and the next number says so, so the next server takes over at once.
    pub async fn release(&self, lake: &Lake) {
        let (n, mut record) = {
            let h = self.lock();
            (h.number + 1, h.record.clone())
        };
        self.lost.cancel();
        record.released = true;
        record.written_at_micros = sluice_engine::EventTime::now().micros();
        if let Err(e) = (Chain { lake: lake.clone() }).create(n, &record).await {
            tracing::warn!("cannot release the writer lease: {e}");
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Renews every `ttl / 3` until the lease is lost.
    fn keep_renewed(&self, chain: Chain, ttl: Duration) {
        let this = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(ttl / 3);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                if !this.is_held() {
                    this.lose(
                        "its lease expired before it could renew it (was the process paused?)",
                    );
                    return;
                }
                let started = Instant::now();
                let (n, mut record) = {
                    let h = this.lock();
                    (h.number + 1, h.record.clone())
                };
                record.written_at_micros = sluice_engine::EventTime::now().micros();
                match chain.create(n, &record).await {
                    Ok(true) => {
                        {
                            let mut h = this.lock();
                            h.number = n;
                            h.deadline = started + ttl;
                        }
                        chain.trim(n).await;
                    }
                    Ok(false) => {
                        let by = match chain.newest().await {
                            Ok(Some((_, r))) => format!(" by the server at {}", r.describe()),
                            _ => String::new(),
                        };
                        this.lose(&format!("the lease was taken over{by}"));
                        return;
                    }
                    // The lake is away for a moment: the lease holds until its deadline.
                    Err(e) => tracing::warn!("cannot renew the writer lease: {e}"),
                }
            }
        });
    }

    fn lose(&self, why: &str) {
        if !self.lost.is_cancelled() {
            tracing::error!(
                generation = self.generation(),
                "lost the lake's writer lease: {why}"
            );
            self.lost.cancel();
        }
    }
}

impl Fence for WriterLease {
    fn check(&self) -> sluice_engine::Result<()> {
        if self.is_held() {
            Ok(())
        } else {
            Err(EngineError::Fenced(format!(
                "this server no longer holds the lake's writer lease (generation {})",
                self.generation()
            )))
        }
    }
}

/// The outcome of trying for the lease.
#[derive(Debug)]
pub enum Acquired {
    /// This process holds it.
    Writer(WriterLease),
    /// Another process does.
    Standby(Box<Standby>),
}

/// A standby's view of the lease: who holds it, and the wait for it to expire.
#[derive(Debug)]
pub struct Standby {
    chain: Chain,
    me: Candidate,
    /// The holder as last seen.
    pub holder: Arc<Mutex<LeaseRecord>>,
    seen: (u64, Instant),
}

/// Tries for the lease of `lake`: holds it if it is free, expired, or held by a process of
/// this machine that has exited; otherwise returns a [`Standby`] that waits for it.
pub async fn acquire(lake: &Lake, me: Candidate) -> Result<Acquired> {
    let chain = Chain { lake: lake.clone() };
    let newest = chain.newest().await?;
    let host = host_name();
    match newest {
        Some((n, record)) if !record.holder_is_gone(&host) && !record.released => {
            let expired_by_the_clock = sluice_engine::EventTime::now().micros()
                > record.written_at_micros
                    + 2 * i64::try_from(record.ttl_ms.max(me.ttl.as_millis() as u64))
                        .unwrap_or(i64::MAX / 4)
                        * 1000;
            if expired_by_the_clock
                && let Some(lease) = take(&chain, &me, n, record.generation).await?
            {
                return Ok(Acquired::Writer(lease));
            }
            Ok(Acquired::Standby(Box::new(Standby {
                holder: Arc::new(Mutex::new(record)),
                chain,
                me,
                seen: (n, Instant::now()),
            })))
        }
        Some((n, record)) => match take(&chain, &me, n, record.generation).await? {
            Some(lease) => Ok(Acquired::Writer(lease)),
            // Somebody else was quicker: wait as a standby.
            None => Box::pin(acquire(lake, me)).await,
        },
        None => match take(&chain, &me, 0, 0).await? {
            Some(lease) => Ok(Acquired::Writer(lease)),
            None => Box::pin(acquire(lake, me)).await,
        },
    }
}

impl Standby {
    /// Waits until the lease expires and this process takes it over.
    pub async fn take_over(mut self: Box<Self>) -> Result<WriterLease> {
        let poll = (self.me.ttl / 10).clamp(Duration::from_millis(100), Duration::from_secs(1));
        let host = host_name();
        loop {
            tokio::time::sleep(poll).await;
            let newest = match self.chain.newest().await {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!("standby: cannot read the writer lease: {e}");
                    continue;
                }
            };
            let Some((n, record)) = newest else {
                if let Some(lease) = take(&self.chain, &self.me, 0, 0).await? {
                    return Ok(lease);
                }
                continue;
            };
            if n != self.seen.0 {
                self.seen = (n, Instant::now());
            }
            let ttl = Duration::from_millis(record.ttl_ms).max(self.me.ttl);
            let generation = record.generation;
            let gone = record.holder_is_gone(&host) || record.released;
            *self.holder.lock().unwrap_or_else(|e| e.into_inner()) = record;
            if (gone || self.seen.1.elapsed() >= ttl)
                && let Some(lease) = take(&self.chain, &self.me, n, generation).await?
            {
                return Ok(lease);
            }
        }
    }
}

/// Takes the lease after number `after` (generation `generation`): `None` if somebody else
/// wrote the next number first.
async fn take(
    chain: &Chain,
    me: &Candidate,
    after: u64,
    generation: u64,
) -> Result<Option<WriterLease>> {
    let started = Instant::now();
    let record = LeaseRecord {
        generation: generation + 1,
        holder: format!(
            "{}-{}-{}",
            host_name(),
            std::process::id(),
            sluice_engine::EventTime::now().micros()
        ),
        host: host_name(),
        pid: std::process::id(),
        pg: me.pg.clone(),
        http: me.http.clone(),
        written_at_micros: sluice_engine::EventTime::now().micros(),
        ttl_ms: me.ttl.as_millis() as u64,
        released: false,
    };
    let n = after + 1;
    if !chain.create(n, &record).await? {
        return Ok(None);
    }
    tracing::info!(
        generation = record.generation,
        "this server is the lake's writer"
    );
    let lease = WriterLease {
        held: Arc::new(Mutex::new(Held {
            number: n,
            record,
            deadline: started + me.ttl,
        })),
        lost: CancellationToken::new(),
    };
    lease.keep_renewed(chain.clone(), me.ttl);
    Ok(Some(lease))
}

/// This machine's name (empty when unknown: then a dead holder is only noticed by its TTL).
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me(ttl_ms: u64) -> Candidate {
        Candidate {
            pg: "127.0.0.1:1".into(),
            http: "127.0.0.1:2".into(),
            ttl: Duration::from_millis(ttl_ms),
        }
    }

    #[tokio::test]
    async fn a_second_candidate_waits_until_the_first_stops_renewing() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::open(dir.path().to_str().unwrap()).unwrap();
        let Acquired::Writer(first) = acquire(&lake, me(600)).await.unwrap() else {
            panic!("a free lease is taken");
        };
        let Acquired::Standby(standby) = acquire(&lake, me(600)).await.unwrap() else {
            panic!("a held lease is not taken");
        };
        // While the first renews, the standby waits.
        let waiting = tokio::spawn(standby.take_over());
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(!waiting.is_finished(), "the lease is renewed: no takeover");
        assert!(first.is_held());
        // The first stops renewing (as if paused): the standby takes over after the TTL,
        // and the first, renewing again, finds itself fenced.
        first.lost.cancel();
        let second = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("a takeover within the TTL")
            .unwrap()
            .unwrap();
        assert_eq!(second.generation(), first.generation() + 1);
        assert!(first.check().is_err(), "the old holder is fenced");
        assert!(second.check().is_ok());
    }
}
