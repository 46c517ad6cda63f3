//! The gate: how an instance keeps the handled order of its group across the death of
//! another instance, by holding later messages until earlier ones come back.

use async_nats::jetstream::consumer;
use async_nats::jetstream::{AckKind, Message};
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::time::Instant;

/// How long an instance catches up at most: `ack_wait` (by then every message of an
/// instance that died before it started has come back) and a margin.
pub(super) fn catch_up_limit(ack_wait: Duration) -> Duration {
    ack_wait + (ack_wait / 2).clamp(Duration::from_millis(500), Duration::from_secs(5))
}

/// The stream sequence up to which everything delivered to the group is acked. A group
/// that started at new messages (or on a purged stream) reports an ack floor of 0 below
/// a delivered sequence it never delivered; with nothing awaiting an ack, the
/// delivered sequence is the floor.
pub(super) fn acked_through(info: &consumer::Info) -> u64 {
    if info.num_ack_pending == 0 {
        info.delivered.stream_sequence
    } else {
        info.ack_floor.stream_sequence
    }
}

/// How much longer than [`catch_up_limit`] an instance catches up at most while the
/// group's consumer has no leader (its state cannot be read) or changes leader: a
/// JetStream election takes up to about 10 s, and the new leader redelivers what the
/// old one had delivered only `ack_wait` after it took over.
pub(super) const ELECTION_GRACE: Duration = Duration::from_secs(30);

/// Keeps the handled order of a group across the death of one of its instances, and
/// across the loss of the messages in flight when the group's consumer changes leader
/// on a cluster.
///
/// The messages delivered to an instance that died stay pending on the server until
/// their `ack_wait` passes, and then come back after the messages that follow them,
/// in the order their timers expire. The same holds for messages the consumer's leader
/// sent that never arrived (the leader's node died, or the connection dropped). So
/// when this instance starts pulling (at start, whenever its pull stream restarts or
/// reports an error, and after a reconnect) while the group has messages delivered and
/// not acked (its ack floor is below the last stream sequence delivered, the *mark*),
/// it *catches up*: every message it receives is held, by stream sequence (with
/// progress sent, so that it is not redelivered), and handed to its lane only once
/// every earlier message of the group is acked (the ack floor, read every
/// [`CATCH_UP_POLL`](super::fetch::CATCH_UP_POLL)) or was handed to a lane of this
/// instance: its lanes then handle them in stream order. It stops catching up when
/// everything up to the mark is so, or at the latest [`catch_up_limit`] after it
/// began, or after the group's state was last unreadable or its leader changed
/// (never more than [`ELECTION_GRACE`] beyond the limit): by then every lost message
/// has come back (its timer had started before), and what has not is in the hands of
/// a live instance, whose order relative to this one the group does not keep anyway.
/// The held messages are then released in stream order.
///
/// Held messages count toward the group's `max_ack_pending`; redeliveries do not, so
/// they always reach this instance, and live instances go on with the messages they
/// have. On shutdown, held messages are handed back (nak); after a simulated crash
/// they are left to expire.
#[derive(Default)]
pub(super) struct Gate {
    /// When catching up must end; `None` when not catching up.
    deadline: Option<Instant>,
    /// The latest the deadline may be pushed to, while catching up.
    cap: Option<Instant>,
    /// How long catching up lasts without trouble ([`catch_up_limit`]).
    limit: Duration,
    /// The last stream sequence delivered to the group when catching up began
    /// (`u64::MAX` while the group's state could not be read).
    mark: u64,
    /// Every message of the group up to this stream sequence is acked, or was handed
    /// to one of this instance's lanes while catching up.
    through: u64,
    /// Messages received while catching up and not handed to a lane yet.
    held: BTreeMap<u64, Message>,
    /// The server that leads the group's consumer, as last read (on a cluster).
    leader: Option<String>,
}

impl Gate {
    /// Whether messages are held until earlier ones are acked.
    pub fn catching_up(&self) -> bool {
        self.deadline.is_some()
    }

    /// Catches up if the group has messages delivered and not acked. `info` is the
    /// group's state read before pulling; without it, catches up to the limit (and
    /// longer while the state stays unreadable, see [`Gate::unreadable`]).
    pub fn arm(&mut self, info: Option<&consumer::Info>, ack_wait: Duration) {
        self.limit = catch_up_limit(ack_wait);
        match info {
            Some(info) => {
                let moved = self.leader_moved(info);
                self.arm_at(info.delivered.stream_sequence, acked_through(info), moved);
            }
            None => self.arm_at(u64::MAX, 0, true),
        }
    }

