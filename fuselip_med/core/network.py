"""Network calls that end: every Hugging Face Hub call (uploads, downloads, repo creation) has a timeout and a
bounded retry, and a silent or unreachable endpoint ends in one line naming it.

``huggingface_hub`` (>= 1.0) sends everything through one shared HTTP client whose default timeout is None, and
some calls pass ``timeout=None`` themselves (an endpoint that accepts the connection and never answers hangs
forever); ``hub_call`` installs a client (``set_client_factory``, huggingface_hub's documented hook) whose
requests all get the timeout (a request hook fills every phase left unbounded), and retries a timed-out or
dropped call with exponential backoff. Settings, read when the call is made:

``FUSELIP_MED_NETWORK_TIMEOUT``  seconds without an answer before a try gives up (default 60)
``FUSELIP_MED_NETWORK_RETRIES``  further tries after the first (default 2; backoff 1 s, 2 s, 4 s, ...)
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TypeVar

from fuselip_med.errors import UserError

__all__ = ["NetworkError", "hub_call", "network_settings"]

TIMEOUT_ENV = "FUSELIP_MED_NETWORK_TIMEOUT"
RETRIES_ENV = "FUSELIP_MED_NETWORK_RETRIES"
T = TypeVar("T")
_installed: float | None = None


class NetworkError(UserError, OSError):
    """An endpoint that did not answer (or could not be reached) within the timeout, after the retries."""


def network_settings() -> tuple[float, int]:
    """(timeout in seconds > 0, retries >= 0) from the environment; ``UserError`` naming a bad value."""
    try:
        timeout = float(os.environ.get(TIMEOUT_ENV, "60"))
        retries = int(os.environ.get(RETRIES_ENV, "2"))
    except ValueError:
        raise UserError(f"{TIMEOUT_ENV} must be seconds and {RETRIES_ENV} a whole number; got "
                        f"{os.environ.get(TIMEOUT_ENV)!r} and {os.environ.get(RETRIES_ENV)!r}") from None
    if timeout <= 0 or retries < 0:
        raise UserError(f"{TIMEOUT_ENV} must be > 0 and {RETRIES_ENV} >= 0; got {timeout} and {retries}")
    return timeout, retries


def _install_timeout(timeout: float) -> None:
    """Make huggingface_hub's shared client give up after ``timeout`` seconds without an answer."""
    global _installed
    if _installed == timeout:
        return
    import huggingface_hub
    from huggingface_hub.utils import _http

    def bound(request) -> None:  # calls that pass timeout=None (repo_info does) get the limit too
        given = request.extensions.get("timeout") or {}
        request.extensions["timeout"] = {phase: given.get(phase) or timeout
                                         for phase in ("connect", "read", "write", "pool")}

    def factory():
        client = _http.default_client_factory()  # keeps huggingface_hub's own request hooks
        client.timeout = timeout
        client.event_hooks = {**client.event_hooks, "request": [*client.event_hooks["request"], bound]}
        return client

    huggingface_hub.set_client_factory(factory)  # also closes the client made with the old settings
    _installed = timeout


def _endpoint(error: BaseException) -> str:
    request = getattr(error, "_request", None) or getattr(error, "request", None)
    try:
        url = request.url
        return f"{url.scheme}://{url.host}{':' + str(url.port) if url.port else ''}{url.path}"
    except AttributeError:
        from huggingface_hub import constants

        return constants.ENDPOINT


def _transient(error: BaseException) -> BaseException | None:
    """The timeout or dropped/refused connection (worth another try) behind ``error``, following its causes
    (huggingface_hub wraps them, e.g. in ``LocalEntryNotFoundError``); None for an HTTP answer such as 401."""
    seen = 0
    while error is not None and seen < 8:
        names = {cls.__name__ for cls in type(error).__mro__}
        if names & {"TimeoutException", "TransportError", "TimeoutError", "ConnectionError"}:
            return error
        error, seen = error.__cause__ or error.__context__, seen + 1
    return None


def hub_call(what: str, call: Callable[[], T]) -> T:
    """Run ``call`` (a huggingface_hub call) with the timeout and bounded retry of the module docstring; returns
    its result. ``what`` says what was being done (``uploading runs/x/final``). Raises ``NetworkError`` naming
    the endpoint after the last try; other errors (HTTP answers) pass through unchanged."""
    timeout, retries = network_settings()
    _install_timeout(timeout)
    for attempt in range(retries + 1):
        try:
            return call()
        except Exception as error:  # noqa: BLE001 - only transient network failures are retried
            cause = _transient(error)
            if cause is None:
                raise
            if attempt == retries:
                raise NetworkError(f"{_endpoint(cause)} did not answer while {what} ({type(cause).__name__}; "
                                   f"{retries + 1} tries, each with a {timeout:g} s timeout); check the network or the "
                                   f"endpoint (HF_ENDPOINT), or raise {TIMEOUT_ENV}") from None
            time.sleep(min(2.0 ** attempt, 30.0))
    raise AssertionError("unreachable")
