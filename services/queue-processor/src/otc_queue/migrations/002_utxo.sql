-- UTXO transfers (chains of kind utxo). A transfer is one or more legs: each leg spends one escrow
-- output, because the chain accepts only transactions with exactly one input. Such a transfer goes
-- QUEUED → SIGNED → CONFIRMED in `transfers` like any other, without a nonce.

-- The escrow outputs a transfer spends, one per leg. A row is written in the transaction that
-- signs and stores the leg, before the signing, and is never removed: an output belongs to one
-- transfer only, whatever the server shows later (a dropped transaction, a reorg).
CREATE TABLE utxo_reservations (
    chain          text NOT NULL,
    txid           text NOT NULL,
    vout           integer NOT NULL,
    escrow_address text NOT NULL,
    transfer_id    text NOT NULL REFERENCES transfers (transfer_id),
    leg            integer NOT NULL,
    value          numeric(78, 0) NOT NULL CHECK (value > 0),
    -- Where the output was mined when it was chosen.
    height         bigint NOT NULL,
    reserved_at    timestamptz NOT NULL,
    PRIMARY KEY (chain, txid, vout),
    UNIQUE (transfer_id, leg)
);
CREATE INDEX utxo_reservations_escrow ON utxo_reservations (chain, escrow_address);

-- Every signed transaction of a leg: the first and each fee bump, all spending the leg's output.
-- `raw` is committed before it is broadcast, and only these bytes are ever sent.
CREATE TABLE utxo_candidates (
    txid        text PRIMARY KEY,
    transfer_id text NOT NULL,
    leg         integer NOT NULL,
    seq         integer NOT NULL,
    raw         bytea NOT NULL,
    vsize       integer NOT NULL,
    to_value    numeric(78, 0) NOT NULL,
    change      numeric(78, 0) NOT NULL,
    fee         numeric(78, 0) NOT NULL,
    signed_at   timestamptz NOT NULL,
    -- Where it was last seen mined; kept when a reorg unmines it, so that it is this candidate's
    -- bytes that go out again.
    mined_block bigint,
    mined_hash  text,
    UNIQUE (transfer_id, leg, seq),
    FOREIGN KEY (transfer_id, leg) REFERENCES utxo_reservations (transfer_id, leg)
);
