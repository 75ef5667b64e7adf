"""What every benchmark table records about the tree that made it."""

from __future__ import annotations

import subprocess
from pathlib import Path


def git_rev() -> str:
    """The checkout's short commit hash ("unknown" outside a git checkout)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except OSError:
        return "unknown"
