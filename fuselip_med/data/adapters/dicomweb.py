"""A PACS as a data source over DICOMweb (DICOM PS3.18): QIDO-RS finds the series, WADO-RS fetches their
instances into a local content-addressed cache, and the cached files are read like any DICOM file.

Client: ``dicomweb-client`` (one ``DICOMwebClient`` per worker thread over a ``requests`` session). Requests are
made by at most ``max_concurrent`` threads. Connection refused, timeouts and 5xx answers are retried with
exponential backoff (``RetryPolicy``), then end in one ``DicomwebError`` line naming the server and what was being
fetched; 401/403 end at once (``DicomwebAuthError``), so a wrong password never becomes a retry storm.

Credentials: HTTP basic with the user from ``user`` or the URL (``https://user@host/dicom-web``) and the password
only from ``FUSELIP_MED_DICOMWEB_PASSWORD`` or a netrc file, or a bearer token from ``FUSELIP_MED_DICOMWEB_TOKEN``.
They live only in the session: messages name the server without them, and nothing is written to disk. TLS is
verified (``ca_bundle`` for a private CA); ``insecure=True`` turns that off with a warning.

Cache layout (``sync_instances``)::

    <cache>/objects/<h[:2]>/<h>.dcm   the retrieved instance, h = sha256 of its bytes (content-addressed)
    <cache>/state.json                salt + {instance key: {sha256, series key, study key}}

Keys are salted sha256 hashes of the SOP Instance / Series / Study Instance UIDs (one random salt per cache),
so the state, the index and every output built from it carry no real UID. A rerun lists the server again,
fetches only instances whose key the state lacks and forgets instances the server no longer has; the state is
saved as instances arrive, so a killed fetch resumes where it stopped.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ...errors import UserError
from ...io import atomic_write_bytes, atomic_write_json
from ..hashing import content_hash
from ..schema import Sample, SampleSide
from . import ListSource, register_adapter

__all__ = [
    "PASSWORD_ENV", "TOKEN_ENV", "CachedInstance", "DicomwebAuthError", "DicomwebError", "DicomwebQuery",
    "DicomwebOptions", "DicomwebServer", "INDEX_CACHE", "RetryPolicy", "SyncReport", "cached_instances", "dicomweb",
    "display_url", "instance_samples", "open_server", "sync_instances",
]

log = logging.getLogger(__name__)

PASSWORD_ENV = "FUSELIP_MED_DICOMWEB_PASSWORD"
TOKEN_ENV = "FUSELIP_MED_DICOMWEB_TOKEN"
STATE = "state.json"
INDEX_CACHE = ".dicomweb"  # the cache folder inside a search index built with --dicomweb
# DICOM JSON tags (PS3.18 F.2): the UIDs a QIDO-RS answer carries.
STUDY_UID, SERIES_UID, SOP_UID, STUDY_DESCRIPTION = "0020000D", "0020000E", "00080018", "00081030"
# WADO-RS Accept: the instance in the transfer syntax the server stores it in (PS3.18 8.7.3.5.2: "*"), so the
# cached bytes are the stored ones and no lossy or unsupported transcoding happens on the server.
AS_STORED = (("application/dicom", "*"),)
_DATE_RANGE = re.compile(r"^(\d{8})?(-(\d{8})?)?$")


class DicomwebError(UserError, OSError):
    """The DICOMweb server could not be reached or failed; one line naming the server and what was fetched."""


class DicomwebAuthError(DicomwebError):
    """The server refused the credentials (HTTP 401) or the access (403); never retried."""


@dataclass(frozen=True)
class DicomwebQuery:
    """Which series to take (QIDO-RS ``/series`` matching keys, PS3.18 8.3.4 / 10.6).

    ``modality``: e.g. ``CT`` (Modality); ``study_date``: ``YYYYMMDD`` or a range ``YYYYMMDD-YYYYMMDD`` (either
    end may be open, PS3.4 C.2.2.2.5); ``study_description``: a case-insensitive substring of StudyDescription,
    matched here on the answers (``includefield``), because servers differ in wildcard matching (Orthanc 1.10
    does not decode a percent-encoded ``*``); ``limit``: at most this many series. Raises ``DicomwebError`` for
    a malformed date range or a limit below 1.
    """

    modality: str | None = None
    study_date: str | None = None
    study_description: str | None = None
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.study_date is not None and not _DATE_RANGE.match(self.study_date):
            raise DicomwebError(f"--study-date {self.study_date!r}: give YYYYMMDD or YYYYMMDD-YYYYMMDD.")
        if self.limit is not None and self.limit < 1:
            raise DicomwebError(f"--limit {self.limit}: give at least 1.")

    def filters(self) -> dict[str, str]:
        """The QIDO-RS matching parameters (the description is matched by ``matches``)."""
        out = {}
        if self.modality:
            out["Modality"] = self.modality.upper()
        if self.study_date:
            out["StudyDate"] = self.study_date
        return out

    def matches(self, series: dict) -> bool:
        """Whether a QIDO-RS series answer (DICOM JSON) has the wanted StudyDescription substring."""
        if not self.study_description:
            return True
        described = series.get(STUDY_DESCRIPTION, {}).get("Value") or [""]
        return self.study_description.lower() in str(described[0]).lower()

    def describe(self) -> str:
        parts = [f"{k}={v}" for k, v in self.filters().items()]
        if self.study_description:
            parts.append(f"StudyDescription contains {self.study_description!r}")
        return ", ".join(parts) or "all"


@dataclass(frozen=True)
class RetryPolicy:
    """Tries per request (``attempts`` >= 1) and the backoff before try ``n`` (``backoff_s * 2 ** (n - 2)`` s)."""

    attempts: int = 4
    backoff_s: float = 0.5
    timeout_s: float = 30.0

    def delays(self) -> list[float]:
        return [self.backoff_s * 2 ** n for n in range(self.attempts - 1)]


def _split(url: str):
    """``(parts, "host[:port]")`` of an http(s) URL, or None when it has no host or cannot be parsed (a port out of
    0-65535 or not a number, an unclosed IPv6 bracket: ``urllib.parse`` raises ValueError for those)."""
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    except ValueError:
        return None
    return (parts, host) if parts.hostname else None


def _strip_userinfo(url: str) -> tuple[str, str | None, bool]:
    """(URL without user/password, user from the URL, whether the URL carried a password)."""
    split = _split(url)
    if split is None or split[0].scheme not in ("http", "https"):
        raise DicomwebError(f"--dicomweb {display_url(url)}: give an http(s) URL of the DICOMweb root, e.g. "
                            "https://pacs.example.org/dicom-web (a port from 1 to 65535).")
    parts, host = split
    return urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", "")), parts.username, parts.password is not None


def display_url(url: str) -> str:
    """``url`` without any user, password, query or fragment (for messages); "the given URL" when it has no host
    or cannot be parsed."""
    split = _split(url)
    return urlunsplit((split[0].scheme, split[1], split[0].path, "", "")) if split else "the given URL"


class DicomwebServer:
    """A DICOMweb root with its credentials and TLS settings; makes one ``DICOMwebClient`` per thread.

    ``url``: the DICOMweb root (``https://pacs/dicom-web``; a user in it is taken as the basic-auth user, a
    password in it is refused); ``user`` overrides the URL's. ``ca_bundle``: CA file for TLS verification;
    ``insecure``: no TLS verification (a warning is logged). Raises ``DicomwebError`` for a bad URL, a password
    in the URL, or a user without a password (environment or netrc).
    """

    def __init__(self, url: str, *, user: str | None = None, ca_bundle: str | os.PathLike | None = None,
                 insecure: bool = False, retry: RetryPolicy = RetryPolicy()):
        self.url, url_user, has_password = _strip_userinfo(url)
        if has_password:
            raise DicomwebError(f"--dicomweb {self.url}: do not put the password in the URL; set "
                                f"{PASSWORD_ENV} or use a netrc file.")
        self.retry = retry
        self._auth, self._headers = self._credentials(user or url_user)
        if ca_bundle is not None and not Path(ca_bundle).is_file():
            raise DicomwebError(f"--ca-bundle {ca_bundle}: no such file.")
        self._verify: bool | str = False if insecure else (os.fspath(ca_bundle) if ca_bundle else True)
        if insecure:
            log.warning("TLS certificate verification is off for %s (--insecure): anyone on the network path "
                        "can read and alter the traffic.", self.url)
        self._local = threading.local()

    def _credentials(self, user: str | None) -> tuple[tuple[str, str] | None, dict[str, str]]:
        token = os.environ.get(TOKEN_ENV)
        if token:
            return None, {"Authorization": f"Bearer {token}"}
        password = os.environ.get(PASSWORD_ENV)
        if password is None:
            import netrc

            host = urlsplit(self.url).hostname or ""
            try:
                found = netrc.netrc().authenticators(host)
            except (FileNotFoundError, netrc.NetrcParseError, OSError):
                found = None
            if found is not None and (user is None or found[0] == user):
                user, password = found[0], found[2]
        if user is None:
            return None, {}
        if password is None:
            raise DicomwebError(f"{self.url}: user {user!r} has no password; set {PASSWORD_ENV} or add the "
                                "host to your netrc file.")
        return (user, password), {}

    def client(self):
        """This thread's ``dicomweb_client.DICOMwebClient`` (its own session; the library's retry is off, ours
        covers refused connections and every 5xx)."""
        client = getattr(self._local, "client", None)
        if client is None:
            import requests
            from dicomweb_client import DICOMwebClient

            session = requests.Session()
            session.auth = self._auth
            session.verify = self._verify
            client = DICOMwebClient(self.url, session=session, headers=dict(self._headers),
                                    timeout=self.retry.timeout_s)
            client.set_http_retry_params(retry=False)
            self._local.client = client
        return client

    def call(self, what: str, request: Callable[[Any], Any], *,
             then: str = "rerun the same command to continue (instances already fetched are kept)") -> Any:
        """``request(client)`` with the retry policy; ``what`` says what is being done and ``then`` what the user
        can do after the last try failed (for the message).

        Raises ``DicomwebAuthError`` on 401/403 (no retry) and ``DicomwebError`` when every try failed.
        """
        import requests

        delays = self.retry.delays()
        for attempt in range(self.retry.attempts):
            try:
                return request(self.client())
            except requests.HTTPError as error:
                status = error.response.status_code if error.response is not None else 0
                if status in (401, 403):
                    word = "rejected the credentials (HTTP 401)" if status == 401 else "refused access (HTTP 403)"
                    raise DicomwebAuthError(f"{self.url} {word} while {what}; check --user and {PASSWORD_ENV} "
                                            f"(or {TOKEN_ENV}).") from None
                if status < 500:
                    raise DicomwebError(f"{self.url} answered HTTP {status} while {what}.") from None
                reason = f"HTTP {status}"
            except requests.exceptions.SSLError as error:
                raise DicomwebError(f"{self.url}: TLS verification failed while {what} ({type(error).__name__}); "
                                    "give the server's CA with --ca-bundle.") from None
            except requests.ConnectionError:
                reason = "connection refused or lost"
            except requests.Timeout:
                reason = f"no answer within {self.retry.timeout_s:g} s"
            if attempt < len(delays):
                log.debug("%s: %s while %s; retrying in %.1f s", self.url, reason, what, delays[attempt])
                time.sleep(delays[attempt])
        raise DicomwebError(f"{self.url}: {reason} while {what}, after {self.retry.attempts} tries; {then}.")


@dataclass(frozen=True)
class CachedInstance:
    """One retrieved instance: salted keys of its SOP Instance, Series and Study Instance UIDs, the sha256 of
    its bytes and its cache file."""

    key: str
    series: str
    study: str
    sha256: str
    path: Path


@dataclass
class SyncReport:
    """The instances now in the cache (sorted by series, then key) and what this sync fetched and dropped."""

    instances: list[CachedInstance]
    fetched: int = 0
    dropped: int = 0
    series: int = 0


def _uid(record: dict, tag: str) -> str:
    return record[tag]["Value"][0]


class _State:
    """``state.json`` of a cache: the salt and the fetched instances (written atomically)."""

    def __init__(self, cache: Path):
        self.path = cache / STATE
        data = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.salt: str = data.get("salt") or secrets.token_hex(16)
        self.instances: dict[str, dict[str, str]] = data.get("instances", {})
        self._lock = threading.Lock()
        self._last_save = 0.0

    def key(self, uid: str) -> str:
        """Salted sha256 of a UID, 24 hex digits."""
        return hashlib.sha256(f"{self.salt}:{uid}".encode()).hexdigest()[:24]

    def add(self, key: str, record: dict[str, str]) -> None:
        with self._lock:
            self.instances[key] = record
            if time.monotonic() - self._last_save > 1.0:
                self._save_locked()

    def save(self) -> None:
        with self._lock:
            self._save_locked()

    def _save_locked(self) -> None:
        atomic_write_json(self.path, {"salt": self.salt, "instances": self.instances}, indent=None)
        self._last_save = time.monotonic()


def _object_path(cache: Path, sha256: str) -> Path:
    return cache / "objects" / sha256[:2] / f"{sha256}.dcm"


def _dataset_bytes(dataset) -> bytes:
    """A retrieved instance as a DICOM Part 10 file (PS3.10: preamble, file meta, data set)."""
    import pydicom

    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, dataset, enforce_file_format=True)
    return buffer.getvalue()


def sync_instances(server: DicomwebServer, query: DicomwebQuery, cache: str | os.PathLike, *,
                   max_concurrent: int = 4, progress: bool = True) -> SyncReport:
    """Make ``cache`` hold exactly the instances of the series ``query`` finds on ``server``.

    QIDO-RS lists the series and then each series' instances; WADO-RS retrieves the instances the cache lacks
    (by salted SOP Instance UID key), ``max_concurrent`` requests at a time; instances gone from the server are
    dropped (their files too, unless another instance has the same bytes). Raises ``DicomwebError`` /
    ``DicomwebAuthError`` (what was fetched before is kept and reused by the next call).
    """
    if max_concurrent < 1:
        raise DicomwebError(f"--max-concurrent {max_concurrent}: give at least 1.")
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    state = _State(cache)
    server_limit = None if query.study_description else query.limit
    series = server.call(f"searching series ({query.describe()}) with QIDO-RS",
                         lambda c: c.search_for_series(search_filters=query.filters(), fields=[STUDY_DESCRIPTION],
                                                       limit=server_limit, get_remaining=server_limit is None))
    series = [s for s in series if query.matches(s)][: query.limit]
    listing: list[tuple[str, str, str]] = []  # (study UID, series UID, SOP Instance UID)
    with ThreadPoolExecutor(max_concurrent) as pool:
        jobs = [pool.submit(server.call, f"listing the instances of series {n + 1} of {len(series)} with QIDO-RS",
                            lambda c, s=s: c.search_for_instances(_uid(s, STUDY_UID), _uid(s, SERIES_UID),
                                                                  get_remaining=True))
                for n, s in enumerate(series)]
        for job in jobs:
            listing.extend((_uid(r, STUDY_UID), _uid(r, SERIES_UID), _uid(r, SOP_UID)) for r in job.result())
    wanted = {state.key(sop): (study, series_uid, sop) for study, series_uid, sop in listing}
    missing = [uids for key, uids in sorted(wanted.items()) if key not in state.instances
               or not _object_path(cache, state.instances[key]["sha256"]).is_file()]
    report = SyncReport(instances=[], series=len(series))

    def fetch(number: int, uids: tuple[str, str, str]) -> None:
        study, series_uid, sop = uids
        dataset = server.call(f"retrieving instance {number + 1} of {len(missing)} with WADO-RS",
                              lambda c: c.retrieve_instance(study, series_uid, sop, media_types=AS_STORED))
        data = _dataset_bytes(dataset)
        digest = content_hash(data)
        target = _object_path(cache, digest)
        if not target.is_file():
            atomic_write_bytes(target, data)
        state.add(state.key(sop), {"sha256": digest, "series": state.key(series_uid), "study": state.key(study)})

    bar = _progress(progress)
    with bar, ThreadPoolExecutor(max_concurrent) as pool:
        task = bar.add_task("fetching instances (WADO-RS)", total=len(missing))
        try:
            for job in as_completed([pool.submit(fetch, n, uids) for n, uids in enumerate(missing)]):
                job.result()
                report.fetched += 1
                bar.advance(task)
        except BaseException:
            pool.shutdown(cancel_futures=True)
            state.save()
            raise
    gone = [key for key in state.instances if key not in wanted]
    for key in gone:
        del state.instances[key]
    report.dropped = len(gone)
    _remove_unreferenced(cache, {r["sha256"] for r in state.instances.values()})
    state.save()
    report.instances = cached_instances(cache)
    return report


def cached_instances(cache: str | os.PathLike) -> list[CachedInstance]:
    """The instances a finished ``sync_instances`` left in ``cache`` (empty when there is none), without asking
    the server: for the other processes of a multi-process build and for reading hits back (KOS, viewer links)."""
    cache = Path(cache)
    state = _State(cache)
    return sorted((CachedInstance(key, r["series"], r["study"], r["sha256"], _object_path(cache, r["sha256"]))
                   for key, r in state.instances.items()), key=lambda i: (i.series, i.key))


def _remove_unreferenced(cache: Path, keep: set[str]) -> None:
    for path in (cache / "objects").glob("*/*.dcm"):
        if path.stem not in keep:
            path.unlink()


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    from fuselip_med.progress import new_progress

    return new_progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        enabled=enabled, transient=True)


@dataclass(frozen=True)
class DicomwebOptions:
    """The adapter's options as the CLI and recipes give them (see ``DicomwebServer`` and ``DicomwebQuery``)."""

    cache: str
    user: str | None = None
    ca_bundle: str | None = None
    insecure: bool = False
    modality: str | None = None
    study_date: str | None = None
    study_description: str | None = None
    max_concurrent: int = 4
    retries: int = 4


