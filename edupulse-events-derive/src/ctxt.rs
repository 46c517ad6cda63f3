//! Collects every error found in one item, so that all of them are reported in one build
//! (after serde_derive's `internals/ctxt.rs`).

use proc_macro2::TokenStream;
use quote::ToTokens;
use std::fmt::Display;

/// The errors found so far in one derive input.
#[derive(Default)]
pub struct Ctxt {
    errors: Vec<syn::Error>,
}

impl Ctxt {
    pub fn new() -> Self {
        Ctxt::default()
    }

    /// Records an error that points at `tokens`.
    pub fn error_spanned_by<T: ToTokens, M: Display>(&mut self, tokens: T, message: M) {
        self.errors
            .push(syn::Error::new_spanned(tokens.into_token_stream(), message));
    }

    /// Records an error that syn already built (a parse error, say).
    pub fn syn_error(&mut self, error: syn::Error) {
        self.errors.push(error);
    }

    /// Ends collection: `Ok` if there was no error, else the `compile_error!`s of all of them.
    pub fn check(self) -> Result<(), TokenStream> {
        if self.errors.is_empty() {
            return Ok(());
        }
        Err(self
            .errors
            .into_iter()
            .map(|error| error.to_compile_error())
            .collect())
    }
}
