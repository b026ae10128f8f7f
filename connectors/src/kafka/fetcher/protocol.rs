//! The part of the Kafka wire protocol a fetching consumer needs: Fetch requests and
//! responses (version 4: every broker since Kafka 0.11 speaks it; it carries the last
//! stable offset and the aborted transactions for `read_committed`), and record batches
//! (magic 2) with their compression codecs.
//!
//! Reference: the protocol guide (kafka.apache.org/protocol) and the record batch layout
//! (kafka.apache.org/documentation/#recordbatch). Everything is big-endian; record fields
//! are zigzag varints.

use std::io::Read as _;

/// A response that does not parse, or a batch that does not decode.
#[derive(Debug, thiserror::Error)]
#[error("kafka protocol: {0}")]
pub(crate) struct ProtocolError(pub(crate) String);

fn bad(what: impl Into<String>) -> ProtocolError {
    ProtocolError(what.into())
}

/// The Fetch API's key, and the version spoken.
const FETCH: i16 = 1;
const FETCH_VERSION: i16 = 4;

/// What to fetch of one partition.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PartitionFetch {
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    pub(crate) max_bytes: i32,
}

/// The limits of one Fetch request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FetchLimits {
    /// How long the broker may wait for `min_bytes`.
    pub(crate) max_wait_ms: i32,
    pub(crate) min_bytes: i32,
    /// For the whole response.
    pub(crate) max_bytes: i32,
    /// 0: read uncommitted, 1: read committed.
    pub(crate) isolation: i8,
}

/// Writes a Fetch request for `partitions` of `topic` into `out` (size prefix included).
pub(crate) fn fetch_request(
    out: &mut Vec<u8>,
    correlation: i32,
    client_id: &str,
    topic: &str,
    partitions: &[PartitionFetch],
    limits: FetchLimits,
) {
    out.clear();
    out.extend_from_slice(&0i32.to_be_bytes()); // size, patched below
    out.extend_from_slice(&FETCH.to_be_bytes());
    out.extend_from_slice(&FETCH_VERSION.to_be_bytes());
    out.extend_from_slice(&correlation.to_be_bytes());
    put_string(out, client_id);
    out.extend_from_slice(&(-1i32).to_be_bytes()); // replica id: a consumer
    out.extend_from_slice(&limits.max_wait_ms.to_be_bytes());
    out.extend_from_slice(&limits.min_bytes.to_be_bytes());
    out.extend_from_slice(&limits.max_bytes.to_be_bytes());
    out.push(limits.isolation as u8);
    out.extend_from_slice(&1i32.to_be_bytes()); // one topic
    put_string(out, topic);
    out.extend_from_slice(&(partitions.len() as i32).to_be_bytes());
    for p in partitions {
        out.extend_from_slice(&p.partition.to_be_bytes());
        out.extend_from_slice(&p.offset.to_be_bytes());
        out.extend_from_slice(&p.max_bytes.to_be_bytes());
    }
    let size = (out.len() - 4) as i32;
    out[..4].copy_from_slice(&size.to_be_bytes());
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as i16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// One partition of a Fetch response.
#[derive(Debug)]
pub(crate) struct PartitionData<'a> {
    pub(crate) partition: i32,
    pub(crate) error: i16,
    pub(crate) high_watermark: i64,
    /// Transactions aborted in the fetched range: (producer id, first offset).
    pub(crate) aborted: Vec<(i64, i64)>,
    /// Record batches; the last one may be cut short.
    pub(crate) records: &'a [u8],
}

/// Parses a Fetch response (without its size prefix): its correlation id and the
/// partitions of `topic`.
pub(crate) fn fetch_response<'a>(
    body: &'a [u8],
    topic: &str,
) -> Result<(i32, Vec<PartitionData<'a>>), ProtocolError> {
    let mut r = Reader { b: body, i: 0 };
    let correlation = r.i32()?;
    let _throttle_ms = r.i32()?;
    let mut out = Vec::new();
    for _ in 0..r.len()? {
        let name = r.string()?;
        for _ in 0..r.len()? {
            let partition = r.i32()?;
            let error = r.i16()?;
            let high_watermark = r.i64()?;
            let _last_stable_offset = r.i64()?;
            let n = r.i32()?; // -1: null
            let mut aborted = Vec::with_capacity(n.max(0) as usize);
            for _ in 0..n.max(0) {
                aborted.push((r.i64()?, r.i64()?));
            }
            let records = r.bytes()?.unwrap_or_default();
            if name == topic.as_bytes() {
                out.push(PartitionData {
                    partition,
                    error,
                    high_watermark,
                    aborted,
                    records,
                });
            }
        }
    }
    Ok((correlation, out))
}

