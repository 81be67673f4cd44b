"""``vabus-aggregator replay``: recompute a range of windows from the archive and write
those the outputs hold differently, with a higher revision (docs/replay.md)."""
