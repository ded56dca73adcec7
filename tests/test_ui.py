"""Tab handlers called as plain functions (no server, no browser), on the tiny checkpoints."""

from __future__ import annotations

import json
import zipfile

import gradio as gr
import pytest

from conftest import make_image, make_tone
from mmdemo.errors import InputError, MMDemoError
from mmdemo.ui import app as ui_app
from mmdemo.ui import audio, caption, common, vqa
from mmdemo.ui.context import UIContext


def test_tabs_follow_the_convention():
    for module in ui_app.tab_modules():
        assert isinstance(module.TITLE, str) and callable(module.build)


def test_user_errors_turns_project_errors_into_gr_error():
    @common.user_errors
    def bad():
        raise InputError("Upload at least one image to caption.")

    with pytest.raises(gr.Error, match="Upload at least one image"):
        bad()


A, B = "aaaaaaaa-browser", "bbbbbbbb-browser"  # two visitors' browser ids


def test_adapter_choices_lists_the_visitors_adapters_of_the_task(home):
    adapters = (("shapes-v1", "caption", f"anon:{A}", False), ("vqa-v1", "vqa", f"anon:{A}", False),
                ("theirs", "caption", f"anon:{B}", False), ("shared", "caption", f"anon:{B}", True),
                ("operators", "caption", None, False), ("broken", None, "", False))
    for i, (name, task, owner, published) in enumerate(adapters):
        folder = home / "adapters" / name
        folder.mkdir(parents=True)
        if task:
            (folder / "adapter_config.json").write_text("{}")
            (folder / "mmdemo.json").write_text(json.dumps({"task": task, "owner": owner, "published": published,
                                                            "created": i}))
    assert common.adapter_choices("caption", f"anon:{A}") == ["base", "operators", "shared", "shapes-v1"]
    assert common.adapter_choices("vqa", f"anon:{A}") == ["base", "vqa-v1"]
    assert common.adapter_choices("caption", f"anon:{B}") == ["base", "operators", "shared", "theirs"]
    assert common.adapter_choices("caption", None) == ["base", "operators", "shared"]  # no id: public ones only
    update = common.refresh_adapters("caption", "theirs", A)  # another user's adapter is not offered
    assert update["choices"] == ["base", "operators", "shared", "shapes-v1"] and update["value"] == "base"
    assert common.adapter_path("caption", "base", f"anon:{A}") is None
    assert common.adapter_path("caption", "shapes-v1", f"anon:{A}").endswith("shapes-v1")
    assert common.adapter_path("caption", "shared", None).endswith("shared")  # published: anyone may use it
    # the one resolver refuses another user's private adapter exactly like a missing one
    for owner in (f"anon:{B}", None):
        with pytest.raises(MMDemoError, match="There is no adapter called 'shapes-v1' of yours"):
            common.adapter_path("caption", "shapes-v1", owner)
    with pytest.raises(MMDemoError, match="There is no adapter called 'missing' of yours"):
        common.adapter_path("caption", "missing", f"anon:{A}")
    with pytest.raises(InputError, match="trained for vqa"):
        common.adapter_path("caption", "vqa-v1", f"anon:{A}")
    for bad in ("../etc", "/etc/passwd", ".hidden", "x" * 500):
        with pytest.raises(InputError, match="not an adapter name"):
            common.adapter_path("caption", bad, f"anon:{A}")


def test_browser_ids_are_checked_the_same_way_everywhere():
    assert common.owner_of(A) == f"anon:{A}" and common.owner_of(f"  {A} ") == f"anon:{A}"
    for blank in (None, "", " ", "\t\n"):
        with pytest.raises(InputError, match="no session id yet"):
            common.owner_of(blank)
        assert common.optional_owner(blank) is None  # the model tabs work without one (base, published)
    for bad in ("short", "has space inside it", "x" * 129, "semi;colon-1234", {"id": A}):
        with pytest.raises(InputError, match="not valid"):
            common.owner_of(bad)

    class Profile:
        username = "alice"

    assert common.owner_of(None, Profile()) == "hf:alice" and common.optional_owner(" ", Profile()) == "hf:alice"
    assert common.new_browser_id(A) == A and common.new_browser_id(" ") != " "
    assert common.BROWSER_ID.fullmatch(common.new_browser_id(None))


