//! [`FanOut`]: hands the output of one source or stream to every task that reads it.

use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, mpsc};

use crate::message::Message;
use crate::time::EventTime;

/// A hub that delivers each message to every current subscriber, in order, over bounded
/// channels.
///
/// `send` waits until every subscriber has room, so the slowest reader sets the pace
/// (backpressure, as in Flink). A subscriber that dropped its receiver is removed on the next
/// send. Readers that subscribe later see only later messages, after the last watermark sent
/// (a promise about every later message, so theirs too: a reader that joins a quiet hub still
/// knows how far event time is). After [`Message::End`] is sent the hub is finished and new
/// subscribers receive `End` at once.
///
/// A producer that fails calls [`FanOut::abort`] instead of sending `End`: its subscribers'
/// channels close without `End`, which tells them the input did not finish (what they hold
/// is not complete and must not be published as if it were).
#[derive(Debug, Clone)]
pub struct FanOut {
    name: Arc<str>,
    inner: Arc<Mutex<Inner>>,
    subscribed: Arc<Notify>,
}

#[derive(Debug, Default)]
struct Inner {
    subscribers: Vec<mpsc::Sender<Message>>,
    ended: bool,
    /// Ended by [`FanOut::abort`], without `End`.
    aborted: bool,
    /// Why the producer failed, as given to [`FanOut::abort`].
    failure: Option<Arc<str>>,
    /// The last watermark sent: a new subscriber gets it first.
    watermark: Option<EventTime>,
}

/// The receiving side of a [`FanOut`] subscription.
pub type Subscription = mpsc::Receiver<Message>;

impl FanOut {
    /// A hub with no subscribers. `name` is used in logs and errors.
    pub fn new(name: impl Into<Arc<str>>) -> Self {
        Self {
            name: name.into(),
            inner: Arc::default(),
            subscribed: Arc::new(Notify::new()),
        }
    }

    /// The name given at construction.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Subscribes with a bounded channel of `capacity` messages.
    pub fn subscribe(&self, capacity: usize) -> Subscription {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let mut inner = self.lock();
        if inner.aborted {
            // `tx` is dropped: the subscription is closed at once, without `End`.
        } else if inner.ended {
            // Capacity is at least one, so this cannot fail.
            let _ = tx.try_send(Message::End);
        } else {
            if let Some(t) = inner.watermark {
                // A fresh channel has room: this cannot fail.
                let _ = tx.try_send(Message::Watermark(t));
            }
            inner.subscribers.push(tx);
        }
        drop(inner);
        self.subscribed.notify_waiters();
        rx
    }

    /// How many subscribers are attached now.
    pub fn subscriber_count(&self) -> usize {
        let mut inner = self.lock();
        inner.subscribers.retain(|s| !s.is_closed());
        inner.subscribers.len()
    }

    /// Waits until at least one subscriber is attached.
    ///
    /// # Cancel safety
    /// Cancel safe: dropping the future has no effect on the hub.
    pub async fn wait_for_subscriber(&self) {
        loop {
            let notified = self.subscribed.notified();
            if self.subscriber_count() > 0 {
                return;
            }
            notified.await;
        }
    }

    /// Whether [`Message::End`] has been sent.
    pub fn is_ended(&self) -> bool {
        self.lock().ended
    }

    /// Sends `msg` to every subscriber, waiting for room in each channel. Returns how many
    /// subscribers received it.
    ///
    /// # Cancel safety
    /// Not cancel safe: if the future is dropped, some subscribers may have received the
    /// message and others not.
    pub async fn send(&self, msg: Message) -> usize {
        let (targets, is_end) = {
            let mut inner = self.lock();
            if inner.ended {
                return 0;
            }
            let is_end = matches!(msg, Message::End);
            if let Message::Watermark(t) = &msg {
                inner.watermark = Some(inner.watermark.map_or(*t, |w| w.max(*t)));
            }
            if is_end {
                inner.ended = true;
                (std::mem::take(&mut inner.subscribers), true)
            } else {
                (inner.subscribers.clone(), false)
            }
        };
        let mut delivered = 0;
        let mut gone = false;
        let last = targets.len().saturating_sub(1);
        let mut msg = Some(msg);
        for (i, tx) in targets.iter().enumerate() {
            let m = if i == last {
                msg.take()
                    .expect("message is taken once, by the last subscriber")
            } else {
                msg.clone()
                    .expect("message is present until the last subscriber")
            };
            if tx.send(m).await.is_ok() {
                delivered += 1;
            } else {
                gone = true;
            }
        }
        if gone && !is_end {
            self.lock().subscribers.retain(|s| !s.is_closed());
        }
        delivered
    }

