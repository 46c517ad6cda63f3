//! The contract check: the schemas of published versions are kept as files, and a
//! change that their consumers cannot read fails until it becomes a new version.

use super::schema::{schemas, EventSchema};
use serde_json::Value;
use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

/// The environment variable that decides what [`check_schemas`] does with a changed
/// file: unset (or `check`) checks, `overwrite` accepts every change.
pub const SCHEMAS_ENV: &str = "EDUPULSE_SCHEMAS";

/// Keywords that describe a schema without constraining the JSON it accepts; a change
/// to them is never a break.
const ANNOTATIONS: &[&str] = &[
    "$comment",
    "$id",
    "$schema",
    "default",
    "deprecated",
    "description",
    "examples",
    "readOnly",
    "title",
    "writeOnly",
];

/// What [`check_schemas_in`] does with a schema file that differs from the type's schema
/// in a way consumers cannot read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckMode {
    /// Fail with [`ContractError::Incompatible`] and leave the file as it is.
    Check,
    /// Write the new schema over the file (for a version that was never published).
    Overwrite,
}

impl CheckMode {
    /// The mode [`SCHEMAS_ENV`] asks for: `overwrite`, or `check` when unset or empty.
    ///
    /// # Errors
    /// [`ContractError::BadMode`] for any other value.
    pub fn from_env() -> Result<CheckMode, ContractError> {
        match std::env::var(SCHEMAS_ENV) {
            Err(std::env::VarError::NotPresent) => Ok(CheckMode::Check),
            Ok(value) if value.is_empty() || value == "check" => Ok(CheckMode::Check),
            Ok(value) if value == "overwrite" => Ok(CheckMode::Overwrite),
            Ok(value) => Err(ContractError::BadMode(value)),
            Err(std::env::VarError::NotUnicode(value)) => {
                Err(ContractError::BadMode(value.to_string_lossy().into_owned()))
            }
        }
    }
}

/// Checks every event type's schema against its file in `dir`, in the mode that
/// [`SCHEMAS_ENV`] asks for (see [`check_schemas_in`]). Call it from a test:
///
/// ```no_run
/// #[test]
/// fn published_event_schemas_stay_readable() {
///     let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/schemas");
///     if let Err(error) = edupulse_events::contract::check_schemas(dir) {
///         panic!("{error}");
///     }
/// }
/// ```
///
/// # Errors
/// As [`check_schemas_in`], and [`ContractError::BadMode`] for a value of
/// [`SCHEMAS_ENV`] other than `overwrite` or `check`.
pub fn check_schemas(dir: impl AsRef<Path>) -> Result<CheckReport, ContractError> {
    check_schemas_in(dir, CheckMode::from_env()?)
}

/// Checks every event type's schema ([`schemas`](super::schemas)) against its file
/// `{dir}/{name}.v{version}.json`, the schema as it was published.
///
/// - No file yet: the schema is written (the version's first publication).
/// - The same schema: nothing to do.
/// - Only changes consumers can read (an optional property added, a description
///   changed): the file is brought up to date.
/// - A change consumers cannot read ([`ChangeKind::is_breaking`]): in
///   [`CheckMode::Check`] the file stays and the check fails; in
///   [`CheckMode::Overwrite`] the file is overwritten.
///
/// Every file is handled before the check fails, so one run reports every break.
///
/// # Errors
/// [`ContractError::Incompatible`] listing every breaking change, and
/// [`ContractError::Io`] or [`ContractError::Json`] for a file that cannot be read,
/// written or parsed.
pub fn check_schemas_in(
    dir: impl AsRef<Path>,
    mode: CheckMode,
) -> Result<CheckReport, ContractError> {
    let dir = dir.as_ref();
    std::fs::create_dir_all(dir).map_err(|source| ContractError::Io {
        action: "create the directory of",
        path: dir.to_owned(),
        source,
    })?;
    let mut report = CheckReport::default();
    let mut incompatible = Vec::new();
    let mut seen = BTreeSet::new();
    for schema in schemas() {
        if !seen.insert((schema.name(), schema.version())) {
            // Two types share a name and version; the registry's validation says so.
            continue;
        }
        let path = dir.join(file_name(schema));
        let new = schema.schema();
        let outcome = match read(&path)? {
            None => {
                write(&path, &new)?;
                Outcome::Created
            }
            Some(old) if old == new => Outcome::Unchanged,
            Some(old) => {
                let found = changes(&old, &new);
                let breaking: Vec<Change> = found
                    .iter()
                    .filter(|c| c.kind.is_breaking())
                    .cloned()
                    .collect();
                if breaking.is_empty() {
                    write(&path, &new)?;
                    Outcome::Updated(found)
                } else if mode == CheckMode::Overwrite {
                    write(&path, &new)?;
                    Outcome::Overwritten(found)
                } else {
                    incompatible.push(Incompatible {
                        name: schema.name(),
                        version: schema.version(),
                        path: path.clone(),
                        changes: breaking,
                    });
                    Outcome::Incompatible(found)
                }
            }
        };
        report.files.push(FileOutcome {
            name: schema.name(),
            version: schema.version(),
            path,
            outcome,
        });
    }
    report.unregistered = unregistered(dir, &report)?;
    if incompatible.is_empty() {
        Ok(report)
    } else {
        Err(ContractError::Incompatible(incompatible))
    }
}

