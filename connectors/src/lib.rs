//! Sluice's connectors: where rows come from and where they go.
//!
//! One folder per connector, one shape: `mod.rs` holds its options (validated from the SQL
//! `WITH (…)` map) and the reading or writing side lives next to it. Transports are kept
//! apart from formats (`formats/`), so every format works on every transport.
//!
//! - [`lake`]: the object-store lake (a local directory or `s3://bucket/prefix`): the
//!   Parquet writer of the processed zone, the raw and errors zones.
//! - [`datagen`]: a deterministic generator driven by the declared schema.
//! - [`http`]: push ingestion (`POST /v1/sources/{name}/events`).
//! - `kafka`, `kinesis`: topics and streams, read per partition / shard, and written
//!   (cargo features `kafka` and `aws`, on by default).
//! - `s3`: the landing zone: files landing under an S3 prefix (SQS notifications or
//!   listing), each ingested once (feature `aws`).
//! - `join` (with `kafka` or `aws`): how a stream created while a source's shared reader
//!   runs catches up with it (a backfill reader), then joins it.
//! - [`ingest`]: the stage every reader takes its records through (raw zone, decode, errors
//!   zone, metadata columns, event time, publish).
//! - [`split_clock`]: event time per partition or shard, and the source's watermark.
//! - [`registry()`]: the one list of connectors (each implements the engine's
//!   [`sluice_engine::connector`] traits).

pub mod aws;
pub mod datagen;
pub mod error;
pub mod formats;
pub mod http;
pub mod ingest;
#[cfg(any(feature = "kafka", feature = "aws"))]
pub mod join;
#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(feature = "aws")]
pub mod kinesis;
pub mod lake;
pub mod registry;
#[cfg(feature = "aws")]
pub mod s3;
pub mod split_clock;

pub use error::{ConnectorError, Result};
pub use registry::registry;
