-- What the watcher knows about its chain. Replicas share these tables; every change goes through a
-- transaction that first checks `head.version`, so only one replica's view of a block is recorded.

-- The last processed block (one row). `version` grows with every state change.
CREATE TABLE IF NOT EXISTS head (
    id      boolean PRIMARY KEY DEFAULT true CHECK (id),
    number  bigint NOT NULL,
    hash    text NOT NULL,
    version bigint NOT NULL
);

-- The recent window of processed blocks, for reorg detection and re-checks of new escrows.
CREATE TABLE IF NOT EXISTS blocks (
    number      bigint PRIMARY KEY,
    hash        text NOT NULL,
    parent_hash text NOT NULL,
    time        bigint NOT NULL
);

-- The last measured native balance of each watched escrow (normally at the end of the head block)
-- and the direct deposits and own spending seen since, when blocks could not be measured (a
-- pruned node). `spent_since` is NULL when the escrow sent something of unknown cost. A watched
-- escrow without a row has not been re-checked yet.
CREATE TABLE IF NOT EXISTS balances (
    address      text PRIMARY KEY,
    balance      numeric(78, 0) NOT NULL,
    direct_since numeric(78, 0) NOT NULL DEFAULT 0,
    spent_since  numeric(78, 0) DEFAULT 0
);

-- What was published for blocks of the window, so that a re-check never publishes a fact twice.
-- `asset` is the registry symbol, or the contract address of an unregistered token.
CREATE TABLE IF NOT EXISTS published (
    txid         text NOT NULL,
    idx          integer NOT NULL,
    block_hash   text NOT NULL,
    block_number bigint NOT NULL,
    address      text NOT NULL,
    asset        text NOT NULL,
    amount       numeric(78, 0) NOT NULL,
    PRIMARY KEY (txid, idx, block_hash)
);
CREATE INDEX IF NOT EXISTS published_block ON published (block_number);
CREATE INDEX IF NOT EXISTS published_address ON published (address);

-- Transactions the queue processor broadcast, followed until confirmed well past the threshold.
CREATE TABLE IF NOT EXISTS followed (
    txid         text PRIMARY KEY,
    transfer_id  text NOT NULL,
    checked      boolean NOT NULL DEFAULT false,
    block_number bigint,
    block_hash   text,
    success      boolean NOT NULL DEFAULT true,
    fee_paid     numeric(78, 0) NOT NULL DEFAULT 0,
    done         boolean NOT NULL DEFAULT false,
    added_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS followed_transfer ON followed (transfer_id);
CREATE INDEX IF NOT EXISTS followed_block ON followed (block_hash);
