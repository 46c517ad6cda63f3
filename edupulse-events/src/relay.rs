//! The relay: publishes committed outbox events to JetStream, in sequence order, once.
//!
//! Any number of relays may run; the one holding a Postgres advisory lock on its own
//! connection leads, and does all its reading and marking on that connection, so a
//! relay that loses the connection loses the lead at its next statement. Standbys try
//! the lock every `standby_interval`.
//!
//! Order: sequence numbers are drawn when a row is inserted but become visible only at
//! commit, so a later event can commit before an earlier one. Before each batch the
//! leader reads the highest sequence drawn so far (the fence) and waits until every
//! transaction that was writing the outbox at that moment has ended (it watches their
//! locks in `pg_locks`). Every event up to the fence is then committed or gone, and the
//! batch stops at the fence, so nothing is published ahead of an earlier event.

use crate::service::{EventService, Inner};
use crate::support::pg::{is_undefined_table, open_session};
use crate::support::retry::{backoff, sleep_or_stop, AbortOnDrop};
use crate::support::sql::CHANNEL;
use crate::wire::Outbound;
use async_nats::jetstream::context::{PublishAckFuture, PublishError, PublishErrorKind};
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use bytes::Bytes;
use sqlx::postgres::PgListener;
use sqlx::{Connection, PgConnection, Row};
use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument;
use uuid::Uuid;

/// The advisory lock key the leader holds: "edupulse" in ASCII.
const LEADER_LOCK: i64 = 0x6564_7570_756c_7365;

/// The transactions writing the outbox now (but this session and the marker's, `$1`).
macro_rules! holders {
    () => {
        "SELECT coalesce(array_agg(DISTINCT virtualtransaction), '{}')
         FROM pg_locks
         WHERE locktype = 'relation'
           AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
           AND relation = 'edupulse.outbox'::regclass
           AND mode = 'RowExclusiveLock'
           AND pid IS DISTINCT FROM pg_backend_pid()
           AND pid IS DISTINCT FROM $1"
    };
}

const HOLDERS: &str = holders!();

/// The fence and the writers at that moment, in one round trip. The order matters: a
/// writer takes its lock before it draws a sequence number, so every writer holding a
/// number up to the fence is among the holders only if they are read after the fence.
/// The subquery refers to the fence's row, so Postgres runs it after reading it.
const FENCE_AND_HOLDERS: &str = concat!(
    "SELECT s.last_value, (",
    holders!(),
    " AND s.last_value IS NOT NULL) FROM edupulse.outbox_seq_seq AS s"
);

const STILL_HOLDING: &str = "\
SELECT count(*)
FROM pg_locks
WHERE locktype = 'relation'
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND relation = 'edupulse.outbox'::regclass
  AND (virtualtransaction = ANY($1) OR pid IS NULL)";

/// The next pending events up to the fence, at most `$2` of them and, after the first,
/// only while the bodies read so far (as stored) stay under `$4` bytes.
const READ_BATCH: &str = "\
SELECT seq, id, name, version, subject, payload::text AS payload, source, correlation_id,
       causation_id, traceparent, occurred_at, attempts, wait_secs
FROM (
    SELECT seq, id, name, version, subject, payload, source, correlation_id, causation_id,
           traceparent, occurred_at, attempts,
           greatest(0, extract(epoch FROM next_attempt_at - clock_timestamp()))::float8
               AS wait_secs,
           sum(pg_column_size(payload)) OVER (ORDER BY seq ROWS UNBOUNDED PRECEDING)
               - pg_column_size(payload)
               AS before
    FROM (
        SELECT * FROM edupulse.outbox
        WHERE status = 'pending' AND seq <= $1 AND seq > $3
        ORDER BY seq
        LIMIT $2
    ) AS next
) AS sized
WHERE before < $4
ORDER BY seq";

/// A running relay; stop it with [`RelayHandle::shutdown`].
#[derive(Debug)]
pub struct RelayHandle {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    state: Arc<RelayState>,
}

#[derive(Debug, Default)]
struct RelayState {
    leader: AtomicBool,
    published: AtomicU64,
    sent: AtomicU64,
    batches: AtomicU64,
    crash_before_mark: AtomicBool,
}

/// The relay task ended badly.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// The relay task panicked; its events stay pending for the next relay.
    #[error("the relay task panicked: {0}; pending events stay in the outbox for the next relay")]
    Panicked(String),
}

impl RelayHandle {
    /// Whether this relay currently leads (publishes).
    pub fn is_leader(&self) -> bool {
        self.state.leader.load(Ordering::SeqCst)
    }

    /// How many events this relay has published and marked.
    pub fn published(&self) -> u64 {
        self.state.published.load(Ordering::SeqCst)
    }

    /// How many messages this relay has sent to JetStream, retries included. In a run
    /// without failures it equals [`published`](Self::published): nothing is sent
    /// twice and left to JetStream's duplicate removal.
    pub fn sent(&self) -> u64 {
        self.state.sent.load(Ordering::SeqCst)
    }

    /// How many batches this relay has published (`published / batches` is the
    /// average batch).
    pub fn batches(&self) -> u64 {
        self.state.batches.load(Ordering::SeqCst)
    }

    /// Test hook: at its next batch the relay publishes, then drops its leader
    /// connection without marking the rows and stops, as if its process died there.
    #[doc(hidden)]
    pub fn __crash_before_mark(&self) {
        self.state.crash_before_mark.store(true, Ordering::SeqCst);
    }

