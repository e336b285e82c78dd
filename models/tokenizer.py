"""Tokenizers: a small BPE trained offline on the captions (tiny recipe) or CLIPTokenizer for hub models."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

BOS, EOS, PAD, UNK = "<|startoftext|>", "<|endoftext|>", "<|pad|>", "<|unk|>"


def train_tokenizer(
    captions: Iterable[str],
    vocab_size: int = 512,
    max_length: int = 32,
    extra_special_tokens: Sequence[str] = (),
    append_eos: bool = True,
):
    """Train a lower-cased byte-level BPE on ``captions`` and wrap it as a transformers fast tokenizer.

    It adds ``<|startoftext|>`` / ``<|endoftext|>`` around every text like CLIP's, pads with ``<|pad|>``
    and saves/loads with ``save_pretrained`` / ``AutoTokenizer.from_pretrained`` fully offline. A causal
    language model's tokenizer (the VLM's) passes ``append_eos=False`` (a prompt must not end in EOS) and its
    own special tokens (``<image>``), which get the ids right after the four above and are never split.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        # EOS must not get id 2: transformers' CLIP then falls back to legacy argmax pooling.
        special_tokens=[PAD, UNK, BOS, EOS, *extra_special_tokens],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(captions), trainer=trainer)
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}" if append_eos else f"{BOS} $A",
        special_tokens=[(BOS, bos), (EOS, eos)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=max_length,
    )
