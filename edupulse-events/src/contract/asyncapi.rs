//! The service's AsyncAPI 3.0 document, built from the registry and its config.

use super::schema::{schema_of_type, EventSchema};
use crate::{headers, registry, Config, EventType};
use serde_json::{json, Map, Value};

/// The `schemaFormat` of the payloads: JSON Schema draft-07, which schemars writes and
/// the AsyncAPI parser reads.
const PAYLOAD_FORMAT: &str = "application/schema+json;version=draft-07";

/// The AsyncAPI 3.0 document of the events this program sends, as JSON.
///
/// Built from every registered event type ([`registry`]) and the service's `config`
/// (subject prefix, stream, source); `api_version` is the document's `info.version`,
/// e.g. `env!("CARGO_PKG_VERSION")`.
///
/// - One channel per subject: its address is `{prefix}.{subject template}`, with a
///   parameter for each `{field}` placeholder.
/// - One message per event type, `{name}.v{version}`: its payload is the type's JSON
///   Schema (draft-07) where the type has one (`#[event(..., schema)]`), and its
///   headers are the CloudEvents NATS binding's `ce-` headers the relay sends.
/// - One `send` operation per event type.
///
/// The document names no server: the NATS URL is deployment detail and may hold
/// credentials. Write it to a file with `serde_json::to_string_pretty`.
///
/// ```no_run
/// use edupulse_events::{contract, Config};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let config = Config::from_env()?;
/// let document = contract::asyncapi(&config, env!("CARGO_PKG_VERSION"));
/// std::fs::write("asyncapi.json", serde_json::to_string_pretty(&document)?)?;
/// # Ok(())
/// # }
/// # use edupulse_events::serde_json;
/// ```
pub fn asyncapi(config: &Config, api_version: &str) -> Value {
    let mut channels = Map::new();
    let mut operations = Map::new();
    let mut messages = Map::new();
    let mut schemas = Map::new();
    for event_type in registry().iter() {
        let message_id = format!("{}.v{}", event_type.name(), event_type.version());
        let channel_id = key(event_type.subject_template());
        let schema = schema_of_type(event_type);
        messages.insert(
            message_id.clone(),
            message(event_type, schema, &message_id, &mut schemas),
        );
        let channel = channels.entry(channel_id.clone()).or_insert_with(|| {
            channel(
                config.subject_prefix(),
                event_type.subject_template(),
                event_type.name(),
            )
        });
        if let Some(list) = channel.get_mut("messages").and_then(Value::as_object_mut) {
            list.insert(
                message_id.clone(),
                json!({ "$ref": format!("#/components/messages/{message_id}") }),
            );
        }
        operations.insert(
            format!("send.{message_id}"),
            json!({
                "action": "send",
                "title": format!("Send {} v{}", event_type.name(), event_type.version()),
                "summary": format!(
                    "{} emits `{}` (version {}) through its outbox; the relay publishes it.",
                    config.source(),
                    event_type.name(),
                    event_type.version()
                ),
                "channel": { "$ref": format!("#/channels/{channel_id}") },
                "messages": [
                    { "$ref": format!("#/channels/{channel_id}/messages/{message_id}") }
                ],
            }),
        );
    }
    let mut components = Map::new();
    components.insert("messages".to_owned(), Value::Object(messages));
    if !schemas.is_empty() {
        components.insert("schemas".to_owned(), Value::Object(schemas));
    }
    json!({
        "asyncapi": "3.0.0",
        "info": {
            "title": config.source(),
            "version": api_version,
            "description": format!(
                "The domain events that {} publishes on NATS JetStream (stream `{}`, \
                 subjects `{}.>`), in the CloudEvents NATS binding: the payload is the \
                 event as JSON, the CloudEvents attributes are `ce-` headers.",
                config.source(),
                config.stream(),
                config.subject_prefix()
            ),
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": components,
    })
}

/// A key the AsyncAPI document accepts (`^[A-Za-z0-9._-]+$`).
fn key(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn channel(prefix: &str, template: &str, name: &str) -> Value {
    let mut parameters = Map::new();
    for token in template.split('.') {
        if let Some(field) = token.strip_prefix('{').and_then(|t| t.strip_suffix('}')) {
            parameters.insert(
                field.to_owned(),
                json!({
                    "description": format!(
                        "The event's `{field}` field, as text (one subject token)."
                    ),
                }),
            );
        }
    }
    let mut channel = json!({
        "address": format!("{prefix}.{template}"),
        "title": format!("{name}"),
        "messages": {},
    });
    if !parameters.is_empty() {
        channel["parameters"] = Value::Object(parameters);
    }
    channel
}

fn message(
    event_type: &EventType,
    schema: Option<&EventSchema>,
    message_id: &str,
    schemas: &mut Map<String, Value>,
) -> Value {
    let mut message = json!({
        "name": event_type.name(),
        "title": format!("{} v{}", event_type.name(), event_type.version()),
        "summary": format!("Rust type `{}`.", event_type.type_name()),
        "contentType": "application/json",
        "headers": header_schema(event_type, schema),
        "correlationId": {
            "description": "The correlation id shared by the events of one request.",
            "location": format!("$message.header#/{}", headers::CORRELATION_ID),
        },
    });
    if let Some(schema) = schema {
        let mut payload = schema.schema();
        lift_definitions(&mut payload, message_id, schemas);
        message["payload"] = json!({ "schemaFormat": PAYLOAD_FORMAT, "schema": payload });
    } else {
        message["description"] = Value::String(
            "No payload schema: the event type has none (add `schema` to its \
             `#[event(...)]` and derive `JsonSchema`)."
                .to_owned(),
        );
    }
    message
}

/// Moves a schema's `definitions` (left by recursive types) to the document's
/// `components/schemas`, as `{message_id}.{name}`, and points its `$ref`s there: a
/// `#/definitions/...` reference inside the document would resolve from its root.
fn lift_definitions(schema: &mut Value, message_id: &str, schemas: &mut Map<String, Value>) {
    let Some(Value::Object(definitions)) = schema
        .as_object_mut()
        .and_then(|map| map.remove("definitions"))
    else {
        return;
    };
    let rename = |name: &str| format!("{message_id}.{}", key(name));
    let mut lifted: Vec<(String, Value)> = definitions
        .into_iter()
        .map(|(name, definition)| (rename(&name), definition))
        .collect();
    for (_, definition) in &mut lifted {
        point_refs(definition, &rename);
    }
    point_refs(schema, &rename);
    schemas.extend(lifted);
}

fn point_refs(value: &mut Value, rename: &dyn Fn(&str) -> String) {
    match value {
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                match v {
                    Value::String(target) if k == "$ref" => {
                        if let Some(name) = target.strip_prefix("#/definitions/") {
                            *target = format!("#/components/schemas/{}", rename(name));
                        }
                    }
                    other => point_refs(other, rename),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| point_refs(v, rename)),
        _ => {}
    }
}

/// The headers the relay sends with every message of `event_type`, as a JSON Schema.
fn header_schema(event_type: &EventType, schema: Option<&EventSchema>) -> Value {
    let text = |description: &str| json!({ "type": "string", "description": description });
    let fixed = |value: String, description: &str| json!({ "type": "string", "const": value, "description": description });
    let uuid = |description: &str| json!({ "type": "string", "format": "uuid", "description": description });
    let mut properties = Map::new();
    let mut required: Vec<&str> = vec![
        headers::SPEC_VERSION,
        headers::ID,
        headers::TYPE,
        headers::SOURCE,
        headers::TIME,
        headers::VERSION,
        headers::SUBJECT,
        headers::DATA_CONTENT_TYPE,
        headers::CONTENT_TYPE,
        headers::MSG_ID,
    ];
    properties.insert(
        headers::SPEC_VERSION.into(),
        fixed("1.0".into(), "CloudEvents `specversion`."),
    );
    properties.insert(
        headers::ID.into(),
        uuid("CloudEvents `id`: the event's id (UUID v7), unique per event."),
    );
    properties.insert(
        headers::TYPE.into(),
        fixed(
            event_type.name().into(),
            "CloudEvents `type`: the event name.",
        ),
    );
    properties.insert(
        headers::SOURCE.into(),
        text("CloudEvents `source`: the emitting service (percent-encoded)."),
    );
    properties.insert(
        headers::TIME.into(),
        json!({
            "type": "string",
            "format": "date-time",
            "description": "CloudEvents `time`: when the event occurred (RFC 3339).",
        }),
    );
    properties.insert(
        headers::VERSION.into(),
        fixed(
            event_type.version().to_string(),
            "Extension attribute `eventversion`: the payload's schema version.",
        ),
    );
    properties.insert(
        headers::SUBJECT.into(),
        text("CloudEvents `subject`: the subject without the prefix (percent-encoded)."),
    );
    properties.insert(
        headers::DATA_CONTENT_TYPE.into(),
        fixed("application/json".into(), "CloudEvents `datacontenttype`."),
    );
    if let Some(schema) = schema {
        required.push(headers::DATA_SCHEMA);
        properties.insert(
            headers::DATA_SCHEMA.into(),
            fixed(
                schema.id(),
                "CloudEvents `dataschema`: the id (`$id`) of the payload's schema.",
            ),
        );
    }
    properties.insert(
        headers::CONTENT_TYPE.into(),
        fixed("application/json".into(), "The payload's media type."),
    );
    properties.insert(
        headers::MSG_ID.into(),
        uuid("JetStream's de-duplication id: the event id."),
    );
    properties.insert(
        headers::CORRELATION_ID.into(),
        uuid("Extension attribute `correlationid`: the request's correlation id."),
    );
    properties.insert(
        headers::CAUSATION_ID.into(),
        uuid("Extension attribute `causationid`: the id of the event that caused this one."),
    );
    properties.insert(
        headers::TRACEPARENT.into(),
        text("W3C trace context, when the emitter had one."),
    );
    json!({ "type": "object", "properties": properties, "required": required })
}
