-- What each escrow received, as the watchers reported it. A reorg unmines a deposit
-- (block columns NULL) until a watcher sees it in the new chain.
CREATE TABLE deposits (
    chain         text NOT NULL,
    txid          text NOT NULL,
    idx           integer NOT NULL,
    deal_id       text NOT NULL REFERENCES deals (deal_id),
    party         text NOT NULL,
    address       text NOT NULL,
    asset         text NOT NULL,
    amount        numeric(78, 0) NOT NULL CHECK (amount > 0),
    block_number  bigint,
    block_hash    text,
    block_time    timestamptz,
    first_seen    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (chain, txid, idx)
);
CREATE INDEX deposits_deal ON deposits (deal_id, party);
CREATE INDEX deposits_maturing ON deposits (chain, block_number);

CREATE TABLE chain_tips (
    chain      text PRIMARY KEY,
    height     bigint NOT NULL,
    hash       text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- A reorg deeper than the confirmation threshold stops payouts on the chain until an operator resumes it.
CREATE TABLE chain_halts (
    chain     text PRIMARY KEY,
    reason    text NOT NULL,
    halted_at timestamptz NOT NULL DEFAULT now()
);

-- The transfer plan: every movement out of an escrow, written before it is commanded.
CREATE TABLE transfers (
    transfer_id     text PRIMARY KEY,
    deal_id         text NOT NULL REFERENCES deals (deal_id),
    party           text NOT NULL,
    chain           text NOT NULL,
    asset           text NOT NULL,
    escrow_address  text NOT NULL,
    escrow_index    bigint NOT NULL,
    purpose         text NOT NULL,
    to_address      text NOT NULL,
    amount          numeric(78, 0) NOT NULL CHECK (amount > 0),
    fee_from_amount boolean NOT NULL,
    phase           integer NOT NULL,
    status          text NOT NULL DEFAULT 'PLANNED',
    txid            text,
    confirmations   integer NOT NULL DEFAULT 0,
    amount_sent     numeric(78, 0),
    fee_paid        numeric(78, 0),
    reason          text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX transfers_deal ON transfers (deal_id);
CREATE INDEX transfers_planned ON transfers (chain) WHERE status = 'PLANNED';

-- Native gas the tank put into token escrows; returned to the tank after the escrow is done.
CREATE TABLE gas_fundings (
    request_id     text PRIMARY KEY,
    deal_id        text NOT NULL REFERENCES deals (deal_id),
    party          text NOT NULL,
    chain          text NOT NULL,
    escrow_address text NOT NULL,
    status         text NOT NULL DEFAULT 'REQUESTED',
    amount         numeric(78, 0),
    txid           text,
    requested_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX gas_fundings_deal ON gas_fundings (deal_id, party);

ALTER TABLE deals ADD COLUMN unwatched boolean NOT NULL DEFAULT false;
