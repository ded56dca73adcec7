"""The opt-in CPU fast mode (``MMDEMO_FAST=1``, ``app.py --fast``): int8 BLIP layers and an exported CLAP audio encoder.

Off by default; off, nothing here runs: captions and answers have plain transformers' fp32 tokens, embeddings its
fp32 values to float rounding. On, and only
on the CPU (a GPU already runs the models in bf16, and int8 kernels here are CPU kernels):

- Captioning and VQA: every ``nn.Linear`` of BLIP (vision encoder, text encoder and decoder, LM head) computes
  in dynamic int8 (fbgemm: int8 weights with one scale per output row, activations quantised per call). The
  decoder reads ~550 MB of fp32 weights per token, so a quarter of that is most of the gain. The layers LoRA
  adapts (the registry's ``lora_targets``) become :class:`Int8BaseLinear`, still an ``nn.Linear`` that keeps
  its float weight, so peft wraps it as usual and an adapter's low-rank update runs in fp32 beside the int8
  base: adapters load and switch as in the exact mode. Do not merge an adapter into such a layer
  (``merge_and_unload``): the int8 copy would not follow. An adapter that targets other layers is refused.
- Audio search: CLAP's audio tower (HTSAT, ~94% of indexing time) is exported once per checkpoint with
  ``torch.onnx.export``, quantised to int8 by onnxruntime and cached under ``MMDEMO_HOME/fast/``; clip
  embeddings then come from onnxruntime (worker threads do not spin, so torch beside it keeps its cores).
  The export is checked against torch before it is used; if it fails, or onnxruntime is missing, indexing
  falls back to torch with one log line. The exported encoder has no LoRA in it: while an adapter that
  adapts the audio tower is active (every retrieval adapter mmdemo trains does), clips go through torch.
  The text tower (RoBERTa and its projection) runs in torch with the same int8 Linear layers as BLIP, LoRA
  targets kept adaptable: a new text query over a library costs about a third of fp32's here.

What it trades: outputs are close to fp32 but not identical (captions differ in some tokens; audio
embeddings have cosine ~0.9996 to fp32, text query embeddings ~0.9996, and a text search's top-10 shares ~97% of its clips with the exact one); ``bench/fast.py`` and
``bench/search.py`` measure the agreement and the speed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# What goes int8 in fast mode is each architecture's ``int8_parts`` (mmdemo.models.registry): the whole model ("")
# or the named submodules; none for the families whose agreement with fp32 was not measured. CLAP's audio tower is
# exported instead (below); its torch copy stays fp32 for adapters that adapt it.
AUDIO_FORMAT = 1  # bump when the export changes: old cached files are then ignored
AUDIO_FILE = "clap-audio-int8.onnx"
MIN_EXPORT_COSINE = 0.99  # an export whose embeddings are further than this from torch's is not used

_LOCK = threading.Lock()


# ------------------------------------------------------------------------------------------------ int8 Linear
def _pack(weight, bias):
    """fbgemm's prepacked int8 weight (symmetric, one scale per output row) and fp32 bias."""
    import torch

    w = weight.detach().float()
    scale = (w.abs().amax(dim=1).clamp(min=1e-8) / 127.0).double()
    with warnings.catch_warnings():  # quantized tensors are deprecated in favour of torchao, still the fast CPU path
        warnings.simplefilter("ignore")
        qw = torch.quantize_per_channel(w, scale, torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8)
        return torch.ops.quantized.linear_prepack(qw, None if bias is None else bias.detach().float())


def _int8_forward(module, x):
    import torch

    # reduce_range: 7-bit activations, as torch's own dynamic quantisation on x86 (no overflow without VNNI)
    return torch.ops.quantized.linear_dynamic(x, module._packed, True)


def _check_cpu(linear) -> None:
    if linear.weight.device.type != "cpu":
        raise ValueError("int8 layers run on the CPU only; fast mode is off on a GPU")