    /// Whether the relay task has ended (after a shutdown or a simulated crash).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Stops the relay: the batch in flight is published and marked, the lead is
    /// released, and the task ends.
    ///
    /// # Errors
    /// [`RelayError::Panicked`] if the relay task panicked.
    pub async fn shutdown(self) -> Result<(), RelayError> {
        // The task may have ended already; then there is nobody to tell.
        let _ = self.stop.send(true);
        self.task
            .await
            .map_err(|e| RelayError::Panicked(e.to_string()))
    }
}

impl EventService {
    /// Starts a relay on the current tokio runtime. Dropping the handle stops it. Run one per replica: one leads,
    /// the others stand by.
    #[must_use = "dropping the handle stops the relay"]
    pub fn start_relay(&self) -> RelayHandle {
        let (stop, stop_rx) = watch::channel(false);
        let state = Arc::new(RelayState::default());
        let task = tokio::spawn(run(self.inner.clone(), stop_rx, state.clone()));
        RelayHandle { stop, task, state }
    }
}

async fn run(inner: Arc<Inner>, mut stop: watch::Receiver<bool>, state: Arc<RelayState>) {
    let settings = inner.config.relay.clone();
    let mut standby: Option<PgConnection> = None;
    loop {
        if *stop.borrow() {
            break;
        }
        let mut conn = match standby.take() {
            Some(conn) => conn,
            None => match open_session(&inner.pg_options).await {
                Ok(conn) => conn,
                Err(error) => {
                    tracing::warn!(%error, "relay cannot reach Postgres; retrying");
                    if sleep_or_stop(&mut stop, settings.standby_interval).await {
                        break;
                    }
                    continue;
                }
            },
        };
        let locked = sqlx::query_scalar::<_, bool>("SELECT pg_try_advisory_lock($1)")
            .bind(LEADER_LOCK)
            .fetch_one(&mut conn)
            .await;
        match locked {
            Ok(true) => {
                state.leader.store(true, Ordering::SeqCst);
                tracing::info!("relay leads");
                let outcome = lead(&inner, &mut conn, &mut stop, &state).await;
                state.leader.store(false, Ordering::SeqCst);
                match outcome {
                    Ok(Led::Stopped) => {
                        let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
                            .bind(LEADER_LOCK)
                            .execute(&mut conn)
                            .await;
                        let _ = conn.close().await;
                        tracing::info!("relay stopped");
                        break;
                    }
                    Ok(Led::Yielded) => {
                        let unlocked = sqlx::query("SELECT pg_advisory_unlock($1)")
                            .bind(LEADER_LOCK)
                            .execute(&mut conn)
                            .await;
                        if unlocked.is_ok() {
                            standby = Some(conn);
                        }
                        // Long enough for a standby (trying every standby_interval) to
                        // take the lead; if none does, this relay leads again.
                        let pause = (settings.standby_interval * 3).max(settings.retry_max);
                        if sleep_or_stop(&mut stop, pause).await {
                            break;
                        }
                    }
                    Ok(Led::Crashed) => {
                        // Dropping the connection without a word is what a dead process does.
                        drop(conn);
                        tracing::warn!("relay simulated a crash before marking");
                        break;
                    }
                    Err(error) if is_undefined_table(&error) => {
                        tracing::error!(
                            %error,
                            "the outbox tables are missing: call EventService::migrate() \
                             (or apply the migrations) before the relay can publish"
                        );
                        let _ = conn.close().await;
                        if sleep_or_stop(&mut stop, settings.retry_max).await {
                            break;
                        }
                    }
                    Err(error) => {
                        tracing::warn!(%error, "relay lost its leader connection; standing by");
                        drop(conn);
                        if sleep_or_stop(&mut stop, settings.retry_base).await {
                            break;
                        }
                    }
                }
            }
            Ok(false) => {
                standby = Some(conn);
                if sleep_or_stop(&mut stop, settings.standby_interval).await {
                    break;
                }
            }
            Err(error) => {
                tracing::warn!(%error, "relay cannot try the leader lock; retrying");
                if sleep_or_stop(&mut stop, settings.standby_interval).await {
                    break;
                }
            }
        }
    }
    if let Some(conn) = standby {
        let _ = conn.close().await;
    }
}

enum Led {
    Stopped,
    /// Gave up the lead after failing to publish for `yield_after`.
    Yielded,
    Crashed,
}

async fn lead(
    inner: &Arc<Inner>,
    conn: &mut PgConnection,
    stop: &mut watch::Receiver<bool>,
    state: &RelayState,
) -> Result<Led, sqlx::Error> {
    let mut pruner = Pruner::start(conn, inner.config.relay.retention).await?;
    let mut marker = Marker::open(inner).await?;
    let led = lead_with(inner, conn, &mut marker, &mut pruner, stop, state).await;
    // However leading ended, the marks of what JetStream acknowledged are written.
    marker.settle(state, &mut pruner).await;
    marker.close().await;
    led
}

/// What one mark records.
enum Mark {
    /// Every event up to this seq is published or dead: one update of
    /// `edupulse.relay_progress` (with retention zero, the range is also deleted).
    /// `published` counts the events published (the rest were dead).
    Through { seq: i64, published: u64 },
    /// These events are published, each marked by its status: while the relay cannot
    /// vouch for the order (see [`lead_with`]'s `held`).
    Rows(Vec<i64>),
}

