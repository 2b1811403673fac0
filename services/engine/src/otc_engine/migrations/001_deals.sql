-- Escrow indices come from a sequence: a rolled-back transaction burns its number, so no index is ever reused.
CREATE SEQUENCE escrow_index_seq START 1;

CREATE TABLE deals (
    deal_id           text PRIMARY KEY,
    name              text NOT NULL,
    stage             text NOT NULL,
    outcome           text,
    timeout_seconds   integer NOT NULL,
    -- Set only in COLLECTION; WAITING keeps the time left in remaining_ms instead.
    expires_at        timestamptz,
    remaining_ms      bigint,
    cancelled         boolean NOT NULL DEFAULT false,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    closed_at         timestamptz
);
CREATE INDEX deals_deadline ON deals (expires_at) WHERE stage = 'COLLECTION';
CREATE INDEX deals_open ON deals (stage) WHERE stage <> 'CLOSED';

CREATE TABLE deal_sides (
    deal_id           text NOT NULL REFERENCES deals (deal_id),
    party             text NOT NULL CHECK (party IN ('ALICE', 'BOB')),
    chain             text NOT NULL,
    asset             text NOT NULL,
    amount            numeric(78, 0) NOT NULL CHECK (amount > 0),
    commission        numeric(78, 0) NOT NULL CHECK (commission >= 0),
    fee_reserve       numeric(78, 0) NOT NULL CHECK (fee_reserve >= 0),
    escrow_index      bigint NOT NULL UNIQUE,
    escrow_address    text NOT NULL,
    token_hash        bytea NOT NULL,
    payback_address   text,
    recipient_address text,
    email             text,
    filled_at         timestamptz,
    PRIMARY KEY (deal_id, party)
);
CREATE UNIQUE INDEX deal_sides_escrow ON deal_sides (chain, escrow_address);

-- The audit trail shown by otc.status and kept for operators.
CREATE TABLE deal_events (
    id       bigserial PRIMARY KEY,
    deal_id  text NOT NULL REFERENCES deals (deal_id),
    type     text NOT NULL,
    detail   jsonb NOT NULL DEFAULT '{}'::jsonb,
    at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX deal_events_deal ON deal_events (deal_id, id);
