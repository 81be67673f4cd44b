"""Shared Kafka adapter code: client options and topic creation."""
