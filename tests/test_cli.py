"""``python -m mmdemo`` as a user runs it: JSON lines out; bad input -> exit 2 and one sentence, no traceback."""

from __future__ import annotations

import io
import json
import zipfile

import pytest
from PIL import Image

from conftest import make_image, make_tone, run_cli, run_cli_here


def records(proc) -> list[dict]:
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def assert_one_sentence(proc, *words: str) -> str:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and lines[0].endswith(".")
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def test_caption_and_vqa(tiny_models, tmp_path):
    a, b = make_image(tmp_path / "a.png", "red"), make_image(tmp_path / "b.png", "blue", "square")
    proc = run_cli("caption", str(a), str(b), "--model", tiny_models["caption"], "--num-beams", "2",
                   "--max-new-tokens", "6")
    assert proc.returncode == 0, proc.stderr
    out = records(proc)
    assert [r["image"] for r in out] == [str(a), str(b)] and all(r["caption"] for r in out)

    proc = run_cli("vqa", str(a), "--question", "what color?", "-q", "what shape is it?", "--model",
                   tiny_models["vqa"])
    assert proc.returncode == 0, proc.stderr
    assert [(r["question"], bool(r["answer"])) for r in records(proc)] == [("what color?", True),
                                                                           ("what shape is it?", True)]


def _bad_images(tmp_path):
    good = make_image(tmp_path / "good.png").read_bytes()
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "cut.png").write_bytes(good[:200])
    (tmp_path / "readme.png").write_text("# not an image\n")
    Image.new("RGB", (8, 8)).save(tmp_path / "old.ppm")
    buf = io.BytesIO()
    Image.new("L", (3000, 3000)).save(buf, format="PNG")
    (tmp_path / "huge.png").write_bytes(buf.getvalue())
    return {"empty.png": "empty", "cut.png": "truncated or corrupt", "readme.png": "text file",
            "old.ppm": "not supported", "huge.png": "pixels", "nowhere.png": "does not exist"}


def test_bad_images_exit_2_with_one_sentence(tiny_models, tmp_path):
    env = {"MMDEMO_MAX_IMAGE_PIXELS": "1000000"}
    for name, words in _bad_images(tmp_path).items():
        proc = run_cli("caption", str(tmp_path / "good.png"), str(tmp_path / name), "--model",
                       tiny_models["caption"], env=env)
        assert_one_sentence(proc, name, words)
        assert proc.stdout == ""  # nothing captioned when one input is bad


def test_bad_arguments(tiny_models, tmp_path):
    img = make_image(tmp_path / "a.png")
    assert_one_sentence(run_cli_here("vqa", str(img), "-q", "  ", "--model", tiny_models["vqa"]), "question")
    assert_one_sentence(run_cli_here("caption", str(img), "--num-beams", "50", "--model", tiny_models["caption"]),
                        "Beams")
    proc = run_cli_here("caption", str(img), "--num-beams", "zero")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_missing_checkpoints(tmp_path):
    img = make_image(tmp_path / "a.png")
    line = assert_one_sentence(run_cli_here("caption", str(img), "--model", "nobody/no-such-model"),
                               "nobody/no-such-model", "python -m mmdemo download", "MMDEMO_CAPTION_MODEL")
    assert "cache" in line
    assert_one_sentence(run_cli_here("caption", str(img), "--model", str(tmp_path / "nothing-here")),
                        "does not exist")
    (tmp_path / "half").mkdir()
    assert_one_sentence(run_cli_here("vqa", str(img), "-q", "what?", "--model", str(tmp_path / "half")),
                        "config.json", "MMDEMO_VQA_MODEL")
    assert_one_sentence(run_cli_here("caption", str(img), "--model", str(tmp_path / "half")), "config.json")
    # the default checkpoint, neither cached nor reachable
    assert_one_sentence(run_cli_here("caption", str(img)), "Salesforce/blip-image-captioning-base")
    assert_one_sentence_after_warnings(run_cli_here("download", "--task", "vqa"), "Salesforce/blip-vqa-base")


