"""`helm test`: classify one image through the gateway's Service (REST) and check the answer's
shape. Runs in the gateway image (Pillow is there); needs URL, and API_KEY when keys are set."""

import io
import json
import os
import sys
import urllib.error
import urllib.request

from PIL import Image

buf = io.BytesIO()
Image.new("RGB", (64, 48), (200, 30, 30)).save(buf, "PNG")
headers = {"Content-Type": "image/png"}
key = os.environ.get("API_KEY", "").split(",")[0].strip()
if key:
    headers["X-API-Key"] = key
url = os.environ["URL"].rstrip("/") + "/v1/classify?top_k=1"
request = urllib.request.Request(url, data=buf.getvalue(), headers=headers)
try:
    with urllib.request.urlopen(request, timeout=30) as response:
        body = json.load(response)
except (urllib.error.URLError, OSError, ValueError) as exc:
    sys.exit(f"FAIL: {url}: {exc}")
try:
    best = body["predictions"][0][0]
    print(f"ok: {body['model']} version {body['version']}: {best['label']} ({best['score']:.3f})")
except (KeyError, IndexError, TypeError):
    sys.exit(f"FAIL: unexpected answer from {url}: {body}")