def test_browser_secret_is_made_once_and_kept_private(tmp_path):
    import stat

    first = common.browser_secret(tmp_path / "home")
    assert first and common.browser_secret(tmp_path / "home") == first  # the same after a restart
    mode = (tmp_path / "home" / common.SECRET_FILE).stat().st_mode
    assert stat.S_IMODE(mode) == 0o600


def test_generation_options_are_checked():
    opts = common.generation_options(2, 3, caption.CAPTION_DEFAULTS)
    assert (opts.num_beams, opts.max_new_tokens, opts.min_new_tokens) == (2, 3, 3)
    with pytest.raises(InputError, match="Beams must be between"):
        common.generation_options(11, 10, caption.CAPTION_DEFAULTS)


def test_caption_batch_groups_requests_and_isolates_bad_ones(tmp_path, tiny_models, home):
    red, blue = make_image(tmp_path / "red.png"), make_image(tmp_path / "blue.png", "blue", "square")
    bad = tmp_path / "notes.png"
    bad.write_text("not an image at all")
    rows, _ = caption.caption_batch([[str(red), str(blue)], [str(bad)], [str(red)]], ["", "", "a picture of"],
                                    [3, 3, 3], [8, 8, 8], ["base"] * 3, checkpoint=tiny_models["caption"])
    assert [r[0] for r in rows[0]] == ["red.png", "blue.png"] and all(r[1] for r in rows[0])
    assert "text file" in rows[1][0][1]
    assert len(rows[2]) == 1 and rows[2][0][1]
    with pytest.raises(InputError, match="text file"):  # alone, a bad request raises (shown as gr.Error)
        caption.caption_batch([[str(bad)]], [""], [3], [8], ["base"], checkpoint=tiny_models["caption"])


def test_one_users_oversized_request_fails_only_itself(tmp_path, tiny_models, home):
    """A 20,000-character prefix (or a 100-token answer on a 64-position model) batched with five normal
    requests: the five get captions, the bad one its sentence."""
    images = [make_image(tmp_path / f"{c}.png", c) for c in ("red", "green", "blue", "black", "yellow", "purple")]
    prompts = ["", "", "a picture of", "", "", "red " * 5000]
    rows, _ = caption.caption_batch([[str(p)] for p in images], prompts, [3] * 6, [8] * 6, ["base"] * 6,
                                    checkpoint=tiny_models["caption"])
    assert all(len(r) == 1 and r[0][0].endswith(".png") and not r[0][1].startswith("Refused:") for r in rows[:5])
    assert "prefix is 19,999 characters long" in rows[5][0][1]  # stripped of its trailing space
    rows, _ = caption.caption_batch([[str(images[0])], [str(images[1])]], ["", "red " * 70], [3, 3], [8, 100],
                                    ["base", "base"], checkpoint=tiny_models["caption"])
    assert not rows[0][0][1].startswith("Refused:") and "tokens" in rows[1][0][1]
    with pytest.raises(InputError, match="Max new tokens can be at most 63"):  # the slider's maximum, alone
        caption.caption_batch([[str(images[0])]], [""], [3], [100], ["base"], checkpoint=tiny_models["caption"])

    long_question = "what " * 80
    rows, _ = vqa.vqa_batch([str(images[0])] * 3, ["what color?", long_question, "what shape?"], [1] * 3, [5] * 3,
                            ["base"] * 3, checkpoint=tiny_models["vqa"])
    assert rows[0][0][0] == "what color?" and rows[2][0][0] == "what shape?"
    assert "question is 82 tokens long" in rows[1][0][1]
    with pytest.raises(InputError, match="at most 20"):
        vqa.vqa_batch([str(images[0])], ["q?\n" * 21], [1], [5], ["base"], checkpoint=tiny_models["vqa"])


def test_a_batch_the_model_fails_on_is_served_one_by_one(tmp_path, tiny_models, home, monkeypatch):
    """If the shared forward pass still fails, each request is served alone: only the culprit fails."""
    images = [make_image(tmp_path / f"{c}.png", c) for c in ("red", "green", "blue")]
    real = caption.caption_model.caption
    calls = []

    def fragile(images, *args, **kwargs):  # the decoded images; the green one makes the model fail
        calls.append(len(images))
        if any(img.getpixel((32, 32)) == (0, 128, 0) for img in images):
            raise RuntimeError("index out of range in self")
        return real(images, *args, **kwargs)

    monkeypatch.setattr(caption.caption_model, "caption", fragile)
    rows, _ = caption.caption_batch([[str(p)] for p in images], [""] * 3, [3] * 3, [8] * 3, ["base"] * 3,
                                    checkpoint=tiny_models["caption"])
    assert calls == [3, 1, 1, 1]  # one batched call, then one call per request
    assert not rows[0][0][1].startswith("Refused:") and not rows[2][0][1].startswith("Refused:")
    assert rows[1][0][1].startswith("Refused: The model could not caption this request (RuntimeError)")
    with pytest.raises(MMDemoError, match="could not caption this request"):
        caption.caption_batch([[str(images[1])]], [""], [3], [8], ["base"], checkpoint=tiny_models["caption"])


