//! [`FetchQueue`]: the records fetched for a consumer's partitions, drained a batch at a time.
//!
//! rdkafka's `BaseConsumer::poll` hands over one record per call, each with a queue lock, an
//! event wrapper and several clock reads. Here every partition's fetch queue is forwarded to
//! one queue of the reader's own, which `rd_kafka_consume_batch_queue` drains up to a whole
//! batch per call. The forwarding is set up before the partitions are assigned: librdkafka
//! keeps an application's forwarding when it starts fetching a partition (it would otherwise
//! forward to the consumer's queue).
//!
//! The consumer's own queue still carries its events (statistics, commit results, errors):
//! the caller keeps calling `BaseConsumer::poll` on it, which returns no records.
//!
//! Only sources that fetch with librdkafka use it (TLS, SASL, or `fetcher = 'librdkafka'`;
//! the others fetch with [`super::fetcher`]). This is the workspace's only use of
//! librdkafka's C API (`unsafe_code` is denied everywhere else but for one ASCII check in
//! the JSON fast path); every `unsafe` block is here, each with why it holds.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString};
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::bindings as rdsys;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

/// One queue for all the consumer's partitions; see the module docs.
pub(crate) struct FetchQueue<C: ConsumerContext + 'static> {
    /// Ours (`rd_kafka_queue_new`); destroyed before the consumer is released.
    queue: NonNull<rdsys::rd_kafka_queue_t>,
    consumer: Arc<BaseConsumer<C>>,
    /// Room for the records of one call.
    slots: Vec<*mut rdsys::rd_kafka_message_t>,
}

// SAFETY: librdkafka's queues are thread safe; the message pointers in `slots` are only
// alive within one `consume` call.
unsafe impl<C: ConsumerContext + 'static> Send for FetchQueue<C> {}

impl<C: ConsumerContext + 'static> FetchQueue<C> {
    /// Forwards the fetch queues of `partitions` of `topic` to a new queue. Call before
    /// assigning the partitions.
    pub(crate) fn new(
        consumer: Arc<BaseConsumer<C>>,
        topic: &str,
        partitions: &[i32],
    ) -> Result<Self, KafkaError> {
        let rk = consumer.client().native_ptr();
        let topic_c = CString::new(topic)
            .map_err(|_| KafkaError::ClientCreation(format!("topic name {topic:?} has a NUL")))?;
        // SAFETY: `rk` is a live consumer handle for as long as `consumer` is.
        let queue = NonNull::new(unsafe { rdsys::rd_kafka_queue_new(rk) }).ok_or_else(|| {
            KafkaError::ClientCreation("librdkafka could not create a queue".into())
        })?;
        let this = Self {
            queue,
            consumer,
            slots: Vec::new(),
        };
        for p in partitions {
            // SAFETY: as above; the partition's queue handle is released right after its
            // forwarding is set (the forwarding holds its own reference to our queue).
            unsafe {
                let partition_queue = rdsys::rd_kafka_queue_get_partition(rk, topic_c.as_ptr(), *p);
                if partition_queue.is_null() {
                    return Err(KafkaError::ClientCreation(format!(
                        "librdkafka has no fetch queue for partition {p} of `{topic}`"
                    )));
                }
                rdsys::rd_kafka_queue_forward(partition_queue, this.queue.as_ptr());
                rdsys::rd_kafka_queue_destroy(partition_queue);
            }
        }
        Ok(this)
    }

    /// Waits until `max` records arrived or `timeout` passed, whichever is first; calls `each`
    /// with every record (or the error librdkafka reports in its place), in fetch order.
    /// Returns how many it handed over.
    pub(crate) fn consume(
        &mut self,
        max: usize,
        timeout: Duration,
        mut each: impl FnMut(Result<Fetched<'_>, KafkaError>),
    ) -> usize {
        if max == 0 {
            return 0;
        }
        self.slots.resize(max, std::ptr::null_mut());
        let timeout_ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: `slots` has room for `max` pointers; librdkafka fills the first `n`.
        let n = unsafe {
            rdsys::rd_kafka_consume_batch_queue(
                self.queue.as_ptr(),
                timeout_ms,
                self.slots.as_mut_ptr(),
                max,
            )
        };
        let n = usize::try_from(n).unwrap_or(0);
        for &m in &self.slots[..n] {
            // SAFETY: librdkafka handed over `m`; it lives until destroyed below.
            let message = unsafe { &*m };
            if message.err == rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
                each(Ok(Fetched { m: message }));
            } else {
                let code: RDKafkaErrorCode = message.err.into();
                each(Err(KafkaError::MessageConsumption(code)));
            }
            // SAFETY: handed over once, destroyed once; `Fetched` did not escape `each`.
            unsafe { rdsys::rd_kafka_message_destroy(m) };
        }
        n
    }

    /// The consumer whose partitions this queue drains.
    pub(crate) fn consumer(&self) -> &BaseConsumer<C> {
        &self.consumer
    }
}

