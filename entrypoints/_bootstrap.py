"""Make ``lmlab`` importable when an env manager installed the requirements but not the
project itself (``mlflow run --env-manager uv|conda``): fall back to ``src/``."""

import sys
from pathlib import Path

try:
    import lmlab  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
