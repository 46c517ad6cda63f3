//! The relay's atomic batches (nats-server 2.12 and later), against a private current
//! server: chunks stored whole in sequence order, a relay that died before marking,
//! another publisher between chunks, a stream that stops allowing them, and what
//! `connect` says when they cannot be had. Each test says SKIPPED when no current
//! nats-server is installed (`.ci/run` installs one).

use edupulse_events::{
    AtomicBatches, ConnectError, ConnectErrorKind, DomainEvent, EventService, RelayHandle,
    RelaySettings,
};
use edupulse_events_tests::{foreign_publisher, header, wait_for, NatsServer, TestEnv};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

#[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
#[event(name = "lesson.published", subject = "lesson.{lesson_id}")]
struct LessonPublished {
    lesson_id: u32,
}

const WAIT: Duration = Duration::from_secs(60);

/// A private current nats-server, or `None` (said on stderr) when none is installed
/// (see [`current_nats_server_for`]: CI requires one).
async fn current_server(test: &str) -> Option<NatsServer> {
    NatsServer::start_current(test, &[]).await
}

/// Relay settings for these tests: atomic batches always, and batches of up to 2,500
/// events, so that one batch is three chunks (1,000, 1,000 and 500).
fn atomic_relay() -> RelaySettings {
    RelaySettings {
        atomic_batches: AtomicBatches::Always,
        batch_size: 2_500,
        ..TestEnv::fast_relay()
    }
}

async fn atomic_service(env: &TestEnv) -> EventService {
    env.service_with(env.config().relay(atomic_relay())).await
}

/// A current server, a service that wants atomic batches always, and its relay, which
/// has published a first batch of ten events as one atomic batch (their ids).
async fn warmed_up(
    test: &str,
) -> Option<(NatsServer, TestEnv, EventService, RelayHandle, Vec<Uuid>)> {
    let server = current_server(test).await?;
    let env = TestEnv::with_nats(server.url()).await;
    let service = atomic_service(&env).await;
    let relay = service.start_relay().await.expect("the relay starts");
    let ids = emit(&service, 10).await;
    all_published(&service, &relay, 10).await;
    assert_eq!(relay.atomic_batches(), 1);
    Some((server, env, service, relay, ids))
}

/// The stream's configuration as the server has it.
async fn stream_config(env: &TestEnv) -> async_nats::jetstream::stream::Config {
    let js = env.jetstream().await;
    let mut stream = js.get_stream(&env.stream).await.expect("the stream");
    stream.info().await.expect("stream info").config.clone()
}

async fn emit(service: &EventService, n: u32) -> Vec<Uuid> {
    service
        .emit_all((0..n).map(|lesson_id| LessonPublished { lesson_id }))
        .await
        .expect("emit")
}

/// Asserts the stream holds exactly `expected`, once each, in that order.
async fn assert_stream_is(env: &TestEnv, expected: &[Uuid]) {
    let js = env.jetstream().await;
    let got = env.stream_ids(&js).await;
    let unique: HashSet<&Uuid> = got.iter().collect();
    assert_eq!(unique.len(), got.len(), "duplicates in the stream");
    assert_eq!(got.len(), expected.len(), "stream length");
    let first_out_of_order = got.iter().zip(expected).position(|(got, want)| got != want);
    assert_eq!(
        first_out_of_order, None,
        "stream order differs from sequence order"
    );
}

async fn all_published(service: &EventService, relay: &RelayHandle, n: u64) {
    wait_for(WAIT, "every event to be published and marked", || async {
        service.outbox_status().await.expect("status").pending == 0 && relay.published() >= n
    })
    .await;
}

#[tokio::test]
async fn atomic_batches_store_each_chunk_whole_in_sequence_order() {
    let Some(server) = current_server("atomic_batches_store_each_chunk_whole").await else {
        return;
    };
    let env = TestEnv::with_nats(server.url()).await;
    let service = atomic_service(&env).await;
    // One transaction: the relay reads it as one batch of 2,500 (three chunks), then
    // the last 500.
    let ids = emit(&service, 3_000).await;
    let relay = service.start_relay().await.expect("the relay starts");
    all_published(&service, &relay, 3_000).await;
    assert_stream_is(&env, &ids).await;
    assert_eq!(relay.published(), 3_000);
    // Nothing was refused and sent again the pipelined way.
    assert_eq!(relay.sent(), 3_000);
    assert!(
        relay.atomic_batches() >= 4,
        "{} atomic batches",
        relay.atomic_batches()
    );
    // The server stored them as batches: each message names its batch.
    let js = env.jetstream().await;
    let messages = env.stream_messages(&js).await;
    let batches: HashSet<&str> = messages
        .iter()
        .map(|m| header(m, "Nats-Batch-Id"))
        .collect();
    assert_eq!(batches.len() as u64, relay.atomic_batches());
    assert_eq!(header(&messages[0], "Nats-Batch-Sequence"), "1");
    relay.shutdown().await.expect("relay shutdown");
}