impl Mark {
    /// The highest seq it covers.
    fn last(&self) -> Option<i64> {
        match self {
            Mark::Through { seq, .. } => Some(*seq),
            Mark::Rows(rows) => rows.last().copied(),
        }
    }

    fn published(&self) -> u64 {
        match self {
            Mark::Through { published, .. } => *published,
            Mark::Rows(rows) => rows.len() as u64,
        }
    }
}

/// Marks published events on a connection of its own, while the leader reads and
/// publishes the next batch: a commit waits for the WAL flush. One mark is in flight
/// at most; the batch read meanwhile starts after it, and the fence does not wait for
/// its transaction.
struct Marker {
    conn: Option<PgConnection>,
    /// The marking connection's backend.
    pid: i32,
    retention_zero: bool,
    pg_options: sqlx::postgres::PgConnectOptions,
    /// `edupulse.relay_progress.published_through` as this relay last wrote or read it:
    /// every pending event at or below it is published.
    through: i64,
    /// The mark in flight, and the task writing it (it hands the connection back), or
    /// what the task returned once [`Marker::written`] saw it end.
    in_flight: Option<Mark>,
    task: Option<JoinHandle<MarkDone>>,
    done: Option<Result<MarkDone, tokio::task::JoinError>>,
}

type MarkDone = (PgConnection, Result<(), sqlx::Error>);

impl Marker {
    async fn open(inner: &Inner) -> Result<Marker, sqlx::Error> {
        let mut marker = Marker {
            conn: None,
            pid: 0,
            retention_zero: inner.config.relay.retention.is_zero(),
            pg_options: inner.pg_options.clone(),
            through: 0,
            in_flight: None,
            task: None,
            done: None,
        };
        marker.connect().await?;
        Ok(marker)
    }

    async fn connect(&mut self) -> Result<(), sqlx::Error> {
        let mut conn = open_session(&self.pg_options).await?;
        let (pid, through): (i32, i64) = sqlx::query_as(
            "SELECT pg_backend_pid(),
                    (SELECT published_through FROM edupulse.relay_progress)",
        )
        .fetch_one(&mut conn)
        .await?;
        self.pid = pid;
        self.through = self.through.max(through);
        self.conn = Some(conn);
        Ok(())
    }

    /// Where the next read starts: after the mark in flight, or else after the mark.
    /// Every pending event at or below it is published or being marked (a failed mark
    /// sets it back, so its events are read and sent again).
    fn read_after(&self) -> i64 {
        self.in_flight
            .as_ref()
            .and_then(Mark::last)
            .unwrap_or(0)
            .max(self.through)
    }

    fn is_idle(&self) -> bool {
        self.in_flight.is_none()
    }

    /// Waits until the mark in flight has been written; cancel-safe (it only waits, and
    /// keeps what the task returned for [`Marker::settle`]).
    async fn written(&mut self) {
        if let Some(task) = self.task.as_mut() {
            let done = task.await;
            self.task = None;
            self.done = Some(done);
        }
    }

    /// Waits for the mark in flight, if any, and counts what it marked.
    async fn settle(&mut self, state: &RelayState, pruner: &mut Pruner) {
        let done = match (self.done.take(), self.task.take()) {
            (Some(done), _) => done,
            (None, Some(task)) => task.await,
            (None, None) => return,
        };
        let Some(marked) = self.in_flight.take() else {
            return;
        };
        match done {
            Ok((conn, Ok(()))) => {
                self.conn = Some(conn);
                state
                    .published
                    .fetch_add(marked.published(), Ordering::SeqCst);
                if let Mark::Through { seq, .. } = marked {
                    self.through = self.through.max(seq);
                }
                if let Some(last) = marked.last() {
                    pruner.published_up_to(last);
                }
            }
            Ok((_, Err(error))) => {
                // The events stay pending: they are published again (JetStream keeps
                // one copy) and marked then.
                tracing::warn!(%error, events = marked.published(), "relay could not mark published events; they will be sent again");
            }
            Err(error) => {
                tracing::warn!(%error, "relay's marking task failed; the events will be sent again");
            }
        }
    }

    /// Starts writing `mark` (after the mark in flight, if any, has ended).
    async fn start(
        &mut self,
        mark: Mark,
        state: &RelayState,
        pruner: &mut Pruner,
    ) -> Result<(), sqlx::Error> {
        self.settle(state, pruner).await;
        if mark.last().is_none() {
            return Ok(());
        }
        if self.conn.is_none() {
            self.connect().await?;
        }
        let Some(mut conn) = self.conn.take() else {
            return Ok(());
        };
        let retention_zero = self.retention_zero;
        let from = self.through;
        let statement = match &mark {
            Mark::Through { seq, .. } => {
                if retention_zero {
                    // Everything after the last mark is published (or dead, and kept).
                    sqlx::query(
                        "WITH gone AS (
                            DELETE FROM edupulse.outbox
                            WHERE seq > $2 AND seq <= $1 AND status <> 'dead')
                         UPDATE edupulse.relay_progress
                         SET published_through = greatest(published_through, $1),
                             updated_at = now()",
                    )
                    .bind(*seq)
                    .bind(from)
                } else {
                    sqlx::query(
                        "UPDATE edupulse.relay_progress
                         SET published_through = greatest(published_through, $1),
                             updated_at = now()",
                    )
                    .bind(*seq)
                }
            }
            Mark::Rows(rows) => {
                let sql = if retention_zero {
                    "DELETE FROM edupulse.outbox WHERE seq = ANY($1)"
                } else {
                    "UPDATE edupulse.outbox
                     SET status = 'published', published_at = now()
                     WHERE seq = ANY($1)"
                };
                sqlx::query(sql).bind(rows.clone())
            }
        };
        self.in_flight = Some(mark);
        self.task = Some(tokio::spawn(async move {
            let done = statement.execute(&mut conn).await;
            (conn, done.map(|_| ()))
        }));
        Ok(())
    }

    async fn close(mut self) {
        if let Some(conn) = self.conn.take() {
            let _ = conn.close().await;
        }
    }
}

