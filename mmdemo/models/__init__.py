"""The model layer: task registry, loading with adapters, captioning, VQA and audio retrieval.

Never imports gradio; runs the same in the app, the CLI, a worker process or a benchmark.
"""
