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

/// What the broker said of a reading, its own return included (see [`Inflight::own_return`]).
/// Small, unlike lapin's `Confirmation`, which holds a whole returned message inline.
pub(super) enum Outcome {
    /// Routed: a positive confirm without a return.
    Stored,
    /// Unroutable (we publish `mandatory`): a positive confirm, and the reading's return.
    Returned(Box<BasicReturnMessage>),
    /// Refused by the broker.
    Nacked,
}

/// A confirm: the reading, and what the broker said, or the error that ended its channel.
pub(super) type Settled = (Confirmed, lapin::Result<Outcome>);

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
        let outcome = confirmation.map(|c| self.own_return(&msg.id, c));
        Some((Confirmed { seq: n, msg, sent }, outcome))
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
    fn own_return(&mut self, id: &str, confirmation: Confirmation) -> Outcome {
        let (ack, carried) = match confirmation {
            Confirmation::Ack(carried) => (true, carried),
            Confirmation::Nack(carried) => (false, carried),
            Confirmation::NotRequested => return Outcome::Stored,
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
        match (ack, own) {
            (false, _) => Outcome::Nacked,
            (true, Some(returned)) => Outcome::Returned(Box::new(returned)),
            (true, None) => Outcome::Stored,
        }
    }

    /// A reading whose confirm came before its return, rebuilt from the return (which carries
    /// the whole message), with the return: it was taken for stored, and is not.
    pub fn late(&mut self) -> Option<(Outgoing, Outcome)> {
        let mut returned = self.late.pop()?;
        let delivery = &mut returned.delivery;
        let msg = Outgoing {
            id: delivery
                .properties
                .message_id()
                .as_ref()
                .map(|id| id.as_str().to_owned())
                .unwrap_or_default(),
            body: std::mem::take(&mut delivery.data),
            published_before: true,
            counted: true,
        };
        Some((msg, Outcome::Returned(Box::new(returned))))
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

#[cfg(test)]
mod tests {
    use lapin::message::Delivery;
    use lapin::BasicProperties;

    use super::*;

    fn reading(id: &str) -> Outgoing {
        Outgoing {
            id: id.into(),
            body: format!("body of {id}").into_bytes(),
            published_before: true,
            counted: false,
        }
    }

    /// What RabbitMQ sends back for an unroutable reading: the whole message.
    fn returned(id: &str) -> BasicReturnMessage {
        let mut delivery = Delivery::mock(
            0,
            "weather".into(),
            "weather_key".into(),
            false,
            format!("body of {id}").into_bytes(),
        );
        delivery.properties = BasicProperties::default().with_message_id(id.into());
        BasicReturnMessage {
            delivery,
            reply_code: 312,
            reply_text: "NO_ROUTE".into(),
        }
    }

    fn in_flight(ids: &[&str]) -> Inflight {
        let mut inflight = Inflight::new(8);
        for (n, id) in ids.iter().enumerate() {
            inflight
                .waiting
                .insert(n as u64 + 1, (reading(id), Instant::now()));
        }
        inflight
    }

    /// The id its return names, if the outcome is a return.
    fn returned_id(outcome: &Outcome) -> Option<String> {
        match outcome {
            Outcome::Returned(r) => {
                let id = r.delivery.properties.message_id().clone().unwrap();
                Some(id.as_str().to_owned())
            }
            Outcome::Stored | Outcome::Nacked => None,
        }
    }

    /// The id of the reading a settled confirm is for, and the id its return (if any) names.
    fn settle(inflight: &mut Inflight, n: u64, c: Confirmation) -> (String, Option<String>) {
        let (confirmed, outcome) = inflight.confirmed(n, Ok(c)).unwrap();
        (confirmed.msg.id, returned_id(&outcome.unwrap()))
    }

    #[test]
    fn a_routed_readings_confirm_carrying_anothers_return_hands_it_to_its_own() {
        let mut inflight = in_flight(&["routed", "unroutable"]);
        let carried = Confirmation::Ack(Some(returned("unroutable")));
        assert_eq!(settle(&mut inflight, 1, carried), ("routed".into(), None));
        assert_eq!(
            settle(&mut inflight, 2, Confirmation::Ack(None)),
            ("unroutable".into(), Some("unroutable".into()))
        );
        assert!(inflight.late().is_none());
    }

    #[test]
    fn a_return_that_comes_after_its_readings_confirm_brings_the_reading_back() {
        // Both unroutable, each confirm carrying the other's return, the first read first.
        let mut inflight = in_flight(&["first", "second"]);
        let first = settle(
            &mut inflight,
            1,
            Confirmation::Ack(Some(returned("second"))),
        );
        assert_eq!(first, ("first".into(), None), "taken for stored, for now");
        let second = settle(&mut inflight, 2, Confirmation::Ack(Some(returned("first"))));
        assert_eq!(second, ("second".into(), Some("second".into())));
        let (back, with) = inflight
            .late()
            .expect("the first reading, rebuilt from its return");
        assert_eq!(back.id, "first");
        assert_eq!(back.body, b"body of first");
        assert!(back.counted, "already counted as confirmed once");
        assert_eq!(returned_id(&with).as_deref(), Some("first"));
        assert!(inflight.late().is_none());
    }
}