class _Int8Mixin:
    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def _int8_linear_class():
    import torch

    class Int8Linear(_Int8Mixin, torch.nn.Module):
        """A frozen ``nn.Linear`` in dynamic int8; the float weight is dropped (a quarter of the memory)."""

        def __init__(self, linear: torch.nn.Linear):
            super().__init__()
            _check_cpu(linear)
            self.in_features, self.out_features = linear.in_features, linear.out_features
            self._packed = _pack(linear.weight, linear.bias)

        def forward(self, x):
            return _int8_forward(self, x)

    class Int8BaseLinear(_Int8Mixin, torch.nn.Linear):
        """An ``nn.Linear`` that computes in int8 and keeps its float weight, for peft to wrap with a LoRA."""

        def __init__(self, linear: torch.nn.Linear):
            torch.nn.Module.__init__(self)  # not Linear.__init__: reuse the weight, allocate nothing
            _check_cpu(linear)
            self.in_features, self.out_features = linear.in_features, linear.out_features
            self.weight, self.bias = linear.weight, linear.bias
            self._packed = _pack(linear.weight, linear.bias)

        def forward(self, x):
            return _int8_forward(self, x)

    return Int8Linear, Int8BaseLinear


_CLASSES: tuple | None = None


def int8_classes() -> tuple[type, type]:
    """``(Int8Linear, Int8BaseLinear)``, built on first use (torch is not imported with this module)."""
    global _CLASSES
    if _CLASSES is None:
        _CLASSES = _int8_linear_class()
    return _CLASSES


def quantize_linears(model, lora_targets: tuple[str, ...] = (), keep_float: tuple[str, ...] = ()) -> dict[str, int]:
    """Replace every plain ``nn.Linear`` of ``model`` in place; those named in ``lora_targets`` stay Linears.

    Layers named in ``keep_float`` are left as they are (the benchmark measures that variant). Returns how many
    layers became ``int8`` and how many of them are ``lora_base`` (peft can wrap them).
    """
    import torch

    int8, base = int8_classes()
    counts = {"int8": 0, "lora_base": 0}
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is not torch.nn.Linear or name in keep_float:
                continue
            keep = name in lora_targets
            setattr(module, name, (base if keep else int8)(child))
            counts["int8"] += 1
            counts["lora_base"] += keep
    return counts


def quantize_model(model, parts: tuple[str, ...], lora_targets: tuple[str, ...] = ()) -> dict[str, int]:
    """Fast mode's int8 layers in the submodules ``parts`` ("" is the whole model), in place; counts as
    :func:`quantize_linears`."""
    counts = {"int8": 0, "lora_base": 0}
    for part in parts:
        module = model.get_submodule(part)
        for key, n in quantize_linears(module, lora_targets).items():
            counts[key] += n
    return counts


def is_int8(module) -> bool:
    return isinstance(module, int8_classes())


# ------------------------------------------------------------------------------------------- CLAP audio encoder
class OnnxAudio:
    """CLAP's audio tower and projection (``get_audio_features(...).pooler_output``) run by onnxruntime."""

    def __init__(self, path: Path, threads: int | None = None):
        import onnxruntime as ort
        import torch

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Spinning workers keep a core busy after each call and slow torch running beside them (up to 10x here).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        opts.log_severity_level = 3
        self.path = path
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.audio_adapters: dict[str, bool] = {}  # adapter folder -> whether it adapts the audio tower

    def __call__(self, features):
        """(batch, 1, frames, mels) float32 features -> (batch, projection_dim) float32 tensor."""
        import torch

        x = features.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {"input_features": x})[0])


def _audio_wrapper(model):
    import torch

    class AudioTower(torch.nn.Module):
        def __init__(self, clap):
            super().__init__()
            self.clap = clap

        def forward(self, input_features):
            return self.clap.get_audio_features(input_features=input_features).pooler_output

    return AudioTower(model).eval()


def cache_key(loaded) -> str:
    """Names the export of ``loaded``'s checkpoint: its id, its Hub revision or local weight files, the format."""
    parts: list[Any] = [loaded.checkpoint, AUDIO_FORMAT]
    folder = Path(loaded.checkpoint).expanduser()
    if folder.is_dir():
        for f in sorted(folder.iterdir()):
            if f.suffix in (".safetensors", ".bin", ".json"):
                st = f.stat()
                parts.append((f.name, st.st_size, st.st_mtime_ns))
    else:  # a Hub id: the cached weights' blob names are their content hashes, so a new revision gets a new key
        from huggingface_hub import try_to_load_from_cache

        for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "config.json"):
            found = try_to_load_from_cache(loaded.checkpoint, name)
            if isinstance(found, str):
                parts.append((name, Path(found).resolve().name))
    digest = hashlib.sha1(json.dumps(parts, default=str).encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", folder.name or "model")[:40]
    return f"{name}-{digest}"


def cache_dir(loaded) -> Path:
    from mmdemo.config import get_settings

    return get_settings().home / "fast" / cache_key(loaded)


def _features_example(loaded, batch: int = 2):
    import torch

    fe = loaded.processor.feature_extractor
    frames = int(fe.nb_max_samples) // int(fe.hop_length) + 1
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch, 1, frames, int(fe.feature_size), generator=gen) * 20 - 50  # dB-like values


