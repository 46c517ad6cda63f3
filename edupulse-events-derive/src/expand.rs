//! Writes the `DomainEvent` impl and the registry entry of a valid item.

use crate::ast::Item;
use crate::attr::{self, Attrs};
use crate::ctxt::Ctxt;
use crate::fallback;
use crate::valid::Segment;
use proc_macro2::TokenStream;
use quote::{quote, quote_spanned};
use syn::{DeriveInput, Fields, LitStr};

/// Runs the whole pipeline for one derive input.
pub fn derive(input: &DeriveInput) -> TokenStream {
    let mut cx = Ctxt::new();
    let attrs = attr::get(&mut cx, &input.attrs);
    let item = Item::from_syn(&mut cx, input);
    let krate = attrs
        .krate
        .clone()
        .unwrap_or_else(|| syn::parse_quote!(::edupulse_events));

    if !attrs.name_given && item.is_some() {
        let message = if attrs.seen {
            "missing `name` in `#[event(...)]`; every event needs a stable name, e.g. \
             `#[event(name = \"lesson.published\")]`"
        } else {
            "missing `#[event(name = \"...\")]`; every event needs a stable name: add \
             `#[event(name = \"lesson.published\")]` below the derive"
        };
        cx.error_spanned_by(&input.ident, message);
    }
    if let (Some(item), Some((segments, lit))) = (&item, &attrs.subject) {
        check_placeholders(&mut cx, item, segments, lit);
    }

    match (cx.check(), item, &attrs) {
        (
            Ok(()),
            Some(item),
            Attrs {
                name: Some((name, _)),
                ..
            },
        ) => impl_event(&krate, &item, name, &attrs),
        (Err(errors), _, _) => {
            let stub = fallback::expand(input, &krate);
            quote! { #errors #stub }
        }
        // Unreachable in practice: a missing name or item always records an error.
        (Ok(()), _, _) => fallback::expand(input, &krate),
    }
}

fn check_placeholders(cx: &mut Ctxt, item: &Item, segments: &[Segment], lit: &LitStr) {
    for segment in segments {
        let Segment::Field(field) = segment else {
            continue;
        };
        if item.named_field(field).is_some() {
            continue;
        }
        let message = match item.fields {
            Fields::Named(_) => format!(
                "subject placeholder `{{{field}}}` names no field of `{}`; the fields are: {}",
                item.ident,
                item.field_names().join(", ")
            ),
            Fields::Unnamed(_) | Fields::Unit => format!(
                "subject placeholder `{{{field}}}` needs a named field, but `{}` has none; \
                 use a struct with named fields or remove the placeholder",
                item.ident
            ),
        };
        cx.error_spanned_by(lit, message);
    }
}

fn impl_event(krate: &syn::Path, item: &Item, name: &str, attrs: &Attrs) -> TokenStream {
    let ident = item.ident;
    let version = attrs.version.as_ref().map_or(1, |(v, _)| *v);
    let (template, subject_body) = match &attrs.subject {
        None => (
            name.to_owned(),
            quote! { ::core::result::Result::Ok(::std::string::String::from(#name)) },
        ),
        Some((segments, lit)) => (lit.value(), subject_body(krate, item, segments, lit)),
    };
    let schema = attrs
        .schema
        .as_ref()
        .map(|_| quote! { #krate::__private::event_schema!(#ident); });

    quote! {
        #[doc(hidden)]
        const _: () = {
            #[automatically_derived]
            impl #krate::DomainEvent for #ident {
                const NAME: &'static str = #name;
                const VERSION: u32 = #version;
                const SUBJECT_TEMPLATE: &'static str = #template;

                fn subject(
                    &self,
                ) -> ::core::result::Result<::std::string::String, #krate::SubjectError> {
                    #subject_body
                }
            }

            #krate::__private::inventory::submit! {
                #krate::__private::EventType::__new::<#ident>(
                    ::core::concat!(::core::module_path!(), "::", ::core::stringify!(#ident)),
                )
            }
            #schema
        };
    }
}

fn subject_body(krate: &syn::Path, item: &Item, segments: &[Segment], lit: &LitStr) -> TokenStream {
    let pushes = segments.iter().map(|segment| match segment {
        Segment::Literal(text) => quote! {
            #krate::__private::push_literal(&mut __subject, #text);
        },
        Segment::Field(field) => {
            // check_placeholders has made sure the field exists.
            let member = item.named_field(field);
            // Spanned at the subject literal, so a field without `Display` is reported
            // where the placeholder was written.
            quote_spanned! {lit.span()=>
                #krate::__private::push_field(
                    &mut __subject,
                    <Self as #krate::DomainEvent>::NAME,
                    #field,
                    &self.#member,
                )?;
            }
        }
    });
    quote! {
        let mut __subject = ::std::string::String::with_capacity(64);
        #(#pushes)*
        ::core::result::Result::Ok(__subject)
    }
}