#[tokio::test]
async fn a_relay_dying_before_marking_atomic_batches_leaves_one_copy_per_event() {
    let Some(server) = current_server("a_relay_dying_before_marking_atomic_batches").await else {
        return;
    };
    let env = TestEnv::with_nats(server.url()).await;
    let service = atomic_service(&env).await;
    let doomed = service.start_relay().await.expect("the relay starts");
    doomed.crash_before_mark();
    let ids = emit(&service, 1_500).await;
    wait_for(WAIT, "the doomed relay to publish and die", || async {
        doomed.is_finished()
    })
    .await;
    assert!(doomed.atomic_batches() >= 1);
    let doomed_published = doomed.atomic_batches();
    doomed.shutdown().await.expect("the crash is not a failure");
    let js = env.jetstream().await;
    let in_stream = env.stream_len(&js).await;
    assert!(in_stream > 0, "the doomed relay stored nothing");

    // The next relay sends the same events again: an atomic batch holding events the
    // stream has is refused whole, and they go the pipelined way, acked as duplicates.
    let next = service.start_relay().await.expect("the relay starts");
    all_published(&service, &next, 1_500).await;
    assert_eq!(next.published(), 1_500);
    assert_stream_is(&env, &ids).await;
    if in_stream == 1_500 {
        // Every chunk was refused as holding events the stream has, and sent again the
        // pipelined way, where JetStream acknowledged them as duplicates.
        assert_eq!(next.atomic_batches(), 0);
        assert_eq!(next.sent(), 2 * 1_500);
    }
    eprintln!(
        "doomed relay: {doomed_published} atomic batches, {in_stream} events stored; next \
         relay: sent {}, {} atomic batches",
        next.sent(),
        next.atomic_batches()
    );
    next.shutdown().await.expect("relay shutdown");
}

#[tokio::test]
async fn another_publisher_after_an_atomic_batch_breaks_the_chain_not_the_order() {
    let Some((_server, env, service, relay, mut ids)) =
        warmed_up("another_publisher_after_an_atomic_batch").await
    else {
        return;
    };
    // The first batch went as an atomic batch: the relay knows the stream's last
    // sequence and chains the next chunk to it without reading the stream.

    // Another publisher appends to the stream: the next chunk expects a sequence that
    // is no longer the last, and is refused whole.
    let stop = Arc::new(AtomicBool::new(false));
    let client = async_nats::connect(env.nats_url.as_str())
        .await
        .expect("NATS answers");
    let foreign = foreign_publisher(client, format!("{}.other.stuff", env.prefix), stop.clone());
    let js = env.jetstream().await;
    wait_for(WAIT, "the other publisher's first messages", || async {
        env.stream_len(&js).await >= 15
    })
    .await;
    ids.extend(emit(&service, 3_000).await);
    all_published(&service, &relay, 3_010).await;
    stop.store(true, Ordering::SeqCst);
    assert!(foreign.await.expect("the publisher ends") > 0);
    let ours = env.our_ids(&js).await;
    assert_eq!(ours, ids, "each event once, in sequence order");
    // The refused chunk showed another publisher at the stream's tail: the relay
    // counted it and went on one event at a time.
    let status = service.outbox_status().await.expect("status");
    assert!(status.foreign_messages > 0, "{status:?}");
    assert_eq!(
        relay.atomic_batches(),
        1,
        "one event at a time while it publishes"
    );
    relay.shutdown().await.expect("relay shutdown");
}

#[tokio::test]
async fn a_server_limit_below_a_chunk_is_kept_to() {
    let conf = std::env::temp_dir().join(format!("edupulse-batch-limit-{}.conf", Uuid::now_v7()));
    std::fs::write(&conf, "jetstream { limits { batch { max_msgs: 100 } } }\n")
        .expect("write the server's configuration");
    let conf_path = conf.to_string_lossy().into_owned();
    let Some(server) = NatsServer::start_current(
        "a_server_limit_below_a_chunk_is_kept_to",
        &["-c", &conf_path],
    )
    .await
    else {
        return;
    };
    let env = TestEnv::with_nats(server.url()).await;
    let service = atomic_service(&env).await;
    // The first batch's chunk of 1,000 is over the limit: refused, it goes the
    // pipelined way, and the relay keeps to the limit the server said.
    let mut ids = emit(&service, 1_000).await;
    let relay = service.start_relay().await.expect("the relay starts");
    all_published(&service, &relay, 1_000).await;
    assert_eq!(relay.atomic_batches(), 0);
    ids.extend(emit(&service, 1_000).await);
    all_published(&service, &relay, 2_000).await;
    assert_stream_is(&env, &ids).await;
    assert_eq!(relay.atomic_batches(), 10, "1,000 events in chunks of 100");
    assert_eq!(
        relay.sent(),
        3 * 1_000,
        "only the first batch was sent twice"
    );
    relay.shutdown().await.expect("relay shutdown");
    let _ = std::fs::remove_file(conf);
}

