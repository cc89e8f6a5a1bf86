-- claimgate schema 0009 (SQLite): coupons whose state lives in Redis. A coupon claimed on a
-- shard that keeps coupon state (lua/claim.lua's claim record with m '1') is managed: its
-- transitions are decided in Redis and reach this row through the persister (change
-- records, store/coupon_state.rs `apply_changes`), and the database's expiry and lock
-- sweeps leave it alone.
-- Invariants kept here: a coupon row is managed (1) or not (0), never unknown (rows of
-- older gateways are not: 0); only a claim record sets it, and only a shard's Redis state
-- being dropped (a repair or a rebuild, `Db::unmanage`) clears it.
ALTER TABLE coupons ADD COLUMN managed INTEGER NOT NULL DEFAULT 0;
