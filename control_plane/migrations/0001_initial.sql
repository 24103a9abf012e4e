-- Accounts, API keys (bcrypt hash of the secret only) and the usage log.

CREATE TABLE accounts (
    id          uuid        PRIMARY KEY,
    name        text        NOT NULL,
    status      text        NOT NULL DEFAULT 'active'
                            CHECK (status IN ('active', 'suspended')),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE api_keys (
    key_id       text        PRIMARY KEY,
    account_id   uuid        NOT NULL REFERENCES accounts (id),
    name         text        NOT NULL,
    secret_hash  text        NOT NULL,
    status       text        NOT NULL DEFAULT 'active'
                             CHECK (status IN ('active', 'revoked')),
    created_at   timestamptz NOT NULL DEFAULT now(),
    revoked_at   timestamptz,
    CHECK ((status = 'revoked') = (revoked_at IS NOT NULL))
);

CREATE INDEX api_keys_account_idx ON api_keys (account_id, created_at);

-- One row per request, never any content. Partitioned by the day the request was
-- received (UTC) so retention drops whole partitions; there is deliberately no
-- DEFAULT partition, which would have to be scanned and split whenever a day's
-- partition is created. The primary key carries the partition key; since an event's
-- received time never changes, a re-delivered event hits the same key.
-- No CHECK or foreign-key constraints: the ingester validates rows before insert, and
-- a constraint failing on one row would stall its whole batch.
CREATE TABLE usage_logs (
    id                 uuid             NOT NULL,
    received_at        timestamptz      NOT NULL,
    first_byte_at      timestamptz,
    done_at            timestamptz      NOT NULL,
    account_id         uuid,
    key_id             text,
    endpoint           text             NOT NULL,
    requested_model    text,
    served_model       text,
    provider           text,
    stream             boolean          NOT NULL,
    status             integer          NOT NULL,
    outcome            text             NOT NULL,
    prompt_tokens      bigint           NOT NULL,
    completion_tokens  bigint           NOT NULL,
    cached_tokens      bigint           NOT NULL,
    reasoning_tokens   bigint           NOT NULL,
    usage_source       text             NOT NULL,
    cost_micros        bigint           NOT NULL,
    latency_ms         double precision NOT NULL,
    ttft_ms            double precision,
    source_ip          inet,
    node_id            text             NOT NULL,
    error_code         text,
    schema_version     smallint         NOT NULL,
    ingested_at        timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (received_at, id)
) PARTITION BY RANGE (received_at);

CREATE INDEX usage_logs_account_idx ON usage_logs (account_id, received_at);
