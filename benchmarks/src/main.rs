//! The Sluice benchmark binary (see issue: written next).
fn main() {}
