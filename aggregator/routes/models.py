"""Model downloads: the latest manifest, and every file of every published version with an ETag.

A version's files never change after publishing, so they are served with their manifest sha256
as a strong ETag and a long cache lifetime; `If-None-Match` answers 304 and `Range` works. The
manifests (`latest` and each version's) carry the sha256 of their bytes as ETag, so a device
that holds the current one asks with `If-None-Match` and gets a 304 without a body.
`manifest.sig` (the manifest's Ed25519 signature, ETag its sha256) is served beside every manifest, and
`/v1/models/signing-key` gives the public key a device pins when its app ships none.
"""

from __future__ import annotations

from flask import Blueprint, Response, request, send_file

from aggregator import db
from aggregator.errors import NotFound
from aggregator.routes import server
from fedkb_core.manifest import MANIFEST_FILE, sha256_bytes
from fedkb_core.signing import SIGNATURE_FILE

bp = Blueprint("models", __name__)


def _manifest_response(version: int) -> Response:
    body = server().store.manifest_bytes(version)
    response = Response(body, mimetype="application/json")
    response.set_etag(sha256_bytes(body))
    response.headers["X-Model-Version"] = str(version)
    return response.make_conditional(request)


@bp.get("/v1/models/latest")
def latest():
    """The manifest of the newest published version (never cached: it moves)."""
    version = db.latest_version(db.get_db())
    response = _manifest_response(version)
    response.headers["Cache-Control"] = "no-cache"
    return response


@bp.get("/v1/models/signing-key")
def signing_key():
    """The public key that verifies every manifest.sig (PEM), and its id."""
    signer = server().store.signer
    response = Response(signer.public_pem(), mimetype="application/x-pem-file")
    response.headers["X-Key-Id"] = signer.key_id
    return response


@bp.get("/v1/models/<int:version>/<string:filename>")
def model_file(version: int, filename: str):
    """One file of a published version.

    :raise 404: unknown version (`unknown_version`) or a file the manifest does not list
        (`unknown_file`); the server-side weight files are never served.
    """
    store = server().store
    if not store.has_version(version):
        raise NotFound(f"model version {version} does not exist", code="unknown_version")
    if filename == MANIFEST_FILE:
        return _manifest_response(version)
    if filename == SIGNATURE_FILE:
        body = store.signature_bytes(version)
        response = Response(body, mimetype="application/json")
        response.set_etag(sha256_bytes(body))
        return response.make_conditional(request)
    entry = store.manifest(version).files.get(filename)
    if entry is None:
        raise NotFound(f"version {version} has no file {filename!r}", code="unknown_file")
    response = send_file(store.version_dir(version) / filename, mimetype="application/octet-stream",
                         etag=entry.sha256, conditional=True, max_age=31536000)
    response.headers["X-Content-SHA256"] = entry.sha256
    return response
