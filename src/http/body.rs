//! Request bodies: read whole, never more than `server.max_body_bytes`.
//!
//! Invariant kept here: an oversized body is refused (400) without being read, and the
//! connection is marked to close after the answer (the server then drains what the client
//! still sends, bounded, so the client reads the 400 instead of a reset).

use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Body;

use crate::api::ApiError;

/// Reads the whole body, refusing more than `limit` bytes. A refused body is left unread
/// and `cut` is set: the answer then says `Connection: close`, and the server drains what
/// the client still sends before closing (see `server::linger`), so the client reads the
/// 400 instead of a reset.
pub async fn read_body<Bd>(body: Bd, limit: usize, cut: &AtomicBool) -> Result<Bytes, ApiError>
where
    Bd: Body<Data = Bytes>,
    Bd::Error: std::error::Error + Send + Sync + 'static,
{
    let too_large = || {
        cut.store(true, Ordering::Relaxed);
        ApiError::BadRequest(format!("body larger than {limit} bytes"))
    };
    if body.size_hint().lower() > limit as u64 {
        return Err(too_large());
    }
    match Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => {
            cut.store(true, Ordering::Relaxed);
            Err(ApiError::BadRequest(format!("could not read body: {e}")))
        }
    }
}
