//! Shared by the store tests: the synthetic data lives in the library for `blipdex bench search`.
#![allow(unused_imports)]

pub use blipdex_store::synth::*;
