//! The commands: each reads what it needs, prints text or (with `--json`) one JSON
//! document on stdout, and returns an error for `main` to print.

use crate::context::Ctx;
use crate::error::CliError;
use crate::queries::{self, DeadLetterRow, EventRow, Leader, Outbox};
use edupulse_events::async_nats::jetstream::consumer;
use edupulse_events::time::{format_description::well_known::Rfc3339, OffsetDateTime};
use edupulse_events::{headers, DeadReason, Requeue, Uuid};
use futures::TryStreamExt;
use serde::Serialize;
use serde_json::json;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

/// Prints `value` as pretty JSON.
fn print_json(value: &impl Serialize) -> Result<(), CliError> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// RFC 3339 text of a JetStream time.
fn rfc3339(time: OffsetDateTime) -> Option<String> {
    time.format(&Rfc3339).ok()
}

/// The stream as `status` shows it.
#[derive(Debug, Serialize)]
struct StreamState {
    name: String,
    last_sequence: Option<u64>,
    messages: Option<u64>,
    /// Why it could not be read, when it could not.
    error: Option<String>,
}

async fn stream_state(ctx: &Ctx) -> StreamState {
    let read = async {
        let mut stream = ctx.stream().await?;
        let info = stream.info().await.map_err(|e| ctx.js_error(e))?;
        Ok::<_, CliError>((info.state.last_sequence, info.state.messages))
    };
    match read.await {
        Ok((last, messages)) => StreamState {
            name: ctx.stream_name().to_owned(),
            last_sequence: Some(last),
            messages: Some(messages),
            error: None,
        },
        Err(error) => StreamState {
            name: ctx.stream_name().to_owned(),
            last_sequence: None,
            messages: None,
            error: Some(error.to_string()),
        },
    }
}

/// In one line, why events are pending: no leader, publish failing, a writer holding
/// an earlier sequence, or the relay simply has not got to them yet.
async fn why_behind(
    ctx: &Ctx,
    outbox: &Outbox,
    leader: Option<&Leader>,
) -> Result<Option<String>, CliError> {
    if outbox.pending == 0 {
        return Ok(None);
    }
    let Some(leader) = leader else {
        return Ok(Some(
            "no relay leads: no session holds the relay's leader lock; start a service with start_relay()".to_owned(),
        ));
    };
    if let (Some(attempts @ 1..), Some(seq)) =
        (outbox.oldest_pending_attempts, outbox.oldest_pending_seq)
    {
        let error = outbox
            .oldest_pending_error
            .as_deref()
            .unwrap_or("unknown error");
        return Ok(Some(format!(
            "publishing fails: {error} ({attempts} attempts on sequence {seq})"
        )));
    }
    if let Some(writer) = queries::open_writer(ctx.pool().await?, Some(leader.pid)).await? {
        return Ok(Some(format!(
            "a writer holds an earlier sequence: the transaction of pid {} ({}) has written to the outbox and been open for {:.1} s ({})",
            writer.pid, writer.application_name, writer.open_secs, writer.state
        )));
    }
    Ok(Some(format!(
        "the relay (pid {}) has not published them yet",
        leader.pid
    )))
}

