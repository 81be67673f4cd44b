"""What operators see: metrics, the HTTP endpoints, connection checks and logging."""
