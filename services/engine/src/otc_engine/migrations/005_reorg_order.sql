-- How many reorgs of each chain the engine has taken in (`ChainReorg.sequence`): a tip a watcher reported
-- after more reorgs than that waits until the missing ones are taken in, however redeliveries order them.
ALTER TABLE chain_tips ADD COLUMN IF NOT EXISTS reorgs bigint NOT NULL DEFAULT 0;

-- The blocks reorgs replaced, and the number of the reorg that replaced each: a deposit reported in one of them
-- by a watcher that had not followed that reorg yet is not mined, however late the report arrives.
CREATE TABLE IF NOT EXISTS replaced_blocks (
    chain    text NOT NULL,
    hash     text NOT NULL,
    sequence bigint NOT NULL,
    PRIMARY KEY (chain, hash)
);
