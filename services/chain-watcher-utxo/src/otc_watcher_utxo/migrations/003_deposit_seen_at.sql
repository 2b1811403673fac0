-- When each deposit was first published and when its block reached the confirmation threshold, for
-- the time parties wait (otc_watcher_deposit_confirmation_seconds). Rows from before this migration
-- keep NULL and are left out; `confirmed_at` is set once, so a re-processed block never counts twice.
ALTER TABLE published ADD COLUMN IF NOT EXISTS seen_at timestamptz;
ALTER TABLE published ALTER COLUMN seen_at SET DEFAULT now();
ALTER TABLE published ADD COLUMN IF NOT EXISTS confirmed_at timestamptz;
