//! The CloudEvents NATS binding to the letter: every attribute a `ce-` header
//! (`ce-datacontenttype` too), values percent-encoded, decoded once by readers: ours,
//! and the Python CloudEvents SDK's (`tests/python/read_cloudevents.py`).

use edupulse_events::{headers, DomainEvent, Received};
use edupulse_events_tests::{header, wait_for, TestEnv};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[event(name = "lesson.published")]
struct LessonPublished {
    lesson_id: i64,
    title: String,
}

/// A source with a space, quotes, a percent sign and non-ASCII letters.
const SOURCE: &str = "École numérique \"main\" 100%";
const SOURCE_ON_THE_WIRE: &str = "%C3%89cole%20num%C3%A9rique%20%22main%22%20100%25";
const WAIT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn attributes_travel_percent_encoded_and_every_reader_decodes_them_once() {
    let env = TestEnv::new().await;
    let service = env.service_with(env.config().source(SOURCE)).await;
    let relay = service.start_relay().await.expect("the relay starts");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    let consumer = service
        .consumer("readers")
        .on(move |received: Received<LessonPublished>| {
            let sink = sink.clone();
            async move {
                sink.lock().unwrap().push(received.envelope.source.clone());
                Ok(())
            }
        })
        .start()
        .await
        .expect("start");
    let ids = service
        .emit_all((1..=2).map(|lesson_id| LessonPublished {
            lesson_id,
            title: format!("Leçon {lesson_id} — « ownership »"),
        }))
        .await
        .expect("emit");
    wait_for(WAIT, "both events handled", || async {
        seen.lock().unwrap().len() == 2
    })
    .await;
    // Our reader decodes.
    assert_eq!(*seen.lock().unwrap(), vec![SOURCE.to_owned(); 2]);
    consumer.shutdown().await.expect("consumer");
    relay.shutdown().await.expect("relay");

    // On the wire, as the binding says.
    let js = env.jetstream().await;
    let messages = env.stream_messages(&js).await;
    assert_eq!(messages.len(), 2);
    for message in &messages {
        assert_eq!(header(message, headers::SOURCE), SOURCE_ON_THE_WIRE);
        assert_eq!(
            header(message, headers::DATA_CONTENT_TYPE),
            "application/json"
        );
        assert_eq!(header(message, headers::CONTENT_TYPE), "application/json");
    }

    // Another language's reader: the Python CloudEvents SDK.
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/read_cloudevents.py");
    let output = match std::process::Command::new("python3")
        .args([script, env.nats_url.as_str(), env.stream.as_str(), "2"])
        .output()
    {
        Ok(output) => output,
        Err(error) => {
            eprintln!("SKIPPED the Python reader: python3 cannot run ({error})");
            return;
        }
    };
    if output.status.code() == Some(3) {
        eprintln!(
            "SKIPPED the Python reader: {} (pip install cloudevents nats-py)",
            String::from_utf8_lossy(&output.stderr).trim()
        );
        return;
    }
    assert!(
        output.status.success(),
        "the Python reader failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let read: Vec<serde_json::Value> = String::from_utf8(output.stdout)
        .expect("UTF-8")
        .lines()
        .map(|line| serde_json::from_str(line).expect("one JSON object per line"))
        .collect();
    assert_eq!(read.len(), 2);
    for (event, id) in read.iter().zip(&ids) {
        assert_eq!(event["id"], id.to_string());
        assert_eq!(event["type"], "lesson.published");
        assert_eq!(event["source"], SOURCE, "{event}");
        assert_eq!(event["raw_source"], SOURCE_ON_THE_WIRE);
        assert_eq!(event["datacontenttype"], "application/json");
        assert_eq!(event["raw_datacontenttype"], "application/json");
        assert_eq!(event["eventversion"], "1");
        assert_eq!(event["subject"], "lesson.published");
    }
    assert_eq!(read[0]["data"]["title"], "Leçon 1 — « ownership »");
}
