"""Container health check: exit 0 when GET /health on this container's API answers status ok."""

import json
import os
import sys
import urllib.request

port = os.environ.get("FASHION_SEARCH_PORT", "8000")
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=4) as reply:
        ok = json.load(reply).get("status") == "ok"
except Exception as exc:  # any failure is "unhealthy"; the reason goes to the health log
    print(f"unhealthy: {exc}")
    sys.exit(1)
sys.exit(0 if ok else 1)
