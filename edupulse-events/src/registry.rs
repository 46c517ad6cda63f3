//! The registry of every event type compiled into the program.
//!
//! `#[derive(DomainEvent)]` registers each type through `inventory`; [`registry()`]
//! gathers them once. Consumers and tools that start from an event's name use it to
//! find the Rust type and decode a payload.

use crate::event::Previous;
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
    previous: Option<Previous>,
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
            previous: E::__PREVIOUS,
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

    /// The Rust path of the type of the version before this one, where
    /// `#[event(previous = ...)]` names one.
    pub fn previous_type_name(&self) -> Option<&'static str> {
        self.previous.map(|previous| (previous.type_name)())
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
            .field("previous", &self.previous_type_name())
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

/// Every event type registered in this program, by name and version.
pub struct Registry {
    /// Each name's types, by version, then by Rust path.
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
            entries.sort_by_key(|e| (e.version, e.type_name));
        }
        Registry { by_name }
    }

    /// The newest version registered under `name`. Where several types share that
    /// version (see [`Registry::validate`]), the one whose Rust path sorts first.
    pub fn get(&self, name: &str) -> Option<&'static EventType> {
        let types = self.by_name.get(name)?;
        let newest = types.last()?.version;
        self.get_version(name, newest)
    }

    /// The type registered under `name` and `version`. Where several are (see
    /// [`Registry::validate`]), the one whose Rust path sorts first.
    pub fn get_version(&self, name: &str, version: u32) -> Option<&'static EventType> {
        self.by_name
            .get(name)?
            .iter()
            .copied()
            .find(|t| t.version == version)
    }

    /// The entry of `E`.
    pub fn get_type<E: DomainEvent>(&self) -> Option<&'static EventType> {
        self.by_name
            .get(E::NAME)?
            .iter()
            .copied()
            .find(|t| t.is::<E>())
    }

    /// Every registered type, in name order (types sharing a name in version order,
    /// then in Rust path order).
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

    /// Checks that no two types share an event name and version, and that the versions
    /// of each name form one chain: a type registered beside older versions of its
    /// event names the one before it as `previous`, and that type is registered.
    ///
    /// # Errors
    /// [`RegistryError`] listing every shared name and version with the Rust types that
    /// share it, and every version whose predecessor is missing from the chain.
    pub fn validate(&self) -> Result<(), RegistryError> {
        let mut duplicates = Vec::new();
        let mut missing_predecessors = Vec::new();
        for (name, types) in &self.by_name {
            for same in types.chunk_by(|a, b| a.version == b.version) {
                if same.len() > 1 {
                    duplicates.push(DuplicateName {
                        name,
                        version: same[0].version,
                        type_names: same.iter().map(|t| t.type_name).collect(),
                    });
                }
            }
            for event_type in types {
                if let Some(missing) = missing_predecessor(event_type, types) {
                    missing_predecessors.push(missing);
                }
            }
        }
        if duplicates.is_empty() && missing_predecessors.is_empty() {
            Ok(())
        } else {
            Err(RegistryError {
                duplicates,
                missing_predecessors,
            })
        }
    }
}

/// What is missing before `event_type` in the chain of its name's `types`, if anything.
fn missing_predecessor(
    event_type: &'static EventType,
    types: &[&'static EventType],
) -> Option<MissingPredecessor> {
    let missing = |previous, registered_before| MissingPredecessor {
        name: event_type.name,
        version: event_type.version,
        type_name: event_type.type_name,
        previous,
        registered_before,
    };
    match event_type.previous {
        Some(previous) => {
            let registered = types.iter().any(|t| (t.type_id)() == (previous.type_id)());
            (!registered).then(|| missing(Some((previous.type_name)()), Vec::new()))
        }
        None => {
            let before: Vec<&'static str> = types
                .iter()
                .filter(|t| t.version == event_type.version.saturating_sub(1))
                .map(|t| t.type_name)
                .collect();
            let older = types.iter().any(|t| t.version < event_type.version);
            older.then(|| missing(None, before))
        }
    }
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// The registry is inconsistent: two or more Rust types are registered under one event
/// name and version, or a version's predecessor is missing from its chain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", describe(.duplicates, .missing_predecessors))]
pub struct RegistryError {
    /// Every shared name and version, in name and version order.
    pub duplicates: Vec<DuplicateName>,
    /// Every version whose predecessor is missing from its chain, in name and version
    /// order.
    pub missing_predecessors: Vec<MissingPredecessor>,
}

/// One event name and version registered by more than one Rust type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DuplicateName {
    /// The shared event name.
    pub name: &'static str,
    /// The shared version.
    pub version: u32,
    /// The Rust types registered under it, in path order.
    pub type_names: Vec<&'static str>,
}

/// A version of an event whose predecessor is missing from the chain: a consumer of
/// this version could not read the older ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingPredecessor {
    /// The event name.
    pub name: &'static str,
    /// The version whose predecessor is missing.
    pub version: u32,
    /// Its Rust type.
    pub type_name: &'static str,
    /// The type it names as `previous`, when it names one that is not registered (a
    /// hand-written `DomainEvent` impl); `None` when it names none although older
    /// versions of the event are registered.
    pub previous: Option<&'static str>,
    /// The registered types of the version just before, which `previous` could name
    /// (empty when that version is missing too, or when `previous` is given).
    pub registered_before: Vec<&'static str>,
}

impl fmt::Display for MissingPredecessor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let MissingPredecessor {
            name,
            version,
            type_name,
            ..
        } = self;
        let before = version.saturating_sub(1);
        write!(f, "event `{name}` version {version} (`{type_name}`) ")?;
        match (self.previous, self.registered_before.first()) {
            (Some(previous), _) => write!(
                f,
                "names `{previous}` as `previous`, but that type is not registered: derive \
                 `DomainEvent` for it (a hand-written impl is not registered)"
            ),
            (None, Some(candidate)) => write!(
                f,
                "has no `previous`, although older versions are registered: add \
                 `previous = {}` to its `#[event(...)]`, with a `From` conversion",
                candidate.rsplit("::").next().unwrap_or(candidate)
            ),
            (None, None) => write!(
                f,
                "has no `previous`, and version {before} is not registered although older \
                 versions are: define version {before} with `previous` set to the version \
                 below it, and name it in `previous` of `{type_name}`"
            ),
        }
    }
}

fn describe(duplicates: &[DuplicateName], missing: &[MissingPredecessor]) -> String {
    let mut parts: Vec<String> = Vec::new();
    if !duplicates.is_empty() {
        let each: Vec<String> = duplicates
            .iter()
            .map(|d| {
                let types: Vec<String> = d.type_names.iter().map(|t| format!("`{t}`")).collect();
                format!(
                    "event `{}` version {} is registered by {}",
                    d.name,
                    d.version,
                    types.join(" and ")
                )
            })
            .collect();
        parts.push(format!(
            "{}; each event type needs its own name and version: change \
             `#[event(name = ..., version = ...)]` on all but one",
            each.join("; ")
        ));
    }
    parts.extend(missing.iter().map(ToString::to_string));
    parts.join("; ")
}
