"""The model layer: the registry, loading with adapters, one module per task (caption, vqa, retrieval, image_search)
and one per model family (blip, florence2, smolvlm, clap, siglip).

Never imports gradio; runs the same in the app, the CLI, a worker process or a benchmark.
"""
