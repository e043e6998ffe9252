"""The benchmark harness (bench/): the committed results hold the figures the README prints, from a real run of
this history; the harness runs end to end at small sizes; its peak-memory probe measures what was allocated."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import harness  # noqa: E402
import run as bench  # noqa: E402

LATEST = REPO / "bench" / "results" / "latest.json"
REQUIRED = ["adapter_overhead.direct", "adapter_overhead.shared_blocks", "adapter_params_share.direct",
            "decode.tiled_rss_ratio", "decode.max_abs_diff.pack_tiled", "stream.rss_ratio_600_150", "e2e.fps.1",
            "e2e.fps.2", "e2e.fps.4"]


def _lookup(results, dotted):
    value = results
    for key in dotted.split("."):
        value = value[key]
    return value


def _check_figures(results, keys):
    for key in keys:
        value = _lookup(results, key)
        assert isinstance(value, (int, float)) and value > 0, f"{key} = {value!r}"


def test_latest_results_hold_every_figure_with_its_provenance():
    results = json.loads(LATEST.read_text())
    _check_figures(results, REQUIRED)
    assert "bench/run.py" in results["command"]
    for name in ("adapter_overhead", "decode", "stream", "e2e", "gpu"):
        section = results["sections"][name]
        assert section["ok"], f"section {name} failed its own checks"
        assert "bench/run.py" in section["command"] and section["machine"]["cpu"]
        # measured at a commit of this history, not typed in
        commit = section["commit"]
        assert re.fullmatch(r"[0-9a-f]{40}", commit), commit
        ancestor = subprocess.run(["git", "merge-base", "--is-ancestor", commit, "HEAD"], cwd=REPO)
        assert ancestor.returncode == 0, f"section {name} was measured at {commit}, not in this history"
    overhead = results["sections"]["adapter_overhead"]["runs"]["wan2.1-1.3B"]
    assert (overhead["dim"], overhead["num_layers"], overhead["dtype"]) == (1536, 30, "float32")
    assert all(diff == 0 for diff in overhead["max_abs_diff_zero_init_vs_bare"].values())


def test_committed_eval_report_passed_its_sanity_row():
    report = json.loads((REPO / "bench" / "results" / "eval" / "eval.json").read_text())
    assert report["sanity"]["problems"] == [] and report["git"]["dirty"] is False
    assert report["sanity"]["measured"]["bicubic"][0] == pytest.approx(30.41, abs=0.05)
    assert report["sanity"]["measured"]["SPAN x4"][0] == pytest.approx(32.35, abs=0.05)
    ancestor = subprocess.run(["git", "merge-base", "--is-ancestor", report["git"]["commit"], "HEAD"], cwd=REPO)
    assert ancestor.returncode == 0


def test_readme_prints_the_latest_figures():
    results = json.loads(LATEST.read_text())
    text = (REPO / "README.md").read_text()
    block = text[text.index(bench.README_BEGIN) + len(bench.README_BEGIN):text.index(bench.README_END)]
    assert block.strip() == bench.readme_table(results).strip(), "run `python bench/run.py --sections '' --readme` (make bench does)"


def test_peak_memory_probe_measures_each_allocation():
    # In a fresh process with the allocator settings the workers get: 256 MiB allocated and filled inside the call,
    # measured twice (the second proves the high-water mark is reset and the first block was given back).
    script = ("import sys, torch; sys.path.insert(0, sys.argv[1]); import harness\n"
              "for _ in range(2):\n"
              "    _, _, peak = harness.peak_memory(lambda: torch.ones(64 << 20).sum(), torch.device('cpu'))\n"
              "    print(peak)\n")
    done = subprocess.run([sys.executable, "-c", script, str(REPO / "bench")], capture_output=True, text=True,
                          env=dict(os.environ, **harness.ALLOCATOR_ENV), timeout=120)
    assert done.returncode == 0, done.stderr
    peaks = [int(line) for line in done.stdout.split()]
    assert len(peaks) == 2
    for peak in peaks:
        assert 0.97 * 256 <= peak / 2 ** 20 <= 1.1 * 256, peaks


def test_harness_runs_every_section_at_small_sizes(tmp_path):
    out = tmp_path / "results" / "latest.json"
    command = [sys.executable, str(REPO / "bench" / "run.py"), "--sections", "adapter_overhead,decode,e2e,gpu",
               "--overhead-geometries", "tiny", "--overhead-latent", "1x8x8", "--decode-px", "128",
               "--decode-frames", "5", "--e2e-frames", "5", "--e2e-size", "32x32", "--e2e-steps", "1,2",
               "--repeats", "1", "--out", str(out)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())
    _check_figures(results, ["adapter_overhead.direct", "adapter_overhead.shared_blocks", "adapter_params_share.direct",
                             "decode.tiled_rss_ratio", "e2e.fps.1", "e2e.fps.2"])
    overhead = results["sections"]["adapter_overhead"]["runs"]["tiny"]
    assert overhead["max_abs_diff_zero_init_vs_bare"] == {"direct": 0.0, "shared_blocks": 0.0}
    assert len(overhead["step_seconds"]["bare"]) == 1  # the repeats asked for (timings are not judged here)
    # shared_blocks adds the projection of the adapter tokens into the DiT width
    assert overhead["adapter_params"]["shared_blocks"] == overhead["adapter_params"]["direct"] + 256 * 256 + 256
    decode = results["sections"]["decode"]
    assert decode["output"] == [5, 128, 128, 3]
    assert decode["max_abs_diff"]["pack_tiled"] < 0.2  # blended tiles, not garbage
    assert decode["median_peak_mib"]["pack_tiled"] < decode["median_peak_mib"]["untiled"]
    for runs in results["sections"]["e2e"]["runs"].values():
        assert [(r["frames"], r["size"]) for r in runs] == [(5, [128, 128])]
    if not harness.machine()["gpu"]:
        assert "no CUDA device" in results["gpu"]["skipped"] and "[bench gpu] SKIPPED" in done.stdout
    assert {p.name for p in out.parent.glob("*.png")} == {"adapter_overhead.png", "decode.png", "e2e.png"}


@pytest.mark.parametrize("channels, ffn", [(16, 1536), (48, 512)])
def test_weight_count_is_exact(channels, ffn):
    # decides whether a geometry is built at all (the 5B needs ~37 GiB to load in float32): it must be exact
    import overhead
    import tiny_models

    state = tiny_models.tiny_wan_dit_state_dict(dim=256, num_layers=2, latent_channels=channels, ffn_dim=ffn)
    assert overhead.weight_count(256, 2, ffn, channels) == sum(v.numel() for v in state.values())