def _cosine(a, b) -> float:
    import torch

    return float(torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).min())


def export_audio(loaded, target: Path) -> Path:
    """Export, quantise and check the audio tower of ``loaded``; write it to ``target`` atomically."""
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    target.parent.mkdir(parents=True, exist_ok=True)
    example = _features_example(loaded)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".export-") as tmp:
        fp32, int8 = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        with loaded.using(None) as model, torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about shapes: the batch axis is the only dynamic one
            tower = _audio_wrapper(model)
            expected = tower(example)
            # The TorchScript exporter: one pass, seconds; the dynamo one needs onnxscript and takes minutes here.
            torch.onnx.export(tower, (example,), str(fp32), input_names=["input_features"],
                              output_names=["audio_embeds"], opset_version=17, dynamo=False,
                              dynamic_axes={"input_features": {0: "batch"}, "audio_embeds": {0: "batch"}})
        logging.disable(logging.WARNING)  # the quantiser warns through the root logger for every attention slice
        try:
            quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
        finally:
            logging.disable(logging.NOTSET)
        got = OnnxAudio(int8)(example)
        cosine = _cosine(got, expected)
        if not cosine >= MIN_EXPORT_COSINE:
            raise ValueError(f"the exported audio encoder disagrees with torch (cosine {cosine:.4f})")
        os.replace(int8, target)
    (target.parent / "export.json").write_text(json.dumps({"checkpoint": loaded.checkpoint, "cosine": cosine,
                                                           "format": AUDIO_FORMAT, "torch": torch.__version__}))
    return target


def audio_encoder(loaded) -> OnnxAudio | None:
    """The exported audio encoder of a fast-mode CLAP model (exported on first use), else ``None`` (use torch).

    ``None`` also when the export or onnxruntime failed; that is logged once, and the model keeps using torch.
    """
    if not getattr(loaded, "fast", False):
        return None
    if loaded.fast_audio is not None:
        return loaded.fast_audio or None  # False: a failed export, not tried again
    with _LOCK:
        if loaded.fast_audio is None:
            try:
                target = cache_dir(loaded) / AUDIO_FILE
                if not target.is_file():
                    log.info("Fast mode: exporting the CLAP audio encoder of %s once (cached in %s).",
                             loaded.checkpoint, target.parent)
                    export_audio(loaded, target)
                loaded.fast_audio = OnnxAudio(target)
            except (ImportError, OSError, RuntimeError, ValueError, TypeError) as err:
                log.warning("Fast mode: the CLAP audio encoder could not be exported (%s: %s); audio is embedded "
                            "with torch instead.", type(err).__name__, " ".join(str(err).split())[:300])
                loaded.fast_audio = False
    return loaded.fast_audio or None


def adapts_audio(loaded, adapter: str | Path) -> bool:
    """Whether the LoRA adapter in ``adapter`` changes any layer of CLAP's audio tower or projection."""
    name = loaded.load_adapter(adapter)
    for path, module in loaded.model.named_modules():
        if path.startswith(("audio_model", "audio_projection")) and name in getattr(module, "lora_A", {}):
            return True
    return False


def audio_for(loaded, adapter: str | Path | None) -> OnnxAudio | None:
    """The exported encoder if it can stand in for torch for this request (fast mode, no audio LoRA active)."""
    encoder = audio_encoder(loaded)
    if encoder is None or adapter is None:
        return encoder
    key = str(Path(adapter).expanduser().resolve())
    if key not in encoder.audio_adapters:
        with loaded.lock:
            encoder.audio_adapters[key] = adapts_audio(loaded, adapter)
    # the exported encoder has no LoRA in it: an adapter on the audio tower needs the torch path
    return None if encoder.audio_adapters[key] else encoder

