"""torch/transformers/peft code only: CLIP and VLM (LLaVA) recipes, tokenizers, LoRA. Imports only ``vlforge`` and ML libraries."""
