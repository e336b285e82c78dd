"""The demo's VLM leg up to training: its instruction URL list ingests and curates (no scorer) into a dataset whose
rows carry the prompt and the answer, which stage 2 reads; the leg's typed form selects both VLM steps. The two
stages themselves are covered by tests/integration/test_vlm_train.py."""

from __future__ import annotations

import pytest

from flows.demo import vlm_train_params
from tasks.curate import curate
from tasks.ingest import ingest
from tasks.train.vlm import check_text_columns
from vlforge.datasets import resolve_dataset
from vlforge.demo.server import write_url_list
from vlforge.demo.synth import INSTRUCTIONS, make_pairs

pytestmark = pytest.mark.integration


def test_instruction_list_ingests_into_rows_with_prompt_and_response(
    settings, image_server, tmp_path, ray_local
):
    pairs = make_pairs(24, seed=5, prefix="instruct")
    path = write_url_list(
        str(tmp_path / "instruct.csv"), pairs, image_server.add_pairs(pairs), INSTRUCTIONS[0]
    )
    ingest(
        path, "demo-instruct", settings, shard_size=24, processes=1, threads=4, allow_private_networks=True
    )
    curate("demo-instruct", "demo-instruct", settings)
    dv = resolve_dataset(settings, "demo-instruct")
    table = dv.read_table("data", columns=["caption", "prompt", "response", "label"])
    assert table.num_rows == len(pairs)
    truth = {p.caption: p.colour for p in pairs}
    assert set(table.column("prompt").to_pylist()) == {"What colour is the shape?"}
    assert [truth[c] for c in table.column("caption").to_pylist()] == table.column("response").to_pylist()
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
