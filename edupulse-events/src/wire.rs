//! The message a relay publishes: subject, JSON body, and headers in the CloudEvents
//! NATS binary binding, so a consumer in any language can read it without this crate.
//!
//! As the binding says, every attribute is a `ce-` header (`datacontenttype` too), and
//! attribute values are percent-encoded: a space, `"`, `%` and every character outside
//! U+0021-U+007E become `%XX` of their UTF-8 bytes, upper-case hex ([`encode_value`]);
//! readers decode once ([`decode_value`]).

use std::borrow::Cow;

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use uuid::Uuid;

/// Header names of a published event, and the binding's value encoding.
pub mod headers {
    pub use super::{decode_value, encode_value};

    /// CloudEvents spec version, always `1.0`.
    pub const SPEC_VERSION: &str = "ce-specversion";
    /// The event id (UUID v7), also the `Nats-Msg-Id`.
    pub const ID: &str = "ce-id";
    /// The event name, e.g. `lesson.published`.
    pub const TYPE: &str = "ce-type";
    /// The emitting service.
    pub const SOURCE: &str = "ce-source";
    /// When the event occurred, RFC 3339.
    pub const TIME: &str = "ce-time";
    /// The event's schema version (a CloudEvents extension attribute).
    pub const VERSION: &str = "ce-eventversion";
    /// The correlation id (extension attribute).
    pub const CORRELATION_ID: &str = "ce-correlationid";
    /// The causation id (extension attribute).
    pub const CAUSATION_ID: &str = "ce-causationid";
    /// The subject relative to the prefix (CloudEvents `subject`).
    pub const SUBJECT: &str = "ce-subject";
    /// The CloudEvents `datacontenttype`, always `application/json`; the NATS binding
    /// carries it as a `ce-` header like every other attribute.
    pub const DATA_CONTENT_TYPE: &str = "ce-datacontenttype";
    /// The CloudEvents `dataschema`: the id of the payload's JSON Schema, e.g.
    /// `urn:edupulse:lesson.published:v1`; sent when the `schema` feature is on and the
    /// event type has a schema (`#[event(..., schema)]`).
    pub const DATA_SCHEMA: &str = "ce-dataschema";
    /// Also `application/json`, for readers that look for the HTTP-style header.
    pub const CONTENT_TYPE: &str = "Content-Type";
    /// JetStream's de-duplication id: the event id.
    pub const MSG_ID: &str = "Nats-Msg-Id";
    /// W3C trace context, when the emitter had one.
    pub const TRACEPARENT: &str = "traceparent";
}

/// What a message's headers are built from; one outbox row.
#[derive(Debug, Clone)]
pub(crate) struct Outbound<'a> {
    pub id: Uuid,
    pub name: &'a str,
    pub version: i32,
    pub subject: &'a str,
    pub source: &'a str,
    pub occurred_at: OffsetDateTime,
    pub correlation_id: Option<Uuid>,
    pub causation_id: Option<Uuid>,
    pub traceparent: Option<&'a str>,
}

/// The most the relay's chain header can add to a message: `Nats-Expected-Last-Msg-Id`
/// naming the previous event's id (a UUID, 36 characters); the alternative,
/// `Nats-Expected-Last-Sequence` with a 20-digit number, is shorter.
pub(crate) const CHAIN_HEADER_WIRE_LEN: usize = "Nats-Expected-Last-Msg-Id".len() + 2 + 36 + 2;

