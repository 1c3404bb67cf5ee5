//! The `sluice` binary: composition only.
fn main() {}
