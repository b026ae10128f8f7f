//! [`WithOptions`]: typed, validated access to a `WITH (key = 'value', …)` map.
//!
//! Every consumer takes the options it knows; [`WithOptions::finish`] then fails on any
//! option nobody took, naming it and suggesting the closest known one. A typo is an error,
//! never a silent default.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use datafusion::common::utils::datafusion_strsim::levenshtein;

use crate::error::{EngineError, Result};

/// The options of one `CREATE … WITH (…)` statement, being validated.
#[derive(Debug, Clone)]
pub struct WithOptions {
    owner: String,
    map: BTreeMap<String, String>,
    known: Vec<String>,
}

impl WithOptions {
    /// Options of `owner` (e.g. "source `orders`"), from key/value pairs. Keys are
    /// case-insensitive.
    pub fn new(
        owner: impl Into<String>,
        pairs: impl IntoIterator<Item = (String, String)>,
    ) -> Self {
        Self {
            owner: owner.into(),
            map: pairs
                .into_iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v))
                .collect(),
            known: Vec::new(),
        }
    }

    /// Who these options belong to, for error messages.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Whether `key` is present (it is not taken).
    pub fn contains(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }

    /// Takes an optional string option.
    pub fn take_str(&mut self, key: &str) -> Option<String> {
        self.known.push(key.to_string());
        self.map.remove(key)
    }

    /// Takes a required string option.
    pub fn take_required(&mut self, key: &str) -> Result<String> {
        self.take_str(key).ok_or_else(|| {
            EngineError::InvalidOption(format!("{}: option `{key}` is required", self.owner))
        })
    }

    /// Takes an optional option parsed with `FromStr`; `what` describes the expected value.
    pub fn take_parsed<T: FromStr>(&mut self, key: &str, what: &str) -> Result<Option<T>> {
        match self.take_str(key) {
            None => Ok(None),
            Some(v) => v
                .trim()
                .parse()
                .map(Some)
                .map_err(|_| self.bad(key, &v, what)),
        }
    }

    /// Takes an optional boolean (`true`/`false`).
    pub fn take_bool(&mut self, key: &str) -> Result<Option<bool>> {
        match self.take_str(key) {
            None => Ok(None),
            Some(v) => match v.trim().to_ascii_lowercase().as_str() {
                "true" | "on" | "yes" | "1" => Ok(Some(true)),
                "false" | "off" | "no" | "0" => Ok(Some(false)),
                _ => Err(self.bad(key, &v, "`true` or `false`")),
            },
        }
    }

    /// Takes an optional duration such as `'10 seconds'`, `'500 ms'`, `'1 minute'`, `'2h'`.
    pub fn take_duration(&mut self, key: &str) -> Result<Option<Duration>> {
        match self.take_str(key) {
            None => Ok(None),
            Some(v) => parse_duration(&v)
                .map(Some)
                .ok_or_else(|| self.bad(key, &v, "a duration such as '10 seconds' or '500 ms'")),
        }
    }

    /// Takes an optional size such as `'128MB'`, `'64 KiB'`, `'1000000'` (bytes).
    pub fn take_bytes(&mut self, key: &str) -> Result<Option<u64>> {
        match self.take_str(key) {
            None => Ok(None),
            Some(v) => parse_bytes(&v)
                .map(Some)
                .ok_or_else(|| self.bad(key, &v, "a size such as '128MB' or '64KB'")),
        }
    }

    /// Takes every option whose key starts with `prefix` (e.g. `fields.`), returning the rest
    /// of each key and its value.
    pub fn take_prefixed(&mut self, prefix: &str) -> Vec<(String, String)> {
        self.known.push(format!("{prefix}…"));
        let keys: Vec<String> = self
            .map
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect();
        keys.into_iter()
            .map(|k| {
                let v = self.map.remove(&k).unwrap_or_default();
                (k[prefix.len()..].to_string(), v)
            })
            .collect()
    }

    /// An error about these options, saying whose they are (without any value: for
    /// options that may hold credentials).
    pub fn error(&self, message: &str) -> EngineError {
        EngineError::InvalidOption(format!("{}: {message}", self.owner))
    }

    /// An error saying option `key` has the bad value `value`; `what` says what is expected.
    pub fn bad(&self, key: &str, value: &str, what: &str) -> EngineError {
        EngineError::InvalidOption(format!(
            "{}: option `{key}` = '{value}' is invalid: expected {what}",
            self.owner
        ))
    }

    /// Fails if any option was not taken, naming it and the closest known option.
    pub fn finish(self) -> Result<()> {
        let Some(key) = self.map.keys().next() else {
            return Ok(());
        };
        let suggestion = self
            .known
            .iter()
            .map(|k| (levenshtein(key, k), k))
            .filter(|(d, k)| *d <= 2.max(k.len() / 3))
            .min()
            .map(|(_, k)| format!(" (did you mean `{k}`?)"))
            .unwrap_or_default();
        let mut known: Vec<_> = self.known.clone();
        known.sort();
        known.dedup();
        Err(EngineError::InvalidOption(format!(
            "{}: option `{key}` is not known{suggestion}; known options: {}",
            self.owner,
            known.join(", ")
        )))
    }
}

