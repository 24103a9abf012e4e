-- The privacy policy's versions and the notices of its material changes (issues 14
-- and 15, "Policy changes").
--
-- policy_versions mirrors control_plane/policy/texts/versions.toml, seeded from it when
-- the web role starts (control_plane/policy/versions.py); a published version never
-- changes (text_sha256 catches an edited text). Holds no personal data.
CREATE TABLE policy_versions (
    version       text        PRIMARY KEY,
    published_on  date        NOT NULL UNIQUE,   -- orders the versions
    material      boolean     NOT NULL,
    summary       text        NOT NULL,
    text_sha256   text        NOT NULL,
    recorded_at   timestamptz NOT NULL DEFAULT now()
);

-- One row per (user, material version) whose notice e-mail was queued: written in the
-- same transaction as its email_outbox row, so a crashed or repeated run of the job
-- never queues a user's notice twice. Personal data (it says a user was e-mailed):
-- part of the account's export, deleted with the user.
CREATE TABLE policy_notices (
    user_id    uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    version    text        NOT NULL REFERENCES policy_versions (version),
    outbox_id  bigint,     -- the email_outbox row (pruned after retention; no FK)
    queued_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, version)
);
-- The job walks users by id and skips those already noticed for the version.
CREATE INDEX policy_notices_version_idx ON policy_notices (version, user_id);
