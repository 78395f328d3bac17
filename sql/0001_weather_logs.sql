-- Readings, one row per message. message_id is the idempotency key: a redelivered message
-- (after a consumer crash, say) hits ON CONFLICT DO NOTHING instead of adding a second row.
-- The first four columns are the older system's. received_at is the time the row was written
-- (clock_timestamp(), not the transaction start), so measured_at → received_at is the end-to-end latency.
CREATE TABLE IF NOT EXISTS weather_logs (
    message_id  uuid             PRIMARY KEY,
    station_id  text             NOT NULL,
    temperature double precision NOT NULL,
    humidity    double precision NOT NULL,
    pressure    double precision NOT NULL,
    measured_at timestamptz,
    received_at timestamptz      NOT NULL DEFAULT clock_timestamp()
);

