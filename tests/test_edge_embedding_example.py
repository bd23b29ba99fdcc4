"""The embedding guide in `edge_runtime`'s docstring runs as written, against a real server.

The guide's code is read from the docstring and executed step by step (so it cannot drift from
what is tested), with the app's own hooks (platform state, server URL, home folder, messages)
supplied here. Between starting the background thread (step 3) and asking for suggestions
(step 4) the test waits until the server holds the device's update, the one non-deterministic
moment of the guide.
"""

from __future__ import annotations

import re
import textwrap

import edge_runtime
from tests.fixtures_aggregator import SECRET, make_server, status, wait_for  # noqa: F401
from tests.fixtures_edge import edge_model, user_lines  # noqa: F401


def guide_steps() -> dict[int, str]:
    """The guide's numbered steps: the code block after "Embedding guide", split at `# N.`."""
    doc = edge_runtime.__doc__
    block = textwrap.dedent(doc[doc.index("::", doc.index("Embedding guide")) + 2:])
    steps = re.split(r"^# (\d)\. ", block, flags=re.MULTILINE)
    return {int(number): code for number, code in zip(steps[1::2], steps[2::2])}


def test_the_guide_has_the_steps_a_keyboard_needs():
    steps = guide_steps()
    assert sorted(steps) == [1, 2, 3, 4, 5]
    assert "DeviceStateProvider" in steps[1] and "threading.Thread" in steps[3] and "suggest(" in steps[4]


def test_the_embedding_guide_runs(make_server, edge_model, user_lines, tmp_path):
    server = make_server(edge_model, min_clients=1, goal_clients=5)
    app = dict(SERVER_URL=server.url, APP_FILES=tmp_path, ENROLLMENT_SECRET=SECRET, SENT_MESSAGES=user_lines,
               screen_off=lambda: True, plugged_in=lambda: True, on_wifi=lambda: True, battery_percent=lambda: 80.0)
    steps = guide_steps()

    def run(*numbers: int) -> None:
        for n in numbers:
            exec(compile(f"# {n}. {steps[n]}", f"edge_runtime guide step {n}", "exec"), app)

    run(1, 2, 3)
    try:
        wait_for(lambda: status(server.url)["totals"]["accepted"] == 1, timeout=120,
                 what="the background cycle's update to be accepted")
        run(4)
        assert app["device"].suggester.version == 1
        assert len(app["words"]) == 3 and all(isinstance(w, str) and w for w in app["words"])
    finally:
        run(5)
    assert not app["worker"].is_alive()
    assert (tmp_path / "fedkb" / "examples.sqlite").is_file() and (tmp_path / "fedkb" / "credentials.json").is_file()
