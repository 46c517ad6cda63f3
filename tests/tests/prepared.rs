//! Two-phase commit: an orphaned prepared transaction that holds outbox events must not
//! slow the relay down for good. Needs `max_prepared_transactions` > 0, which the
//! machine's shared Postgres does not set: the test starts its own server.

use edupulse_events::{DomainEvent, EventState, RelaySettings};
use edupulse_events_tests::{shared_nats_url, wait_for, PgServer, TestEnv};
use serde::{Deserialize, Serialize};
use sqlx::{Connection, PgConnection};
use std::time::Duration;

#[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
#[event(name = "grade.recorded")]
struct GradeRecorded {
    n: u32,
}

const LIMIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn an_orphaned_prepared_transaction_is_waited_for_once_not_at_every_fence() {
    let Some(server) = PgServer::start(&["max_prepared_transactions=10"]).await else {
        return;
    };
    let env = TestEnv::with_servers(server.admin_url(), shared_nats_url()).await;
    // Postgres refuses PREPARE after NOTIFY: two-phase commit needs notify(false).
    let service = env
        .service_with(env.config().notify(false).relay(RelaySettings {
            order_wait_limit: LIMIT,
            ..TestEnv::fast_relay()
        }))
        .await;

    // An application prepares a transaction with an event, and never finishes it.
    let mut orphan = PgConnection::connect(&env.database_url).await.unwrap();
    sqlx::raw_sql("BEGIN").execute(&mut orphan).await.unwrap();
    let orphaned = service
        .emit_in(&mut orphan, GradeRecorded { n: 0 })
        .await
        .unwrap();
    sqlx::raw_sql("PREPARE TRANSACTION 'edupulse_orphan'")
        .execute(&mut orphan)
        .await
        .unwrap();

    let relay = service.start_relay().await.expect("the relay starts");
    // The first fence waits for it (it might still commit), up to order_wait_limit.
    let first = service.emit(GradeRecorded { n: 1 }).await.unwrap();
    wait_for(
        LIMIT * 3,
        "the first event past the prepared transaction",
        || async { service.event_state(first).await.unwrap() == Some(EventState::Published) },
    )
    .await;

    // A writer in flight when a fence is read: the relay waits for it, and only for
    // it; its event goes out as soon as it commits, not order_wait_limit later.
    let mut tx = service.pool().begin().await.unwrap();
    let second = service
        .emit_in(&mut tx, GradeRecorded { n: 2 })
        .await
        .unwrap();
    let watch = sqlx::PgPool::connect(&env.database_url).await.unwrap();
    wait_for(LIMIT, "the relay to wait for the open writer", || async {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND query LIKE '%virtualtransaction = ANY%'
               AND query NOT LIKE '%pg_stat_activity%'",
        )
        .fetch_one(&watch)
        .await
        .unwrap();
        waiting > 0
    })
    .await;
    tx.commit().await.unwrap();
    wait_for(
        LIMIT / 2,
        "the writer's event, well before order_wait_limit",
        || async { service.event_state(second).await.unwrap() == Some(EventState::Published) },
    )
    .await;
    assert_eq!(service.event_state(orphaned).await.unwrap(), None);

    sqlx::raw_sql("ROLLBACK PREPARED 'edupulse_orphan'")
        .execute(&watch)
        .await
        .unwrap();
    relay.shutdown().await.unwrap();
}
