//! Contracts for other teams (feature `schema`): the JSON Schema of each event type, the
//! AsyncAPI 3.0 document (checked by the official parser, `tests/asyncapi`), the
//! schema-file check, and `ce-dataschema` on the wire.

use edupulse_events::contract::{self, CheckMode, ContractError, Outcome};
use edupulse_events::schemars::{self, JsonSchema};
use edupulse_events::serde_json::{self, json, Value};
use edupulse_events::{headers, Config, DomainEvent};
use edupulse_events_tests::{header, unique, wait_for, TestEnv};
use serde::{Deserialize, Serialize};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, DomainEvent)]
#[event(
    name = "lesson.published",
    subject = "lesson.{course_id}.published",
    schema
)]
struct LessonPublished {
    /// The course the lesson belongs to.
    course_id: u64,
    title: String,
    note: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
enum Grade {
    Pass,
    Fail,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
struct Answer {
    question: u32,
    text: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, DomainEvent)]
#[event(
    name = "quiz.graded",
    version = 2,
    subject = "quiz.{quiz_id}.{grade_kind}.graded",
    schema
)]
struct QuizGraded {
    quiz_id: uuid::Uuid,
    grade_kind: String,
    grade: Grade,
    answers: Vec<Answer>,
}

/// A recursive payload: its schema keeps `$ref`s to its own definitions.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
struct Topic {
    name: String,
    children: Vec<Topic>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, DomainEvent)]
#[event(name = "syllabus.changed", schema)]
struct SyllabusChanged {
    root: Topic,
}

/// A type without a schema: in the document, without a payload.
#[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
#[event(name = "audit.logged")]
struct AuditLogged {
    line: String,
}

fn config() -> Config {
    Config::builder("postgres://unused@127.0.0.1/unused")
        .subject_prefix("acme.learning")
        .source("grading-service")
        .build()
        .expect("a valid config")
}

#[test]
fn each_type_that_opts_in_has_a_draft_07_schema_with_its_id() {
    let all: Vec<(&str, u32)> = contract::schemas()
        .iter()
        .map(|s| (s.name(), s.version()))
        .collect();
    assert_eq!(
        all,
        [
            ("lesson.published", 1),
            ("quiz.graded", 2),
            ("syllabus.changed", 1)
        ]
    );
    assert!(contract::schema_of::<AuditLogged>().is_none());
    let lesson = contract::schema_of::<LessonPublished>().expect("opted in");
    assert_eq!(lesson.id(), "urn:edupulse:lesson.published:v1");
    let schema = lesson.schema();
    assert_eq!(schema["$id"], "urn:edupulse:lesson.published:v1");
    assert_eq!(schema["$schema"], "http://json-schema.org/draft-07/schema#");
    assert_eq!(schema["required"], json!(["course_id", "title"]));
    assert_eq!(
        schema["properties"]["note"]["type"],
        json!(["string", "null"])
    );
    assert_eq!(
        schema["properties"]["course_id"]["description"],
        "The course the lesson belongs to."
    );
    // Subschemas are inlined: the schema stands alone.
    let quiz = contract::schema_of::<QuizGraded>()
        .expect("opted in")
        .schema();
    assert!(quiz.get("definitions").is_none(), "{quiz}");
    assert_eq!(quiz["properties"]["grade"]["enum"], json!(["Pass", "Fail"]));
    assert_eq!(
        quiz["properties"]["answers"]["items"]["required"],
        json!(["question", "text"])
    );
}

