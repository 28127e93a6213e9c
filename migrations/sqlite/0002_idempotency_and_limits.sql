-- Idempotency-Key values of create requests, one row per caller and key.
-- The primary key makes two concurrent creates with one key store one
-- command: the second insert fails and that request returns the first
-- request's command.
CREATE TABLE idempotency_keys (
    owner           TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    -- Hex SHA-256 of the route and the request body.
    request_hash    TEXT NOT NULL,
    command_id      TEXT NOT NULL REFERENCES commands (id),
    created_at      INTEGER NOT NULL,
    expires_at      INTEGER NOT NULL,
    PRIMARY KEY (owner, idempotency_key)
);
CREATE INDEX idempotency_keys_by_expiry ON idempotency_keys (expires_at);

-- Counts a device's unfinished commands for the per-device limit.
CREATE INDEX commands_unfinished_by_device ON commands (device_id)
    WHERE status IN ('queued', 'sentToTarget', 'executing');

-- Keyset paging walks commands newest first with id as the tie-break.
CREATE INDEX commands_by_device_created_id ON commands (device_id, created_at, id);
CREATE INDEX commands_by_created_id ON commands (created_at, id);
