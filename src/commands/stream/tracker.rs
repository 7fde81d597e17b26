//! Where acknowledgements are tracked between Kafka and PostgreSQL: a queue in read order of
//! deliveries and positions. A position becomes confirmable only when every delivery before it is
//! acknowledged by Kafka and, if it carries a row, that row is recorded in the ledger, so the slot
//! never moves past a change that is not both in Kafka and in the ledger.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use crate::event::Lsn;
use crate::kafka::producer::DeliveryResult;
use crate::source::postgres::TableId;

/// A row the ledger records: its table and integer key.
pub(super) type LedgerRow = (TableId, i64);

/// Most positions kept waiting for the ledger.
const MAX_WAITING_POSITIONS: usize = 10_000;

pub(super) type Delivery = Pin<Box<dyn Future<Output = DeliveryResult> + Send>>;

pub(super) enum Item {
    Delivery {
        seq: u64,
        ledger_id: Option<LedgerRow>,
        from_backfill: bool,
        /// Already in a committed Kafka transaction (a replayed change the stream skipped).
        committed: bool,
        ack: Delivery,
    },
    /// `boundary`: how many deliveries were queued before it.
    Position { lsn: Lsn, boundary: u64 },
}

/// Where acknowledgements are tracked between Kafka and PostgreSQL.
pub(super) struct Tracker {
    pub queue: VecDeque<Item>,
    next_seq: u64,
    pub in_flight: usize,
    /// Acknowledged rows to write to the ledger: (delivery, id).
    pub to_ledger: Vec<(u64, LedgerRow)>,
    /// Exactly-once mode: acknowledged rows of the open Kafka transaction, for the ledger once it
    /// commits.
    exactly_once: bool,
    uncommitted: Vec<(u64, LedgerRow)>,
    /// Exactly-once mode: every delivery below this is in a committed transaction.
    committed_below: u64,
    /// Exactly-once mode: the first delivery of the open transaction. Nothing at or after it is in
    /// Kafka yet (a delete has no row for the ledger to wait on), so no position past it is confirmed.
    open_from: Option<u64>,
    /// How many of `unrecorded` the backfill produced.
    backfill_unrecorded: usize,
    /// Every delivery that carries a row not yet in the ledger (in flight, acknowledged, or being
    /// written): delivery → (id, whether the change stream produced it).
    unrecorded: BTreeMap<u64, (LedgerRow, bool)>,
    /// Positions every delivery before which is acknowledged: confirmable once no delivery below
    /// the boundary is unrecorded.
    positions: VecDeque<(u64, Lsn)>,
    /// Every change before this is acknowledged and in the ledger: what the slot is told.
    pub confirmed: Lsn,
    /// The newest position the stream has read past (confirmed or not).
    pub read_upto: Lsn,
    /// A delivery failed in this session: positions stop advancing until the stream restarts.
    pub broken: bool,
    pub backfill_failed: bool,
    pub produced: u64,
    pub acked: u64,
}

impl Tracker {
    pub fn new(confirmed: Lsn, exactly_once: bool) -> Self {
        Tracker {
            queue: VecDeque::new(),
            next_seq: 0,
            in_flight: 0,
            to_ledger: Vec::new(),
            exactly_once,
            uncommitted: Vec::new(),
            committed_below: 0,
            open_from: None,
            backfill_unrecorded: 0,
            unrecorded: BTreeMap::new(),
            positions: VecDeque::new(),
            confirmed,
            read_upto: confirmed,
            broken: false,
            backfill_failed: false,
            produced: 0,
            acked: 0,
        }
    }

    /// Queues a delivery; `ledger_id` is the row to record once Kafka acknowledged it.
    pub fn push_delivery(
        &mut self,
        ledger_id: Option<LedgerRow>,
        ack: Delivery,
        from_backfill: bool,
    ) {
        self.push(ledger_id, ack, from_backfill, false);
    }

    /// A replayed change that a committed transaction already holds: nothing is produced, its row
    /// goes to the ledger in turn.
    pub fn push_committed(&mut self, ledger_id: Option<LedgerRow>) {
        self.push(ledger_id, Box::pin(std::future::ready(Ok(()))), false, true);
    }

    fn push(
        &mut self,
        ledger_id: Option<LedgerRow>,
        ack: Delivery,
        from_backfill: bool,
        committed: bool,
    ) {
        let seq = self.next_seq;
        self.next_seq += 1;
        if self.exactly_once && !committed && self.open_from.is_none() {
            self.open_from = Some(seq);
        }
        if let Some(id) = ledger_id {
            self.unrecorded.insert(seq, (id, !from_backfill));
            self.backfill_unrecorded += usize::from(from_backfill);
        }
        self.queue.push_back(Item::Delivery {
            seq,
            ledger_id,
            from_backfill,
            committed,
            ack,
        });
        self.in_flight += 1;
        self.produced += 1;
    }

