"""Which CPU kernels this llama.cpp build runs, and a guard that keeps an unsafe build from crashing.

llama-cpp-python compiles llama.cpp with `-march=native`, so on an Intel Xeon with AMX (Sapphire
Rapids, Granite Rapids) it turns on ggml's AMX matmul kernels. In many virtual machines those
crash with a general protection fault at `ldtilecfg` (llama.cpp PR #26954: the tile configuration
lives on the stack and the compiler drops it; XTILEDATA is requested on the main thread only), and
the process dies with SIGSEGV (exit 139) at its first decode. `make install` builds without AMX
(`-mno-amx-tile -mno-amx-int8 -mno-amx-bf16`), which keeps AVX-512, VNNI and the repacked kernels.

A build that has AMX anyway (a plain `pip install .`) is probed before the runtime uses it: one
decode of the model in a child process, remembered per build, CPU and model file. If the child
dies, models load with `use_extra_bufts = False` (llama.cpp then never places weights in the AMX
buffer, and drops the repacked kernels too: slower, never a crash) and one warning says how to
rebuild::

    annotate-cli doctor models/gemma-3-270m-q4_k_m.gguf   # what make install runs after the build
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError
from .llama_lib import llama_backend

log = logging.getLogger(__name__)

NO_AMX_FLAGS = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
REBUILD = (f'CFLAGS="{NO_AMX_FLAGS}" CXXFLAGS="{NO_AMX_FLAGS}" pip install --force-reinstall --no-deps '
           f'--no-cache-dir --no-binary llama-cpp-python llama-cpp-python==0.3.36 (or make install)')
PROBE_ENV = "EDGE_ANNOTATOR_DECODE_PROBE"  # the child's command, for tests of the crash path (JSON list)
CACHE_ENV = "EDGE_ANNOTATOR_CACHE"
# 0: load every model without llama.cpp's extra buffer types (no repacked or AMX kernels: slower);
# 1: always with them, no probe. Unset: with them, unless this build uses AMX and a probe crashed.
BUFFERS_ENV = "EDGE_ANNOTATOR_EXTRA_BUFFERS"


def system_info() -> str:
    """llama.cpp's own feature line, e.g. 'CPU : SSE3 = 1 | ... | AVX512 = 1 | REPACK = 1'."""
    return llama_backend().llama_print_system_info().decode(errors="replace").strip().rstrip("|").strip()


def features(info: str | None = None) -> dict[str, int]:
    """The `NAME = value` pairs of the feature line: what the build's CPU kernels use."""
    out: dict[str, int] = {}
    for part in (info if info is not None else system_info()).replace("CPU :", "|").split("|"):
        name, eq, value = part.partition("=")
        if eq and value.strip().isdigit():
            out[name.strip()] = int(value.strip())
    return out


def uses_amx(feats: dict[str, int] | None = None) -> bool:
    feats = features() if feats is None else feats
    return any(v for k, v in feats.items() if k.startswith("AMX"))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_has_amx() -> bool:
    """Whether this CPU advertises AMX (Linux: /proc/cpuinfo flags)."""
    try:
        return " amx_" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def _library() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.origin:
        return None
    libs = sorted(Path(spec.origin).parent.glob("lib/libggml-cpu*"))
    return libs[0] if libs else None


def _key(model: Path) -> str:
    """What a probe's outcome depends on: the build, the CPU and its kernel, the model's tensor types."""
    lib = _library()
    st = model.stat()
    parts = [str(lib), str(lib.stat().st_mtime_ns) if lib else "", cpu_name(), platform.release(),
             str(model.resolve()), str(st.st_size), str(st.st_mtime_ns)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


def _cache_file() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                     os.path.expanduser("~/.cache"), "edge-annotator")
    return Path(root) / "decode-probe.json"


@dataclass(frozen=True)
class Probe:
    """One decode of a model in a child process: ok, or how the child died."""

    ok: bool
    returncode: int
    detail: str

    @property
    def signal_name(self) -> str | None:
        if self.returncode < 0:
            try:
                return signal.Signals(-self.returncode).name
            except ValueError:
                return f"signal {-self.returncode}"
        return None

    def describe(self) -> str:
        if self.ok:
            return "one decode passed"
        how = f"died by {self.signal_name}" if self.signal_name else f"exited {self.returncode}"
        return f"a decode in a child process {how}" + (f" ({self.detail})" if self.detail else "")


