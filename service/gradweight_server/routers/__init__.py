"""One router per area: combine, weights, and the metadata/health endpoints."""
