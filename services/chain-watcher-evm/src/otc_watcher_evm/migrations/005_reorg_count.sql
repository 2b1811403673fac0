-- How many reorgs the watcher has followed on its chain: each reorg event carries its number, and every tip
-- and deposit the count so far (see otc_common.chainwatch.reorgs_followed).
ALTER TABLE head ADD COLUMN IF NOT EXISTS reorgs bigint NOT NULL DEFAULT 0;
