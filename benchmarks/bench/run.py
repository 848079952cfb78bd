"""Running one method on one pair as a timed process, then measuring the result."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .methods import Context, Method
from .metrics import PairData, evaluate

# Peak RSS must come from a small process that forks the method: a child forked (or
# vforked) straight from this process inherits its high-water RSS, so ``wait4`` here would
# report at least this process's peak. GNU time is such a process; without it, a short
# Python launcher reads its child's usage.
GNU_TIME = shutil.which("time", path="/usr/bin:/bin")
LAUNCHER = ("import resource, subprocess, sys; "
            "code = subprocess.call(sys.argv[2:]); "
            "u = resource.getrusage(resource.RUSAGE_CHILDREN); "
            "open(sys.argv[1], 'w').write(f'{u.ru_utime} {u.ru_stime} {u.ru_maxrss}'); "
            "sys.exit(code)")


def run_timed(cmd: Sequence[str], env: dict[str, str], log_path: Path
              ) -> tuple[int, float, float, float]:
    """Run ``cmd``; (exit status, wall seconds, CPU seconds, peak RSS in GB)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    usage_file = log_path.with_suffix(".usage")
    usage_file.unlink(missing_ok=True)
    if GNU_TIME:
        wrapped = [GNU_TIME, "-f", "%U %S %M", "-o", str(usage_file), *cmd]
    else:
        wrapped = [sys.executable, "-c", LAUNCHER, str(usage_file), *cmd]
    with open(log_path, "w") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        start = time.perf_counter()
        status = subprocess.call(wrapped, env=env, stdout=log, stderr=subprocess.STDOUT)
        wall = time.perf_counter() - start
    try:  # GNU time puts "Command exited with non-zero status N" etc. before the numbers
        user, system, rss_kb = usage_file.read_text().strip().splitlines()[-1].split()
        cpu, rss = float(user) + float(system), float(rss_kb) / 1024**2  # kB -> GB
    except (OSError, ValueError, IndexError):
        cpu = rss = float("nan")
    return status, wall, cpu, rss


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


def run_one(method: Method, pair: PairData, rep: int, ctx: Context, keep: bool) -> dict:
    """Register one pair once with one method, then measure the result."""
    run = ctx.work / "runs" / pair.path.name / method.name / f"rep{rep}"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    logs = ctx.work / "logs" / pair.path.name / method.name
    record: dict = {"pair": pair.path.name, "method": method.name, "repeat": rep}
    cmd = method.command(pair.path, run, ctx)
    status, wall, cpu, rss = run_timed(cmd, ctx.env(), logs / f"rep{rep}.log")
    record.update(wall_s=wall, cpu_s=cpu, peak_rss_gb=rss, exit_status=status)
    if status != 0:
        record.update(status="failed", reason=f"exit {status}: {_tail(logs / f'rep{rep}.log')}")
        return record
    post_log = logs / f"rep{rep}.post.log"
    try:
        with open(post_log, "w") as log:
            transforms, tool_labels = method.post(pair.path, run, ctx, log)
        record.update(evaluate(pair, transforms, tool_labels))
        record["status"] = "ok"
    except Exception as err:  # noqa: BLE001 - one failed run must not end the benchmark
        record.update(status="failed", reason=f"after registration: {err!r} "
                      f"{_tail(post_log)}")
    finally:
        if not keep:
            shutil.rmtree(run, ignore_errors=True)
    return record


def environment(methods: dict[str, Method], ctx: Context) -> dict:
    """Machine and tool versions."""
    import scipy
    import SimpleITK as sitk

    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in
                   Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    out = {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
           "python": platform.python_version(), "numpy": np.__version__,
           "scipy": scipy.__version__, "SimpleITK": sitk.Version_VersionString()}
    for name, method in methods.items():
        try:
            out[name] = method.version(ctx)
        except Exception as err:  # noqa: BLE001 - versions are informative only
            out[name] = f"unknown ({err})"
    return out
