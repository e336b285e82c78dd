"""The MLflow pyfunc wrapper of a VLM (MLflow's transformers flavor cannot log a LLaVA model built here).

Input: a DataFrame with an ``image`` column (raw encoded bytes, or base64 strings) and an optional ``prompt``
column (default: the captioning prompt). Output: a DataFrame with ``text``, the greedy answer. Param:
``max_new_tokens``. The model folder is the pyfunc artifact ``model`` (a ``save_pretrained`` VLM folder, see
``vlforge.registry.MODEL_ARTIFACT``); for a LoRA stage it holds the merged weights.
"""

from __future__ import annotations

import io

import mlflow.pyfunc
import pandas as pd

from models.pyfunc import image_bytes

IMAGE_COLUMN = "image"
PROMPT_COLUMN = "prompt"
TEXT_COLUMN = "text"
DEFAULT_PROMPT = "Describe the image."
DEFAULT_MAX_NEW_TOKENS = 32
BATCH_SIZE = 16


def model_signature():
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, DataType, ParamSchema, ParamSpec, Schema

    inputs = Schema(
        [ColSpec(DataType.binary, IMAGE_COLUMN), ColSpec(DataType.string, PROMPT_COLUMN, required=False)]
    )
    outputs = Schema([ColSpec(DataType.string, TEXT_COLUMN)])
    params = ParamSchema([ParamSpec("max_new_tokens", DataType.long, DEFAULT_MAX_NEW_TOKENS)])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def input_example() -> pd.DataFrame:
    """One row a registered VLM is logged with: a small PNG and a question."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 40, 40)).save(buf, format="PNG")
    return pd.DataFrame({IMAGE_COLUMN: [buf.getvalue()], PROMPT_COLUMN: ["What colour is the shape?"]})


class VlmPyfunc(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper around :class:`models.vlm.VlmBundle`: greedy generation."""

    def load_context(self, context):
        from models.vlm import load_vlm

        self.bundle = load_vlm(context.artifacts["model"])

    def predict(self, context, model_input, params=None):
        from models.vlm_eval import generate

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if IMAGE_COLUMN not in frame.columns:
            raise ValueError(
                f"input needs an {IMAGE_COLUMN!r} column (encoded image bytes or base64) and optionally a "
                f"{PROMPT_COLUMN!r} column; got columns {list(frame.columns)}"
            )
        max_new_tokens = int((params or {}).get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        images = [image_bytes(v) for v in frame[IMAGE_COLUMN].tolist()]
        if PROMPT_COLUMN in frame.columns:
            prompts = [DEFAULT_PROMPT if _blank(p) else str(p) for p in frame[PROMPT_COLUMN].tolist()]
        else:
            prompts = [DEFAULT_PROMPT] * len(images)
        texts = generate(self.bundle, images, prompts, max_new_tokens, batch_size=BATCH_SIZE)
        return pd.DataFrame({TEXT_COLUMN: texts})


def _blank(value) -> bool:
    return value is None or (isinstance(value, float) and value != value) or str(value).strip() == ""
