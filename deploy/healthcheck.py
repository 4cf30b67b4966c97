"""Container health probe: exit 0 when the server's /health answers 200, 1 otherwise.

Standard library only, so the image needs no curl. The server answers 503 while it loads
the model or drains, which counts as unhealthy.
"""

import os
import sys
import urllib.error
import urllib.request

PORT = os.environ.get("GROUPWISE_PORT", "8000")
URL = f"http://127.0.0.1:{PORT}/health"

try:
    with urllib.request.urlopen(URL, timeout=4) as response:
        sys.exit(0 if response.status == 200 else 1)
except (urllib.error.URLError, OSError) as exc:
    print(f"unhealthy: {URL}: {exc}", file=sys.stderr)
    sys.exit(1)
