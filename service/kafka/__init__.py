"""Shared Kafka adapter code: client options, topic creation, error classification,
reading to the end, closing clients."""
