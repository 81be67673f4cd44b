"""Helpers for consumers of the service's outputs; importing them starts nothing."""