def test_wrong_architecture(tiny_models, tmp_path):
    img = make_image(tmp_path / "a.png")
    assert_one_sentence(run_cli_here("caption", str(img), "--model", tiny_models["retrieval"]), "clap", "blip")


def test_index_and_search(tiny_models, tmp_path):
    lib = tmp_path / "lib"
    make_tone(lib / "low.wav", freq=200)
    make_tone(lib / "high.flac", freq=2000, fmt="FLAC")
    make_tone(lib / "sub" / "noise.ogg", kind="noise", fmt="OGG")
    make_tone(lib / "chirp.mp3", kind="chirp", fmt="MP3", sr=22050)
    # bad files in the same folder: reported, the good ones still indexed
    (lib / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    (lib / "empty.ogg").write_bytes(b"")
    (lib / "text.mp3").write_text("hello")
    (lib / "notes.txt").write_text("liner notes")
    idx = tmp_path / "idx"
    proc = run_cli_here("index", str(lib), "--out", str(idx), "--model", tiny_models["retrieval"])
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    out = records(proc)
    summary = out[-1]
    assert summary["added"] == 4 and summary["failed"] == 4 and summary["total"] == 4
    failed = {r["path"].rsplit("/", 1)[1]: r["error"] for r in out if r.get("status") == "failed"}
    assert set(failed) == {"broken.wav", "empty.ogg", "text.mp3", "notes.txt"}
    assert all(name in why for name, why in failed.items())
    warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("warning: ")]
    assert len(warnings) == 4

    again = run_cli_here("index", str(lib), "--out", str(idx), "--strict")
    assert again.returncode == 2 and records(again)[-1]["added"] == 0 and records(again)[-1]["duplicates"] == 4

    proc = run_cli_here("search", "--index", str(idx), "--text", "a low hum", "--top-k", "3")
    hits = records(proc)
    assert proc.returncode == 0 and [h["rank"] for h in hits] == [1, 2, 3]
    assert all(set(h) == {"rank", "path", "score"} for h in hits)

    proc = run_cli_here("search", "--index", str(idx), "--audio", str(lib / "low.wav"), "--labels", "dog,rain,beep")
    out = records(proc)
    assert proc.returncode == 0, proc.stderr
    assert [r["label"] for r in out if "label" in r] and len([r for r in out if "label" in r]) == 3
    similar = [r for r in out if "path" in r]
    assert similar[0]["path"].endswith("low.wav") and similar[0]["score"] == pytest.approx(1.0, abs=1e-4)

    assert_one_sentence(run_cli_here("search", "--index", str(idx), "--audio", str(lib / "broken.wav")), "broken.wav")
    assert_one_sentence(run_cli_here("search", "--index", str(tmp_path / "none"), "--text", "x"), "not an audio index")


def test_index_zip_with_bad_entries(tiny_models, tmp_path):
    clip = make_tone(tmp_path / "c.wav").read_bytes()
    with zipfile.ZipFile(tmp_path / "clips.zip", "w") as zf:
        zf.writestr("clips/one.wav", clip)
        zf.writestr("../evil.wav", clip)
    proc = run_cli_here("index", str(tmp_path / "clips.zip"), "--out", str(tmp_path / "idx"), "--model",
                   tiny_models["retrieval"])
    assert proc.returncode == 0, proc.stderr
    summary = records(proc)[-1]
    assert summary["added"] == 1 and summary["failed"] == 1
    assert "zip-slip" in proc.stderr and not (tmp_path / "evil.wav").exists()

    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "a.txt").write_text("x")
    assert_one_sentence_after_warnings(run_cli_here("index", str(tmp_path / "nothing"), "--out", str(tmp_path / "i2"),
                                               "--model", tiny_models["retrieval"]), "No audio could be indexed")


def assert_one_sentence_after_warnings(proc, words):
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and words in errors[0]


def test_tiny_models_command(tmp_path):
    proc = run_cli("tiny-models", str(tmp_path / "tiny"))
    assert proc.returncode == 0, proc.stderr
    names = {r["name"] for r in records(proc)}
    assert {"blip-caption", "blip-vqa", "clap", "siglip"} <= names
    for name in names:
        files = {p.name for p in (tmp_path / "tiny" / name).iterdir()}
        tokenizer = "spiece.model" if name == "siglip" else "tokenizer.json"  # SigLIP's is SentencePiece, as on the Hub
        assert {"config.json", "model.safetensors", tokenizer, "tokenizer_config.json",
                "processor_config.json"} <= files