fn file_name(schema: &EventSchema) -> String {
    format!("{}.v{}.json", schema.name(), schema.version())
}

fn read(path: &Path) -> Result<Option<Value>, ContractError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(ContractError::Io {
                action: "read",
                path: path.to_owned(),
                source,
            })
        }
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|source| ContractError::Json {
            path: path.to_owned(),
            source,
        })
}

fn write(path: &Path, schema: &Value) -> Result<(), ContractError> {
    let mut text = serde_json::to_string_pretty(schema).map_err(|source| ContractError::Json {
        path: path.to_owned(),
        source,
    })?;
    text.push('\n');
    std::fs::write(path, text).map_err(|source| ContractError::Io {
        action: "write",
        path: path.to_owned(),
        source,
    })
}

/// The `.json` files of `dir` that belong to no registered schema.
fn unregistered(dir: &Path, report: &CheckReport) -> Result<Vec<PathBuf>, ContractError> {
    let io = |source| ContractError::Io {
        action: "list the directory of",
        path: dir.to_owned(),
        source,
    };
    let known: BTreeSet<&Path> = report.files.iter().map(|f| f.path.as_path()).collect();
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        if path.extension().is_some_and(|e| e == "json") && !known.contains(path.as_path()) {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

/// What [`check_schemas_in`] found and did.
#[derive(Debug, Clone, Default)]
pub struct CheckReport {
    /// One entry per event type with a schema, by name and version.
    pub files: Vec<FileOutcome>,
    /// Schema files of the directory that no registered type has (a version no longer
    /// sent, or a renamed event); they are left alone.
    pub unregistered: Vec<PathBuf>,
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for file in &self.files {
            let what = match &file.outcome {
                Outcome::Unchanged => "unchanged",
                Outcome::Created => "written (new)",
                Outcome::Updated(_) => "updated (compatible changes)",
                Outcome::Overwritten(_) => "overwritten (incompatible changes accepted)",
                Outcome::Incompatible(_) => "INCOMPATIBLE",
            };
            writeln!(f, "{} v{}: {what}", file.name, file.version)?;
            if let Outcome::Updated(changes)
            | Outcome::Overwritten(changes)
            | Outcome::Incompatible(changes) = &file.outcome
            {
                for change in changes {
                    writeln!(f, "  - {change}")?;
                }
            }
        }
        for path in &self.unregistered {
            writeln!(f, "{}: no registered event type has it", path.display())?;
        }
        Ok(())
    }
}

/// What happened to the schema file of one event type.
#[derive(Debug, Clone)]
pub struct FileOutcome {
    /// The event name.
    pub name: &'static str,
    /// The event version.
    pub version: u32,
    /// The schema file.
    pub path: PathBuf,
    /// What was found and done.
    pub outcome: Outcome,
}

/// What [`check_schemas_in`] found in one schema file and did with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The file holds the type's schema.
    Unchanged,
    /// There was no file; it was written.
    Created,
    /// The schema changed in ways consumers can read (listed, possibly none: only
    /// descriptions changed); the file was updated.
    Updated(Vec<Change>),
    /// The schema changed in ways consumers cannot read and [`CheckMode::Overwrite`]
    /// accepted it; the file was overwritten. Every change is listed.
    Overwritten(Vec<Change>),
    /// The schema changed in ways consumers cannot read; the file was left alone and
    /// the check failed. Every change is listed.
    Incompatible(Vec<Change>),
}

/// The breaking changes of one published schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incompatible {
    /// The event name.
    pub name: &'static str,
    /// The event version.
    pub version: u32,
    /// The file holding the published schema.
    pub path: PathBuf,
    /// The changes that break its consumers.
    pub changes: Vec<Change>,
}

