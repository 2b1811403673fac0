-- One row per chain's tank wallet: its nonce sequence and its low-balance state.
CREATE TABLE wallets (
    chain          text PRIMARY KEY,
    address        text NOT NULL,
    -- The next nonce to sign with; taken under this row's lock so no two fundings share one.
    next_nonce     bigint NOT NULL DEFAULT 0 CHECK (next_nonce >= 0),
    balance        numeric(78, 0),
    balance_at     timestamptz,
    low            boolean NOT NULL DEFAULT false,
    -- Counts the times the balance went below the threshold; names each warning's event id.
    low_crossings  integer NOT NULL DEFAULT 0
);

-- One row per funding request, from its arrival until GasFunded is published.
--   WAITING:  recorded, not signed yet (the tank may be too low); retried periodically
--   SIGNED:   the transaction is stored; it is (re)broadcast from these bytes until confirmed
--   FUNDED:   GasFunded is in the outbox (amount 0 and no transaction when the escrow held enough)
--   REVERTED: mined but failed; nothing more is sent for it and an operator is alerted
--   REJECTED: the request names a chain or escrow this tank cannot serve
CREATE TABLE fundings (
    request_id        text PRIMARY KEY,
    deal_id           text NOT NULL,
    chain             text NOT NULL,
    escrow_address    text NOT NULL,
    transfers         integer NOT NULL,
    gas_per_transfer  bigint NOT NULL,
    status            text NOT NULL CHECK (status IN ('WAITING', 'SIGNED', 'FUNDED', 'REVERTED', 'REJECTED')),
    reason            text,
    -- The estimate's inputs, kept to explain the amount afterwards.
    base_fee          numeric(78, 0),
    priority_fee      numeric(78, 0),
    escrow_balance    numeric(78, 0),
    needed            numeric(78, 0),
    amount            numeric(78, 0) CHECK (amount >= 0),
    max_fee_per_gas   numeric(78, 0),
    nonce             bigint,
    raw_tx            bytea,
    tx_hash           text UNIQUE,
    block_number      bigint,
    block_hash        text,
    confirmations     integer NOT NULL DEFAULT 0,
    broadcasts        integer NOT NULL DEFAULT 0,
    last_broadcast_at timestamptz,
    last_error        text,
    received_at       timestamptz NOT NULL DEFAULT now(),
    signed_at         timestamptz,
    funded_at         timestamptz,
    UNIQUE (chain, nonce),
    CHECK (status <> 'SIGNED' OR (raw_tx IS NOT NULL AND tx_hash IS NOT NULL AND nonce IS NOT NULL))
);
CREATE INDEX fundings_open ON fundings (chain, received_at) WHERE status IN ('WAITING', 'SIGNED');
