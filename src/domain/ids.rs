//! Identifiers and their alphabets: user and request ids, batch ids, coupon ids, and the
//! home shard a user id routes to.
//!
//! Invariants kept here:
//! - every id a client sends is checked against one alphabet defined once here, and none of
//!   them can hold `|`, `{`, `}`, `:` or a space: the characters the key layout and the
//!   scripts' record formats use as separators;
//! - a coupon id is `<batch id>.<shard>.<sequence>` (`lua/claim.lua` mints it from the
//!   shard's claim counter and the batch's epoch: `sequence = epoch * EPOCH_SPAN +
//!   counter`); [`parse_coupon_id`] is the one reader of that format, and
//!   [`seq_epoch`] / [`seq_position`] split a sequence;
//! - [`home_shard`] never changes: it routes live data.

/// `[A-Za-z0-9._@+-]{1,128}`: user ids, request ids and order ids.
pub fn valid_ident(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'@' | b'+' | b'-'))
}

/// Prefix of the request ids the gateway makes itself (a claim that came without one: `~`
/// and a fresh random nonce; a grant job's line: `~g.<job id>`): outside [`valid_ident`]'s
/// alphabet, so never a client's.
pub const INTERNAL_REQUEST_ID: char = '~';

/// `[A-Za-z0-9_-]{1,64}`.
pub fn valid_batch_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Home shard of a user: a stable hash (FNV-1a 64) of the user id mod the shard count.
/// Stable across processes, versions and machines; never change it (it routes live data).
pub fn home_shard(user_id: &str, shards: u32) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in user_id.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % u64::from(shards.max(1))) as u32
}

/// Coupon sequences of one epoch: epoch `e` mints `e * EPOCH_SPAN + 1`, `+ 2`, ... (the same
/// `10^12` as in `lua/claim.lua`). Every rebuild moves a batch to a new epoch, recorded in
/// the database first, so an id minted by a Redis state that was later lost is never minted
/// again. 10^12 claims per shard and epoch is far past any stock (`limits.max_stock`), and
/// `9000 * 10^12` is still exact in the scripts' doubles (below 2^53).
pub const EPOCH_SPAN: u64 = 1_000_000_000_000;

/// The epoch a coupon sequence was minted in.
pub fn seq_epoch(seq: u64) -> u64 {
    seq / EPOCH_SPAN
}

/// The claim-counter value a coupon sequence was minted at (its place in the shard's count
/// of coupons ever issued, across epochs: a rebuild resumes the counter, not the ids).
pub fn seq_position(seq: u64) -> u64 {
    seq % EPOCH_SPAN
}

/// Coupon sequences a [`MintWindow`] remembers below the highest it saw: within the window a
/// sequence seen twice for two different claims is exact evidence of a rollback (replies
/// arriving out of order never repeat one). Below it, nothing can be told here (the
/// database's floor still can).
pub const MINT_WINDOW: u64 = 8192;

/// What a [`MintWindow`] knew of a sequence when it was shown one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sighting {
    /// Not seen within the window (or too far below it to tell): recorded now.
    New,
    /// Seen before, for the same claim (the same user and request id).
    Same,
    /// Seen before, for another claim: the slot minted it twice.
    Other,
}

/// The coupon sequences one instance saw a slot hand out, each with a fingerprint of the
/// claim (user, request id) it went to, to tell a slot that mints a sequence again (a
/// failover rolled it back) from replies that merely arrive out of order, and a replay of
/// the same claim from a re-minted id going to another claim. Its tags are allocated at the
/// first sighting: most slot keys never see one (pools, tools). 32 KiB per minting slot.
#[derive(Debug, Clone, Default)]
pub struct MintWindow {
    max: u64,
    /// Per sequence (mod [`MINT_WINDOW`]) the owner's fingerprint, 0 = not seen.
    tags: Vec<u32>,
}

/// The fingerprint of a claim (user, request id) that [`MintWindow`] records: never 0.
pub fn claim_tag(user: &str, request_id: &str) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in user.bytes().chain([b'|']).chain(request_id.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    ((h ^ (h >> 32)) as u32).max(1)
}

impl MintWindow {
    /// The highest sequence shown so far (0 = none): the shard minted it, so a shard whose
    /// next sequence is not above it was rolled back.
    pub fn highest(&self) -> u64 {
        self.max
    }

    /// Shows the window `seq`, handed out to the claim tagged `tag` ([`claim_tag`]).
    pub fn sight(&mut self, seq: u64, tag: u32) -> Sighting {
        if self.tags.is_empty() {
            self.tags = vec![0; MINT_WINDOW as usize];
        }
        let i = |q: u64| (q % MINT_WINDOW) as usize;
        if seq > self.max {
            let from = self.max.max(seq.saturating_sub(MINT_WINDOW)) + 1;
            for q in from..=seq {
                self.tags[i(q)] = 0;
            }
            self.max = seq;
            self.tags[i(seq)] = tag;
            return Sighting::New;
        }
        if self.max - seq >= MINT_WINDOW {
            return Sighting::New;
        }
        match self.tags[i(seq)] {
            0 => {
                self.tags[i(seq)] = tag;
                Sighting::New
            }
            t if t == tag => Sighting::Same,
            _ => Sighting::Other,
        }
    }
}

