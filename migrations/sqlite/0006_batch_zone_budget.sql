-- claimgate schema 0006 (SQLite): a batch's time zone and money budget.
-- Invariant kept here: the columns mirror the definition (the JSON in `definition`, the
-- arbiter) and are written by every statement that writes it: `timezone` is the IANA zone
-- the per-user daily limit counts its days in ('UTC' for a batch that names none, as every
-- batch before this migration), `budget` the money budget in minor units (NULL = none;
-- stock * face value never exceeds it, see src/domain/batch.rs).

ALTER TABLE batches ADD COLUMN timezone TEXT NOT NULL DEFAULT 'UTC';
ALTER TABLE batches ADD COLUMN budget INTEGER CHECK (budget IS NULL OR budget > 0);
