//! Request bodies: read whole, never more than `server.max_body_bytes` (or a route's own
//! bound), or streamed frame by frame ([`BodyStream`], the grant upload) under a bound of
//! its own.
//!
//! Invariant kept here: an oversized body is refused (400) without being read, and the
//! connection is marked to close after the answer (the server then drains what the client
//! still sends, bounded, so the client reads the 400 instead of a reset).

use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Body;
use std::pin::Pin;

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

/// A body read frame by frame as it arrives, never more than `limit` bytes in all: memory
/// holds one frame at a time. Past the limit, or when the body cannot be read, `cut` is set
/// (the answer closes the connection, as for [`read_body`]).
pub struct BodyStream<'a, Bd> {
    body: Pin<Box<Bd>>,
    limit: u64,
    seen: u64,
    cut: &'a AtomicBool,
}

impl<'a, Bd> BodyStream<'a, Bd>
where
    Bd: Body<Data = Bytes>,
    Bd::Error: std::error::Error + Send + Sync + 'static,
{
    pub fn new(body: Bd, limit: u64, cut: &'a AtomicBool) -> Self {
        BodyStream {
            body: Box::pin(body),
            limit,
            seen: 0,
            cut,
        }
    }

    /// Marks the body as left unread (an answer given before its end).
    pub fn abandon(&self) {
        self.cut.store(true, Ordering::Relaxed);
    }

    /// The next bytes, `None` at the end.
    pub async fn next(&mut self) -> Result<Option<Bytes>, ApiError> {
        if self.seen == 0 && self.body.size_hint().lower() > self.limit {
            self.abandon();
            return Err(too_large(self.limit));
        }
        loop {
            let Some(frame) = self.body.frame().await else {
                return Ok(None);
            };
            let frame = frame.map_err(|e| {
                self.abandon();
                ApiError::BadRequest(format!("could not read body: {e}"))
            })?;
            let Ok(data) = frame.into_data() else {
                continue; // trailers
            };
            self.seen += data.len() as u64;
            if self.seen > self.limit {
                self.abandon();
                return Err(too_large(self.limit));
            }
            if !data.is_empty() {
                return Ok(Some(data));
            }
        }
    }
}

fn too_large(limit: u64) -> ApiError {
    ApiError::BadRequest(format!("body larger than {limit} bytes"))
}
