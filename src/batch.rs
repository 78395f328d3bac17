//! Batching: items are grouped until there are `max_size` of them, or until the oldest has waited
//! `max_wait`. A batch that is due may be *held* (while the writer is still busy, so it could not
//! be written sooner anyway): it keeps filling, and is no longer due. Pure: no I/O, and time is
//! tokio's, so the tests run under paused time.

use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug)]
pub struct Batcher<T> {
    max_size: usize,
    max_wait: Duration,
    items: Vec<T>,
    /// When the open batch is due: `max_wait` after its first item.
    due: Option<Instant>,
    /// The open batch came due and is held: it waits for [`take`](Self::take), filling.
    held: bool,
}

impl<T> Batcher<T> {
    pub fn new(max_size: usize, max_wait: Duration) -> Self {
        let max_size = max_size.max(1);
        Self {
            max_size,
            max_wait,
            items: Vec::with_capacity(max_size),
            due: None,
            held: false,
        }
    }

    /// Adds an item; returns the batch if this item filled it.
    pub fn push(&mut self, item: T) -> Option<Vec<T>> {
        if self.items.is_empty() {
            self.due = Some(Instant::now() + self.max_wait);
        }
        self.items.push(item);
        (self.items.len() >= self.max_size).then(|| self.take())
    }

    /// The open batch, however small (empty if there is none), and a fresh one behind it.
    pub fn take(&mut self) -> Vec<T> {
        self.due = None;
        self.held = false;
        std::mem::replace(&mut self.items, Vec::with_capacity(self.max_size))
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Resolves when the open batch is due; never while there is none, or while it is held.
    /// Cancel-safe: meant for a `select!` arm, followed by [`take`](Self::take) or
    /// [`hold`](Self::hold).
    pub async fn due(&self) {
        sleep_until(self.due.filter(|_| !self.held)).await
    }

    /// Holds the open batch, which is due: [`due`](Self::due) no longer resolves for it, and it
    /// keeps taking items until it is full or taken.
    pub fn hold(&mut self) {
        self.held = !self.items.is_empty();
    }

    /// Whether the open batch is held.
    pub fn is_held(&self) -> bool {
        self.held
    }
}

/// Sleeps until `deadline`; forever if there is none.
pub async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAIT: Duration = Duration::from_millis(5);

    /// Whether `due()` resolves within `within` of (paused) time.
    async fn due_within(b: &Batcher<u32>, within: Duration) -> bool {
        tokio::time::timeout(within, b.due()).await.is_ok()
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_batch_comes_out_of_push() {
        let mut b = Batcher::new(3, WAIT);
        assert_eq!(b.push(1), None);
        assert_eq!(b.push(2), None);
        assert_eq!(b.push(3), Some(vec![1, 2, 3]));
        assert!(b.is_empty());
        assert!(
            !due_within(&b, Duration::from_secs(3600)).await,
            "nothing open"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_is_due_max_wait_after_its_first_item() {
        let mut b = Batcher::new(100, WAIT);
        assert!(
            !due_within(&b, Duration::from_secs(1)).await,
            "empty: never due"
        );
        b.push(1);
        tokio::time::advance(Duration::from_millis(3)).await;
        b.push(2); // a later item does not push the deadline back
        assert!(!due_within(&b, Duration::from_millis(1)).await);
        assert!(due_within(&b, Duration::from_millis(2)).await);
        assert_eq!(b.take(), vec![1, 2]);
        assert!(!due_within(&b, Duration::from_secs(1)).await);
        b.push(3);
        assert!(due_within(&b, WAIT).await, "a new batch has a new deadline");
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_batch_fills_until_full_or_taken() {
        let mut b = Batcher::new(3, WAIT);
        b.push(1);
        assert!(due_within(&b, WAIT).await);
        b.hold();
        assert!(b.is_held());
        assert!(
            !due_within(&b, Duration::from_secs(1)).await,
            "held: not due again"
        );
        assert_eq!(b.push(2), None);
        assert_eq!(b.push(3), Some(vec![1, 2, 3]), "full: out it goes");
        assert!(!b.is_held());
        b.push(4);
        b.hold();
        assert_eq!(b.take(), vec![4]);
        assert!(!b.is_held());
        b.push(5);
        assert!(due_within(&b, WAIT).await, "the next batch is due as usual");
        let mut empty = Batcher::<u32>::new(3, WAIT);
        empty.hold();
        assert!(!empty.is_held(), "nothing to hold");
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_takes_the_open_batch_however_small() {
        let mut b = Batcher::new(100, Duration::from_secs(60));
        b.push(7);
        assert_eq!(b.len(), 1);
        assert_eq!(b.take(), vec![7]);
        assert_eq!(b.take(), Vec::<u32>::new());
    }
}
