-- Privacy requests (issue 14): every exercise of a privacy right, with its legal clock.
-- No personal data here: the account by id, the type and outcome by code. A request's
-- details that are personal (a correction's text) never go in this table. Kept as the
-- record of compliance; part of the account's export.
CREATE TABLE privacy_requests (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id      uuid        NOT NULL,
    type            text        NOT NULL
                                CHECK (type IN ('access', 'export', 'correction', 'deletion',
                                                'restriction', 'objection', 'human_review',
                                                'information')),
    jurisdiction    text        NOT NULL
                                CHECK (jurisdiction IN ('default', 'gdpr', 'ccpa', 'lgpd',
                                                        'kvkk', 'pipa')),
    received_at     timestamptz NOT NULL,
    due_at          timestamptz NOT NULL,
    extended_until  timestamptz,
    completed_at    timestamptz,
    outcome         text        CHECK (outcome IN ('fulfilled', 'partially_fulfilled',
                                                   'refused', 'withdrawn')),
    handled_by      text        NOT NULL CHECK (handled_by IN ('staff', 'self-service')),
    CHECK (due_at > received_at),
    CHECK (extended_until IS NULL OR extended_until > due_at),
    CHECK ((completed_at IS NULL) = (outcome IS NULL))
);
CREATE INDEX privacy_requests_account_idx ON privacy_requests (account_id, received_at);
-- The staff queue and the overdue gauge read only the open requests, by due date.
CREATE INDEX privacy_requests_open_idx
    ON privacy_requests (COALESCE(extended_until, due_at)) WHERE completed_at IS NULL;