/// Big-endian fields of a response, checked against its end.
struct Reader<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        let end = self.i.checked_add(n).filter(|e| *e <= self.b.len());
        let end = end.ok_or_else(|| bad("fetch response ends early"))?;
        let s = &self.b[self.i..end];
        self.i = end;
        Ok(s)
    }
    fn i16(&mut self) -> Result<i16, ProtocolError> {
        Ok(i16::from_be_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }
    fn i32(&mut self) -> Result<i32, ProtocolError> {
        Ok(i32::from_be_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn i64(&mut self) -> Result<i64, ProtocolError> {
        Ok(i64::from_be_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    /// An array's length (a null array is empty).
    fn len(&mut self) -> Result<i32, ProtocolError> {
        Ok(self.i32()?.max(0))
    }
    fn string(&mut self) -> Result<&'a [u8], ProtocolError> {
        let n = self.i16()?;
        self.take(n.max(0) as usize)
    }
    fn bytes(&mut self) -> Result<Option<&'a [u8]>, ProtocolError> {
        let n = self.i32()?;
        if n < 0 {
            return Ok(None);
        }
        self.take(n as usize).map(Some)
    }
}

/// The header of one record batch.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BatchHeader {
    pub(crate) base_offset: i64,
    attributes: i16,
    last_offset_delta: i32,
    base_timestamp: i64,
    max_timestamp: i64,
    pub(crate) producer_id: i64,
    record_count: i32,
}

/// The size of a batch's header, up to its records.
const BATCH_HEADER: usize = 61;

impl BatchHeader {
    /// The offset after the batch's last record.
    pub(crate) fn next_offset(&self) -> i64 {
        self.base_offset + i64::from(self.last_offset_delta) + 1
    }
    pub(crate) fn is_transactional(&self) -> bool {
        self.attributes & 0x10 != 0
    }
    pub(crate) fn is_control(&self) -> bool {
        self.attributes & 0x20 != 0
    }
    fn codec(&self) -> i16 {
        self.attributes & 0x7
    }
    /// The timestamp of a record with `delta`: log-append time batches carry one for all.
    fn timestamp(&self, delta: i64) -> i64 {
        if self.attributes & 0x8 != 0 {
            self.max_timestamp
        } else {
            self.base_timestamp + delta
        }
    }
}

/// One record of a batch.
#[derive(Debug)]
pub(crate) struct RecordView<'a> {
    pub(crate) offset: i64,
    /// ms since the epoch; `None` when the producer set none.
    pub(crate) timestamp: Option<i64>,
    pub(crate) key: Option<&'a [u8]>,
    pub(crate) value: Option<&'a [u8]>,
    /// The headers, still encoded (see [`headers`]).
    pub(crate) headers: &'a [u8],
    pub(crate) header_count: i64,
}

/// The record batches in a partition's `records`: each one's header and its (possibly
/// compressed) records. A batch cut short at the end (the broker sends whole batches up to
/// the byte limit, then part of the next) ends the iteration.
pub(crate) fn batches(
    records: &[u8],
) -> impl Iterator<Item = Result<(BatchHeader, &[u8]), ProtocolError>> {
    let mut at = 0usize;
    std::iter::from_fn(move || {
        let rest = &records[at..];
        if rest.len() < 12 {
            return None;
        }
        let length = i32::from_be_bytes(rest[8..12].try_into().expect("4 bytes"));
        let total = 12 + length.max(0) as usize;
        if rest.len() < total {
            return None;
        }
        at += total;
        Some(batch(&rest[..total]))
    })
}

fn batch(b: &[u8]) -> Result<(BatchHeader, &[u8]), ProtocolError> {
    if b.len() < BATCH_HEADER {
        return Err(bad("record batch shorter than its header"));
    }
    let magic = b[16];
    if magic != 2 {
        return Err(bad(format!(
            "message format v{magic} (Kafka before 0.11) is not supported; the topic needs \
             record batches (magic 2)"
        )));
    }
    let be16 = |i: usize| i16::from_be_bytes(b[i..i + 2].try_into().expect("2 bytes"));
    let be32 = |i: usize| i32::from_be_bytes(b[i..i + 4].try_into().expect("4 bytes"));
    let be64 = |i: usize| i64::from_be_bytes(b[i..i + 8].try_into().expect("8 bytes"));
    let header = BatchHeader {
        base_offset: be64(0),
        attributes: be16(21),
        last_offset_delta: be32(23),
        base_timestamp: be64(27),
        max_timestamp: be64(35),
        producer_id: be64(43),
        record_count: be32(57),
    };
    Ok((header, &b[BATCH_HEADER..]))
}

