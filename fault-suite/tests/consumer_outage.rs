//! The framework's own Postgres failures in a consumer (it cannot begin the handler's
//! transaction, record the event in the inbox or commit, because the connection or the
//! database is gone) are retried without counting toward `max_deliveries`, so a
//! Postgres outage or a killed connection never dead-letters an event that succeeds
//! afterwards. Handler errors still count (see the poison test in
//! `tests/tests/consumer.rs`).

use edupulse_events::{ConsumerBuilder, ConsumerSettings, EventService};
use edupulse_events_tests::{wait_for, TestEnv};
use edupulse_fault_suite::proxy::FaultProxy;
use edupulse_fault_suite::workload::{
    config_via, database_url_via, direct_pool, postgres_addr, suite_config,
};
use edupulse_fault_suite::Tick;
use sqlx::PgPool;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Notify};

const WAIT: Duration = Duration::from_secs(60);

fn settings(max_deliveries: u32) -> ConsumerSettings {
    ConsumerSettings {
        max_deliveries,
        retry_base: Duration::from_millis(20),
        retry_max: Duration::from_millis(200),
        ack_wait: Duration::from_secs(2),
        ..ConsumerSettings::default()
    }
}

async fn create_table(pool: &PgPool) {
    sqlx::query(
        "CREATE TABLE outage_effects (counter BIGINT NOT NULL, attempt INT NOT NULL, \
         backend INT NOT NULL)",
    )
    .execute(pool)
    .await
    .expect("create outage_effects");
}

/// (counter, delivery attempt) of every effect applied, in order.
async fn effects(pool: &PgPool) -> Vec<(i64, i32)> {
    sqlx::query_as("SELECT counter, attempt FROM outage_effects ORDER BY counter")
        .fetch_all(pool)
        .await
        .expect("read outage_effects")
}

async fn dead_letters(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM edupulse.dead_letters")
        .fetch_one(pool)
        .await
        .expect("count dead letters")
}

/// A group that records each `Tick`'s effect with the delivery attempt. When `hold` is
/// set, the first call sends its backend pid on `held` and waits for `go` before
/// returning, with its effect written and not committed.
fn recording(
    service: &EventService,
    settings: ConsumerSettings,
    hold: Option<(mpsc::UnboundedSender<i32>, Arc<Notify>)>,
) -> ConsumerBuilder {
    let first = Arc::new(AtomicBool::new(true));
    service
        .consumer("outage")
        .settings(settings)
        .on_tx::<Tick, _>(move |tx, received| {
            let hold = hold.clone();
            let first = first.clone();
            Box::pin(async move {
                let backend: i32 = sqlx::query_scalar(
                    "INSERT INTO outage_effects (counter, attempt, backend) \
                     VALUES ($1, $2, pg_backend_pid()) RETURNING backend",
                )
                .bind(i64::try_from(received.event.counter)?)
                .bind(i32::try_from(received.envelope.attempt)?)
                .fetch_one(&mut *tx)
                .await?;
                if let Some((held, go)) = hold {
                    if first.swap(false, Ordering::SeqCst) {
                        held.send(backend)?;
                        go.notified().await;
                    }
                }
                Ok(())
            })
        })
}

/// The connection is killed after the handler ran and before the commit: the commit
/// fails, which is not the handler's failure. With `max_deliveries` 1 this used to
/// dead-letter the event (and its effect was rolled back: lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_cut_by_a_killed_connection_is_retried_not_dead_lettered() {
    let env = TestEnv::new().await;
    let service = env.service_with(suite_config(&env)).await;
    let check = direct_pool(&env).await;
    create_table(&check).await;
    let relay = service.start_relay().await.expect("the relay starts");
    let (held_tx, mut held) = mpsc::unbounded_channel();
    let go = Arc::new(Notify::new());
    let consumer = recording(&service, settings(1), Some((held_tx, go.clone())))
        .start()
        .await
        .expect("start the consumer");
    service
        .emit(Tick {
            writer: 0,
            counter: 1,
        })
        .await
        .expect("emit");
    let backend = tokio::time::timeout(WAIT, held.recv())
        .await
        .expect("the handler runs")
        .expect("the handler sends its backend");
    let terminated: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(backend)
        .fetch_one(&check)
        .await
        .expect("terminate the handler's backend");
    assert!(terminated, "backend {backend} terminated");
    wait_for(WAIT, "the handler's backend to be gone", || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM pg_stat_activity WHERE pid = $1")
            .bind(backend)
            .fetch_one(&check)
            .await
            .expect("look for the backend")
            == 0
    })
    .await;
    go.notify_one();
    wait_for(WAIT, "the event to be handled or dead-lettered", || async {
        consumer.handled() == 1 || consumer.dead_lettered() > 0
    })
    .await;
    assert_eq!(
        consumer.dead_lettered(),
        0,
        "a lost connection is no failed delivery"
    );
    assert_eq!(dead_letters(&check).await, 0);
    assert_eq!(
        effects(&check).await,
        vec![(1, 1)],
        "applied once, by a retry that does not count as a second delivery"
    );
    consumer.shutdown().await.expect("consumer shutdown");
    relay.shutdown().await.expect("relay shutdown");
}

/// Postgres unreachable for the consumer (connections reset, new ones refused) for
/// many more tries than `max_deliveries`: the event waits in its lane, with progress
/// sent, and is handled on its first delivery once Postgres is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_unreachable_for_many_tries_uses_up_no_delivery() {
    let env = TestEnv::new().await;
    let service = env.service_with(suite_config(&env)).await;
    let check = direct_pool(&env).await;
    create_table(&check).await;
    let relay = service.start_relay().await.expect("the relay starts");

    let proxy = FaultProxy::start(postgres_addr(&env)).await;
    let via = database_url_via(&env, proxy.addr());
    let config = config_via(&env, &via, &env.nats_url)
        .connect_timeout(Duration::from_millis(500))
        .build()
        .expect("valid config");
    let consumer_service = EventService::connect(config)
        .await
        .expect("connect through the proxy");
    let consumer = recording(&consumer_service, settings(2), None)
        .start()
        .await
        .expect("start the consumer");
    let tick = |counter| Tick { writer: 0, counter };
    service.emit(tick(1)).await.expect("emit");
    wait_for(WAIT, "the first event to be handled", || async {
        consumer.handled() == 1
    })
    .await;

    proxy.refuse(true);
    proxy.reset_all();
    let refused_before = proxy.stats().refused;
    service.emit(tick(2)).await.expect("emit");
    wait_for(
        WAIT,
        "the consumer to fail to reach Postgres many times",
        || async { proxy.stats().refused >= refused_before + 10 },
    )
    .await;
    assert_eq!(
        consumer.handled(),
        1,
        "nothing handled while Postgres is away"
    );
    proxy.refuse(false);

    wait_for(WAIT, "the second event to be handled", || async {
        consumer.handled() == 2 || consumer.dead_lettered() > 0
    })
    .await;
    assert_eq!(consumer.dead_lettered(), 0);
    assert_eq!(dead_letters(&check).await, 0);
    assert_eq!(
        effects(&check).await,
        vec![(1, 1), (2, 1)],
        "each applied once, on its first delivery: the outage used up none"
    );
    consumer.shutdown().await.expect("consumer shutdown");
    relay.shutdown().await.expect("relay shutdown");
}