    /// [`Gate::arm`] with the last stream sequence delivered to the group (`mark`) and
    /// the sequence up to which everything is acked (`floor`); `trouble` when the
    /// group's consumer has just changed leader or could not be read.
    fn arm_at(&mut self, mark: u64, floor: u64, trouble: bool) {
        if floor >= mark && !self.catching_up() {
            return;
        }
        let now = Instant::now();
        if self.catching_up() {
            // A restart while catching up: the limit runs on, unless more has been
            // delivered meanwhile (to an instance that may have died since), or the
            // group's consumer is in trouble.
            let more = mark != u64::MAX && self.mark != u64::MAX && mark > self.mark;
            if trouble || more {
                self.extend(now);
            }
            self.mark = match (self.mark, mark) {
                // The state is known now, or still unknown.
                (u64::MAX, mark) => mark,
                // Unknown now: keep what was known.
                (known, u64::MAX) => known,
                (known, mark) => known.max(mark),
            };
            self.through = self.through.max(floor);
        } else {
            self.mark = mark;
            self.through = floor;
            self.cap = Some(now + self.limit + ELECTION_GRACE);
            self.deadline = Some(now + self.limit);
        }
        tracing::info!(
            mark = self.mark,
            ack_floor = floor,
            "messages delivered before this instance pulled are not acked yet; \
             holding later ones until they are, to keep each subject's order"
        );
        self.check_done();
    }

    /// Pushes the deadline to a full limit from `now`, within the cap.
    fn extend(&mut self, now: Instant) {
        let (Some(deadline), Some(cap)) = (self.deadline, self.cap) else {
            return;
        };
        self.deadline = Some(deadline.max(now + self.limit).min(cap));
    }

    /// Records the leader of the group's consumer in `info`: whether it differs from
    /// the one last read (the old one's messages in flight may be lost).
    fn leader_moved(&mut self, info: &consumer::Info) -> bool {
        let leader = info.cluster.as_ref().and_then(|c| c.leader.clone());
        let moved = self.leader.is_some() && leader != self.leader;
        if moved {
            tracing::info!(
                from = self.leader.as_deref().unwrap_or("none"),
                to = leader.as_deref().unwrap_or("none"),
                "the consumer group's leader changed"
            );
        }
        self.leader = leader;
        moved
    }

    /// Takes the group's state, as just read while catching up: its ack floor, its
    /// leader, and its mark if it was unknown.
    pub fn observe(&mut self, info: &consumer::Info) {
        if self.leader_moved(info) {
            self.extend(Instant::now());
        }
        if self.mark == u64::MAX {
            // Everything delivered so far, this instance's held messages included
            // (they go as the floor reaches them).
            self.mark = info.delivered.stream_sequence;
        }
        self.through = self.through.max(acked_through(info));
        self.check_done();
    }

    /// The group's state could not be read (its consumer has no leader, say): what
    /// was lost in flight comes back only once a leader has taken over, so the limit
    /// runs from now again, within [`ELECTION_GRACE`].
    pub fn unreadable(&mut self) {
        self.extend(Instant::now());
        self.check_done();
    }

    /// Stops catching up when everything up to the mark is acked or in a lane here,
    /// or when the deadline has passed.
    pub fn check_done(&mut self) {
        let Some(deadline) = self.deadline else {
            return;
        };
        if self.through >= self.mark {
            tracing::debug!(mark = self.mark, "caught up");
            self.deadline = None;
            self.cap = None;
        } else if Instant::now() >= deadline {
            tracing::info!(
                mark = self.mark,
                through = self.through,
                held = self.held.len(),
                "stopped waiting for earlier unacked messages (another live instance \
                 has them, or they are late); releasing the held ones in stream order"
            );
            self.deadline = None;
            self.cap = None;
        }
    }

    /// Takes a received message: returns it if it goes to its lane now, else holds it.
    pub fn admit(&mut self, message: Message) -> Option<Message> {
        if !self.catching_up() && self.held.is_empty() {
            return Some(message);
        }
        let Ok(sequence) = message.info().map(|info| info.stream_sequence) else {
            return Some(message);
        };
        if sequence <= self.through {
            // Acked or already in a lane: a late copy, which the lane handles as any.
            return Some(message);
        }
        // A newer delivery of a held message replaces it (either acks it).
        self.held.insert(sequence, message);
        None
    }