/// `edupulse status`.
pub async fn status(
    ctx: &Ctx,
    json: bool,
    check: bool,
    max_age: Option<Duration>,
) -> Result<(), CliError> {
    let pool = ctx.pool().await?;
    let outbox = queries::outbox(pool).await?;
    let leader = queries::leader(pool).await?;
    let stream = stream_state(ctx).await;
    let behind = why_behind(ctx, &outbox, leader.as_ref()).await?;
    if json {
        print_json(&json!({
            "pending": outbox.pending,
            "dead": outbox.dead,
            "oldest_pending_seq": outbox.oldest_pending_seq,
            "oldest_pending_age_secs": outbox.oldest_pending_age_secs,
            "leader": leader,
            "published_through": outbox.published_through,
            "mark_updated_at": outbox.mark_updated_at,
            "stream": stream,
            "behind": behind,
        }))?;
    } else {
        let oldest = match (outbox.oldest_pending_seq, outbox.oldest_pending_age_secs) {
            (Some(seq), Some(age)) => format!(" (oldest {age:.1} s, sequence {seq})"),
            _ => String::new(),
        };
        println!(
            "outbox:    {} pending{oldest}, {} dead",
            outbox.pending, outbox.dead
        );
        match &leader {
            Some(l) => println!(
                "relay:     led by pid {} on {} ({}), since {}",
                l.pid,
                l.host.as_deref().unwrap_or("an unknown host"),
                l.application_name,
                l.since.as_deref().unwrap_or("?")
            ),
            None => println!("relay:     no leader"),
        }
        println!(
            "published: through sequence {} (mark moved {})",
            outbox.published_through,
            outbox.mark_updated_at.as_deref().unwrap_or("?")
        );
        match (&stream.last_sequence, &stream.error) {
            (Some(last), _) => println!(
                "stream:    {}, last sequence {last}, {} messages",
                stream.name,
                stream.messages.unwrap_or(0)
            ),
            (None, Some(error)) => println!("stream:    {}: {error}", stream.name),
            (None, None) => println!("stream:    {}", stream.name),
        }
        if let Some(behind) = &behind {
            println!("behind:    {behind}");
        }
    }
    if check {
        let mut problems = Vec::new();
        if outbox.dead > 0 {
            problems.push(format!(
                "{} dead events (see `edupulse outbox dead`)",
                outbox.dead
            ));
        }
        if let (Some(limit), Some(age)) = (max_age, outbox.oldest_pending_age_secs) {
            if age > limit.as_secs_f64() {
                problems.push(format!(
                    "the oldest pending event is {age:.1} s old, over the limit of {} s{}",
                    limit.as_secs_f64(),
                    behind
                        .as_deref()
                        .map(|b| format!(" ({b})"))
                        .unwrap_or_default()
                ));
            }
        }
        if !problems.is_empty() {
            return Err(CliError::CheckFailed(problems.join("; ")));
        }
    }
    Ok(())
}

/// How many messages `explain` reads, from the event's time on, to find it.
const SCAN_LIMIT: u64 = 100_000;

/// What one group did with an event.
#[derive(Debug, Serialize)]
struct GroupFate {
    group: String,
    /// `handled`, `dead_lettered`, `acknowledged`, `delivered`, `not_delivered`,
    /// `waits_for_publication` or `unknown`.
    state: String,
    /// In words.
    detail: String,
}

