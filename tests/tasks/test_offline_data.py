"""Offline (a cluster node without internet): a data set or tokenizer the hub cannot give is one
HubUnavailableError naming the field, the data set and the ways out; at the CLI one line, exit 2, no run directory.

No network is used: ``offline`` switches the libraries to the hub's offline mode in this process (what
``HF_HUB_OFFLINE=1`` does), where they raise their real errors at once; names that exist nowhere keep a
filled cache out of it. Gated and unknown repositories are the libraries' own exception classes, raised
by a patched ``load_dataset`` / ``AutoTokenizer.from_pretrained`` as those functions raise them.
"""

import json
import logging
from collections.abc import Callable
from pathlib import Path

import datasets
import httpx2
import huggingface_hub.constants
import pytest
import transformers
from datasets.exceptions import DatasetNotFoundError
from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

import seqpe_nd.tasks.cli.train as cli_train
from seqpe_nd.tasks.cli import main
from seqpe_nd.tasks.data.hub import HubUnavailableError, hub_dataset
from seqpe_nd.tasks.data.qa import QADataConfig
from seqpe_nd.tasks.data.qa_sources import SquadQA
from seqpe_nd.tasks.data.text import TextDataConfig, load_pretrained_tokenizer, load_tokenizer, prepare_text
from seqpe_nd.tasks.data.vision import ImageSource, VisionDataConfig
from seqpe_nd.tasks.engine.trainer import TrainConfig
from seqpe_nd.tasks.recipes import lm, qa
from tests.tasks.test_lm import tiny_config as lm_config
from tests.tasks.test_vit_recipe import tiny_config as vit_config

MISSING = "seqpe-nd-tests/no-such-repo"  # on no hub and in no cache
OFFLINE_WAY = ("HF_HUB_OFFLINE=1", "HF_DATASETS_OFFLINE=1", "HF_HOME", "on a machine with internet")


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_HUB_OFFLINE=1 for the libraries already imported (they read it at import)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)


def assert_one_line(err: HubUnavailableError, field: str, name: str, *ways: str) -> str:
    message = str(err)
    assert isinstance(err, ValueError) and (err.field, err.name) == (field, name)
    assert "\n" not in message and message.startswith(f"{field} = {name!r}")
    for way in (*ways, *OFFLINE_WAY):
        assert way in message, (way, message)
    return message


# --- each loader, with the libraries' real offline errors ---------------------------------------------------

def test_text_data_set(offline: None, tmp_path: Path) -> None:
    cfg = TextDataConfig(source="hf", dataset=MISSING, dataset_config="raw", cache_dir=tmp_path)
    with pytest.raises(HubUnavailableError) as info:
        prepare_text(cfg)
    message = assert_one_line(
        info.value, "data.dataset", MISSING, "(data.dataset_config = 'raw')",
        "data.source: files with data.data_files: [a.txt, ...] or {train: [...], validation: [...], test: [...]}",
        f"datasets.load_dataset({MISSING!r}, 'raw')",
    )
    assert "ConnectionError" in message and "OfflineModeIsEnabled" in message  # the library's reason
    assert isinstance(info.value.__cause__, ConnectionError)
    assert [p.suffix for p in (tmp_path / "text").iterdir()] == [".lock"]  # no half-made corpus entry
    # A QA run's lm_data is the LM run's: no local-files way out (it would no longer match the LM run).
    with pytest.raises(HubUnavailableError) as info:
        load_tokenizer(cfg, section="lm_data")
    message = assert_one_line(info.value, "lm_data.dataset", MISSING, "(lm_data.dataset_config = 'raw')")
    assert "source: files" not in message


def test_pretrained_tokenizer(offline: None) -> None:
    with pytest.raises(HubUnavailableError) as info:
        load_pretrained_tokenizer(MISSING)
    saved = f"AutoTokenizer.from_pretrained({MISSING!r}).save_pretrained(DIR)"
    message = assert_one_line(info.value, "data.tokenizer", MISSING, "is not a local directory",
                              "set data.tokenizer: DIR", saved)
    cause = info.value.__cause__
    assert type(cause) is OSError and isinstance(cause.__cause__, LocalEntryNotFoundError)  # transformers' wrapping
    assert "OSError: We couldn't connect to" in message
    with pytest.raises(HubUnavailableError) as info:
        load_pretrained_tokenizer(MISSING, section="lm_data")
    assert "set lm_data.tokenizer" not in assert_one_line(info.value, "lm_data.tokenizer", MISSING)


