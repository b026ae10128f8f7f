//! `s3`: a landing-zone source — files landing under an S3 prefix become rows.
//!
//! ```sql
//! CREATE SOURCE invoices (invoice_id TEXT NOT NULL, amount DOUBLE, ts TIMESTAMP NOT NULL)
//! WITH (connector = 's3', path = 's3://landing/invoices/', format = 'json',
//!       notifications = 'https://sqs.eu-west-1.amazonaws.com/123456789012/landing-events');
//! ```
//!
//! Options:
//! - `path` (required) — `s3://bucket/prefix/`: objects under it are ingested.
//! - `format` — `json` (JSON lines, the default), `csv` (a header line, then one row per line;
//!   columns by header name) or `parquet` (columns by name). Gzip (`.gz`, or the gzip magic
//!   bytes) is detected and decompressed on the fly for JSON and CSV.
//! - `notifications` — the URL of an SQS queue receiving the bucket's `ObjectCreated` event
//!   notifications: new objects are ingested as they are announced. Without it, the prefix
//!   is listed every `poll_interval` (default `30 seconds`). Either way the prefix is listed
//!   once at start, so objects that landed while Sluice was down are not missed.
//! - `region`, `endpoint` — override `AWS_REGION` / `AWS_ENDPOINT_URL` for S3 and SQS.
//! - `batch_size` — rows per batch (default 8192).
//!
//! Each object is ingested once: its bucket, key and ETag are recorded in the lake
//! (`_sluice/sources/<source>/objects/…`) once its rows are published, and an object already
//! recorded is skipped, however often it is announced (S3 notifications are at least once)
//! or listed. A new version of an object (another ETag) is a new object. Objects are read as
//! streams, never loaded whole. Rows that fail to decode or to fit the schema go to
//! `errors/<source>/` with the object and line; an object that cannot be read at all
//! (corrupt gzip, not Parquet, …) goes there whole, with its reason.
//!
//! Rows are published to every stream reading the source (like `http`), only while one does.

mod connector;
mod source;

pub use connector::S3Connector;
pub use source::LandingReader;

use std::time::Duration;

use sluice_engine::WithOptions;

use crate::error::{ConnectorError, Result};

/// How landed objects are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileFormat {
    /// JSON lines.
    Json,
    /// CSV with a header line.
    Csv,
    /// Parquet.
    Parquet,
}

/// Validated options of an `s3` source.
#[derive(Debug, Clone, PartialEq)]
pub struct LandingConfig {
    /// The bucket.
    pub bucket: String,
    /// The key prefix (may be empty).
    pub prefix: String,
    /// How objects are encoded.
    pub format: FileFormat,
    /// The SQS queue receiving the bucket's notifications.
    pub notifications: Option<String>,
    /// How often the prefix is listed without notifications.
    pub poll_interval: Duration,
    /// Region and endpoint overrides.
    pub aws: crate::kinesis::AwsOptions,
    /// Rows per batch.
    pub batch_size: usize,
}

impl LandingConfig {
    /// Takes the `s3` source options from `opts`.
    pub fn try_new(opts: &mut WithOptions) -> Result<Self> {
        let path = opts.take_required("path")?;
        let Some(rest) = path.strip_prefix("s3://") else {
            return Err(opts.bad("path", &path, "an s3://bucket/prefix/ URL").into());
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(opts.bad("path", &path, "an s3://bucket/prefix/ URL").into());
        }
        let format = match opts.take_str("format") {
            None => FileFormat::Json,
            Some(f) => match f.to_ascii_lowercase().as_str() {
                "json" => FileFormat::Json,
                "csv" => FileFormat::Csv,
                "parquet" => FileFormat::Parquet,
                _ => {
                    return Err(opts
                        .bad("format", &f, "one of 'json', 'csv', 'parquet'")
                        .into());
                }
            },
        };
        let notifications = opts.take_str("notifications");
        if let Some(url) = &notifications
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(ConnectorError::InvalidConfig(format!(
                "{}: option `notifications` = '{url}' is invalid: expected the URL of an SQS queue",
                opts.owner()
            )));
        }
        let poll_interval = opts
            .take_duration("poll_interval")?
            .unwrap_or(Duration::from_secs(30));
        let batch_size: usize = opts
            .take_parsed("batch_size", "a positive integer")?
            .unwrap_or(8192);
        if batch_size == 0 {
            return Err(opts.bad("batch_size", "0", "a positive integer").into());
        }
        Ok(Self {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
            format,
            notifications,
            poll_interval,
            aws: crate::kinesis::AwsOptions::take(opts)?,
            batch_size,
        })
    }
}

/// One object of the landing zone, as a notification or a listing names it.
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct LandedObject {
    /// Its bucket.
    pub bucket: String,
    /// Its key (decoded).
    pub key: String,
    /// Its ETag, without quotes.
    pub etag: String,
}

/// The objects an S3 event notification (an SQS message body) announces as created; an
/// `s3:TestEvent` or any other event announces none. Keys arrive URL-encoded (`+` for a
/// space) and are decoded.
pub fn created_objects(body: &str) -> std::result::Result<Vec<LandedObject>, String> {
    let event: serde_json::Value =
        serde_json::from_str(body).map_err(|e| format!("not JSON: {e}"))?;
    let Some(records) = event.get("Records").and_then(|r| r.as_array()) else {
        return Ok(vec![]); // s3:TestEvent and the like
    };
    let mut out = Vec::new();
    for r in records {
        let name = r.get("eventName").and_then(|n| n.as_str()).unwrap_or("");
        if !name.starts_with("ObjectCreated") {
            continue;
        }
        let s3 = &r["s3"];
        let (Some(bucket), Some(key)) =
            (s3["bucket"]["name"].as_str(), s3["object"]["key"].as_str())
        else {
            return Err(format!(
                "an ObjectCreated record without bucket or key: {r}"
            ));
        };
        let key = url::form_urlencoded::parse(format!("k={key}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default();
        out.push(LandedObject {
            bucket: bucket.to_string(),
            key,
            etag: s3["object"]["eTag"]
                .as_str()
                .unwrap_or_default()
                .trim_matches('"')
                .to_string(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_name_decoded_keys_and_test_events_none() {
        let body = r#"{"Records":[{"eventName":"ObjectCreated:Put","s3":{"bucket":{"name":"landing"},
            "object":{"key":"invoices%2F2024%2Fmy+file%2B1.json","eTag":"\"abc\"","size":3}}},
            {"eventName":"ObjectRemoved:Delete","s3":{"bucket":{"name":"landing"},"object":{"key":"x"}}}]}"#;
        assert_eq!(
            created_objects(body).unwrap(),
            vec![LandedObject {
                bucket: "landing".into(),
                key: "invoices/2024/my file+1.json".into(),
                etag: "abc".into(),
            }]
        );
        let test_event = r#"{"Service":"Amazon S3","Event":"s3:TestEvent","Bucket":"landing"}"#;
        assert_eq!(created_objects(test_event).unwrap(), vec![]);
        assert!(created_objects("nope").is_err());
    }
}