/// `edupulse explain ID`.
pub async fn explain(ctx: &Ctx, json: bool, id: Uuid) -> Result<(), CliError> {
    let pool = ctx.pool().await?;
    let row = queries::event(pool, id).await?;
    let inbox = queries::inbox_of(pool, id).await?;
    let dead_letters = queries::dead_letters(pool, None, Some(id), None, 1000).await?;
    let (outbox_state, waits_for) = match &row {
        None => ("unknown".to_owned(), None),
        Some(row) => {
            let waits = if row.state == "pending" {
                Some(waits_for(ctx, row).await?)
            } else {
                None
            };
            (row.state.clone(), waits)
        }
    };
    // The stream: the event's sequence when findable, and the groups' consumers.
    let mut stream_error = None;
    let mut stream_sequence: Option<u64> = None;
    let mut stream_time = None;
    let mut in_outbox_secs = row.as_ref().and_then(|r| r.outbox_secs);
    let mut consumers: Vec<consumer::Info> = Vec::new();
    match ctx.stream().await {
        Ok(stream) => {
            if let Some(row) = row.as_ref().filter(|r| r.state == "published") {
                // From a minute before it was emitted (clock skew), until found.
                let emitted =
                    OffsetDateTime::from_unix_timestamp_nanos((row.occurred_epoch * 1e9) as i128)
                        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
                let start = emitted - Duration::from_secs(60);
                let scanned = scan_stream(ctx, start, SCAN_LIMIT, |found, sequence, time| {
                    if found == id {
                        stream_sequence = Some(sequence);
                        stream_time = Some(time);
                        return false;
                    }
                    true
                })
                .await;
                if let Err(error) = scanned {
                    stream_error = Some(error.to_string());
                }
                if let (None, Some(time)) = (in_outbox_secs, stream_time) {
                    in_outbox_secs = Some(((time - emitted).as_seconds_f64()).max(0.0));
                }
            }
            let mut list = stream.consumers();
            loop {
                match list.try_next().await {
                    Ok(Some(info)) if info.config.durable_name.is_some() => consumers.push(info),
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(error) => {
                        stream_error = Some(ctx.js_error(error).to_string());
                        break;
                    }
                }
            }
        }
        Err(error) => stream_error = Some(error.to_string()),
    }
    let mut groups: BTreeMap<String, GroupFate> = BTreeMap::new();
    for info in &consumers {
        let (state, detail) = match stream_sequence {
            _ if outbox_state == "pending" => (
                "waits_for_publication",
                "not in the stream yet".to_owned(),
            ),
            _ if outbox_state == "dead" => (
                "waits_for_publication",
                "not in the stream: the event is dead in the outbox".to_owned(),
            ),
            Some(seq) if info.ack_floor.stream_sequence >= seq => (
                "acknowledged",
                "acknowledged (handled by an `on` handler, which keeps no inbox, or not one of its events)".to_owned(),
            ),
            Some(seq) if info.delivered.stream_sequence >= seq => (
                "delivered",
                "delivered, not yet acknowledged (being handled or retried)".to_owned(),
            ),
            Some(_) => ("not_delivered", "not yet delivered to the group".to_owned()),
            None => (
                "unknown",
                "no inbox or dead-letter record; its stream sequence could not be found".to_owned(),
            ),
        };
        groups.insert(
            info.name.clone(),
            GroupFate {
                group: info.name.clone(),
                state: state.to_owned(),
                detail,
            },
        );
    }
    for (group, handled_at) in &inbox {
        groups.insert(
            group.clone(),
            GroupFate {
                group: group.clone(),
                state: "handled".to_owned(),
                detail: format!(
                    "handled (in its inbox) at {}",
                    handled_at.as_deref().unwrap_or("?")
                ),
            },
        );
    }
    for letter in &dead_letters {
        groups.insert(
            letter.group.clone(),
            GroupFate {
                group: letter.group.clone(),
                state: "dead_lettered".to_owned(),
                detail: format!(
                    "dead-lettered ({}) after {} deliveries at {}: {}",
                    letter.reason,
                    letter.deliveries,
                    letter.created_at.as_deref().unwrap_or("?"),
                    letter.error
                ),
            },
        );
    }
    let groups: Vec<GroupFate> = groups.into_values().collect();
    // A dead letter records the stream sequence too.
    let stream_sequence = stream_sequence.or_else(|| {
        dead_letters
            .first()
            .and_then(|d| u64::try_from(d.stream_sequence).ok())
    });
    let stream_time = stream_time.and_then(rfc3339);
    if json {
        return print_json(&json!({
            "id": id,
            "state": outbox_state,
            "event": row,
            "waits_for": waits_for,
            "stream_sequence": stream_sequence,
            "stream_time": stream_time,
            "outbox_secs": in_outbox_secs,
            "stream_error": stream_error,
            "groups": groups,
            "dead_letters": dead_letters,
        }));
    }
    match &row {
        None => println!(
            "event {id}: not in the outbox (never committed here, or published and pruned)"
        ),
        Some(row) => {
            println!(
                "event {id}: {} v{} on {}, sequence {}, emitted {}",
                row.name,
                row.version,
                row.subject,
                row.seq,
                row.occurred_at.as_deref().unwrap_or("?")
            );
            match row.state.as_str() {
                "pending" => println!(
                    "pending: waits for {}",
                    waits_for.as_deref().unwrap_or("the relay")
                ),
                "dead" => println!(
                    "dead after {} attempts: {}; `edupulse outbox requeue --id {id}` puts it back",
                    row.attempts,
                    row.last_error.as_deref().unwrap_or("no error recorded")
                ),
                _ => {
                    let at = row.published_at.as_deref().or(stream_time.as_deref());
                    print!("published");
                    if let Some(seq) = stream_sequence {
                        print!(" as stream sequence {seq}");
                    }
                    if let Some(at) = at {
                        print!(" at {at}");
                    }
                    if let Some(secs) = in_outbox_secs {
                        print!(", after {secs:.3} s in the outbox");
                    }
                    println!();
                }
            }
        }
    }
    if let Some(error) = &stream_error {
        println!("stream: {error}");
    }
    for fate in &groups {
        println!("group {}: {}", fate.group, fate.detail);
    }
    Ok(())
}

