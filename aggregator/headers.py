"""The security headers every answer carries, the app's and the HTTP server's own error pages alike.

The dashboard is the only HTML the server sends; its script and style are served files from the
same origin, so the policy allows nothing inline and nothing from elsewhere, and no site may frame
any page (clickjacking). `form-action 'none'` also keeps the operator-token form from ever being
submitted as a URL if its script did not run.
"""

from __future__ import annotations

CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                           "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
}


def add_security_headers(response):
    """An `after_request` hook: set every security header the response does not set itself."""
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response
