-- E-mails to parties about their deals. One row per (event, recipient): however often an event is
-- delivered or replayed, the recipient is told once. Text is rendered when the row is written and
-- never contains a token.
CREATE TABLE email_outbox (
    id              bigserial PRIMARY KEY,
    event_id        text NOT NULL,
    recipient       text NOT NULL,
    deal_id         text NOT NULL,
    party           text NOT NULL,
    kind            text NOT NULL,
    subject         text NOT NULL,
    body            text NOT NULL,
    status          text NOT NULL DEFAULT 'PENDING' CHECK (status IN ('PENDING', 'SENT', 'FAILED')),
    attempts        integer NOT NULL DEFAULT 0,
    -- A sender claims a row by pushing this forward (a lease), so replicas never send it together.
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    sent_at         timestamptz,
    UNIQUE (event_id, recipient)
);
CREATE INDEX email_outbox_due ON email_outbox (next_attempt_at) WHERE status = 'PENDING';
CREATE INDEX email_outbox_deal ON email_outbox (deal_id);

-- Invitations sent by otc.sendInvite. The link (it holds the token) is sent, never stored.
CREATE TABLE invites (
    invite_id   text PRIMARY KEY,
    deal_id     text NOT NULL REFERENCES deals (deal_id),
    party       text NOT NULL,
    recipient   text NOT NULL,
    status      text NOT NULL CHECK (status IN ('SENDING', 'SENT', 'FAILED')),
    error       text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    sent_at     timestamptz
);
CREATE INDEX invites_deal ON invites (deal_id, created_at);

-- Every deal event to every configured operator URL. `body` holds the exact bytes that are signed
-- and sent, so a redelivery is byte-identical.
CREATE TABLE webhook_deliveries (
    id              bigserial PRIMARY KEY,
    event_id        text NOT NULL,
    url             text NOT NULL,
    event_type      text NOT NULL,
    deal_id         text,
    occurred_at     timestamptz NOT NULL,
    body            bytea NOT NULL,
    status          text NOT NULL DEFAULT 'PENDING' CHECK (status IN ('PENDING', 'DELIVERED', 'FAILED')),
    attempts        integer NOT NULL DEFAULT 0,
    -- attempts already made when the current round began (a manual redelivery starts a new round).
    round_start     integer NOT NULL DEFAULT 0,
    last_status     integer,
    last_error      text,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    created_at      timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz,
    UNIQUE (event_id, url)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE status = 'PENDING';
CREATE INDEX webhook_deliveries_deal ON webhook_deliveries (deal_id, id);

CREATE TABLE webhook_attempts (
    delivery_id bigint NOT NULL REFERENCES webhook_deliveries (id),
    attempt     integer NOT NULL,
    at          timestamptz NOT NULL DEFAULT now(),
    http_status integer,
    error       text,
    duration_ms integer NOT NULL,
    PRIMARY KEY (delivery_id, attempt)
);