/// Parses `'10 seconds'`, `'10s'`, `'500 ms'`, `'10 us'`, `'1 minute'`, `'2 hours'`, `'1 day'`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim().to_ascii_lowercase();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.')?;
    let (num, unit) = s.split_at(split);
    let n: f64 = num.trim().parse().ok()?;
    let secs = match unit.trim() {
        "us" | "µs" | "micros" | "microsecond" | "microseconds" => n / 1e6,
        "ms" | "millis" | "millisecond" | "milliseconds" => n / 1000.0,
        "s" | "sec" | "secs" | "second" | "seconds" => n,
        "m" | "min" | "mins" | "minute" | "minutes" => n * 60.0,
        "h" | "hour" | "hours" => n * 3600.0,
        "d" | "day" | "days" => n * 86400.0,
        _ => return None,
    };
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs))
}

/// Parses `'128MB'`, `'64 KiB'`, `'1GB'`, `'1000'` (bytes). Units are powers of 1024.
pub fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim().to_ascii_lowercase();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.trim().parse().ok()?;
    let mult = match unit.trim() {
        "" | "b" | "bytes" => 1.0,
        "k" | "kb" | "kib" => 1024.0,
        "m" | "mb" | "mib" => 1024.0 * 1024.0,
        "g" | "gb" | "gib" => 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    (n.is_finite() && n >= 0.0).then_some((n * mult) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(pairs: &[(&str, &str)]) -> WithOptions {
        WithOptions::new(
            "source `orders`",
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    #[test]
    fn a_typo_is_an_error_with_a_suggestion() {
        let mut o = opts(&[("topci", "orders")]);
        assert_eq!(o.take_str("topic"), None);
        let err = o.finish().unwrap_err().to_string();
        assert_eq!(
            err,
            "source `orders`: option `topci` is not known (did you mean `topic`?); known options: topic"
        );
    }

    #[test]
    fn typed_values_are_checked() {
        let mut o = opts(&[("rows_per_second", "fast"), ("interval", "10 seconds")]);
        let err = o
            .take_parsed::<u64>("rows_per_second", "a whole number")
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "source `orders`: option `rows_per_second` = 'fast' is invalid: expected a whole number"
        );
        assert_eq!(
            o.take_duration("interval").unwrap(),
            Some(Duration::from_secs(10))
        );
        o.finish().unwrap();
    }

    #[test]
    fn durations_and_sizes_parse() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("10 us"), Some(Duration::from_micros(10)));
        assert_eq!(parse_duration("1 minute"), Some(Duration::from_secs(60)));
        assert_eq!(parse_duration("soon"), None);
        assert_eq!(parse_bytes("128MB"), Some(128 * 1024 * 1024));
        assert_eq!(parse_bytes("4096"), Some(4096));
        assert_eq!(parse_bytes("12 parsecs"), None);
    }
}