def test_vqa_batch_answers_every_question(tmp_path, tiny_models, home):
    img = make_image(tmp_path / "img.png")
    rows, _ = vqa.vqa_batch([str(img), str(img)], ["what color?\nhow many shapes?", "what shape?"], [1, 1],
                            [5, 5], ["base", "base"], checkpoint=tiny_models["vqa"])
    assert [r[0] for r in rows[0]] == ["what color?", "how many shapes?"] and len(rows[1]) == 1
    with pytest.raises(InputError, match="at least one question"):
        vqa.vqa_batch([str(img)], ["  \n "], [1], [5], ["base"], checkpoint=tiny_models["vqa"])


def test_audio_library_search_and_uploads(tmp_path, tiny_models, home):
    ck = tiny_models["retrieval"]
    rows, plot, paths, _info = audio.search_audio("a high beep", 3, checkpoint=ck)
    assert len(rows) == 3 and list(plot.columns) == ["item", "score"] and all(p.endswith(".wav") for p in paths)
    n_bundled = len(audio.library_rows(ck))
    assert n_bundled == len(audio.bundled_clips())

    tone = make_tone(tmp_path / "up" / "tone.wav", 660.0)
    junk = tmp_path / "up" / "junk.wav"
    junk.write_text("this is not audio")
    archive = tmp_path / "clips.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(make_tone(tmp_path / "z" / "noise.wav", kind="noise"), "clips/noise.wav")
        zf.writestr("clips/readme.txt", "hello")
    report, library = audio.add_clips([str(tone), str(junk), str(archive)], checkpoint=ck)
    assert "Added 2 clips." in report and "2 files could not be used" in report
    assert "junk.wav is a text file" in report and "readme.txt" in report
    assert len(library) == n_bundled + 2
    stored = sorted(p.name for p in (home / "library-clips").rglob("*.wav"))
    assert stored == ["noise.wav", "tone.wav"]  # the bad file was reported, not kept
    report, _ = audio.add_clips([str(tone)], checkpoint=ck)
    assert "Added 0 clips." in report and "1 clip was already in the library" in report

    label_rows, _, _ = audio.classify_audio(str(tone), "beep, rain\nsiren", 2, checkpoint=ck)
    assert len(label_rows) == 2 and {r[1] for r in label_rows} <= {"beep", "rain", "siren"}
    similar, paths, _ = audio.similar_audio(str(tone), 1, checkpoint=ck)
    assert similar[0][1].endswith("tone.wav") and similar[0][2] == pytest.approx(1.0, abs=1e-3)
    updates = audio.players(similar, paths)
    assert updates[0]["visible"] and not updates[1]["visible"]
    with pytest.raises(InputError, match="Upload or record"):
        audio.similar_audio(None, 3, checkpoint=ck)