def test_squad(offline: None) -> None:
    with pytest.raises(HubUnavailableError) as info:
        SquadQA(QADataConfig(source="hf", dataset=MISSING))
    assert_one_line(info.value, "data.dataset", MISSING,
                    "data.source: files with data.data_files: {train: [train.jsonl], validation: [dev.jsonl]}",
                    "question, context and answers", f"datasets.load_dataset({MISSING!r})")


def test_imagenet(offline: None) -> None:
    with pytest.raises(HubUnavailableError) as info:
        ImageSource(VisionDataConfig(source="hf", hf_name=MISSING), "validation", 0)
    assert_one_line(info.value, "data.hf_name", MISSING, "data.source: imagefolder with data.root: DIR",
                    "DIR/train/<class>/", "DIR/validation/<class>/", "data.val_split: val")


# --- gated, unknown, unreachable: the exceptions the libraries raise online ---------------------------------

def _http_error(cls: type, status: int, url: str) -> Exception:
    return cls(f"{status} Client Error", response=httpx2.Response(status, request=httpx2.Request("GET", url)))


def _raising(make: Callable[[], BaseException]) -> Callable[..., None]:
    def load(*args: object, **kwargs: object) -> None:
        raise make()
    return load


def _chained(outer: BaseException, inner: BaseException) -> BaseException:
    outer.__cause__ = inner
    return outer


URL = f"https://huggingface.co/datasets/{MISSING}/resolve/main/README.md"
DATASET_ERRORS = {  # as datasets.load.dataset_module_factory raises them
    "gated": lambda: _chained(
        DatasetNotFoundError(f"Dataset '{MISSING}' is a gated dataset on the Hub. "
                             "You must be authenticated to access it."),
        _http_error(GatedRepoError, 401, URL),
    ),
    "unknown": lambda: _chained(
        DatasetNotFoundError(f"Dataset '{MISSING}' doesn't exist on the Hub or cannot be accessed."),
        _http_error(RepositoryNotFoundError, 404, URL),
    ),
    "unreachable": lambda: _chained(  # what this machine, without internet, got for wikitext after ~23 s of retries
        ConnectionError(f"Couldn't reach '{MISSING}' on the Hub (LocalEntryNotFoundError)"),
        LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub"),
    ),
}


@pytest.mark.parametrize("kind", sorted(DATASET_ERRORS))
def test_gated_unknown_and_unreachable_data_sets(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets, "load_dataset", _raising(DATASET_ERRORS[kind]))
    with pytest.raises(HubUnavailableError) as info:
        ImageSource(VisionDataConfig(source="hf", hf_name=MISSING), "train", 0)
    message = assert_one_line(info.value, "data.hf_name", MISSING, "data.source: imagefolder")
    gated = f"It is gated: ask for access at https://huggingface.co/datasets/{MISSING} and log in there with `hf auth"
    assert (gated in message) is (kind == "gated")


def test_gated_tokenizer(monkeypatch: pytest.MonkeyPatch) -> None:
    def gated() -> BaseException:  # as transformers.utils.hub.cached_files wraps it
        url = f"https://huggingface.co/{MISSING}/resolve/main/config.json"
        return _chained(OSError("You are trying to access a gated repo."), _http_error(GatedRepoError, 403, url))

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", _raising(gated))
    with pytest.raises(HubUnavailableError) as info:
        load_pretrained_tokenizer(MISSING)
    message = assert_one_line(info.value, "data.tokenizer", MISSING)
    assert f"ask for access at https://huggingface.co/{MISSING} " in message


PASSING = [FileNotFoundError("Couldn't find any data file at /data/x."), PermissionError("cache"), OSError("disk full"),
           RuntimeError("a bug")]


