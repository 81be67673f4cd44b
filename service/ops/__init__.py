"""What operators see: the HTTP endpoints (web, readiness, auth) and logging."""
