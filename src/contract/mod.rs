//! The typed Lua contract: everything that knows what a script's KEYS, ARGV and reply mean.
//!
//! One module per script in `lua/`, named after it: its typed KEYS and ARGV builders
//! (`keys`, `argv` or the arguments of `call`), `call` (the one place the script is run) and
//! `decode` (the ONE reader of its reply, into a closed enum or a struct). Beside them: the
//! key layout ([`keys`]), the slot metadata fields ([`meta`]), the claims record the claim
//! script appends to its shard's log for each call ([`claim_record`]), and the messages
//! instances send each other ([`events`]).
//!
//! | script          | module            | reply decoded into                       |
//! |-----------------|-------------------|------------------------------------------|
//! | `claim`         | [`claim`]         | [`claim::Outcome`]                       |
//! | `replay`        | [`replay`]        | `Option<`[`claim::Coupon`]`>`            |
//! | `setup`         | [`setup`]         | [`setup::Created`]                       |
//! | `patch`         | [`patch`]         | [`patch::Patched`]                       |
//! | `transfer_out`  | [`transfer_out`]  | [`transfer_out::Moved`]                  |
//! | `transfer_in`   | [`transfer_in`]   | [`transfer_in::Credit`]                  |
//! | `transfer_done` | [`transfer_done`] | closed now or before                     |
//! | `probe`         | [`probe`]         | [`probe::Probe`]                         |
//! | `inbox_check`   | [`inbox_check`]   | credited or not                          |
//! | `mark_soldout`  | [`mark_soldout`]  | [`mark_soldout::Marked`]                 |
//! | `meta_get`      | [`meta_get`]      | [`meta::SlotMeta`]                       |
//! | `winners`       | [`winners`]       | (user, count) pairs                      |
//! | `codes_add`     | [`codes_add`]     | [`codes_add::Added`]                     |
//! | `coupon`        | [`coupon`]        | [`coupon::Got`], [`coupon::Set`]         |
//! | `recent`        | [`recent`]        | (coupon id, touched ms) pairs            |
//! | `log_read`      | [`log_read`]      | [`log_read::LogEntry`]s                  |
//! | `log_ack`       | [`log_ack`]       | entries removed                          |
//! | `log_count`     | [`log_count`]     | [`log_count::Page`]                      |
//! | `restore`       | [`restore`]       | [`restore::Step`]                        |
//! | `retire`        | [`retire`]        | [`retire::Retired`]                      |
//! | `rotate`        | [`rotate`]        | [`rotate::Rotated`]                      |
//!
//! Invariants kept here: no module outside `contract` runs a script or reads a reply (the
//! layering test checks that `Script::` and `.eval(` appear nowhere else); every decoder
//! turns a shape its script's header does not promise into `BackendError::Protocol`, never
//! into a guess; and the KEYS each module builds are, in order, the ones its script's header
//! lists (tested below against the headers themselves).

pub mod claim;
pub mod claim_record;
pub mod codes_add;
pub mod coupon;
pub mod events;
pub mod inbox_check;
pub mod keys;
pub mod log_ack;
pub mod log_count;
pub mod log_read;
pub mod mark_soldout;
pub mod meta;
pub mod meta_get;
pub mod patch;
pub mod probe;
pub mod recent;
pub mod replay;
mod reply;
pub mod restore;
pub mod retire;
pub mod rotate;
pub mod setup;
pub mod transfer_done;
pub mod transfer_in;
pub mod transfer_out;
pub mod winners;

#[cfg(test)]
mod tests {
    use super::keys::SlotKeys;
    use crate::backend::Script;

    /// Key names in the KEYS section of a script's header, in order.
    fn header_keys(script: Script) -> Vec<String> {
        let mut out = Vec::new();
        let mut in_keys = false;
        for line in script.source().lines() {
            let Some(text) = line.strip_prefix("--") else {
                break; // the header ends with the first line of code
            };
            let text = text.trim();
            if text.starts_with("KEYS") {
                in_keys = true;
            } else if text.starts_with("ARGV") || text.starts_with("Returns") {
                in_keys = false;
            }
            if !in_keys {
                continue;
            }
            let words: Vec<&str> = text
                .split(|c: char| c.is_whitespace() || c == ':')
                .filter(|w| !w.is_empty())
                .collect();
            for (i, w) in words.iter().enumerate() {
                if w.bytes().all(|b| b.is_ascii_digit()) {
                    let name = match words.get(i + 1) {
                        Some(&"pool") => words.get(i + 2),
                        other => other,
                    };
                    let is_name = |n: &&&str| {
                        n.starts_with(|c: char| c.is_ascii_lowercase())
                            && n.bytes()
                                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
                    };
                    if let Some(name) = name.filter(is_name) {
                        out.push(name.to_string());
                    }
                }
            }
        }
        out
    }

    /// The name of a key of the layout (`cg:{b:0}:out` -> `outbox`).
    fn key_name(key: &str) -> String {
        let suffix = key.split_once("}:").map(|(_, s)| s).unwrap_or(key);
        match suffix {
            "out" => "outbox".to_string(),
            s if s.starts_with("in:") => "inbox".to_string(),
            s => s.to_string(),
        }
    }

    #[test]
    fn every_module_builds_the_keys_its_script_header_lists() {
        let s = SlotKeys::new("b", Some(0));
        let inbox = s.inbox("t1");
        let recent = super::keys::recent_key("u1");
        let built: Vec<(Script, Vec<&str>)> = vec![
            (Script::Claim, super::claim::keys(&s).to_vec()),
            (Script::Replay, super::replay::keys(&s).to_vec()),
            (Script::Setup, super::setup::keys(&s).to_vec()),
            (Script::Patch, super::patch::keys(&s).to_vec()),
            (Script::TransferOut, super::transfer_out::keys(&s).to_vec()),
            (
                Script::TransferIn,
                super::transfer_in::keys(&s, &inbox).to_vec(),
            ),
            (
                Script::TransferDone,
                super::transfer_done::keys(&s).to_vec(),
            ),
            (Script::Probe, super::probe::keys(&s).to_vec()),
            (
                Script::InboxCheck,
                super::inbox_check::keys(&inbox).to_vec(),
            ),
            (Script::MarkSoldout, super::mark_soldout::keys(&s).to_vec()),
            (Script::MetaGet, super::meta_get::keys(&s).to_vec()),
            (Script::Winners, super::winners::keys(&s).to_vec()),
            (Script::CodesAdd, super::codes_add::keys(&s).to_vec()),
            (Script::Coupon, super::coupon::keys(&s).to_vec()),
            (Script::Recent, super::recent::keys(&recent).to_vec()),
            (Script::LogRead, super::log_read::keys(&s.log).to_vec()),
            (Script::LogAck, super::log_ack::keys(&s.log).to_vec()),
            (Script::LogCount, super::log_count::keys(&s.log).to_vec()),
            (Script::Restore, super::restore::keys(&s).to_vec()),
            (Script::Retire, super::retire::keys(&s).to_vec()),
            (Script::Rotate, super::rotate::keys(&s).to_vec()),
        ];
        let mut covered: Vec<Script> = built.iter().map(|(s, _)| *s).collect();
        covered.sort_by_key(|s| s.name());
        let mut all = Script::ALL.to_vec();
        all.sort_by_key(|s| s.name());
        assert_eq!(covered, all, "every script has a typed module");
        for (script, keys) in built {
            let names: Vec<String> = keys.iter().map(|k| key_name(k)).collect();
            assert_eq!(
                names,
                header_keys(script),
                "{}: KEYS built vs the header",
                script.name()
            );
        }
    }
}
