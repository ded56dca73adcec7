"""One small exception hierarchy; every message is one plain sentence saying what is wrong and what to do.

Only ``mmdemo.ui`` turns these into ``gr.Error`` and only ``mmdemo.cli`` into exit code 2.
"""

from __future__ import annotations


class MMDemoError(Exception):
    """Base class: ``str(err)`` is a sentence fit to show a user as it is."""


class InputError(MMDemoError):
    """A file, archive, argument or dataset that cannot be used."""


class LimitError(InputError):
    """An input over one of the configured limits (size, pixels, duration, count)."""


class ModelLoadError(MMDemoError):
    """A checkpoint or adapter that cannot be found or loaded."""


class JobError(MMDemoError):
    """A fine-tuning job that cannot be submitted, found or changed."""