@pytest.mark.parametrize("error", PASSING, ids=lambda e: type(e).__name__)
def test_other_errors_pass_through_unchanged(error: Exception) -> None:
    with pytest.raises(type(error)) as info, hub_dataset("data.dataset", MISSING, local=None):
        raise error
    assert info.value is error


def test_hub_retry_warnings_are_dropped_only_when_the_hub_failed(caplog: pytest.LogCaptureFixture) -> None:
    http = logging.getLogger("huggingface_hub.utils._http")
    with pytest.raises(HubUnavailableError), hub_dataset("data.dataset", MISSING, local=None):
        http.warning("Retrying in 1s [Retry 1/5].")
        raise ConnectionError(f"Couldn't reach '{MISSING}' on the Hub (LocalEntryNotFoundError)")
    assert "Retrying" not in caplog.text
    with hub_dataset("data.dataset", MISSING, local=None):
        http.warning("Retrying in 1s [Retry 1/5].")
    assert "Retrying in 1s" in caplog.text and not http.filters


# --- the CLI: one line, exit 2, nothing written --------------------------------------------------------------

@pytest.fixture(scope="module")
def lm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LM run directory (config + checkpoint) for QA runs to start from."""
    tmp = tmp_path_factory.mktemp("offline-lm")
    config = lm_config(tmp, pe={"method": "rope"})
    run = tmp / "lm"
    task = lm.LMRecipe.build_task(lm.LMConfig.parse(config), run)
    full = {**task.config_dict(), "train": TrainConfig(**config["train"]).model_dump(mode="json")}
    qa.ckpt.save_checkpoint(run, 1, model=task.build_model(), optimizer={}, rng={}, state={"world": 1}, config=full)
    qa.ckpt.atomic_write_text(run / "config.json", json.dumps(full))
    return run


def lm_hub_data(tmp: Path, lm_run: Path) -> dict:
    cfg = lm_config(tmp)
    cfg["data"] = {"source": "hf", "dataset": MISSING, "cache_dir": str(tmp / "cache")}
    return cfg


def lm_hub_tokenizer(tmp: Path, lm_run: Path) -> dict:
    cfg = lm_config(tmp)
    cfg["data"]["tokenizer"] = MISSING
    return cfg


def qa_hub_squad(tmp: Path, lm_run: Path) -> dict:
    return {"task": "qa", "init_from": str(lm_run), "data": {"source": "hf", "dataset": MISSING}, "train": {"steps": 1}}


def vit_hub_images(tmp: Path, lm_run: Path) -> dict:
    cfg = vit_config({"method": "rope"})
    cfg["data"] = {"source": "hf", "hf_name": MISSING, "num_classes": 2}
    return cfg


@pytest.mark.parametrize(
    ("make", "field"),
    [(lm_hub_data, "data.dataset"), (lm_hub_tokenizer, "data.tokenizer"), (qa_hub_squad, "data.dataset"),
     (vit_hub_images, "data.hf_name")],
    ids=["lm-text", "lm-tokenizer", "qa-squad", "vit-imagenet"],
)
def test_cli_train_is_one_line_exit_2_and_writes_no_run_directory(
    make: Callable[[Path, Path], dict], field: str, lm_run: Path, offline: None, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    built: list[str] = []
    train = cli_train.train

    def no_model(task: object, *args: object, **kwargs: object) -> object:
        def build_model() -> None:
            built.append(type(task).__name__)
            raise AssertionError("a model was built")

        task.build_model = build_model  # type: ignore[attr-defined]
        return train(task, *args, **kwargs)

    monkeypatch.setattr(cli_train, "train", no_model)
    config = tmp_path / "offline.yaml"
    config.write_text(json.dumps(make(tmp_path, lm_run)))  # JSON is YAML
    assert main(["train", str(config), "--run-dir", str(tmp_path / "run")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith(f"seqpe-nd train: error: {field} = {MISSING!r}"), err
    assert "HF_HUB_OFFLINE=1" in err
    assert not (tmp_path / "run").exists() and built == []  # no run directory, no model built
