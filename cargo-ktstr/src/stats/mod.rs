//! `cargo ktstr stats`: the run artifacts as tables per test, and one
//! kernel against another.

pub mod aggregate;
pub mod compare;
pub mod load;
pub mod render;
#[cfg(test)]
mod fixture_tests;