def probe(model: str | Path, timeout: float = 300) -> Probe:
    """Load `model` with llama.cpp's default buffers in a child process and decode one batch."""
    cmd = json.loads(os.environ[PROBE_ENV]) if os.environ.get(PROBE_ENV) else \
        [sys.executable, "-m", "edge_annotator.runtime.probe", str(model)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Probe(False, 1, f"no answer in {timeout:.0f} s")
    tail = (r.stderr.strip().splitlines() or [""])[-1][:200]
    return Probe(r.returncode == 0, r.returncode, "" if r.returncode == 0 else tail)


def extra_buffers_setting() -> bool | None:
    """EDGE_ANNOTATOR_EXTRA_BUFFERS as a bool, or None when unset (decided per model by the probe)."""
    value = os.environ.get(BUFFERS_ENV, "").strip()
    if value in ("", "auto"):
        return None
    if value not in ("0", "1"):
        raise UserError(f"{BUFFERS_ENV}={value!r}: use 0 (off), 1 (on) or leave it unset")
    return value == "1"


_decided: dict[str, bool] = {}  # per process: model key -> use llama.cpp's extra buffer types


def extra_buffers_safe(model: str | Path, amx: bool | None = None) -> bool:
    """False when this build uses AMX and a decode of `model` crashed in a child process.

    A build without AMX is never probed (nothing to decide); `amx` says whether the build uses it
    (None: read llama.cpp's feature line). The outcome is kept in memory and in
    ~/.cache/edge-annotator/decode-probe.json, so a CPU is probed once per build and model file.
    """
    setting = extra_buffers_setting()
    if setting is not None:
        return setting
    if not (uses_amx() if amx is None else amx):
        return True
    path = Path(model)
    key = _key(path)
    if key in _decided:
        return _decided[key]
    cache = _cache_file()
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        safe = bool(known[key]["safe"])
    else:
        got = probe(path)
        safe = got.ok
        known[key] = {"safe": safe, "cpu": cpu_name(), "model": str(path), "probe": got.describe()}
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(known, indent=1))
            os.replace(tmp, cache)
        except OSError as e:  # a read-only home: probe again next time
            log.debug("cannot keep the decode probe's outcome in %s: %s", cache, e)
        if not safe:
            log.warning("%s: this llama-cpp-python build uses AMX kernels, and %s on this CPU (%s): running "
                        "without llama.cpp's extra buffer types (slower; outputs may differ in the last "
                        "digits). Rebuild without AMX: %s", path, got.describe(), cpu_name(), REBUILD)
    _decided[key] = safe
    return safe


def check(model: str | Path, *, expect_no_amx: bool = False) -> tuple[bool, str]:
    """What `make install` runs after the build: one real decode in a child process. Returns
    (ok, one line naming the cause and the remedy where it is not)."""
    info = system_info()
    feats = features(info)
    amx = uses_amx(feats)
    cpu = cpu_name() + (" (advertises AMX)" if cpu_has_amx() else "")
    on = ", ".join(k for k, v in feats.items() if v) or "none"
    if expect_no_amx and amx:
        return False, (f"llama-cpp-python was built with AMX ({on}); a wheel built without the no-AMX flags "
                       f"was reused. Rebuild: {REBUILD}")
    got = probe(model)
    if got.ok:
        return True, f"llama.cpp decode check passed on {cpu}: {on}; AMX {'on' if amx else 'off'}"
    cause = ("in llama.cpp's AMX kernels (llama.cpp PR #26954)" if amx else
             "in llama.cpp (run `python -m edge_annotator.runtime.probe MODEL` to see it)")
    return False, f"llama.cpp crashed {cause}: {got.describe()} on {cpu}. Rebuild: {REBUILD}"


def describe_build() -> dict[str, Any]:
    """For `annotate-cli inspect`: the build's CPU features and whether AMX is off."""
    feats = features()
    return {"cpu": cpu_name(), "cpu_advertises_amx": cpu_has_amx(), "amx": uses_amx(feats),
            "features": [k for k, v in feats.items() if v]}
