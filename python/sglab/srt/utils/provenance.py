"""Where a result came from: the commit of the tree that ran, and the machine's software stack.

The commit is passed in from outside (`--commit`, else the `SGLAB_COMMIT` environment variable),
written where the checkout is known to be current: a GPU machine's copy of the tree can carry
stale git metadata. Without either, `git rev-parse HEAD` is recorded and marked unverified.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess

COMMIT_ENV = "SGLAB_COMMIT"
_REPO_DIR = os.path.dirname(os.path.abspath(__file__))


def add_provenance_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--commit", default=None,
                        help=f"commit of the tree that runs (default: ${COMMIT_ENV}, else "
                             "`git rev-parse HEAD`, recorded as unverified)")


def resolve_commit(commit: str | None = None) -> dict:
    """{"commit", "commit_source", "commit_verified"}: --commit, then $SGLAB_COMMIT, then git."""
    if commit:
        return {"commit": commit, "commit_source": "--commit", "commit_verified": True}
    if os.environ.get(COMMIT_ENV):
        return {"commit": os.environ[COMMIT_ENV], "commit_source": COMMIT_ENV,
                "commit_verified": True}
    return {"commit": _git_head(), "commit_source": "git rev-parse (unverified)",
            "commit_verified": False}


def _git_head() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=_REPO_DIR, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() or "unknown"


def software_stack() -> dict:
    """GPU name, driver, CUDA, torch and triton versions ("cpu" for the GPU on a CPU machine),
    and the host CPU model: host-side timings (the decode loop's µs per component) follow it."""
    stack: dict = {"gpu": "cpu", "driver": None, "cuda": None, "torch": None, "triton": None,
                   "host_cpu": host_cpu()}
    try:
        import torch
    except ImportError:
        return stack
    stack["torch"] = torch.__version__
    if torch.cuda.is_available():
        stack.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda,
                     driver=_nvidia_driver())
    try:
        import triton

        stack["triton"] = triton.__version__
    except ImportError:
        pass
    return stack


def host_cpu() -> str | None:
    """The CPU model name (Linux /proc/cpuinfo), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else None


def provenance(commit: str | None = None) -> dict:
    """What every result file records about the tree and the machine that produced it."""
    return {**resolve_commit(commit), **software_stack()}


def provenance_line(p: dict) -> str:
    """One markdown line: `commit X (source) · GPU, driver D, CUDA C, torch T, triton R`."""
    labels = {"driver": "driver", "cuda": "CUDA", "torch": "torch", "triton": "triton",
              "host_cpu": "host"}
    parts = [p["gpu"]] + [f"{label} {p[k]}" for k, label in labels.items() if p.get(k)]
    return f"commit `{p['commit']}` ({p['commit_source']}) · {', '.join(parts)}"
