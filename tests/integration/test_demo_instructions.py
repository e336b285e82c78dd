"""The demo's VLM leg up to training: its instruction URL list ingests and curates (no scorer) into a dataset whose
rows carry the prompt and the answer, which stage 2 reads; the leg's typed form selects both VLM steps. The two
stages themselves are covered by tests/integration/test_vlm_train.py."""

from __future__ import annotations

import pytest

from flows.demo import vlm_train_params
from models.vlm import load_vlm_recipe
from tasks.curate import curate
from tasks.ingest import ingest
from tasks.train.vlm_data import check_text_columns
from vlforge.datasets import resolve_dataset
from vlforge.demo.server import write_url_list
from vlforge.demo.synth import DESCRIBE, INSTRUCTIONS, make_pairs

pytestmark = pytest.mark.integration


def test_instruction_list_ingests_into_rows_with_prompt_and_response(
    settings, image_server, tmp_path, ray_local
):
    pairs = make_pairs(24, seed=5, prefix="instruct")
    path = write_url_list(
        str(tmp_path / "instruct.csv"), pairs, image_server.add_pairs(pairs), (INSTRUCTIONS[0], DESCRIBE)
    )
    ingest(
        path, "demo-instruct", settings, shard_size=24, processes=1, threads=4, allow_private_networks=True
    )
    curate("demo-instruct", "demo-instruct", settings)
    dv = resolve_dataset(settings, "demo-instruct")
    table = dv.read_table("data", columns=["caption", "prompt", "response", "label"])
    assert table.num_rows == len(pairs)
    # The two questions take turns: the colour question, and the VLM recipe's caption prompt answered with what the
    # image shows (caption conversations keep an instruction-tuned VLM describing images).
    truth = {p.caption: p for p in pairs}
    prompts = table.column("prompt").to_pylist()
    assert sorted(set(prompts)) == ["Describe the image.", "What colour is the shape?"]
    assert prompts.count("Describe the image.") == len(pairs) // 2
    columns = (table.column(c).to_pylist() for c in ("caption", "prompt", "response"))
    for caption, prompt, response in zip(*columns, strict=True):
        pair = truth[caption]
        assert response == (
            pair.colour if prompt.startswith("What colour") else f"a {pair.colour} {pair.shape}"
        )
    assert DESCRIBE[0] == load_vlm_recipe("vlm-tiny").caption_prompt  # what stage 2's general gate asks
    check_text_columns(dv, {"prompt": "--prompt-col", "response": "--response-col"})  # stage 2's own check

    params = vlm_train_params(epochs=2, finetune_epochs=1)
    assert (params.pretrain, params.finetune, params.vlm_pretrain, params.vlm_finetune) == (
        False,
        False,
        True,
        True,
    )
    assert params.vlm_pretraining.recipe == "vlm-tiny" and params.vlm_finetuning.recipe == "vlm"
    assert params.vlm_finetune_dataset == "demo-instruct"
    assert (params.vlm_finetuning.prompt_col, params.vlm_finetuning.response_col) == ("prompt", "response")