async fn lead_with(
    inner: &Arc<Inner>,
    conn: &mut PgConnection,
    marker: &mut Marker,
    pruner: &mut Pruner,
    stop: &mut watch::Receiver<bool>,
    state: &RelayState,
) -> Result<Led, sqlx::Error> {
    let settings = &inner.config.relay;
    let wake = Arc::new(Notify::new());
    let _listener = AbortOnDrop(tokio::spawn(listen(inner.pool.clone(), wake.clone())));
    let mut given_up = HashSet::new();
    // Since when every batch has failed with nothing published.
    let mut failing_since: Option<Instant> = None;
    // Writers notify only while the relay says it is idle.
    set_idle(conn, false).await?;
    let mut idle = false;
    // The stream's last message, when known (after a batch that went through whole).
    let mut tail: Option<Tail> = None;
    let mut tail_failures: i32 = 0;
    // The next batch, read while the last one was being published.
    let mut prefetched: Option<Vec<OutboxRow>> = None;
    // Whether the relay has stopped waiting for a transaction (`order_wait_limit`)
    // that may still commit events below what it has read since. While it has, events
    // are marked one by one (Mark::Rows) and the mark (`published_through`) stays:
    // moving it past such events would count them as published.
    let mut held = false;
    loop {
        if *stop.borrow() {
            return Ok(Led::Stopped);
        }
        // The transactions given up on have ended: read once more from the mark, which
        // finds what they committed below the events read since.
        let reread = held && given_up.is_empty();
        if reread {
            prefetched = None;
            marker.settle(state, pruner).await;
        }
        let mut batch = match prefetched.take() {
            Some(batch) => batch,
            None => {
                let after = marker.read_after();
                let fetched = fetch_batch(conn, inner, stop, &mut given_up, marker.pid, after);
                let Some(batch) = fetched.await? else {
                    return Ok(Led::Stopped);
                };
                batch
            }
        };
        if !given_up.is_empty() {
            held = true;
        } else if reread {
            held = false;
        }
        if batch.is_empty() {
            if !marker.is_idle() {
                // Nothing new: look again once the mark in flight is written, or at once
                // if a writer commits meanwhile (a commit waits for the WAL flush, which
                // a new event should not wait for).
                tokio::select! {
                    _ = marker.written() => marker.settle(state, pruner).await,
                    _ = wake.notified() => {}
                }
                continue;
            }
            if !idle {
                // From now on writers notify. Writers that saw the relay busy did not:
                // they hold the outbox's lock from before they looked until they end,
                // so wait for every one writing now, then look once more (the next
                // fence is read after they have drawn their sequence numbers).
                set_idle(conn, true).await?;
                idle = true;
                let holders = sqlx::query_scalar(HOLDERS)
                    .bind(marker.pid)
                    .fetch_one(&mut *conn)
                    .await?;
                if wait_for_writers(conn, inner, stop, &mut given_up, holders).await? {
                    return Ok(Led::Stopped);
                }
                held |= !given_up.is_empty();
                continue;
            }
            pruner.maybe_prune(conn, settings, marker.through).await?;
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(settings.poll_interval) => {}
                changed = stop.changed() => {
                    // A dropped handle stops the relay, as a shutdown does.
                    if changed.is_err() {
                        return Ok(Led::Stopped);
                    }
                }
            }
            continue;
        }
        if idle && batch.len() >= BUSY_BATCH {
            // Writers outpace the relay: their notifications are of no use now, and
            // each costs them a turn on Postgres' commit-time notify lock.
            set_idle(conn, false).await?;
            idle = false;
        }
        // Measured on the database's clock, which also set the retry time.
        if batch[0].wait_secs > 0.0 {
            let wait = Duration::try_from_secs_f64(batch[0].wait_secs)
                .unwrap_or(settings.retry_max)
                .min(settings.retry_max);
            if sleep_or_stop(stop, wait).await {
                return Ok(Led::Stopped);
            }
            continue;
        }
        let span = tracing::debug_span!(
            "edupulse.relay.batch",
            size = batch.len(),
            first_seq = batch[0].seq,
            last_seq = batch[batch.len() - 1].seq
        );
        let known_tail = match tail.take() {
            Some(known) => known,
            None => match read_tail(inner).instrument(span.clone()).await {
                Ok(read) => {
                    tail_failures = 0;
                    read
                }
                Err(why) => {
                    // NATS is out of reach: publishing would fail too.
                    tail_failures = tail_failures.saturating_add(1);
                    let delay = backoff(settings.retry_base, settings.retry_max, tail_failures);
                    tracing::warn!(error = %why, retry_in = ?delay, "relay cannot read the stream; retrying");
                    let since = *failing_since.get_or_insert_with(Instant::now);
                    if !settings.yield_after.is_zero() && since.elapsed() >= settings.yield_after {
                        return Ok(Led::Yielded);
                    }
                    if sleep_or_stop(stop, delay).await {
                        return Ok(Led::Stopped);
                    }
                    continue;
                }
            },
        };
        // While a busy relay's batch is published (NATS' work), the next is read
        // (Postgres' work), starting after this one; it is used only if this one goes
        // through whole, and otherwise read again.
        let read_ahead = (batch.len() >= BUSY_BATCH).then(|| batch[batch.len() - 1].seq);
        let publishing =
            publish(inner, &mut batch, &known_tail, &state.sent).instrument(span.clone());
        let (outcome, next) = match read_ahead {
            Some(after) => {
                let reading = fetch_batch(conn, inner, stop, &mut given_up, marker.pid, after);
                let (outcome, next) = tokio::join!(publishing, reading);
                (outcome, Some(next))
            }
            None => (publishing.await, None),
        };
        let whole = outcome.iter().all(Result::is_ok);
        held |= !given_up.is_empty();
        state.batches.fetch_add(1, Ordering::SeqCst);
        if state.crash_before_mark.load(Ordering::SeqCst) {
            return Ok(Led::Crashed);
        }
        let marked = mark(conn, inner, &batch, outcome, held, marker, pruner, state)
            .instrument(span)
            .await?;
        match next.transpose()? {
            Some(None) => return Ok(Led::Stopped),
            Some(Some(next)) if whole => prefetched = Some(next),
            _ => {}
        }
        if whole {
            // Every event of the batch is in the stream, the last one last: JetStream
            // stored each only right after its predecessor (or had it already, and then
            // any later event it has is a later one of this same order).
            tail = batch.last().map(|row| Tail::MsgId(row.id.to_string()));
        }
        if marked.published > 0 || marked.retry_in.is_none() {
            failing_since = None;
        } else {
            let since = *failing_since.get_or_insert_with(Instant::now);
            if !settings.yield_after.is_zero() && since.elapsed() >= settings.yield_after {
                tracing::warn!(
                    failing_for = ?since.elapsed(),
                    "relay cannot publish to NATS; letting another replica lead for a while"
                );
                return Ok(Led::Yielded);
            }
        }
        if let Some(delay) = marked.retry_in {
            if sleep_or_stop(stop, delay).await {
                return Ok(Led::Stopped);
            }
        }
        pruner.maybe_prune(conn, settings, marker.through).await?;
    }
}