    /// The next held message that may go to its lane now, lowest stream sequence first.
    pub fn next_release(&mut self) -> Option<Message> {
        let (&sequence, _) = self.held.first_key_value()?;
        if self.catching_up() && sequence > self.through.saturating_add(1) {
            return None;
        }
        self.through = self.through.max(sequence);
        let message = self.held.pop_first().map(|(_, message)| message);
        self.check_done();
        message
    }

    /// Tells JetStream the held messages are in progress, so that none is redelivered.
    pub async fn progress(&self) {
        for message in self.held.values() {
            let _ = message.ack_with(AckKind::Progress).await;
        }
    }

    /// How many messages are held.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Acks, naks and sends progress for the held messages through `context` from now
    /// on (the client they came with has died). A client's death is trouble, as a
    /// leader change is: what it lost in flight comes back only after `ack_wait`, so a
    /// gate that is catching up gets a full limit again, and a new cap.
    pub fn rebind(&mut self, context: &async_nats::jetstream::Context) {
        for message in self.held.values_mut() {
            message.context = context.clone();
        }
        if self.catching_up() {
            let now = Instant::now();
            self.cap = Some(now + self.limit + ELECTION_GRACE);
            self.extend(now);
        }
    }

    /// Lanes of this instance were abandoned (or ended badly) with what they had: the
    /// messages handed to them are neither acked nor in a lane any more, so only the
    /// group's ack floor counts from now on (the next [`Gate::arm`] reads it).
    pub fn lanes_lost(&mut self) {
        self.through = 0;
    }

    /// Takes the held messages out, in stream order (to hand them back on shutdown).
    pub fn take_held(&mut self) -> impl Iterator<Item = Message> {
        std::mem::take(&mut self.held).into_values()
    }
}

#[cfg(test)]
mod tests {
    //! The gate's messages are real JetStream messages whose reply subjects carry their
    //! stream sequence; their context is a client that never connects (nothing here
    //! acks), so no server is needed.

    use super::*;
    use async_nats::jetstream::Context;

    async fn context() -> Context {
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect("nats://127.0.0.1:1")
            .await
            .unwrap();
        async_nats::jetstream::new(client)
    }

    /// A message at stream sequence `sequence`, first delivery.
    fn message(context: &Context, sequence: u64) -> Message {
        Message {
            message: async_nats::Message {
                subject: "p.quiz.q1.submitted".into(),
                reply: Some(
                    format!("$JS.ACK.s.g.1.{sequence}.{sequence}.1700000000000000000.0").into(),
                ),
                payload: bytes::Bytes::new(),
                headers: None,
                status: None,
                description: None,
                length: 0,
            },
            context: context.clone(),
        }
    }

    fn sequence(message: &Message) -> u64 {
        message.info().unwrap().stream_sequence
    }

    /// The group's state as the server reports it.
    fn info(delivered: u64, ack_floor: u64, ack_pending: usize) -> consumer::Info {
        serde_json::from_value(serde_json::json!({
            "stream_name": "s",
            "name": "g",
            "created": "2026-01-01T00:00:00Z",
            "config": serde_json::to_value(consumer::Config::default()).unwrap(),
            "delivered": {"consumer_seq": delivered, "stream_seq": delivered},
            "ack_floor": {"consumer_seq": ack_floor, "stream_seq": ack_floor},
            "num_ack_pending": ack_pending,
            "num_redelivered": 0,
            "num_waiting": 0,
            "num_pending": 0,
        }))
        .unwrap()
    }

    /// The group's state on a cluster whose consumer `leader` leads.
    fn info_led(
        delivered: u64,
        ack_floor: u64,
        ack_pending: usize,
        leader: &str,
    ) -> consumer::Info {
        let mut info = info(delivered, ack_floor, ack_pending);
        info.cluster = Some(serde_json::from_value(serde_json::json!({"leader": leader})).unwrap());
        info
    }

    const ACK_WAIT: Duration = Duration::from_secs(30);

    #[test]
    fn catching_up_lasts_ack_wait_and_a_bounded_margin() {
        assert_eq!(
            catch_up_limit(Duration::from_secs(30)),
            Duration::from_secs(35)
        );
        assert_eq!(
            catch_up_limit(Duration::from_secs(2)),
            Duration::from_secs(3)
        );
        assert_eq!(
            catch_up_limit(Duration::from_millis(200)),
            Duration::from_millis(700)
        );
    }

    #[test]
    fn the_ack_floor_is_the_delivered_sequence_when_nothing_awaits_an_ack() {
        assert_eq!(acked_through(&info(10, 4, 6)), 4);
        assert_eq!(acked_through(&info(10, 0, 0)), 10);
    }

