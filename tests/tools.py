"""The external tools the tests run, and where they come from.

Each function returns the tool's path or raises RuntimeError naming the script that installs it:
a missing tool fails the test that needs it, never skips it. `.ci/tools/install-all.sh` installs
all of them (CI runs it before the tests).

checkov is run offline: `--skip-download` (no policy metadata from the Prisma Cloud platform),
`BC_SKIP_MAPPING=TRUE` (the same, for code paths that read only the variable) and
`CKV_SKIP_PACKAGE_UPDATE_CHECK=TRUE` (no version check against pypi.org). Without them it looks
up pypi.org and api0.prismacloud.io, which hangs or fails where there is no network.
`run_checkov` also installs an audit hook in checkov's own Python that refuses every network
lookup and connection and reports it on stderr, so a scan that tries anyway is caught.
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOLS_DIR = ROOT / ".tools"
INSTALLERS = ".ci/tools"

CHECKOV_OFFLINE_ENV = {"BC_SKIP_MAPPING": "TRUE", "CKV_SKIP_PACKAGE_UPDATE_CHECK": "TRUE"}
OFFLINE_GUARD_MARK = "brim-offline-guard:"

# Runs checkov in-process after an audit hook that turns every name lookup and IP connection into
# an OSError and a line on stderr (checkov catches and logs its own network errors).
_CHECKOV_OFFLINE_MAIN = f"""
import os, socket, sys, warnings

def refuse_network(event, args):
    if event == "socket.getaddrinfo" or (
        event == "socket.connect" and args[0].family in (socket.AF_INET, socket.AF_INET6)
    ):
        target = args[:2] if event == "socket.getaddrinfo" else args[1]
        os.write(2, f"{OFFLINE_GUARD_MARK} refused {{event}} {{target}}\\n".encode())
        raise OSError(f"{OFFLINE_GUARD_MARK} no network for checkov ({{event}} {{target}})")

sys.addaudithook(refuse_network)
sys.argv[0] = "checkov"
warnings.simplefilter("ignore", category=SyntaxWarning)  # as checkov's own entry point does
from checkov.main import Checkov
sys.exit(Checkov().run())
"""


def _require(path: Path, installer: str) -> Path:
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise RuntimeError(
            f"{path} is not installed: run {INSTALLERS}/{installer} "
            f"(or {INSTALLERS}/install-all.sh for every test tool)"
        )
    return path


def helm() -> Path:
    """Helm v4, extracted from a pinned PyPI wheel by install-helm.sh."""
    return _require(TOOLS_DIR / "bin" / "helm", "install-helm.sh")


def promtool() -> Path:
    """promtool from Debian's prometheus package (install-prometheus.sh, as root)."""
    return _require(Path(shutil.which("promtool") or "/usr/bin/promtool"), "install-prometheus.sh")


def prometheus() -> Path:
    """The Prometheus server from Debian's prometheus package (install-prometheus.sh, as root)."""
    return _require(
        Path(shutil.which("prometheus") or "/usr/bin/prometheus"), "install-prometheus.sh"
    )


def checkov() -> Path:
    """checkov in its own virtualenv, .tools/checkov-venv (install-checkov.sh)."""
    return _require(TOOLS_DIR / "checkov-venv" / "bin" / "checkov", "install-checkov.sh")


def run_checkov(
    *args: str, cwd: Path, offline: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess:
    """checkov with `args` in `cwd`, behind the network-refusing audit hook.

    `offline=False` leaves out the offline flags (to show the hook catches what they prevent).
    """
    python = checkov().parent / "python"
    env = {**os.environ, **(CHECKOV_OFFLINE_ENV if offline else {})}
    flags = ["--skip-download"] if offline else []
    # cwd is never the repository root: operator/ there would shadow the stdlib module.
    return subprocess.run(
        [str(python), "-c", _CHECKOV_OFFLINE_MAIN, *flags, *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )


def checkov_scan(framework: str, *paths: Path, cwd: Path) -> dict:
    """checkov's JSON report for one framework over `paths` (files or directories), offline.

    Raises RuntimeError if checkov crashed, tried to reach the network or found nothing of that
    framework to scan. Failed checks are not errors here: the caller asserts on the report.
    """
    targets = [a for path in paths for a in (("-d" if path.is_dir() else "-f"), str(path))]
    result = run_checkov(
        "--framework", framework, *targets, "--output", "json", "--soft-fail", cwd=cwd
    )
    if OFFLINE_GUARD_MARK in result.stderr:
        raise RuntimeError(f"checkov tried to reach the network:\n{result.stderr}")
    if result.returncode != 0:
        raise RuntimeError(f"checkov exited {result.returncode}:\n{result.stderr}")
    report = json.loads(result.stdout)
    if isinstance(report, list) or report.get("check_type") != framework:
        # A bare summary means nothing matched the framework: checkov reads only files named
        # like Dockerfile, *.Dockerfile or Dockerfile.* (not Containerfile) as Dockerfiles.
        raise RuntimeError(f"checkov found nothing to scan as {framework} in {paths}: {report}")
    return report
