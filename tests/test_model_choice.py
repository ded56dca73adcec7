"""Several base models per tab, chosen per request from the Model list: BLIP (``base``), Florence-2 and SmolVLM for
captions (each also ``(detailed)``), SmolVLM for VQA. A batch may mix them; each request is served by the model it
chose, as the model layer serves it alone, and its small print names that model. An adapter runs on the base model
it was trained on, and the Fine-tune tab trains on the base model the visitor picks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import make_image, run_next_job
from mmdemo.errors import InputError
from mmdemo.models.caption import caption
from mmdemo.models.generation import GenerationOptions
from mmdemo.models.vqa import answer_pairs
from mmdemo.ui import caption as caption_tab
from mmdemo.ui import common
from mmdemo.ui import finetune as ft
from mmdemo.ui import vqa as vqa_tab
from mmdemo.ui.context import UIContext

pytestmark = pytest.mark.usefixtures("one_thread")
A = "choice-alice-0001"
BEAMS, MAX_NEW = 2, 8


@pytest.fixture
def ctx(tiny_models) -> UIContext:
    return UIContext(checkpoints=tiny_models)  # the other base models: MMDEMO_<TASK>_MORE_MODELS (conftest)


def test_the_model_lists_offer_the_other_base_models(ctx, tiny_dir, home):
    assert common.adapter_choices("caption", None, ctx.base_models("caption").names()) == [
        "base", "florence2", "florence2 (detailed)", "smolvlm", "smolvlm (detailed)"]
    assert common.adapter_choices("vqa", None, ctx.base_models("vqa").names()) == ["base", "smolvlm"]
    assert ctx.base_models("retrieval").names() == []
    chosen = common.resolve_model(ctx.base_models("caption"), "florence2 (detailed)", None)
    assert chosen == common.Chosen(str(tiny_dir / "florence2"), None, "detailed")
    # no server path in what the page shows: local folders by their own name
    assert all("/" not in name for name in ctx.base_models("caption").names())


def test_a_batch_mixing_base_models_serves_each_request_with_its_own(ctx, tiny_dir, tiny_models, tmp_path, home):
    img = str(make_image(tmp_path / "red.png"))
    choices = ["base", "florence2", "smolvlm (detailed)"]
    rows, infos = caption_tab.caption_batch([[img]] * 3, ["", "", ""], [BEAMS] * 3, [MAX_NEW] * 3, choices,
                                            [A] * 3, bases=ctx.base_models("caption"))
    options = GenerationOptions(num_beams=BEAMS, max_new_tokens=MAX_NEW)
    expected = [caption([img], None, options, model=tiny_models["caption"]),
                caption([img], None, options, model=str(tiny_dir / "florence2")),
                caption([img], None, options, model=str(tiny_dir / "smolvlm"), detail="detailed")]
    assert [[row[1] for row in r] for r in rows] == expected
    for info, name in zip(infos, ["blip-caption", "florence2", "smolvlm"]):
        assert f"· model {name} · no adapter ·" in info, info

    rows, infos = vqa_tab.vqa_batch([img], ["what color is it?"], [BEAMS], [MAX_NEW], ["smolvlm"], [A],
                                    bases=ctx.base_models("vqa"))
    assert rows[0] == [["what color is it?", answer_pairs([(img, "what color is it?")], options,
                                                          model=str(tiny_dir / "smolvlm"))[0]]]
    assert "· model smolvlm · no adapter ·" in infos[0]


def test_a_base_model_that_cannot_follow_the_request_refuses_it_alone(ctx, tmp_path, home):
    img = str(make_image(tmp_path / "red.png"))
    rows, infos = caption_tab.caption_batch([[img]] * 2, ["a picture of"] * 2, [1, 1], [5, 5], ["florence2", "base"],
                                            [A] * 2, bases=ctx.base_models("caption"))
    assert rows[0][0][1].startswith("Refused: Florence-2 does not continue a text prefix") and not infos[0]
    assert rows[1][0][1].startswith("a picture of") and infos[1]
    with pytest.raises(InputError, match="BLIP writes short captions only"):
        caption([img], None, model=ctx.checkpoint("caption"), detail="detailed")


def test_an_adapter_trained_on_florence2_in_the_fine_tune_tab_runs_on_florence2(ctx, tiny_dir, tmp_path, home,
                                                                                  archive):
    assert ft.base_model_names(ctx, "caption") == ["base", "florence2", "smolvlm"]
    assert ft.base_model_names(ctx, "vqa") == ["base", "smolvlm"]
    with pytest.raises(InputError, match="florence2 is not a base model of the Visual QA tab; choose one of base, "
                                         "smolvlm."):
        ft.base_checkpoint(ctx, "vqa", "florence2")
    florence = str(tiny_dir / "florence2")
    assert ft.base_checkpoint(ctx, "caption", "florence2") == florence
    assert ft.base_checkpoint(ctx, "caption", "base") == ctx.checkpoint("caption")

    job_id = ft.submit(archive, "caption", "quick", 1, None, None, None, None, A, name="flo-shapes",
                       checkpoint=ft.base_checkpoint(ctx, "caption", "florence2"), min_steps=2)
    assert ft.job_status(job_id, A)["model"] == "florence2"  # its name: no server path
    assert run_next_job() == "succeeded"
    names = common.adapter_choices("caption", f"anon:{A}", ctx.base_models("caption").names())
    assert names[-1] == "flo-shapes"
    chosen = common.resolve_model(ctx.base_models("caption"), "flo-shapes", f"anon:{A}")
    assert chosen.checkpoint == florence and Path(chosen.adapter).is_dir()
    assert json.loads((Path(chosen.adapter) / "mmdemo.json").read_text())["base_model"] == "florence2"

    img = str(make_image(tmp_path / "blue.png", "blue", "square"))
    rows, infos = caption_tab.caption_batch([[img]], [""], [BEAMS], [MAX_NEW], ["flo-shapes"], [A],
                                            bases=ctx.base_models("caption"))
    from mmdemo.models.generation import CAPTION_DEFAULTS, for_adapter

    options = common.generation_options(BEAMS, MAX_NEW, for_adapter(CAPTION_DEFAULTS, chosen.adapter))
    assert rows[0][0][1] == caption([img], None, options, adapter=chosen.adapter, model=florence)[0]
    assert "· model florence2 · adapter flo-shapes ·" in infos[0]