/// The contract check could not run, or found a break.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ContractError {
    /// A published schema changed in ways its consumers cannot read.
    #[error("{}", describe(.0))]
    Incompatible(Vec<Incompatible>),
    /// A schema file or its directory could not be read or written.
    #[error(
        "cannot {action} schema file {}: {source}; check that the path is right and that \
         the check may write there",
        path.display()
    )]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// A schema file is not JSON.
    #[error(
        "schema file {} is not valid JSON: {source}; restore it from version control, or \
         delete it to have the check write the current schema",
        path.display()
    )]
    Json {
        /// The file.
        path: PathBuf,
        /// What serde_json found.
        #[source]
        source: serde_json::Error,
    },
    /// [`SCHEMAS_ENV`] has a value the check does not know.
    #[error(
        "{SCHEMAS_ENV}={0:?} is not understood: set it to `overwrite` to accept changed \
         schemas, or unset it to check them"
    )]
    BadMode(String),
}

fn describe(incompatible: &[Incompatible]) -> String {
    let mut out = String::new();
    for each in incompatible {
        out.push_str(&format!(
            "the schema of event `{}` version {} changed in ways its consumers cannot read \
             (published schema: {}):\n",
            each.name,
            each.version,
            each.path.display()
        ));
        for change in &each.changes {
            out.push_str(&format!("  - {change}\n"));
        }
    }
    out.push_str(&format!(
        "keep each published version as it was and send the change as a new version \
         (a new type with `#[event(version = N)]`); if a version was never published, \
         accept its change by running the check again with {SCHEMAS_ENV}=overwrite"
    ));
    out
}

