"""Container health check: exit 0 when this container's server answers its health URL.

The API's GET /health on $FASHION_SEARCH_PORT by default ({"status": "ok", ...}); the web page sets
FASHION_SEARCH_HEALTH_URL to Streamlit's own health URL (a plain "ok").
"""

import json
import os
import sys
import urllib.request

port = os.environ.get("FASHION_SEARCH_PORT", "8000")
url = os.environ.get("FASHION_SEARCH_HEALTH_URL") or f"http://127.0.0.1:{port}/health"
try:
    with urllib.request.urlopen(url, timeout=4) as reply:
        body = reply.read()
    ok = json.loads(body).get("status") == "ok" if body.startswith(b"{") else body.strip() == b"ok"
except Exception as exc:  # any failure is "unhealthy"; the reason goes to the health log
    print(f"unhealthy: {exc}")
    sys.exit(1)
sys.exit(0 if ok else 1)