/// What a pending event waits for, in words.
async fn waits_for(ctx: &Ctx, row: &EventRow) -> Result<String, CliError> {
    let pool = ctx.pool().await?;
    if row.attempts > 0 {
        return Ok(format!(
            "a retry at {}: publishing failed {} times, last: {}",
            row.next_attempt_at.as_deref().unwrap_or("?"),
            row.attempts,
            row.last_error.as_deref().unwrap_or("no error recorded")
        ));
    }
    let Some(leader) = queries::leader(pool).await? else {
        return Ok("a relay: none leads (no session holds the leader lock)".to_owned());
    };
    if row.pending_before > 0 {
        return Ok(format!(
            "{} earlier pending events, which the relay (pid {}) publishes first",
            row.pending_before, leader.pid
        ));
    }
    if let Some(writer) = queries::open_writer(pool, Some(leader.pid)).await? {
        return Ok(format!(
            "a writer that may hold an earlier sequence: pid {} ({}), open {:.1} s",
            writer.pid, writer.application_name, writer.open_secs
        ));
    }
    Ok(format!("the relay (pid {}) to read it", leader.pid))
}

/// `edupulse outbox dead`.
pub async fn outbox_dead(ctx: &Ctx, json: bool, limit: i64) -> Result<(), CliError> {
    let dead = ctx.emitter().await?.dead_events(limit).await?;
    if json {
        let list: Vec<_> = dead
            .iter()
            .map(|d| {
                json!({
                    "id": d.id, "name": d.name, "subject": d.subject,
                    "attempts": d.attempts, "last_error": d.last_error,
                })
            })
            .collect();
        return print_json(&list);
    }
    if dead.is_empty() {
        println!("no dead events");
    }
    for d in &dead {
        println!(
            "{} {} on {}: {} attempts, {}",
            d.id,
            d.name,
            d.subject,
            d.attempts,
            d.last_error.as_deref().unwrap_or("no error recorded")
        );
    }
    Ok(())
}

/// `edupulse outbox requeue`.
pub async fn outbox_requeue(
    ctx: &Ctx,
    json: bool,
    all: bool,
    ids: Vec<Uuid>,
) -> Result<(), CliError> {
    let which = if all { Requeue::All } else { Requeue::Ids(ids) };
    let count = ctx.emitter().await?.requeue_dead(which).await?;
    if json {
        return print_json(&json!({ "requeued": count }));
    }
    println!("requeued {count} dead events");
    Ok(())
}

/// One group as `consumers` shows it.
#[derive(Debug, Serialize)]
struct GroupRow {
    group: String,
    /// Whether a durable consumer of that name is on the stream.
    durable: bool,
    pending: Option<u64>,
    ack_pending: Option<usize>,
    redelivered: Option<usize>,
    /// Messages not yet acknowledged: pending plus ack pending.
    lag: Option<u64>,
    /// Age in seconds of the first unacknowledged message, when there is one.
    lag_secs: Option<f64>,
    dead_letters: i64,
}

