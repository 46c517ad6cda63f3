//! The leader's loop, as a struct whose methods are its steps: read a batch past the
//! fence, publish it on the chain, mark what JetStream acknowledged, and wait when
//! there is nothing to do.

use super::atomic::{self, publish_atomic};
use super::fence::Fence;
use super::mark::{self, Marker};
use super::prune::Pruner;
use super::publish::{
    publish, publish_one_by_one, read_tail, Failure, Published, Suspect, Tail, TailRead,
};
use super::read::{self, OutboxRow};
use super::wake::{Wake, BUSY_BATCH};
use super::RelayState;
use crate::relay::RelaySettings;
use crate::service::nats::Mover;
use crate::service::Inner;
use crate::support::pg::Within;
use crate::support::retry::{backoff, sleep_or_stop};
use crate::support::sql::{OUTBOX, RELAY_PROGRESS};
use const_format::formatcp;
use sqlx::PgConnection;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::Instrument;

/// How leading ended.
pub(super) enum Led {
    /// Told to stop (a shutdown, or the handle was dropped).
    Stopped,
    /// Gave up the lead after failing to publish for `yield_after`.
    Yielded,
    /// A test asked it to die before marking a batch.
    #[cfg(feature = "test-hooks")]
    Crashed,
}

/// What one step of the loop decided.
enum Step {
    Next,
    End(Led),
}

/// What marking one batch found.
struct Marked {
    published: u64,
    /// When the first event that failed may be tried again.
    retry_in: Option<Duration>,
    /// Whether JetStream refused an event because its predecessor was not the stream's
    /// last message.
    out_of_chain: bool,
}

/// How long the relay publishes one event at a time after it last saw another
/// publisher's message in its stream.
const ONE_BY_ONE_QUIET: Duration = Duration::from_secs(10);

/// How long the relay publishes each event with its own acknowledgement after the
/// server refused an atomic batch in a way that says they do not work here now.
const ATOMIC_SETBACK: Duration = Duration::from_secs(60);

/// Whether the outbox has the event with this id.
const IN_OUTBOX: &str = formatcp!("SELECT 1 FROM {OUTBOX} WHERE id = $1");

/// Counts messages of other publishers found in the stream.
const RECORD_FOREIGN: &str = formatcp!(
    "UPDATE {RELAY_PROGRESS}
     SET foreign_messages = foreign_messages + $1, foreign_seen_at = now()"
);

/// Leads on `conn`, which holds the leader lock, until told to stop, until publishing
/// has failed for `yield_after`, or until a Postgres error (the connection, and so the
/// lock, may be gone). However it ends, the marks of what JetStream acknowledged are
/// written.
pub(super) async fn lead(
    inner: &Inner,
    conn: &mut PgConnection,
    stop: &mut watch::Receiver<bool>,
    state: &RelayState,
    mover: &mut Mover,
) -> Result<Led, sqlx::Error> {
    let settings = &inner.config.relay;
    let pruner = Pruner::start(conn, settings).await?;
    let marker = Marker::open(&inner.pg_options, settings).await?;
    let mut leader = Leader {
        inner,
        settings,
        conn,
        stop,
        state,
        marker,
        pruner,
        fence: Fence::default(),
        wake: Wake::listen(inner.pool.clone(), settings.statement_timeout),
        tail: None,
        chain_broken: false,
        one_by_one_until: None,
        atomic: AtomicState::default(),
        tail_failures: 0,
        prefetched: None,
        failing_since: None,
        mover,
    };
    let led = leader.run().await;
    leader.marker.settle(state, &mut leader.pruner).await;
    leader.marker.close().await;
    led
}

/// What the leader knows of atomic batches on its stream.
#[derive(Debug)]
struct AtomicState {
    /// Whether the stream allows them, as last read (`None`: to be read).
    allowed: Option<bool>,
    /// Until when not to use them (or read again whether the stream allows them): a
    /// refusal said they do not work here now.
    aside_until: Option<Instant>,
    /// Most events per batch: the server's limit, once it said it.
    chunk: usize,
}

impl Default for AtomicState {
    fn default() -> Self {
        AtomicState {
            allowed: None,
            aside_until: None,
            chunk: atomic::CHUNK,
        }
    }
}

