//! The fault-injection scenarios (issue 6). Each one has its own database, stream and
//! subject prefix (and, where it kills or pauses NATS, its own nats-server), injects
//! real faults while writers emit, then checks with the Jepsen-style checker that
//! nothing committed was lost, nothing uncommitted was delivered, no effect happened
//! twice, and no subject's events went out of order.
//!
//! `cargo test -p edupulse-fault-suite` runs the short version (minutes);
//! `EDUPULSE_FAULTS=long cargo test --release -p edupulse-fault-suite --test faults --
//! --nocapture --test-threads=1` the long one (20,000 events per scenario, 1,000,000 in
//! the soak; about half an hour). Scenarios run one at a time. `EDUPULSE_FAULTS_SEED`
//! replays a run's fault schedule. The crate's README lists what each scenario shows.

use edupulse_events::{EventService, RelaySettings};
use edupulse_events_tests::{NatsServer, TestEnv};
use edupulse_fault_suite::checker::{History, Outcome, Report};
use edupulse_fault_suite::child::{log_dir, ChildProcess};
use edupulse_fault_suite::proxy::{Direction, FaultProxy};
use edupulse_fault_suite::scenario::{
    batchy_plans, len_now, start_workload, wait_progress, writer_plans, Run, Workload, GROUP,
};
use edupulse_fault_suite::workload::{
    burst, child_env, config_via, create_tables, database_url_via, direct_pool, effects_consumer,
    group_state, join_writers, leader, pending, postgres_addr, retried, shared_nats_addr,
    spawn_writers, stream_len, suite_config, suite_consumer, suite_relay, try_stream_len,
    WriterPlan, WriterStats,
};
use edupulse_fault_suite::{Scale, Tick};
use sqlx::PgPool;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Mutex};
use tokio::time::Instant;
use uuid::Uuid;

/// Scenarios run one at a time: each one loads the 2-core machine on its own, and some
/// measure time.
static SERIAL: Mutex<()> = Mutex::const_new(());

/// 1. The relay process is killed with SIGKILL at random points, many times, while
///    writers emit; two relay processes run, and the leader is the one killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s1_relay_process_killed_at_random_points() {
    let _serial = SERIAL.lock().await;
    let mut run = Run::begin("s1-relay-sigkill");
    let env = TestEnv::new().await;
    let service = env.service_with(suite_config(&env)).await;
    let check_pool = direct_pool(&env).await;
    create_tables(&check_pool).await;
    let consumer = effects_consumer(&service, GROUP, suite_consumer(), "in-process")
        .start()
        .await
        .expect("start the consumer");

    let logs = log_dir(run.name);
    let relay_bin = env!("CARGO_BIN_EXE_relay-child");
    let names = ["relay-0", "relay-1"];
    let spawn = |name: &str| {
        ChildProcess::spawn(
            relay_bin,
            name,
            &child_env(&env, &env.nats_url, name),
            &logs,
        )
    };
    let mut relays = vec![spawn(names[0]), spawn(names[1])];
    for relay in &mut relays {
        relay.expect_line("ready", Duration::from_secs(30)).await;
    }

    let events = run.scale.pick(2_000, 20_000);
    let history = Arc::new(History::new());
    let (_stop, stop) = watch::channel(false);
    let writers = spawn_writers(
        &service,
        batchy_plans(
            4,
            events,
            run.scale
                .pick(Duration::from_secs(6), Duration::from_secs(45)),
        ),
        &history,
        &mut run.rng,
        &stop,
    );
    let min_kills = run.scale.pick(8, 40);
    let (mut kills, mut leader_kills) = (0, 0);
    loop {
        tokio::time::sleep(run.rng.millis(100, 500)).await;
        let victim = match leader(&check_pool).await {
            Some((_, app)) if names.contains(&app.as_str()) => {
                leader_kills += 1;
                names.iter().position(|n| *n == app).unwrap_or(0)
            }
            _ => usize::try_from(run.rng.between(0, 1)).unwrap_or(0),
        };
        relays[victim].kill().await;
        kills += 1;
        relays[victim] = spawn(names[victim]);
        if writers.iter().all(|w| w.is_finished()) && kills >= min_kills {
            break;
        }
    }
    let stats = join_writers(writers).await;
    run.say(format!(
        "{kills} SIGKILLs, {leader_kills} of the leader; writers {stats:?}"
    ));

    let report = run
        .finish(&check_pool, &env, &history, async {
            consumer.shutdown().await.expect("consumer shutdown");
        })
        .await;
    for relay in &mut relays {
        relay.stop(Duration::from_secs(10)).await;
    }
    report.assert_clean();
    assert!(
        leader_kills >= min_kills / 2,
        "the kills should hit the leading relay ({leader_kills} of {kills})"
    );
}