/// `edupulse consumers`.
pub async fn consumers(ctx: &Ctx, json: bool) -> Result<(), CliError> {
    let counts: BTreeMap<String, i64> = queries::dead_letter_counts(ctx.pool().await?)
        .await?
        .into_iter()
        .collect();
    let stream = ctx.stream().await?;
    let mut rows: BTreeMap<String, GroupRow> = BTreeMap::new();
    let mut list = stream.consumers();
    while let Some(info) = list.try_next().await.map_err(|e| ctx.js_error(e))? {
        // A group is a durable consumer; ephemeral ones (readers like `audit`) are not.
        if info.config.durable_name.is_none() {
            continue;
        }
        let lag = info.num_pending + info.num_ack_pending as u64;
        let lag_secs = if lag > 0 {
            stream
                .get_raw_message(info.ack_floor.stream_sequence + 1)
                .await
                .ok()
                .map(|m| ((OffsetDateTime::now_utc() - m.time).as_seconds_f64()).max(0.0))
        } else {
            None
        };
        rows.insert(
            info.name.clone(),
            GroupRow {
                group: info.name.clone(),
                durable: true,
                pending: Some(info.num_pending),
                ack_pending: Some(info.num_ack_pending),
                redelivered: Some(info.num_redelivered),
                lag: Some(lag),
                lag_secs,
                dead_letters: counts.get(&info.name).copied().unwrap_or(0),
            },
        );
    }
    for (group, count) in &counts {
        rows.entry(group.clone()).or_insert_with(|| GroupRow {
            group: group.clone(),
            durable: false,
            pending: None,
            ack_pending: None,
            redelivered: None,
            lag: None,
            lag_secs: None,
            dead_letters: *count,
        });
    }
    let rows: Vec<GroupRow> = rows.into_values().collect();
    if json {
        return print_json(&rows);
    }
    if rows.is_empty() {
        println!("no consumer groups on stream {}", ctx.stream_name());
    }
    let opt = |v: Option<String>| v.unwrap_or_else(|| "-".to_owned());
    println!(
        "{:<24} {:>9} {:>11} {:>11} {:>9} {:>9} {:>12}",
        "GROUP", "PENDING", "ACK_PENDING", "REDELIVERED", "LAG", "LAG_S", "DEAD_LETTERS"
    );
    for r in &rows {
        println!(
            "{:<24} {:>9} {:>11} {:>11} {:>9} {:>9} {:>12}{}",
            r.group,
            opt(r.pending.map(|v| v.to_string())),
            opt(r.ack_pending.map(|v| v.to_string())),
            opt(r.redelivered.map(|v| v.to_string())),
            opt(r.lag.map(|v| v.to_string())),
            opt(r.lag_secs.map(|v| format!("{v:.1}"))),
            r.dead_letters,
            if r.durable {
                ""
            } else {
                " (no consumer on the stream)"
            }
        );
    }
    Ok(())
}

/// `edupulse dead-letters list`.
pub async fn dead_letters_list(
    ctx: &Ctx,
    json: bool,
    group: &str,
    reason: Option<DeadReason>,
    limit: i64,
) -> Result<(), CliError> {
    let rows: Vec<DeadLetterRow> = queries::dead_letters(
        ctx.pool().await?,
        Some(group),
        None,
        reason.map(DeadReason::as_str),
        limit,
    )
    .await?;
    if json {
        return print_json(&rows);
    }
    if rows.is_empty() {
        println!("no dead letters for group {group}");
    }
    for r in &rows {
        println!(
            "#{} {} seq {} {} ({}) {} after {} deliveries at {}: {}",
            r.id,
            r.reason,
            r.stream_sequence,
            r.event_name.as_deref().unwrap_or("?"),
            r.event_id
                .map(|id| id.to_string())
                .unwrap_or_else(|| "no id".to_owned()),
            r.subject,
            r.deliveries,
            r.created_at.as_deref().unwrap_or("?"),
            r.error
        );
    }
    Ok(())
}

/// `edupulse dead-letters purge`.
pub async fn dead_letters_purge(
    ctx: &Ctx,
    json: bool,
    group: &str,
    older_than: Duration,
) -> Result<(), CliError> {
    let purged = ctx
        .emitter()
        .await?
        .purge_dead_letters(group, older_than)
        .await?;
    if json {
        return print_json(&json!({ "group": group, "purged": purged }));
    }
    println!("purged {purged} dead letters of group {group}");
    Ok(())
}

/// `edupulse dead-letters replay`.
pub async fn dead_letters_replay(
    ctx: &Ctx,
    json: bool,
    group: &str,
    which: edupulse_events::Replay,
) -> Result<(), CliError> {
    let asked = ctx
        .emitter()
        .await?
        .replay_dead_letters(group, which)
        .await?;
    if json {
        return print_json(&json!({ "group": group, "replay_requested": asked }));
    }
    println!(
        "asked for the replay of {asked} dead letters of group {group}; a running instance \
         of the group replays them in stream order (see `edupulse dead-letters list {group}`)"
    );
    Ok(())
}