#[test]
fn the_asyncapi_document_describes_channels_messages_and_send_operations() {
    let document = contract::asyncapi(&config(), "1.2.3");
    assert_eq!(document["asyncapi"], "3.0.0");
    assert_eq!(document["info"]["title"], "grading-service");
    assert_eq!(document["info"]["version"], "1.2.3");

    let channel = &document["channels"]["quiz._quiz_id_._grade_kind_.graded"];
    assert_eq!(
        channel["address"],
        "acme.learning.quiz.{quiz_id}.{grade_kind}.graded"
    );
    let parameters: Vec<&String> = channel["parameters"]
        .as_object()
        .expect("parameters")
        .keys()
        .collect();
    assert_eq!(parameters, ["grade_kind", "quiz_id"]);
    assert_eq!(
        channel["messages"]["quiz.graded.v2"]["$ref"],
        "#/components/messages/quiz.graded.v2"
    );
    assert!(document["channels"]["audit.logged"]
        .get("parameters")
        .is_none());

    let operation = &document["operations"]["send.quiz.graded.v2"];
    assert_eq!(operation["action"], "send");
    assert_eq!(
        operation["channel"]["$ref"],
        "#/channels/quiz._quiz_id_._grade_kind_.graded"
    );
    assert_eq!(
        operation["messages"][0]["$ref"],
        "#/channels/quiz._quiz_id_._grade_kind_.graded/messages/quiz.graded.v2"
    );
    assert_eq!(document["operations"].as_object().map(|o| o.len()), Some(4));

    let message = &document["components"]["messages"]["quiz.graded.v2"];
    assert_eq!(
        message["payload"]["schemaFormat"],
        "application/schema+json;version=draft-07"
    );
    assert_eq!(
        message["payload"]["schema"],
        contract::schema_of::<QuizGraded>()
            .expect("opted in")
            .schema()
    );
    let header_schema = &message["headers"];
    assert_eq!(
        header_schema["properties"][headers::TYPE]["const"],
        "quiz.graded"
    );
    assert_eq!(header_schema["properties"][headers::VERSION]["const"], "2");
    assert_eq!(
        header_schema["properties"][headers::DATA_SCHEMA]["const"],
        "urn:edupulse:quiz.graded:v2"
    );
    let required = header_schema["required"].as_array().expect("required");
    for name in [
        headers::ID,
        headers::SOURCE,
        headers::TIME,
        headers::DATA_SCHEMA,
    ] {
        assert!(required.contains(&json!(name)), "{name} is required");
    }
    // Without a schema: no payload, no ce-dataschema.
    let audit = &document["components"]["messages"]["audit.logged.v1"];
    assert!(audit.get("payload").is_none());
    assert!(audit["headers"]["properties"]
        .get(headers::DATA_SCHEMA)
        .is_none());
    // A recursive type's definitions move to components/schemas.
    let syllabus = &document["components"]["messages"]["syllabus.changed.v1"]["payload"]["schema"];
    assert!(syllabus.get("definitions").is_none(), "{syllabus}");
    assert_eq!(
        syllabus["properties"]["root"]["properties"]["children"]["items"]["$ref"],
        "#/components/schemas/syllabus.changed.v1.Topic"
    );
    assert_eq!(
        document["components"]["schemas"]["syllabus.changed.v1.Topic"]["properties"]["children"]
            ["items"]["$ref"],
        "#/components/schemas/syllabus.changed.v1.Topic"
    );
}

/// How the official parser judged a document: `None` when it cannot run here.
fn parser_verdict(document: &Value) -> Option<(bool, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("asyncapi");
    if Command::new("node").arg("--version").output().is_err() {
        eprintln!("SKIPPED the AsyncAPI parser: node is not installed");
        return None;
    }
    if !dir.join("node_modules/@asyncapi/parser").is_dir() {
        let install = Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&dir)
            .output();
        match install {
            Ok(output) if output.status.success() => {}
            Ok(output) => {
                eprintln!(
                    "SKIPPED the AsyncAPI parser: `npm install` in {} failed: {}",
                    dir.display(),
                    String::from_utf8_lossy(&output.stderr).trim()
                );
                return None;
            }
            Err(error) => {
                eprintln!("SKIPPED the AsyncAPI parser: npm cannot run ({error})");
                return None;
            }
        }
    }
    let mut child = Command::new("node")
        .arg(dir.join("validate.mjs"))
        .current_dir(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node starts");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(document.to_string().as_bytes())
        .expect("the document is sent to node");
    let output = child.wait_with_output().expect("node finishes");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    match output.status.code() {
        Some(0) => Some((true, said)),
        Some(1) => Some((false, said)),
        Some(3) => {
            eprintln!("SKIPPED the AsyncAPI parser: {said}");
            None
        }
        other => panic!("validate.mjs failed ({other:?}): {said}"),
    }
}

#[test]
fn the_official_asyncapi_parser_accepts_the_document_and_rejects_a_broken_one() {
    let document = contract::asyncapi(&config(), "1.2.3");
    let Some((valid, said)) = parser_verdict(&document) else {
        return;
    };
    assert!(valid, "the AsyncAPI parser rejects the document:\n{said}");
    eprintln!("the parser's remarks:\n{said}");

    // The same check fails on a document that breaks the spec.
    let mut broken = document.clone();
    broken["operations"]["send.quiz.graded.v2"]["action"] = json!("publish");
    let (valid, said) = parser_verdict(&broken).expect("the parser ran just before");
    assert!(
        !valid,
        "the parser accepted an operation with action `publish`"
    );
    assert!(said.contains("action"), "{said}");
}

fn temp_dir() -> PathBuf {
    std::env::temp_dir().join(format!("edupulse-schemas-{}", unique()))
}

fn read(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("file")).expect("JSON")
}

