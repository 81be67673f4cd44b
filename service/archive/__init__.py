"""The raw-event archive (ARCHIVE_URL, contract §12.9): every accepted event kept as
Parquet files partitioned by hour of event time, exactly once across ``kill -9``.

``rows`` (the events of one partition between two checkpoints: captured by the
aggregator, carried by the checkpoint to the sender), ``layout`` (file names from
source positions), ``parquet`` (rows to one file per hour), ``stores`` (a directory or
S3), ``writer`` (the exactly-once step the sender runs before each checkpoint).
The design, and why it is exact: docs/archive.md.
"""
