//! Settlement: the one place that acknowledges deliveries.
//!
//! A [`Link`] is one broker connection with its consuming channel. It knows, by delivery tag,
//! which deliveries are settled (stored, or safely in the dead-letter queue) and acknowledges
//! only those: `ack(multiple)` up to the end of the contiguous settled prefix, and single acks
//! for settled deliveries behind a gap. A delivery that is never settled (a batch abandoned at
//! shutdown, an invalid message whose dead-lettering failed) therefore stays unacknowledged
//! however many later batches succeed, and goes back to the queue when the link closes.
//! Vector's finalizers follow the same rule: a message is acknowledged only once everything
//! downstream of it succeeded.

use std::collections::BTreeMap;
use std::sync::Mutex;

use lapin::options::BasicAckOptions;
use lapin::{Channel, Connection};
use prometheus::IntGauge;

use crate::amqp;

/// One acknowledgement to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    /// Every delivery up to and including this tag (`multiple`).
    UpTo(u64),
    /// Exactly this delivery.
    One(u64),
}

/// The delivery tags of one channel, and which of them are settled. Pure bookkeeping.
#[derive(Debug, Default)]
pub struct Tags {
    /// Every tag up to and including `floor` is settled and acknowledged.
    floor: u64,
    /// Settled tags above `floor`, each with whether it was acknowledged already (singly).
    above: BTreeMap<u64, bool>,
    received: u64,
    settled: u64,
    released: bool,
}

impl Tags {
    /// A delivery arrived; `false` (and not counted) if the channel is released already: the
    /// broker requeued it with the rest, so it is nobody's to settle.
    pub fn received(&mut self) -> bool {
        if self.released {
            return false;
        }
        self.received += 1;
        true
    }

    /// Deliveries received and not yet settled.
    pub fn unsettled(&self) -> u64 {
        self.received - self.settled
    }

    /// Marks `tags` settled and says what to acknowledge. Tags already settled, at or below the
    /// floor, or on a released channel are ignored: nothing is ever acknowledged twice.
    pub fn settle(&mut self, tags: impl IntoIterator<Item = u64>) -> Vec<Ack> {
        if self.released {
            return Vec::new();
        }
        let mut multiple = None;
        let mut new = Vec::new();
        for tag in tags {
            if tag == self.floor + 1 && self.above.is_empty() {
                // The usual case, a batch in delivery order: the prefix just grows.
                self.floor = tag;
                self.settled += 1;
                multiple = Some(tag);
            } else if tag > self.floor && !self.above.contains_key(&tag) {
                self.above.insert(tag, false);
                new.push(tag);
                self.settled += 1;
            }
        }
        let mut acks = Vec::new();
        while let Some(acked) = self.above.remove(&(self.floor + 1)) {
            self.floor += 1;
            if !acked {
                multiple = Some(self.floor);
            }
        }
        if let Some(tag) = multiple {
            acks.push(Ack::UpTo(tag));
        }
        // Only the tags this call added can be unacknowledged (every earlier call acked its own),
        // so look at those, not at the whole map: behind a held tag the map grows to the
        // prefetch, and scanning it on every settle was quadratic.
        new.sort_unstable();
        for tag in new {
            if let Some(acked) = self.above.get_mut(&tag) {
                *acked = true;
                acks.push(Ack::One(tag));
            }
        }
        acks
    }

    /// The channel is gone: its unsettled deliveries are back in the queue. Returns how many.
    pub fn release(&mut self) -> u64 {
        if self.released {
            return 0;
        }
        self.released = true;
        self.unsettled()
    }

    pub fn is_released(&self) -> bool {
        self.released
    }
}

/// One broker connection and its consuming channel, with the books of its deliveries.
/// `consumer_pending_messages` is kept here: up on every delivery, down on every settlement,
/// and down by whatever is still unsettled when the link is released.
pub struct Link {
    pub conn: Connection,
    pub channel: Channel,
    tags: Mutex<Tags>,
    pending: IntGauge,
}

impl Link {
    pub fn new(conn: Connection, channel: Channel, pending: IntGauge) -> Self {
        Self {
            conn,
            channel,
            tags: Mutex::new(Tags::default()),
            pending,
        }
    }