/// One difference between a published schema and the current one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Where, as a path into the payload: `$` is the payload, `$.lesson.title` a
    /// property, `$.tags[]` an array's items.
    pub path: String,
    /// What changed.
    pub kind: ChangeKind,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}`: {}", self.path, self.kind)
    }
}

/// What changed at one place of a schema.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ChangeKind {
    /// A property is gone.
    PropertyRemoved,
    /// A property is new; `required` says whether every payload must have it.
    PropertyAdded {
        /// Whether the new property is required.
        required: bool,
    },
    /// An existing property is now required.
    BecameRequired,
    /// A required property may now be missing.
    BecameOptional,
    /// The JSON type changed, e.g. `string` to `integer`, or to `null | string`.
    TypeChanged {
        /// The published type(s), joined by ` | `.
        old: String,
        /// The current type(s).
        new: String,
    },
    /// Another constraint changed (e.g. `enum`, `format`, `minimum`, `oneOf`,
    /// `additionalProperties`).
    KeywordChanged {
        /// The keyword.
        keyword: String,
    },
}

impl ChangeKind {
    /// Whether the change can break a consumer: every change but an added optional
    /// property (which readers that ignore unknown fields, as serde does, take in their
    /// stride). A removed, retyped or newly required property, and any other changed
    /// constraint, break old consumers, or new code reading old events.
    pub fn is_breaking(&self) -> bool {
        !matches!(self, ChangeKind::PropertyAdded { required: false })
    }
}

impl fmt::Display for ChangeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChangeKind::PropertyRemoved => f.write_str("property removed"),
            ChangeKind::PropertyAdded { required: true } => {
                f.write_str("required property added (old events lack it)")
            }
            ChangeKind::PropertyAdded { required: false } => f.write_str("optional property added"),
            ChangeKind::BecameRequired => {
                f.write_str("property became required (old events may lack it)")
            }
            ChangeKind::BecameOptional => {
                f.write_str("property became optional (consumers expect it)")
            }
            ChangeKind::TypeChanged { old, new } => write!(f, "type changed from {old} to {new}"),
            ChangeKind::KeywordChanged { keyword } => write!(f, "`{keyword}` changed"),
        }
    }
}

/// Every difference between a published schema `old` and the current `new`, in path
/// order; annotations (`title`, `description`, `$id`, …) are not compared.
pub fn changes(old: &Value, new: &Value) -> Vec<Change> {
    let mut out = Vec::new();
    diff(old, new, "$", &mut out);
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

fn diff(old: &Value, new: &Value, path: &str, out: &mut Vec<Change>) {
    let (Value::Object(old_map), Value::Object(new_map)) = (old, new) else {
        if old != new {
            out.push(change(
                path,
                ChangeKind::KeywordChanged {
                    keyword: "(schema)".into(),
                },
            ));
        }
        return;
    };
    let keywords: BTreeSet<&str> = old_map
        .keys()
        .chain(new_map.keys())
        .map(String::as_str)
        .filter(|k| !ANNOTATIONS.contains(k))
        .collect();
    for keyword in keywords {
        let (o, n) = (old_map.get(keyword), new_map.get(keyword));
        match keyword {
            "type" => {
                let (o, n) = (types(o), types(n));
                if o != n {
                    out.push(change(
                        path,
                        ChangeKind::TypeChanged {
                            old: o.join(" | "),
                            new: n.join(" | "),
                        },
                    ));
                }
            }
            "properties" => properties(old, new, path, out),
            "required" => required(old, new, path, out),
            "items" => match (o, n) {
                (Some(o @ Value::Object(_)), Some(n @ Value::Object(_))) => {
                    diff(o, n, &format!("{path}[]"), out);
                }
                _ if o != n => out.push(change(
                    path,
                    ChangeKind::KeywordChanged {
                        keyword: keyword.into(),
                    },
                )),
                _ => {}
            },
            _ if o != n => out.push(change(
                path,
                ChangeKind::KeywordChanged {
                    keyword: keyword.into(),
                },
            )),
            _ => {}
        }
    }
}

fn change(path: &str, kind: ChangeKind) -> Change {
    Change {
        path: path.to_owned(),
        kind,
    }
}

fn types(value: Option<&Value>) -> Vec<String> {
    let mut out: Vec<String> = match value {
        None => vec!["any".to_owned()],
        Some(Value::String(one)) => vec![one.clone()],
        Some(Value::Array(many)) => many
            .iter()
            .map(|t| t.as_str().map_or_else(|| t.to_string(), str::to_owned))
            .collect(),
        Some(other) => vec![other.to_string()],
    };
    out.sort();
    out.dedup();
    out
}

fn names<'a>(schema: &'a Value, keyword: &str) -> BTreeSet<&'a str> {
    match schema.get(keyword) {
        Some(Value::Object(map)) => map.keys().map(String::as_str).collect(),
        Some(Value::Array(list)) => list.iter().filter_map(Value::as_str).collect(),
        _ => BTreeSet::new(),
    }
}

fn properties(old: &Value, new: &Value, path: &str, out: &mut Vec<Change>) {
    let (old_names, new_names) = (names(old, "properties"), names(new, "properties"));
    let new_required = names(new, "required");
    for name in old_names.union(&new_names) {
        let at = format!("{path}.{name}");
        match (old["properties"].get(name), new["properties"].get(name)) {
            (Some(o), Some(n)) => diff(o, n, &at, out),
            (Some(_), None) => out.push(change(&at, ChangeKind::PropertyRemoved)),
            (None, Some(_)) => out.push(change(
                &at,
                ChangeKind::PropertyAdded {
                    required: new_required.contains(name),
                },
            )),
            (None, None) => {}
        }
    }
}

fn required(old: &Value, new: &Value, path: &str, out: &mut Vec<Change>) {
    let (old_required, new_required) = (names(old, "required"), names(new, "required"));
    let (old_names, new_names) = (names(old, "properties"), names(new, "properties"));
    // Only properties in both: an added or removed one is reported as such.
    for name in old_names.intersection(&new_names) {
        let at = format!("{path}.{name}");
        match (old_required.contains(name), new_required.contains(name)) {
            (false, true) => out.push(change(&at, ChangeKind::BecameRequired)),
            (true, false) => out.push(change(&at, ChangeKind::BecameOptional)),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn published() -> Value {
        json!({
            "$schema": "http://json-schema.org/draft-07/schema#",
            "$id": "urn:edupulse:lesson.published:v1",
            "title": "LessonPublished",
            "type": "object",
            "properties": {
                "lesson_id": { "type": "integer", "format": "uint64", "minimum": 0 },
                "title": { "type": "string" },
                "note": { "type": ["string", "null"] },
                "tags": { "type": "array", "items": { "type": "string" } },
                "author": {
                    "type": "object",
                    "properties": { "name": { "type": "string" } },
                    "required": ["name"]
                }
            },
            "required": ["lesson_id", "title", "tags", "author"]
        })
    }

    fn edit(f: impl FnOnce(&mut Value)) -> Vec<Change> {
        let mut new = published();
        f(&mut new);
        changes(&published(), &new)
    }

    fn kinds(found: &[Change]) -> Vec<(&str, &ChangeKind)> {
        found.iter().map(|c| (c.path.as_str(), &c.kind)).collect()
    }

    #[test]
    fn the_same_schema_has_no_changes_and_annotations_do_not_count() {
        assert!(changes(&published(), &published()).is_empty());
        let found = edit(|s| {
            s["title"] = json!("Renamed");
            s["$id"] = json!("urn:other");
            s["properties"]["title"]["description"] = json!("The lesson's title.");
        });
        assert!(found.is_empty(), "{found:?}");
    }

    #[test]
    fn an_added_optional_property_is_compatible() {
        let found = edit(|s| s["properties"]["summary"] = json!({ "type": "string" }));
        assert_eq!(
            kinds(&found),
            [("$.summary", &ChangeKind::PropertyAdded { required: false })]
        );
        assert!(!found[0].kind.is_breaking());
    }

    #[test]
    fn an_added_required_property_breaks() {
        let found = edit(|s| {
            s["properties"]["summary"] = json!({ "type": "string" });
            s["required"].as_array_mut().unwrap().push(json!("summary"));
        });
        assert_eq!(
            kinds(&found),
            [("$.summary", &ChangeKind::PropertyAdded { required: true })]
        );
        assert!(found[0].kind.is_breaking());
    }

    #[test]
    fn a_removed_property_breaks_at_any_depth() {
        let found = edit(|s| {
            s["properties"].as_object_mut().unwrap().remove("note");
            s["properties"]["author"]["properties"]
                .as_object_mut()
                .unwrap()
                .remove("name");
        });
        let found = kinds(&found);
        assert!(
            found.contains(&("$.note", &ChangeKind::PropertyRemoved)),
            "{found:?}"
        );
        assert!(
            found.contains(&("$.author.name", &ChangeKind::PropertyRemoved)),
            "{found:?}"
        );
        assert!(found.iter().all(|(_, k)| k.is_breaking()));
    }

    #[test]
    fn a_retyped_property_breaks_also_inside_arrays() {
        let found = edit(|s| {
            s["properties"]["title"]["type"] = json!("integer");
            s["properties"]["tags"]["items"]["type"] = json!("integer");
        });
        assert_eq!(
            kinds(&found),
            [
                (
                    "$.tags[]",
                    &ChangeKind::TypeChanged {
                        old: "string".into(),
                        new: "integer".into()
                    }
                ),
                (
                    "$.title",
                    &ChangeKind::TypeChanged {
                        old: "string".into(),
                        new: "integer".into()
                    }
                ),
            ]
        );
        assert!(found.iter().all(|c| c.kind.is_breaking()));
        // Made nullable (an `Option`): a type change too; the order of a type list is not.
        let found = edit(|s| s["properties"]["title"]["type"] = json!(["null", "string"]));
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].kind.is_breaking());
        let found = edit(|s| s["properties"]["note"]["type"] = json!(["null", "string"]));
        assert!(found.is_empty(), "{found:?}");
    }

    #[test]
    fn a_property_becoming_required_or_optional_breaks() {
        let found = edit(|s| s["required"].as_array_mut().unwrap().push(json!("note")));
        assert_eq!(kinds(&found), [("$.note", &ChangeKind::BecameRequired)]);
        assert!(found[0].kind.is_breaking());
        let found = edit(|s| s["required"] = json!(["lesson_id", "tags", "author"]));
        assert_eq!(kinds(&found), [("$.title", &ChangeKind::BecameOptional)]);
        assert!(found[0].kind.is_breaking());
    }

    #[test]
    fn another_changed_constraint_breaks() {
        let found = edit(|s| s["properties"]["lesson_id"]["format"] = json!("uint32"));
        assert_eq!(
            kinds(&found),
            [(
                "$.lesson_id",
                &ChangeKind::KeywordChanged {
                    keyword: "format".into()
                }
            )]
        );
        assert!(found[0].kind.is_breaking());
        let found = edit(|s| s["additionalProperties"] = json!(false));
        assert_eq!(
            kinds(&found),
            [(
                "$",
                &ChangeKind::KeywordChanged {
                    keyword: "additionalProperties".into()
                }
            )]
        );
    }

    #[test]
    fn messages_say_where_and_what() {
        let found = edit(|s| {
            s["properties"].as_object_mut().unwrap().remove("title");
        });
        assert_eq!(found[0].to_string(), "`$.title`: property removed");
        let error = ContractError::Incompatible(vec![Incompatible {
            name: "lesson.published",
            version: 1,
            path: PathBuf::from("schemas/lesson.published.v1.json"),
            changes: found,
        }]);
        let message = error.to_string();
        assert!(
            message.contains("event `lesson.published` version 1"),
            "{message}"
        );
        assert!(
            message.contains("schemas/lesson.published.v1.json"),
            "{message}"
        );
        assert!(message.contains("`$.title`: property removed"), "{message}");
        assert!(message.contains("EDUPULSE_SCHEMAS=overwrite"), "{message}");
    }
}