fn write(path: &Path, schema: &Value) {
    std::fs::write(path, serde_json::to_string_pretty(schema).expect("JSON")).expect("write");
}

#[test]
fn the_contract_check_writes_new_schemas_and_fails_on_a_breaking_change() {
    let dir = temp_dir();
    let lesson_file = dir.join("lesson.published.v1.json");
    let current = contract::schema_of::<LessonPublished>()
        .expect("opted in")
        .schema();

    // First run: every schema is written.
    let report = contract::check_schemas_in(&dir, CheckMode::Check).expect("first run");
    assert_eq!(report.files.len(), 3);
    assert!(
        report.files.iter().all(|f| f.outcome == Outcome::Created),
        "{report}"
    );
    assert_eq!(read(&lesson_file), current);
    assert!(dir.join("quiz.graded.v2.json").is_file());
    // Second run: nothing changed.
    let report = contract::check_schemas_in(&dir, CheckMode::Check).expect("second run");
    assert!(
        report.files.iter().all(|f| f.outcome == Outcome::Unchanged),
        "{report}"
    );

    // The published schema had a required `teacher` the type no longer has: removed.
    let mut published = current.clone();
    published["properties"]["teacher"] = json!({ "type": "string" });
    published["required"] = json!(["course_id", "teacher", "title"]);
    write(&lesson_file, &published);
    let error = contract::check_schemas_in(&dir, CheckMode::Check).expect_err("a break");
    let message = error.to_string();
    assert!(
        matches!(&error, ContractError::Incompatible(list) if list.len() == 1),
        "{message}"
    );
    assert!(
        message.contains("`lesson.published` version 1"),
        "{message}"
    );
    assert!(
        message.contains("`$.teacher`: property removed"),
        "{message}"
    );
    assert!(message.contains("EDUPULSE_SCHEMAS=overwrite"), "{message}");
    assert_eq!(read(&lesson_file), published, "the published file is kept");

    // Accepting it overwrites the file.
    let report = contract::check_schemas_in(&dir, CheckMode::Overwrite).expect("overwrite");
    assert!(report
        .files
        .iter()
        .any(|f| matches!(f.outcome, Outcome::Overwritten(_))));
    assert_eq!(read(&lesson_file), current);

    // The published schema lacked the optional `note`: added, compatible, file updated.
    let mut published = current.clone();
    published["properties"]
        .as_object_mut()
        .expect("properties")
        .remove("note");
    write(&lesson_file, &published);
    let report = contract::check_schemas_in(&dir, CheckMode::Check).expect("compatible");
    let lesson = report
        .files
        .iter()
        .find(|f| f.name == "lesson.published")
        .expect("reported");
    assert!(
        matches!(&lesson.outcome, Outcome::Updated(changes) if changes.len() == 1),
        "{report}"
    );
    assert_eq!(read(&lesson_file), current);

    // A file no type has is reported, not touched; a file that is not JSON fails.
    write(&dir.join("lesson.archived.v1.json"), &json!({}));
    let report = contract::check_schemas_in(&dir, CheckMode::Check).expect("runs");
    assert_eq!(report.unregistered, [dir.join("lesson.archived.v1.json")]);
    std::fs::write(&lesson_file, "{ not json").expect("write");
    let error = contract::check_schemas_in(&dir, CheckMode::Check).expect_err("not JSON");
    assert!(matches!(error, ContractError::Json { .. }), "{error}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn messages_of_a_type_with_a_schema_carry_ce_dataschema() {
    let env = TestEnv::new().await;
    let service = env.service().await;
    let relay = service.start_relay().await.expect("the relay starts");
    service
        .emit(LessonPublished {
            course_id: 7,
            title: "Ownership".into(),
            note: None,
        })
        .await
        .expect("emit");
    service
        .emit(AuditLogged { line: "x".into() })
        .await
        .expect("emit");
    let js = env.jetstream().await;
    wait_for(Duration::from_secs(30), "both events published", || async {
        env.stream_len(&js).await == 2
    })
    .await;
    relay.shutdown().await.expect("relay");
    let messages = env.stream_messages(&js).await;
    let by_type = |name: &str| {
        messages
            .iter()
            .find(|m| header(m, headers::TYPE) == name)
            .unwrap_or_else(|| panic!("a {name} message"))
    };
    assert_eq!(
        header(by_type("lesson.published"), headers::DATA_SCHEMA),
        "urn:edupulse:lesson.published:v1"
    );
    let audit = by_type("audit.logged");
    assert!(audit
        .headers
        .as_ref()
        .and_then(|h| h.get(headers::DATA_SCHEMA))
        .is_none());
}
