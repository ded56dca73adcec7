"""mmdemo: caption images, answer questions about them and search sounds, with LoRA fine-tuning.

The package is layered one way: ``ui`` -> ``jobs``, ``models`` -> ``media``, ``data`` -> ``config``,
``errors``. Nothing here imports torch, transformers or gradio at import time.
"""

__version__ = "0.1.0"
