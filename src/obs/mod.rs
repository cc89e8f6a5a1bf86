//! Observability, a leaf of the crate (it imports nothing of it): the metric names, label
//! sets and recorder ([`metrics`]), and one struct per counted event ([`events`]) whose
//! `emit()` records the metric and writes the log line together.
//!
//! Invariant kept here: every metric the gateway exports is named in [`metrics`] and
//! recorded by an event of [`events`]; nothing else in the crate touches the recorder.

pub mod events;
pub mod metrics;