    /// Ends the hub without [`Message::End`]: the producer failed, for `reason`.
    /// Subscribers receive what was sent before, then their channel closes; later
    /// subscribers' channels are closed at once. Does nothing once the hub has ended.
    pub fn abort(&self, reason: impl Into<Arc<str>>) {
        let mut inner = self.lock();
        if !inner.ended {
            inner.ended = true;
            inner.aborted = true;
            inner.failure = Some(reason.into());
            inner.subscribers.clear();
        }
    }

    /// Why the hub was aborted ([`FanOut::abort`]); `None` while it runs or after `End`.
    pub fn failure(&self) -> Option<Arc<str>> {
        self.lock().failure.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave `Inner` inconsistent (every update is a
        // single assignment or `retain`), so a poisoned lock is safe to use.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_late_subscriber_gets_the_last_watermark_first() {
        let hub = FanOut::new("t");
        let mut early = hub.subscribe(4);
        hub.send(Message::Watermark(EventTime(5))).await;
        hub.send(Message::Watermark(EventTime(7))).await;
        let mut late = hub.subscribe(4);
        hub.send(Message::End).await;
        assert!(matches!(
            early.recv().await,
            Some(Message::Watermark(EventTime(5)))
        ));
        assert!(matches!(
            late.recv().await,
            Some(Message::Watermark(EventTime(7)))
        ));
        assert!(matches!(late.recv().await, Some(Message::End)));
    }

    #[tokio::test]
    async fn every_subscriber_gets_every_message_in_order() {
        let hub = FanOut::new("t");
        let mut a = hub.subscribe(4);
        let mut b = hub.subscribe(4);
        assert_eq!(hub.send(Message::Watermark(EventTime(1))).await, 2);
        assert_eq!(hub.send(Message::End).await, 2);
        for rx in [&mut a, &mut b] {
            assert!(matches!(
                rx.recv().await,
                Some(Message::Watermark(EventTime(1)))
            ));
            assert!(matches!(rx.recv().await, Some(Message::End)));
            assert!(rx.recv().await.is_none());
        }
    }

    #[tokio::test]
    async fn dropped_subscribers_are_removed_and_late_subscribers_see_end() {
        let hub = FanOut::new("t");
        let a = hub.subscribe(1);
        drop(a);
        assert_eq!(hub.send(Message::Watermark(EventTime(1))).await, 0);
        assert_eq!(hub.subscriber_count(), 0);
        hub.send(Message::End).await;
        let mut late = hub.subscribe(1);
        assert!(matches!(late.recv().await, Some(Message::End)));
    }

    #[tokio::test]
    async fn an_aborted_hub_closes_its_subscriptions_without_end() {
        let hub = FanOut::new("t");
        let mut a = hub.subscribe(4);
        hub.send(Message::Watermark(EventTime(1))).await;
        hub.abort("the producer failed");
        assert!(matches!(
            a.recv().await,
            Some(Message::Watermark(EventTime(1)))
        ));
        assert!(a.recv().await.is_none());
        assert_eq!(hub.send(Message::End).await, 0);
        let mut late = hub.subscribe(1);
        assert!(late.recv().await.is_none());
    }

    #[tokio::test]
    async fn a_full_subscriber_applies_backpressure() {
        let hub = FanOut::new("t");
        let mut rx = hub.subscribe(1);
        hub.send(Message::Watermark(EventTime(1))).await;
        let pending = hub.send(Message::Watermark(EventTime(2)));
        tokio::pin!(pending);
        // The channel is full: the second send cannot complete until the reader reads.
        assert!(futures::FutureExt::now_or_never(&mut pending).is_none());
        rx.recv().await;
        assert_eq!(pending.await, 1);
    }
}
