//! The domain: what a batch is and how it is validated ([`batch`]), time and the clock
//! ([`time`]), identifiers and routing ([`ids`]), the claim record ([`claim`]), the coupon
//! state machine ([`coupon`]), who the caller is ([`auth`]) and the local edge limits
//! ([`limits`]), the checkout quote ([`quote`]), and the coupon codes of code pools
//! ([`codes`]). Builds on `config` and `obs` only.
//!
//! Invariant kept here: everything a client can send is validated by these types before it
//! reaches a script or the database.

pub mod auth;
pub mod batch;
pub mod claim;
pub mod codes;
pub mod coupon;
pub mod ids;
pub mod limits;
pub mod quote;
pub mod time;
