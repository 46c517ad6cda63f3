//! The schema registry: every event type that opted in with `#[event(..., schema)]`.

use crate::DomainEvent;
use schemars::generate::SchemaSettings;
use schemars::JsonSchema;
use serde_json::Value;
use std::any::TypeId;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::OnceLock;

/// The JSON Schema of one event type (one name at one version).
pub struct EventSchema {
    name: &'static str,
    version: u32,
    type_name: &'static str,
    type_id: fn() -> TypeId,
    generate: fn() -> Value,
}

impl EventSchema {
    #[doc(hidden)]
    pub const fn __new<E: DomainEvent + JsonSchema>(type_name: &'static str) -> Self {
        EventSchema {
            name: E::NAME,
            version: E::VERSION,
            type_name,
            type_id: TypeId::of::<E>,
            generate: generate::<E>,
        }
    }

    /// The event name, e.g. `"lesson.published"`.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The event's version.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The Rust type's path.
    pub fn type_name(&self) -> &'static str {
        self.type_name
    }

    /// The schema's id, `urn:edupulse:{name}:v{version}` (see [`schema_id`]).
    pub fn id(&self) -> String {
        schema_id(self.name, self.version)
    }

    /// Whether this is the schema of `E`.
    pub fn is<E: DomainEvent>(&self) -> bool {
        (self.type_id)() == TypeId::of::<E>()
    }

    /// The JSON Schema (draft-07) of the event's payload as a reader of the type accepts
    /// it (every payload the service sends is valid by it), with
    /// its [`id`](Self::id) as `$id`. Subschemas are inlined, so it stands alone
    /// (a recursive type keeps `$ref`s into its own `definitions`).
    pub fn schema(&self) -> Value {
        let mut schema = (self.generate)();
        if let Value::Object(map) = &mut schema {
            map.insert("$id".to_owned(), Value::String(self.id()));
        }
        schema
    }
}

impl fmt::Debug for EventSchema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventSchema")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("type_name", &self.type_name)
            .finish()
    }
}

inventory::collect!(EventSchema);

fn generate<E: JsonSchema>() -> Value {
    let mut settings = SchemaSettings::draft07();
    settings.inline_subschemas = true;
    settings
        .into_generator()
        .into_root_schema_for::<E>()
        .to_value()
}

/// The id of the schema of event `name` at `version`: `urn:edupulse:{name}:v{version}`.
///
/// A URN names the schema without promising a place to fetch it from: consumers find
/// it in the service's AsyncAPI document ([`asyncapi`](super::asyncapi)) or in the
/// schema files kept by [`check_schemas`](super::check_schemas). Event names are made
/// of characters a URN allows, so the id needs no escaping.
pub fn schema_id(name: &str, version: u32) -> String {
    format!("urn:edupulse:{name}:v{version}")
}

struct Schemas {
    all: Vec<&'static EventSchema>,
    /// Schema ids by name, then version.
    ids: BTreeMap<&'static str, BTreeMap<u32, String>>,
}

fn gathered() -> &'static Schemas {
    static SCHEMAS: OnceLock<Schemas> = OnceLock::new();
    SCHEMAS.get_or_init(|| {
        let mut all: Vec<&'static EventSchema> = inventory::iter::<EventSchema>().collect();
        all.sort_by_key(|s| (s.name, s.version, s.type_name));
        let mut ids: BTreeMap<&'static str, BTreeMap<u32, String>> = BTreeMap::new();
        for schema in &all {
            ids.entry(schema.name)
                .or_default()
                .insert(schema.version, schema.id());
        }
        Schemas { all, ids }
    })
}

/// Every event type with a schema in this program, by name, then version (types sharing
/// both, which [`Registry::validate`](crate::Registry::validate) reports, by Rust path).
pub fn schemas() -> &'static [&'static EventSchema] {
    &gathered().all
}

/// The schema of `E`, if `E` opted in with `#[event(..., schema)]`.
pub fn schema_of<E: DomainEvent>() -> Option<&'static EventSchema> {
    schemas().iter().copied().find(|s| s.is::<E>())
}

/// The `dataschema` of a message of event `name` at `version`, if its type has a schema.
pub(crate) fn dataschema(name: &str, version: i32) -> Option<&'static str> {
    let version = u32::try_from(version).ok()?;
    gathered().ids.get(name)?.get(&version).map(String::as_str)
}

/// Registers the schema of an event type (what `#[event(..., schema)]` expands to).
#[doc(hidden)]
#[macro_export]
macro_rules! __event_schema {
    ($ty:ident) => {
        $crate::__private::inventory::submit! {
            $crate::__private::EventSchema::__new::<$ty>(::core::concat!(
                ::core::module_path!(),
                "::",
                ::core::stringify!($ty)
            ))
        }
    };
}

/// The schema of a registered event type, if it has one.
pub(crate) fn schema_of_type(event_type: &crate::EventType) -> Option<&'static EventSchema> {
    schemas().iter().copied().find(|s| {
        s.name == event_type.name()
            && s.version == event_type.version()
            && s.type_name == event_type.type_name()
    })
}
