//! What each pipeline must produce, computed without Sluice's operators: the same datagen
//! rows generated again and folded in plain Rust. A figure counts only when the pipeline's
//! result rows equal these exactly (the run fails loudly otherwise).
//!
//! - Windowed pipelines: per (auction, window_start, window_end), the count (and for `tumble`
//!   the sum of prices). Counted per slide-sized bucket first, then summed over the
//!   `size / slide` buckets of each window, so a 1-hour/1-minute `HOP` costs one map update
//!   per row here too.
//! - Row-shaped pipelines (`discard`, `lake`, `dedup`): a multiset fingerprint — the number of
//!   rows and the wrapping sum of a hash of each row's identifying columns. Two multisets
//!   that differ in any row differ in the sum but with probability 2⁻⁶⁴.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use anyhow::Context;
use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Int64Type, TimeUnit};
use sluice_engine::{FanOut, Message, SourceContext};
use tokio_util::sync::CancellationToken;

/// Per (auction, window_start µs, window_end µs): (rows, sum of price).
pub type Windows = BTreeMap<(i64, i64, i64), (i64, i64)>;

/// Rows and the wrapping sum of their hashes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fingerprint {
    /// Rows seen.
    pub rows: u64,
    /// Wrapping sum of each row's hash.
    pub sum: u64,
}

impl Fingerprint {
    /// Adds one row, given its hash.
    pub fn add(&mut self, hash: u64) {
        self.rows += 1;
        self.sum = self.sum.wrapping_add(hash);
    }
}