def open_server(url: str, options: DicomwebOptions) -> DicomwebServer:
    """``DicomwebServer`` for ``url`` with the options' credentials user, CA bundle, TLS switch and retries."""
    return DicomwebServer(url, user=options.user, ca_bundle=options.ca_bundle, insecure=options.insecure,
                          retry=RetryPolicy(attempts=max(1, options.retries)))


@register_adapter("dicomweb")
def dicomweb(path: str, split: str = "train", limit: int | None = None, strict: bool = False, *,
             cache: str, progress: bool = True, **options: Any) -> ListSource:
    """Image samples of the series a DICOMweb server holds (``path`` = the DICOMweb root URL).

    ``cache``: the local folder the instances are fetched into (required; reused across runs). ``limit``: at most
    this many series. ``options``: ``DicomwebOptions`` fields (user, ca_bundle, insecure, modality, study_date,
    study_description, max_concurrent, retries). One sample per instance: ``id`` = the salted instance key,
    ``query.image`` = the cached file, ``group`` = the salted series key (hard negatives stay in one series).
    ``split`` and ``strict`` are accepted for the adapter interface; a server has no splits. Raises
    ``DicomwebError``/``DicomwebAuthError`` and ``TypeError`` for an unknown option.
    """
    known = {f.name for f in dataclasses.fields(DicomwebOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"dicomweb adapter: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    settings = DicomwebOptions(cache=cache, **options)
    query = DicomwebQuery(settings.modality, settings.study_date, settings.study_description, limit)
    report = sync_instances(open_server(path, settings), query, cache, max_concurrent=settings.max_concurrent,
                            progress=progress)
    return ListSource(instance_samples(report.instances), name="dicomweb")


def instance_samples(instances: Sequence[CachedInstance]) -> list[Sample]:
    """One image ``Sample`` per cached instance (id = instance key, group = series key)."""
    return [Sample(id=i.key, source="dicomweb", query=SampleSide(image=str(i.path)), group=i.series,
                   meta={"series": i.series, "study": i.study, "path": str(i.path)}) for i in instances]