    pub fn push_position(&mut self, lsn: Lsn) {
        self.read_upto = self.read_upto.max(lsn);
        if let Some(Item::Position { lsn: last, .. }) = self.queue.back_mut() {
            *last = (*last).max(lsn);
        } else {
            self.queue.push_back(Item::Position {
                lsn,
                boundary: self.next_seq,
            });
        }
        self.advance();
    }

    /// Moves positions at the head of the queue (every delivery before them acknowledged) on.
    fn advance(&mut self) {
        while let Some(Item::Position { lsn, boundary }) = self.queue.front() {
            if !self.broken {
                // Bounded while a locked row holds confirmation back for long: dropping the newest
                // waiting position for a later one only confirms later, never too early.
                if self.positions.len() >= MAX_WAITING_POSITIONS {
                    self.positions.pop_back();
                }
                self.positions.push_back((*boundary, *lsn));
            }
            self.queue.pop_front();
        }
        self.update_confirmed();
    }

    fn update_confirmed(&mut self) {
        let lowest = self
            .unrecorded
            .keys()
            .next()
            .copied()
            .unwrap_or(u64::MAX)
            .min(self.open_from.unwrap_or(u64::MAX));
        while let Some(&(boundary, lsn)) = self.positions.front() {
            if boundary > lowest {
                break;
            }
            self.confirmed = self.confirmed.max(lsn);
            self.positions.pop_front();
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
            seq,
            ledger_id,
            from_backfill,
            committed,
            ..
        }) = self.queue.pop_front()
        else {
            return;
        };
        self.in_flight -= 1;
        match result {
            Ok(()) => {
                self.acked += 1;
                if let Some(id) = ledger_id {
                    // In a transaction, Kafka holds it only once the transaction commits.
                    if self.exactly_once && !committed {
                        self.uncommitted.push((seq, id));
                    } else {
                        self.to_ledger.push((seq, id));
                    }
                }
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

    /// The sequence number the next delivery gets: a boundary for [`Self::acked_below`].
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Every delivery queued before `boundary` was acknowledged.
    pub fn acked_below(&self, boundary: u64) -> bool {
        self.queue
            .iter()
            .find_map(|item| match item {
                Item::Delivery { seq, .. } => Some(*seq),
                Item::Position { .. } => None,
            })
            .is_none_or(|lowest| lowest >= boundary)
    }

    pub fn has_delivery_at_head(&self) -> bool {
        matches!(self.queue.front(), Some(Item::Delivery { .. }))
    }

    /// Up to `max` acknowledged rows for the next ledger write, oldest first.
    pub fn take_ledger_batch(&mut self, max: usize) -> Vec<(u64, LedgerRow)> {
        self.to_ledger.sort_unstable();
        let n = self.to_ledger.len().min(max.max(1));
        self.to_ledger.drain(..n).collect()
    }

    /// The ledger recorded these deliveries' rows.
    pub fn recorded(&mut self, seqs: impl IntoIterator<Item = u64>) {
        for seq in seqs {
            if let Some((_, from_stream)) = self.unrecorded.remove(&seq) {
                self.backfill_unrecorded -= usize::from(!from_stream);
            }
        }
        self.update_confirmed();
    }

    /// The open Kafka transaction committed (every delivery so far is acknowledged): its rows go
    /// to the ledger.
    pub fn transaction_committed(&mut self) {
        self.committed_below = self.next_seq;
        self.open_from = None;
        self.to_ledger.append(&mut self.uncommitted);
        self.update_confirmed();
    }

    /// The open Kafka transaction was aborted: its rows are not in Kafka, and the positions after
    /// them stay unconfirmed until the session restarts and replays them.
    pub fn transaction_aborted(&mut self) {
        self.uncommitted.clear();
        self.broken = true;
    }

    /// Ids of backfilled rows in committed transactions that the ledger has not recorded.
    pub fn committed_backfill_unrecorded(&self) -> Vec<LedgerRow> {
        self.unrecorded
            .range(..self.committed_below)
            .filter(|(_, (_, from_stream))| !from_stream)
            .map(|(_, (id, _))| *id)
            .collect()
    }

    /// Ids of every backfilled row not yet recorded.
    pub fn backfill_unrecorded_ids(&self) -> Vec<LedgerRow> {
        self.unrecorded
            .values()
            .filter(|(_, from_stream)| !from_stream)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Backfilled rows not yet recorded (in flight, waiting for a commit or for the ledger).
    pub fn backfill_unrecorded(&self) -> usize {
        self.backfill_unrecorded
    }

    /// Rows acknowledged but not recorded (waiting for the ledger, or locked by someone else).
    pub fn unrecorded_acked(&self) -> usize {
        self.unrecorded.len().saturating_sub(self.in_flight)
    }

    /// Keys of changes of `table` the stream produced whose rows the ledger has not recorded yet.
    pub fn unrecorded_stream_ids(&self, table: TableId) -> impl Iterator<Item = i64> + '_ {
        self.unrecorded
            .values()
            .filter(move |((t, _), from_stream)| *from_stream && *t == table)
            .map(|((_, id), _)| *id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kafka::KafkaError;

    fn ok() -> Delivery {
        Box::pin(std::future::ready(Ok(())))
    }

    #[tokio::test]
    async fn a_position_waits_for_every_earlier_delivery_and_its_ledger_write() {
        let mut t = Tracker::new(Lsn(5), false);
        t.push_delivery(Some((0, 1)), ok(), false);
        t.push_delivery(None, ok(), false); // a delete: nothing to record
        t.push_position(Lsn(10));
        assert_eq!(t.confirmed, Lsn(5), "nothing acknowledged yet");
        let r = t.next_ack().await;
        t.on_ack(r);
        let r = t.next_ack().await;
        t.on_ack(r);
        assert_eq!(t.confirmed, Lsn(5), "acknowledged, not yet in the ledger");
        let batch = t.take_ledger_batch(100);
        assert_eq!(batch, vec![(0, (0, 1))]);
        assert_eq!(t.unrecorded_stream_ids(0).collect::<Vec<_>>(), [1]);
        t.recorded(batch.iter().map(|(s, _)| *s));
        assert_eq!(t.confirmed, Lsn(10));
        t.push_position(Lsn(12));
        assert_eq!(
            t.confirmed,
            Lsn(12),
            "nothing in flight: confirmable at once"
        );
        assert_eq!(t.unrecorded_acked(), 0);
    }

    #[tokio::test]
    async fn a_row_the_ledger_cannot_record_holds_back_only_what_follows_it() {
        let mut t = Tracker::new(Lsn(0), false);
        t.push_delivery(Some((0, 1)), ok(), false);
        t.push_position(Lsn(10));
        t.push_delivery(Some((0, 2)), ok(), false);
        t.push_position(Lsn(20));
        t.push_delivery(Some((0, 3)), ok(), true);
        t.push_position(Lsn(30));
        for _ in 0..3 {
            let r = t.next_ack().await;
            t.on_ack(r);
        }
        let batch = t.take_ledger_batch(100);
        // Row 2 is locked by another transaction: 1 and 3 are recorded.
        t.recorded([0, 2]);
        assert_eq!(t.confirmed, Lsn(10));
        assert_eq!(t.unrecorded_acked(), 1);
        t.to_ledger.push(batch[1]);
        t.recorded([1]);
        assert_eq!(t.confirmed, Lsn(30));
    }

    #[tokio::test]
    async fn in_a_transaction_nothing_is_confirmed_before_it_commits_not_even_a_delete() {
        let mut t = Tracker::new(Lsn(0), true);
        t.push_delivery(None, ok(), false); // a delete: no row for the ledger
        t.push_position(Lsn(10));
        let r = t.next_ack().await;
        t.on_ack(r);
        assert_eq!(
            t.confirmed,
            Lsn(0),
            "acknowledged inside an open transaction"
        );
        t.transaction_committed();
        assert_eq!(t.confirmed, Lsn(10));
        // A replayed change already in a committed transaction holds nothing back.
        t.push_committed(None);
        t.push_position(Lsn(20));
        let r = t.next_ack().await;
        t.on_ack(r);
        assert_eq!(t.confirmed, Lsn(20));
    }

    #[tokio::test]
    async fn a_failed_delivery_stops_the_positions() {
        let mut t = Tracker::new(Lsn(0), false);
        t.push_delivery(
            Some((0, 1)),
            Box::pin(std::future::ready(Err(KafkaError::Delivery("down".into())))),
            true,
        );
        t.push_delivery(None, ok(), false);
        t.push_position(Lsn(10));
        for _ in 0..2 {
            let r = t.next_ack().await;
            t.on_ack(r);
        }
        assert!(t.broken && t.backfill_failed);
        assert_eq!(t.confirmed, Lsn(0), "never past a failed delivery");
        assert!(
            t.to_ledger.is_empty(),
            "only acknowledged rows are ledgered"
        );
    }
}
