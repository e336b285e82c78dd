"""The MLflow pyfunc wrapper of a CLIP: embeddings for images and/or texts, and their cosine score.

Input: a DataFrame with an ``image`` column (raw encoded bytes, or base64 strings) and/or a ``text`` column;
either may be absent. Output: a DataFrame with ``image_embedding`` and/or ``text_embedding`` (L2-normalised
float lists) and, when both are given, ``score`` (their cosine). ``mlflow models serve`` decodes base64 for
the binary ``image`` column itself, so REST callers send base64 strings.

The model folder is the pyfunc artifact ``model`` (a ``save_pretrained`` folder, see
``vlforge.registry.MODEL_ARTIFACT``). For LoRA models it holds the merged weights; the optional ``adapter``
artifact is the peft adapter kept for lineage and further fine-tuning, not applied again at load.
"""

from __future__ import annotations

import base64
import binascii
import io

import mlflow.pyfunc
import numpy as np
import pandas as pd

IMAGE_COLUMN = "image"
TEXT_COLUMN = "text"
BATCH_SIZE = 64


def model_signature():
    """Both input columns optional; outputs are float lists and a double score."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, Schema

    inputs = Schema(
        [
            ColSpec(DataType.binary, IMAGE_COLUMN, required=False),
            ColSpec(DataType.string, TEXT_COLUMN, required=False),
        ]
    )
    outputs = Schema(
        [
            ColSpec(Array(DataType.float), "image_embedding", required=False),
            ColSpec(Array(DataType.float), "text_embedding", required=False),
            ColSpec(DataType.double, "score", required=False),
        ]
    )
    return ModelSignature(inputs=inputs, outputs=outputs)


def input_example() -> pd.DataFrame:
    """One row the registered model is logged with (and MLflow checks it serves): a small PNG and a caption."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 40, 40)).save(buf, format="PNG")
    return pd.DataFrame({IMAGE_COLUMN: [buf.getvalue()], TEXT_COLUMN: ["a red square"]})


def image_bytes(value) -> bytes:
    """Encoded image bytes from raw bytes or a base64 string (or base64 held in bytes), or a published
    version's ``{"bytes": ..., "path": ...}`` image value (``datasets``' Image layout)."""
    if isinstance(value, dict) and "bytes" in value:
        value = value["bytes"]
    if isinstance(value, bytearray | memoryview):
        value = bytes(value)
    if isinstance(value, bytes) and _looks_like_image(value):
        return value
    if isinstance(value, str | bytes):
        text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
        if text.startswith("data:") and "," in text:  # data URI: data:image/png;base64,....
            text = text.split(",", 1)[1]
        try:
            return base64.b64decode(text, validate=False)
        except (binascii.Error, ValueError) as exc:
            raise ValueError("image values must be encoded image bytes or base64 strings") from exc
    raise ValueError(f"image values must be bytes or base64 strings, got {type(value).__name__}")


def _looks_like_image(data: bytes) -> bool:
    from PIL import Image

    try:
        Image.open(io.BytesIO(data)).verify()
        return True
    except Exception:
        return False


class ClipPyfunc(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper around :class:`models.clip.ClipBundle`."""

    def load_context(self, context):
        from models.clip import load_clip

        self.bundle = load_clip(context.artifacts["model"])
        self.bundle.model.eval()

    def predict(self, context, model_input, params=None):
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        has_image = IMAGE_COLUMN in frame.columns
        has_text = TEXT_COLUMN in frame.columns
        if not (has_image or has_text):
            raise ValueError(
                f"input needs an {IMAGE_COLUMN!r} column (bytes or base64) and/or a {TEXT_COLUMN!r} column; "
                f"got columns {list(frame.columns)}"
            )
        out = pd.DataFrame(index=range(len(frame)))
        image_emb = text_emb = None
        if has_image:
            image_emb = self._embed(frame[IMAGE_COLUMN].tolist(), self._embed_images)
            out["image_embedding"] = _as_lists(image_emb)
        if has_text:
            text_emb = self._embed(frame[TEXT_COLUMN].tolist(), self._embed_texts)
            out["text_embedding"] = _as_lists(text_emb)
        if has_image and has_text:
            out["score"] = [
                float(np.dot(a, b)) if a is not None and b is not None else float("nan")
                for a, b in zip(image_emb, text_emb, strict=True)
            ]
        return out

    @staticmethod
    def _embed(values: list, embed_fn) -> list[np.ndarray | None]:
        """Embed the non-null values in batches; null rows stay ``None``."""
        rows = [i for i, v in enumerate(values) if not _is_null(v)]
        result: list[np.ndarray | None] = [None] * len(values)
        for start in range(0, len(rows), BATCH_SIZE):
            chunk = rows[start : start + BATCH_SIZE]
            for i, emb in zip(chunk, embed_fn([values[i] for i in chunk]), strict=True):
                result[i] = emb
        return result

    def _embed_images(self, values: list) -> np.ndarray:
        import torch

        pixels = self.bundle.preprocess_images([image_bytes(v) for v in values])
        with torch.no_grad():
            return self.bundle.embed_images(pixels).float().numpy()  # [B, D]

    def _embed_texts(self, values: list) -> np.ndarray:
        import torch

        tokens = self.bundle.tokenize([str(v) for v in values])
        with torch.no_grad():
            return self.bundle.embed_texts(**tokens).float().numpy()  # [B, D]


def _is_null(value) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def _as_lists(embeddings: list[np.ndarray | None]) -> list[list[float] | None]:
    return [e.astype(float).tolist() if e is not None else None for e in embeddings]