/// 2. nats-server is killed (SIGKILL) and restarted while the relay publishes (at
///    random, and in the middle of large batches), then paused (SIGSTOP) for longer
///    than the publish ack timeout and resumed: nothing is lost, published twice or
///    applied twice, and the stream (so each subject's effects) stays in sequence
///    order. Before the relay chained its messages (`Nats-Expected-Last-Msg-Id`), a
///    kill in the middle of a batch put the retried events behind later ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s2_nats_server_killed_restarted_and_paused() {
    let scale = Scale::from_env();
    let report = nats_killed_and_paused("s2-nats-kill-pause", scale.pick(6, 12)).await;
    report.assert_clean();
}

async fn nats_killed_and_paused(name: &'static str, bursts: u64) -> Report {
    let _serial = SERIAL.lock().await;
    let mut run = Run::begin(name);
    let mut nats = NatsServer::start().await;
    let env = TestEnv::with_nats(nats.url()).await;
    let service = env.service_with(suite_config(&env)).await;
    let Workload {
        check_pool,
        relay,
        consumer,
        js,
        history,
        writers,
        _stop,
    } = start_workload(&mut run, &env, &service, &service).await;
    let ack_timeout = suite_relay().ack_timeout;
    let recover = Duration::from_secs(30);
    for round in 0..run.scale.pick(2, 8) {
        tokio::time::sleep(run.rng.millis(300, 1_000)).await;
        let before = len_now(&js, &env.stream).await;
        nats.kill();
        let down = run.rng.millis(200, 1_500);
        run.say(format!("round {round}: nats-server killed for {down:?}"));
        tokio::time::sleep(down).await;
        nats.restart().await;
        wait_progress(&run, &check_pool, &js, &env.stream, before, recover).await;
    }
    for round in 0..run.scale.pick(2, 6) {
        tokio::time::sleep(run.rng.millis(300, 1_000)).await;
        let before = len_now(&js, &env.stream).await;
        let paused = ack_timeout * 2 + run.rng.millis(0, 1_500);
        run.say(format!(
            "round {round}: nats-server paused (SIGSTOP) for {paused:?}"
        ));
        nats.pause();
        tokio::time::sleep(paused).await;
        nats.resume();
        wait_progress(&run, &check_pool, &js, &env.stream, before, recover).await;
    }
    // Kills in the middle of large batches: a burst of events in one transaction, and
    // the server killed just after the relay starts publishing it.
    for round in 0..bursts {
        let writer = 50 + u32::try_from(round).expect("few bursts");
        let size = run.scale.pick(1_000, 3_000);
        let before = len_now(&js, &env.stream).await;
        burst(&service, &history, writer, size).await;
        edupulse_events_tests::wait_for(recover, "the relay to publish the burst", || {
            let js = js.clone();
            let stream = env.stream.clone();
            async move {
                try_stream_len(&js, &stream)
                    .await
                    .is_some_and(|n| n > before)
            }
        })
        .await;
        tokio::time::sleep(run.rng.millis(0, 20)).await;
        let mid = len_now(&js, &env.stream).await;
        nats.kill();
        run.say(format!(
            "burst {round}: nats-server killed mid-batch ({size} events, stream at {mid})"
        ));
        tokio::time::sleep(run.rng.millis(100, 500)).await;
        nats.restart().await;
        wait_progress(&run, &check_pool, &js, &env.stream, mid, recover).await;
    }
    let stats = join_writers(writers).await;
    run.say(format!("writers {stats:?}"));
    let report = run
        .finish(&check_pool, &env, &history, async {
            consumer.shutdown().await.expect("consumer shutdown");
        })
        .await;
    let retried = retried(&check_pool).await;
    relay.shutdown().await.expect("relay shutdown");
    run.say(format!("{retried} events published on a later attempt"));
    if let Some(first) = report.stream_order.first() {
        run.say(format!(
            "{} stream order violations; first: writer {} counter {} published before {}",
            report.stream_order.len(),
            first.writer,
            first.before,
            first.after
        ));
    }
    assert!(
        retried > 0,
        "the faults should have failed some publishes (events published on a later attempt)"
    );
    report
}

