-- claimgate schema 0004 (SQLite): the coupon-id epoch of a batch.
-- Invariant kept here: `epoch` only grows, and it grows (in this row, committed) BEFORE a
-- rebuild or repair writes a single key to Redis. Coupon ids minted in epoch e carry
-- e * 10^12 in their sequence (see src/domain/ids.rs), so ids minted by a Redis that was
-- later lost (or rolled back by a failover) can never be minted again: whatever the
-- database knows of them, the next Redis state mints in a fresh epoch.

ALTER TABLE batches ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0;
