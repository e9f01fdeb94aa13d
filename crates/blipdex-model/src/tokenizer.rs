//! placeholder: owned by the processor helper
