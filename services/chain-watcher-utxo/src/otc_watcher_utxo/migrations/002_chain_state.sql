-- What the watcher knows about its chain. Replicas share these tables; block changes run in a
-- transaction that first checks `head.version`, so only one replica's view of a block is recorded.

-- The last processed block (one row). `version` grows with every change of the head.
CREATE TABLE IF NOT EXISTS head (
    id      boolean PRIMARY KEY DEFAULT true CHECK (id),
    number  bigint NOT NULL,
    hash    text NOT NULL,
    version bigint NOT NULL
);

-- The recent window of processed headers: reorg detection, and the merkle roots that deposits and
-- followed transactions are proved against.
CREATE TABLE IF NOT EXISTS blocks (
    number      bigint PRIMARY KEY,
    hash        text NOT NULL,
    parent_hash text NOT NULL,
    merkle_root text NOT NULL,
    time        bigint NOT NULL
);

-- Deposits published, so a re-check of a history never publishes a fact twice. Kept while the
-- escrow is watched (its whole history is re-checked after every restart), and for the window.
CREATE TABLE IF NOT EXISTS published (
    txid         text NOT NULL,
    idx          integer NOT NULL,
    block_hash   text NOT NULL,
    block_number bigint NOT NULL,
    address      text NOT NULL,
    amount       numeric(78, 0) NOT NULL,
    PRIMARY KEY (txid, idx, block_hash)
);
CREATE INDEX IF NOT EXISTS published_block ON published (block_number);
CREATE INDEX IF NOT EXISTS published_address ON published (address);

-- Transactions the queue processor broadcast, followed until confirmed well past the threshold.
-- `scripthash` is that of the output its first input spends (an escrow): its history shows where
-- the transaction is mined. NULL until the server has shown the transaction.
CREATE TABLE IF NOT EXISTS followed (
    txid         text PRIMARY KEY,
    transfer_id  text NOT NULL,
    scripthash   text,
    fee_paid     numeric(78, 0) NOT NULL DEFAULT 0,
    block_number bigint,
    block_hash   text,
    done         boolean NOT NULL DEFAULT false,
    added_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS followed_transfer ON followed (transfer_id);
CREATE INDEX IF NOT EXISTS followed_block ON followed (block_hash);

-- Scripthashes whose history must be read again because a reorg replaced blocks they had
-- transactions in; any replica may do it, and removes the row once done.
CREATE TABLE IF NOT EXISTS rescan (
    scripthash text PRIMARY KEY
);
