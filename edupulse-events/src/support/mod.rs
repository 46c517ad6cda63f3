//! Leaves shared by the outbox, the relay and the consumer. Nothing here imports
//! anything else of the crate, so the three can use it without importing each other.

pub(crate) mod pg;
pub(crate) mod range;
pub(crate) mod retry;
pub(crate) mod sql;

/// Gives error types a `Debug` that is their `Display` (which says what went wrong and
/// what to do), under the type's name: what `main() -> Result<_, Box<dyn Error>>`
/// prints then keeps the hint. The message is already free of credentials.
macro_rules! debug_as_display {
    ($($ty:ty),+ $(,)?) => {$(
        impl ::std::fmt::Debug for $ty {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.debug_tuple(stringify!($ty))
                    .field(&format_args!("{self}"))
                    .finish()
            }
        }
    )+};
}
pub(crate) use debug_as_display;
