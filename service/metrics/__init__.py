"""The service's metrics: the collector every component reports to (``collector``)."""
