"""Loading from the Hugging Face hub: one error, with the way out, when the hub cannot give the data.

Every loader that may reach the hub (text data sets and pretrained tokenizers in
:mod:`~seqpe_nd.tasks.data.text`, SQuAD in :mod:`~seqpe_nd.tasks.data.qa_sources`, ImageNet in
:mod:`~seqpe_nd.tasks.data.vision`) wraps that call in :func:`hub_dataset` or :func:`hub_tokenizer`.
When the hub cannot be reached and nothing is cached, or the repository is gated or does not exist,
the libraries' errors become one :class:`HubUnavailableError` whose one-line message names the config
field and its value, the library's reason, and the ways out: local files (the exact config fields)
or a cache filled on a machine with internet plus the hub's offline mode. Any other error passes
through unchanged.

What the libraries raise (``datasets`` 5.2, ``huggingface_hub`` 2.4, ``transformers`` 5.24), all
``OSError`` subclasses:

- ``datasets.load_dataset`` / ``load_dataset_builder``: the builtin ``ConnectionError`` ("Couldn't reach
  'wikitext' on the Hub (LocalEntryNotFoundError)", after ~23 s of retries; at once under
  ``HF_HUB_OFFLINE=1``, where it says ``OfflineModeIsEnabled``); ``datasets.exceptions.DatasetNotFoundError``
  (a ``FileNotFoundError``) for a gated data set (from ``GatedRepoError``), an unknown one (from
  ``RepositoryNotFoundError``) or an unknown revision.
- ``AutoTokenizer.from_pretrained``: a plain ``OSError`` raised from ``LocalEntryNotFoundError`` (hub
  unreachable, after ~46 s of retries, or offline; files not cached), ``GatedRepoError``,
  ``RepositoryNotFoundError`` or ``HFValidationError`` (a name that is neither a local directory nor a
  valid repository id).
- ``huggingface_hub`` itself: ``OfflineModeIsEnabled`` (a ``ConnectionError``), ``LocalEntryNotFoundError``
  (a ``FileNotFoundError``), ``RepositoryNotFoundError`` / ``GatedRepoError`` (``HfHubHTTPError``, an ``OSError``).

So an ``OSError`` is translated exactly when it, or an error it was raised from, is one of these.
"""

import logging
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

OFFLINE_ENV = "HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1"
"""The hub's offline mode: the libraries use their cache and never try the network (no retries)."""
_RETRY_LOGGER = "huggingface_hub.utils._http"
"""Where the hub client logs its retries (``'...' thrown while requesting HEAD ...``, ``Retrying in 1s ...``)."""


class HubUnavailableError(ValueError):
    """A data set or tokenizer a config names could not be had from the Hugging Face hub: unreachable and
    not cached, gated, or not found. A ``ValueError``, so the CLI prints it as one line (exit status 2)."""

    def __init__(self, message: str, *, field: str, name: str) -> None:
        super().__init__(message)
        self.field = field
        """The config field that names it (``data.dataset``, ``data.hf_name``, ``data.tokenizer`` ...)."""
        self.name = name
        """Its value: the data set or tokenizer name."""


def _hub_error_types() -> tuple[type[BaseException], ...]:
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    # ConnectionError covers huggingface_hub's OfflineModeIsEnabled; RepositoryNotFoundError covers GatedRepoError.
    types: list[type[BaseException]] = [ConnectionError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        HFValidationError]
    if "datasets" in sys.modules:  # not imported: none of its errors can have been raised
        from datasets.exceptions import DatasetNotFoundError

        types.append(DatasetNotFoundError)
    return tuple(types)


def _chain(err: BaseException) -> Iterator[BaseException]:
    """``err`` and the errors it was raised from (``raise ... from``), outermost first."""
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__


def hub_failure(err: BaseException) -> bool:
    """Whether ``err`` (or an error it was raised from) says the hub could not give the files: unreachable or
    offline and not cached, gated, not found."""
    kinds = _hub_error_types()
    return any(isinstance(e, kinds) for e in _chain(err))


