//! Event time: microseconds since the Unix epoch, UTC.

use std::fmt;

/// A point in event time, in microseconds since 1970-01-01T00:00:00Z.
///
/// All Sluice timestamps are stored as Arrow `Timestamp(Microsecond, "UTC")`, so an
/// [`EventTime`] is the raw value of such a column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventTime(pub i64);

impl EventTime {
    /// The smallest representable time; the watermark before any data.
    pub const MIN: EventTime = EventTime(i64::MIN);
    /// The largest representable time; the watermark at the end of a bounded input.
    pub const MAX: EventTime = EventTime(i64::MAX);

    /// The current wall-clock time.
    pub fn now() -> Self {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        EventTime(d.as_micros() as i64)
    }

    /// Microseconds since the epoch.
    pub fn micros(self) -> i64 {
        self.0
    }

    /// This time minus a delay in microseconds, saturating.
    pub fn minus_micros(self, delay: i64) -> Self {
        EventTime(self.0.saturating_sub(delay))
    }
}

impl fmt::Display for EventTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            EventTime::MIN => f.write_str("-infinity"),
            EventTime::MAX => f.write_str("infinity"),
            EventTime(us) => match chrono::DateTime::from_timestamp_micros(us) {
                Some(t) => write!(f, "{}", t.format("%Y-%m-%dT%H:%M:%S%.6fZ")),
                None => write!(f, "{us}us"),
            },
        }
    }
}
