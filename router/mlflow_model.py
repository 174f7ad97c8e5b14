"""MLflow pyfunc wrapper of the router (models-from-code: MLflow stores this file, not a pickle).

    model = mlflow.pyfunc.load_model("models:/difficulty-router@champion")
    model.predict(pd.DataFrame({"text": ["What is 2 + 2?"]}))   # one decision per row
"""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel


class RouterModel(PythonModel):
    def load_context(self, context):
        from router.runtime import Router

        self.router = Router.load(context.artifacts["bundle"])

    def predict(self, context, model_input, params=None):
        import pandas as pd

        from router.caps import Caps

        if isinstance(model_input, pd.DataFrame):
            col = "text" if "text" in model_input.columns else model_input.columns[0]
            texts = model_input[col].tolist()
        else:
            texts = list(model_input)
        caps = Caps.from_mapping(params or {})  # unknown or ill-typed caps: ValueError naming the key
        return pd.DataFrame([d.to_dict() for d in self.router.route_batch(texts, caps=caps)])


mlflow.models.set_model(RouterModel())