def _retrieval_adapter(checkpoint: str, home, name: str, seed: int) -> str:
    """A random (non-zero) LoRA for the tiny CLAP, saved where the Fine-tune tab puts adapters."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import ClapModel

    torch.manual_seed(seed)
    folder = home / "adapters" / name
    peft = get_peft_model(ClapModel.from_pretrained(checkpoint),
                          LoraConfig(r=4, lora_alpha=64, target_modules=["query", "value"], init_lora_weights=False))
    peft.save_pretrained(folder)
    (folder / "mmdemo.json").write_text(json.dumps({"task": "retrieval", "owner": f"anon:{A}"}))
    return name


def test_audio_search_with_a_retrieval_adapter(tmp_path, tiny_models, home, monkeypatch):
    from mmdemo.models.retrieval import Embedder

    ck = tiny_models["retrieval"]
    name = _retrieval_adapter(ck, home, "clap-lora", seed=7)
    assert common.adapter_choices("retrieval", f"anon:{A}") == ["base", name]
    n = len(audio.bundled_clips())
    tone = make_tone(tmp_path / "up" / "tone.wav", 660.0)
    audio.add_clips([str(tone)], checkpoint=ck)  # joins the base library before the adapter's is made
    base_rows, _, base_paths, _ = audio.search_audio("a high beep", n + 1, "base", checkpoint=ck)

    embedded: list[int] = []
    waveforms = Embedder.waveforms

    def counting(self, clips):
        embedded.append(len(clips))
        return waveforms(self, clips)

    monkeypatch.setattr(Embedder, "waveforms", counting)
    rows, plot, paths, info = audio.search_audio("a high beep", n + 1, name, A, checkpoint=ck)
    assert sum(embedded) == n + 1  # the adapter's library was filled from the base library, once
    assert sorted(paths) == sorted(base_paths) and len(paths) == n + 1  # the same clips...
    base_scores = {r[1]: r[2] for r in base_rows}
    scores = {r[1]: r[2] for r in rows}
    assert scores != base_scores  # ...scored by the adapter
    assert list(plot.columns) == ["item", "score"] and len(plot) == n + 1
    assert f"adapter {name}" in info and str(home) not in info
    adapter_dir = audio.index_dir(ck, str(home / "adapters" / name))
    assert adapter_dir.parent == audio.index_dir(ck).parent and adapter_dir != audio.index_dir(ck)

    embedded.clear()
    audio._INDEXES.clear()  # as after a restart: the adapter's library is read back from disk
    again, _, _, _ = audio.search_audio("a high beep", n + 1, name, A, checkpoint=ck)
    assert embedded == [] and again == rows

    later = make_tone(tmp_path / "up" / "later.wav", 330.0, kind="square")
    audio.add_clips([str(later)], checkpoint=ck)
    embedded.clear()
    similar, similar_paths, _ = audio.similar_audio(str(later), 1, name, A, checkpoint=ck)
    assert embedded == [1, 1]  # the new clip topped up the adapter's library, then the query itself
    assert similar[0][1] == "later.wav" and similar[0][2] == pytest.approx(1.0, abs=1e-3)
    base_labels, _, _ = audio.classify_audio(str(tone), "beep, rain, siren", 3, "base", checkpoint=ck)
    labels, _, _ = audio.classify_audio(str(tone), "beep, rain, siren", 3, name, A, checkpoint=ck)
    assert {r[1] for r in labels} == {"beep", "rain", "siren"}
    assert {r[1]: r[2] for r in labels} != {r[1]: r[2] for r in base_labels}
    with pytest.raises(MMDemoError, match="no adapter called"):
        audio.search_audio("a high beep", 3, "missing", A, checkpoint=ck)
    with pytest.raises(MMDemoError, match="no adapter called"):  # B may not use A's adapter, in any endpoint
        audio.search_audio("a high beep", 3, name, B, checkpoint=ck)
    with pytest.raises(MMDemoError, match="no adapter called"):
        audio.similar_audio(str(later), 3, name, B, checkpoint=ck)
    with pytest.raises(MMDemoError, match="no adapter called"):
        audio.classify_audio(str(later), "beep", 3, name, None, checkpoint=ck)


def test_build_app_registers_the_design_api_names(tiny_models):
    demo = ui_app.build_app(UIContext(checkpoints=tiny_models, tiny=True), warm_up=False)
    names = {fn.api_name for fn in demo.fns.values() if fn.api_visibility == "public"}
    assert {"caption", "vqa", "search_audio", "classify_audio", "similar_audio"} <= names


def test_a_full_disk_during_a_library_upload_leaves_no_partial_clip(tmp_path, tiny_models, home):
    """The library's clip folder on a real 64 KB tmpfs: a 300 KB upload is refused with a sentence, and
    nothing of it stays behind (a 0-byte or partial clip would pass for complete on the next upload)."""
    import subprocess

    clips = home / "library-clips"
    clips.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(clips)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        big = make_tone(tmp_path / "up" / "long_tone.wav", 440.0, seconds=10.0)  # ~320 KB
        small = make_tone(tmp_path / "up" / "short_tone.wav", 880.0, seconds=0.5)  # ~16 KB
        report, _ = audio.add_clips([str(big), str(small)], checkpoint=tiny_models["retrieval"])
        assert "Added 1 clip." in report and "1 file could not be used" in report
        assert "long_tone.wav could not be stored in the library (the disk is full)" in report
        assert sorted(p.name for p in clips.rglob("*") if p.is_file()) == ["short_tone.wav"]
    finally:
        subprocess.run(["umount", str(clips)], check=False)
