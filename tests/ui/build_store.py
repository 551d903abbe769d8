"""Build the store the browser test looks at: a finished tiny steering sweep and a tiny
probes sweep (random 3-layer models, a few prompts and chains), in their own process so
the test's MLflow state stays clean. Usage: python build_store.py <folder>; prints JSON."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

STEERING = {
    "family": "steering", "name": "tiny-steering", "model": {"name": "tiny:llama"},
    "grid": {"method": ["suffix_contrast"], "layer": [1], "alpha": [0.5, 1.0], "intervention": ["add"]},
    "steering": {"n_prompts": 3, "n_train": 4, "eval_splits": ["harm_test", "benign"],
                 "generation": {"max_new_tokens": 4, "batch_size": 4}, "kl_tokens": 2},
}


def probes_spec(chains: Path) -> dict:
    return {"family": "probes", "name": "tiny-probes", "model": {"name": "tiny:llama"},
            "grid": {"label": ["backtracking"], "layer": [0, 2], "lag": [0, 2]},
            "probes": {"data": str(chains), "bootstrap": 20, "batch_size": 8}}


def main(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    os.chdir(folder)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder}/mlflow.db"
    os.environ.pop("MLFLOW_RUN_ID", None)
    from lmlab.probes.chains import SAMPLE_PATH
    from lmlab.sweeps.runner import run_sweep
    from lmlab.sweeps.spec import parse_spec

    chains = folder / "chains.json"
    chains.write_text(json.dumps(json.loads(SAMPLE_PATH.read_text())[:30]))
    steering = run_sweep(parse_spec(STEERING))
    probes = run_sweep(parse_spec(probes_spec(chains)))
    print(json.dumps({name: {"experiment_id": o.experiment_id, "parent_run_id": o.parent_run_id,
                             "run_name": o.run_name, "view_key": o.view_key, "headline": o.headline}
                      for name, o in (("steering", steering), ("probes", probes))}))


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve())
