"""The benchmark harness of bench/README.md (not part of ``make test``)."""
