-- The outbox also carries cancel notices, not only command messages.
ALTER TABLE outbox ADD COLUMN kind TEXT NOT NULL DEFAULT 'command';
