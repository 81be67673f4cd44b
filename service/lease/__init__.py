"""Leases: which one of several instances on one single-reader bus may read it."""
