"""MLflow pyfunc model of one linear probe (MLflow "models from code" file).

MLflow copies this file into every logged probe, so a registered probe loads with only
numpy and mlflow installed (no lmlab). Input: residual activations (rows, width) of the
probe's layer, float32; output: P(label at t + lag) per row. The weights live in the
``probe`` artifact (an .npz with weight, bias, mean, scale, threshold).
"""

import mlflow
import numpy as np


class LinearProbeModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        with np.load(context.artifacts["probe"]) as stored:
            self.weight = stored["weight"].astype(np.float32)
            self.bias = np.float32(stored["bias"])
            self.mean = stored["mean"].astype(np.float32)
            self.scale = stored["scale"].astype(np.float32)

    # The type hints are what MLflow reads to know predict takes an array (np.ndarray is
    # validated by the signature's tensor spec, not inferred from the hint).
    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        if isinstance(model_input, dict):  # the signature's named tensor: {"activations": x}
            model_input = model_input["activations"]
        x = np.asarray(model_input, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.weight.shape[0]:
            raise ValueError(f"expected activations of shape (rows, {self.weight.shape[0]}), "
                             f"got {x.shape}")
        z = ((x - self.mean) / self.scale) @ self.weight + self.bias
        return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)


mlflow.models.set_model(LinearProbeModel())