class _Hold(logging.Filter):
    """Keeps the records it sees instead of letting them through."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.records.append(record)
        return False


def _reason(err: BaseException) -> str:
    text = " ".join(str(err).split()) or "no message"
    if len(text) > 200:
        text = text[:197] + "..."
    return f"{type(err).__name__}: {text}"


def _gated(err: BaseException, url: str) -> str:
    from huggingface_hub.errors import GatedRepoError

    if any(isinstance(e, GatedRepoError) for e in _chain(err)):
        return f" It is gated: ask for access at {url} and log in there with `hf auth login` before downloading."
    return ""


@contextmanager
def _translated(head: str, ways: str, *, field: str, name: str, url: str) -> Iterator[None]:
    """Raise the call's hub failure as ``head (reason). [gated note] ways``; let every other error pass.

    The hub client logs two warnings per retry of an unreachable host (~11 lines before it gives up): they
    are held back during the call, dropped when it fails for want of the hub (the one line says it all),
    and logged after it otherwise.
    """
    logger = logging.getLogger(_RETRY_LOGGER)
    hold = _Hold()
    logger.addFilter(hold)
    try:
        yield
    except OSError as err:
        if not hub_failure(err):
            raise
        hold.records.clear()
        message = f"{head} ({_reason(err)}).{_gated(err, url)} {ways}"
        raise HubUnavailableError(message, field=field, name=name) from err
    finally:
        logger.removeFilter(hold)
        for record in hold.records:
            logger.handle(record)


def hub_dataset(field: str, name: str, *, config: str | None = None, local: str | None) -> AbstractContextManager[None]:
    """Around a ``datasets.load_dataset(name, config, ...)`` call: its hub failures become :class:`HubUnavailableError`.

    ``field``: the config field naming the data set (``data.dataset``; its configuration, ``config``, is the
    field ``<field>_config``); ``local``: how to read local files instead, with the exact fields (None: no such
    alternative, e.g. a section inherited from another run).
    """
    stated = f" ({field}_config = {config!r})" if config is not None else ""
    args = repr(name) if config is None else f"{name!r}, {config!r}"
    download = (
        f"download it once on a machine with internet (python -c \"import datasets; datasets.load_dataset({args})\", "
        f"with HF_HOME or HF_DATASETS_CACHE on storage this node also sees) and set {OFFLINE_ENV} here, "
        "so that the cache is used"
    )
    ways = f"Either {local}, or {download}." if local else f"To use it, {download}."
    head = f"{field} = {name!r}{stated}: the data set cannot be loaded from the Hugging Face hub"
    return _translated(head, ways, field=field, name=name, url=f"https://huggingface.co/datasets/{name}")


def hub_tokenizer(field: str, name: str, *, local: bool = True) -> AbstractContextManager[None]:
    """Around ``AutoTokenizer.from_pretrained(name)``: its hub failures become :class:`HubUnavailableError`.

    ``local``: offer a local tokenizer directory as a value of ``field`` (False where the field is fixed
    by another run, as a QA run's ``lm_data``)."""
    download = (
        "download it once on a machine with internet (python -c \"from transformers import AutoTokenizer; "
        f"AutoTokenizer.from_pretrained({name!r})\", with HF_HOME on storage this node also sees) and set "
        f"{OFFLINE_ENV} here, so that the cache is used"
    )
    directory = (
        f"set {field}: DIR, a local directory holding the tokenizer (written where there is internet by "
        f"AutoTokenizer.from_pretrained({name!r}).save_pretrained(DIR))"
    )
    ways = f"Either {directory}, or {download}." if local else f"To use it, {download}."
    head = f"{field} = {name!r} is not a local directory and cannot be loaded from the Hugging Face hub"
    return _translated(head, ways, field=field, name=name, url=f"https://huggingface.co/{name}")
