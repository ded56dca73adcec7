"""Is the Hugging Face Hub reachable, and is a Hub checkpoint already in the local cache?

Without these checks a Hub id that is neither cached nor reachable costs about 25 s per file:
huggingface_hub retries each request five times (1+2+4+8+8 s of back-off, a log line each), and a
cached checkpoint still pays that before transformers falls back to the cache. So before a Hub id is
loaded, :func:`reachable` asks the Hub once with a short timeout and remembers the answer for
``PROBE_TTL`` seconds: many models and clicks share one probe, and a Hub that comes back is noticed
within that window. ``HF_HUB_OFFLINE=1`` means "never ask": the Hub counts as unreachable.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator

PROBE_TIMEOUT = 3.0  # seconds: a Hub that answers slower than this would not load a model in time anyway
PROBE_TTL = 60.0  # seconds one answer is trusted, by loads and by the failures remembered in loading.py

# What makes a cached snapshot loadable offline: the config and one form of the weights. Processor and
# tokenizer files differ by architecture; a snapshot missing one of them fails fast with local_files_only.
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")

# Loggers that repeat themselves while the Hub misbehaves (one "Retrying in Ns" line per attempt).
NOISY_LOGGERS = ("huggingface_hub", "transformers.utils.hub")

_probe_lock = threading.Lock()  # held during a probe, so concurrent callers wait for its answer
_answer: tuple[float, bool] | None = None  # (time.monotonic() of the probe, reachable)


def offline_mode() -> bool:
    """``HF_HUB_OFFLINE`` as huggingface_hub read it (at import; tests patch the constant)."""
    from huggingface_hub import constants

    return constants.is_offline_mode()


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _probe(timeout: float) -> bool:
    """One HEAD request to the Hub endpoint, through huggingface_hub's own client (its proxy/TLS settings).

    Any answer below 500 means reachable; a 5xx would make huggingface_hub retry just like a refused
    connection, so it counts as unreachable.
    """
    import httpx2  # huggingface_hub 2.x's HTTP library
    from huggingface_hub.utils import get_session

    try:
        response = get_session().head(endpoint(), timeout=timeout, follow_redirects=False)
    except (httpx2.HTTPError, OSError):
        return False
    return response.status_code < 500


def reachable(timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether the Hub answers, probed at most once per ``PROBE_TTL`` seconds; False in offline mode."""
    global _answer
    if offline_mode():
        return False
    with _probe_lock:
        if _answer is not None and time.monotonic() - _answer[0] < PROBE_TTL:
            return _answer[1]
        ok = _probe(timeout)
        _answer = (time.monotonic(), ok)
        return ok


def known_reachable() -> bool | None:
    """The last probe's answer while it is still trusted, without probing (or waiting for one); else None."""
    if offline_mode():
        return False
    answer = _answer  # one read of a tuple that is only ever replaced whole: no lock needed
    if answer is not None and time.monotonic() - answer[0] < PROBE_TTL:
        return answer[1]
    return None


def forget_probe() -> None:
    """Drop the remembered answer, so the next :func:`reachable` asks again (tests, or after a network change)."""
    global _answer
    with _probe_lock:
        _answer = None


def is_cached(repo_id: str) -> bool:
    """Whether the main revision of ``repo_id`` has its config and weights in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    def cached(filename: str) -> bool:
        try:
            return isinstance(try_to_load_from_cache(repo_id, filename), str)
        except ValueError:  # not a valid repo id (HFValidationError): nothing of it can be cached
            return False

    return cached("config.json") and any(cached(name) for name in WEIGHTS)


_quiet_lock = threading.Lock()
_quiet_depth = 0
_saved_levels: dict[str, int] = {}


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Keep the Hub libraries' retry and fallback warnings out of the terminal while a model loads.

    The load's outcome is reported once, as one sentence, by the caller. Logger levels are
    process-wide, so nested and concurrent loads share one count and the last one out restores them.
    """
    global _quiet_depth
    with _quiet_lock:
        if _quiet_depth == 0:
            for name in NOISY_LOGGERS:
                logger = logging.getLogger(name)
                _saved_levels[name] = logger.level
                logger.setLevel(logging.ERROR)
        _quiet_depth += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_depth -= 1
            if _quiet_depth == 0:
                for name, level in _saved_levels.items():
                    logging.getLogger(name).setLevel(level)
                _saved_levels.clear()
