"""The one place rtnq talks to `huggingface_hub`: where the hub is (endpoint, cache, offline, token), how a
transient failure is retried, and how the client's exceptions become rtnq's one-line typed errors.

Settings come from `huggingface_hub.constants`, which the client fills from HF_ENDPOINT, HF_HOME/HF_HUB_CACHE
and HF_HUB_OFFLINE when it is imported; reading them there (rather than from os.environ again) keeps rtnq and
the client agreeing on one endpoint and one cache. The token is left to the client's own lookup (HF_TOKEN, then
the file `hf auth login` writes) unless one is passed.

Exit codes, per case (rtnq.errors):
    UsageError (2)       the argument names nothing: no such repo, no such revision, a malformed ORG/NAME@REV
    CheckpointError (4)  the source exists but cannot be read: gated/unauthorised (401/403), a file the listing or
                         index names is missing, offline with nothing cached, the network or the hub failing after
                         the retries, a download whose sha256 never matches
    OutputError (8)      the staging directory cannot be written (disk full)
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from rtnq.errors import CheckpointError, RtnqError, UsageError

T = TypeVar("T")
TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)  # worth another try; anything else will answer the same


@dataclass(frozen=True)
class HubConfig:
    """Where the hub is and how rtnq may use it."""

    endpoint: str
    cache_dir: Path  # the client's hub cache (HF_HUB_CACHE, by default HF_HOME/hub)
    offline: bool  # HF_HUB_OFFLINE: the cache only, no request at all
    token: str | bool | None = None  # None: the client's lookup (HF_TOKEN, then the login file)
    timeout: float = 10.0  # seconds without a byte before a request counts as failed

    @classmethod
    def from_env(cls, **overrides) -> HubConfig:
        from huggingface_hub import constants

        values = dict(endpoint=constants.ENDPOINT.rstrip("/"), cache_dir=Path(constants.HF_HUB_CACHE),
                      offline=constants.is_offline_mode(), timeout=float(constants.HF_HUB_DOWNLOAD_TIMEOUT))
        values.update(overrides)
        return cls(**values)

    def headers(self) -> dict[str, str]:
        """The client's request headers (user agent, and the token where there is one)."""
        from huggingface_hub.utils import build_hf_headers

        return build_hf_headers(token=self.token)


@dataclass(frozen=True)
class Retry:
    """Bounded exponential backoff: `tries` attempts in all, waiting delay, 2*delay, ... (at most max_delay)."""

    tries: int = 3
    delay: float = 1.0
    max_delay: float = 8.0

    def delays(self) -> Iterator[float]:
        d = self.delay
        for _ in range(self.tries - 1):
            yield d
            d = min(self.max_delay, d * 2)


DEFAULT_RETRY = Retry()


class Transient(Exception):
    """A failure another attempt may not see: the connection dropped, a 5xx, bytes that do not hash right."""


def is_transient(exc: BaseException) -> bool:
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(exc, Transient):
        return True
    if isinstance(exc, OfflineModeIsEnabled):
        return False
    if isinstance(exc, HfHubHTTPError):
        return exc.response is not None and exc.response.status_code in TRANSIENT_STATUS
    return isinstance(exc, (httpx2.TransportError, ConnectionError))


def with_retries(fn: Callable[[], T], retry: Retry, wait: Callable[[float], object] = time.sleep) -> T:
    """fn() until it succeeds or fails for good; the last transient failure is re-raised after the last try.
    `wait(seconds)` sleeps between tries (a stop event's wait, to cancel the backoff)."""
    delays = retry.delays()
    while True:
        try:
            return fn()
        except Exception as e:
            if not is_transient(e):
                raise
            d = next(delays, None)
            if d is None:
                raise
            if wait(d) is True:  # Event.wait returns True when stopped
                raise


def _status(exc) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


@contextlib.contextmanager
def hub_errors(cfg: HubConfig, repo_id: str, revision: str | None, path: str | None = None) -> Iterator[None]:
    """Turn whatever the client raises inside into one typed line naming the repo (and file)."""
    import httpx2
    from huggingface_hub import errors as hf

    what = f"{repo_id}@{revision}" if revision else repo_id
    where = f"{what}/{path}" if path else what
    page = f"{cfg.endpoint}/{repo_id}"
    try:
        yield
    except RtnqError:
        raise
    except hf.GatedRepoError:
        raise CheckpointError(f"{repo_id} is a gated model and this token has no access to it: accept its licence on "
                              f"{page} and set HF_TOKEN (or run `hf auth login`)") from None
    except hf.RepositoryNotFoundError:
        raise UsageError(f"{repo_id}: no such model on {cfg.endpoint} (a private model needs HF_TOKEN "
                         "set to a token that can read it)") from None
    except hf.RevisionNotFoundError:
        raise UsageError(f"{what}: {repo_id} has no revision {revision!r}; pass a branch, tag or commit of it") from None
    except hf.RemoteEntryNotFoundError:
        raise CheckpointError(f"{where}: the hub has no such file; the model's file list or index is "
                              "inconsistent") from None
    except (hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled):
        raise offline_error(cfg, what, path) from None
    except hf.HfHubHTTPError as e:
        status = _status(e)
        if status in (401, 403):
            raise CheckpointError(f"{where}: the hub refused access (HTTP {status}); if the model is gated, accept its "
                                  f"licence on {page}, and set HF_TOKEN to a token that can read it") from None
        raise CheckpointError(f"{where}: the hub answered HTTP {status} ({_first_line(e)}); try again "
                              "later") from None
    except (httpx2.TransportError, ConnectionError) as e:
        raise CheckpointError(f"{where}: cannot reach {cfg.endpoint} ({type(e).__name__}: {_first_line(e)}); check "
                              "the network, or set HF_HUB_OFFLINE=1 to use the cache") from None


def offline_error(cfg: HubConfig, what: str, path: str | None = None) -> CheckpointError:
    item = f"{path} of {what}" if path else what
    return CheckpointError(f"offline (HF_HUB_OFFLINE=1) and {item} is not in the cache {cfg.cache_dir}; run once "
                           f"online, or `hf download {what.split('@')[0]}`, then retry")
