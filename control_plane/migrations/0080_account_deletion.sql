-- Account deletion (issue 14, policy clauses 6 and 11). An account asked to be deleted
-- is 'deleting' from that moment: not 'active', so nothing that acts for active
-- accounts (auto top-up, sessions, key issuing, mail) acts for it. purge_after is when
-- the maintenance job purges it (control_plane/privacy/purge.py): the end of the grace
-- period of a self-service request, or, for a child's account (deletion_kind 'child',
-- which cannot be cancelled), as soon as requests in flight have settled. Cancelling
-- in the grace period makes the account active again, the three columns NULL.
ALTER TABLE accounts DROP CONSTRAINT accounts_status_check;
ALTER TABLE accounts
    ADD CONSTRAINT accounts_status_check
        CHECK (status IN ('active', 'suspended', 'deleting')),
    ADD COLUMN deletion_requested_at timestamptz,
    ADD COLUMN purge_after           timestamptz,
    ADD COLUMN deletion_kind         text CHECK (deletion_kind IN ('self-service', 'child')),
    ADD CONSTRAINT accounts_deleting_check
        CHECK ((status = 'deleting') = (purge_after IS NOT NULL)
               AND (purge_after IS NULL) = (deletion_requested_at IS NULL)
               AND (purge_after IS NULL) = (deletion_kind IS NULL));

-- The purge job reads only the accounts waiting for it, by when they are due.
CREATE INDEX accounts_purge_idx ON accounts (purge_after) WHERE purge_after IS NOT NULL;