/// `edupulse migrate`.
pub async fn migrate(ctx: &Ctx, json: bool) -> Result<(), CliError> {
    ctx.emitter().await?.migrate().await?;
    if json {
        return print_json(&json!({ "migrated": true }));
    }
    println!("the edupulse schema is up to date");
    Ok(())
}

/// How long to wait for the next message while reading the stream.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads the stream from `start` (headers only), at most `max` messages and no further
/// than the messages there now, handing `visit` each event id (`ce-id`, else
/// `Nats-Msg-Id`), stream sequence and time until it returns false.
async fn scan_stream(
    ctx: &Ctx,
    start: OffsetDateTime,
    max: u64,
    mut visit: impl FnMut(Uuid, u64, OffsetDateTime) -> bool,
) -> Result<(), CliError> {
    let stream = ctx.stream().await?;
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            deliver_policy: consumer::DeliverPolicy::ByStartTime { start_time: start },
            headers_only: true,
            ..Default::default()
        })
        .await
        .map_err(|e| ctx.js_error(e))?;
    let name = consumer.cached_info().name.clone();
    let count = consumer.cached_info().num_pending.min(max);
    let read = read_messages(ctx, consumer, count, &mut visit).await;
    // Ephemeral, it would go by itself after a while; gone now, no one lists it.
    let _ = stream.delete_consumer(&name).await;
    read
}

/// Reads `count` messages of an ordered consumer, for [`scan_stream`].
async fn read_messages(
    ctx: &Ctx,
    consumer: consumer::Consumer<consumer::pull::OrderedConfig>,
    count: u64,
    visit: &mut impl FnMut(Uuid, u64, OffsetDateTime) -> bool,
) -> Result<(), CliError> {
    if count == 0 {
        return Ok(());
    }
    let mut messages = consumer.messages().await.map_err(|e| ctx.js_error(e))?;
    for _ in 0..count {
        let message = tokio::time::timeout(READ_TIMEOUT, messages.try_next())
            .await
            .map_err(|_| {
                CliError::JetStream(format!(
                    "no message from stream {} within {} s while reading it",
                    ctx.stream_name(),
                    READ_TIMEOUT.as_secs()
                ))
            })?
            .map_err(|e| ctx.js_error(e))?;
        let Some(message) = message else { break };
        let info = message.info().map_err(|e| ctx.js_error(e))?;
        let (sequence, published) = (info.stream_sequence, info.published);
        let header = |name: &str| {
            message
                .headers
                .as_ref()
                .and_then(|h| h.get(name))
                .and_then(|v| v.as_str().parse::<Uuid>().ok())
        };
        if let Some(id) = header(headers::ID).or_else(|| header(headers::MSG_ID)) {
            if !visit(id, sequence, published) {
                break;
            }
        }
    }
    Ok(())
}

/// Every event id in the stream from `start` on, with the stream sequences it is at.
async fn stream_ids_since(
    ctx: &Ctx,
    start: OffsetDateTime,
) -> Result<HashMap<Uuid, Vec<u64>>, CliError> {
    let mut found: HashMap<Uuid, Vec<u64>> = HashMap::new();
    scan_stream(ctx, start, u64::MAX, |id, sequence, _| {
        found.entry(id).or_default().push(sequence);
        true
    })
    .await?;
    Ok(found)
}

/// What `audit` found.
#[derive(Debug, Default, Serialize)]
struct Audit {
    /// Events the outbox holds as published in the window.
    checked: usize,
    /// Published in the outbox, not in the stream.
    lost: Vec<Uuid>,
    /// In the stream more than once.
    duplicated: Vec<Uuid>,
    /// In the stream before an event with a lower outbox sequence.
    out_of_order: Vec<Uuid>,
    /// Still pending after `--stuck-after`.
    stuck: Vec<Uuid>,
    /// Per group that handles with `on_tx`: events it acknowledged but neither has in
    /// its inbox nor dead-lettered.
    inbox_missing: BTreeMap<String, Vec<Uuid>>,
}

