"""The real `fedkb device` (LiteRT training, the edge runtime's own encoder) against a real
`fedkb serve --update-encoding hadamard`: a compressed update is accepted, and a device whose
limits do not include the task's encoding refuses the task, says why, and uploads nothing."""

from __future__ import annotations

import json

from fedkb_core.update_encoding import clip_inflation
from tests.fixtures_aggregator import ServeProcess, status
from tests.fixtures_edge import edge_model, text_file, user_lines  # noqa: F401
from tests.test_edge_device_e2e import ALL_MET, fedkb_device, reports


def _serve(edge_model, tmp_path, bits: int) -> ServeProcess:
    return ServeProcess(tmp_path / "state", edge_model, "--min-clients", "1", "--goal-clients", "5",
                        "--round-timeout", "600", "--retry-after", "1", "--update-encoding", "hadamard",
                        "--update-bits", str(bits), log=tmp_path / "serve.log")


def test_a_device_uploads_a_compressed_update_that_the_server_accepts(edge_model, text_file, tmp_path):
    server = _serve(edge_model, tmp_path, 4)
    try:
        home = tmp_path / "phone"
        (report,) = reports(fedkb_device(server.url, home, "--state", ALL_MET, "--once", "--format", "json",
                                         text=text_file))
        assert report["action"] == "accepted", report
        s = status(server.url)
        assert s["totals"]["accepted"] == 1
        assert s["config"]["update_encoding"] == "hadamard" and s["config"]["update_bits"] == 4
        (norm,) = s["update_norms"]["norms"]  # measured by the server on the decoded update
        assert 0 < norm <= s["update_norms"]["clip_norm"] * clip_inflation(4)
        # 4 bits of the default-size export's 1,162,144 parameters (padded to 1,163,264), a scale per
        # block of 16,384 and the header: about an eighth of float32's 4.65 MB.
        assert report["upload_bytes"] < 0.13 * 4 * 1_162_144
    finally:
        server.stop()


def test_a_device_that_does_not_support_the_encoding_refuses_and_uploads_nothing(edge_model, text_file,
                                                                                 tmp_path):
    server = _serve(edge_model, tmp_path, 2)
    try:
        limits = tmp_path / "limits.json"
        limits.write_text(json.dumps({"encodings": ["float32", "float16"]}))
        out = fedkb_device(server.url, tmp_path / "phone", "--state", ALL_MET, "--once", "--format", "json",
                           "--limits", str(limits), text=text_file)
        (report,) = reports(out)
        assert report["action"] == "refused" and report["reasons"] == ["task_out_of_bounds"], report
        assert "encoding 'hadamard' is not one of float32, float16" in report["message"]
        assert "encoding 'hadamard'" in out.stderr  # and logged
        s = status(server.url)
        assert s["totals"]["accepted"] == 0 and s["round"]["assigned"] == 1  # it held a task, sent nothing
    finally:
        server.stop()
