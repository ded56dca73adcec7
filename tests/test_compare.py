"""The Compare tab: one image through the base model and every adapter the visitor may use, on the tiny models.

Each row must say exactly what the Caption (or Visual QA) tab answers for the same image, options and model;
another user's private adapter never appears; a bad request gets the other tabs' sentence; one adapter that
fails leaves the other rows.
"""

from __future__ import annotations

import shutil

import pytest

from conftest import make_image, make_lora, serve_app
from mmdemo.errors import InputError
from mmdemo.ui import caption, compare, vqa

A, B = "compare-alice-0001", "compare-bob-0002"
BEAMS, MAX_NEW = 1, 5


@pytest.fixture
def adapters(tiny_models, home):
    """Alice's private caption and VQA adapters, Bob's private and Bob's published caption adapter."""
    root = home / "adapters"
    return {
        "alice-cap": make_lora(tiny_models["caption"], "caption", root / "alice-cap", owner=f"anon:{A}", seed=1),
        "alice-vqa": make_lora(tiny_models["vqa"], "vqa", root / "alice-vqa", owner=f"anon:{A}", seed=2),
        "bob-secret": make_lora(tiny_models["caption"], "caption", root / "bob-secret", owner=f"anon:{B}", seed=3),
        "bob-shared": make_lora(tiny_models["caption"], "caption", root / "bob-shared", owner=f"anon:{B}", seed=4,
                                published=True),
    }


def _rows(table) -> dict[str, list[str]]:
    return {row[0]: [row[1], row[2]] for row in table.values.tolist()}


def test_caption_rows_are_what_the_caption_tab_says(tmp_path, tiny_models, adapters, one_thread):
    img = make_image(tmp_path / "red.png")
    table, note = compare.compare(str(img), "caption", "", "", BEAMS, MAX_NEW, A, checkpoints=tiny_models)
    rows = _rows(table)
    assert list(table.columns) == ["model", "output", "time"]
    assert set(rows) == {"base", "alice-cap", "bob-shared"}, rows  # theirs and published; never Bob's private one
    assert table.values.tolist()[0][0] == "base"
    for name, (output, seconds) in rows.items():
        tab_rows, _ = caption.caption_batch([[str(img)]], [""], [BEAMS], [MAX_NEW], [name], [A],
                                            checkpoint=tiny_models["caption"])
        assert output == tab_rows[0][0][1], name  # the Caption tab's own caption for this model
        assert output and seconds.endswith("s"), (name, seconds)
    assert rows["alice-cap"][0] != rows["base"][0]  # the adapter really was used
    assert "3 models compared" in note and "left out" not in note and "/" not in note, note

    # the prefix reaches every model as the Caption tab passes it
    table, _ = compare.compare(str(img), "Caption", "", "a picture of", BEAMS, MAX_NEW, A, checkpoints=tiny_models)
    tab_rows, _ = caption.caption_batch([[str(img)]], ["a picture of"], [BEAMS], [MAX_NEW], ["alice-cap"], [A],
                                        checkpoint=tiny_models["caption"])
    assert _rows(table)["alice-cap"][0] == tab_rows[0][0][1]

    # Bob sees his own private adapter, not Alice's; an anonymous caller sees the published one only
    assert set(_rows(compare.compare(str(img), "caption", "", "", BEAMS, MAX_NEW, B, checkpoints=tiny_models)[0])) \
        == {"base", "bob-secret", "bob-shared"}
    assert set(_rows(compare.compare(str(img), "caption", "", "", BEAMS, MAX_NEW, None,
                                     checkpoints=tiny_models)[0])) == {"base", "bob-shared"}


def test_vqa_rows_are_what_the_vqa_tab_says(tmp_path, tiny_models, adapters, one_thread):
    img = make_image(tmp_path / "shape.png", "blue", "square")
    q = "what color is the square?"
    table, _ = compare.compare(str(img), "vqa", q, "ignored prefix", BEAMS, MAX_NEW, A, checkpoints=tiny_models)
    rows = _rows(table)
    assert set(rows) == {"base", "alice-vqa"}, rows  # caption adapters are not offered for VQA
    for name, (output, _seconds) in rows.items():
        tab_rows, _ = vqa.vqa_batch([str(img)], [q], [BEAMS], [MAX_NEW], [name], [A], checkpoint=tiny_models["vqa"])
        assert tab_rows[0][0] == [q, output], name


def test_bad_input_gets_the_tabs_sentences(tmp_path, tiny_models, home):
    img = make_image(tmp_path / "red.png")
    notes = tmp_path / "notes.png"
    notes.write_text("this is a text file, not an image")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    cases = [
        ((None, "caption", "", ""), "Upload an image to caption."),
        ((None, "vqa", "what?", ""), "Upload an image to ask about."),
        ((str(notes), "caption", "", ""), "notes.png is a text file, not an image"),
        ((str(empty), "caption", "", ""), "empty.png is empty"),
        ((str(img), "vqa", "   ", ""), "Ask at least one question about the image."),
        ((str(img), "vqa", "what " * 80, ""), "A question is 82 tokens long"),
        ((str(img), "caption", "", "red " * 3000), "The prefix is 11,999 characters long"),
    ]
    for (image, task, question, prompt), sentence in cases:
        for step in (compare.check_request, compare.compare):
            with pytest.raises(InputError) as err:
                step(image, task, question, prompt, BEAMS, MAX_NEW, A, checkpoints=tiny_models)
            assert sentence in str(err.value), (step.__name__, str(err.value))
    # the same sentences in the page's wrapper (gr.Error, no traceback)
    import gradio as gr

    from mmdemo.ui.common import user_errors

    with pytest.raises(gr.Error, match="Upload an image to caption."):
        user_errors(compare.check_request)(None, "caption", "", "", BEAMS, MAX_NEW, A, checkpoints=tiny_models)
    # the VQA tab's own check says the same
    with pytest.raises(InputError, match="Ask at least one question about the image."):
        vqa.check_request(str(img), "   ", BEAMS, MAX_NEW, "base", A, checkpoint=tiny_models["vqa"])


