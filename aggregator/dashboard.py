"""The operator's page: one HTML file, with its script and style served beside it under /static/.

No template engine, no CDN, no inline script or style (the Content-Security-Policy of
`aggregator.headers` forbids both): `static/dashboard.js` polls `/v1/status` every 2 s, or
`/v1/admin/status` once the operator has pasted the admin token (kept in the tab's
sessionStorage, sent as a bearer token, never in a URL), and builds every element with DOM calls
(text nodes, never HTML strings), so no device- or operator-supplied text can become markup.
Anyone sees the current version, the open round's timing, the version history and, with DP on, the
ε spent with its δ and sampling assumption and the target ε's verdict; the token adds
round progress, the update norms chart against the clip norm, rejections, evaluation curves and
worker errors.
"""

from __future__ import annotations

import functools
from pathlib import Path

STATIC_DIR = Path(__file__).with_name("static")


@functools.cache
def dashboard_html() -> bytes:
    return (STATIC_DIR / "dashboard.html").read_bytes()