impl<C: ConsumerContext + 'static> Drop for FetchQueue<C> {
    fn drop(&mut self) {
        // SAFETY: ours, destroyed once, while the consumer (`self.consumer`, dropped after
        // this) is still alive. Records fetched later are discarded by librdkafka.
        unsafe { rdsys::rd_kafka_queue_destroy(self.queue.as_ptr()) };
    }
}

/// One fetched record, borrowed from librdkafka for the duration of a `consume` callback.
pub(crate) struct Fetched<'a> {
    m: &'a rdsys::rd_kafka_message_t,
}

impl Fetched<'_> {
    /// Its partition.
    pub(crate) fn partition(&self) -> i32 {
        self.m.partition
    }

    /// Its offset.
    pub(crate) fn offset(&self) -> i64 {
        self.m.offset
    }

    /// Its value; `None` for a tombstone.
    pub(crate) fn payload(&self) -> Option<&[u8]> {
        bytes(self.m.payload, self.m.len)
    }

    /// Its key.
    pub(crate) fn key(&self) -> Option<&[u8]> {
        bytes(self.m.key, self.m.key_len)
    }

    /// Its timestamp (create or log-append time), ms since the epoch.
    pub(crate) fn timestamp(&self) -> Option<i64> {
        let mut kind = rdsys::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE;
        // SAFETY: a live message.
        let ts = unsafe { rdsys::rd_kafka_message_timestamp(self.m, &mut kind) };
        (ts != -1 && kind != rdsys::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE)
            .then_some(ts)
    }

    /// Calls `each` with every header: its name and its value (`None` for a null value).
    pub(crate) fn headers(&self, mut each: impl FnMut(&str, Option<&[u8]>)) {
        let mut headers = std::ptr::null_mut();
        // SAFETY: a live message; the headers belong to it.
        let err = unsafe { rdsys::rd_kafka_message_headers(self.m, &mut headers) };
        if err != rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || headers.is_null() {
            return;
        }
        for i in 0.. {
            let mut name = std::ptr::null();
            let mut value = std::ptr::null();
            let mut len = 0usize;
            // SAFETY: `headers` is the message's; the pointers it sets live as long.
            let err = unsafe {
                rdsys::rd_kafka_header_get_all(headers, i, &mut name, &mut value, &mut len)
            };
            if err != rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
                return;
            }
            // SAFETY: a NUL-terminated name owned by the headers.
            let name = unsafe { CStr::from_ptr(name) }.to_string_lossy();
            each(&name, bytes(value, len));
        }
    }
}

/// The `len` bytes at `ptr`; `None` when `ptr` is null.
fn bytes<'a>(ptr: *const std::ffi::c_void, len: usize) -> Option<&'a [u8]> {
    // SAFETY: librdkafka's pointer and length of a buffer that lives as long as the message.
    (!ptr.is_null()).then(|| unsafe { std::slice::from_raw_parts(ptr.cast::<u8>(), len) })
}
