"""Fine-tuning learns as well as a plain peft loop, and decodes the way the tabs will.

``bench/learning.py`` builds a held-out dataset the other tests never use (12 picture classes with two-word
captions and two questions each; 12 kinds of synthetic sound, some clips longer than one 10 s window), trains
the project's ``finetune`` and a hand-written ``get_peft_model`` + AdamW loop with the same targets, rank, alpha,
learning rate and number of steps, and scores both adapters with the same plain scorer.

On this data one training seed is luck as much as method: the tiny model's output layer is random and frozen, so its
training loss only falls from 5.4 to about 4.9 and greedy decoding turns on small differences. The Trainer's default
fused AdamW kernel alone (it rounds differently) moved seed 0's caption score from 0.41 to 0.48, and three clipped
gradients (of 720) moved seed 3's from 0.67 to 0.62. The project
therefore trains with the plain loop's optimiser, weight decay, constant rate and no clipping: for a seed, both
compute the same loss at every step (the first test) and reach the same held-out score (the second, for
captioning and VQA). Retrieval differs by design (the project hears a random 10 s window of each clip per step,
with torch log-mel features), so there the project must reach the reference's score less ``NOISE``.
"""

from __future__ import annotations

import json

import pytest

from bench.learning import _rows, compare_on_one_thread, make_pictures, reference_loop, word_accuracy
from mmdemo.jobs.train import TrainConfig, finetune
from mmdemo.models.loading import ADAPTER_META

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on 2 shared cores

NOISE = 0.1  # retrieval: well inside the seed-to-seed spread, well under the gap issue 10 reported
CHANCE = {"caption": (1 / 4 + 1 / 3) / 2, "vqa": 1 / 7, "retrieval": 1 / 12}  # guessing each word or answer


STEPS = {"retrieval": 200, "vqa": 720, "caption": 720}


@pytest.fixture(scope="module")
def comparisons(tiny_models, tmp_path_factory):
    """The three comparisons, started together in two worker processes of one torch thread each (the 2 cores):
    retrieval, the longest, in one, VQA then captioning in the other. Each test waits for its own result; the
    other tests of this module run after the last one."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"))
    futures = {task: pool.submit(compare_on_one_thread, task, tiny_models[task],
                                 tmp_path_factory.mktemp(f"learning-{task}"), steps=steps)
               for task, steps in STEPS.items()}
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("task", ["caption", "vqa", "retrieval"])
def test_finetune_learns_as_well_as_a_plain_peft_loop(task, comparisons):
    r = comparisons[task].result(timeout=840)
    print(json.dumps(r))
    assert r["mmdemo_steps"] == r["steps"]
    assert r["alpha"] == 32  # --rank 16 without --alpha keeps the quick preset's ratio (16/8)
    assert r["mmdemo"] > CHANCE[task] + 0.1, r
    assert r["mmdemo"] >= r["reference"] - (NOISE if task == "retrieval" else 0), r
    if task == "vqa":  # the page's accuracy is the plain scorer's exact match
        assert abs(r["mmdemo_reported"]["accuracy"] - r["mmdemo"]) < 0.03, r


@pytest.mark.parametrize("task", ["caption", "vqa"])
def test_the_projects_training_computes_the_plain_loops_losses(task, tiny_models, tmp_path):
    """Same seed, same batches: at every step the project's whole path (dataset checks, preprocessing cached once,
    collator, label masking, the Trainer with its optimiser and schedule) gives the loss the plain loop gives, so
    nothing between the files and the model changes what it learns. (Retrieval is left out: the project computes
    CLAP's log-mel features with torch, not with the processor's NumPy, and draws a random 10 s window per clip.)"""
    data = make_pictures(tmp_path / "data", task, train_per_class=2, test_per_class=1)  # 24 pictures: 3 batches
    config = TrainConfig.from_preset("quick", epochs=10, learning_rate=1e-3, rank=16, batch_size=8, min_steps=0,
                                     seed=3)
    result = finetune(task, data, tmp_path / "adapter", model=tiny_models[task], config=config,
                      workdir=tmp_path / "work")
    ours = [r["loss"] for r in result["losses"]]
    plain: list[float] = []
    reference_loop(task, tiny_models[task], _rows(data / "train"), len(ours), 16, 32, 1e-3, 8, seed=3, losses=plain)
    assert len(ours) == 30 * (2 if task == "vqa" else 1)
    assert ours == pytest.approx(plain, abs=2e-4)  # the Trainer logs losses rounded to 4 decimals
    assert plain[-1] < plain[0] - 0.01  # and they did learn


def test_word_accuracy_counts_words_in_place_over_the_longer_caption():
    assert word_accuracy(["red ring"], ["red ring"]) == 1.0
    assert word_accuracy(["red ring short four n"], ["red ring"]) == pytest.approx(2 / 5)
    assert word_accuracy(["blue ring", "ring"], ["red ring", "red ring"]) == pytest.approx((1 / 2 + 0) / 2)


def test_rank_without_alpha_keeps_the_presets_ratio():
    assert TrainConfig.from_preset("quick", rank=16).alpha == 32
    assert TrainConfig.from_preset("thorough", rank=4).alpha == 8
    assert TrainConfig.from_preset("quick", rank=16, alpha=8).alpha == 8  # an explicit alpha is kept
    assert TrainConfig.from_preset("quick", rank=256).alpha == 512


def test_typing_a_rank_in_the_fine_tune_tab_sets_the_matching_alpha():
    from mmdemo.ui.finetune import alpha_for_rank

    assert alpha_for_rank(16, "quick") == 32 and alpha_for_rank(4, "thorough") == 8
    assert alpha_for_rank(None, "balanced") == 32  # an emptied rank field: the preset's own alpha
    assert not isinstance(alpha_for_rank(2.5, "quick"), int)  # not a whole number: the alpha field is left alone


@pytest.mark.slow
def test_an_adapter_for_two_word_captions_decodes_two_words_in_the_tab_as_in_its_table(tiny_models, tmp_path, home):
    """BLIP's 5-token minimum would pad "red ring" with three made-up words: the fine-tune fits the decoding
    lengths to its training captions, scores with them, and the Caption tab uses them with that adapter."""
    from mmdemo.ui import caption as caption_tab

    data = make_pictures(tmp_path / "data", "caption", train_per_class=4, test_per_class=1)
    config = TrainConfig.from_preset("quick", epochs=1, learning_rate=1e-3, rank=16, min_steps=150)
    out = home / "adapters" / "two-words"  # ownerless, as the operator's adapters are: anyone may pick it
    result = finetune("caption", data, out, model=tiny_models["caption"], config=config, workdir=tmp_path / "work")
    meta = json.loads((out / ADAPTER_META).read_text())
    assert meta["generation"] == {"num_beams": 3, "max_new_tokens": 20, "min_new_tokens": 2}
    readme = (out / "README.md").read_text()
    assert "2 to 20 new tokens" in readme and "rate 0.001 (constant)" in readme and "dropout 0," in readme
    lengths = [len(e["adapter"].split()) for e in result["examples"]]
    assert min(lengths) < 5, result["examples"]  # not padded to BLIP's minimum of 5 tokens

    first = result["examples"][0]
    rows, _info = caption_tab.caption_batch([[str(data / first["file"])]], [""], [3], [20], ["two-words"],
                                            checkpoint=tiny_models["caption"])
    assert rows[0][0][1] == first["adapter"]  # the tab's default beams and length, with this adapter
