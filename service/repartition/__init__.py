"""Repartitioning: the routing stage for unkeyed input and the internal records it writes
(handed to the Kafka bus by the wiring, never imported by it)."""
