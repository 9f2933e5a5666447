-- ingestd 0004: how far `ingestd import-csv` got in each file, so that an interrupted or repeated
-- import goes on from there instead of re-reading what it has committed. Correctness does not
-- depend on it (every row lands once by its event id, every bad row once by its dead-letter key);
-- it makes resuming and re-running cheap. Written after each batch's commit.
CREATE TABLE csv_import_checkpoints (
    -- the file as its derived ids and dead-letter keys name it: csv:<source>:<line>
    source VARCHAR(300) PRIMARY KEY,
    -- just after the last committed record that ended with a line end
    byte_offset BIGINT NOT NULL,
    -- physical lines up to byte_offset, and records (rows) after the header up to it
    line BIGINT NOT NULL,
    rows BIGINT NOT NULL,
    -- SHA-256 of the first 64 KiB and of the 64 KiB before byte_offset: a file that was rewritten,
    -- not only appended to, is imported from the start again
    head_sha256 CHAR(64) NOT NULL,
    tail_sha256 CHAR(64) NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP
);