/// 3. The proxy stalls the relay's NATS connection for longer than the ack timeout,
///    then releases it (held publishes and late acks arrive; the relay has retried
///    meanwhile): nothing is published twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_stalled_nats_connection_and_late_acks() {
    let _serial = SERIAL.lock().await;
    let mut run = Run::begin("s3-nats-stall");
    let env = TestEnv::new().await;
    let proxy = FaultProxy::start(shared_nats_addr()).await;
    let relay_service = env
        .service_with(suite_config(&env).nats_url(format!("nats://{}", proxy.addr())))
        .await;
    let consumer_service = env.service_with(suite_config(&env)).await;
    let Workload {
        check_pool,
        relay,
        consumer,
        js,
        history,
        writers,
        _stop,
    } = start_workload(&mut run, &env, &relay_service, &consumer_service).await;
    let ack_timeout = suite_relay().ack_timeout;
    let recover = Duration::from_secs(30);
    let mut rounds: Vec<Direction> = Vec::new();
    for _ in 0..run.scale.pick(2, 8) {
        rounds.push(Direction::Both);
    }
    for _ in 0..run.scale.pick(1, 4) {
        rounds.push(Direction::ToClient);
    }
    for (round, direction) in rounds.into_iter().enumerate() {
        tokio::time::sleep(run.rng.millis(300, 1_000)).await;
        let before = len_now(&js, &env.stream).await;
        let stalled = ack_timeout * 2 + run.rng.millis(200, 1_500);
        run.say(format!(
            "round {round}: relay's NATS connection stalled ({direction:?}) for {stalled:?}"
        ));
        proxy.stall(direction);
        tokio::time::sleep(stalled).await;
        proxy.release();
        wait_progress(&run, &check_pool, &js, &env.stream, before, recover).await;
    }
    let stats = join_writers(writers).await;
    run.say(format!("writers {stats:?}; proxy {:?}", proxy.stats()));
    let report = run
        .finish(&check_pool, &env, &history, async {
            consumer.shutdown().await.expect("consumer shutdown");
        })
        .await;
    let retried = retried(&check_pool).await;
    relay.shutdown().await.expect("relay shutdown");
    report.assert_clean();
    assert!(
        retried > 0,
        "the stalls should have timed out some acks (events published on a later attempt)"
    );
}

/// 4. The proxy resets Postgres connections (and refuses new ones for a while), and
///    pg_terminate_backend kills backends, during emits, relay batches and handlers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s4_postgres_connections_reset() {
    let _serial = SERIAL.lock().await;
    let mut run = Run::begin("s4-postgres-reset");
    let env = TestEnv::new().await;
    let proxy = FaultProxy::start(postgres_addr(&env)).await;
    let via = database_url_via(&env, proxy.addr());
    let service = env
        .service_with(config_via(&env, &via, &env.nats_url))
        .await;
    let consumer_service = env
        .service_with(config_via(&env, &via, &env.nats_url))
        .await;
    let check_pool = direct_pool(&env).await;
    create_tables(&check_pool).await;
    let relay = service.start_relay().await.expect("the relay starts");
    let consumer = effects_consumer(&consumer_service, GROUP, suite_consumer(), "in-process")
        .start()
        .await
        .expect("start the consumer");

    let events = run.scale.pick(2_000, 20_000);
    let history = Arc::new(History::new());
    let (_stop, stop) = watch::channel(false);
    let over = run
        .scale
        .pick(Duration::from_secs(8), Duration::from_secs(60));
    let plans = batchy_plans(4, events, over);
    // A little latency widens the windows a reset can cut (a commit in flight, say).
    proxy.set_latency(Duration::from_millis(1));
    let writers = spawn_writers(&service, plans, &history, &mut run.rng, &stop);
    let (mut resets, mut refusals, mut terminated) = (0, 0, 0);
    // The first four faults are one of each kind; then they are drawn at random.
    let mut first_kinds = [0, 70, 80, 95].into_iter();
    while !writers.iter().all(|w| w.is_finished()) {
        tokio::time::sleep(run.rng.millis(150, 500)).await;
        let dice = first_kinds.next().unwrap_or_else(|| run.rng.between(0, 99));
        if dice < 60 {
            proxy.reset_all();
            resets += 1;
        } else if dice < 75 {
            proxy.refuse(true);
            proxy.reset_all();
            tokio::time::sleep(run.rng.millis(200, 800)).await;
            proxy.refuse(false);
            refusals += 1;
        } else {
            // The leader's backend, else any of the framework's.
            let pid: Option<i32> = match leader(&check_pool).await {
                Some((pid, _)) if dice < 88 => Some(pid),
                _ => sqlx::query_scalar(
                    "SELECT pid FROM pg_stat_activity
                     WHERE datname = current_database() AND application_name = 'edupulse-faults'
                     ORDER BY random() LIMIT 1",
                )
                .fetch_optional(&check_pool)
                .await
                .expect("pick a backend"),
            };
            if let Some(pid) = pid {
                let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
                    .bind(pid)
                    .fetch_one(&check_pool)
                    .await
                    .expect("pg_terminate_backend");
                terminated += i32::from(killed);
            }
        }
    }
    let stats = join_writers(writers).await;
    proxy.set_latency(Duration::ZERO);
    run.say(format!(
        "{resets} resets, {refusals} refusal periods, {terminated} backends terminated; \
         writers {stats:?}; proxy {:?}",
        proxy.stats()
    ));
    let report = run
        .finish(&check_pool, &env, &history, async {
            consumer.shutdown().await.expect("consumer shutdown");
        })
        .await;
    relay.shutdown().await.expect("relay shutdown");
    report.assert_clean();
    assert!(
        stats.failed + stats.unknown > 0,
        "the resets should have cut some business transactions: {stats:?}"
    );
    assert!(proxy.stats().reset > 0 && terminated > 0);
}

/// What a held transaction saw.
struct Held {
    id: Uuid,
    /// The most pending events `outbox_status()` reported while it was held.
    max_pending: i64,
    /// The oldest pending age `outbox_status()` reported, at most.
    max_lag: Duration,
    /// The stream's length early in the hold, and just before its end.
    len_early: u64,
    len_late: u64,
}