    fn books<T>(&self, f: impl FnOnce(&mut Tags) -> T) -> T {
        // A poisoned lock means a panic elsewhere while booking; the books themselves are
        // still consistent (every update is a few integer operations), so carry on with them.
        let mut tags = self.tags.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut tags)
    }

    /// A delivery arrived on this link.
    pub fn received(&self) {
        if self.books(Tags::received) {
            self.pending.inc();
        }
    }

    pub fn is_released(&self) -> bool {
        self.books(|t| t.is_released())
    }

    /// Settles `tags` and sends the acknowledgements that makes possible, each bounded. On an
    /// error the channel is gone, or the broker stopped answering: the link is released (and
    /// closed, so the reader reconnects) and the broker redelivers what was not acked.
    pub async fn settle(&self, tags: &[u64]) -> Result<(), amqp::AmqpError> {
        let acks = self.books(|t| {
            let before = t.settled;
            let acks = t.settle(tags.iter().copied());
            self.pending.sub((t.settled - before) as i64);
            acks
        });
        for ack in acks {
            let (tag, multiple) = match ack {
                Ack::UpTo(tag) => (tag, true),
                Ack::One(tag) => (tag, false),
            };
            let ack = self.channel.basic_ack(tag, BasicAckOptions { multiple });
            if let Err(e) = amqp::bounded(ack).await {
                self.close("acknowledgement failed").await;
                return Err(e);
            }
        }
        Ok(())
    }

    /// Forgets the unsettled deliveries: the channel is closed, so the broker requeues them.
    pub fn release(&self) {
        let unsettled = self.books(Tags::release);
        self.pending.sub(unsettled as i64);
    }

    /// Closes the connection (bounded), which returns every unsettled delivery to the queue.
    pub async fn close(&self, why: &str) {
        amqp::close(&self.conn, why).await;
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn received(n: u64) -> Tags {
        let mut t = Tags::default();
        (0..n).for_each(|_| assert!(t.received()));
        t
    }

    #[test]
    fn deliveries_after_release_are_not_counted() {
        let mut t = received(3);
        assert_eq!(t.settle([1]), vec![Ack::UpTo(1)]);
        assert_eq!(t.release(), 2);
        assert!(
            !t.received(),
            "buffered before the close, handed over after it"
        );
        assert_eq!(
            t.unsettled(),
            2,
            "unchanged: the late one is not ours to settle"
        );
        assert_eq!(t.release(), 0);
    }

    #[test]
    fn a_contiguous_prefix_is_acked_with_multiple() {
        let mut t = received(10);
        assert_eq!(t.settle(1..=4), vec![Ack::UpTo(4)]);
        assert_eq!(t.settle(5..=10), vec![Ack::UpTo(10)]);
        assert_eq!(t.unsettled(), 0);
    }

    #[test]
    fn an_unsettled_batch_is_never_covered_by_a_later_ack() {
        // The first loss of issue 8: batch 1..=10 not stored, batch 11 settled.
        let mut t = received(11);
        assert_eq!(t.settle([11]), vec![Ack::One(11)]);
        assert_eq!(t.unsettled(), 10);
        assert_eq!(t.release(), 10, "1..=10 go back to the queue");
    }

    #[test]
    fn a_held_message_lets_later_batches_through_singly_then_joins_the_prefix() {
        // The second loss: 3 could not be dead-lettered; 4..=6 are stored.
        let mut t = received(6);
        assert_eq!(t.settle([1, 2]), vec![Ack::UpTo(2)]);
        assert_eq!(
            t.settle([4, 5, 6]),
            vec![Ack::One(4), Ack::One(5), Ack::One(6)]
        );
        // 3 dead-lettered at last: only 3 itself is still unacked, so ack it alone.
        assert_eq!(t.settle([3]), vec![Ack::UpTo(3)]);
        assert_eq!(t.unsettled(), 0);
        let mut more = t;
        assert!(more.received());
        assert_eq!(more.settle([7]), vec![Ack::UpTo(7)]);
    }

    #[test]
    fn a_gap_closing_under_singly_acked_tags_acks_only_the_new_ones() {
        let mut t = received(5);
        assert_eq!(t.settle([3]), vec![Ack::One(3)]);
        assert_eq!(t.settle([5]), vec![Ack::One(5)]);
        // 1, 2 and 4 settle: the prefix reaches 5; 4 is the last one not yet acked.
        assert_eq!(t.settle([1, 2, 4]), vec![Ack::UpTo(4)]);
        assert_eq!(t.settle([]), vec![]);
    }

    #[test]
    fn a_batch_out_of_order_is_still_one_multiple_ack() {
        let mut t = received(6);
        assert_eq!(t.settle([2, 1, 3]), vec![Ack::UpTo(3)]);
        assert_eq!(t.settle([4, 6]), vec![Ack::UpTo(4), Ack::One(6)]);
        assert_eq!(t.settle([5]), vec![Ack::UpTo(5)]);
        assert_eq!(t.unsettled(), 0);
    }

    #[test]
    fn nothing_is_acked_twice_nor_after_release() {
        let mut t = received(3);
        assert_eq!(t.settle([1]), vec![Ack::UpTo(1)]);
        assert_eq!(t.settle([1]), vec![]);
        assert_eq!(t.settle([3]), vec![Ack::One(3)]);
        assert_eq!(t.settle([3]), vec![]);
        assert_eq!(t.release(), 1);
        assert_eq!(t.settle([2]), vec![], "released: the broker requeued 2");
        assert_eq!(t.release(), 0);
    }
}
