-- The queue's own copy of each deal's escrows and party addresses, from the deal events: the
-- destination check (DESIGN §3.3) is made against these, never against the command.
CREATE TABLE deal_escrows (
    chain        text NOT NULL,
    address      text NOT NULL,
    deal_id      text NOT NULL,
    party        text NOT NULL,
    asset        text NOT NULL,
    escrow_index bigint NOT NULL,
    PRIMARY KEY (chain, address)
);
CREATE INDEX deal_escrows_deal ON deal_escrows (deal_id);

CREATE TABLE deal_parties (
    deal_id           text NOT NULL,
    party             text NOT NULL,
    payback_address   text NOT NULL,
    recipient_address text NOT NULL,
    PRIMARY KEY (deal_id, party)
);

-- One row per sending address: the next nonce is handed out here, under the row's lock, in the same
-- transaction that stores the transaction signed with it, so a nonce is never skipped or used twice.
CREATE TABLE senders (
    chain      text NOT NULL,
    address    text NOT NULL,
    next_nonce bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (chain, address)
);

-- QUEUED (accepted, not signed yet) → SIGNED (a nonce and at least one stored candidate) → CONFIRMED;
-- FAILED from QUEUED when a check refuses it, or from SIGNED when the mined transaction reverted.
CREATE TABLE transfers (
    transfer_id     text PRIMARY KEY,
    deal_id         text NOT NULL,
    chain           text NOT NULL,
    asset           text NOT NULL,
    escrow_address  text NOT NULL,
    escrow_index    bigint NOT NULL,
    to_address      text NOT NULL,
    amount          numeric(78, 0) NOT NULL,
    purpose         text NOT NULL,
    fee_from_amount boolean NOT NULL,
    phase           integer NOT NULL,
    status          text NOT NULL DEFAULT 'QUEUED'
                    CHECK (status IN ('QUEUED', 'SIGNED', 'CONFIRMED', 'FAILED')),
    reason          text,
    nonce           bigint,
    -- The candidate last seen mined, and where; the one reported when the threshold is reached.
    txid            text,
    block_number    bigint,
    confirmations   integer NOT NULL DEFAULT 0,
    amount_sent     numeric(78, 0),
    fee_paid        numeric(78, 0),
    commanded_at    timestamptz NOT NULL,
    received_at     timestamptz NOT NULL,
    signed_at       timestamptz,
    finished_at     timestamptz
);
CREATE INDEX transfers_open ON transfers (chain, escrow_address, received_at) WHERE status IN ('QUEUED', 'SIGNED');
CREATE INDEX transfers_deal ON transfers (deal_id);
-- A nonce belongs to one transfer only: the last line of defence against paying twice.
CREATE UNIQUE INDEX transfers_nonce ON transfers (chain, escrow_address, nonce) WHERE nonce IS NOT NULL;

-- Every signed transaction of a transfer: the first and each fee bump, all at the transfer's nonce.
-- `raw` is committed before it is broadcast, and only these bytes are ever sent.
CREATE TABLE candidates (
    txid         text PRIMARY KEY,
    transfer_id  text NOT NULL REFERENCES transfers (transfer_id),
    seq          integer NOT NULL,
    raw          bytea NOT NULL,
    value        numeric(78, 0) NOT NULL,
    gas_limit    bigint NOT NULL,
    max_fee      numeric(78, 0) NOT NULL,
    priority_fee numeric(78, 0) NOT NULL,
    signed_at    timestamptz NOT NULL,
    -- Where it was last seen mined; kept when a reorg unmines it, so that it is this candidate's
    -- bytes that go out again.
    mined_block  bigint,
    mined_hash   text,
    UNIQUE (transfer_id, seq)
);
