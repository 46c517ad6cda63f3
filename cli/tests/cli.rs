//! The `edupulse` binary against the real Postgres and NATS, as an operator runs it:
//! each test gets its own database, stream and prefix (`TestEnv`), a service emits
//! events (with or without its relay and consumers), and the command's exit code and
//! output (JSON parsed with serde_json) are checked.

use assert_cmd::Command;
use edupulse_events::{ConsumerSettings, DomainEvent, EventService, HandlerError, Received};
use edupulse_events_tests::{wait_for, TestEnv};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[event(name = "lesson.published")]
pub struct LessonPublished {
    pub lesson_id: i64,
}

const WAIT: Duration = Duration::from_secs(30);

/// The binary, with no settings from the environment of the test run.
fn edupulse() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_edupulse"));
    for var in [
        "DATABASE_URL",
        "NATS_URL",
        "EDUPULSE_STREAM",
        "EDUPULSE_SUBJECT_PREFIX",
    ] {
        command.env_remove(var);
    }
    command.timeout(Duration::from_secs(60));
    command
}

/// The binary pointed at the test's database, NATS, stream and prefix.
fn cli(env: &TestEnv) -> Command {
    let mut command = edupulse();
    command
        .env("DATABASE_URL", &env.database_url)
        .env("NATS_URL", &env.nats_url)
        .args(["--stream", &env.stream, "--prefix", &env.prefix]);
    command
}

