"""Runs an experiment script the way CI does: ``--quick``, results in a temporary folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_quick(name: str, out_root: Path, *args: str, timeout: int = 600) -> tuple[Path, dict]:
    """Runs ``experiments/<name>.py --quick --out out_root`` as a user does on a plain CPU:
    one device (the test session's simulated 8-device flag is not passed on, so the
    trainers' default mesh is that one device, as the experiments' figures were measured).

    Returns:
      (the experiment's result folder, its parsed summary.json).

    Raises:
      AssertionError: the script failed; the message holds the end of its stderr.
    """
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / f"{name}.py"), "--quick", "--out", str(out_root), *args],
        capture_output=True, text=True, timeout=timeout, check=False, env=env,
    )
    assert proc.returncode == 0, f"{name}.py --quick exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    out = out_root / name
    return out, json.loads((out / "summary.json").read_text())
