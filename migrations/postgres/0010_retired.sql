-- claimgate schema 0010: batches retired from Redis. A batch whose claim window ended
-- `batches.retire_after_ms` ago is retired (src/recovery/retire.rs): `retired_at` is set
-- first (from then on no definition change applies, and a replay, a wallet read or a
-- reconcile of the batch reads this database), then every Redis key of it is dropped, shard
-- by shard (each only once its log is drained into this database), and `retire_done_at` is
-- set once the last one, the pool, is gone.
-- Invariants kept here: `retire_done_at` is never set without `retired_at`; neither is
-- ever cleared (a retired batch never comes back to Redis).
ALTER TABLE batches ADD COLUMN retired_at BIGINT;
ALTER TABLE batches ADD COLUMN retire_done_at BIGINT;
