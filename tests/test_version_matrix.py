"""The version matrix's plumbing: the bootstrap finds the environment this suite runs in without relinking anything,
and the runner counts pytest's JUnit report and closes with the line CI reads."""
import os
import subprocess
import sys
from pathlib import Path

from tools import comfy_env
from tools import test_matrix
from conftest import REPO


def links():
    return {name: os.readlink(REPO / name) for name in (".venv", ".comfyui") if (REPO / name).is_symlink()}


def test_bootstrap_without_linking_names_this_environment_and_leaves_the_links():
    """LITEVSR_NO_LINK=1 (what the matrix uses) prints '<venv python> <ComfyUI dir>' for the ComfyUI this suite
    runs against (COMFYUI_PATH in a matrix run), reusing the cached environment, and touches no link."""
    before = links()
    env = dict(os.environ, LITEVSR_NO_LINK="1")
    done = subprocess.run(["bash", str(REPO / "tools" / "bootstrap_env.sh")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "building the test environment" not in done.stderr  # cached: this suite runs in it
    python, comfy = done.stdout.strip().split(" ", 1)
    assert Path(comfy).resolve() == comfy_env.comfy_dir()
    assert Path(python).parent.parent.resolve() == Path(sys.prefix).resolve()
    assert links() == before


def test_results_are_counted_from_junit_and_summed_in_the_closing_line(tmp_path, capsys):
    report = tmp_path / "junit.xml"
    report.write_text("""<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
        <testcase classname="a" name="ok1"/><testcase classname="a" name="ok2"/>
        <testcase classname="a" name="bad"><failure message="x"/></testcase>
        <testcase classname="a" name="broken"><error message="y"/></testcase>
        <testcase classname="a" name="later"><skipped message="z"/></testcase>
        </testsuite></testsuites>""")
    counts = test_matrix.count_results(report)
    assert counts == {"passed": 2, "failed": 1, "errors": 1, "skipped": 1}
    rows = [dict(version="0.3.75", suite="whole suite", minutes=1.0, exit=1, **counts),
            dict(version="0.8.0", suite="compatibility subset", minutes=2.0, exit=0, passed=5, failed=0, errors=0,
                 skipped=2)]
    test_matrix.print_table(rows)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == "matrix: 7 passed, 2 failed, 3 skipped"
    assert any(line.startswith("| 0.8.0 ") and "| compatibility subset |" in line for line in lines)
