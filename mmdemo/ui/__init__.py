"""The Gradio app: one module per tab, assembled by :func:`mmdemo.ui.app.build_app`.

Tab-module convention (follow it to add a tab; registering it is one line in ``mmdemo.ui.app.TABS``):

- A tab module (``mmdemo/ui/<name>.py``) defines ``TITLE: str`` (the tab's label) and
  ``build(ctx: mmdemo.ui.context.UIContext) -> None``. ``build`` is called inside an open ``gr.Tab``
  (available as ``ctx.tab``, e.g. for ``ctx.tab.select(...)``) and inside the app's ``gr.Blocks``
  (``ctx.demo``, e.g. for ``ctx.demo.load(...)``). It only lays out widgets and wires events.
  Optionally ``warm_up(ctx) -> None``: run once in the background thread after the models load.
- ``mmdemo.ui.app.TABS`` is the ordered list of tab module names; the tab's ``elem_id`` is
  ``tab-<module name>`` (e.g. ``tab-finetune``), which the browser tests click.
- Handlers are plain module-level functions that take and return plain values (paths, strings,
  numbers, lists, DataFrames), so tests call them without a browser. They raise ``MMDemoError``;
  decorate them with :func:`mmdemo.ui.common.user_errors`, the only place that turns those into
  ``gr.Error`` with the error's sentence.
- Every public event has a stable ``api_name`` (DESIGN.md's ``caption``, ``vqa``, ``search_audio``,
  ``classify_audio``, ``similar_audio``, ``finetune_submit``, ``job_status``, ``job_cancel``; since then
  ``compare``, ``search_images``, ``classify_image``, ``similar_images``); helper events (previews, refreshes,
  timers) use ``api_visibility="private"``. A tab lists the api_names strangers' agents may call in
  ``MCP_TOOLS`` (served by ``python app.py --mcp``); their functions have named parameters and a docstring
  with an ``Args:`` line per parameter, which the API page and MCP clients show.
- Events that run a model use ``concurrency_id=GPU_QUEUE`` and ``concurrency_limit=ctx.gpu_concurrency``
  (``mmdemo.ui.context``) so GPU work is never oversubscribed; the model call itself goes through
  :mod:`mmdemo.ui.gpu` (``@gpu.task``), which adds ``@spaces.GPU`` on ZeroGPU and nothing elsewhere.
- Checkpoints come from ``ctx.checkpoint(task)`` and, for tabs with several base models,
  ``ctx.base_models(task)``; the "Model" row (base, the tab's other base models, or one of the visitor's
  adapters, refreshed on load, tab select and its button) from :func:`mmdemo.ui.common.model_selector`, and a
  chosen name resolves with :func:`mmdemo.ui.common.resolve_model` (base models, name, owner: checkpoint,
  adapter folder, caption detail) or :func:`mmdemo.ui.common.adapter_path` (task, name, owner), which refuse
  adapters the owner may not use. Who the visitor is: :func:`mmdemo.ui.common.owner_of` (jobs: an id is
  required) or :func:`mmdemo.ui.common.optional_owner` (model tabs) with ``ctx.browser_id`` as an input of
  every public event, and ``gr.OAuthProfile`` on a Space (batched handlers: :func:`profile_of` per request).
- A button that runs a model first runs a queued check with no outputs (``concurrency_id="check"``), then
  the model event in ``.success``: only a queued event's ``gr.Error`` reaches the page, and an event
  without outputs leaves the results on screen as they are when it refuses. Batched handlers serve each
  request's failure on its own (:func:`mmdemo.ui.common.serve_isolated`).
- Nothing heavy at import time: no model loading, no CUDA, no file writes outside handlers.
"""
