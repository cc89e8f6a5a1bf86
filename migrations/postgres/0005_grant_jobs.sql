-- claimgate schema 0005 (PostgreSQL): bulk grant jobs.
-- Invariants kept here:
-- - a job's counts and its cursor (`next_chunk`) change together, in one statement, and
--   only from the cursor they were computed at by the instance holding the job's lease:
--   every spooled user is counted once, whatever crashes and resumes happen;
-- - a job's users are spooled in chunks as the upload streams in (`grant_job_users`), in
--   upload order, and never change; they are deleted when the job ends.

CREATE TABLE grant_jobs (
    id                TEXT    PRIMARY KEY,
    batch_id          TEXT    NOT NULL,
    state             TEXT    NOT NULL
                      CHECK (state IN ('receiving', 'running', 'done', 'failed')),
    chunks            BIGINT NOT NULL DEFAULT 0,  -- chunks spooled
    total             BIGINT NOT NULL DEFAULT 0,  -- lines received (valid and invalid)
    next_chunk        BIGINT NOT NULL DEFAULT 0,  -- the cursor: chunks below it are counted
    granted           BIGINT NOT NULL DEFAULT 0,
    skipped_limit     BIGINT NOT NULL DEFAULT 0,
    skipped_sold_out  BIGINT NOT NULL DEFAULT 0,
    failed            BIGINT NOT NULL DEFAULT 0,
    errors            TEXT    NOT NULL DEFAULT '[]',  -- the first failure reasons (JSON)
    reason            TEXT,                           -- why a failed job stopped
    lease_owner       TEXT,                           -- the instance running it
    lease_until       BIGINT NOT NULL DEFAULT 0,
    created_at        BIGINT NOT NULL,
    updated_at        BIGINT NOT NULL
);
CREATE INDEX grant_jobs_runnable ON grant_jobs (state, lease_until);

CREATE TABLE grant_job_users (
    job_id  TEXT    NOT NULL,
    chunk   BIGINT NOT NULL,
    users   TEXT    NOT NULL,   -- the chunk's user ids, one per line, in upload order
    PRIMARY KEY (job_id, chunk)
);