/// Opens a transaction that writes writer 100's `counter` and its event, keeps it
/// open for `hold` while the other writers commit, then commits or rolls back.
#[allow(clippy::too_many_arguments)]
async fn hold_open(
    run: &Run,
    service: &EventService,
    history: &History,
    js: &async_nats::jetstream::Context,
    stream: &str,
    counter: u64,
    hold: Duration,
    early: Duration,
    commit: bool,
) -> Held {
    let mut tx = service.pool().begin().await.expect("begin");
    sqlx::query("INSERT INTO fault_business (writer, counter) VALUES (100, $1)")
        .bind(i64::try_from(counter).expect("small counter"))
        .execute(&mut *tx)
        .await
        .expect("business row");
    let id = service
        .emit_in(
            &mut tx,
            Tick {
                writer: 100,
                counter,
            },
        )
        .await
        .expect("emit the held event");
    let started = Instant::now();
    let (mut max_pending, mut max_lag) = (0, Duration::ZERO);
    let mut len_early = None;
    let mut len_late = 0;
    while started.elapsed() < hold {
        let status = service.outbox_status().await.expect("outbox_status");
        max_pending = max_pending.max(status.pending);
        max_lag = max_lag.max(status.oldest_pending_age);
        len_late = stream_len(js, stream).await;
        if len_early.is_none() && started.elapsed() >= early {
            len_early = Some(len_late);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if commit {
        tx.commit().await.expect("commit the held transaction");
    } else {
        tx.rollback().await.expect("roll back the held transaction");
    }
    let outcome = if commit {
        Outcome::Committed
    } else {
        Outcome::RolledBack
    };
    history.record(100, counter..counter + 1, outcome);
    run.say(format!(
        "held {id} for {hold:?}, then {outcome:?}: pending up to {max_pending}, lag up to \
         {max_lag:?}, stream {len_early:?} -> {len_late}"
    ));
    Held {
        id,
        max_pending,
        max_lag,
        len_early: len_early.unwrap_or(len_late),
        len_late,
    }
}

/// 5. A long open transaction holds an early sequence number while later ones commit:
///    delivery waits for it (outbox_status() shows the lag), nothing is skipped, and a
///    rolled-back one leaves no trace. Held past `order_wait_limit`, later events go
///    ahead of it and it is still delivered when it commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s5_long_open_transaction_holds_an_early_sequence() {
    let _serial = SERIAL.lock().await;
    let mut run = Run::begin("s5-long-transaction");
    let env = TestEnv::new().await;
    let limit = run
        .scale
        .pick(Duration::from_secs(3), Duration::from_secs(10));
    let service = env
        .service_with(suite_config(&env).relay(RelaySettings {
            order_wait_limit: limit,
            ..suite_relay()
        }))
        .await;
    let check_pool = direct_pool(&env).await;
    create_tables(&check_pool).await;
    let relay = service.start_relay().await.expect("the relay starts");
    let consumer = effects_consumer(&service, GROUP, suite_consumer(), "in-process")
        .start()
        .await
        .expect("start the consumer");
    let js = env.jetstream().await;

    let history = Arc::new(History::new());
    let (stop_writers, stop) = watch::channel(false);
    let events = run.scale.pick(2_000, 20_000);
    let writers = spawn_writers(
        &service,
        writer_plans(
            2,
            events,
            run.scale
                .pick(Duration::from_secs(15), Duration::from_secs(60)),
        ),
        &history,
        &mut run.rng,
        &stop,
    );
    let drained = || async {
        edupulse_events_tests::wait_for(Duration::from_secs(30), "the relay to catch up", || {
            let pool = check_pool.clone();
            async move { pending(&pool).await < 50 }
        })
        .await;
    };

    // A: held for half the limit, then committed: everything waits for it.
    drained().await;
    let hold = limit / 2;
    let a = hold_open(
        &run,
        &service,
        &history,
        &js,
        &env.stream,
        0,
        hold,
        hold / 4,
        true,
    )
    .await;
    assert!(
        a.max_pending > 0 && a.max_lag >= hold / 2,
        "outbox_status() shows the lag behind the open transaction: pending {}, lag {:?}",
        a.max_pending,
        a.max_lag
    );
    assert_eq!(
        a.len_early, a.len_late,
        "nothing is published past an open transaction's event while it is held"
    );

    // B: held, then rolled back: nothing of it is delivered, nothing after it skipped.
    drained().await;
    let b = hold_open(
        &run,
        &service,
        &history,
        &js,
        &env.stream,
        1,
        hold,
        hold / 4,
        false,
    )
    .await;
    assert_eq!(b.len_early, b.len_late);

    // C: held past order_wait_limit: later events go ahead, the held one follows.
    drained().await;
    let c = hold_open(
        &run,
        &service,
        &history,
        &js,
        &env.stream,
        2,
        limit * 2,
        limit * 3 / 4,
        true,
    )
    .await;
    assert!(
        c.len_late > c.len_early,
        "after order_wait_limit the relay publishes later events ({} -> {})",
        c.len_early,
        c.len_late
    );
    let _ = stop_writers.send(true);
    let stats: WriterStats = join_writers(writers).await;
    run.say(format!("writers {stats:?}"));
    let report = run
        .finish(&check_pool, &env, &history, async {
            consumer.shutdown().await.expect("consumer shutdown");
        })
        .await;
    relay.shutdown().await.expect("relay shutdown");
    // Only C's event went out of sequence order, by design.
    report.assert_clean_with_sequence_exceptions(&[c.id]);
}

/// 6. The consumer process is killed with SIGKILL between its transaction's commit and
///    its ack (the ack held at a proxy, then dropped), repeatedly, and at random
///    points in between: nothing is lost, no effect happens twice, and each subject's
///    effects are applied in stream order across the crashes (the next instance holds
///    later messages until the dead one's come back; before it did, this failed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s6_consumer_killed_between_commit_and_ack() {
    let report = consumer_killed_between_commit_and_ack("s6-consumer-sigkill").await;
    report.assert_clean();
}

