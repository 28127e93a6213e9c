-- The relay holds back a device's outbox rows while an earlier row of the
-- same device waits for a retry; this index serves that lookup.
CREATE INDEX outbox_by_device ON outbox (device_id, id);