impl Outbound<'_> {
    /// Calls `f` with each header, in order, as (name, value), building no strings
    /// but the time's: the ids and the version are written into stack buffers.
    fn each_header<E>(
        &self,
        mut f: impl FnMut(&'static str, &str) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut id = Uuid::encode_buffer();
        let id = self.id.hyphenated().encode_lower(&mut id);
        let time = self
            .occurred_at
            .format(&Rfc3339)
            .unwrap_or_else(|_| self.occurred_at.unix_timestamp().to_string());
        let mut version = [0u8; 12];
        let version = format_i32(self.version, &mut version);
        f(headers::SPEC_VERSION, "1.0")?;
        f(headers::ID, id)?;
        f(headers::TYPE, &encode_value(self.name))?;
        f(headers::SOURCE, &encode_value(self.source))?;
        f(headers::TIME, &time)?;
        f(headers::VERSION, version)?;
        f(headers::SUBJECT, &encode_value(self.subject))?;
        f(headers::DATA_CONTENT_TYPE, "application/json")?;
        if let Some(schema) = dataschema(self.name, self.version) {
            f(headers::DATA_SCHEMA, &encode_value(schema))?;
        }
        f(headers::CONTENT_TYPE, "application/json")?;
        f(headers::MSG_ID, id)?;
        let mut other = Uuid::encode_buffer();
        if let Some(correlation) = self.correlation_id {
            f(
                headers::CORRELATION_ID,
                correlation.hyphenated().encode_lower(&mut other),
            )?;
        }
        if let Some(causation) = self.causation_id {
            f(
                headers::CAUSATION_ID,
                causation.hyphenated().encode_lower(&mut other),
            )?;
        }
        if let Some(traceparent) = self.traceparent {
            f(headers::TRACEPARENT, traceparent)?;
        }
        Ok(())
    }

    /// The headers, in order, as (name, value).
    #[cfg(test)]
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        let _ = self.each_header(|name, value| {
            out.push((name, value.to_owned()));
            Ok::<(), ()>(())
        });
        out
    }

    /// The size of the header block on the wire (`NATS/1.0\r\n`, `name: value\r\n`
    /// each, and the closing `\r\n`), which counts against the server's max_payload,
    /// with room for the chain header the relay adds ([`CHAIN_HEADER_WIRE_LEN`]).
    pub fn headers_wire_len(&self) -> usize {
        let mut lines = 0;
        let _ = self.each_header(|name, value| {
            lines += name.len() + 2 + value.len() + 2;
            Ok::<(), ()>(())
        });
        "NATS/1.0\r\n".len() + lines + CHAIN_HEADER_WIRE_LEN + 2
    }

    /// The headers as an async-nats map.
    ///
    /// # Errors
    /// [`HeaderError`] for a value NATS cannot carry (a line break).
    pub fn header_map(&self) -> Result<async_nats::HeaderMap, HeaderError> {
        let mut map = async_nats::HeaderMap::new();
        self.each_header(|name, value| {
            if value.contains(['\r', '\n']) {
                return Err(HeaderError { name });
            }
            // Checked above, so the conversion cannot panic; a static name is not
            // copied.
            map.insert(
                async_nats::header::HeaderName::from_static(name),
                async_nats::HeaderValue::from(value.to_owned()),
            );
            Ok(())
        })?;
        Ok(map)
    }
}

/// The `dataschema` of a message: its type's schema id, where it has one.
#[cfg(feature = "schema")]
fn dataschema(name: &str, version: i32) -> Option<&'static str> {
    crate::contract::dataschema(name, version)
}

/// Without the `schema` feature no type has a schema.
#[cfg(not(feature = "schema"))]
fn dataschema(_name: &str, _version: i32) -> Option<&'static str> {
    None
}

/// Whether the NATS binding has a value's byte percent-encoded: a space, `"`, `%`, and
/// anything outside U+0021-U+007E (so every byte of a non-ASCII character).
fn must_encode(byte: u8) -> bool {
    !(0x21..=0x7E).contains(&byte) || byte == b'"' || byte == b'%'
}

/// A CloudEvents attribute value as the NATS binding carries it in a header:
/// percent-encoded, upper-case hex, over its UTF-8 bytes. Borrowed when nothing needs
/// encoding (the common case).
pub fn encode_value(value: &str) -> Cow<'_, str> {
    if !value.bytes().any(must_encode) {
        return Cow::Borrowed(value);
    }
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(value.len() * 3);
    for byte in value.bytes() {
        if must_encode(byte) {
            out.push('%');
            out.push(char::from(HEX[usize::from(byte >> 4)]));
            out.push(char::from(HEX[usize::from(byte & 0x0F)]));
        } else {
            out.push(char::from(byte));
        }
    }
    Cow::Owned(out)
}