/// Calls `each` with every record of a batch, decompressing its `data` into `scratch` first
/// when it is compressed.
pub(crate) fn records<'s>(
    header: &BatchHeader,
    data: &'s [u8],
    scratch: &'s mut Vec<u8>,
    mut each: impl FnMut(RecordView<'_>),
) -> Result<(), ProtocolError> {
    let data: &[u8] = match header.codec() {
        0 => data,
        codec => {
            decompress(codec, data, scratch)?;
            scratch
        }
    };
    let mut r = Varints { b: data, i: 0 };
    for _ in 0..header.record_count.max(0) {
        let length = r.varint()?;
        let end = r.i + usize::try_from(length).map_err(|_| bad("negative record length"))?;
        if end > data.len() {
            return Err(bad("record longer than its batch"));
        }
        let _attributes = r.take(1)?;
        let timestamp_delta = r.varint()?;
        let offset_delta = r.varint()?;
        let key = r.nullable_bytes()?;
        let value = r.nullable_bytes()?;
        let header_count = r.varint()?;
        let headers = &data[r.i..end];
        r.i = end;
        let timestamp = header.timestamp(timestamp_delta);
        each(RecordView {
            offset: header.base_offset + offset_delta,
            timestamp: (timestamp >= 0).then_some(timestamp),
            key,
            value,
            headers,
            header_count,
        });
    }
    Ok(())
}

/// Calls `each` with every header of a record: its key and value.
pub(crate) fn headers(
    record: &RecordView<'_>,
    mut each: impl FnMut(&[u8], Option<&[u8]>),
) -> Result<(), ProtocolError> {
    let mut r = Varints {
        b: record.headers,
        i: 0,
    };
    for _ in 0..record.header_count.max(0) {
        let key = r.nullable_bytes()?.unwrap_or_default();
        let value = r.nullable_bytes()?;
        each(key, value);
    }
    Ok(())
}

/// Zigzag varints and the fields built of them.
struct Varints<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Varints<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        let end = self.i.checked_add(n).filter(|e| *e <= self.b.len());
        let end = end.ok_or_else(|| bad("record ends early"))?;
        let s = &self.b[self.i..end];
        self.i = end;
        Ok(s)
    }

    fn varint(&mut self) -> Result<i64, ProtocolError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self.b.get(self.i).ok_or_else(|| bad("record ends early"))?;
            self.i += 1;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok((v >> 1) as i64 ^ -((v & 1) as i64));
            }
        }
        Err(bad("varint longer than 10 bytes"))
    }

    fn nullable_bytes(&mut self) -> Result<Option<&'a [u8]>, ProtocolError> {
        let n = self.varint()?;
        if n < 0 {
            return Ok(None);
        }
        let n = usize::try_from(n).map_err(|_| bad("field too long"))?;
        self.take(n).map(Some)
    }
}

/// Decompresses a batch's records with `codec` (1 gzip, 2 snappy, 3 lz4, 4 zstd).
fn decompress(codec: i16, data: &[u8], out: &mut Vec<u8>) -> Result<(), ProtocolError> {
    out.clear();
    let failed = |e: &dyn std::fmt::Display| bad(format!("decompressing a record batch: {e}"));
    match codec {
        1 => {
            flate2::read::MultiGzDecoder::new(data)
                .read_to_end(out)
                .map_err(|e| failed(&e))?;
        }
        2 => snappy(data, out).map_err(|e| failed(&e))?,
        3 => {
            lz4_flex::frame::FrameDecoder::new(data)
                .read_to_end(out)
                .map_err(|e| failed(&e))?;
        }
        4 => {
            zstd::stream::read::Decoder::with_buffer(data)
                .and_then(|mut d| d.read_to_end(out))
                .map_err(|e| failed(&e))?;
        }
        other => return Err(bad(format!("unknown compression codec {other}"))),
    }
    Ok(())
}

/// Snappy as Kafka producers write it: the Java client's framing (a magic header, then
/// blocks each with its length), or one raw block.
fn snappy(data: &[u8], out: &mut Vec<u8>) -> Result<(), snap::Error> {
    const JAVA_MAGIC: &[u8] = b"\x82SNAPPY\x00";
    let mut decoder = snap::raw::Decoder::new();
    if !data.starts_with(JAVA_MAGIC) {
        *out = decoder.decompress_vec(data)?;
        return Ok(());
    }
    let mut rest = &data[16.min(data.len())..]; // magic, version, compatible version
    while rest.len() >= 4 {
        let n = u32::from_be_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
        let block = rest.get(4..4 + n).ok_or(snap::Error::Header)?;
        out.extend_from_slice(&decoder.decompress_vec(block)?);
        rest = &rest[4 + n..];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zigzag(v: i64, out: &mut Vec<u8>) {
        let mut u = ((v << 1) ^ (v >> 63)) as u64;
        loop {
            let byte = (u & 0x7f) as u8;
            u >>= 7;
            if u == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }

    #[test]
    fn varints_round_trip() {
        for v in [
            0i64,
            1,
            -1,
            63,
            -64,
            64,
            300,
            -300,
            i32::MAX.into(),
            i64::MIN,
            i64::MAX,
        ] {
            let mut b = Vec::new();
            zigzag(v, &mut b);
            assert_eq!(Varints { b: &b, i: 0 }.varint().unwrap(), v);
        }
    }

    #[test]
    fn a_batch_cut_short_ends_the_iteration() {
        let mut b = vec![0u8; 8];
        b.extend_from_slice(&100i32.to_be_bytes());
        b.extend_from_slice(&[0u8; 20]);
        assert_eq!(batches(&b).count(), 0);
    }
}
