-- claimgate schema 0003 (PostgreSQL): refunds, expiry, reminders and the event outbox.
-- Invariants kept here:
-- - every coupon state change (claimed, locked, released, redeemed, refunded, expired) is
--   recorded once in `coupon_events` AND once in `event_outbox`, in the transaction that
--   changes the state (event_id UNIQUE in both);
-- - the "expiring soon" reminder of a coupon is written once: `coupons.reminded_at` records
--   it and its event id '<coupon_id>:expiring_soon' is UNIQUE in the outbox;
-- - an outbox row's delivery ledger (state, attempts, last answer) changes only through
--   the worker that holds its lease (`lease_token`), so two instances never both record an
--   attempt of one event.

ALTER TABLE coupon_events DROP CONSTRAINT coupon_events_kind_check;
ALTER TABLE coupon_events ADD CONSTRAINT coupon_events_kind_check
    CHECK (kind IN ('claimed', 'locked', 'released', 'redeemed', 'refunded', 'expired'));

-- The last step `order_id` took on the coupon: what tells a refunded coupon from a released
-- one (both are unused again), so a repeated release or refund is answered, not refused.
ALTER TABLE coupons ADD COLUMN order_step TEXT
    CHECK (order_step IN ('locked', 'released', 'redeemed', 'refunded'));
UPDATE coupons SET order_step = CASE state
    WHEN 'locked' THEN 'locked' WHEN 'used' THEN 'redeemed' ELSE 'released' END
    WHERE order_id IS NOT NULL;
-- When the "expiring soon" reminder was written (NULL: not yet).
ALTER TABLE coupons ADD COLUMN reminded_at BIGINT;
-- The expiry sweeper and the reminder sweeper read coupons by validity end.
CREATE INDEX coupons_expiry ON coupons (valid_to) WHERE state IN ('unused', 'locked');
CREATE INDEX coupons_reminder ON coupons (valid_to)
    WHERE reminded_at IS NULL AND state IN ('unused', 'locked');

CREATE TABLE event_outbox (
    seq              BIGSERIAL PRIMARY KEY,
    event_id         TEXT   NOT NULL UNIQUE,    -- as in coupon_events; reminders
                                                -- '<coupon_id>:expiring_soon'
    kind             TEXT   NOT NULL,           -- coupon_events.kind or 'expiring_soon'
    coupon_id        TEXT   NOT NULL,
    payload          TEXT   NOT NULL,           -- the JSON body delivered, byte for byte
    created_at       BIGINT NOT NULL,
    -- the delivery ledger
    state            TEXT   NOT NULL DEFAULT 'pending'
                     CHECK (state IN ('pending', 'delivered', 'dead')),
    attempts         BIGINT NOT NULL DEFAULT 0,
    next_attempt_at  BIGINT NOT NULL,           -- due from then (while attempted: lease end)
    lease_token      TEXT,                      -- the worker attempting it now
    last_attempt_at  BIGINT,
    last_status      BIGINT,                    -- HTTP status of the last answer
    last_error       TEXT,
    delivered_at     BIGINT
);
CREATE INDEX event_outbox_due ON event_outbox (next_attempt_at, seq) WHERE state = 'pending';
CREATE INDEX event_outbox_state ON event_outbox (state, seq);
CREATE INDEX event_outbox_coupon ON event_outbox (coupon_id, seq);