    #[tokio::test]
    async fn a_group_with_everything_acked_lets_messages_through() {
        let context = context().await;
        let mut gate = Gate::default();
        gate.arm(Some(&info(10, 0, 0)), ACK_WAIT);
        assert!(!gate.catching_up());
        let passed = gate.admit(message(&context, 11)).unwrap();
        assert_eq!(sequence(&passed), 11);
        assert!(gate.next_release().is_none());
    }

    #[tokio::test]
    async fn without_the_groups_state_the_gate_holds_everything_until_the_limit() {
        let context = context().await;
        let mut gate = Gate::default();
        gate.arm(None, ACK_WAIT);
        assert!(gate.catching_up());
        assert!(gate.admit(message(&context, 1)).is_none());
        assert!(gate.admit(message(&context, 3)).is_none());
        // 1 follows the floor, 0; 2 is missing.
        assert_eq!(gate.next_release().map(|m| sequence(&m)), Some(1));
        assert!(gate.next_release().is_none());
        gate.deadline = Some(Instant::now());
        gate.check_done();
        assert!(!gate.catching_up());
        assert_eq!(gate.next_release().map(|m| sequence(&m)), Some(3));
    }

    #[tokio::test]
    async fn held_messages_go_in_stream_order_as_the_floor_rises() {
        let context = context().await;
        let mut gate = Gate::default();
        gate.arm(Some(&info(10, 4, 6)), ACK_WAIT);
        assert!(gate.catching_up());
        // At or below the floor: a late copy, handled as any.
        assert_eq!(
            gate.admit(message(&context, 3)).map(|m| sequence(&m)),
            Some(3)
        );
        for held in [8, 6, 7] {
            assert!(gate.admit(message(&context, held)).is_none(), "{held}");
        }
        // A newer delivery of a held message replaces it.
        assert!(gate.admit(message(&context, 7)).is_none());
        assert_eq!(gate.held.len(), 3);
        // 5 is neither acked nor here: nothing may go.
        assert!(gate.next_release().is_none());
        gate.observe(&info(10, 5, 5));
        let released: Vec<u64> = std::iter::from_fn(|| gate.next_release())
            .map(|m| sequence(&m))
            .collect();
        assert_eq!(released, [6, 7, 8]);
        assert!(gate.catching_up(), "9 and 10 are still out");
        // A message after the mark waits for them too.
        assert!(gate.admit(message(&context, 12)).is_none());
        gate.observe(&info(14, 10, 2));
        assert!(!gate.catching_up());
        assert_eq!(gate.next_release().map(|m| sequence(&m)), Some(12));
        assert!(gate.next_release().is_none());
        assert_eq!(
            gate.admit(message(&context, 13)).map(|m| sequence(&m)),
            Some(13)
        );
    }

    #[tokio::test]
    async fn at_the_deadline_held_messages_are_released_in_stream_order_despite_gaps() {
        let context = context().await;
        let mut gate = Gate::default();
        gate.arm(Some(&info(10, 4, 6)), ACK_WAIT);
        for held in [9, 6, 12] {
            assert!(gate.admit(message(&context, held)).is_none());
        }
        gate.deadline = Some(Instant::now());
        gate.check_done();
        assert!(!gate.catching_up());
        let released: Vec<u64> = std::iter::from_fn(|| gate.next_release())
            .map(|m| sequence(&m))
            .collect();
        assert_eq!(released, [6, 9, 12]);
    }

    #[tokio::test]
    async fn a_restart_while_catching_up_extends_the_limit_only_for_new_deliveries() {
        let mut gate = Gate::default();
        gate.arm(Some(&info(10, 4, 6)), ACK_WAIT);
        let soon = Instant::now() + Duration::from_secs(1);
        gate.deadline = Some(soon);
        // Nothing more delivered: the limit runs on.
        gate.arm(Some(&info(10, 5, 5)), ACK_WAIT);
        assert_eq!(gate.deadline, Some(soon));
        assert_eq!(gate.through, 5);
        // More delivered meanwhile: a new limit, and the mark moves up.
        gate.arm(Some(&info(14, 5, 9)), ACK_WAIT);
        assert!(gate.deadline.unwrap() > soon + Duration::from_secs(30));
        assert_eq!(gate.mark, 14);
        assert_eq!(gate.through, 5);
    }