/// Runs `args` with `--json`, expects exit 0, and parses stdout.
fn json(env: &TestEnv, args: &[&str]) -> Value {
    let output = cli(env)
        .arg("--json")
        .args(args)
        .output()
        .expect("run edupulse");
    assert!(
        output.status.success(),
        "edupulse {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
        panic!(
            "edupulse {args:?} printed no JSON ({error}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

/// Runs `args` and returns (exit code, stdout, stderr).
fn run(env: &TestEnv, args: &[&str]) -> (i32, String, String) {
    let output = cli(env).args(args).output().expect("run edupulse");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn fast() -> ConsumerSettings {
    ConsumerSettings {
        retry_base: Duration::from_millis(20),
        retry_max: Duration::from_millis(200),
        ack_wait: Duration::from_secs(2),
        shutdown_timeout: Duration::from_secs(10),
        ..ConsumerSettings::default()
    }
}

async fn pending(service: &EventService) -> i64 {
    service.outbox_status().await.unwrap().pending
}

#[test]
fn a_usage_error_exits_2() {
    let output = edupulse()
        .args(["status", "--no-such-flag"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let output = edupulse()
        .args([
            "--database-url",
            "postgres://x@127.0.0.1/x",
            "outbox",
            "requeue",
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "requeue needs --all or --id");
    let output = edupulse()
        .args(["dead-letters", "list", "g", "--reason", "bogus"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let output = edupulse()
        .args(["status", "--max-age", "30s"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "--max-age needs --check");
}

#[test]
fn every_command_has_help() {
    for args in [
        &["--help"][..],
        &["status", "--help"],
        &["explain", "--help"],
        &["outbox", "dead", "--help"],
        &["outbox", "requeue", "--help"],
        &["consumers", "--help"],
        &["dead-letters", "list", "--help"],
        &["dead-letters", "purge", "--help"],
        &["dead-letters", "replay", "--help"],
        &["migrate", "--help"],
    ] {
        let output = edupulse().args(args).output().unwrap();
        assert_eq!(output.status.code(), Some(0), "{args:?}");
        assert!(
            String::from_utf8_lossy(&output.stdout).contains("Usage: edupulse"),
            "{args:?}"
        );
    }
}

#[test]
fn a_postgres_connection_error_is_one_line_without_the_password() {
    let output = edupulse()
        .args([
            "--database-url",
            "postgres://postgres:hunter2secret@127.0.0.1:1/app",
            "status",
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("error: cannot connect to Postgres"),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2secret"), "{stderr}");
    assert!(!String::from_utf8_lossy(&output.stdout).contains("hunter2secret"));
    let output = edupulse().arg("status").output().unwrap();
    assert_eq!(output.status.code(), Some(1), "no database URL");
    assert!(String::from_utf8_lossy(&output.stderr).contains("DATABASE_URL"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_connection_error_is_one_line_without_the_password() {
    let env = TestEnv::new().await;
    let _service = env.service().await;
    let output = cli(&env)
        .args([
            "--nats-url",
            "nats://ops:natssecret@127.0.0.1:1",
            "consumers",
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("error: cannot connect to NATS"),
        "{stderr}"
    );
    assert!(!stderr.contains("natssecret"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_creates_the_tables_that_status_reads() {
    let env = TestEnv::new().await;
    let (code, _, stderr) = run(&env, &["status"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("edupulse migrate"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    let migrated = json(&env, &["migrate"]);
    assert_eq!(migrated["migrated"], true);
    // Again: nothing to do, still success.
    assert_eq!(run(&env, &["migrate"]).0, 0);
    let status = json(&env, &["status"]);
    assert_eq!(status["pending"], 0);
    assert_eq!(status["dead"], 0);
    assert_eq!(status["published_through"], 0);
    assert!(status["leader"].is_null());
    assert!(status["behind"].is_null());
    // No service has created the stream yet: said, not fatal.
    assert!(status["stream"]["error"]
        .as_str()
        .is_some_and(|e| e.contains("does not exist")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_why_the_relay_is_behind_and_check_exits_1() {
    let env = TestEnv::new().await;
    let service = env.service().await;
    let first = service
        .emit(LessonPublished { lesson_id: 1 })
        .await
        .unwrap();
    service
        .emit(LessonPublished { lesson_id: 2 })
        .await
        .unwrap();

    let status = json(&env, &["status"]);
    assert_eq!(status["pending"], 2);
    assert!(status["leader"].is_null());
    assert_eq!(status["stream"]["last_sequence"], 0);
    let behind = status["behind"].as_str().expect("a reason");
    assert!(behind.starts_with("no relay leads"), "{behind}");
    assert!(status["oldest_pending_age_secs"].as_f64().is_some());

    // Healthy by the age limit, unhealthy past it.
    assert_eq!(run(&env, &["status", "--check", "--max-age", "1h"]).0, 0);
    let (code, stdout, stderr) = run(&env, &["status", "--check", "--max-age", "0s"]);
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(stderr.contains("check failed"), "{stderr}");
    assert!(stdout.contains("2 pending"), "{stdout}");

    // Explain says what the pending event waits for.
    let explained = json(&env, &["explain", &first.to_string()]);
    assert_eq!(explained["state"], "pending");
    assert!(explained["waits_for"]
        .as_str()
        .is_some_and(|w| w.contains("none leads")));

    let relay = service.start_relay().await.unwrap();
    wait_for(WAIT, "the relay to publish both", || async {
        pending(&service).await == 0
    })
    .await;
    let status = json(&env, &["status"]);
    assert_eq!(status["pending"], 0);
    assert!(status["behind"].is_null());
    assert_eq!(status["stream"]["last_sequence"], 2);
    assert!(status["published_through"].as_i64().is_some_and(|p| p >= 2));
    let leader = &status["leader"];
    assert_eq!(leader["application_name"], "edupulse-tests");
    assert_eq!(leader["host"], "127.0.0.1");
    assert!(leader["pid"].as_i64().is_some_and(|pid| pid > 0));
    assert!(leader["since"].as_str().is_some());
    assert_eq!(run(&env, &["status", "--check", "--max-age", "30s"]).0, 0);
    let (code, stdout, _) = run(&env, &["status"]);
    assert_eq!(code, 0);
    assert!(stdout.contains("relay:     led by pid"), "{stdout}");
    relay.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_names_a_failing_publish() {
    let env = TestEnv::new().await;
    let service = env.service().await;
    service
        .emit(LessonPublished { lesson_id: 1 })
        .await
        .unwrap();
    // What the relay records when JetStream refuses a publish and it will try again.
    sqlx::query(
        "UPDATE edupulse.outbox SET attempts = 3, last_error = 'no responders',
                next_attempt_at = now() + interval '1 hour'",
    )
    .execute(service.pool())
    .await
    .unwrap();
    let relay = service.start_relay().await.unwrap();
    wait_for(WAIT, "a leader", || async {
        !json(&env, &["status"])["leader"].is_null()
    })
    .await;
    let status = json(&env, &["status"]);
    let behind = status["behind"].as_str().expect("a reason");
    assert!(
        behind.starts_with("publishing fails: no responders"),
        "{behind}"
    );
    relay.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_names_a_writer_holding_an_earlier_sequence() {
    let env = TestEnv::new().await;
    let service = env.service().await;
    // A transaction takes sequence 1 and stays open; sequence 2 commits.
    let mut tx = service.pool().begin().await.unwrap();
    service
        .emit_in(&mut tx, LessonPublished { lesson_id: 1 })
        .await
        .unwrap();
    let later = service
        .emit(LessonPublished { lesson_id: 2 })
        .await
        .unwrap();
    let relay = service.start_relay().await.unwrap();
    wait_for(WAIT, "a leader", || async {
        !json(&env, &["status"])["leader"].is_null()
    })
    .await;
    let status = json(&env, &["status"]);
    assert_eq!(status["pending"], 1);
    let behind = status["behind"].as_str().expect("a reason");
    assert!(
        behind.starts_with("a writer holds an earlier sequence"),
        "{behind}"
    );
    let explained = json(&env, &["explain", &later.to_string()]);
    assert_eq!(explained["state"], "pending");
    assert!(
        explained["waits_for"]
            .as_str()
            .is_some_and(|w| w.contains("a writer")),
        "{explained}"
    );
    tx.commit().await.unwrap();
    wait_for(WAIT, "both to be published", || async {
        pending(&service).await == 0
    })
    .await;
    assert!(json(&env, &["status"])["behind"].is_null());
    relay.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_dead_lists_and_requeue_puts_back() {
    let env = TestEnv::new().await;
    let service = env.service().await;
    let doomed = service
        .emit(LessonPublished { lesson_id: 1 })
        .await
        .unwrap();
    let other = service
        .emit(LessonPublished { lesson_id: 2 })
        .await
        .unwrap();
    // What the relay writes when JetStream rejects an event for good.
    sqlx::query(
        "UPDATE edupulse.outbox SET status = 'dead', attempts = 5,
                last_error = 'maximum payload exceeded' WHERE id = $1",
    )
    .bind(doomed)
    .execute(service.pool())
    .await
    .unwrap();

    let dead = json(&env, &["outbox", "dead"]);
    let dead = dead.as_array().expect("a list");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["id"], doomed.to_string());
    assert_eq!(dead[0]["attempts"], 5);
    assert_eq!(dead[0]["last_error"], "maximum payload exceeded");
    assert_eq!(dead[0]["name"], "lesson.published");
    assert_eq!(
        json(&env, &["outbox", "dead", "--limit", "0"]),
        Value::Array(vec![])
    );

    let (code, _, stderr) = run(&env, &["status", "--check"]);
    assert_eq!(code, 1, "a dead event fails the check");
    assert!(stderr.contains("1 dead events"), "{stderr}");

    let explained = json(&env, &["explain", &doomed.to_string()]);
    assert_eq!(explained["state"], "dead");
    assert_eq!(explained["event"]["last_error"], "maximum payload exceeded");
    assert_eq!(explained["event"]["attempts"], 5);

    // Requeuing another (not dead) id changes nothing.
    let requeued = json(&env, &["outbox", "requeue", "--id", &other.to_string()]);
    assert_eq!(requeued["requeued"], 0);
    let requeued = json(&env, &["outbox", "requeue", "--id", &doomed.to_string()]);
    assert_eq!(requeued["requeued"], 1);
    assert_eq!(json(&env, &["outbox", "dead"]), Value::Array(vec![]));
    assert_eq!(json(&env, &["status"])["pending"], 2);
    assert_eq!(json(&env, &["outbox", "requeue", "--all"])["requeued"], 0);
    assert_eq!(run(&env, &["status", "--check"]).0, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_consumers_and_dead_letters_follow_an_event_through_the_groups() {
    let env = TestEnv::new().await;
    let service = env.service().await;
    let relay = service.start_relay().await.unwrap();
    // `grading` handles it in a transaction (inbox); `billing`'s handler fails, and
    // with one delivery allowed it is dead-lettered (handler_failed).
    let grading = service
        .consumer("grading")
        .settings(fast())
        .on_tx::<LessonPublished, _>(|_tx, _received| Box::pin(async { Ok(()) }))
        .start()
        .await
        .unwrap();
    let billing = service
        .consumer("billing")
        .settings(fast())
        .max_deliveries(1)
        .on(|_received: Received<LessonPublished>| async {
            Err::<(), HandlerError>("the ledger is closed".into())
        })
        .start()
        .await
        .unwrap();
    let id = service
        .emit(LessonPublished { lesson_id: 7 })
        .await
        .unwrap();
    wait_for(WAIT, "grading to handle it", || async {
        grading.handled() == 1
    })
    .await;
    wait_for(WAIT, "billing to dead-letter it", || async {
        billing.dead_lettered() == 1
    })
    .await;

    let explained = json(&env, &["explain", &id.to_string()]);
    assert_eq!(explained["state"], "published");
    assert_eq!(explained["stream_sequence"], 1);
    let groups = explained["groups"].as_array().expect("groups");
    let fate = |name: &str| {
        groups
            .iter()
            .find(|g| g["group"] == name)
            .unwrap_or_else(|| panic!("no group {name} in {groups:?}"))
            .clone()
    };
    assert_eq!(fate("grading")["state"], "handled");
    assert_eq!(fate("billing")["state"], "dead_lettered");
    assert!(fate("billing")["detail"]
        .as_str()
        .is_some_and(|d| d.contains("handler_failed") && d.contains("the ledger is closed")));
    let (code, text, _) = run(&env, &["explain", &id.to_string()]);
    assert_eq!(code, 0);
    assert!(text.contains("published as stream sequence 1"), "{text}");
    assert!(text.contains("group grading: handled"), "{text}");

    // Both groups acknowledged everything: no lag; billing has one dead letter.
    wait_for(WAIT, "both groups to have acknowledged", || async {
        let groups = json(&env, &["consumers"]);
        groups.as_array().is_some_and(|list| {
            list.len() == 2 && list.iter().all(|g| g["lag"] == 0 && g["durable"] == true)
        })
    })
    .await;
    let groups = json(&env, &["consumers"]);
    let list = groups.as_array().expect("a list");
    assert_eq!(list[0]["group"], "billing");
    assert_eq!(list[0]["dead_letters"], 1);
    assert_eq!(list[1]["group"], "grading");
    assert_eq!(list[1]["dead_letters"], 0);
    assert_eq!(list[1]["pending"], 0);
    assert_eq!(list[1]["ack_pending"], 0);
    assert!(list[1]["redelivered"].as_u64().is_some());

    let letters = json(&env, &["dead-letters", "list", "billing"]);
    let letters = letters.as_array().expect("a list");
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0]["reason"], "handler_failed");
    assert_eq!(letters[0]["deliveries"], 1);
    assert_eq!(letters[0]["event_id"], id.to_string());
    assert_eq!(letters[0]["stream_sequence"], 1);
    assert_eq!(letters[0]["event_name"], "lesson.published");
    let none = json(
        &env,
        &["dead-letters", "list", "billing", "--reason", "undecodable"],
    );
    assert_eq!(none, Value::Array(vec![]));
    assert_eq!(
        json(&env, &["dead-letters", "list", "grading"]),
        Value::Array(vec![])
    );

    // Replay hands the letter back to billing alone; its handler still fails, so it
    // stays a dead letter, with one replay counted.
    let asked = json(&env, &["dead-letters", "replay", "billing", "--all"]);
    assert_eq!(asked["replay_requested"], 1);
    wait_for(Duration::from_secs(30), "billing's replay", || async {
        json(&env, &["dead-letters", "list", "billing"])[0]["replays"] == 1
    })
    .await;
    let letters = json(&env, &["dead-letters", "list", "billing"]);
    assert_eq!(letters[0]["replayed_at"], Value::Null);
    assert_eq!(
        json(&env, &["dead-letters", "replay", "grading", "--all"])["replay_requested"],
        0
    );

    // Purge removes only what is older than the limit.
    let purged = json(
        &env,
        &["dead-letters", "purge", "billing", "--older-than", "30d"],
    );
    assert_eq!(purged["purged"], 0);
    sqlx::query("UPDATE edupulse.dead_letters SET created_at = now() - interval '31 days'")
        .execute(service.pool())
        .await
        .unwrap();
    let purged = json(
        &env,
        &["dead-letters", "purge", "grading", "--older-than", "30d"],
    );
    assert_eq!(purged["purged"], 0, "another group's letters stay");
    let purged = json(
        &env,
        &["dead-letters", "purge", "billing", "--older-than", "30d"],
    );
    assert_eq!(purged["purged"], 1);
    assert_eq!(
        json(&env, &["dead-letters", "list", "billing"]),
        Value::Array(vec![])
    );

    // A group that is down falls behind: lag in events and in time; explain says the
    // event has not reached it.
    grading.shutdown().await.unwrap();
    let later = service
        .emit(LessonPublished { lesson_id: 8 })
        .await
        .unwrap();
    wait_for(WAIT, "the relay to publish it", || async {
        service.outbox_status().await.unwrap().pending == 0
    })
    .await;
    let groups = json(&env, &["consumers"]);
    let grading_row = groups
        .as_array()
        .and_then(|list| list.iter().find(|g| g["group"] == "grading"))
        .expect("grading is listed")
        .clone();
    assert_eq!(grading_row["lag"], 1, "{grading_row}");
    assert!(
        grading_row["lag_secs"].as_f64().is_some_and(|s| s >= 0.0),
        "{grading_row}"
    );
    let explained = json(&env, &["explain", &later.to_string()]);
    assert_eq!(explained["stream_sequence"], 2);
    let groups = explained["groups"].as_array().expect("groups");
    let grading_fate = groups
        .iter()
        .find(|g| g["group"] == "grading")
        .expect("grading");
    // Not delivered, or delivered to a pull request left open when it stopped, but
    // not handled.
    assert!(
        grading_fate["state"] == "not_delivered" || grading_fate["state"] == "delivered",
        "{explained}"
    );
    billing.shutdown().await.unwrap();
    relay.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_finds_lost_duplicated_and_stuck_events() {
    let env = TestEnv::new().await;
    let service = env.service().await;
    let relay = service.start_relay().await.unwrap();
    let grading = service
        .consumer("grading")
        .settings(fast())
        .on_tx::<LessonPublished, _>(|_tx, _received| Box::pin(async { Ok(()) }))
        .start()
        .await
        .unwrap();
    let mut ids = Vec::new();
    for lesson_id in 0..3 {
        ids.push(service.emit(LessonPublished { lesson_id }).await.unwrap());
    }
    wait_for(WAIT, "grading to handle all three", || async {
        grading.handled() == 3
    })
    .await;
    wait_for(WAIT, "grading to acknowledge all three", || async {
        json(&env, &["consumers"])[0]["lag"] == 0
    })
    .await;
    let report = json(&env, &["audit", "--since", "1h"]);
    assert_eq!(report["checked"], 3);
    for field in ["lost", "duplicated", "out_of_order", "stuck"] {
        assert_eq!(report[field], Value::Array(vec![]), "{field}: {report}");
    }
    assert_eq!(report["inbox_missing"], serde_json::json!({}));
    // Not the last on its subject: explain finds it by reading the stream.
    let explained = json(&env, &["explain", &ids[0].to_string()]);
    assert_eq!(explained["state"], "published");
    assert_eq!(explained["stream_sequence"], 1);
    assert!(explained["stream_time"].as_str().is_some(), "{explained}");
    assert!(
        explained["outbox_secs"].as_f64().is_some_and(|s| s >= 0.0),
        "{explained}"
    );
    assert_eq!(explained["groups"][0]["group"], "grading");
    assert_eq!(explained["groups"][0]["state"], "handled");
    let explained = json(&env, &["explain", &ids[2].to_string()]);
    assert_eq!(explained["stream_sequence"], 3);
    relay.shutdown().await.unwrap();

    // A copy of the second event under another message id: JetStream keeps it.
    let js = env.jetstream().await;
    let mut headers = edupulse_events::async_nats::HeaderMap::new();
    headers.insert("ce-id", ids[1].to_string().as_str());
    headers.insert("Nats-Msg-Id", "a-copy");
    js.publish_with_headers(
        format!("{}.lesson.published", env.prefix),
        headers,
        "{}".into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    // An event marked published that never reached the stream, and one still pending.
    let lost = service
        .emit(LessonPublished { lesson_id: 10 })
        .await
        .unwrap();
    sqlx::query(
        "UPDATE edupulse.outbox SET status = 'published', published_at = now() WHERE id = $1",
    )
    .bind(lost)
    .execute(service.pool())
    .await
    .unwrap();
    let stuck = service
        .emit(LessonPublished { lesson_id: 11 })
        .await
        .unwrap();
    // The inbox row of the first event disappears.
    sqlx::query("DELETE FROM edupulse.inbox WHERE event_id = $1")
        .bind(ids[0])
        .execute(service.pool())
        .await
        .unwrap();

    let output = cli(&env)
        .args(["--json", "audit", "--since", "1h", "--stuck-after", "0s"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["checked"], 4);
    assert_eq!(report["lost"], serde_json::json!([lost.to_string()]));
    assert_eq!(
        report["duplicated"],
        serde_json::json!([ids[1].to_string()])
    );
    assert_eq!(report["out_of_order"], Value::Array(vec![]));
    assert_eq!(report["stuck"], serde_json::json!([stuck.to_string()]));
    assert_eq!(
        report["inbox_missing"],
        serde_json::json!({ "grading": [ids[0].to_string()] })
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("audit found 1 lost, 1 duplicated"),
        "{stderr}"
    );
    grading.shutdown().await.unwrap();
}
