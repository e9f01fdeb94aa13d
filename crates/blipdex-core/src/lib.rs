//! Types and errors shared by every blipdex crate. Deliberately free of candle and tonic so
//! that the store, the server and the CLI can agree on one error vocabulary.

mod error;
pub mod paths;

pub use error::{Error, ObjectStoreErrorKind, Result};
