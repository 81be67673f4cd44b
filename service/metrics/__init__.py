"""The service's metrics: counted once, read by the exposition, the bus and /status."""
