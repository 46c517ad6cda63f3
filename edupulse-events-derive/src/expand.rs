//! Writes the `DomainEvent` impl and the registry entry of a valid item.

use crate::ast::Item;
use crate::attr::{self, Attrs};
use crate::ctxt::Ctxt;
use crate::fallback;
use crate::valid::Segment;
use proc_macro2::{Delimiter, Group, Span, TokenStream};
use quote::{quote, quote_spanned};
use syn::spanned::Spanned;
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
    if let Some(previous) = &attrs.previous {
        check_previous_on_first(&mut cx, &attrs, previous);
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

/// `previous` needs a version before this one: this one must be 2 or later.
fn check_previous_on_first(cx: &mut Ctxt, attrs: &Attrs, previous: &syn::Path) {
    let what = match &attrs.version {
        Some((version, _)) if *version > 1 => return,
        Some(_) => "this is `version = 1`",
        None => "this event has no `version`, so it is version 1",
    };
    let written = quote!(#previous).to_string().replace(' ', "");
    cx.error_spanned_by(
        previous,
        format!(
            "`previous = {written}` names the version before this one, but {what}, the \
             first: write `version = 2` here (with `{written}` as version 1), or remove \
             `previous`"
        ),
    );
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

    let (previous_items, previous_checks) = match &attrs.previous {
        Some(previous) => previous_tokens(krate, name, version, previous),
        None => (TokenStream::new(), TokenStream::new()),
    };

    quote! {
        #[doc(hidden)]
        const _: () = {
            #previous_checks

            #[automatically_derived]
            impl #krate::DomainEvent for #ident {
                const NAME: &'static str = #name;
                const VERSION: u32 = #version;
                const SUBJECT_TEMPLATE: &'static str = #template;
                #previous_items

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

/// The trait items of an event with `previous = ...`, and the compile-time checks of
/// the previous type (same name, version one lower, a `From` conversion), all spanned
/// at the `previous` value so that errors point there.
fn previous_tokens(
    krate: &syn::Path,
    name: &str,
    version: u32,
    previous: &syn::Path,
) -> (TokenStream, TokenStream) {
    let span = previous.span();
    // Spans cannot be joined on stable: tokens that start at the path's first segment
    // and end at its last make rustc underline the whole path.
    let last = previous
        .segments
        .last()
        .map_or(span, |segment| segment.ident.span());
    let written = quote!(#previous).to_string().replace(' ', "");
    let before = version - 1;
    let name_message = format!(
        "`previous = {written}` must be a version of event `{name}`, but `{written}` has \
         another name: give it `#[event(name = \"{name}\", version = {before})]`, or name \
         the type of version {before} of `{name}` in `previous`"
    );
    let version_message = format!(
        "`previous = {written}` must be version {before} of `{name}` (one below this \
         version {version}), but its version differs: give it `version = {before}`, or name \
         the type of version {before} in `previous`"
    );
    let event = quote_spanned!(span=> #krate::DomainEvent);
    let method = quote_spanned!(last=> upcast_from);
    let upcast_from = quote_spanned! {span=>
        <Self as #krate::__private::UpcastFrom<#previous>>::#method
    };
    let items = quote_spanned! {span=>
        const __OLDEST_VERSION: u32 = if <#previous as #event>::VERSION + 1 == #version {
            <#previous as #event>::__OLDEST_VERSION
        } else {
            #version
        };
        const __PREVIOUS: ::core::option::Option<#krate::__private::Previous> =
            ::core::option::Option::Some(#krate::__private::Previous::of::<#previous>());

        fn __upcast(
            version: u32,
            payload: &[u8],
        ) -> ::core::option::Option<
            ::core::result::Result<Self, #krate::serde_json::Error>,
        > {
            if version == #version {
                return ::core::option::Option::Some(#krate::serde_json::from_slice(payload));
            }
            let older = <#previous as #event>::__upcast(version, payload)?;
            ::core::option::Option::Some(older.map(#upcast_from))
        }
    };
    let name_check = spanned_assert(
        span,
        last,
        quote_spanned! {span=>
            #krate::__private::same_str(<#previous as #event>::NAME, #name),
            #name_message
        },
    );
    let version_check = spanned_assert(
        span,
        last,
        quote_spanned! {span=>
            <#previous as #event>::VERSION == #before,
            #version_message
        },
    );
    let checks = quote! {
        const _: () = #name_check;
        const _: () = #version_check;
    };
    (items, checks)
}

/// `::core::assert!(args)`, starting at `first` and ending at `last`.
fn spanned_assert(first: Span, last: Span, args: TokenStream) -> TokenStream {
    let mut group = Group::new(Delimiter::Parenthesis, args);
    group.set_span(last);
    quote_spanned!(first=> ::core::assert! #group)
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
