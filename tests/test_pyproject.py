"""pyproject.toml against the Comfy Registry's specification (registry/specifications): the fields the Registry
requires and the rules it states for them, and dependencies in step with requirements.txt."""
import re
import tomllib
import xml.etree.ElementTree as ElementTree
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_project_name_follows_the_registry_rules():
    name = PROJECT["project"]["name"]
    assert len(name) < 100
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]*", name), "alphanumerics, '-', '_', '.'; starts with a letter"
    assert not re.search(r"[_.-]{2}", name), "no consecutive special characters"
    assert "comfyui" not in name.lower()


def test_version_license_and_urls():
    project = PROJECT["project"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    license_file = project["license"].get("file")
    assert license_file and (REPO / license_file).is_file()
    assert project["urls"]["Repository"].startswith("https://")
    assert project["description"] and project["requires-python"].startswith(">=")


def test_tool_comfy_section():
    comfy = PROJECT["tool"]["comfy"]
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]*", comfy["PublisherId"])
    assert comfy["DisplayName"]
    icon = comfy["Icon"]
    assert icon.startswith("https://") and icon.rsplit(".", 1)[-1] in ("svg", "png", "jpg", "gif")
    # the icon is shipped in the repository (the URL points at it on the main branch), within 800 x 400 px
    local = REPO / icon.split("/main/", 1)[1]
    svg = ElementTree.parse(local).getroot()
    assert int(svg.get("width")) <= 800 and int(svg.get("height")) <= 400


def test_dependencies_match_requirements_and_never_pin_torch():
    requirements = [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    requirements = sorted(r for r in requirements if r)
    assert sorted(PROJECT["project"]["dependencies"]) == requirements
    assert not any(re.match(r"(torch|torchvision|torchaudio)\b", r) for r in requirements)


def test_requires_comfyui_is_the_oldest_version_the_readme_lists_as_tested():
    floor = re.fullmatch(r">=(\d+\.\d+\.\d+)", PROJECT["tool"]["comfy"]["requires-comfyui"]).group(1)
    section = (REPO / "README.md").read_text().split("### ComfyUI versions", 1)[1].split("\n#", 1)[0]
    tested = [row.split("|")[1] for row in section.splitlines() if row.startswith("| **")]
    versions = [tuple(map(int, re.search(r"\*\*(\d+\.\d+\.\d+)\*\*", row).group(1).split("."))) for row in tested]
    assert versions and min(versions) == tuple(map(int, floor.split(".")))
