"""What the Caption, Visual QA and Audio search tabs and the page header say, checked without a browser.

Plain words (plurals, one-line explanations, no emoji that a machine without a colour-emoji font shows as
empty boxes), tables that show their column names while empty, score charts on a fixed -1..1 axis, and the
small print under each tab's results (device, model, adapter, time) with no server path in it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import make_image, make_lora, make_tone
from mmdemo.ui import app as ui_app
from mmdemo.ui import audio, caption, common, vqa
from mmdemo.ui.context import UIContext
from mmdemo.ui.status import ModelStatus

A = "aaaaaaaa-browser"
# Emoji blocks (pictographs, symbols, dingbats such as the check mark and cross, arrows-and-stars
# supplement, the emoji variation selector, regional indicators): shown as empty boxes without an emoji font.
EMOJI = re.compile("[\U0001F000-\U0001FAFF\u2600-\u27BF\u2B00-\u2BFF\u2300-\u23FF\uFE0F\U0001F1E6-\U0001F1FF]")
OWNED = ("caption.py", "vqa.py", "audio.py", "app.py", "status.py", "common.py", "gpu.py", "context.py")
INFO = re.compile(r"^Ran on CPU \(float32\) · model [^/\\]+ · (no adapter|adapter [\w.-]+) · took \d+(\.\d+)? m?s"
                  r"( for \d+ requests served together)?$")


def test_plural():
    assert common.plural(0, "clip") == "0 clips"
    assert common.plural(1, "clip") == "1 clip"
    assert common.plural(2, "file") == "2 files"
    assert common.plural(1234, "clip") == "1,234 clips"
    assert common.plural(2, "entry", "entries") == "2 entries" and common.plural(1, "entry", "entries") == "1 entry"


def test_model_names_carry_no_server_path(tmp_path):
    assert common.model_name("Salesforce/blip-image-captioning-base") == "Salesforce/blip-image-captioning-base"
    assert common.model_name(str(tmp_path / "models" / "tiny-blip")) == "tiny-blip"
    assert common.model_name("./checkpoints/tiny-models/blip-caption") == "blip-caption"
    assert common.device_label("cpu", "torch.float32") == "CPU (float32)"
    line = common.run_info("CPU (float32)", str(tmp_path / "tiny-blip"), "base", 0.4321, together=3)
    assert line == "Ran on CPU (float32) · model tiny-blip · no adapter · took 432 ms for 3 requests served together"
    assert common.seconds_text(0.0001) == "1 ms" and common.seconds_text(2.346) == "2.35 s"
    assert common.run_info("GPU (bfloat16)", "x/y", "shapes-v1", 75).endswith("adapter shapes-v1 · took 1 min 15 s")


# ------------------------------------------------------------------------------------------------ the built page
@pytest.fixture(scope="module")
def page_config(tiny_models, tmp_path_factory):
    import os

    old = os.environ.get("MMDEMO_HOME")
    os.environ["MMDEMO_HOME"] = str(tmp_path_factory.mktemp("text-home"))
    try:
        demo = ui_app.build_app(UIContext(checkpoints=tiny_models, tiny=True), warm_up=False)
        yield demo.get_config_file()
    finally:
        if old is None:
            os.environ.pop("MMDEMO_HOME", None)
        else:
            os.environ["MMDEMO_HOME"] = old


def _by_elem_id(config: dict, elem_id: str) -> dict:
    return next(c for c in config["components"] if c["props"].get("elem_id") == elem_id)


def _descendants(node: dict, root_id: int, inside: bool = False) -> set[int]:
    inside = inside or node["id"] == root_id
    found = {node["id"]} if inside else set()
    for child in node.get("children", []):
        found |= _descendants(child, root_id, inside)
    return found


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings(v)]
    return []


def test_no_emoji_in_what_the_page_says(page_config):
    """Every label, info line, placeholder, value, example and title of the header and the model tabs
    (the Fine-tune tab is checked by its own tests)."""
    finetune = _descendants(page_config["layout"], _by_elem_id(page_config, "tab-finetune")["id"])
    texts = [s for c in page_config["components"] if c["id"] not in finetune for s in _strings(c["props"])]
    assert len(texts) > 50
    found = [t for t in texts if EMOJI.search(t)]
    assert not found, found


def test_no_emoji_in_the_owned_source_files():
    """The same for every string these modules can produce (reports, refused rows, banners, small print)."""
    folder = Path(ui_app.__file__).parent
    for name in OWNED:
        hits = [(n, line.strip()) for n, line in enumerate((folder / name).read_text().splitlines(), 1)
                if EMOJI.search(line)]
        assert not hits, (name, hits)
    assert not EMOJI.search(ui_app.TINY_BANNER) and "Warning" in ui_app.TINY_BANNER


def test_empty_tables_show_their_column_names(page_config):
    expected = {"caption-output": caption.HEADERS, "vqa-output": vqa.HEADERS, "audio-library": audio.LIBRARY_HEADERS,
                "audio-results": audio.RESULT_HEADERS, "audio-labels-out": audio.LABEL_HEADERS,
                "audio-similar": audio.RESULT_HEADERS}
    for elem_id, headers in expected.items():
        props = _by_elem_id(page_config, elem_id)["props"]
        assert props["value"]["headers"] == headers and props["value"]["data"] == [], elem_id
        assert props["headers"] == headers, elem_id
    for elem_id in ("caption-output", "vqa-output"):  # long captions and answers wrap inside the table
        props = _by_elem_id(page_config, elem_id)["props"]
        assert props["wrap"] and len(props["column_widths"]) == 2


def test_score_charts_start_at_zero_on_a_fixed_range(page_config):
    charts = [c["props"] for c in page_config["components"] if c["props"].get("name") == "barplot"]
    assert len(charts) == 2
    for props in charts:
        assert props["y_lim"] == [-1.0, 1.0]  # 0 in the middle: negative scores point down, from zero
        assert props["title"] and props["x_title"] and "-1 to 1" in props["y_title"]
        assert props["x_label_angle"] != 0  # long clip names are not cut off side by side
        assert "cosine similarity" in props["caption"] and "Higher is a closer match" in props["caption"]
    frame = audio._plot([[1, "a_very_long_recording_name_from_the_field.wav", -0.25]])
    assert list(frame.columns) == ["item", "score"] and len(frame["item"][0]) <= audio.PLOT_LABEL_CHARS + 3
    assert frame["score"][0] == -0.25


def test_jargon_is_explained_and_examples_speak_plainly(page_config):
    sliders = [c["props"] for c in page_config["components"] if c["type"] == "slider"]
    for label in ("Beams", "Max new tokens", "Top-k"):
        infos = [p.get("info") for p in sliders if p["label"] == label]
        assert infos and all(infos), label
    labels = [c["props"].get("label") or "" for c in page_config["components"] if c["type"] == "dataset"]
    assert labels and not any("make_assets" in lab or ".py" in lab for lab in labels), labels
    gallery = next(c["props"] for c in page_config["components"] if c["type"] == "gallery")
    assert gallery["object_fit"] == "contain" and gallery["fit_columns"] is False  # one image is shown whole


def test_adding_clips_empties_the_upload_box(page_config):
    add, uploads = _by_elem_id(page_config, "audio-add")["id"], _by_elem_id(page_config, "audio-uploads")["id"]
    dep = next(d for d in page_config["dependencies"] if [add, "click"] in [list(t) for t in d["targets"]])
    assert uploads in dep["outputs"]


# ------------------------------------------------------------------------------------------- handlers' small print
def test_caption_small_print_says_device_model_and_time(tmp_path, tiny_models, home):
    ck = tiny_models["caption"]
    red = make_image(tmp_path / "red.png")
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    rows, infos = caption.caption_batch([[str(red)]], [""], [1], [5], ["base"], checkpoint=ck)
    assert rows[0][0][0] == "red.png" and INFO.match(infos[0]), infos
    assert f"model {Path(ck).name}" in infos[0] and "no adapter" in infos[0] and "/" not in infos[0]
    rows, infos = caption.caption_batch([[str(red)], [str(bad)], [str(red)]], [""] * 3, [1] * 3, [5] * 3,
                                        ["base"] * 3, checkpoint=ck)
    assert rows[1][0][1].startswith("Refused: ") and "text file" in rows[1][0][1]
    assert infos[1] == ""  # a refused request has no small print (its sentence is its row)
    assert infos[0] == infos[2] and infos[0].endswith("for 3 requests served together") and INFO.match(infos[0])

    name = make_lora(ck, "caption", home / "adapters" / "my-shapes", owner=f"anon:{A}").name
    _, infos = caption.caption_batch([[str(red)]], [""], [1], [5], [name], [A], checkpoint=ck)
    assert f"adapter {name}" in infos[0] and str(home) not in infos[0] and INFO.match(infos[0])


def test_vqa_small_print(tmp_path, tiny_models, home):
    img = make_image(tmp_path / "img.png")
    rows, infos = vqa.vqa_batch([str(img), str(img)], ["what color?", "what " * 80], [1, 1], [5, 5],
                                ["base", "base"], checkpoint=tiny_models["vqa"])
    assert rows[0][0][0] == "what color?" and INFO.match(infos[0]) and "2 requests served together" in infos[0]
    assert rows[1][0][1].startswith("Refused: ") and infos[1] == ""


def test_audio_small_print_and_upload_report(tmp_path, tiny_models, home):
    ck = tiny_models["retrieval"]
    *_, info = audio.search_audio("a high beep", 3, checkpoint=ck)
    assert INFO.match(info) and f"model {Path(ck).name}" in info, info
    tone = make_tone(tmp_path / "tone.wav", 660.0)
    *_, info = audio.classify_audio(str(tone), "beep, rain", 2, checkpoint=ck)
    assert INFO.match(info)
    *_, info = audio.similar_audio(str(tone), 2, checkpoint=ck)
    assert INFO.match(info)

    junk = tmp_path / "junk.wav"
    junk.write_text("this is not audio")
    n = len(audio.bundled_clips())
    report, _ = audio.add_clips([str(tone), str(junk)], checkpoint=ck)
    assert report.startswith(f"**Added 1 clip.** The library holds {n + 1} clips. 1 file could not be used:")
    assert "(s)" not in report and "junk.wav is a text file" in report
    report, _ = audio.add_clips([str(tone)], checkpoint=ck)
    assert report == f"**Added 0 clips.** 1 clip was already in the library. The library holds {n + 1} clips."


def test_model_status_reads_as_sentences_without_server_paths(tmp_path):
    status = ModelStatus()
    folder = str(tmp_path / "models" / "tiny-vqa")
    status.state = {"caption": "ready", "vqa": f"Checkpoint folder {folder!r} cannot be loaded; point it elsewhere.",
                    "retrieval": "loading"}
    status.devices = {"caption": "CPU (float32)"}
    text = status.markdown({"caption": "Salesforce/blip-image-captioning-base", "vqa": folder, "retrieval": "x/clap"})
    assert text.startswith("**Models.** Each tab works once its model is ready. They run on CPU (float32).")
    assert "- Caption (blip-image-captioning-base): ready" in text
    assert "- Visual QA (tiny-vqa): **could not load** — Checkpoint folder 'tiny-vqa' cannot be loaded" in text
    assert "- Audio search (clap): loading (the first start can take a few minutes)" in text
    assert str(tmp_path) not in text and not EMOJI.search(text)
    # the tabs' other base models load on first use; the box says so, each by its name
    status = ModelStatus()
    status.state = {"caption": "ready"}
    more = status.markdown({"caption": "x/blip"}, more={"caption": [str(tmp_path / "florence2")],
                                                        "vqa": ["HuggingFaceTB/SmolVLM-256M-Instruct"]})
    assert "- Caption (florence2): loads when first chosen in the Model list" in more
    assert "- Visual QA (SmolVLM-256M-Instruct): loads when first chosen in the Model list" in more
    assert str(tmp_path) not in more
