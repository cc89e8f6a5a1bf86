//! The messages gateway instances send each other on the events channel (Redis pub/sub
//! `cg:events`; an in-process broadcast on the embedded backend): `soldout <batch>` and
//! `changed <batch>`.
//!
//! Invariant kept here: [`Event::encode`] and [`Event::parse`] are the one writer and the
//! one reader of the format; a message that is not one of these is ignored by readers (a
//! newer instance may send kinds an older one does not know).

use crate::backend::{Backend, BackendError};

/// A message between instances. Losing one is harmless: the periodic refresh catches up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The batch is sold out: answer from memory from now on.
    SoldOut(String),
    /// The batch was created or changed: forget a "not found" mark, re-read its metadata.
    Changed(String),
}

impl Event {
    pub fn encode(&self) -> String {
        match self {
            Event::SoldOut(b) => format!("soldout {b}"),
            Event::Changed(b) => format!("changed {b}"),
        }
    }

    /// The event a message carries; `None` for anything else.
    pub fn parse(msg: &str) -> Option<Event> {
        let (kind, batch) = msg.split_once(' ')?;
        match kind {
            "soldout" => Some(Event::SoldOut(batch.to_string())),
            "changed" => Some(Event::Changed(batch.to_string())),
            _ => None,
        }
    }
}

/// Sends `event` to every instance (this one included).
pub async fn publish<B: Backend>(backend: &B, event: &Event) -> Result<(), BackendError> {
    backend.publish(&event.encode()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip() {
        for e in [Event::SoldOut("b-1".into()), Event::Changed("x_2".into())] {
            assert_eq!(Event::parse(&e.encode()), Some(e));
        }
        assert_eq!(Event::parse("other b"), None);
        assert_eq!(Event::parse("soldout"), None);
    }
}