def test_the_library_command_and_the_audio_tab_share_one_library(tiny_models, home, tmp_path):
    """``python -m mmdemo library`` adds to, lists and searches the app's own library (MMDEMO_HOME), through the
    same service as the Audio search tab: a clip added by the CLI is in the tab's list and found by its search."""
    from mmdemo.ui import audio

    ck = tiny_models["retrieval"]
    tone = make_tone(tmp_path / "cli-tone.wav", 880.0)
    notes = tmp_path / "notes.txt"
    notes.write_text("not a sound")
    proc = run_cli_here("library", "add", str(tone), str(notes), "--model", ck, "--strict")
    assert proc.returncode == 2, proc.stderr  # --strict: a file could not be added
    out = records(proc)
    assert out[0] == {"status": "failed",
                      "reason": "notes.txt is not an audio file (WAV, FLAC, OGG or MP3) or a zip, so it was skipped."}
    assert out[-1]["added"] == 1 and out[-1]["total"] == len(audio.bundled_clips()) + 1

    assert audio.library_rows(ck)[0][0] == "cli-tone.wav"  # the tab's list, newest first
    rows, _plot, _paths, _info = audio.search_audio("a high beep", 20, "base", None, checkpoint=ck)
    assert "cli-tone.wav" in [r[1] for r in rows]
    proc = run_cli_here("library", "list", "--model", ck)
    assert records(proc)[0] == {"clip": "cli-tone.wav", "seconds": 1.0}
    proc = run_cli_here("library", "search", "--text", "a high beep", "--top-k", "20", "--model", ck)
    assert proc.returncode == 0, proc.stderr
    assert [r["path"].rsplit("/", 1)[-1] for r in records(proc)] == [r[1] for r in rows]  # the tab's ranking
    assert_one_sentence(run_cli_here("library", "search", "--text", "  ", "--model", ck), "Type some text to search for")


def test_the_images_command_and_the_image_tab_share_one_library(tiny_models, home, tmp_path):
    """``python -m mmdemo images`` adds to, lists and searches the app's own image library (MMDEMO_HOME), through
    the same service as the Image search tab: an image added by the CLI is in the tab's list and its search, and
    the CLI ranks as the tab does."""
    from mmdemo.ui import images

    ck = tiny_models["image_search"]
    pic = make_image(tmp_path / "cli-square.png", "green", "square")
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture")
    proc = run_cli_here("images", "add", str(pic), str(notes), "--model", ck, "--strict")
    assert proc.returncode == 2, proc.stderr  # --strict: a file could not be added
    out = records(proc)
    assert out[0]["status"] == "failed" and out[0]["reason"].startswith("notes.txt is not an image")
    assert out[-1]["added"] == 1 and out[-1]["total"] == len(images.bundled_images()) + 1

    assert images.library_rows(ck)[0][0] == "cli-square.png"  # the tab's list, newest first
    table, _gallery, _info = images.search_images("a green square", 10, "base", None, checkpoint=ck)
    assert "cli-square.png" in [r[1] for r in table]
    assert records(run_cli_here("images", "list", "--model", ck))[0]["image"] == "cli-square.png"
    proc = run_cli_here("images", "search", "--text", "a green square", "--top-k", "10", "--model", ck)
    assert proc.returncode == 0, proc.stderr
    assert [r["path"].rsplit("/", 1)[-1] for r in records(proc)] == [r[1] for r in table]  # the tab's ranking
    proc = run_cli_here("images", "search", "--image", str(pic), "--labels", "green, red", "--top-k", "2", "--model", ck)
    out = records(proc)
    assert sorted(r["label"] for r in out[:2]) == ["green", "red"]
    assert out[2]["path"].endswith("cli-square.png") and out[2]["score"] == pytest.approx(1.0, abs=1e-4)
    assert_one_sentence(run_cli_here("images", "search", "--text", "  ", "--model", ck), "Type some text")
