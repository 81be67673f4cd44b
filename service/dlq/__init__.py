"""``vabus-aggregator dlq replay``: dead letters of a reason through validation again,
each at most once, their accepted events counted in their windows (docs/dlq.md)."""
