//! The message a relay publishes: subject, JSON body, and headers in the CloudEvents
//! NATS binary binding, so a consumer in any language can read it without this crate.

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use uuid::Uuid;

/// Header names of a published event.
pub mod headers {
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
    /// Always `application/json`.
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

impl Outbound<'_> {
    /// The headers, in order, as (name, value).
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let time = self
            .occurred_at
            .format(&Rfc3339)
            .unwrap_or_else(|_| self.occurred_at.unix_timestamp().to_string());
        let mut out = vec![
            (headers::SPEC_VERSION, "1.0".to_owned()),
            (headers::ID, self.id.to_string()),
            (headers::TYPE, self.name.to_owned()),
            (headers::SOURCE, self.source.to_owned()),
            (headers::TIME, time),
            (headers::VERSION, self.version.to_string()),
            (headers::SUBJECT, self.subject.to_owned()),
            (headers::CONTENT_TYPE, "application/json".to_owned()),
            (headers::MSG_ID, self.id.to_string()),
        ];
        if let Some(id) = self.correlation_id {
            out.push((headers::CORRELATION_ID, id.to_string()));
        }
        if let Some(id) = self.causation_id {
            out.push((headers::CAUSATION_ID, id.to_string()));
        }
        if let Some(traceparent) = self.traceparent {
            out.push((headers::TRACEPARENT, traceparent.to_owned()));
        }
        out
    }

    /// The size of the header block on the wire (`NATS/1.0\r\n`, `name: value\r\n`
    /// each, and the closing `\r\n`), which counts against the server's max_payload.
    pub fn headers_wire_len(&self) -> usize {
        let lines: usize = self
            .headers()
            .iter()
            .map(|(name, value)| name.len() + 2 + value.len() + 2)
            .sum();
        "NATS/1.0\r\n".len() + lines + 2
    }

    /// The headers as an async-nats map.
    ///
    /// # Errors
    /// A header value that NATS cannot carry (a line break), described.
    pub fn header_map(&self) -> Result<async_nats::HeaderMap, String> {
        let mut map = async_nats::HeaderMap::new();
        for (name, value) in self.headers() {
            let value: async_nats::HeaderValue = value
                .parse()
                .map_err(|_| format!("header {name} has a value NATS cannot carry"))?;
            map.insert(name, value);
        }
        Ok(map)
    }
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
            + 12;
        assert_eq!(envelope.headers_wire_len(), wire);
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
