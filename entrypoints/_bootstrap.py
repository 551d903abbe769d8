"""Make ``lmlab`` importable when an env manager installed the requirements but not the
project itself (``mlflow run --env-manager uv|conda``): fall back to ``src/``.

Also keeps LiteLLM's price table local (``LITELLM_LOCAL_MODEL_COST_MAP=True``) in every
entry point and whatever it starts: with it unset, importing LiteLLM (MLflow does, when
it is installed) tries to fetch the table over the network first.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

try:
    import lmlab  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
