-- claimgate schema 0008 (SQLite): code pools. A batch may hand out codes (generated at its create,
-- or imported partner codes); each coupon claimed carries one.
-- Invariants kept here: a code is recorded once per batch (the primary key deduplicates
-- every import against every code the batch ever had); a code row reaches Redis in its
-- chunk, and `loaded` turns true only after Redis counted the chunk (lua/codes_add.lua is
-- idempotent per chunk id), so a crash in between leaves the chunk to be loaded again,
-- never twice; a coupon's code is found from the code (rebuild: which codes are still free);
-- `left_pool` is set BEFORE a code reaches a shard (the only place a claim takes codes
-- from), so a code without it was never handed out, whatever Redis lost.
CREATE TABLE batch_codes (
    batch_id  TEXT    NOT NULL,
    code      TEXT    NOT NULL,
    chunk     TEXT    NOT NULL,
    loaded    INTEGER NOT NULL DEFAULT 0,
    left_pool INTEGER NOT NULL DEFAULT 0,
    added_at  INTEGER NOT NULL,
    PRIMARY KEY (batch_id, code)
);
CREATE INDEX batch_codes_pending ON batch_codes (batch_id, chunk) WHERE NOT loaded;
ALTER TABLE coupons ADD COLUMN code TEXT;
CREATE INDEX coupons_code ON coupons (batch_id, code) WHERE code IS NOT NULL;