async fn consumer_killed_between_commit_and_ack(name: &'static str) -> Report {
    let _serial = SERIAL.lock().await;
    let mut run = Run::begin(name);
    let env = TestEnv::new().await;
    let proxy = FaultProxy::start(shared_nats_addr()).await;
    let service = env.service_with(suite_config(&env)).await;
    let check_pool = direct_pool(&env).await;
    create_tables(&check_pool).await;
    let relay = service.start_relay().await.expect("the relay starts");
    let js = env.jetstream().await;

    let history = Arc::new(History::new());
    let (stop_writers, stop) = watch::channel(false);
    let events = run.scale.pick(2_000, 20_000);
    let writers = spawn_writers(
        &service,
        writer_plans(
            4,
            events,
            run.scale
                .pick(Duration::from_secs(10), Duration::from_secs(100)),
        ),
        &history,
        &mut run.rng,
        &stop,
    );
    let logs = log_dir(run.name);
    let consumer_bin = env!("CARGO_BIN_EXE_consumer-child");
    let proxied = format!("nats://{}", proxy.addr());
    let spawn = |life: usize, doom_after: Option<u64>| {
        let name = format!("consumer-{life}");
        let mut vars = child_env(&env, &proxied, &name);
        vars.push(("EDUPULSE_FAULT_GROUP", GROUP.to_owned()));
        vars.push(("EDUPULSE_FAULT_INSTANCE", name.clone()));
        vars.push(("EDUPULSE_FAULT_ACK_WAIT_MS", "1000".to_owned()));
        if let Some(n) = doom_after {
            vars.push(("EDUPULSE_FAULT_DOOM_AFTER", n.to_string()));
        }
        ChildProcess::spawn(consumer_bin, &name, &vars, &logs)
    };
    // Lives go on while the writers write, and at least `min_lives` times.
    let min_lives = run.scale.pick(8, 40);
    let (mut doomed_kills, mut random_kills) = (0, 0);
    let mut life = 0;
    while life < min_lives || !writers.iter().all(|w| w.is_finished()) {
        // A doomed life needs events still coming.
        let doomed = life % 2 == 0 && !writers.iter().all(|w| w.is_finished());
        let doom_after = doomed.then(|| run.rng.between(5, 80));
        let mut child = spawn(life, doom_after);
        child.expect_line("ready", Duration::from_secs(30)).await;
        let line = if doomed {
            child.next_line("doomed", Duration::from_secs(20)).await
        } else {
            None
        };
        if let Some(line) = line {
            let mut parts = line.split_whitespace().skip(1);
            let id: Uuid = parts
                .next()
                .and_then(|s| s.parse().ok())
                .expect("doomed line has an id");
            let sequence: u64 = parts
                .next()
                .and_then(|s| s.parse().ok())
                .expect("doomed line has a stream sequence");
            // Hold everything the child sends to NATS (its ack), let it commit, kill it.
            proxy.stall(Direction::ToServer);
            assert!(child.send("go").await, "the doomed child is alive");
            edupulse_events_tests::wait_for(
                Duration::from_secs(10),
                "the doomed event's transaction to commit",
                || {
                    let pool = check_pool.clone();
                    async move {
                        sqlx::query_scalar::<_, i64>(
                            "SELECT count(*) FROM fault_effects WHERE event_id = $1",
                        )
                        .bind(id)
                        .fetch_one(&pool)
                        .await
                        .expect("look for the effect")
                            > 0
                    }
                },
            )
            .await;
            child.kill().await;
            proxy.reset_all();
            proxy.release();
            let (_, _, ack_floor) = group_state(&js, &env.stream, GROUP)
                .await
                .expect("the group exists");
            assert!(
                ack_floor < sequence,
                "the doomed event (stream sequence {sequence}) was not acked: ack floor \
                 {ack_floor}"
            );
            doomed_kills += 1;
            run.say(format!(
                "life {life}: killed after committing event {id} (stream seq {sequence}), \
                 before its ack"
            ));
        } else {
            if doomed {
                run.say(format!("life {life}: its doomed event never came"));
            }
            let after = run.rng.millis(100, 1_500);
            tokio::time::sleep(after).await;
            child.kill().await;
            proxy.reset_all();
            random_kills += 1;
            run.say(format!("life {life}: killed after {after:?}"));
        }
        life += 1;
    }
    assert!(
        doomed_kills * 3 >= min_lives,
        "most even lives should be killed between commit and ack ({doomed_kills} of {life})"
    );
    let _ = stop_writers.send(true);
    let stats = join_writers(writers).await;
    run.say(format!(
        "{doomed_kills} kills between commit and ack, {random_kills} at random; writers {stats:?}"
    ));
    let mut last = spawn(life, None);
    last.expect_line("ready", Duration::from_secs(30)).await;
    let report = run
        .finish(&check_pool, &env, &history, async {
            assert!(
                last.stop(Duration::from_secs(20)).await,
                "the last consumer stops cleanly"
            );
        })
        .await;
    relay.shutdown().await.expect("relay shutdown");
    if let Some(first) = report.handled_order.first() {
        // Who applied what, and when: the evidence for the order violation.
        let rows: Vec<(i64, i64, String)> = sqlx::query_as(
            "SELECT applied, counter, instance FROM fault_effects
             WHERE writer = $1 AND counter IN ($2, $3) ORDER BY applied",
        )
        .bind(i32::try_from(first.writer).expect("small writer"))
        .bind(i64::try_from(first.before).expect("small counter"))
        .bind(i64::try_from(first.after).expect("small counter"))
        .fetch_all(&check_pool)
        .await
        .expect("read the violating effects");
        run.say(format!(
            "{} handled-order violations; first: writer {} counter {} applied before \
             counter {}: (applied, counter, instance) {rows:?}",
            report.handled_order.len(),
            first.writer,
            first.before,
            first.after
        ));
    }
    report
}