/// A batch at least this large means writers outpace the relay: it tells them it is
/// busy (they stop notifying) until it finds nothing to publish. Smaller batches keep
/// it idle, so that light traffic costs no flag updates and is woken at once.
const BUSY_BATCH: usize = 8;

/// Tells writers whether to notify at commit (`edupulse.relay_idle`; immediate, as
/// sequences are not transactional).
async fn set_idle(conn: &mut PgConnection, idle: bool) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT setval('edupulse.relay_idle', $1)")
        .bind(i64::from(idle))
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Wakes the leader on every notification, and after a reconnect (notifications sent
/// meanwhile are lost; the poll interval covers the rest).
async fn listen(pool: sqlx::PgPool, wake: Arc<Notify>) {
    loop {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(listener) => listener,
            Err(error) => {
                tracing::debug!(%error, "relay listener cannot connect; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if let Err(error) = listener.listen(CHANNEL).await {
            tracing::debug!(%error, "relay cannot LISTEN; retrying");
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        wake.notify_one();
        loop {
            match listener.try_recv().await {
                Ok(Some(_)) => wake.notify_one(),
                // The connection dropped and was re-established: look again.
                Ok(None) => wake.notify_one(),
                Err(error) => {
                    tracing::debug!(%error, "relay listener failed; reconnecting");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    break;
                }
            }
        }
    }
}

struct OutboxRow {
    seq: i64,
    id: Uuid,
    name: String,
    version: i32,
    subject: String,
    payload: String,
    source: String,
    correlation_id: Option<Uuid>,
    causation_id: Option<Uuid>,
    traceparent: Option<String>,
    occurred_at: OffsetDateTime,
    attempts: i32,
    /// Seconds until the event may be retried (zero: now), by the database's clock.
    wait_secs: f64,
}

impl OutboxRow {
    fn envelope(&self) -> Outbound<'_> {
        Outbound {
            id: self.id,
            name: &self.name,
            version: self.version,
            subject: &self.subject,
            source: &self.source,
            occurred_at: self.occurred_at,
            correlation_id: self.correlation_id,
            causation_id: self.causation_id,
            traceparent: self.traceparent.as_deref(),
        }
    }
}

/// Waits until every transaction among `holders` (read just now) has ended, or has
/// held its events longer than `order_wait_limit`; true if told to stop meanwhile.
async fn wait_for_writers(
    conn: &mut PgConnection,
    inner: &Inner,
    stop: &mut watch::Receiver<bool>,
    given_up: &mut HashSet<String>,
    holders: Vec<String>,
) -> Result<bool, sqlx::Error> {
    let settings = &inner.config.relay;
    given_up.retain(|vxid| holders.contains(vxid));
    let mut waiting: Vec<String> = holders
        .into_iter()
        .filter(|vxid| !given_up.contains(vxid))
        .collect();
    if waiting.is_empty() {
        return Ok(false);
    }
    let deadline = Instant::now() + settings.order_wait_limit;
    // Most writers end within a millisecond: look again at once a few times (a look is
    // one round trip, a fraction of a millisecond; tokio's timer cannot sleep less than
    // a millisecond), then sleep 1 ms, doubling up to 5 ms.
    let mut quick_looks = 4;
    let mut pause = Duration::from_millis(1);
    loop {
        let still: i64 = sqlx::query_scalar(STILL_HOLDING)
            .bind(&waiting)
            .fetch_one(&mut *conn)
            .await?;
        if still == 0 {
            return Ok(false);
        }
        if Instant::now() >= deadline {
            tracing::warn!(
                transactions = ?waiting,
                "a transaction has held earlier outbox events uncommitted for longer than \
                 order_wait_limit; publishing later events ahead of them"
            );
            given_up.extend(waiting.drain(..));
            return Ok(false);
        }
        if quick_looks > 0 {
            quick_looks -= 1;
            if *stop.borrow() {
                return Ok(true);
            }
            continue;
        }
        if sleep_or_stop(stop, pause).await {
            return Ok(true);
        }
        pause = (pause * 2).min(Duration::from_millis(5));
    }
}

/// Reads the next batch up to the fence, of events after `after`; `None` if told to
/// stop while waiting. `marker_pid` is the marking connection's backend, whose
/// transaction the fence does not wait for.
async fn fetch_batch(
    conn: &mut PgConnection,
    inner: &Inner,
    stop: &mut watch::Receiver<bool>,
    given_up: &mut HashSet<String>,
    marker_pid: i32,
    after: i64,
) -> Result<Option<Vec<OutboxRow>>, sqlx::Error> {
    let settings = &inner.config.relay;
    let (fence, holders): (i64, Vec<String>) = sqlx::query_as(FENCE_AND_HOLDERS)
        .bind(marker_pid)
        .fetch_one(&mut *conn)
        .await?;
    if wait_for_writers(conn, inner, stop, given_up, holders).await? {
        return Ok(None);
    }
    let rows = sqlx::query(READ_BATCH)
        .bind(fence)
        .bind(i64::from(settings.batch_size))
        .bind(after)
        .bind(i64::from(settings.batch_bytes))
        .fetch_all(&mut *conn)
        .await?;
    // By position, in READ_BATCH's column order: a lookup by name per column and row
    // shows in the relay's profile.
    rows.iter()
        .map(|row| {
            Ok(OutboxRow {
                seq: row.try_get(0)?,
                id: row.try_get(1)?,
                name: row.try_get(2)?,
                version: row.try_get(3)?,
                subject: row.try_get(4)?,
                payload: row.try_get(5)?,
                source: row.try_get(6)?,
                correlation_id: row.try_get(7)?,
                causation_id: row.try_get(8)?,
                traceparent: row.try_get(9)?,
                occurred_at: row.try_get(10)?,
                attempts: row.try_get(11)?,
                wait_secs: row.try_get(12)?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()
        .map(Some)
}

/// Why a publish failed.
enum Failure {
    /// Retrying cannot fix it: the event goes dead.
    Permanent(String),
    /// Retrying may: the event waits and is published again.
    Transient(String),
    /// JetStream refused the event because the event sent before it in the batch is not
    /// the stream's last message (it was lost with a dying connection, or refused). The
    /// event is sent again, at once, as the first of the next batch.
    OutOfChain(String),
}

fn classify(error: &PublishError) -> Failure {
    use std::error::Error as _;
    let message = error.to_string();
    match error.kind() {
        // Only the relay's own chain sets these expectations.
        PublishErrorKind::WrongLastMessageId | PublishErrorKind::WrongLastSequence => {
            Failure::OutOfChain(message)
        }
        PublishErrorKind::MaxPayloadExceeded => Failure::Permanent(message),
        PublishErrorKind::Other => {
            let api = error
                .source()
                .and_then(|s| s.downcast_ref::<async_nats::jetstream::Error>());
            match api {
                // The server refused this message as a bad request (too large for the
                // stream, say): sending it again gets the same answer.
                Some(api) if api.code() == 400 => Failure::Permanent(message),
                _ => Failure::Transient(message),
            }
        }
        _ => Failure::Transient(message),
    }
}

/// What the stream's last message is, as far as this relay knows: the predecessor the
/// first message of the next batch names.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Tail {
    /// The event with this id (its `Nats-Msg-Id`).
    MsgId(String),
    /// A message at this stream sequence without an id, or since removed.
    Sequence(u64),
    /// The stream has never held a message.
    Empty,
}

/// Reads the stream's last message, to chain the next batch to it.
async fn read_tail(inner: &Inner) -> Result<Tail, String> {
    let mut stream = inner
        .jetstream
        .get_stream(&inner.config.stream)
        .await
        .map_err(|e| format!("cannot read the stream: {e}"))?;
    let last = stream
        .info()
        .await
        .map_err(|e| format!("cannot read the stream's state: {e}"))?
        .state
        .last_sequence;
    if last == 0 {
        return Ok(Tail::Empty);
    }
    match stream.get_raw_message(last).await {
        Ok(message) => Ok(message
            .headers
            .get(async_nats::header::NATS_MESSAGE_ID)
            .map(|id| Tail::MsgId(id.as_str().to_owned()))
            .unwrap_or(Tail::Sequence(last))),
        Err(error) if error.kind() == LastRawMessageErrorKind::NoMessageFound => {
            Ok(Tail::Sequence(last))
        }
        Err(error) => Err(format!("cannot read the stream's last message: {error}")),
    }
}

/// Publishes a batch, many acks in flight; one result per row, in order, for the rows
/// up to the first that could not even be sent.
///
/// Each message names its predecessor as the stream's expected last message: the
/// previous event of the batch, and for the first, the stream's last message (`tail`).
/// Pipelining alone cannot keep order when the connection dies in the middle of a
/// batch: the messages already written to the dead socket are lost, while the client
/// sends the ones it still had queued on the next connection. With the chain, JetStream
/// refuses those (`OutOfChain`), and they follow the lost ones when they are retried.
/// Chaining the first message too means a relay's stale queue (a relay cut off from
/// NATS that has since yielded or lost the lead, whose client sends what it had queued
/// when it reconnects, maybe past the duplicate window) cannot append old events
/// behind newer ones. JetStream checks `Nats-Msg-Id` first, so an event that is already
/// in the stream is acked as a duplicate whatever its predecessor.
async fn publish(
    inner: &Inner,
    batch: &mut [OutboxRow],
    tail: &Tail,
    sent_count: &AtomicU64,
) -> Vec<Result<(), Failure>> {
    let prefix = &inner.config.subject_prefix;
    let mut sent: Vec<Result<PublishAckFuture, Failure>> = Vec::with_capacity(batch.len());
    let mut previous = tail.clone();
    for row in batch.iter_mut() {
        let mut headers = match row.envelope().header_map() {
            Ok(headers) => headers,
            Err(why) => {
                sent.push(Err(Failure::Permanent(why.to_string())));
                continue;
            }
        };
        match std::mem::replace(&mut previous, Tail::Empty) {
            Tail::MsgId(id) => headers.insert(
                async_nats::header::NATS_EXPECTED_LAST_MESSAGE_ID,
                async_nats::HeaderValue::from(id),
            ),
            Tail::Sequence(sequence) => headers.insert(
                async_nats::header::NATS_EXPECTED_LAST_SEQUENCE,
                async_nats::HeaderValue::from(sequence),
            ),
            Tail::Empty => {}
        }
        let mut subject = String::with_capacity(prefix.len() + 1 + row.subject.len());
        subject.push_str(prefix);
        subject.push('.');
        subject.push_str(&row.subject);
        // The body is not needed after this: a failed event is read again.
        let payload = Bytes::from(std::mem::take(&mut row.payload).into_bytes());
        match inner
            .jetstream
            .publish_with_headers(subject, headers, payload)
            .await
        {
            Ok(ack) => {
                sent_count.fetch_add(1, Ordering::Relaxed);
                previous = Tail::MsgId(row.id.to_string());
                sent.push(Ok(ack));
            }
            Err(error) => {
                let failure = classify(&error);
                let transient = matches!(failure, Failure::Transient(_));
                sent.push(Err(failure));
                if transient {
                    // Sending later events now could put them ahead of this one.
                    break;
                }
            }
        }
    }
    futures::future::join_all(sent.into_iter().map(|sent| async move {
        match sent {
            Ok(ack) => ack.await.map(|_| ()).map_err(|e| classify(&e)),
            Err(failure) => Err(failure),
        }
    }))
    .await
}

struct Marked {
    published: u64,
    retry_in: Option<Duration>,
}

/// Marks what JetStream acknowledged, in order, up to the first transient failure:
/// dead events first, then the published ones, by moving the mark past them all or,
/// while `held`, one by one.
#[allow(clippy::too_many_arguments)]
async fn mark(
    conn: &mut PgConnection,
    inner: &Inner,
    batch: &[OutboxRow],
    outcome: Vec<Result<(), Failure>>,
    held: bool,
    marker: &mut Marker,
    pruner: &mut Pruner,
    state: &RelayState,
) -> Result<Marked, sqlx::Error> {
    let settings = &inner.config.relay;
    let mut published = Vec::new();
    let mut dead = Vec::new();
    let mut retry = None;
    let mut out_of_chain = None;
    // The last event of the done part of the batch: published or dead.
    let mut done_through = None;
    for (row, result) in batch.iter().zip(outcome) {
        match result {
            Ok(()) => published.push(row.seq),
            Err(Failure::Permanent(why)) => dead.push((row, why)),
            Err(Failure::Transient(why)) => {
                retry = Some((row, why));
                break;
            }
            Err(Failure::OutOfChain(why)) => {
                out_of_chain = Some((row, why));
                break;
            }
        }
        done_through = Some(row.seq);
    }
    let published_count = published.len() as u64;
    // Dead before the mark passes them: an event at or below the mark that is not
    // dead counts as published.
    for (row, why) in &dead {
        tracing::error!(
            id = %row.id, event = %row.name, seq = row.seq, error = %why,
            "JetStream rejected an event for good; it is dead (see requeue_dead)"
        );
        sqlx::query(
            "UPDATE edupulse.outbox
             SET status = 'dead', attempts = attempts + 1, last_error = $2
             WHERE seq = $1",
        )
        .bind(row.seq)
        .bind(why)
        .execute(&mut *conn)
        .await?;
    }
    let done = match done_through {
        Some(_) if held => Mark::Rows(published),
        Some(seq) => Mark::Through {
            seq,
            published: published_count,
        },
        None => Mark::Rows(Vec::new()),
    };
    marker.start(done, state, pruner).await?;
    let mut retry_in = None;
    if let Some((row, why)) = retry {
        let delay = backoff(
            settings.retry_base,
            settings.retry_max,
            row.attempts.saturating_add(1),
        );
        tracing::warn!(
            id = %row.id, event = %row.name, seq = row.seq, attempt = row.attempts + 1,
            retry_in = ?delay, error = %why,
            "publishing failed; later events wait behind it"
        );
        sqlx::query(
            "UPDATE edupulse.outbox
             SET attempts = attempts + 1, last_error = $2,
                 next_attempt_at = clock_timestamp() + $3 * interval '1 microsecond'
             WHERE seq = $1",
        )
        .bind(row.seq)
        .bind(&why)
        .bind(i64::try_from(delay.as_micros()).unwrap_or(i64::MAX))
        .execute(&mut *conn)
        .await?;
        retry_in = Some(delay);
    }
    if let Some((row, why)) = out_of_chain {
        // Its predecessor failed (and is dead, or was itself refused after a lost
        // connection), or something else wrote to the stream in between. Sent first in
        // the next batch, it needs no predecessor; nothing to count or wait for.
        tracing::debug!(
            id = %row.id, event = %row.name, seq = row.seq, error = %why,
            "the event before this one did not reach the stream first; sending it again"
        );
    }
    Ok(Marked {
        published: published_count,
        retry_in,
    })
}

/// Deletes published rows older than the retention, in bounded batches, walking the
/// primary key from the oldest row up to the newest row known to be old enough.
struct Pruner {
    retention: Duration,
    /// (when marked, highest seq marked then).
    marks: VecDeque<(Instant, i64)>,
    /// Rows up to here may be old enough: those marked one by one are checked by their
    /// `published_at`.
    prunable_up_to: i64,
    /// The highest mark old enough: pending rows up to it (and up to the relay's
    /// `published_through`) were published longer than the retention ago.
    aged_through: i64,
    last_run: Instant,
}

impl Pruner {
    async fn start(conn: &mut PgConnection, retention: Duration) -> Result<Pruner, sqlx::Error> {
        let mut pruner = Pruner {
            retention,
            marks: VecDeque::new(),
            prunable_up_to: 0,
            aged_through: 0,
            last_run: Instant::now(),
        };
        if !retention.is_zero() {
            // What a previous leader published: rows marked one by one are checked by
            // their own time; the mark counts from when it last moved.
            let newest: Option<i64> = sqlx::query_scalar(
                "SELECT seq FROM edupulse.outbox WHERE status = 'published'
                 ORDER BY seq DESC LIMIT 1",
            )
            .fetch_optional(&mut *conn)
            .await?;
            if let Some(seq) = newest {
                pruner.prunable_up_to = seq;
            }
            let (through, age): (i64, f64) = sqlx::query_as(
                "SELECT published_through,
                        greatest(0, extract(epoch FROM now() - updated_at))::float8
                 FROM edupulse.relay_progress",
            )
            .fetch_one(&mut *conn)
            .await?;
            let age = Duration::try_from_secs_f64(age).unwrap_or(Duration::ZERO);
            let at = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
            pruner.marks.push_back((at, through));
        }
        Ok(pruner)
    }

    fn published_up_to(&mut self, seq: i64) {
        self.marks.push_back((Instant::now(), seq));
    }

    /// `through` is the relay's `published_through`.
    async fn maybe_prune(
        &mut self,
        conn: &mut PgConnection,
        settings: &crate::config::RelaySettings,
        through: i64,
    ) -> Result<(), sqlx::Error> {
        if self.retention.is_zero() || self.last_run.elapsed() < settings.prune_interval {
            return Ok(());
        }
        self.last_run = Instant::now();
        while let Some((at, seq)) = self.marks.front().copied() {
            if at.elapsed() < self.retention {
                break;
            }
            self.prunable_up_to = self.prunable_up_to.max(seq);
            self.aged_through = self.aged_through.max(seq);
            self.marks.pop_front();
        }
        if self.prunable_up_to == 0 {
            return Ok(());
        }
        // At most ten statements per run, so publishing never waits long.
        for _ in 0..10 {
            let deleted = sqlx::query(
                "DELETE FROM edupulse.outbox WHERE seq IN (
                    SELECT seq FROM edupulse.outbox
                    WHERE seq <= $1
                      AND ((status = 'pending' AND seq <= $4)
                           OR (status = 'published'
                               AND published_at < now() - $2 * interval '1 microsecond'))
                    ORDER BY seq LIMIT $3)",
            )
            .bind(self.prunable_up_to)
            .bind(i64::try_from(self.retention.as_micros()).unwrap_or(i64::MAX))
            .bind(i64::from(settings.prune_batch))
            .bind(self.aged_through.min(through))
            .execute(&mut *conn)
            .await?
            .rows_affected();
            tracing::debug!(deleted, "relay pruned published events");
            if deleted < u64::from(settings.prune_batch) {
                break;
            }
        }
        Ok(())
    }
}
