//! A Kafka reader's position: the next offset per partition.

use std::collections::BTreeMap;

use crate::join::Positions;
use crate::split_clock::ClockState;

/// The next offset to read, per partition.
pub(crate) type Offsets = BTreeMap<i32, i64>;

/// A checkpoint position of a Kafka reader: `{"offsets": {"<partition>": <next offset>},
/// "event_time": …}` (the reader's [`ClockState`] at those offsets).
pub(crate) fn position_json(offsets: &Offsets, clock: &ClockState) -> serde_json::Value {
    let offsets: serde_json::Map<String, serde_json::Value> = offsets
        .iter()
        .map(|(p, o)| (p.to_string(), (*o).into()))
        .collect();
    let mut position = serde_json::json!({ "offsets": offsets });
    clock.write_into(&mut position);
    position
}

impl Positions for Offsets {
    /// At or past `other` in every partition `other` names.
    fn covers(&self, other: &Self) -> bool {
        other
            .iter()
            .all(|(p, o)| self.get(p).is_some_and(|reached| reached >= o))
    }
}

/// Per partition `ahead` names, how many records position `behind` has still to read to
/// reach it (a partition `behind` has not read counts from offset 0).
pub(crate) fn lag(behind: &Offsets, ahead: &Offsets) -> Vec<(i32, i64)> {
    ahead
        .iter()
        .map(|(p, o)| (*p, (o - behind.get(p).copied().unwrap_or(0)).max(0)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offsets(pairs: &[(i32, i64)]) -> Offsets {
        pairs.iter().copied().collect()
    }

    #[test]
    fn covers_needs_every_partition_named() {
        let a = offsets(&[(0, 10), (1, 5)]);
        assert!(a.covers(&offsets(&[(0, 10)])));
        assert!(a.covers(&offsets(&[])));
        assert!(!a.covers(&offsets(&[(0, 11)])));
        assert!(!a.covers(&offsets(&[(2, 0)])), "a partition not read yet");
    }

    #[test]
    fn lag_counts_records_ahead_only() {
        let mine = offsets(&[(0, 10), (1, 50)]);
        let shared = offsets(&[(0, 25), (1, 40), (2, 7)]);
        // 15 in partition 0, none in 1 (ahead there), 7 in partition 2 (not read).
        assert_eq!(lag(&mine, &shared), [(0, 15), (1, 0), (2, 7)]);
    }
}
