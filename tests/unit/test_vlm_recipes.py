"""The VLM recipes' wiring: the CLI and the Python API pick them by recipe name, wrong inputs fail before Ray
with one clear error, the Prefect form offers them (off by default), and the Ray Data rows become the fixed-length
tensors the worker's loss reads (also with gradient checkpointing)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from flows.cli import app
from flows.params import TrainParams
from tasks.train.args import FinetuneArgs, PretrainArgs, VlmFinetuneArgs, VlmPretrainArgs
from tasks.train.recipes import recipe_for
from tasks.train.recipes.vlm_stage1 import VlmPretrainRecipe
from tasks.train.recipes.vlm_stage2 import VlmFinetuneRecipe
from tasks.train.vlm_data import VlmModelHooks, preprocess_vlm_batch
from tasks.train.vlm_eval import caption_truths
from tests.helpers import publish_instructions, publish_synthetic_dataset
from vlforge.demo.synth import INSTRUCTIONS, make_pairs
from vlforge.errors import ModelNotFoundError, VlforgeError

runner = CliRunner()
PAIRS = make_pairs(8, seed=3, size=32)


def test_recipe_names_pick_the_vlm_recipes_and_their_stage_settings():
    stage1 = recipe_for("pretrain", recipe="vlm-tiny", adapter="resampler")
    assert isinstance(stage1, VlmPretrainRecipe) and stage1.model_name == "vlforge-vlm"
    assert stage1.vlm.adapter == "resampler"
    assert stage1.args.lr == 3e-3  # lr left empty: the recipe's stage-1 learning rate
    assert stage1.args.epochs == 30  # and its stage-1 epochs
    assert recipe_for("pretrain", recipe="vlm-tiny", lr=2e-4).args.lr == 2e-4
    stage2 = recipe_for("finetune", recipe="vlm")
    assert isinstance(stage2, VlmFinetuneRecipe) and stage2.model_name == "vlforge-vlm-lora"
    assert stage2.base_model == "models:/vlforge-vlm@champion"  # not the CLIP default
    assert type(recipe_for("finetune")).__name__ == "FinetuneRecipe"
    # A CLIP family's settings naming a VLM recipe carry over what was given, and the VLM's defaults apply.
    moved = recipe_for("pretrain", PretrainArgs(recipe="vlm-tiny", epochs=3))
    assert isinstance(moved.args, VlmPretrainArgs) and (moved.args.epochs, moved.args.batch_size) == (3, 32)


def test_an_explicit_vlm_setting_equal_to_the_clip_default_is_kept():
    clip = PretrainArgs()
    stage1 = recipe_for("pretrain", recipe="vlm-tiny", lr=clip.lr, batch_size=clip.batch_size)
    assert (stage1.args.lr, stage1.args.batch_size, stage1.args.warmup_steps) == (
        clip.lr,
        clip.batch_size,
        10,
    )
    lora = FinetuneArgs()
    stage2 = recipe_for("finetune", VlmFinetuneArgs(lr=lora.lr, lora={"r": 8}))
    resolved = stage2.args.resolved({"learning_rate": 3e-3, "lora": {"r": 16, "alpha": 32}})
    assert (resolved.lr, resolved.lora.r, resolved.lora.alpha) == (lora.lr, 8, 32)


def test_unknown_recipes_and_misplaced_vlm_settings_are_clear_errors():
    with pytest.raises(ModelNotFoundError, match="VLM recipes: .*vlm-tiny"):
        recipe_for("pretrain", recipe="nope")
    with pytest.raises(VlforgeError, match="--vision-model is a VLM setting; the default recipe is a CLIP"):
        recipe_for("pretrain", vision_model="openai/clip-vit-base-patch32")
    with pytest.raises(
        VlforgeError, match="--vision-model and --adapter are VLM settings; recipe 'clip-tiny'"
    ):
        recipe_for("pretrain", recipe="clip-tiny", vision_model="x", adapter="mlp")
    with pytest.raises(VlforgeError, match="--init is a CLIP setting; recipe 'vlm-tiny' is a VLM recipe"):
        recipe_for("pretrain", recipe="vlm-tiny", init="x")
    with pytest.raises(VlforgeError, match="unknown adapter 'qformer'"):
        recipe_for("pretrain", recipe="vlm-tiny", adapter="qformer")
    with pytest.raises(VlforgeError, match="unknown finetune recipe 'nope'"):
        recipe_for("finetune", recipe="nope")
    with pytest.raises(VlforgeError, match="--lora-targets is a CLIP setting; recipe 'vlm' is a VLM recipe"):
        recipe_for("finetune", FinetuneArgs(recipe="vlm", lora={"targets": ("q_proj",)}))


def test_cli_unknown_recipe_is_one_line_before_anything_starts(settings):
    publish_synthetic_dataset(settings, "d", n=4)
    result = runner.invoke(app, ["pretrain", "--dataset", "d", "--recipe", "nope"])
    assert result.exit_code == 2, result.output
    assert "unknown recipe 'nope'" in result.output and "Traceback" not in result.output


def test_cli_wrong_vision_model_fails_before_ray(settings):
    publish_synthetic_dataset(settings, "d", n=4)
    result = runner.invoke(
        app, ["pretrain", "--dataset", "d", "--recipe", "vlm-tiny", "--vision-model", "./no/such/clip"]
    )
    assert result.exit_code == 2, result.output
    assert "'./no/such/clip' not found" in result.output


def test_a_missing_prompt_column_is_one_clear_error_naming_it(settings):
    from tasks.train.finetune import finetune

    publish_synthetic_dataset(settings, "captions", n=4)  # key, image, caption: no instructions
    with pytest.raises(VlforgeError, match="no column 'question' \\(--prompt-col\\)"):
        finetune("captions", settings, recipe="vlm", prompt_col="question")
    result = runner.invoke(
        app, ["finetune", "--dataset", "captions", "--recipe", "vlm-tiny", "--base", "x/y"]
    )
    assert result.exit_code == 2 and "no column 'prompt' (--prompt-col)" in result.output, result.output


def test_a_clip_as_the_vlm_base_is_refused(settings, tmp_path):
    from models.clip import build_clip
    from tasks.train.finetune import finetune

    publish_instructions(settings, "ask", PAIRS[:4], INSTRUCTIONS[:1])
    clip_dir = build_clip("clip-tiny", [p.caption for p in PAIRS], seed=1).save(str(tmp_path / "clip"))
    with pytest.raises(VlforgeError, match="holds a 'clip' model, not a VLM"):
        finetune("ask", settings, recipe="vlm-tiny", base=clip_dir)
    with pytest.raises(VlforgeError, match="records no VLM recipe"):
        finetune("ask", settings, recipe="vlm", base="some-org/some-vlm")  # a hub id: name the recipe


def test_prefect_train_form_offers_the_vlm_stages_off_by_default():
    params = TrainParams(dataset="d")
    assert (params.vlm_pretrain, params.vlm_finetune) == (False, False)
    assert (params.vlm_pretraining.recipe, params.vlm_finetuning.recipe) == ("vlm-tiny", "vlm")
    form = TrainParams(
        dataset="d", vlm_pretrain=True, vlm_pretraining={"recipe": "vlm-tiny", "adapter": "mlp"}
    )
    assert form.vlm_pretraining.adapter == "mlp"


def test_the_form_keeps_an_explicit_vlm_setting_equal_to_the_clip_default():
    clip, lora = PretrainArgs(), FinetuneArgs()
    form = TrainParams.model_validate(
        {
            "dataset": "d",
            "vlm_pretraining": {"lr": clip.lr, "batch_size": clip.batch_size},
            "vlm_finetuning": {"lr": lora.lr},
        }
    )
    stage1 = recipe_for("pretrain", form.vlm_pretraining)
    assert (stage1.args.lr, stage1.args.batch_size) == (clip.lr, clip.batch_size)
    assert stage1.args.warmup_steps == 10  # left empty: vlm-tiny's stage-1 value
    assert recipe_for("finetune", form.vlm_finetuning).args.resolved({"learning_rate": 3e-3}).lr == lora.lr
    assert TrainParams(dataset="d").vlm_pretraining.lr is None  # the form's empty field: the recipe's value


def test_caption_truth_is_the_label_or_the_captions_content_words():
    assert caption_truths(["a photo of a red circle"], ["red circle"]) == [["red", "circle"]]
    assert caption_truths(["a red circle on a white background", "picture of a blue cross"]) == [
        ["red", "circle", "white"],
        ["blue", "cross"],
    ]


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory):
    from models.clip import build_clip
    from models.vlm import build_vlm

    clip = build_clip("clip-tiny", [p.caption for p in PAIRS], seed=1)
    corpus = [p.caption for p in PAIRS] + [q for q, _ in INSTRUCTIONS] + ["Describe the image."]
    return build_vlm("vlm-tiny", clip, corpus).save(str(tmp_path_factory.mktemp("vlm") / "init"))


def _batch(prompt: bool) -> dict:
    batch = {
        "key": np.array([p.key for p in PAIRS], dtype=object),
        "image": np.array([{"bytes": p.image, "path": None} for p in PAIRS], dtype=object),
        "caption": np.array([p.caption for p in PAIRS], dtype=object),
    }
    if prompt:
        batch["q"] = np.array(["What colour is the shape?"] * len(PAIRS), dtype=object)
        batch["a"] = np.array([p.colour for p in PAIRS], dtype=object)
    return batch


def test_rows_become_fixed_length_tensors_without_held_out_rows(init_dir):
    from tasks.train.data import content_eval_mask

    out = preprocess_vlm_batch(
        _batch(prompt=True), model_uri=init_dir, eval_fraction=0.3, caption_prompt="Describe the image.",
        max_length=64, prompt_col="q", response_col="a",
    )  # fmt: skip
    kept = int((~content_eval_mask(_batch(prompt=True), 0.3)).sum())  # the split is by image content
    assert 0 < kept < len(PAIRS)
    assert out["input_ids"].shape == out["labels"].shape == out["attention_mask"].shape == (kept, 64)
    assert out["pixel_values"].shape[0] == kept and out["pixel_values"].dtype == np.float32
    # The loss sees the response (one colour word or a few pieces of it) and its EOS; padding is masked.
    answered = (out["labels"] != -100).sum(axis=1)
    assert (answered >= 2).all() and (answered < 8).all()
    assert ((out["attention_mask"] == 0) <= (out["labels"] == -100)).all()


@pytest.mark.parametrize("stage", [1, 2])
def test_worker_hooks_train_the_stage_with_gradient_checkpointing(init_dir, tmp_path, stage):
    from tasks.train.loop import _clip_model

    hooks = VlmModelHooks(train_language_model=True) if stage == 1 else VlmModelHooks(lora={"r": 4})
    out = preprocess_vlm_batch(
        _batch(prompt=stage == 2), model_uri=init_dir, eval_fraction=0.0, caption_prompt="Describe the image.",
        max_length=64, **({"prompt_col": "q", "response_col": "a"} if stage == 2 else {}),
    )  # fmt: skip
    bundle, module = hooks.build(init_dir, None)
    _clip_model(module).gradient_checkpointing_enable()  # what the loop does for --grad-checkpointing
    module.train()
    trainable = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    assert not any("vision_tower" in n for n in trainable)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    loss = hooks.loss(module, {k: torch.from_numpy(v) for k, v in out.items()})
    loss.backward()
    optimizer.step()
    changed = [n for n, p in module.named_parameters() if n in trainable and not torch.equal(p, trainable[n])]
    assert any("multi_modal_projector" in n for n in changed)
    assert any(("lora_A" in n if stage == 2 else "language_model" in n) for n in changed)
    hooks.save(bundle, module, str(tmp_path))
    assert (tmp_path / ("model" if stage == 1 else "adapter")).is_dir()


def test_an_eval_sets_name_says_whether_its_rows_are_read_as_instructions_or_captions(settings):
    from tasks.train.data import dataset_heldout_fraction, heldout_ref
    from tasks.train.vlm_eval import INSTRUCTIONS as MARK
    from tasks.train.vlm_eval import VlmEvaluator

    dv = publish_instructions(settings, "ask", PAIRS, INSTRUCTIONS[:1])
    captions_only, _ = publish_synthetic_dataset(settings, "plain", n=4)
    evaluator = VlmEvaluator(settings, "Describe the image.")
    held = heldout_ref(dv, dataset_heldout_fraction(dv, 0.1, 4))
    assert evaluator.instruction_set(held) == held + MARK
    assert evaluator.instruction_set(captions_only.ref) == captions_only.ref  # no prompt column: captions
    as_instructions, as_captions = evaluator.table(held + MARK), evaluator.table(held)
    assert as_instructions.num_rows == as_captions.num_rows == 4  # the same held-out rows
    assert {"prompt", "response", "label"} <= set(as_instructions.column_names)
    assert "prompt" not in as_captions.column_names
    other = VlmEvaluator(settings, "Describe the image.", prompt_col="question")
    with pytest.raises(VlforgeError, match="no column 'question'"):
        other.table(held + MARK)


def test_stage2_mixes_caption_conversations_into_a_share_of_the_rows(init_dir):
    """LLaVA's stage-2 data mixes conversation kinds: a share of the instruction rows (chosen by key, the same in
    every epoch and batching) also gives the image with the caption prompt answered by its caption."""
    from models.vlm import load_vlm_recipe
    from models.vlm_train import Example, with_caption_conversations

    keys = [f"k{i}" for i in range(2000)]
    rows = [Example(b"img", "What colour is the shape?", "red") for _ in keys]
    mixed, mixed_keys = with_caption_conversations(rows, keys, ["a red circle"] * 2000, "Describe it.", 0.25)
    extra = mixed[2000:]
    assert mixed[:2000] == rows  # every instruction kept
    assert 0.22 < len(extra) / 2000 < 0.28
    assert {(e.prompt, e.response) for e in extra} == {("Describe it.", "a red circle")}
    again, again_keys = with_caption_conversations(rows[::-1], keys[::-1], ["a red circle"] * 2000, "D", 0.25)
    assert sorted(again_keys) == sorted(mixed_keys)  # the draw follows the key, not the order or the batch
    assert with_caption_conversations(rows, keys, ["a red circle"] * 2000, "D", 0.0)[0] == rows

    # Through the Ray Data preprocessing: every row answered twice at share 1, the caption on the second.
    out = preprocess_vlm_batch(
        _batch(prompt=True), model_uri=init_dir, eval_fraction=0.0, caption_prompt="Describe the image.",
        max_length=64, prompt_col="q", response_col="a", caption_share=1.0,
    )  # fmt: skip
    assert out["input_ids"].shape[0] == 2 * len(PAIRS)
    from tasks.train.vlm_data import load_vlm_processor

    tok = load_vlm_processor(init_dir).tokenizer
    second = out["labels"][len(PAIRS)]
    assert tok.decode(second[second != -100], skip_special_tokens=True).strip() == PAIRS[0].caption
    # The shipped tiny recipe mixes them in by default.
    assert load_vlm_recipe("vlm-tiny").stage2.get("caption_share", 0) > 0
