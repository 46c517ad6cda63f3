//! The registry of every event type compiled into the program.
//!
//! `#[derive(DomainEvent)]` registers each type through `inventory`; [`registry()`]
//! gathers them once. Consumers and tools that start from an event's name use it to
//! find the Rust type and decode a payload.

use crate::DomainEvent;
use std::any::{Any, TypeId};
use std::collections::BTreeMap;
use std::fmt;
use std::sync::OnceLock;

type AnyEvent = Box<dyn Any + Send + Sync>;
type DecodeFn = fn(&[u8]) -> Result<AnyEvent, serde_json::Error>;

/// One registered event type.
pub struct EventType {
    name: &'static str,
    version: u32,
    subject_template: &'static str,
    type_name: &'static str,
    type_id: fn() -> TypeId,
    decode: DecodeFn,
}

impl EventType {
    #[doc(hidden)]
    pub const fn __new<E: DomainEvent>(type_name: &'static str) -> Self {
        EventType {
            name: E::NAME,
            version: E::VERSION,
            subject_template: E::SUBJECT_TEMPLATE,
            type_name,
            type_id: TypeId::of::<E>,
            decode: decode_boxed::<E>,
        }
    }

    /// The event name, e.g. `"lesson.published"`.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The schema version.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The subject template as written in `#[event(subject = ...)]`, or the name.
    pub fn subject_template(&self) -> &'static str {
        self.subject_template
    }

    /// The Rust type's path, e.g. `"my_service::events::LessonPublished"`.
    pub fn type_name(&self) -> &'static str {
        self.type_name
    }

    /// Whether this entry is the registration of `E`.
    pub fn is<E: DomainEvent>(&self) -> bool {
        (self.type_id)() == TypeId::of::<E>()
    }

    /// Decodes a JSON payload into this entry's Rust type.
    ///
    /// # Errors
    /// [`DecodeError`] when the payload is not valid JSON for the type.
    pub fn decode(&'static self, payload: &[u8]) -> Result<DecodedEvent, DecodeError> {
        match (self.decode)(payload) {
            Ok(value) => Ok(DecodedEvent {
                event_type: self,
                value,
            }),
            Err(source) => Err(DecodeError {
                event: self.name,
                type_name: self.type_name,
                source,
            }),
        }
    }
}

impl fmt::Debug for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventType")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("subject_template", &self.subject_template)
            .field("type_name", &self.type_name)
            .finish()
    }
}

fn decode_boxed<E: DomainEvent>(payload: &[u8]) -> Result<AnyEvent, serde_json::Error> {
    Ok(Box::new(serde_json::from_slice::<E>(payload)?))
}

inventory::collect!(EventType);

/// An event decoded through the registry, of a type known only at run time.
pub struct DecodedEvent {
    event_type: &'static EventType,
    value: AnyEvent,
}

impl DecodedEvent {
    /// The registry entry the event was decoded with.
    pub fn event_type(&self) -> &'static EventType {
        self.event_type
    }

    /// The event, if it is an `E`.
    pub fn downcast_ref<E: DomainEvent>(&self) -> Option<&E> {
        self.value.downcast_ref()
    }

    /// The event, if it is an `E`; else `self` back.
    ///
    /// # Errors
    /// `self`, unchanged, when the event is of another type.
    pub fn downcast<E: DomainEvent>(self) -> Result<E, Self> {
        let DecodedEvent { event_type, value } = self;
        match value.downcast::<E>() {
            Ok(event) => Ok(*event),
            Err(value) => Err(DecodedEvent { event_type, value }),
        }
    }
}

impl fmt::Debug for DecodedEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DecodedEvent")
            .field("event_type", &self.event_type.name)
            .finish_non_exhaustive()
    }
}

/// A payload did not decode into its registered type.
#[derive(Debug, thiserror::Error)]
#[error("payload of event `{event}` does not decode as `{type_name}`: {source}")]
pub struct DecodeError {
    /// The event name.
    pub event: &'static str,
    /// The Rust type it was decoded as.
    pub type_name: &'static str,
    /// What serde_json found.
    #[source]
    pub source: serde_json::Error,
}

/// Every event type registered in this program, by name.
pub struct Registry {
    by_name: BTreeMap<&'static str, Vec<&'static EventType>>,
}

/// The registry of this program's event types, gathered on first use.
pub fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| Registry::from_types(inventory::iter::<EventType>))
}

impl Registry {
    fn from_types(types: impl IntoIterator<Item = &'static EventType>) -> Self {
        let mut by_name: BTreeMap<&'static str, Vec<&'static EventType>> = BTreeMap::new();
        for event_type in types {
            by_name.entry(event_type.name).or_default().push(event_type);
        }
        for entries in by_name.values_mut() {
            entries.sort_by_key(|e| e.type_name);
        }
        Registry { by_name }
    }

    /// The type registered under `name`. Where several are (see [`Registry::validate`]),
    /// the one whose Rust path sorts first.
    pub fn get(&self, name: &str) -> Option<&'static EventType> {
        self.by_name
            .get(name)
            .and_then(|types| types.first().copied())
    }

    /// The entry of `E`.
    pub fn get_type<E: DomainEvent>(&self) -> Option<&'static EventType> {
        self.by_name
            .get(E::NAME)?
            .iter()
            .copied()
            .find(|t| t.is::<E>())
    }

    /// Every registered type, in name order (types sharing a name in Rust path order).
    pub fn iter(&self) -> impl Iterator<Item = &'static EventType> + '_ {
        self.by_name.values().flatten().copied()
    }

    /// How many types are registered.
    pub fn len(&self) -> usize {
        self.by_name.values().map(Vec::len).sum()
    }

    /// Whether no type is registered.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// Checks that no two types share an event name.
    ///
    /// # Errors
    /// [`RegistryError`] listing every shared name with the Rust types that share it.
    pub fn validate(&self) -> Result<(), RegistryError> {
        let duplicates: Vec<DuplicateName> = self
            .by_name
            .iter()
            .filter(|(_, types)| types.len() > 1)
            .map(|(name, types)| DuplicateName {
                name,
                type_names: types.iter().map(|t| t.type_name).collect(),
            })
            .collect();
        if duplicates.is_empty() {
            Ok(())
        } else {
            Err(RegistryError { duplicates })
        }
    }
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// Two or more Rust types are registered under one event name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", describe(.duplicates))]
pub struct RegistryError {
    /// Every shared name, in name order.
    pub duplicates: Vec<DuplicateName>,
}

/// One event name registered by more than one Rust type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DuplicateName {
    /// The shared event name.
    pub name: &'static str,
    /// The Rust types registered under it, in path order.
    pub type_names: Vec<&'static str>,
}

fn describe(duplicates: &[DuplicateName]) -> String {
    let each: Vec<String> = duplicates
        .iter()
        .map(|d| {
            let types: Vec<String> = d.type_names.iter().map(|t| format!("`{t}`")).collect();
            format!(
                "event name `{}` is registered by {}",
                d.name,
                types.join(" and ")
            )
        })
        .collect();
    format!(
        "{}; each event type needs its own name: change `#[event(name = ...)]` on all but one",
        each.join("; ")
    )
}
