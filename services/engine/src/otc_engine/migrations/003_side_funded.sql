ALTER TABLE deal_sides ADD COLUMN funded_at timestamptz;
