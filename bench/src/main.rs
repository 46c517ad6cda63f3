//! Benchmarks of every stage beside its raw baseline (filled by the benchmarks issue).
fn main() {}