/// The leader's state between steps.
struct Leader<'a> {
    inner: &'a Inner,
    settings: &'a RelaySettings,
    /// The leader's connection: it holds the lock, reads and waits at the fence.
    conn: &'a mut PgConnection,
    stop: &'a mut watch::Receiver<bool>,
    state: &'a RelayState,
    marker: Marker,
    pruner: Pruner,
    fence: Fence,
    wake: Wake,
    /// The stream's last message, when known (after a batch that went through whole).
    tail: Option<Tail>,
    /// Whether the last batch broke its chain: the next tail read says why.
    chain_broken: bool,
    /// Until when to publish one event at a time: another publisher writes to the
    /// stream, and its messages would break the chain.
    one_by_one_until: Option<Instant>,
    /// Whether atomic batches work on the stream, as last seen.
    atomic: AtomicState,
    tail_failures: i32,
    /// The next batch, read while the last one was being published.
    prefetched: Option<Vec<OutboxRow>>,
    /// Since when every batch has failed with nothing published.
    failing_since: Option<Instant>,
    /// Moves the client to another server when NATS keeps failing on this one.
    mover: &'a mut Mover,
}

impl Leader<'_> {
    async fn run(&mut self) -> Result<Led, sqlx::Error> {
        // Writers notify only while the relay says it is idle.
        self.wake.set_idle(self.conn, false).await?;
        loop {
            if *self.stop.borrow() {
                return Ok(Led::Stopped);
            }
            if let Step::End(led) = self.step().await? {
                return Ok(led);
            }
        }
    }

    /// One batch, or one wait.
    async fn step(&mut self) -> Result<Step, sqlx::Error> {
        let reread = self.fence.reread_due();
        if reread {
            self.prefetched = None;
            self.marker.settle(self.state, &mut self.pruner).await;
        }
        let batch = match self.prefetched.take() {
            Some(batch) => batch,
            None => {
                let after = self.marker.read_after();
                let read = read::fetch(
                    self.conn,
                    &mut self.fence,
                    self.settings,
                    self.stop,
                    self.marker.pid(),
                    after,
                );
                match read.await? {
                    Some(batch) => batch,
                    None => return Ok(Step::End(Led::Stopped)),
                }
            }
        };
        if reread {
            self.fence.reread_done();
        }
        if batch.is_empty() {
            return self.nothing_new().await;
        }
        self.wake.busy_if_outpaced(self.conn, batch.len()).await?;
        // Measured on the database's clock, which also set the retry time.
        if let Some(wait) = batch[0].retry_wait(self.settings.retry_max) {
            return Ok(self.pause(wait).await);
        }
        let span = tracing::debug_span!(
            "edupulse.relay.batch",
            messaging.system = "nats",
            messaging.operation.type = "publish",
            messaging.destination.name = %self.inner.config.stream,
            messaging.batch.message_count = batch.len(),
            size = batch.len(),
            first_seq = batch[0].seq,
            last_seq = batch[batch.len() - 1].seq
        );
        if self.one_by_one() {
            return self.publish_one_by_one_and_mark(batch, span).await;
        }
        let read = match self.known_tail().instrument(span.clone()).await {
            Ok(read) => read,
            Err(step) => return Ok(step),
        };
        if std::mem::take(&mut self.chain_broken) && self.is_foreign(read.suspect).await? {
            // The chain broke on another publisher's message: chaining again would
            // break again while it publishes.
            self.other_publisher(1).await?;
            return self.publish_one_by_one_and_mark(batch, span).await;
        }
        self.publish_and_mark(batch, read.tail, span).await
    }

    /// Whether the stream's last message is another publisher's.
    async fn is_foreign(&mut self, suspect: Option<Suspect>) -> Result<bool, sqlx::Error> {
        match suspect {
            None => Ok(false),
            Some(Suspect::NotAnEvent) => Ok(true),
            Some(Suspect::OtherSource(id)) => {
                let ours: Option<i32> = sqlx::query_scalar(IN_OUTBOX)
                    .bind(id)
                    .fetch_optional(&mut *self.conn)
                    .within(self.settings.statement_timeout)
                    .await?;
                Ok(ours.is_none())
            }
        }
    }

    /// Whether to publish atomic batches now: the configuration wants them, the server
    /// the client is on now offers them, the stream allows them (read when leading
    /// starts, and again each time a refusal set them aside), and no refusal has set
    /// them aside lately.
    async fn atomic(&mut self) -> bool {
        if !self.inner.atomic {
            return false;
        }
        if let Some(until) = self.atomic.aside_until {
            if Instant::now() < until {
                return false;
            }
            self.atomic.aside_until = None;
            self.atomic.allowed = None;
        }
        if !crate::service::offers_atomic(&self.inner.nats.server_info().version) {
            return false;
        }
        let allowed = match self.atomic.allowed {
            Some(allowed) => allowed,
            None => {
                let allowed = self.stream_allows_atomic().await;
                if allowed.is_none() || allowed == Some(false) {
                    // Not now: read again after a while.
                    self.atomic.aside_until = Some(Instant::now() + ATOMIC_SETBACK);
                }
                self.atomic.allowed = allowed;
                allowed.unwrap_or(false)
            }
        };
        allowed
    }

    /// Whether the stream allows atomic batches, if it can be read.
    async fn stream_allows_atomic(&self) -> Option<bool> {
        let stream = &self.inner.config.stream;
        match self.inner.jetstream.get_stream(stream).await {
            Ok(found) => Some(found.cached_info().config.allow_atomic_publish),
            Err(error) => {
                tracing::debug!(%error, "cannot read whether the stream allows atomic batches");
                None
            }
        }
    }

    /// Whether to publish one event at a time now (another publisher was seen lately).
    fn one_by_one(&mut self) -> bool {
        match self.one_by_one_until {
            Some(until) if Instant::now() < until => true,
            Some(_) => {
                self.one_by_one_until = None;
                // Others may have published since: chain to what the stream holds.
                self.tail = None;
                tracing::info!(
                    quiet_for = ?ONE_BY_ONE_QUIET,
                    "no other publisher seen in the stream lately; pipelining again"
                );
                false
            }
            None => false,
        }
    }

    /// Another publisher appended `count` messages to the stream: count them where
    /// `outbox_status()` shows them, and publish one event at a time for a while.
    async fn other_publisher(&mut self, count: u64) -> Result<(), sqlx::Error> {
        if self.one_by_one_until.is_none() {
            tracing::warn!(
                stream = %self.inner.config.stream,
                prefix = %self.inner.config.subject_prefix,
                "another publisher writes to the relay's stream; publishing one event at a \
                 time (slower, still in order) until none has been seen for {ONE_BY_ONE_QUIET:?}; \
                 give this service a subject prefix and stream of its own"
            );
        }
        self.one_by_one_until = Some(Instant::now() + ONE_BY_ONE_QUIET);
        sqlx::query(RECORD_FOREIGN)
            .bind(i64::try_from(count).unwrap_or(i64::MAX))
            .execute(&mut *self.conn)
            .within(self.settings.statement_timeout)
            .await?;
        Ok(())
    }

    /// Publishes `batch` one event at a time, each after the last was acknowledged,
    /// and marks what went through.
    async fn publish_one_by_one_and_mark(
        &mut self,
        mut batch: Vec<OutboxRow>,
        span: tracing::Span,
    ) -> Result<Step, sqlx::Error> {
        let started = Instant::now();
        let publishing = publish_one_by_one(self.inner, &mut batch, &self.state.sent);
        let (outcome, foreign) = publishing.instrument(span.clone()).await;
        self.state.batches.fetch_add(1, Ordering::SeqCst);
        #[cfg(feature = "test-hooks")]
        if self.state.crash_before_mark.load(Ordering::SeqCst) {
            return Ok(Step::End(Led::Crashed));
        }
        if foreign > 0 {
            self.other_publisher(foreign).await?;
        }
        record_batch(&batch, &outcome, started);
        let marked = self.mark(&batch, outcome).instrument(span).await?;
        // Others may publish after ours: the next chain starts from what the stream holds.
        self.tail = None;
        self.after_batch(marked).await
    }

    /// Nothing to publish: wait for a mark in flight, for writers that did not notify,
    /// or for a notification or the poll interval.
    async fn nothing_new(&mut self) -> Result<Step, sqlx::Error> {
        if !self.marker.is_idle() {
            // Look again once the mark in flight is written, or at once if a writer
            // commits meanwhile (a commit waits for the WAL flush, which a new event
            // should not wait for).
            tokio::select! {
                _ = self.marker.written() => self.marker.settle(self.state, &mut self.pruner).await,
                _ = self.wake.notified() => {}
            }
            return Ok(Step::Next);
        }
        if !self.wake.is_idle() {
            // From now on writers notify. Writers that saw the relay busy did not: they
            // hold the outbox's lock from before they looked until they end, so wait
            // for every one writing now, then look once more (the next fence is read
            // after they have drawn their sequence numbers).
            self.wake.set_idle(self.conn, true).await?;
            let pid = self.marker.pid();
            if self
                .fence
                .wait_for_writers(self.conn, self.settings, self.stop, pid)
                .await?
            {
                return Ok(Step::End(Led::Stopped));
            }
            return Ok(Step::Next);
        }
        // Leading with nothing left to publish: whatever failed before works now.
        self.state.recovered();
        self.pruner
            .maybe_prune(self.conn, self.settings, self.marker.through())
            .await?;
        tokio::select! {
            _ = self.wake.notified() => {}
            _ = tokio::time::sleep(self.settings.poll_interval) => {}
            changed = self.stop.changed() => {
                // A dropped handle stops the relay, as a shutdown does.
                if changed.is_err() {
                    return Ok(Step::End(Led::Stopped));
                }
            }
        }
        Ok(Step::Next)
    }

    /// The stream's last message, read unless known; when NATS cannot be read, the
    /// step to take instead (a wait, or yielding the lead).
    async fn known_tail(&mut self) -> Result<TailRead, Step> {
        if let Some(tail) = self.tail.take() {
            return Ok(TailRead {
                tail,
                suspect: None,
            });
        }
        match read_tail(self.inner).await {
            Ok(read) => {
                // Not a sign that this server works: a node cut off from its cluster
                // may still answer with what it last knew, and refuse every publish.
                self.tail_failures = 0;
                Ok(read)
            }
            Err(why) => {
                // NATS is out of reach: publishing would fail too.
                self.tail_failures = self.tail_failures.saturating_add(1);
                let delay = backoff(
                    self.settings.retry_base,
                    self.settings.retry_max,
                    self.tail_failures,
                );
                tracing::warn!(error = %why, retry_in = ?delay, "relay cannot read the stream; retrying");
                self.state
                    .failing(format!("cannot read the stream from NATS: {why}; retrying"));
                self.mover
                    .failed(&self.inner.nats, "reading the stream")
                    .await;
                if self.failing_too_long() {
                    return Err(Step::End(Led::Yielded));
                }
                Err(self.pause(delay).await)
            }
        }
    }

    /// Publishes `batch` after `tail` and marks what went through. While a busy
    /// relay's batch is published (NATS' work), the next is read (Postgres' work),
    /// starting after this one; it is used only if this one goes through whole, and
    /// otherwise read again.
    async fn publish_and_mark(
        &mut self,
        mut batch: Vec<OutboxRow>,
        tail: Tail,
        span: tracing::Span,
    ) -> Result<Step, sqlx::Error> {
        let started = Instant::now();
        let read_ahead = (batch.len() >= BUSY_BATCH).then(|| batch[batch.len() - 1].seq);
        let atomic = self.atomic().await;
        let chunk = self.atomic.chunk;
        let (inner, state) = (self.inner, self.state);
        let publishing = async {
            if !atomic {
                return (
                    publish(inner, &mut batch, &tail, &state.sent).await,
                    None,
                    None,
                );
            }
            let done = publish_atomic(inner, &mut batch, &tail, chunk, &state.sent).await;
            state
                .atomic_batches
                .fetch_add(done.committed, Ordering::SeqCst);
            (done.published, done.setback, done.limit)
        }
        .instrument(span.clone());
        let (outcome, next) = match read_ahead {
            Some(after) => {
                let pid = self.marker.pid();
                let reading = read::fetch(
                    self.conn,
                    &mut self.fence,
                    self.settings,
                    self.stop,
                    pid,
                    after,
                );
                let (outcome, next) = tokio::join!(publishing, reading);
                (outcome, Some(next))
            }
            None => (publishing.await, None),
        };
        let (
            Published {
                outcome,
                last_sequence,
            },
            setback,
            limit,
        ) = outcome;
        if let Some(limit) = limit.filter(|limit| *limit < self.atomic.chunk) {
            tracing::info!(
                limit,
                "nats-server limits an atomic batch to {limit} messages; the relay keeps to it \
                 (raise jetstream.limits.batch.max_msgs to 1000 for fewer round trips)"
            );
            self.atomic.chunk = limit;
        }
        if let Some(why) = setback {
            tracing::warn!(
                error = %why,
                for_ = ?ATOMIC_SETBACK,
                "JetStream refused an atomic batch; publishing each event with its own \
                 acknowledgement for a while"
            );
            self.atomic.aside_until = Some(Instant::now() + ATOMIC_SETBACK);
        }
        let whole = outcome.len() == batch.len() && outcome.iter().all(Result::is_ok);
        self.state.batches.fetch_add(1, Ordering::SeqCst);
        #[cfg(feature = "test-hooks")]
        if self.state.crash_before_mark.load(Ordering::SeqCst) {
            return Ok(Step::End(Led::Crashed));
        }
        record_batch(&batch, &outcome, started);
        let marked = self.mark(&batch, outcome).instrument(span).await?;
        match next.transpose()? {
            Some(None) => return Ok(Step::End(Led::Stopped)),
            Some(Some(next)) if whole => self.prefetched = Some(next),
            _ => {}
        }
        if whole {
            // Every event of the batch is in the stream, the last one last: JetStream
            // stored each only right after its predecessor (or had it already, and then
            // any later event it has is a later one of this same order).
            self.tail = match (batch.last(), last_sequence) {
                (Some(row), Some(sequence)) => Some(Tail::Event {
                    id: row.id,
                    sequence,
                }),
                _ => None,
            };
        }
        self.after_batch(marked).await
    }

    /// Marks what JetStream acknowledged, in order, up to the first event that must
    /// wait: dead events first, then the published ones (past them all or, while the
    /// fence is held, one by one); records the failure of the first that must wait.
    async fn mark(
        &mut self,
        batch: &[OutboxRow],
        outcome: Vec<Result<(), super::publish::Failure>>,
    ) -> Result<Marked, sqlx::Error> {
        let sorted = mark::sort(batch, outcome);
        mark::record_dead(self.conn, &sorted.dead, self.settings.statement_timeout).await?;
        let done = sorted.mark(self.fence.held());
        self.marker
            .start(done, self.state, &mut self.pruner)
            .await?;
        let mut retry_in = None;
        if let Some((row, why)) = &sorted.retry {
            self.state.failing(format!(
                "publishing event {} ({}) failed: {why}; retrying",
                row.id, row.name
            ));
            retry_in = Some(mark::record_failure(self.conn, self.settings, row, why).await?);
        }
        if let Some((row, why)) = &sorted.out_of_chain {
            // Its predecessor failed (and is dead, or was itself refused after a lost
            // connection), or something else wrote to the stream in between. Sent first
            // in the next batch, it needs no predecessor; nothing to count or wait for.
            tracing::debug!(
                id = %row.id, event = %row.name, seq = row.seq, error = %why,
                "the event before this one did not reach the stream first; sending it again"
            );
        }
        Ok(Marked {
            published: sorted.published.len() as u64,
            retry_in,
            out_of_chain: sorted.out_of_chain.is_some(),
        })
    }

    /// After a batch: yield the lead if nothing has gone through for too long, wait
    /// before a retry, prune.
    async fn after_batch(&mut self, marked: Marked) -> Result<Step, sqlx::Error> {
        self.chain_broken |= marked.out_of_chain;
        if marked.published > 0 || marked.retry_in.is_none() {
            self.failing_since = None;
            self.mover.ok();
            if marked.retry_in.is_none() {
                self.state.recovered();
            }
        } else {
            self.mover.failed(&self.inner.nats, "publishing").await;
            if self.failing_too_long() {
                tracing::warn!(
                    failing_for = ?self.failing_since.map(|since| since.elapsed()),
                    "relay cannot publish to NATS; letting another replica lead for a while"
                );
                return Ok(Step::End(Led::Yielded));
            }
        }
        if let Some(delay) = marked.retry_in {
            if let Step::End(led) = self.pause(delay).await {
                return Ok(Step::End(led));
            }
        }
        self.pruner
            .maybe_prune(self.conn, self.settings, self.marker.through())
            .await?;
        Ok(Step::Next)
    }

    /// Whether publishing has failed, with nothing published, for `yield_after`
    /// (counting from now if it had not been failing).
    fn failing_too_long(&mut self) -> bool {
        let since = *self.failing_since.get_or_insert_with(Instant::now);
        !self.settings.yield_after.is_zero() && since.elapsed() >= self.settings.yield_after
    }

    /// Waits `delay`, unless told to stop.
    async fn pause(&mut self, delay: Duration) -> Step {
        if sleep_or_stop(self.stop, delay).await {
            Step::End(Led::Stopped)
        } else {
            Step::Next
        }
    }
}

/// Records a published batch's metrics (see [`crate::telemetry`]): the events
/// acknowledged, the failures by kind, and the time since `started`.
fn record_batch(batch: &[OutboxRow], outcome: &[Result<(), Failure>], started: Instant) {
    let mut errors = [0u64; 3];
    for result in outcome {
        match result {
            Ok(()) => {}
            Err(Failure::Permanent(_)) => errors[0] += 1,
            Err(Failure::Transient(_)) => errors[1] += 1,
            Err(Failure::OutOfChain(_)) => errors[2] += 1,
        }
    }
    let acked = batch
        .iter()
        .zip(outcome)
        .filter(|(_, result)| result.is_ok())
        .map(|(row, _)| row.occurred_at);
    crate::telemetry::relay_batch(acked, errors, started.elapsed());
}
