-- claimgate schema 0002 (PostgreSQL): the database is the arbiter of a batch's definition.
-- Invariants kept here:
-- - a batch definition changes only by a compare-and-set on `version` (every change gets the
--   next version; Redis applies a version only if it is newer than what it holds), so
--   concurrent changes apply exactly once and in order;
-- - `setup_done_at` records that the batch's Redis setup completed once: from then on a
--   create never sets it up again (a batch Redis lost waits for `claimgate rebuild`);
-- - a coupon id met again with a different claim is recorded here (once per distinct
--   claim), never dropped silently.

ALTER TABLE batches ADD COLUMN version BIGINT NOT NULL DEFAULT 1;
ALTER TABLE batches ADD COLUMN setup_done_at BIGINT;
-- Batches created before this migration were set up by their create.
UPDATE batches SET setup_done_at = updated_at;

CREATE TABLE coupon_conflicts (
    seq                BIGSERIAL PRIMARY KEY,
    -- '<coupon_id>|<user_id>|<request_id>|<claimed_at>' of the conflicting claim
    conflict_key       TEXT   NOT NULL UNIQUE,
    coupon_id          TEXT   NOT NULL,
    batch_id           TEXT   NOT NULL,
    shard              BIGINT NOT NULL,
    -- the claim the database holds under this coupon id (it keeps the id)
    stored_user_id     TEXT   NOT NULL,
    stored_request_id  TEXT,
    stored_claimed_at  BIGINT NOT NULL,
    -- the conflicting claim, in full (so its owner can be made whole)
    user_id            TEXT   NOT NULL,
    request_id         TEXT,
    claimed_at         BIGINT NOT NULL,
    valid_from         BIGINT NOT NULL,
    valid_to           BIGINT NOT NULL,
    detected_at        BIGINT NOT NULL
);
CREATE INDEX coupon_conflicts_batch ON coupon_conflicts (batch_id, seq);
