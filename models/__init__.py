"""torch/transformers/peft code only: CLIP recipes, tokenizers, LoRA. Imports only ``vlforge`` and ML libraries."""