/// 7. Business transactions exhaust the service's pool (and hold events uncommitted):
///    the relay slows down but keeps publishing, and everything is delivered once the
///    load stops. No deadlock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s7_pool_exhausted_by_business_transactions() {
    let _serial = SERIAL.lock().await;
    let mut run = Run::begin("s7-pool-exhaustion");
    let env = TestEnv::new().await;
    let pool_size = 4;
    let service = env
        .service_with(
            suite_config(&env)
                .max_connections(pool_size)
                .connect_timeout(Duration::from_secs(1)),
        )
        .await;
    let consumer_service = env.service_with(suite_config(&env)).await;
    let check_pool = direct_pool(&env).await;
    create_tables(&check_pool).await;
    let relay = service.start_relay().await.expect("the relay starts");
    let consumer = effects_consumer(&consumer_service, GROUP, suite_consumer(), "in-process")
        .start()
        .await
        .expect("start the consumer");
    let js = env.jetstream().await;

    let history = Arc::new(History::new());
    let (stop_hogs, stop) = watch::channel(false);
    let exhaustion = run
        .scale
        .pick(Duration::from_secs(8), Duration::from_secs(60));
    let hogs: Vec<WriterPlan> = (0..12)
        .map(|w| WriterPlan {
            hold_ms: Some((100, 600)),
            op_timeout: Duration::from_secs(20),
            ..WriterPlan::new(w, u64::MAX / 2)
        })
        .collect();
    let events = run.scale.pick(1_000, 20_000);
    let mut writers = writer_plans(2, events, exhaustion);
    for (i, plan) in writers.iter_mut().enumerate() {
        plan.writer = 20 + i as u32;
    }
    let (_keep, never) = watch::channel(false);
    let hog_tasks = spawn_writers(&service, hogs, &history, &mut run.rng, &stop);
    let writer_tasks = spawn_writers(&service, writers, &history, &mut run.rng, &never);

    let before = len_now(&js, &env.stream).await;
    let started = Instant::now();
    let (mut samples, mut exhausted) = (0, 0);
    let mut max_lag = 0.0f64;
    while started.elapsed() < exhaustion {
        let pool = service.pool();
        samples += 1;
        if pool.size() == pool_size && pool.num_idle() == 0 {
            exhausted += 1;
        }
        // How long the oldest committed event has waited to be published.
        let lag: Option<f64> = sqlx::query_scalar(
            "SELECT extract(epoch FROM clock_timestamp() - min(occurred_at))::float8
             FROM edupulse.pending_events",
        )
        .fetch_one(&check_pool)
        .await
        .expect("measure the publishing lag");
        max_lag = max_lag.max(lag.unwrap_or(0.0));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let during = len_now(&js, &env.stream).await;
    let _ = stop_hogs.send(true);
    let hog_stats = join_writers(hog_tasks).await;
    let writer_stats = join_writers(writer_tasks).await;
    run.say(format!(
        "pool exhausted in {exhausted} of {samples} samples; stream {before} -> {during} during \
         the exhaustion, publishing lag up to {max_lag:.2}s; hogs {hog_stats:?}, writers \
         {writer_stats:?}"
    ));
    let report = run
        .finish(&check_pool, &env, &history, async {
            consumer.shutdown().await.expect("consumer shutdown");
        })
        .await;
    relay.shutdown().await.expect("relay shutdown");
    report.assert_clean();
    assert!(
        exhausted * 2 >= samples,
        "the pool should be exhausted most of the time ({exhausted} of {samples} samples)"
    );
    assert!(
        hog_stats.failed + writer_stats.failed > 0,
        "some transactions should time out waiting for a connection"
    );
    assert!(
        during > before,
        "the relay keeps publishing while the pool is exhausted ({before} -> {during})"
    );
    assert!(
        max_lag < 10.0,
        "committed events wait at most seconds to be published while the pool is exhausted \
         (up to {max_lag:.2}s)"
    );
}

