//! Idempotent creates: see [`usher_kit::idempotency`].

pub use usher_kit::idempotency::*;
