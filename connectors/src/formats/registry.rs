//! A client of a Confluent-compatible schema registry (the REST API Confluent's, Karapace and
//! Apicurio's compatibility layer serve): schemas fetched by id, and registered under a
//! subject.
//!
//! Transient failures (connection refused, timeouts, 5xx) are retried with backoff for about
//! ten seconds; a missing schema (404) is an answer, not a failure.

use std::time::Duration;

use sluice_engine::retry::RetryPolicy;

use serde::Deserialize;

use crate::error::{ConnectorError, Result};

/// A schema registry at one base URL.
#[derive(Debug, Clone)]
pub struct SchemaRegistry {
    base: String,
    http: reqwest::Client,
}

/// The body of `GET /schemas/ids/{id}`.
#[derive(Deserialize)]
struct SchemaById {
    schema: String,
    #[serde(rename = "schemaType")]
    schema_type: Option<String>,
}

/// The body of `POST /subjects/{subject}/versions`.
#[derive(Deserialize)]
struct Registered {
    id: u32,
}

/// How long transient failures are retried, in total.
const RETRY_FOR: Duration = Duration::from_secs(10);

impl SchemaRegistry {
    /// A client of the registry at `url` (`http://host:port`, optionally with a path prefix).
    pub fn new(url: &str) -> Result<Self> {
        let is_http = url::Url::parse(url).is_ok_and(|u| matches!(u.scheme(), "http" | "https"));
        if !is_http {
            return Err(ConnectorError::InvalidConfig(format!(
                "schema_registry `{url}`: expected an http:// or https:// URL"
            )));
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| ConnectorError::InvalidConfig(format!("schema_registry `{url}`: {e}")))?;
        Ok(Self {
            base: url.trim_end_matches('/').to_string(),
            http,
        })
    }

    /// The registry's URL.
    pub fn url(&self) -> &str {
        &self.base
    }

    /// The Avro schema (JSON) registered with `id`; `None` when the registry has no such id.
    pub async fn schema_by_id(&self, id: u32) -> Result<Option<String>> {
        let url = format!("{}/schemas/ids/{id}", self.base);
        let Some(body) = self.send(|| self.http.get(&url), &url).await? else {
            return Ok(None);
        };
        let found: SchemaById = serde_json::from_slice(&body)
            .map_err(|e| self.failed(&url, format!("unexpected answer: {e}: {}", lossy(&body))))?;
        if let Some(kind) = found
            .schema_type
            .filter(|k| !k.eq_ignore_ascii_case("AVRO"))
        {
            return Err(self.failed(&url, format!("schema {id} is {kind}, not AVRO")));
        }
        Ok(Some(found.schema))
    }

    /// Registers the Avro `schema` (JSON) under `subject` (or finds it registered); its id.
    pub async fn register(&self, subject: &str, schema: &str) -> Result<u32> {
        let url = format!("{}/subjects/{subject}/versions", self.base);
        let body = serde_json::json!({ "schema": schema, "schemaType": "AVRO" });
        let answer = self
            .send(
                || {
                    self.http
                        .post(&url)
                        .header("Content-Type", "application/vnd.schemaregistry.v1+json")
                        .json(&body)
                },
                &url,
            )
            .await?
            .ok_or_else(|| self.failed(&url, "404 Not Found".into()))?;
        let registered: Registered = serde_json::from_slice(&answer).map_err(|e| {
            self.failed(&url, format!("unexpected answer: {e}: {}", lossy(&answer)))
        })?;
        Ok(registered.id)
    }

    /// Sends the request `make` builds, retrying transient failures; the body of a success,
    /// `None` on 404.
    async fn send(
        &self,
        make: impl Fn() -> reqwest::RequestBuilder,
        url: &str,
    ) -> Result<Option<bytes::Bytes>> {
        let mut retry = RetryPolicy {
            initial: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
            max_attempts: None,
            give_up_after: Some(RETRY_FOR),
        }
        .start();
        loop {
            let outcome = match make().send().await {
                Ok(response) => {
                    let status = response.status();
                    let body = response.bytes().await.unwrap_or_default();
                    if status.is_success() {
                        return Ok(Some(body));
                    }
                    if status == reqwest::StatusCode::NOT_FOUND {
                        return Ok(None);
                    }
                    let failure = format!("{status}: {}", lossy(&body));
                    if !status.is_server_error() {
                        return Err(self.failed(url, failure));
                    }
                    failure
                }
                Err(e) => e.to_string(),
            };
            let Some(delay) = retry.next_delay() else {
                return Err(self.failed(url, outcome));
            };
            tracing::warn!(registry = %self.base, "schema registry: {outcome}; retrying");
            tokio::time::sleep(delay).await;
        }
    }

    fn failed(&self, url: &str, reason: String) -> ConnectorError {
        ConnectorError::SchemaRegistry {
            url: url.to_string(),
            reason,
        }
    }
}

fn lossy(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    text.chars().take(300).collect()
}
