-- claimgate schema 0007: the lock-timeout sweeper reads locked coupons by deadline.
-- Invariant kept here: finding the lapsed locks costs an index range, however many coupons
-- exist (the sweeper runs on every gateway, every `events.sweep_interval_ms`).
CREATE INDEX coupons_lock_due ON coupons (lock_expires_at) WHERE state = 'locked';
