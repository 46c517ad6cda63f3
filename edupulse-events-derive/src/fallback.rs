//! What a failed derive emits beside its errors: a stub impl, so that code using the
//! type as an event does not add a cascade of unrelated errors to the real ones.

use proc_macro2::TokenStream;
use quote::quote;
use syn::DeriveInput;

/// A stub `DomainEvent` impl for `input`, or nothing where a stub would itself fail
/// (generic items, whose bounds the stub cannot know, and unions, which serde cannot
/// derive for).
pub fn expand(input: &DeriveInput, krate: &syn::Path) -> TokenStream {
    if !input.generics.params.is_empty() || matches!(input.data, syn::Data::Union(_)) {
        return TokenStream::new();
    }
    let ident = &input.ident;
    quote! {
        #[doc(hidden)]
        const _: () = {
            #[automatically_derived]
            impl #krate::DomainEvent for #ident {
                const NAME: &'static str = "";
                const VERSION: u32 = 1;
                const SUBJECT_TEMPLATE: &'static str = "";

                fn subject(
                    &self,
                ) -> ::core::result::Result<::std::string::String, #krate::SubjectError> {
                    ::core::unreachable!()
                }
            }
        };
    }
}