/// `edupulse audit`.
pub async fn audit(
    ctx: &Ctx,
    json: bool,
    since: Duration,
    stuck_after: Duration,
) -> Result<(), CliError> {
    let pool = ctx.pool().await?;
    let since_secs = since.as_secs_f64();
    let published = queries::published_since(pool, since_secs).await?;
    let mut report = Audit {
        checked: published.len(),
        stuck: queries::stuck(pool, since_secs, stuck_after.as_secs_f64()).await?,
        ..Audit::default()
    };
    // A minute of slack for the clocks of Postgres and NATS.
    let start = OffsetDateTime::now_utc() - since - Duration::from_secs(60);
    let in_stream = stream_ids_since(ctx, start).await?;
    let mut highest = 0u64;
    let mut sequence_of: HashMap<Uuid, u64> = HashMap::new();
    for event in &published {
        match in_stream.get(&event.id) {
            None => report.lost.push(event.id),
            Some(sequences) => {
                if sequences.len() > 1 {
                    report.duplicated.push(event.id);
                }
                let first = sequences.iter().copied().min().unwrap_or(0);
                sequence_of.insert(event.id, first);
                if first < highest {
                    report.out_of_order.push(event.id);
                } else {
                    highest = first;
                }
            }
        }
    }
    // The groups with an inbox: what each acknowledged must be in it (or dead-lettered).
    let inbox = queries::inbox_since(pool, since_secs).await?;
    let ids: Vec<Uuid> = published.iter().map(|e| e.id).collect();
    let dead: HashSet<(String, Uuid)> = queries::dead_lettered(pool, &ids)
        .await?
        .into_iter()
        .collect();
    let held: HashSet<(String, Uuid)> = inbox.iter().cloned().collect();
    let names: HashMap<Uuid, &str> = published.iter().map(|e| (e.id, e.name.as_str())).collect();
    let mut handles: BTreeMap<String, HashSet<&str>> = BTreeMap::new();
    for (group, id) in &inbox {
        if let Some(name) = names.get(id) {
            handles.entry(group.clone()).or_default().insert(name);
        }
    }
    let stream = ctx.stream().await?;
    for (group, handled_names) in &handles {
        let ack_floor = match stream.consumer_info(group).await {
            Ok(info) => info.ack_floor.stream_sequence,
            Err(_) => u64::MAX,
        };
        let missing: Vec<Uuid> = published
            .iter()
            .filter(|e| handled_names.contains(e.name.as_str()))
            .filter(|e| sequence_of.get(&e.id).is_some_and(|s| *s <= ack_floor))
            .filter(|e| {
                let key = (group.clone(), e.id);
                !held.contains(&key) && !dead.contains(&key)
            })
            .map(|e| e.id)
            .collect();
        if !missing.is_empty() {
            report.inbox_missing.insert(group.clone(), missing);
        }
    }
    let missing: usize = report.inbox_missing.values().map(Vec::len).sum();
    let problems = report.lost.len()
        + report.duplicated.len()
        + report.out_of_order.len()
        + report.stuck.len()
        + missing;
    if json {
        print_json(&report)?;
    } else {
        println!(
            "checked {} published events of the last {}",
            report.checked,
            humantime::format_duration(since)
        );
        let list = |ids: &[Uuid]| {
            ids.iter()
                .map(Uuid::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        for (what, ids) in [
            ("lost", &report.lost),
            ("duplicated", &report.duplicated),
            ("out of order", &report.out_of_order),
            ("stuck", &report.stuck),
        ] {
            println!(
                "{what}: {}{}",
                ids.len(),
                if ids.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", list(ids))
                }
            );
        }
        for (group, ids) in &report.inbox_missing {
            println!(
                "group {group}: {} acknowledged but not in its inbox ({})",
                ids.len(),
                list(ids)
            );
        }
    }
    if problems > 0 {
        return Err(CliError::CheckFailed(format!(
            "audit found {} lost, {} duplicated, {} out of order, {} stuck, {} missing from inboxes",
            report.lost.len(),
            report.duplicated.len(),
            report.out_of_order.len(),
            report.stuck.len(),
            missing
        )));
    }
    Ok(())
}
