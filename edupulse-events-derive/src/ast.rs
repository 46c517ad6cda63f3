//! The derive input, read into the shape this derive supports: a struct without
//! generics. The original syntax is kept for spans.

use crate::ctxt::Ctxt;
use syn::ext::IdentExt;
use syn::{Data, DeriveInput, Fields, Ident};

/// A struct the derive can implement `DomainEvent` for.
pub struct Item<'a> {
    /// The struct's name.
    pub ident: &'a Ident,
    /// The struct's fields (empty for unit structs).
    pub fields: &'a Fields,
}

impl<'a> Item<'a> {
    /// Reads `input`, reporting what the derive cannot support.
    pub fn from_syn(cx: &mut Ctxt, input: &'a DeriveInput) -> Option<Item<'a>> {
        let fields = match &input.data {
            Data::Struct(data) => Some(&data.fields),
            Data::Enum(data) => {
                cx.error_spanned_by(
                    data.enum_token,
                    "`#[derive(DomainEvent)]` supports structs only, not enums: an event is one \
                     fact with one name; define a struct per event, e.g. \
                     `struct LessonPublished { ... }`",
                );
                None
            }
            Data::Union(data) => {
                cx.error_spanned_by(
                    data.union_token,
                    "`#[derive(DomainEvent)]` supports structs only, not unions; define a \
                     struct, e.g. `struct LessonPublished { ... }`",
                );
                None
            }
        };
        if !input.generics.params.is_empty() {
            cx.error_spanned_by(
                &input.generics,
                "`#[derive(DomainEvent)]` does not support generic structs: the registry \
                 needs one concrete type per event name; remove the generic parameters or \
                 define a concrete struct per event",
            );
        }
        Some(Item {
            ident: &input.ident,
            fields: fields?,
        })
    }

    /// The struct's field named `name` (raw identifiers match without their `r#`).
    pub fn named_field(&self, name: &str) -> Option<&'a Ident> {
        match self.fields {
            Fields::Named(named) => named
                .named
                .iter()
                .filter_map(|f| f.ident.as_ref())
                .find(|i| i.unraw() == name),
            _ => None,
        }
    }

    /// The names of the struct's fields, for error messages.
    pub fn field_names(&self) -> Vec<String> {
        match self.fields {
            Fields::Named(named) => named
                .named
                .iter()
                .filter_map(|f| f.ident.as_ref().map(|i| format!("`{}`", i.unraw())))
                .collect(),
            _ => Vec::new(),
        }
    }
}
