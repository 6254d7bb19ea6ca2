"""Container health probe: exit 0 when the server answers 200 on a path (default /readyz), else 1.

Standard library only: the slim image has no curl. Used by the Dockerfile's HEALTHCHECK and by
docker/compose.yaml. The port comes from the same setting the server reads (GRADWEIGHT_PORT);
the token, when one is set, is sent as a bearer token in case the server guards the path.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

PORT_ENV = "GRADWEIGHT_PORT"
TOKEN_ENV = "GRADWEIGHT_TOKEN"
DEFAULT_PORT = "8000"
DEFAULT_PATH = "/readyz"


def probe(path: str = DEFAULT_PATH, timeout: float = 4.0) -> int:
    """Return the process exit status for one probe of http://127.0.0.1:<port><path>."""
    port = os.environ.get(PORT_ENV) or DEFAULT_PORT
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method="GET")
    token = os.environ.get(TOKEN_ENV)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (OSError, ValueError) as exc:
        print(f"unhealthy: {path}: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"unhealthy: {path}: HTTP {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(probe(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_PATH))
