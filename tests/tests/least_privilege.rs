//! Each part of the library runs under a role that has only the grants of
//! `edupulse_events::grants_sql()`: the migrator creates the schema, the writer emits
//! and reads the status, the relay publishes, the consumer handles (and emits from its
//! handler); a writer may call `migrate` at start-up once everything is applied.

use edupulse_events::{grants_sql, DomainEvent, EventService, EventState, Requeue};
use edupulse_events_tests::{unique, wait_for, TestEnv};
use serde::{Deserialize, Serialize};
use sqlx::{AssertSqlSafe, Connection, PgConnection};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
#[event(name = "quiz.submitted")]
pub struct QuizSubmitted {
    pub quiz_id: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
#[event(name = "quiz.graded")]
pub struct QuizGraded {
    pub quiz_id: i64,
}

/// This test's roles: the four of grants.sql under unique names (roles are shared by
/// every database of the server), and a login role for each.
struct Roles {
    suffix: String,
}

impl Roles {
    fn group(&self, part: &str) -> String {
        format!("edupulse_{part}_{}", self.suffix)
    }
    fn login(&self, part: &str) -> String {
        format!("login_{part}_{}", self.suffix)
    }
    /// grants.sql with this test's role names.
    fn grants(&self) -> String {
        ["migrator", "writer", "relay", "consumer"]
            .into_iter()
            .fold(grants_sql().to_owned(), |sql, part| {
                sql.replace(&format!("edupulse_{part}"), &self.group(part))
            })
    }
    fn url(&self, env: &TestEnv, part: &str) -> String {
        env.database_url.replacen(
            "postgres://postgres@",
            &format!("postgres://{}@", self.login(part)),
            1,
        )
    }
}

async fn run(conn: &mut PgConnection, sql: String) {
    sqlx::raw_sql(AssertSqlSafe(sql.clone()))
        .execute(conn)
        .await
        .unwrap_or_else(|e| panic!("{e}: {sql}"));
}

async fn service_as(env: &TestEnv, roles: &Roles, part: &str) -> EventService {
    let config = edupulse_events::Config::builder(roles.url(env, part))
        .nats_url(&env.nats_url)
        .subject_prefix(&env.prefix)
        .stream(&env.stream)
        .source("edupulse-tests")
        .relay(TestEnv::fast_relay());
    EventService::connect(config.build().unwrap())
        .await
        .unwrap_or_else(|e| panic!("connect as {part}: {e}"))
}

#[tokio::test]
async fn each_part_runs_with_only_its_grants() {
    let env = TestEnv::new().await;
    let roles = Roles { suffix: unique() };
    let mut admin = env.connect().await;
    let grants = roles.grants();
    // The roles first (the DO block), then a login role for each part.
    let (create_roles, _) = grants
        .split_once("GRANT USAGE ON SCHEMA")
        .expect("grants.sql creates the roles first");
    run(&mut admin, create_roles.to_owned()).await;
    for part in ["migrator", "writer", "relay", "consumer"] {
        run(
            &mut admin,
            format!(
                "CREATE ROLE {login} LOGIN; GRANT {group} TO {login};",
                login = roles.login(part),
                group = roles.group(part)
            ),
        )
        .await;
    }
    // The migrator's login acts as the group, so the schema belongs to the group.
    run(
        &mut admin,
        format!(
            "ALTER ROLE {} SET role = '{}'",
            roles.login("migrator"),
            roles.group("migrator")
        ),
    )
    .await;
    let migrator = service_as(&env, &roles, "migrator").await;
    migrator
        .migrate()
        .await
        .expect("the migrator creates the schema");
    run(&mut admin, grants.clone()).await;
    // The application's own table, which the consumer's handler writes.
    run(
        &mut admin,
        format!(
            "CREATE TABLE graded (quiz_id BIGINT PRIMARY KEY);
             GRANT SELECT, INSERT ON graded TO {};",
            roles.group("consumer")
        ),
    )
    .await;

    // The writer: migrate at start-up (nothing to do), emit, read the status.
    let writer = service_as(&env, &roles, "writer").await;
    writer
        .migrate()
        .await
        .expect("migrate is a no-op for the writer");
    let first = writer
        .emit(QuizSubmitted { quiz_id: 1 })
        .await
        .expect("emit");
    writer
        .emit_all((2..=3).map(|quiz_id| QuizSubmitted { quiz_id }))
        .await
        .expect("emit_all");
    // What the emitter's waker runs, as the emitting role, after an `emit_in`.
    sqlx::query("SELECT edupulse.wake_after('{}'::int4[], 100)")
        .execute(writer.pool())
        .await
        .expect("the writer may run the waker's function");
    let status = writer.outbox_status().await.expect("status");
    assert_eq!(status.pending, 3);
    assert_eq!(
        writer.event_state(first).await.unwrap(),
        Some(EventState::Pending)
    );
    assert!(writer.dead_events(10).await.unwrap().is_empty());

    // The relay publishes, and may requeue.
    let relay_service = service_as(&env, &roles, "relay").await;
    relay_service
        .migrate()
        .await
        .expect("migrate is a no-op for the relay");
    let relay = relay_service.start_relay().await.expect("the relay starts");
    wait_for(WAIT, "the relay to publish under its role", || async {
        writer.outbox_status().await.unwrap().pending == 0
    })
    .await;
    assert_eq!(relay_service.requeue_dead(Requeue::All).await.unwrap(), 0);

    // The consumer handles in its transaction, writes the app's table and emits.
    let consumer_service = service_as(&env, &roles, "consumer").await;
    consumer_service
        .migrate()
        .await
        .expect("migrate is a no-op for the consumer");
    let emitter = consumer_service.clone();
    let consumer = consumer_service
        .consumer("grading")
        .on_tx::<QuizSubmitted, _>(move |tx, received| {
            let emitter = emitter.clone();
            Box::pin(async move {
                sqlx::query("INSERT INTO graded (quiz_id) VALUES ($1)")
                    .bind(received.event.quiz_id)
                    .execute(&mut *tx)
                    .await?;
                emitter
                    .emit_in(
                        tx,
                        QuizGraded {
                            quiz_id: received.event.quiz_id,
                        },
                    )
                    .await?;
                Ok(())
            })
        })
        .on::<QuizGraded, _, _>(|received| async move {
            if received.event.quiz_id == 3 {
                return Err("refused".into());
            }
            Ok(())
        })
        .max_deliveries(1)
        .start()
        .await
        .expect("the consumer starts under its role");
    wait_for(
        WAIT,
        "three events handled and one dead-lettered",
        || async {
            let graded: i64 = sqlx::query_scalar("SELECT count(*) FROM graded")
                .fetch_one(&mut PgConnection::connect(&env.database_url).await.unwrap())
                .await
                .unwrap();
            graded == 3
                && consumer_service
                    .dead_letters("grading", 10)
                    .await
                    .unwrap()
                    .len()
                    == 1
        },
    )
    .await;
    consumer.shutdown().await.unwrap();
    relay.shutdown().await.unwrap();

    // What a role was not given, it cannot do.
    let denied = writer
        .requeue_dead(Requeue::All)
        .await
        .expect_err("writer may not requeue");
    assert!(denied.to_string().contains("permission denied"), "{denied}");

    drop((writer, relay_service, consumer_service, migrator));
    let logins: Vec<String> = ["migrator", "writer", "relay", "consumer"]
        .iter()
        .map(|part| roles.login(part))
        .collect();
    let groups: Vec<String> = ["migrator", "writer", "relay", "consumer"]
        .iter()
        .map(|part| roles.group(part))
        .collect();
    let all = [logins, groups].concat().join(", ");
    let _ = sqlx::raw_sql(AssertSqlSafe(format!("DROP OWNED BY {all} CASCADE")))
        .execute(&mut admin)
        .await;
    drop(admin);
    drop(env);
    if let Ok(mut server) = PgConnection::connect(&edupulse_events_tests::admin_url()).await {
        let _ = sqlx::raw_sql(AssertSqlSafe(format!("DROP ROLE IF EXISTS {all}")))
            .execute(&mut server)
            .await;
    }
}
