//! Confirm tracking: the readings published on the current channel that await the broker's
//! confirm, by their confirm sequence number.

use std::collections::HashMap;
use std::time::Instant;

use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;
use lapin::message::BasicReturnMessage;
use lapin::{Confirmation, PublisherConfirm};

use super::source::Outgoing;

type ConfirmFuture = BoxFuture<'static, (u64, lapin::Result<Confirmation>)>;

/// A reading whose confirm came in, and when it was sent.
pub(super) struct Confirmed {
    seq: u64,
    pub msg: Outgoing,
    pub sent: Instant,
}

/// A confirm: the reading, and what the broker said.
pub(super) type Settled = (Confirmed, lapin::Result<Confirmation>);

/// Lives as long as one channel: confirm sequence numbers start again on the next.
pub(super) struct Inflight {
    waiting: HashMap<u64, (Outgoing, Instant)>,
    confirms: FuturesUnordered<ConfirmFuture>,
    seq: u64,
    /// Returns that came with another reading's confirm, by the message id of their own.
    returned_elsewhere: HashMap<String, BasicReturnMessage>,
    /// Returns whose reading's confirm came first, without them.
    late: Vec<BasicReturnMessage>,
}

impl Inflight {
    /// Sized once for the whole confirm `window`: growing the table in steps would hold the old
    /// and the new one at once, each time.
    pub fn new(window: usize) -> Self {
        Self {
            waiting: HashMap::with_capacity(window),
            confirms: FuturesUnordered::new(),
            seq: 0,
            returned_elsewhere: HashMap::new(),
            late: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// Tracks a reading whose publish was written, in publishing order: the broker numbers its
    /// confirms in that order.
    pub fn track(&mut self, msg: Outgoing, confirm: PublisherConfirm) {
        self.seq += 1;
        let n = self.seq;
        self.confirms.push(confirm.map(move |c| (n, c)).boxed());
        let msg = Outgoing {
            published_before: true,
            ..msg
        };
        self.waiting.insert(n, (msg, Instant::now()));
    }

    /// The next confirm; `None` (at once) when nothing is in flight. Cancel-safe: a confirm is
    /// taken off only when it is returned.
    pub async fn next(&mut self) -> Option<Settled> {
        while let Some((n, confirmation)) = self.confirms.next().await {
            if let Some(confirmed) = self.confirmed(n, confirmation) {
                return Some(confirmed);
            }
        }
        None
    }

    /// A confirm already in, without waiting. The broker confirms in runs (`multiple`), so after
    /// [`Inflight::next`] the rest of the run is here.
    pub fn ready(&mut self) -> Option<Settled> {
        while let Some((n, confirmation)) = self.confirms.next().now_or_never().flatten() {
            if let Some(confirmed) = self.confirmed(n, confirmation) {
                return Some(confirmed);
            }
        }
        None
    }

    fn confirmed(&mut self, n: u64, confirmation: lapin::Result<Confirmation>) -> Option<Settled> {
        let (msg, sent) = self.waiting.remove(&n)?;
        let confirmation = confirmation.map(|c| self.own_return(&msg.id, c));
        Some((Confirmed { seq: n, msg, sent }, confirmation))
    }

    /// The confirm with the return of this reading, if any, whichever confirm brought it.
    ///
    /// lapin hands each `basic.return` to the next confirm it completes, not to its own reading's
    /// (lapin's `acknowledgement.rs`, `complete_pending`), and completes the confirms of one
    /// `basic.ack` with `multiple` in no particular order. When routed and unroutable readings are
    /// confirmed together (a binding that comes or goes), a routed reading may carry another's
    /// return and the unroutable one a plain ack, which would count it as stored. A return says
    /// whose it is by its message id: one taken from another confirm waits here for its own, or,
    /// when that came first, without it, goes to [`Inflight::late`] with the reading's body.
    fn own_return(&mut self, id: &str, confirmation: Confirmation) -> Confirmation {
        let (ack, carried) = match confirmation {
            Confirmation::Ack(carried) => (true, carried),
            Confirmation::Nack(carried) => (false, carried),
            Confirmation::NotRequested => return Confirmation::NotRequested,
        };
        let mut own = None;
        if let Some(returned) = carried {
            match returned.delivery.properties.message_id() {
                Some(owner) if owner.as_str() != id => {
                    let owner = owner.as_str();
                    if self.waiting.values().any(|(msg, _)| msg.id == owner) {
                        self.returned_elsewhere.insert(owner.to_owned(), returned);
                    } else {
                        self.late.push(returned);
                    }
                }
                _ => own = Some(returned),
            }
        }
        if own.is_none() && !self.returned_elsewhere.is_empty() {
            own = self.returned_elsewhere.remove(id);
        }
        match ack {
            true => Confirmation::Ack(own),
            false => Confirmation::Nack(own),
        }
    }

    /// A reading whose confirm came before its return, rebuilt from the return (which carries
    /// the whole message), with the return: it was taken for stored, and is not.
    pub fn late(&mut self) -> Option<(Outgoing, BasicReturnMessage)> {
        let returned = self.late.pop()?;
        let delivery = &returned.delivery;
        let msg = Outgoing {
            id: delivery
                .properties
                .message_id()
                .as_ref()
                .map(|id| id.as_str().to_owned())
                .unwrap_or_default(),
            body: delivery.data.clone(),
            published_before: true,
            counted: true,
        };
        Some((msg, returned))
    }

    /// Takes back a reading whose confirm failed (its channel is gone), so that it goes back
    /// with the others, in publishing order ([`Inflight::into_unconfirmed`]).
    pub fn restore(&mut self, confirmed: Confirmed) {
        self.waiting
            .insert(confirmed.seq, (confirmed.msg, confirmed.sent));
    }

    /// The readings still unconfirmed, oldest first: their channel is gone, or the producer stops.
    pub fn into_unconfirmed(self) -> impl DoubleEndedIterator<Item = Outgoing> {
        let mut lost: Vec<_> = self.waiting.into_iter().collect();
        lost.sort_unstable_by_key(|(n, _)| *n);
        lost.into_iter().map(|(_, (msg, _))| msg)
    }
}
