"""gradweight server."""