/// One sample of the soak's outbox.
#[derive(Debug, Clone, Copy)]
struct Sample {
    published: u64,
    rows: i64,
    bytes: i64,
    /// The relay's batch query, timed by EXPLAIN ANALYZE.
    read_ms: f64,
    /// The pruner's scan for old published rows, timed the same way.
    prune_ms: f64,
}

/// A query's execution time by EXPLAIN ANALYZE, in milliseconds.
async fn explain_ms(pool: &PgPool, query: &'static str) -> f64 {
    let plan: serde_json::Value = sqlx::query_scalar(query)
        .fetch_one(pool)
        .await
        .expect("explain a relay query");
    plan[0]["Execution Time"].as_f64().unwrap_or(0.0)
}

/// The relay's batch read (its `READ_BATCH`, with the highest possible fence).
const READ_BATCH: &str = "EXPLAIN (ANALYZE, FORMAT JSON)
    SELECT seq, id, name, version, subject, payload::text AS payload, source,
           correlation_id, causation_id, traceparent, occurred_at, attempts, next_attempt_at
    FROM edupulse.outbox
    WHERE status = 'pending' AND seq <= 9223372036854775807
      AND seq > (SELECT published_through FROM edupulse.relay_progress)
    ORDER BY seq LIMIT 500";

/// The pruner's scan for rows to delete (the subquery of its `DELETE`).
const PRUNE_SCAN: &str = "EXPLAIN (ANALYZE, FORMAT JSON)
    SELECT seq FROM edupulse.outbox
    WHERE seq <= 9223372036854775807
      AND ((status = 'pending'
            AND seq <= (SELECT published_through FROM edupulse.relay_progress))
           OR (status = 'published' AND published_at < now() - interval '500 milliseconds'))
    ORDER BY seq LIMIT 2000";

fn max_of(samples: &[Sample], f: impl Fn(&Sample) -> f64) -> f64 {
    samples.iter().map(f).fold(0.0, f64::max)
}