/// splitmix64's finaliser: a well-mixed 64-bit hash of one value.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The hash of a row from its integer fields and (optionally) one string.
pub fn row_hash(ints: &[i64], text: Option<&str>) -> u64 {
    let mut h = 0u64;
    for v in ints {
        h = mix(h ^ *v as u64);
    }
    if let Some(s) = text {
        // FNV-1a over the bytes, then mixed in.
        let mut f = 0xcbf2_9ce4_8422_2325u64;
        for b in s.as_bytes() {
            f = (f ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
        h = mix(h ^ f);
    }
    h
}

/// Column `name` of `batch` as i64 values (timestamps as their µs).
pub fn ints(batch: &RecordBatch, name: &str) -> anyhow::Result<arrow::array::Int64Array> {
    let col = batch
        .column_by_name(name)
        .with_context(|| format!("no column `{name}`"))?;
    let as_int = match col.data_type() {
        // Any unit or zone, as µs since the epoch.
        DataType::Timestamp(..) => arrow::compute::cast(
            &arrow::compute::cast(col, &DataType::Timestamp(TimeUnit::Microsecond, None))?,
            &DataType::Int64,
        )?,
        _ => arrow::compute::cast(col, &DataType::Int64)?,
    };
    Ok(as_int.as_primitive::<Int64Type>().clone())
}

/// Column `name` of `batch` as UTF-8 strings.
pub fn strings(batch: &RecordBatch, name: &str) -> anyhow::Result<arrow::array::StringArray> {
    let col = batch
        .column_by_name(name)
        .with_context(|| format!("no column `{name}`"))?;
    Ok(arrow::compute::cast(col, &DataType::Utf8)?
        .as_string::<i32>()
        .clone())
}

/// Folds every row `source_sql` (a datagen `CREATE SOURCE`) generates, in order.
pub async fn generated(
    source_sql: &str,
    mut fold: impl FnMut(&RecordBatch) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let def = crate::source_of(source_sql)?;
    let reader = crate::datagen_reader(&def)?;
    let out = FanOut::new("expected");
    let mut rx = out.subscribe(sluice_engine::DEFAULT_CHANNEL_CAPACITY);
    let (bad, mut bad_rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move { while bad_rx.recv().await.is_some() {} });
    let ctx = SourceContext {
        output: out.clone(),
        metrics: Arc::default(),
        bad_records: bad,
        cancel: CancellationToken::new(),
        checkpoint: None,
        watermark: None,
    };
    let task = tokio::spawn(async move {
        let r = reader.run(ctx).await;
        out.send(Message::End).await;
        r
    });
    while let Some(m) = rx.recv().await {
        match m {
            Message::Data(b) => fold(&b)?,
            Message::End => break,
            _ => {}
        }
    }
    task.await??;
    Ok(())
}

/// The windows of `size` sliding every `slide` (µs; `slide == size` is a tumble) over the
/// bids `source_sql` generates.
pub async fn windows(source_sql: &str, slide: i64, size: i64) -> anyhow::Result<Windows> {
    // (auction, bucket start) → (rows, sum of price)
    let mut buckets: BTreeMap<(i64, i64), (i64, i64)> = BTreeMap::new();
    generated(source_sql, |b| {
        let (auction, price, ts) = (ints(b, "auction")?, ints(b, "price")?, ints(b, "ts")?);
        for i in 0..b.num_rows() {
            let bucket = ts.value(i).div_euclid(slide) * slide;
            let e = buckets.entry((auction.value(i), bucket)).or_default();
            e.0 += 1;
            e.1 += price.value(i);
        }
        Ok(())
    })
    .await?;
    let k = size / slide;
    let mut out = Windows::new();
    for ((auction, bucket), (n, sum)) in buckets {
        // The bucket is in the windows starting at bucket − i·slide, i = 0 … k − 1.
        for i in 0..k {
            let start = bucket - i * slide;
            let e = out.entry((auction, start, start + size)).or_default();
            e.0 += n;
            e.1 += sum;
        }
    }
    Ok(out)
}

/// What `q8` must produce: per auction and tumbling window of `size` µs holding a bid over
/// `high`, its bids and the sum of the prices over `high`.
pub async fn q8_windows(source_sql: &str, size: i64, high: i64) -> anyhow::Result<Windows> {
    // (auction, window start) → (bids, volume over `high`, whether any bid is over `high`)
    let mut windows: BTreeMap<(i64, i64), (i64, i64, bool)> = BTreeMap::new();
    generated(source_sql, |b| {
        let (auction, price, ts) = (ints(b, "auction")?, ints(b, "price")?, ints(b, "ts")?);
        for i in 0..b.num_rows() {
            let start = ts.value(i).div_euclid(size) * size;
            let e = windows.entry((auction.value(i), start)).or_default();
            e.0 += 1;
            if price.value(i) > high {
                e.1 += price.value(i);
                e.2 = true;
            }
        }
        Ok(())
    })
    .await?;
    Ok(windows
        .into_iter()
        .filter(|(_, (_, _, any))| *any)
        .map(|((auction, start), (n, volume, _))| ((auction, start, start + size), (n, volume)))
        .collect())
}

/// The windows a windowed pipeline produced: `auction`, `window_start`, `window_end`, a count
/// column and (when `sum` is given) a sum column.
pub fn produced_windows(
    batches: &[RecordBatch],
    count: &str,
    sum: Option<&str>,
) -> anyhow::Result<Windows> {
    let mut out = Windows::new();
    for b in batches {
        let (auction, start, end, n) = (
            ints(b, "auction")?,
            ints(b, "window_start")?,
            ints(b, "window_end")?,
            ints(b, count)?,
        );
        let sums = sum.map(|s| ints(b, s)).transpose()?;
        for i in 0..b.num_rows() {
            let key = (auction.value(i), start.value(i), end.value(i));
            let value = (n.value(i), sums.as_ref().map_or(0, |s| s.value(i)));
            anyhow::ensure!(
                out.insert(key, value).is_none(),
                "window {key:?} was emitted twice"
            );
        }
    }
    Ok(out)
}

/// Fails with the first differences when `produced` is not `expected`.
pub fn same_windows(produced: &Windows, expected: &Windows, with_sum: bool) -> anyhow::Result<()> {
    let strip = |w: &Windows| -> Windows {
        w.iter()
            .map(|(k, (n, s))| (*k, (*n, if with_sum { *s } else { 0 })))
            .collect()
    };
    let (produced, expected) = (strip(produced), strip(expected));
    if produced == expected {
        return Ok(());
    }
    let mut diffs = vec![];
    for (k, v) in &expected {
        match produced.get(k) {
            Some(p) if p == v => {}
            other => diffs.push(format!("{k:?}: expected {v:?}, produced {other:?}")),
        }
    }
    for k in produced.keys().filter(|k| !expected.contains_key(k)) {
        diffs.push(format!("{k:?}: produced, not expected"));
    }
    anyhow::bail!(
        "the pipeline's windows differ from the expectation in {} of {} windows, e.g.\n  {}",
        diffs.len(),
        expected.len(),
        diffs
            .iter()
            .take(5)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n  ")
    )
}

/// The hash of a `discard`/`lake` result row: `user_id`, `ts`, `url`.
pub fn clean_click_hash(user_id: i64, ts: i64, url: &str) -> u64 {
    row_hash(&[user_id, ts], Some(url))
}

/// What `discard` and `lake` must produce: the clicks with a url, lower-cased.
pub async fn clean_clicks(source_sql: &str) -> anyhow::Result<Fingerprint> {
    let mut f = Fingerprint::default();
    generated(source_sql, |b| {
        let (user, ts, url) = (ints(b, "user_id")?, ints(b, "ts")?, strings(b, "url")?);
        for i in 0..b.num_rows() {
            if url.is_valid(i) {
                f.add(clean_click_hash(
                    user.value(i),
                    ts.value(i),
                    &url.value(i).to_lowercase(),
                ));
            }
        }
        Ok(())
    })
    .await?;
    Ok(f)
}

/// The fingerprint of `discard`/`lake` result rows.
pub fn fingerprint_clean_clicks(f: &mut Fingerprint, b: &RecordBatch) -> anyhow::Result<()> {
    let (user, ts, url) = (ints(b, "user_id")?, ints(b, "ts")?, strings(b, "url")?);
    for i in 0..b.num_rows() {
        f.add(clean_click_hash(user.value(i), ts.value(i), url.value(i)));
    }
    Ok(())
}

/// The hash of a `dedup` result row: the bidder and the time of its first bid.
pub fn first_bid_hash(bidder: i64, ts: i64) -> u64 {
    row_hash(&[bidder, ts], None)
}

/// What `dedup` must produce: each bidder's first bid (in generation order).
pub async fn first_bids(source_sql: &str) -> anyhow::Result<Fingerprint> {
    let mut f = Fingerprint::default();
    let mut seen = HashSet::new();
    generated(source_sql, |b| {
        let (bidder, ts) = (ints(b, "bidder")?, ints(b, "ts")?);
        for i in 0..b.num_rows() {
            if seen.insert(bidder.value(i)) {
                f.add(first_bid_hash(bidder.value(i), ts.value(i)));
            }
        }
        Ok(())
    })
    .await?;
    Ok(f)
}

/// The hash of a `join` result row.
fn bid_pair_hash(auction: i64, first: i64, next: i64, ts: i64) -> u64 {
    row_hash(&[auction, first, next, ts], None)
}

/// What `join` must produce: each bid with every later bid of its auction at most `within`
/// µs after it (the bids come in event-time order, each at its own time).
pub async fn bid_pairs(source_sql: &str, within: i64) -> anyhow::Result<Fingerprint> {
    let mut f = Fingerprint::default();
    // Per auction, the recent bids: (time, bidder), oldest first.
    let mut recent: std::collections::HashMap<i64, std::collections::VecDeque<(i64, i64)>> =
        std::collections::HashMap::new();
    generated(source_sql, |b| {
        let (auction, bidder, ts) = (ints(b, "auction")?, ints(b, "bidder")?, ints(b, "ts")?);
        for i in 0..b.num_rows() {
            let (a, t) = (auction.value(i), ts.value(i));
            let q = recent.entry(a).or_default();
            while q.front().is_some_and(|(u, _)| *u < t - within) {
                q.pop_front();
            }
            for (u, first) in q.iter() {
                if *u < t {
                    f.add(bid_pair_hash(a, *first, bidder.value(i), *u));
                }
            }
            q.push_back((t, bidder.value(i)));
        }
        Ok(())
    })
    .await?;
    Ok(f)
}

/// The fingerprint of `join` result rows.
pub fn fingerprint_bid_pairs(f: &mut Fingerprint, b: &RecordBatch) -> anyhow::Result<()> {
    let (auction, first, next, ts) = (
        ints(b, "auction")?,
        ints(b, "first_bidder")?,
        ints(b, "next_bidder")?,
        ints(b, "ts")?,
    );
    for i in 0..b.num_rows() {
        f.add(bid_pair_hash(
            auction.value(i),
            first.value(i),
            next.value(i),
            ts.value(i),
        ));
    }
    Ok(())
}
