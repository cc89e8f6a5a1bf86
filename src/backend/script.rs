//! The registry of the Lua scripts in `lua/`: a closed set, each with its name (the
//! `script` metric label) and its text, compiled into the binary.
//!
//! Invariant kept here: the registry is the only place a script text enters the binary;
//! every backend loads (Redis: `SCRIPT LOAD`) or compiles (embedded) exactly these, at start.
//! Adding a script: its file in `lua/` (with its KEYS/ARGV/returns header), a variant here,
//! its name in `crate::obs::metrics::SCRIPTS`, and its typed module in `crate::contract`.

/// The scripts in `lua/`, closed set. The text is compiled into the binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Script {
    Claim,
    Setup,
    Patch,
    TransferOut,
    TransferIn,
    TransferDone,
    Probe,
    InboxCheck,
    MarkSoldout,
    MetaGet,
    LogRead,
    LogAck,
    LogCount,
    Restore,
    Replay,
    Winners,
    CodesAdd,
    Coupon,
    Recent,
    Retire,
    Rotate,
}

impl Script {
    pub const ALL: [Script; 21] = [
        Script::Claim,
        Script::Setup,
        Script::Patch,
        Script::TransferOut,
        Script::TransferIn,
        Script::TransferDone,
        Script::Probe,
        Script::InboxCheck,
        Script::MarkSoldout,
        Script::MetaGet,
        Script::LogRead,
        Script::LogAck,
        Script::LogCount,
        Script::Restore,
        Script::Replay,
        Script::Winners,
        Script::CodesAdd,
        Script::Coupon,
        Script::Recent,
        Script::Retire,
        Script::Rotate,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Script::Claim => "claim",
            Script::Setup => "setup",
            Script::Patch => "patch",
            Script::TransferOut => "transfer_out",
            Script::TransferIn => "transfer_in",
            Script::TransferDone => "transfer_done",
            Script::Probe => "probe",
            Script::InboxCheck => "inbox_check",
            Script::MarkSoldout => "mark_soldout",
            Script::MetaGet => "meta_get",
            Script::LogRead => "log_read",
            Script::LogAck => "log_ack",
            Script::LogCount => "log_count",
            Script::Restore => "restore",
            Script::Replay => "replay",
            Script::Winners => "winners",
            Script::CodesAdd => "codes_add",
            Script::Coupon => "coupon",
            Script::Recent => "recent",
            Script::Retire => "retire",
            Script::Rotate => "rotate",
        }
    }

    pub fn source(self) -> &'static str {
        match self {
            Script::Claim => include_str!("../../lua/claim.lua"),
            Script::Setup => include_str!("../../lua/setup.lua"),
            Script::Patch => include_str!("../../lua/patch.lua"),
            Script::TransferOut => include_str!("../../lua/transfer_out.lua"),
            Script::TransferIn => include_str!("../../lua/transfer_in.lua"),
            Script::TransferDone => include_str!("../../lua/transfer_done.lua"),
            Script::Probe => include_str!("../../lua/probe.lua"),
            Script::InboxCheck => include_str!("../../lua/inbox_check.lua"),
            Script::MarkSoldout => include_str!("../../lua/mark_soldout.lua"),
            Script::MetaGet => include_str!("../../lua/meta_get.lua"),
            Script::LogRead => include_str!("../../lua/log_read.lua"),
            Script::LogAck => include_str!("../../lua/log_ack.lua"),
            Script::LogCount => include_str!("../../lua/log_count.lua"),
            Script::Restore => include_str!("../../lua/restore.lua"),
            Script::Replay => include_str!("../../lua/replay.lua"),
            Script::Winners => include_str!("../../lua/winners.lua"),
            Script::CodesAdd => include_str!("../../lua/codes_add.lua"),
            Script::Coupon => include_str!("../../lua/coupon.lua"),
            Script::Recent => include_str!("../../lua/recent.lua"),
            Script::Retire => include_str!("../../lua/retire.lua"),
            Script::Rotate => include_str!("../../lua/rotate.lua"),
        }
    }

    /// SHA1 of the script text, as `SCRIPT LOAD` returns it.
    pub fn sha1(self) -> String {
        sha1_smol::Sha1::from(self.source()).digest().to_string()
    }
}
