//! What flows between tasks.

use arrow::record_batch::RecordBatch;

use crate::time::EventTime;

/// One message on a channel between two tasks.
///
/// Ordering guarantees on one channel: messages arrive in the order they were sent; a
/// [`Message::Watermark`] promises that no later `Data` on that channel carries event times
/// at or below it (late rows may still arrive and are the receiver's to handle); a
/// [`Message::Barrier`] separates the rows of one checkpoint epoch from the next;
/// [`Message::End`] is the last message of a channel that finished. A channel that closes
/// without `End` was cut short by a failure upstream: the receiver must not treat what it
/// holds as complete (no final flush, nothing published), and fails too.
#[derive(Debug, Clone)]
pub enum Message {
    /// A batch of rows.
    Data(RecordBatch),
    /// Event time has advanced to this point on this channel.
    Watermark(EventTime),
    /// A checkpoint barrier for the given epoch.
    Barrier(Barrier),
    /// The input is exhausted; nothing follows.
    End,
}

/// A checkpoint barrier: every row sent before it belongs to `epoch` or earlier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Barrier {
    /// The checkpoint epoch this barrier closes.
    pub epoch: u64,
}

/// A record that could not be processed and must go to the errors zone.
///
/// It keeps the raw payload as received (or, for rows rejected inside a pipeline, the row
/// rendered as JSON), why it was rejected and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRecord {
    /// The raw payload, as received where the record came from outside (base64 when
    /// [`Self::payload_base64`]).
    pub payload: String,
    /// The payload is binary (e.g. Avro), kept as its base64 text.
    pub payload_base64: bool,
    /// Why the record was rejected, for a human.
    pub reason: String,
    /// Where the record came from, e.g. `http:/v1/sources/orders/events line 3` or
    /// `stream clean_clicks`.
    pub origin: String,
}
