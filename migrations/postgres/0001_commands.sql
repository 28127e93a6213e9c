-- Times are milliseconds since the Unix epoch (UTC).

CREATE TABLE commands (
    id                  TEXT PRIMARY KEY,
    device_id           TEXT NOT NULL,
    owner               TEXT NOT NULL,
    status              TEXT NOT NULL,
    command_type        TEXT NOT NULL,
    app_service_name    TEXT,
    package_family_name TEXT,
    error               TEXT,
    payload             TEXT,
    response_payload    TEXT,
    permission_ticket   TEXT,
    postback_uri        TEXT,
    created_at          BIGINT NOT NULL,
    last_action_at      BIGINT NOT NULL,
    expires_at          BIGINT
);
CREATE INDEX commands_by_device ON commands (device_id, created_at);
CREATE INDEX commands_by_created ON commands (created_at);
CREATE INDEX commands_unfinished_expiry ON commands (expires_at)
    WHERE status IN ('queued', 'sentToTarget');

-- Every status a command reached, with when and who moved it.
CREATE TABLE command_transitions (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    command_id TEXT NOT NULL REFERENCES commands (id),
    status     TEXT NOT NULL,
    at         BIGINT NOT NULL,
    source     TEXT NOT NULL,
    error      TEXT
);
CREATE INDEX command_transitions_by_command ON command_transitions (command_id, id);

-- Command messages committed together with their command and not yet
-- confirmed by the broker. The relay publishes them in id order.
CREATE TABLE outbox (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    command_id   TEXT NOT NULL REFERENCES commands (id),
    device_id    TEXT NOT NULL,
    available_at BIGINT NOT NULL,
    attempts     BIGINT NOT NULL DEFAULT 0,
    last_error   TEXT
);

-- Webhook deliveries to a command's PostBackUri. The id is the webhook-id;
-- the body is fixed when the delivery is created so every attempt sends the
-- same bytes.
CREATE TABLE postbacks (
    id              TEXT PRIMARY KEY,
    command_id      TEXT NOT NULL REFERENCES commands (id),
    url             TEXT NOT NULL,
    body            TEXT NOT NULL,
    sequence        BIGINT NOT NULL,
    state           TEXT NOT NULL,
    attempts        BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    lease_until     BIGINT,
    last_status     BIGINT,
    last_error      TEXT,
    created_at      BIGINT NOT NULL,
    finished_at     BIGINT
);
CREATE INDEX postbacks_due ON postbacks (next_attempt_at) WHERE state = 'pending';
CREATE INDEX postbacks_by_command ON postbacks (command_id, created_at);

CREATE TABLE postback_attempts (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    postback_id TEXT NOT NULL REFERENCES postbacks (id),
    attempt     BIGINT NOT NULL,
    at          BIGINT NOT NULL,
    status_code BIGINT,
    outcome     TEXT NOT NULL,
    error       TEXT,
    duration_ms BIGINT NOT NULL
);
CREATE INDEX postback_attempts_by_postback ON postback_attempts (postback_id, id);
