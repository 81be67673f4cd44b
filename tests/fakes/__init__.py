"""In-memory stand-ins for the bus, a sink and the lease (tests only, not shipped)."""
