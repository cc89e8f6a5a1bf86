-- claimgate schema (SQLite): batches, the append-only transaction log, and the
-- materialised coupon rows. Every time is milliseconds since the Unix epoch (INTEGER), the
-- same unit Redis stamps claims with, so a row round-trips to Redis without conversion.
-- Invariant kept here: an event is recorded at most once (event_id UNIQUE) and a coupon
-- exists at most once (coupon_id PRIMARY KEY), so redelivered claims never duplicate.

CREATE TABLE batches (
    id          TEXT PRIMARY KEY,
    definition  TEXT   NOT NULL,               -- the Batch as JSON
    shards      INTEGER NOT NULL CHECK (shards > 0),
    stock       INTEGER NOT NULL CHECK (stock > 0),
    state       TEXT   NOT NULL,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
);

-- Append-only: rows are inserted, never updated or deleted.
CREATE TABLE coupon_events (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id     TEXT   NOT NULL UNIQUE,        -- claim: '<coupon_id>:claimed'
    kind         TEXT   NOT NULL
                 CHECK (kind IN ('claimed', 'locked', 'redeemed', 'released', 'expired')),
    batch_id     TEXT   NOT NULL,
    shard        INTEGER NOT NULL,
    user_id      TEXT   NOT NULL,
    coupon_id    TEXT   NOT NULL,
    request_id   TEXT,
    order_id     TEXT,
    at           INTEGER NOT NULL,               -- when it happened (claims: Redis time)
    recorded_at  INTEGER NOT NULL                -- when it reached the database
);
CREATE INDEX coupon_events_coupon ON coupon_events (coupon_id, seq);
CREATE INDEX coupon_events_batch ON coupon_events (batch_id, shard);

CREATE TABLE coupons (
    coupon_id        TEXT PRIMARY KEY,          -- '<batch>.<shard>.<seq>'
    batch_id         TEXT   NOT NULL,
    shard            INTEGER NOT NULL,
    seq              INTEGER NOT NULL,
    user_id          TEXT   NOT NULL,
    request_id       TEXT,
    state            TEXT   NOT NULL DEFAULT 'unused'
                     CHECK (state IN ('unused', 'locked', 'used', 'expired')),
    order_id         TEXT,
    lock_expires_at  INTEGER,
    valid_from       INTEGER NOT NULL,
    valid_to         INTEGER NOT NULL,
    claimed_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    version          INTEGER NOT NULL DEFAULT 0  -- bumped by every state transition
);
CREATE INDEX coupons_user_state ON coupons (user_id, state, coupon_id);
CREATE INDEX coupons_batch_shard ON coupons (batch_id, shard, seq);
CREATE INDEX coupons_request ON coupons (batch_id, user_id, request_id);