def test_one_failing_adapter_leaves_the_other_rows(tmp_path, tiny_models, adapters, monkeypatch, one_thread):
    img = make_image(tmp_path / "red.png")
    # deleted between the checks and the run: its row says so, the others still come
    plan = compare._prepare(str(img), "caption", "", "", BEAMS, MAX_NEW, f"anon:{A}", tiny_models)
    runnable = [r for r in plan.rows if not isinstance(r[2], str)]
    shutil.rmtree(adapters["alice-cap"])
    results, device = compare._run("caption", plan.image, plan.text, runnable)
    by_name = dict(zip((r[0] for r in runnable), results))
    assert by_name["alice-cap"] == ("Adapter alice-cap was deleted meanwhile; compare again to leave it out.", None)
    assert by_name["base"][0] and by_name["base"][1] is not None and by_name["bob-shared"][0]

    # listed but gone by the time it is resolved (or never there): a sentence in its row, and no server path
    monkeypatch.setattr(compare, "adapter_choices", lambda task, owner, bases=(): ["base", "gone-adapter",
                                                                                  "bob-shared"])
    table, _ = compare.compare(str(img), "caption", "", "", BEAMS, MAX_NEW, A, checkpoints=tiny_models)
    rows = _rows(table)
    assert rows["gone-adapter"] == ["There is no adapter called 'gone-adapter' of yours; refresh the Model list "
                                    "and pick another.", "—"]
    assert rows["base"][0] and rows["bob-shared"][0] and rows["base"][1] != "—"

    # an error naming a server folder is shown with the folder's name only
    folder = adapters["bob-shared"].parent
    err = InputError(f"{folder / 'x'} is not a LoRA adapter folder (no adapter_config.json); pick another folder.")
    assert compare._plain(err) == "x is not a LoRA adapter folder (no adapter_config.json); pick another folder."
    err = InputError(f"Adapter x does not fit the {tiny_models['caption']} model (boom); use another.")
    assert compare._plain(err, None, tiny_models["caption"]) == "Adapter x does not fit the blip-caption model " \
        "(boom); use another."

    # a model call that fails on one adapter only
    real = compare.caption_model.caption

    def fragile(images, prompt, options, adapter=None, model=None, detail="short"):
        if adapter and "bob-shared" in str(adapter):
            raise RuntimeError("out of memory")
        return real(images, prompt, options, adapter=adapter, model=model, detail=detail)

    monkeypatch.setattr(compare.caption_model, "caption", fragile)
    rows = _rows(compare.compare(str(img), "caption", "", "", BEAMS, MAX_NEW, A, checkpoints=tiny_models)[0])
    assert rows["bob-shared"][0].startswith("This model could not caption the image (RuntimeError)")
    assert rows["base"][0] and rows["base"][1] != "—"


def test_at_most_max_models_and_the_page_says_which_were_left_out(tmp_path, tiny_models, adapters, monkeypatch,
                                                                  one_thread):
    img = make_image(tmp_path / "red.png")
    monkeypatch.setattr(compare, "MAX_MODELS", 2)
    table, note = compare.compare(str(img), "caption", "", "", BEAMS, MAX_NEW, A, checkpoints=tiny_models)
    from mmdemo.ui.common import adapter_choices

    listed = adapter_choices("caption", f"anon:{A}")  # the Model list's order: base, then the newest adapters
    assert [r[0] for r in table.values.tolist()] == listed[:2]
    assert "1 older adapter left out" in note and f"Left out: {listed[2]}." in note, note


def test_api(tmp_path, tiny_models, home, adapters):
    """``compare`` is a public endpoint with the browser id last; a refusal raises its sentence."""
    from gradio_client import Client, handle_file

    img = make_image(tmp_path / "red.png")
    with serve_app(tiny_models, home) as url:
        client = Client(url, verbose=False)
        table, note = client.predict(handle_file(str(img)), "caption", "", "", BEAMS, MAX_NEW, A,
                                     api_name="/compare")
        rows = {row[0]: row[1] for row in table["data"]}
        bases = {"florence2", "florence2 (detailed)", "smolvlm", "smolvlm (detailed)"}  # the tab's other models
        assert set(rows) == {"base", *bases, "alice-cap", "bob-shared"} and all(rows.values()), table
        assert "7 models compared" in note
        with pytest.raises(Exception, match="Upload an image to caption."):
            client.predict(None, "caption", "", "", BEAMS, MAX_NEW, A, api_name="/compare")