/// A header value decoded once from the binding's percent-encoding. A `%` not followed
/// by two hex digits is kept as it is, and so is the whole value if its decoded bytes
/// are not UTF-8 (a reader must not fail on another publisher's header).
pub fn decode_value(value: &str) -> Cow<'_, str> {
    if !value.contains('%') {
        return Cow::Borrowed(value);
    }
    let hex = |b: u8| char::from(b).to_digit(16).map(|d| d as u8);
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        if bytes[at] == b'%' && at + 2 < bytes.len() {
            if let (Some(high), Some(low)) = (hex(bytes[at + 1]), hex(bytes[at + 2])) {
                out.push(high << 4 | low);
                at += 3;
                continue;
            }
        }
        out.push(bytes[at]);
        at += 1;
    }
    match String::from_utf8(out) {
        Ok(decoded) => Cow::Owned(decoded),
        Err(_) => Cow::Borrowed(value),
    }
}

/// A header value that NATS cannot carry: it holds a line break.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("header {name} has a value NATS cannot carry (a line break)")]
pub(crate) struct HeaderError {
    /// The header's name.
    pub name: &'static str,
}

/// Writes `value` in decimal into `buf` (12 bytes hold any i32) and returns it.
fn format_i32(value: i32, buf: &mut [u8; 12]) -> &str {
    let mut at = buf.len();
    let mut rest = value.unsigned_abs();
    loop {
        at -= 1;
        buf[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    if value < 0 {
        at -= 1;
        buf[at] = b'-';
    }
    std::str::from_utf8(&buf[at..]).unwrap_or("0")
}

/// Checks a W3C `traceparent`: `00-{32 hex}-{16 hex}-{2 hex}`, lowercase.
pub(crate) fn valid_traceparent(value: &str) -> bool {
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    parts.len() == 4
        && hex(parts[0], 2)
        && parts[0] != "ff"
        && hex(parts[1], 32)
        && parts[1].bytes().any(|b| b != b'0')
        && hex(parts[2], 16)
        && parts[2].bytes().any(|b| b != b'0')
        && hex(parts[3], 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_follow_the_cloudevents_binding() {
        let id = Uuid::now_v7();
        let envelope = Outbound {
            id,
            name: "lesson.published",
            version: 2,
            subject: "lesson.published",
            source: "svc",
            occurred_at: OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap(),
            correlation_id: None,
            causation_id: None,
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        };
        let headers = envelope.headers();
        let get = |n: &str| {
            headers
                .iter()
                .find(|(k, _)| *k == n)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("ce-specversion"), Some("1.0"));
        assert_eq!(get("ce-id"), Some(id.to_string().as_str()));
        assert_eq!(get("Nats-Msg-Id"), Some(id.to_string().as_str()));
        assert_eq!(get("ce-type"), Some("lesson.published"));
        assert_eq!(get("ce-time"), Some("2023-11-14T22:13:20Z"));
        assert_eq!(get("ce-eventversion"), Some("2"));
        assert_eq!(get("Content-Type"), Some("application/json"));
        assert!(get("ce-correlationid").is_none());
        let map = envelope.header_map().unwrap();
        assert_eq!(map.len(), headers.len());
        let wire: usize = headers
            .iter()
            .map(|(k, v)| k.len() + v.len() + 4)
            .sum::<usize>()
            + 12
            + CHAIN_HEADER_WIRE_LEN;
        assert_eq!(envelope.headers_wire_len(), wire);
        // What the relay sends with the chain header fits in what emit counted.
        let mut chained = map.clone();
        chained.insert("Nats-Expected-Last-Msg-Id", id.to_string().as_str());
        let on_wire: usize = chained
            .iter()
            .flat_map(|(k, vs)| {
                vs.iter()
                    .map(move |v| k.to_string().len() + v.as_str().len() + 4)
            })
            .sum::<usize>()
            + 12;
        assert_eq!(on_wire, wire);
        for (name, value) in &headers {
            assert_eq!(
                map.get(*name).map(|v| v.as_str()),
                Some(value.as_str()),
                "{name}"
            );
        }
    }

    #[test]
    fn attribute_values_are_percent_encoded_as_the_nats_binding_says() {
        // (value, as it travels): space, `"`, `%`, controls, DEL and non-ASCII (as
        // UTF-8 bytes, upper-case hex) are encoded; the rest of U+0021-U+007E is not.
        let vectors = [
            ("grading-service", "grading-service"),
            ("", ""),
            ("a b", "a%20b"),
            ("say \"hi\"", "say%20%22hi%22"),
            ("100%", "100%25"),
            ("caf\u{e9}", "caf%C3%A9"),
            ("\u{1F600}", "%F0%9F%98%80"),
            ("tab\there", "tab%09here"),
            ("line\r\nbreak", "line%0D%0Abreak"),
            ("del\u{7f}", "del%7F"),
            (
                "!#$&'()*+,-./:;<=>?@[\\]^_`{|}~",
                "!#$&'()*+,-./:;<=>?@[\\]^_`{|}~",
            ),
        ];
        for (value, wire) in vectors {
            assert_eq!(encode_value(value), wire, "{value:?}");
            assert_eq!(decode_value(wire), value, "{wire:?}");
        }
        // Decoded once: an encoded `%` stays a `%` followed by its text.
        assert_eq!(decode_value("%2541"), "%41");
        // Lower-case hex is read too; a `%` without two hex digits is kept.
        assert_eq!(decode_value("caf%c3%a9"), "caf\u{e9}");
        assert_eq!(decode_value("50%"), "50%");
        assert_eq!(decode_value("%zz%4"), "%zz%4");
        // Bytes that are not UTF-8 once decoded leave the value as it came.
        assert_eq!(decode_value("%FF%FE"), "%FF%FE");
    }

    #[test]
    fn a_source_with_spaces_and_accents_travels_encoded() {
        let envelope = Outbound {
            id: Uuid::now_v7(),
            name: "lesson.published",
            version: 1,
            subject: "lesson.\u{e9}t\u{e9}",
            source: "\u{c9}cole num\u{e9}rique",
            occurred_at: OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap(),
            correlation_id: None,
            causation_id: None,
            traceparent: None,
        };
        let map = envelope.header_map().expect("encoded values carry");
        let get = |n: &str| map.get(n).map(|v| v.as_str().to_owned());
        assert_eq!(
            get("ce-source").as_deref(),
            Some("%C3%89cole%20num%C3%A9rique")
        );
        assert_eq!(get("ce-subject").as_deref(), Some("lesson.%C3%A9t%C3%A9"));
        assert_eq!(
            get("ce-datacontenttype").as_deref(),
            Some("application/json")
        );
        assert_eq!(
            decode_value(&get("ce-source").unwrap()),
            "\u{c9}cole num\u{e9}rique"
        );
        let wire: usize = envelope
            .headers()
            .iter()
            .map(|(k, v)| k.len() + v.len() + 4)
            .sum::<usize>()
            + 12
            + CHAIN_HEADER_WIRE_LEN;
        assert_eq!(
            envelope.headers_wire_len(),
            wire,
            "sizes count the encoded values"
        );
    }

    #[test]
    fn versions_are_written_in_decimal() {
        let mut buf = [0u8; 12];
        for v in [0, 1, 9, 10, 42, 1_000_000, i32::MAX, -1, -10, i32::MIN] {
            assert_eq!(format_i32(v, &mut buf), v.to_string());
        }
    }

    #[test]
    fn a_line_break_in_a_value_is_encoded_not_injected() {
        let envelope = Outbound {
            id: Uuid::now_v7(),
            name: "lesson.published",
            version: 1,
            subject: "lesson.published",
            source: "svc\r\nX-Injected: 1",
            occurred_at: OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap(),
            correlation_id: None,
            causation_id: None,
            traceparent: None,
        };
        let map = envelope.header_map().expect("encoded");
        assert!(map.get("X-Injected").is_none());
        assert_eq!(
            map.get("ce-source").map(|v| v.as_str()),
            Some("svc%0D%0AX-Injected:%201")
        );
    }

    #[test]
    fn traceparent_format_is_checked() {
        assert!(valid_traceparent(
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        ));
        for bad in [
            "",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\nX: y",
        ] {
            assert!(!valid_traceparent(bad), "{bad:?}");
        }
    }
}
