//! Compile-time checks of `#[derive(DomainEvent)]`.
//!
//! Each `ui/fail/*.rs` must fail to build with exactly the errors in its `.stderr`;
//! each `ui/pass/*.rs` must build and run. After an intended change to a message, run
//! `TRYBUILD=overwrite cargo test -p edupulse-events-tests --test ui` and review the
//! rewritten `.stderr` files before committing them.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/fail/*.rs");
    t.pass("tests/ui/pass/*.rs");
}