    #[tokio::test]
    async fn a_gate_carried_to_a_new_client_gets_a_new_limit_and_cap() {
        let old = context().await;
        let mut gate = Gate::default();
        gate.arm(Some(&info(10, 4, 6)), ACK_WAIT);
        assert!(gate.admit(message(&old, 12)).is_none());
        // The limit and the cap have all but run out when the client dies.
        let start = Instant::now();
        gate.deadline = Some(start);
        gate.cap = Some(start);
        let new = context().await;
        gate.rebind(&new);
        assert!(gate.catching_up());
        assert!(gate.deadline.unwrap() >= start + catch_up_limit(ACK_WAIT));
        assert!(gate.cap.unwrap() >= start + catch_up_limit(ACK_WAIT) + ELECTION_GRACE);
        assert_eq!(gate.held(), 1);
    }

    #[tokio::test]
    async fn after_a_lane_was_lost_only_the_ack_floor_counts() {
        let context = context().await;
        let mut gate = Gate::default();
        gate.arm(Some(&info(10, 4, 6)), ACK_WAIT);
        assert!(gate.admit(message(&context, 5)).is_none());
        assert!(gate.admit(message(&context, 6)).is_none());
        // 5 goes to a lane, which is then abandoned with it.
        assert_eq!(gate.next_release().map(|m| sequence(&m)), Some(5));
        gate.lanes_lost();
        gate.arm(Some(&info(10, 4, 6)), ACK_WAIT);
        assert_eq!(gate.through, 4);
        // 6 waits for 5 to be acked (it comes back after ack_wait), not only handed to
        // the lane that was lost.
        assert!(gate.next_release().is_none());
        gate.observe(&info(10, 5, 5));
        assert_eq!(gate.next_release().map(|m| sequence(&m)), Some(6));
    }

    #[tokio::test]
    async fn taking_the_held_messages_empties_the_gate() {
        let context = context().await;
        let mut gate = Gate::default();
        gate.arm(None, ACK_WAIT);
        for held in [5, 3] {
            assert!(gate.admit(message(&context, held)).is_none());
        }
        let taken: Vec<u64> = gate.take_held().map(|m| sequence(&m)).collect();
        assert_eq!(taken, [3, 5]);
        assert!(gate.held.is_empty());
    }

    #[tokio::test]
    async fn an_unreadable_group_keeps_catching_up_past_the_limit_within_the_grace() {
        let context = context().await;
        let mut gate = Gate::default();
        gate.arm(None, ACK_WAIT);
        assert!(gate.admit(message(&context, 3)).is_none());
        let start = Instant::now();
        // The limit has all but run out when the state still cannot be read.
        gate.deadline = Some(start);
        gate.unreadable();
        assert!(gate.catching_up(), "an election may still be going on");
        assert!(gate.deadline.unwrap() >= start + catch_up_limit(ACK_WAIT));
        assert!(gate.deadline <= gate.cap);
        // Past the grace, it stops all the same and releases in stream order.
        gate.cap = Some(Instant::now());
        gate.deadline = gate.cap;
        gate.unreadable();
        assert!(!gate.catching_up());
        assert_eq!(gate.next_release().map(|m| sequence(&m)), Some(3));
    }

    #[tokio::test]
    async fn a_new_leader_of_the_group_restarts_the_limit() {
        let mut gate = Gate::default();
        gate.arm(Some(&info_led(10, 4, 6, "n1")), ACK_WAIT);
        let soon = Instant::now() + Duration::from_millis(100);
        gate.deadline = Some(soon);
        // The same leader: the limit runs on.
        gate.observe(&info_led(10, 5, 5, "n1"));
        assert_eq!(gate.deadline, Some(soon));
        // Another one: what the old one had sent may be lost; it comes back only
        // `ack_wait` after the new one took over.
        gate.observe(&info_led(10, 5, 5, "n2"));
        assert!(gate.deadline.unwrap() > soon + Duration::from_secs(30));
        assert!(gate.catching_up());
        gate.observe(&info_led(12, 10, 2, "n2"));
        assert!(!gate.catching_up(), "everything up to the mark is acked");
    }

    #[tokio::test]
    async fn a_gate_armed_without_the_state_learns_its_mark_from_the_first_read() {
        let context = context().await;
        let mut gate = Gate::default();
        gate.arm(None, ACK_WAIT);
        assert_eq!(gate.mark, u64::MAX);
        assert!(gate.admit(message(&context, 11)).is_none());
        gate.observe(&info(11, 10, 1));
        assert_eq!(gate.mark, 11);
        assert_eq!(gate.next_release().map(|m| sequence(&m)), Some(11));
        assert!(!gate.catching_up());
    }
}