fn median_of(samples: &[Sample], f: impl Fn(&Sample) -> f64) -> f64 {
    let mut values: Vec<f64> = samples.iter().map(f).collect();
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// 8. A soak run with retention pruning: the outbox table's rows and size and the
///    relay's query times stay bounded as events go by.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s8_soak_with_retention_pruning() {
    let _serial = SERIAL.lock().await;
    let mut run = Run::begin("s8-soak");
    let nats = NatsServer::start().await;
    let env = TestEnv::with_nats(nats.url()).await;
    let retention = Duration::from_millis(500);
    let service = env
        .service_with(suite_config(&env).max_connections(10).relay(RelaySettings {
            retention,
            prune_interval: Duration::from_millis(250),
            prune_batch: 2_000,
            ..suite_relay()
        }))
        .await;
    let check_pool = direct_pool(&env).await;
    create_tables(&check_pool).await;
    let relay = service.start_relay().await.expect("the relay starts");
    let consumer = effects_consumer(
        &service,
        GROUP,
        edupulse_events::ConsumerSettings {
            concurrency: 4,
            ..suite_consumer()
        },
        "in-process",
    )
    .start()
    .await
    .expect("start the consumer");
    let js = env.jetstream().await;
    let autovacuum: String = sqlx::query_scalar("SHOW autovacuum")
        .fetch_one(&check_pool)
        .await
        .expect("SHOW autovacuum");
    // EDUPULSE_FAULTS_VACUUM=0 runs without standing in for autovacuum.
    let vacuum_every = match std::env::var("EDUPULSE_FAULTS_VACUUM").as_deref() {
        Ok("0") => None,
        _ if autovacuum != "on" => Some(Duration::from_secs(5)),
        _ => None,
    };
    if let Some(every) = vacuum_every {
        run.say(format!(
            "autovacuum is off on this server: the soak runs VACUUM on the outbox every \
             {every:?}, as autovacuum would"
        ));
    }

    let events: u64 = run.scale.pick(20_000, 1_000_000);
    let over = run
        .scale
        .pick(Duration::from_secs(20), Duration::from_secs(600));
    let history = Arc::new(History::new());
    let (_stop, stop) = watch::channel(false);
    let (gate_tx, gate) = watch::channel(false);
    let plans: Vec<WriterPlan> = (0..8)
        .map(|w| {
            WriterPlan {
                batch_chance: 0.5,
                max_batch: 20,
                rollback_chance: 0.02,
                gate: Some(gate.clone()),
                ..WriterPlan::new(w, events / 8)
            }
            .paced_over(over)
        })
        .collect();
    let writers = spawn_writers(&service, plans, &history, &mut run.rng, &stop);

    let mut samples: Vec<Sample> = Vec::new();
    let mut last_vacuum = Instant::now();
    let mut last_report = Instant::now();
    let mut gated = 0;
    loop {
        let published = len_now(&js, &env.stream).await;
        let (rows, bytes): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM edupulse.outbox),
                    pg_total_relation_size('edupulse.outbox')",
        )
        .fetch_one(&check_pool)
        .await
        .expect("measure the outbox");
        let read_ms = explain_ms(&check_pool, READ_BATCH).await;
        let prune_ms = explain_ms(&check_pool, PRUNE_SCAN).await;
        samples.push(Sample {
            published,
            rows,
            bytes,
            read_ms,
            prune_ms,
        });
        // Back-pressure, should the machine be slower than the pace: writers wait
        // while the pipeline is far behind.
        let lag = group_state(&js, &env.stream, GROUP)
            .await
            .map_or(0, |(undelivered, unacked, _)| undelivered + unacked as u64);
        let behind = pending(&check_pool).await;
        let wait = behind > 5_000 || lag > 10_000;
        gated += usize::from(wait);
        let _ = gate_tx.send(wait);
        if vacuum_every.is_some_and(|every| last_vacuum.elapsed() >= every) {
            sqlx::query("VACUUM edupulse.outbox")
                .execute(&check_pool)
                .await
                .expect("vacuum the outbox");
            last_vacuum = Instant::now();
        }
        if last_report.elapsed() >= Duration::from_secs(30) {
            run.say(format!(
                "published {published}, outbox rows {rows}, {bytes} bytes, batch read \
                 {read_ms:.2} ms, prune scan {prune_ms:.2} ms, pending {behind}, consumer lag {lag}"
            ));
            last_report = Instant::now();
        }
        if writers.iter().all(|w| w.is_finished()) && behind == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let _ = gate_tx.send(false);
    let stats = join_writers(writers).await;
    run.say(format!(
        "writers {stats:?}; {} samples, writers held back in {gated}",
        samples.len()
    ));
    let report = run
        .finish(&check_pool, &env, &history, async {
            consumer.shutdown().await.expect("consumer shutdown");
        })
        .await;
    relay.shutdown().await.expect("relay shutdown");
    report.assert_clean();

    // Bounded: compare an early part of the run with the last quarter (growing with
    // the events, the late figures would be three times the early ones or more).
    let total = report.published as f64;
    let part = |low: f64, high: f64| -> Vec<Sample> {
        samples
            .iter()
            .copied()
            .filter(|s| (s.published as f64) >= total * low && (s.published as f64) < total * high)
            .collect()
    };
    let (early, late) = (part(0.1, 0.35), part(0.75, 1.01));
    assert!(
        early.len() >= 3 && late.len() >= 3,
        "samples in both parts ({} early, {} late)",
        early.len(),
        late.len()
    );
    let rows = (
        max_of(&early, |s| s.rows as f64),
        max_of(&late, |s| s.rows as f64),
    );
    let megabytes = (
        max_of(&early, |s| s.bytes as f64) / 1e6,
        max_of(&late, |s| s.bytes as f64) / 1e6,
    );
    let read = (
        median_of(&early, |s| s.read_ms),
        median_of(&late, |s| s.read_ms),
    );
    let prune = (
        median_of(&early, |s| s.prune_ms),
        median_of(&late, |s| s.prune_ms),
    );
    run.say(format!(
        "early / late: outbox rows max {:.0} / {:.0}; size max {:.1} / {:.1} MB; batch read \
         median {:.2} / {:.2} ms; prune scan median {:.2} / {:.2} ms",
        rows.0, rows.1, megabytes.0, megabytes.1, read.0, read.1, prune.0, prune.1
    ));
    assert!(
        rows.1 <= rows.0 * 2.0 + 2_000.0 && rows.1 < total / 4.0,
        "the outbox's rows stay bounded: {rows:?} for {total} events"
    );
    assert!(
        megabytes.1 <= megabytes.0 * 2.0 + 2.0,
        "the outbox's size stays bounded: {megabytes:?} MB"
    );
    assert!(
        read.1 <= read.0 * 3.0 + 2.0,
        "the relay's batch read stays fast: {read:?} ms"
    );
    assert!(
        prune.1 <= prune.0 * 3.0 + 2.0,
        "the pruner's scan stays fast: {prune:?} ms"
    );
}