#[tokio::test]
async fn a_stream_that_stops_allowing_atomic_batches_gets_each_event_acknowledged() {
    let Some((_server, env, service, relay, mut ids)) =
        warmed_up("a_stream_that_stops_allowing_atomic_batches").await
    else {
        return;
    };
    let atomic_before = relay.atomic_batches();

    // An operator turns atomic batches off on the stream while the relay runs.
    let mut config = stream_config(&env).await;
    assert!(
        config.allow_atomic_publish,
        "connect created it allowing them"
    );
    config.allow_atomic_publish = false;
    let js = env.jetstream().await;
    js.update_stream(&config).await.expect("update the stream");

    // The first batch after it is refused, and sent again the pipelined way; the
    // next goes that way at once (atomic batches are set back for a while).
    ids.extend(emit(&service, 1_000).await);
    all_published(&service, &relay, 1_010).await;
    let sent_before = relay.sent();
    ids.extend(emit(&service, 1_000).await);
    all_published(&service, &relay, 2_010).await;
    assert_stream_is(&env, &ids).await;
    assert_eq!(
        relay.atomic_batches(),
        atomic_before,
        "no atomic batch after the stream stopped allowing them"
    );
    assert_eq!(
        sent_before,
        10 + 2 * 1_000,
        "the refused batch is sent once more"
    );
    assert_eq!(
        relay.sent() - sent_before,
        1_000,
        "after a refusal that says atomic batches do not work, none is tried for a while"
    );
    assert!(relay.last_error().is_none(), "{:?}", relay.last_error());
    relay.shutdown().await.expect("relay shutdown");
}

#[tokio::test]
async fn auto_publishes_atomic_batches_only_to_a_replicated_stream() {
    let Some(server) = current_server("auto_publishes_atomic_batches_only_to_replicated").await
    else {
        return;
    };
    let env = TestEnv::with_nats(server.url()).await;
    // One replica: each event with its own acknowledgement (faster on one server).
    let service = env.service().await;
    let relay = service.start_relay().await.expect("the relay starts");
    let ids = emit(&service, 1_200).await;
    all_published(&service, &relay, 1_200).await;
    assert_stream_is(&env, &ids).await;
    assert_eq!(relay.atomic_batches(), 0);
    let config = stream_config(&env).await;
    assert!(!config.allow_atomic_publish, "{config:?}");
    relay.shutdown().await.expect("relay shutdown");
}

#[tokio::test]
async fn always_is_refused_by_an_old_server_and_by_a_stream_that_does_not_allow_them() {
    // The machine's server (2.9) has no atomic batches.
    let env = TestEnv::new().await;
    let old = EventService::connect(
        env.config()
            .relay(atomic_relay())
            .build()
            .expect("a valid config"),
    )
    .await;
    let version = async_nats::connect(env.nats_url.as_str())
        .await
        .expect("NATS answers")
        .server_info()
        .version;
    if version.starts_with("2.9.") || version.starts_with("2.10.") || version.starts_with("2.11.") {
        let error = old.expect_err("an old server refuses Always");
        assert_eq!(error.kind(), ConnectErrorKind::JetStream);
        let message = error.to_string();
        assert!(
            matches!(error, ConnectError::ServerTooOld { .. }),
            "{message}"
        );
        assert!(message.contains("2.12"), "{message}");
        assert!(message.contains("atomic_batches"), "{message}");
    } else {
        eprintln!("the shared nats-server is {version}: its refusal of Always is not tested");
    }

    let Some(server) = current_server("always_is_refused_by_a_stream").await else {
        return;
    };
    let env = TestEnv::with_nats(server.url()).await;
    // A stream made without them (as a one-replica Auto service makes it)...
    env.service().await;
    // ...is refused by a service that wants them always.
    let error = EventService::connect(
        env.config()
            .relay(atomic_relay())
            .build()
            .expect("a valid config"),
    )
    .await
    .expect_err("a stream without allow_atomic refuses Always");
    assert_eq!(error.kind(), ConnectErrorKind::StreamConflict);
    assert!(error.to_string().contains("allow_atomic"), "{error}");
}
