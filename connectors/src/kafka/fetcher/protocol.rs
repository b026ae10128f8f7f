//! The part of the Kafka wire protocol a fetching consumer needs: Fetch requests and
//! responses (version 4: every broker since Kafka 0.11 speaks it; it carries the last
//! stable offset and the aborted transactions for `read_committed`), and record batches
//! (magic 2) with their compression codecs. Each batch's CRC-32C is checked before anything
//! in it is read (as librdkafka's `check.crcs` does): a batch that fails fails the source.
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
    let mut r = Reader::new(body, "fetch response");
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

/// A cursor over the fields of a response or a batch's records: big-endian integers and
/// zigzag varints, each checked against the end.
struct Reader<'a> {
    b: &'a [u8],
    i: usize,
    /// What is read, for the error when it ends early.
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(b: &'a [u8], what: &'static str) -> Self {
        Self { b, i: 0, what }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        let end = self.i.checked_add(n).filter(|e| *e <= self.b.len());
        let end = end.ok_or_else(|| bad(format!("{} ends early", self.what)))?;
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
    fn varint(&mut self) -> Result<i64, ProtocolError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let Some(&byte) = self.b.get(self.i) else {
                return Err(bad(format!("{} ends early", self.what)));
            };
            self.i += 1;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok((v >> 1) as i64 ^ -((v & 1) as i64));
            }
        }
        Err(bad("varint longer than 10 bytes"))
    }
    /// Bytes with a varint length (negative: null).
    fn nullable_bytes(&mut self) -> Result<Option<&'a [u8]>, ProtocolError> {
        let n = self.varint()?;
        if n < 0 {
            return Ok(None);
        }
        let n = usize::try_from(n).map_err(|_| bad("field too long"))?;
        self.take(n).map(Some)
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
    // The batch's CRC-32C covers everything after it (attributes to the last record):
    // corrupt bytes must never become rows.
    let stored = u32::from_be_bytes(b[17..21].try_into().expect("4 bytes"));
    let computed = crc32c::crc32c(&b[21..]);
    if stored != computed {
        return Err(bad(format!(
            "the record batch at offset {} fails its CRC-32C check (stored {stored:#010x}, \
             computed {computed:#010x}): the data was corrupted on the way",
            i64::from_be_bytes(b[0..8].try_into().expect("8 bytes"))
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
/// when it is compressed (`scratch` keeps its length between batches: only its first bytes,
/// as many as this batch decompressed to, are this batch's).
pub(crate) fn records<'s>(
    header: &BatchHeader,
    data: &'s [u8],
    scratch: &'s mut Vec<u8>,
    mut each: impl FnMut(RecordView<'_>),
) -> Result<(), ProtocolError> {
    let data: &[u8] = match header.codec() {
        0 => data,
        codec => {
            let n = decompress(codec, data, scratch)?;
            &scratch[..n]
        }
    };
    let mut r = Reader::new(data, "record");
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
    let mut r = Reader::new(record.headers, "record");
    for _ in 0..record.header_count.max(0) {
        let key = r.nullable_bytes()?.unwrap_or_default();
        let value = r.nullable_bytes()?;
        each(key, value);
    }
    Ok(())
}

/// Decompresses a batch's records with `codec` (1 gzip, 2 snappy, 3 lz4, 4 zstd) into the
/// start of `out`, returning how many bytes they take. `out` may be longer than that.
fn decompress(codec: i16, data: &[u8], out: &mut Vec<u8>) -> Result<usize, ProtocolError> {
    let failed = |e: &dyn std::fmt::Display| bad(format!("decompressing a record batch: {e}"));
    if codec == 3 {
        match lz4_blocks(data, out) {
            Lz4::Decoded(n) => return Ok(n),
            Lz4::Failed(e) => return Err(failed(&e)),
            Lz4::NotIndependent => {} // lz4_flex's frame decoder, below
        }
    }
    out.clear();
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
    Ok(out.len())
}

/// What [`lz4_blocks`] made of a record batch.
enum Lz4 {
    /// Its records took this many bytes at the start of the output.
    Decoded(usize),
    /// It is not LZ4 frames of independent blocks without a dictionary.
    NotIndependent,
    /// It is broken.
    Failed(String),
}

/// LZ4 frames as Kafka producers write them (librdkafka and the Java client: independent
/// blocks, no dictionary), each block decoded straight into `out` with lz4_flex's block
/// decoder: no copy through a frame decoder's buffer, and `out` only ever grows, so it is
/// zeroed once rather than per batch. Checksums are skipped (the broker checked the batch's
/// CRC when it was produced). Frames of linked blocks, with a dictionary or skippable, are
/// left to lz4_flex's frame decoder.
fn lz4_blocks(data: &[u8], out: &mut Vec<u8>) -> Lz4 {
    const MAGIC: u32 = 0x184D_2204;
    let broken = |what: &str| Lz4::Failed(format!("lz4 frame: {what}"));
    let (mut rest, mut used) = (data, 0usize);
    while !rest.is_empty() {
        let le32 = |b: &[u8], at: usize| {
            b.get(at..at + 4)
                .map(|w| u32::from_le_bytes(w.try_into().expect("4 bytes")))
        };
        if le32(rest, 0) != Some(MAGIC) || rest.len() < 7 {
            return Lz4::NotIndependent;
        }
        let (flags, bd) = (rest[4], rest[5]);
        let independent = flags & 0x20 != 0;
        if flags >> 6 != 1 || !independent || flags & 0x01 != 0 {
            return Lz4::NotIndependent;
        }
        let max = match (bd >> 4) & 7 {
            4 => 64 << 10,
            5 => 256 << 10,
            6 => 1 << 20,
            7 => 4 << 20,
            _ => return broken("unknown block size"),
        };
        let block_checksum = if flags & 0x10 != 0 { 4 } else { 0 };
        // Magic, flags, block size byte, the content size if present, the header checksum.
        let mut at = 6 + if flags & 0x08 != 0 { 8 } else { 0 } + 1;
        loop {
            let Some(size) = le32(rest, at) else {
                return broken("ends before its end mark");
            };
            at += 4;
            if size == 0 {
                break;
            }
            let n = (size & 0x7fff_ffff) as usize;
            let Some(block) = rest.get(at..at + n) else {
                return broken("block longer than the frame");
            };
            at += n + block_checksum;
            if size & 0x8000_0000 != 0 {
                // Stored uncompressed.
                if out.len() < used + n {
                    out.resize(used + n, 0);
                }
                out[used..used + n].copy_from_slice(block);
                used += n;
            } else {
                if out.len() < used + max {
                    out.resize(used + max, 0);
                }
                match lz4_flex::block::decompress_into(block, &mut out[used..used + max]) {
                    Ok(n) => used += n,
                    Err(e) => return Lz4::Failed(e.to_string()),
                }
            }
        }
        if flags & 0x04 != 0 {
            at += 4; // content checksum
        }
        let Some(next) = rest.get(at..) else {
            return broken("ends inside its checksum");
        };
        rest = next;
    }
    Lz4::Decoded(used)
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
    use std::io::Write as _;

    /// `data` as one LZ4 frame shaped by `info` (with `data`'s size if `info` has one).
    fn lz4_frame(data: &[u8], mut info: lz4_flex::frame::FrameInfo) -> Vec<u8> {
        if info.content_size.is_some() {
            info.content_size = Some(data.len() as u64);
        }
        let mut encoder = lz4_flex::frame::FrameEncoder::with_frame_info(info, Vec::new());
        encoder.write_all(data).expect("in memory");
        encoder.finish().expect("in memory")
    }

    #[test]
    fn lz4_frames_of_every_shape_decompress_to_their_input() {
        use lz4_flex::frame::{BlockMode, BlockSize, FrameInfo};
        // Compressible and incompressible parts, over several 64 KiB blocks.
        let mut data = Vec::new();
        let mut x = 1u64;
        for i in 0..300_000u64 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            data.push(if (i / 5000) % 2 == 0 {
                b'a' + (i % 7) as u8
            } else {
                (x >> 56) as u8
            });
        }
        let shapes = [
            FrameInfo::new(),
            FrameInfo::new()
                .block_checksums(true)
                .content_checksum(true),
            FrameInfo::new().content_size(Some(0)),
            FrameInfo::new().block_size(BlockSize::Max256KB),
            FrameInfo::new().block_mode(BlockMode::Linked),
        ];
        // `out` carries over between batches, longer than the next one needs.
        let mut out = vec![7u8; 1 << 20];
        for info in shapes {
            let linked = matches!(info.block_mode, BlockMode::Linked);
            for input in [&data[..], &data[..10], &[][..]] {
                let mut frames = lz4_frame(input, info.clone());
                let mut want = input.to_vec();
                // Two frames back to back decode as one stream (left out for linked blocks,
                // which lz4_flex's frame decoder takes one frame of).
                if !linked {
                    frames.extend(lz4_frame(b"tail", info.clone()));
                    want.extend_from_slice(b"tail");
                }
                let n = decompress(3, &frames, &mut out).expect("decodes");
                assert!(out[..n] == want[..], "{info:?}, {} bytes", input.len());
            }
        }
        // Independent blocks (the default, and what Kafka producers write) take the block path.
        let frame = lz4_frame(&data, FrameInfo::new());
        assert!(matches!(lz4_blocks(&frame, &mut out), Lz4::Decoded(n) if n == data.len()));
        let linked = lz4_frame(&data, FrameInfo::new().block_mode(BlockMode::Linked));
        assert!(matches!(lz4_blocks(&linked, &mut out), Lz4::NotIndependent));
        for cut in [5, 12, frame.len() / 2, frame.len() - 1] {
            assert!(
                decompress(3, &frame[..cut], &mut out).is_err(),
                "cut at {cut}"
            );
        }
    }

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
            assert_eq!(Reader::new(&b, "test").varint().unwrap(), v);
        }
    }

    /// A batch of `n` header bytes after the CRC (no records), its CRC set right.
    fn batch_bytes(base_offset: i64) -> Vec<u8> {
        let mut b = base_offset.to_be_bytes().to_vec();
        b.extend_from_slice(&((BATCH_HEADER - 12) as i32).to_be_bytes());
        b.extend_from_slice(&0i32.to_be_bytes()); // partition leader epoch
        b.push(2); // magic
        b.extend_from_slice(&[0u8; 4]); // crc, set below
        b.resize(BATCH_HEADER, 0);
        let crc = crc32c::crc32c(&b[21..]);
        b[17..21].copy_from_slice(&crc.to_be_bytes());
        b
    }

    #[test]
    fn a_batch_whose_crc_does_not_match_is_refused() {
        let good = batch_bytes(42);
        let (header, _) = batches(&good).next().unwrap().unwrap();
        assert_eq!(header.base_offset, 42);
        let mut flipped = good.clone();
        flipped[30] ^= 0x01; // a timestamp bit
        let err = batches(&flipped).next().unwrap().unwrap_err();
        assert!(err.to_string().contains("CRC-32C"), "{err}");
    }

    #[test]
    fn a_batch_cut_short_ends_the_iteration() {
        let mut b = vec![0u8; 8];
        b.extend_from_slice(&100i32.to_be_bytes());
        b.extend_from_slice(&[0u8; 20]);
        assert_eq!(batches(&b).count(), 0);
    }
}