/// The coupon id `<batch>.<shard>.<seq>` (the format `lua/claim.lua` mints).
pub fn coupon_id(batch: &str, shard: u32, seq: u64) -> String {
    format!("{batch}.{shard}.{seq}")
}

/// Splits a coupon id `<batch>.<shard>.<seq>` into its batch, shard and sequence.
pub fn parse_coupon_id(coupon_id: &str) -> Option<(&str, u32, u64)> {
    let mut it = coupon_id.rsplitn(3, '.');
    let seq = it.next()?.parse().ok()?;
    let shard = it.next()?.parse().ok()?;
    let batch = it.next()?;
    if batch.is_empty() {
        return None;
    }
    Some((batch, shard, seq))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mint_window_tells_reordering_from_a_rollback() {
        let mut w = MintWindow::default();
        let (a, b) = (claim_tag("u1", "r1"), claim_tag("u2", "r2"));
        assert_ne!(a, b);
        assert_ne!(
            claim_tag("u1", "r1x"),
            claim_tag("u1r", "1x"),
            "the separator counts"
        );
        assert_eq!(w.highest(), 0);
        assert_eq!(w.sight(5, a), Sighting::New);
        assert_eq!(w.sight(3, a), Sighting::New, "out of order");
        assert_eq!(w.highest(), 5);
        assert_eq!(w.sight(4, b), Sighting::New);
        assert_eq!(
            w.sight(4, b),
            Sighting::Same,
            "the same claim again (a replay)"
        );
        assert_eq!(w.sight(4, a), Sighting::Other, "minted twice");
        assert_eq!(w.sight(10_000, a), Sighting::New);
        assert_eq!(
            w.sight(10_000 - MINT_WINDOW + 1, b),
            Sighting::New,
            "at the window's edge"
        );
        assert_eq!(
            w.sight(5, b),
            Sighting::New,
            "far below the window: not known here"
        );
        assert_eq!(w.sight(10_000, b), Sighting::Other);
        // a new epoch starts far above
        assert_eq!(w.sight(EPOCH_SPAN + 1, a), Sighting::New);
        assert_eq!(w.sight(EPOCH_SPAN + 1, b), Sighting::Other);
        assert_eq!(w.sight(EPOCH_SPAN + 2, b), Sighting::New);
    }

    #[test]
    fn epochs_split_sequences_and_match_the_claim_script() {
        assert_eq!((seq_epoch(7), seq_position(7)), (0, 7));
        let s = 3 * EPOCH_SPAN + 42;
        assert_eq!((seq_epoch(s), seq_position(s)), (3, 42));
        let script = include_str!("../../lua/claim.lua");
        assert!(
            script.contains(&format!("* {EPOCH_SPAN}")),
            "lua/claim.lua must mint with the same epoch span"
        );
        let ceiling = u64::try_from(crate::config::MAX_STOCK_CEILING).unwrap();
        assert!(
            ceiling * 100 <= EPOCH_SPAN,
            "stock (with refunds) stays inside an epoch"
        );
    }

    #[test]
    fn identifiers() {
        for ok in ["u1", "a.b_c@d+e-f", &"x".repeat(128)] {
            assert!(valid_ident(ok), "{ok}");
        }
        for bad in [
            "",
            "a b",
            "a{b}",
            "a:b",
            "a\nb",
            "ü",
            &"x".repeat(129),
            "~x",
        ] {
            assert!(!valid_ident(bad), "{bad:?}");
        }
    }

    #[test]
    fn home_shard_is_stable_and_in_range() {
        // Fixed values: changing the hash would re-route live users.
        assert_eq!(home_shard("u1", 16), home_shard("u1", 16));
        assert_eq!(home_shard("", 16), (0xcbf2_9ce4_8422_2325u64 % 16) as u32);
        for i in 0..1000 {
            assert!(home_shard(&format!("user{i}"), 7) < 7);
        }
        let mut counts = [0u32; 8];
        for i in 0..8000 {
            counts[home_shard(&format!("user{i}"), 8) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| c > 800), "{counts:?}");
    }

    #[test]
    fn coupon_ids_round_trip() {
        assert_eq!(
            parse_coupon_id("double11-5off.3.42"),
            Some(("double11-5off", 3, 42))
        );
        assert_eq!(parse_coupon_id("a_b.0.1"), Some(("a_b", 0, 1)));
        assert_eq!(parse_coupon_id(".0.1"), None);
        assert_eq!(parse_coupon_id("x.y.1"), None);
        assert_eq!(parse_coupon_id("x.1"), None);
    }
}
