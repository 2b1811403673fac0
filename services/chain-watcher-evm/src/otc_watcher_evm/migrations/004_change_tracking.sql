-- What lets the watcher keep the watch set, the balance baselines and the open follows in memory and
-- read them again only when they changed. Runs after the watch set's own migration (001_watch_set).

-- The head version in whose transaction each baseline was last written (the version that transaction
-- claimed), so that after another writer moved the head only the baselines it wrote are read again.
ALTER TABLE balances ADD COLUMN IF NOT EXISTS version bigint NOT NULL DEFAULT 0;

-- Changes made outside the block loop's claimed transactions, counted by triggers in the writer's own
-- transaction: escrows added to or dropped from the watch set (deal events, `watch_set`) and
-- transactions to follow (queue events, `followed`).
CREATE TABLE IF NOT EXISTS feed (
    name    text PRIMARY KEY,
    version bigint NOT NULL
);
INSERT INTO feed (name, version) VALUES ('watch_set', 0), ('followed', 0) ON CONFLICT (name) DO NOTHING;

-- TG_ARGV[0]: the feed row to count in.
CREATE OR REPLACE FUNCTION count_feed_change() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    -- A statement that changed no row (a redelivered event meeting ON CONFLICT DO NOTHING) is no change.
    IF TG_OP <> 'TRUNCATE' THEN
        IF NOT EXISTS (SELECT 1 FROM changed) THEN
            RETURN NULL;
        END IF;
    END IF;
    UPDATE feed SET version = version + 1 WHERE name = TG_ARGV[0];
    RETURN NULL;
END
$$;

CREATE TRIGGER watch_set_added AFTER INSERT ON watch_set
    REFERENCING NEW TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION count_feed_change('watch_set');
CREATE TRIGGER watch_set_changed AFTER UPDATE ON watch_set
    REFERENCING NEW TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION count_feed_change('watch_set');
CREATE TRIGGER watch_set_dropped AFTER DELETE ON watch_set
    REFERENCING OLD TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION count_feed_change('watch_set');
CREATE TRIGGER watch_set_emptied AFTER TRUNCATE ON watch_set
    FOR EACH STATEMENT EXECUTE FUNCTION count_feed_change('watch_set');
CREATE TRIGGER followed_added AFTER INSERT ON followed
    REFERENCING NEW TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION count_feed_change('followed');
