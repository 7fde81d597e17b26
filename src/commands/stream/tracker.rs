//! Where acknowledgements are tracked between Kafka and PostgreSQL: a queue in read order of
//! deliveries and positions. A position becomes confirmable only when every delivery before it is
//! acknowledged, so the slot never moves past an unacknowledged change.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use crate::event::{ChangeEvent, Lsn, Op};
use crate::kafka::producer::DeliveryResult;

pub(super) type Delivery = Pin<Box<dyn Future<Output = DeliveryResult> + Send>>;

pub(super) enum Item {
    Delivery {
        ledger_id: Option<i64>,
        from_backfill: bool,
        ack: Delivery,
    },
    Position(Lsn),
}

/// Where acknowledgements are tracked between Kafka and PostgreSQL.
pub(super) struct Tracker {
    pub queue: VecDeque<Item>,
    pub in_flight: usize,
    /// Acknowledged rows not yet in the ledger.
    pub ledger_ids: Vec<i64>,
    /// Every change before this is acknowledged (its id is in `ledger_ids` or the ledger).
    pub confirmable: Lsn,
    /// Every change before this is acknowledged and in the ledger: what the slot is told.
    pub confirmed: Lsn,
    /// A delivery failed in this session: positions stop advancing until the stream restarts.
    pub broken: bool,
    pub backfill_failed: bool,
    pub produced: u64,
    pub acked: u64,
}

impl Tracker {
    pub fn new(confirmed: Lsn) -> Self {
        Tracker {
            queue: VecDeque::new(),
            in_flight: 0,
            ledger_ids: Vec::new(),
            confirmable: confirmed,
            confirmed,
            broken: false,
            backfill_failed: false,
            produced: 0,
            acked: 0,
        }
    }

    pub fn push_delivery(&mut self, event: &ChangeEvent, ack: Delivery, from_backfill: bool) {
        let ledger_id = match event.op {
            Op::Snapshot | Op::Insert | Op::Update => event.id,
            Op::Delete | Op::Truncate => None,
        };
        self.queue.push_back(Item::Delivery {
            ledger_id,
            from_backfill,
            ack,
        });
        self.in_flight += 1;
        self.produced += 1;
    }

    pub fn push_position(&mut self, lsn: Lsn) {
        if let Some(Item::Position(last)) = self.queue.back_mut() {
            *last = (*last).max(lsn);
        } else {
            self.queue.push_back(Item::Position(lsn));
        }
        self.advance();
    }

    /// Consumes positions at the head of the queue.
    pub fn advance(&mut self) {
        while let Some(Item::Position(lsn)) = self.queue.front() {
            if !self.broken {
                self.confirmable = self.confirmable.max(*lsn);
            }
            self.queue.pop_front();
        }
    }

    /// Resolves when the oldest delivery is acknowledged or failed.
    pub fn next_ack(&mut self) -> impl Future<Output = DeliveryResult> + '_ {
        std::future::poll_fn(move |cx| match self.queue.front_mut() {
            Some(Item::Delivery { ack, .. }) => ack.as_mut().poll(cx),
            _ => Poll::Pending,
        })
    }

    pub fn on_ack(&mut self, result: DeliveryResult) {
        let Some(Item::Delivery {
            ledger_id,
            from_backfill,
            ..
        }) = self.queue.pop_front()
        else {
            return;
        };
        self.in_flight -= 1;
        match result {
            Ok(()) => {
                self.acked += 1;
                self.ledger_ids.extend(ledger_id);
            }
            Err(e) => {
                if !self.broken {
                    tracing::warn!(error = %e, "Kafka delivery failed; the stream will restart from its last confirmed position");
                }
                self.broken = true;
                self.backfill_failed |= from_backfill;
            }
        }
        self.advance();
    }

    pub fn has_delivery_at_head(&self) -> bool {
        matches!(self.queue.front(), Some(Item::Delivery { .. }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kafka::KafkaError;

    fn event(id: i64, op: Op) -> ChangeEvent {
        ChangeEvent {
            id: Some(id),
            op,
            user: None,
            event: None,
            timestamp: None,
            event_time: None,
            lsn: "0/1".into(),
            version: 1,
            unchanged: vec![],
        }
    }

    #[tokio::test]
    async fn a_position_waits_for_every_earlier_delivery() {
        let mut t = Tracker::new(Lsn(5));
        t.push_delivery(
            &event(1, Op::Insert),
            Box::pin(std::future::ready(Ok(()))),
            false,
        );
        t.push_delivery(
            &event(2, Op::Delete),
            Box::pin(std::future::ready(Ok(()))),
            false,
        );
        t.push_position(Lsn(10));
        assert_eq!(t.confirmable, Lsn(5), "nothing acknowledged yet");
        let r = t.next_ack().await;
        t.on_ack(r);
        assert_eq!(t.confirmable, Lsn(5), "one delivery still open");
        let r = t.next_ack().await;
        t.on_ack(r);
        assert_eq!(t.confirmable, Lsn(10));
        assert_eq!(t.ledger_ids, vec![1], "deletes are not ledgered");
        t.push_position(Lsn(12));
        assert_eq!(
            t.confirmable,
            Lsn(12),
            "with nothing in flight a position is confirmable at once"
        );
    }

    #[tokio::test]
    async fn a_failed_delivery_stops_the_positions() {
        let mut t = Tracker::new(Lsn(0));
        t.push_delivery(
            &event(1, Op::Insert),
            Box::pin(std::future::ready(Err(KafkaError::Delivery("down".into())))),
            true,
        );
        t.push_delivery(
            &event(2, Op::Insert),
            Box::pin(std::future::ready(Ok(()))),
            false,
        );
        t.push_position(Lsn(10));
        for _ in 0..2 {
            let r = t.next_ack().await;
            t.on_ack(r);
        }
        assert!(t.broken && t.backfill_failed);
        assert_eq!(t.confirmable, Lsn(0), "never past a failed delivery");
        assert_eq!(t.ledger_ids, vec![2], "only acknowledged rows are ledgered");
    }
}
