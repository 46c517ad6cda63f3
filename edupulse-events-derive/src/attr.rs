//! Reads the `#[event(...)]` attributes of an item, reporting every mistake.

use crate::ctxt::Ctxt;
use crate::valid::{self, Segment};
use syn::punctuated::Punctuated;
use syn::{Attribute, Expr, ExprLit, Lit, LitInt, LitStr, Meta, Token};

/// The keys `#[event(...)]` knows, as listed in error messages.
const KNOWN_KEYS: &str = "`name`, `version`, `previous`, `subject`, `crate`, `schema`";

/// What the `#[event(...)]` attributes said; `None` where a key was absent or wrong.
#[derive(Default)]
pub struct Attrs {
    /// The event name and the literal it came from.
    pub name: Option<(String, LitStr)>,
    /// The schema version and the literal it came from.
    pub version: Option<(u32, LitInt)>,
    /// The subject template, parsed, and the literal it came from.
    pub subject: Option<(Vec<Segment>, LitStr)>,
    /// The type of the previous version, as written.
    pub previous: Option<syn::Path>,
    /// The path to the runtime crate.
    pub krate: Option<syn::Path>,
    /// The `schema` flag, where given: register the type's JSON Schema.
    pub schema: Option<syn::Path>,
    /// Whether any `#[event]` attribute was present at all.
    pub seen: bool,
    /// Whether `name` was given at all, valid or not (so a bad name is not also "missing").
    pub name_given: bool,
}

/// Reads every `#[event(...)]` attribute of `attrs`.
pub fn get(cx: &mut Ctxt, attrs: &[Attribute]) -> Attrs {
    let mut out = Attrs::default();
    for attr in attrs.iter().filter(|a| a.path().is_ident("event")) {
        out.seen = true;
        let list = match &attr.meta {
            Meta::List(list) => list,
            other => {
                cx.error_spanned_by(
                    other,
                    "expected `#[event(name = \"...\")]`, e.g. \
                     `#[event(name = \"lesson.published\")]`",
                );
                continue;
            }
        };
        let metas = match list.parse_args_with(Punctuated::<Meta, Token![,]>::parse_terminated) {
            Ok(metas) => metas,
            Err(error) => {
                cx.syn_error(error);
                continue;
            }
        };
        for meta in metas {
            read_meta(cx, &mut out, meta);
        }
    }
    out
}

fn read_meta(cx: &mut Ctxt, out: &mut Attrs, meta: Meta) {
    let nv = match meta {
        Meta::NameValue(nv) => nv,
        Meta::Path(path) if path.is_ident("schema") => {
            if out.schema.replace(path.clone()).is_some() {
                duplicate(cx, &path, "schema");
            }
            return;
        }
        Meta::Path(path) => {
            let key = path_key(&path);
            cx.error_spanned_by(
                &path,
                format!("`{key}` needs a value; write `{key} = ...`, e.g. `name = \"lesson.published\"`"),
            );
            return;
        }
        Meta::List(list) => {
            let key = path_key(&list.path);
            cx.error_spanned_by(&list, format!("expected `{key} = ...`, not `{key}(...)`"));
            return;
        }
    };
    let key = path_key(&nv.path);
    match key.as_str() {
        "name" => {
            out.name_given = true;
            if out.name.is_some() {
                duplicate(cx, &nv.path, "name");
                return;
            }
            let Some(lit) = string_value(cx, &nv.value, "name = \"lesson.published\"") else {
                return;
            };
            match valid::check_name(&lit.value()) {
                Ok(()) => out.name = Some((lit.value(), lit)),
                Err(message) => cx.error_spanned_by(&lit, message),
            }
        }
        "version" => {
            if out.version.is_some() {
                duplicate(cx, &nv.path, "version");
                return;
            }
            let lit = match &nv.value {
                Expr::Lit(ExprLit {
                    lit: Lit::Int(lit), ..
                }) => lit.clone(),
                Expr::Lit(ExprLit {
                    lit: Lit::Str(s), ..
                }) => {
                    cx.error_spanned_by(
                        s,
                        format!(
                            "`version` takes an integer, not a string; write `version = {}`",
                            s.value().trim()
                        ),
                    );
                    return;
                }
                other => {
                    cx.error_spanned_by(
                        other,
                        "`version` takes an integer literal of 1 or more, e.g. `version = 2`",
                    );
                    return;
                }
            };
            // The outbox stores the version as a Postgres `integer`.
            match lit.base10_parse::<u32>() {
                Ok(0) => cx.error_spanned_by(
                    &lit,
                    "`version = 0` is not allowed: versions start at 1; write `version = 1` \
                     or leave `version` out",
                ),
                Ok(version) if i32::try_from(version).is_ok() => {
                    out.version = Some((version, lit));
                }
                _ => cx.error_spanned_by(
                    &lit,
                    format!(
                        "`version` must be a whole number from 1 to {}, e.g. `version = 2`",
                        i32::MAX
                    ),
                ),
            }
        }
        "previous" => {
            if out.previous.is_some() {
                duplicate(cx, &nv.path, "previous");
                return;
            }
            match &nv.value {
                Expr::Path(path) if path.qself.is_none() => out.previous = Some(path.path.clone()),
                Expr::Lit(ExprLit {
                    lit: Lit::Str(s), ..
                }) => cx.error_spanned_by(
                    s,
                    format!(
                        "`previous` takes a type, not a string; write `previous = {}`",
                        s.value().trim()
                    ),
                ),
                other => cx.error_spanned_by(
                    other,
                    "`previous` takes the type of the version before this one, e.g. \
                     `previous = QuizSubmittedV1`",
                ),
            }
        }
        "subject" => {
            if out.subject.is_some() {
                duplicate(cx, &nv.path, "subject");
                return;
            }
            let Some(lit) = string_value(cx, &nv.value, "subject = \"quiz.{quiz_id}.submitted\"")
            else {
                return;
            };
            match valid::parse_subject(&lit.value()) {
                Ok(segments) => out.subject = Some((segments, lit)),
                Err(message) => cx.error_spanned_by(&lit, message),
            }
        }
        "crate" => {
            if out.krate.is_some() {
                duplicate(cx, &nv.path, "crate");
                return;
            }
            let Some(lit) = string_value(cx, &nv.value, "crate = \"::edupulse_events\"") else {
                return;
            };
            match lit.parse::<syn::Path>() {
                Ok(path) => out.krate = Some(path),
                Err(_) => cx.error_spanned_by(
                    &lit,
                    "`crate` must be a path to edupulse-events, e.g. `crate = \"::edupulse_events\"`",
                ),
            }
        }
        _ => cx.error_spanned_by(
            &nv.path,
            format!("unknown key `{key}` in `#[event(...)]`; expected one of {KNOWN_KEYS}"),
        ),
    }
}

fn path_key(path: &syn::Path) -> String {
    let text = quote::quote!(#path).to_string();
    text.replace(' ', "")
}

fn duplicate(cx: &mut Ctxt, path: &syn::Path, key: &str) {
    cx.error_spanned_by(
        path,
        format!("duplicate key `{key}` in `#[event(...)]`; give `{key}` once"),
    );
}

fn string_value(cx: &mut Ctxt, value: &Expr, example: &str) -> Option<LitStr> {
    match value {
        Expr::Lit(ExprLit {
            lit: Lit::Str(lit), ..
        }) => Some(lit.clone()),
        other => {
            let key = example.split(' ').next().unwrap_or(example);
            cx.error_spanned_by(
                other,
                format!("`{key}` takes a string literal; write `{example}`"),
            );
            None
        }
    }
}
