"""`meshnode bench`, small: the whole pipeline runs and the paced node needs fewer wire bytes.

Builds the real lab (network namespaces, coturn with relay-only ICE, a tbf-shaped link, nftables
counters), runs one trial per mode with 4 plain tabs streaming 60 tokens each, and checks
the JSON and the plot it writes. Needs root, coturn, nftables and iproute2: skipped without them,
except under CI=true where that is a failure.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bench.lab.netlab import missing_requirements

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(110)]


@pytest.fixture
def lab_available() -> None:
    problems = missing_requirements()
    if problems:
        if os.environ.get("CI") == "true":
            pytest.fail("bench lab unavailable under CI: " + "; ".join(problems))
        pytest.skip("bench lab unavailable: " + "; ".join(problems))


def test_bench_small_run_paced_node_fits_a_link_that_per_token_frames_overrun(lab_available: None,
                                                                              tmp_path: Path) -> None:
    """4 plain tabs at 30 tok/s on a 6 KB/s link: one frame per token needs ~28 KB/s; the node's
    uplink budget (the Pacer `meshnode join --uplink` builds) widens its window and fits."""
    from meshnode.cli.main import main

    out = tmp_path / "small"
    code = main([
        "bench", "--modes", "codec,meshnode", "--streams", "4", "--tokens", "60", "--cap", "6000",
        "--overload", "0", "--out", str(out), "--workdir", str(tmp_path / "logs"), "-q",
    ])
    assert code == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert "coturn" in result["setup"]["network"]["relay"]
    trials = {trial["mode"]: trial for trial in result["trials"]}
    assert set(trials) == {"codec", "meshnode"}
    for trial in trials.values():
        assert "failure" not in trial, trial.get("failure")
        assert trial["link"]["up_bytes"] > 0 and trial["link"]["down_bytes"] > 0
        assert trial["multi_object_messages"] == 0
    paced = trials["meshnode"]
    assert paced["passed"], paced
    assert paced["tokens_delivered"] == 4 * 60 and paced["results_without_text"] == 0
    assert paced["node"]["window_ms"]["max"] > 100  # the budget, not the default 50 ms, chose the window
    codec, meshnode = trials["codec"]["link"], paced["link"]
    # One message per token costs ~230 B on the wire; paced through the uplink budget far less.
    assert meshnode["up_bytes_per_token"] < codec["up_bytes_per_token"] / 2
    assert meshnode["up_packets"] < codec["up_packets"]
