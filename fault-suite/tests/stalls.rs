//! Connections that go silent (stalled, not reset): the library's own statements have
//! client-side deadlines, so a relay on a stalled Postgres connection lets go of the
//! lead and stops when asked, instead of hanging for ever.

use edupulse_events::{DomainEvent, EventState, RelaySettings};
use edupulse_events_tests::{wait_for, TestEnv};
use edupulse_fault_suite::proxy::{Direction, FaultProxy};
use edupulse_fault_suite::workload::{
    config_via, database_url_via, direct_pool, leader, postgres_addr,
};
use serde::{Deserialize, Serialize};
use std::time::Duration;
use uuid::Uuid;

#[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
#[event(name = "stall.event")]
struct StallEvent {
    counter: u32,
}

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_whose_postgres_connection_stalls_lets_go_and_stops_when_asked() {
    let env = TestEnv::new().await;
    let proxy = FaultProxy::start(postgres_addr(&env)).await;
    let via = database_url_via(&env, proxy.addr());
    let settings = RelaySettings {
        statement_timeout: Duration::from_secs(2),
        ..TestEnv::fast_relay()
    };
    let stalled_service = env
        .service_with(config_via(&env, &via, &env.nats_url).relay(settings.clone()))
        .await;
    let direct = env.service_with(env.config().relay(settings)).await;
    let pool = direct_pool(&env).await;

    let mut ids: Vec<Uuid> = vec![direct.emit(StallEvent { counter: 0 }).await.unwrap()];
    let stalled = stalled_service
        .start_relay()
        .await
        .expect("the relay starts");
    wait_for(
        WAIT,
        "the relay behind the proxy to lead and publish",
        || async {
            stalled.is_leader()
                && direct.event_state(ids[0]).await.unwrap() == Some(EventState::Published)
        },
    )
    .await;
    let standby = direct.start_relay().await.expect("the relay starts");

    // Bytes stop both ways; the connections stay open. The server ends the leader's
    // session (as it does when its keepalives find the peer gone), which frees the lock.
    proxy.stall(Direction::Both);
    let (pid, _) = leader(&pool).await.expect("a leader");
    let terminated: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(terminated);
    for counter in 1..=20 {
        ids.push(direct.emit(StallEvent { counter }).await.unwrap());
    }
    wait_for(WAIT, "the standby to take over and publish", || async {
        direct.outbox_status().await.unwrap().pending == 0
    })
    .await;
    assert!(standby.is_leader());
    // The stalled relay's statement hit its deadline: it no longer claims the lead,
    // and a shutdown returns while the stall lasts.
    wait_for(WAIT, "the stalled relay to let go", || async {
        !stalled.is_leader()
    })
    .await;
    // It says why it was not publishing (its Postgres connection), and did not panic.
    match tokio::time::timeout(Duration::from_secs(15), stalled.shutdown())
        .await
        .expect("a stalled relay stops when asked")
    {
        Ok(()) | Err(edupulse_events::RelayError::Failing(_)) => {}
        Err(error) => panic!("the stalled relay ended badly: {error}"),
    }
    proxy.release();
    standby.shutdown().await.unwrap();
    let js = env.jetstream().await;
    assert_eq!(
        env.stream_ids(&js).await,
        ids,
        "each event once, in sequence order"
    );
}
