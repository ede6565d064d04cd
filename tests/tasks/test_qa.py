"""The QA recipe: EM metrics, cached greedy decoding, answer-only loss, LM-run checks, a tiny fine-tune."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from seqpe_nd.tasks.recipes.base import EVAL_PNG
from seqpe_nd.tasks.engine.evaluation import EVAL_JSON
from seqpe_nd.positions import GridSpace
from seqpe_nd.positions.samplers import Shift
from seqpe_nd.tasks.recipes import lm
from seqpe_nd.tasks.recipes import qa
from seqpe_nd.tasks import recipes
from seqpe_nd.tasks.cli import main
from seqpe_nd.tasks.data.qa import IGNORE_INDEX, QAExample, collate_prompts, collate_train, contains_match, decode_answer, strict_match
from seqpe_nd.tasks.engine.decoding import answer_loss, greedy_generate
from seqpe_nd.tasks.data.text import train_bpe
from seqpe_nd.tasks.engine.trainer import TrainConfig, train
from tests.tasks.test_qa_data import CORPUS, DOCS

REPO = Path(__file__).resolve().parents[2]
SPACE = {
    "kind": "grid", "L": 64, "L_max": 2000,
    "contrastive": {"batch": 4, "num_candidates": 8, "mix": {"global": 0.4, "local": 0.6}, "hard_fraction": 0.25},
    "ood": {"num_starts": 4, "num_teachers": 8, "min_shift": 0.25},
    "shift": {"prob": 0.1},
}
SEQPE = {"method": "seqpe", "hidden": 32, "layers": 1, "heads": 2}
CONTEXT = 256  # the template alone is ~100 tokens with this small BPE


# --- metrics ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("generation", "answers", "em", "strict"),
    [
        (" 4821", ["4821"], True, True),
        ("4821", ["4821"], True, True),
        (" The code is 4821.", ["4821"], True, False),  # the paper's EM: contained
        (" PARIS", ["Paris"], True, False),  # lower-cased for EM, exact for strict
        (" Paris", ["Paris"], True, True),
        (" 48210", ["4821"], True, False),  # containment, as in the paper and RULER
        (" 482", ["4821"], False, False),
        ("", ["4821"], False, False),
        (" the town of Brook", ["Brook1", "the town of Brook"], True, True),  # any gold answer
        (" Lisbon\n", ["Lisbon"], True, True),  # surrounding white space does not count
    ],
)
def test_em_on_hand_written_cases(generation: str, answers: list[str], em: bool, strict: bool) -> None:
    assert contains_match(generation, answers) is em
    assert strict_match(generation, answers) is strict


def test_decode_answer_stops_at_eos() -> None:
    tok = train_bpe(["The code of Marlow is 4821."] * 10, 300)
    ids = tok.encode(" 4821") + [tok.eos_id] + tok.encode(" junk")
    assert decode_answer(tok, ids) == " 4821"


# --- model pieces on tiny random models ---------------------------------------------------------------

def _tiny_model(pe: dict, vocab: int = 97, seed: int = 0):
    cfg = lm.LMConfig.model_validate({
        "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 64, "dropout": 0.0, "init_std": 0.2},
        "space": SPACE, "pe": pe,
    })
    torch.manual_seed(seed)
    return lm.build_model(cfg, vocab_size=vocab, eos_id=0).eval()


def _example(prompt: list[int], answer: list[int] | None = None) -> QAExample:
    return QAExample(id="x", question="q", answers=("a",), prompt_ids=prompt, answer_ids=answer or [0], documents=("d",), document_answers=("a",), target="a",
                     gold_index=0, depth=0.0, budget=len(prompt) + len(answer or [0]))


@pytest.mark.parametrize("pe", [{"method": "nope"}, {"method": "ape_learn"}, {"method": "rope", "base": 1e6}, {"method": "alibi"}, SEQPE],
                         ids=lambda p: p["method"])
def test_cached_greedy_generation_equals_uncached_and_unpadded(pe: dict) -> None:
    model = _tiny_model(pe)
    g = torch.Generator().manual_seed(1)
    prompts = [_example(torch.randint(1, 97, (n,), generator=g).tolist()) for n in (90, 40, 71)]  # past the APE table
    batch = collate_prompts(prompts, pad_id=0)
    cached = greedy_generate(model, **batch, max_new_tokens=5, eos_id=-1, use_cache=True)
    full = greedy_generate(model, **batch, max_new_tokens=5, eos_id=-1, use_cache=False)
    assert cached.shape == (3, 5)
    assert torch.equal(cached, full)
    for r, p in enumerate(prompts):  # left padding with explicit positions == the prompt alone
        alone = collate_prompts([p], pad_id=0)
        assert torch.equal(greedy_generate(model, **alone, max_new_tokens=5, eos_id=-1), cached[r : r + 1])


def test_generation_stops_after_eos_in_every_row() -> None:
    model = _tiny_model({"method": "rope"})
    batch = collate_prompts([_example(list(range(1, 30))), _example(list(range(5, 20)))], pad_id=0)
    first = greedy_generate(model, **batch, max_new_tokens=6, eos_id=-1)
    eos = int(first[0, 1])  # make row 0's second token the end-of-text token
    out = greedy_generate(model, **batch, max_new_tokens=6, eos_id=eos)
    assert out[0, 1] == eos and bool((out[0, 1:] == eos).all())


def test_answer_loss_equals_full_cross_entropy_on_answer_tokens_only() -> None:
    model = _tiny_model({"method": "alibi"})
    examples = [_example(list(range(3, 40)), [7, 8, 0]), _example(list(range(10, 22)), [9, 0]), _example(list(range(5, 60)), [11, 12, 13, 0])]
    batch = collate_train(examples, pad_id=0)
    loss, count, _ = answer_loss(model, batch["input_ids"], batch["labels"])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], use_cache=False).logits
    want = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    assert count == 9
    torch.testing.assert_close(loss, want)


# --- the recipe on a tiny LM run ------------------------------------------------------------------------

def _lm_config(tmp: Path, pe: dict) -> dict:
    corpus = tmp / "corpus.txt"
    if not corpus.exists():
        corpus.write_text("\n\n".join(CORPUS))
    return {
        "task": "lm",
        "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 64, "dropout": 0.0},
        "data": {"source": "files", "data_files": [str(corpus)], "vocab_size": 2048, "cache_dir": str(tmp / "cache")},
        "space": SPACE, "pe": pe,
        "train": {"steps": 1, "batch_size": 8},
    }


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An LM run directory as the shared loop leaves it (config.json + a checkpoint) of a fresh SeqPE GPT-2.

    Written directly rather than trained: the QA recipe only reads the directory, and LM training
    is the LM recipe's business (and tests).
    """
    tmp = tmp_path_factory.mktemp("qa")
    config = _lm_config(tmp, SEQPE)
    run = tmp / "lm"
    task = lm.LMRecipe.build_task(lm.LMConfig.parse(config), run)
    torch.manual_seed(0)
    full = {**task.config_dict(), "train": TrainConfig(**config["train"]).model_dump(mode="json")}
    qa.ckpt.save_checkpoint(run, 1, model=task.build_model(), optimizer={}, rng={}, state={"world": 1}, config=full)
    qa.ckpt.atomic_write_text(run / "config.json", json.dumps(full))
    return run


def _qa_config(lm_run: Path, **extra) -> dict:
    return {
        "task": "qa", "init_from": str(lm_run), "context_length": CONTEXT,
        "train": {"steps": 20, "batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "eval_every": 10, "log_every": 10},
        "eval": {"num_examples": 4, "val_examples": 12, "lengths": [CONTEXT, 2 * CONTEXT]},
        **extra,
    }


def test_init_run_must_match_pe_and_tokenizer_naming_the_field(lm_run: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"pe\.hidden: LM run has 32, config has 48"):
        qa.QARecipe.build_task(qa.QAConfig.parse(_qa_config(lm_run, pe={**SEQPE, "hidden": 48})), tmp_path / "a")
    data = _lm_config(lm_run.parent, SEQPE)["data"]
    with pytest.raises(ValueError, match=r"lm_data\.vocab_size: LM run has 2048, config has 4096"):
        qa.QARecipe.build_task(qa.QAConfig.parse(_qa_config(lm_run, lm_data={**data, "vocab_size": 4096})), tmp_path / "b")
    with pytest.raises(ValueError, match=r"lm_data\.tokenizer: LM run has 'bpe', config has 'gpt2'"):
        qa.QARecipe.build_task(qa.QAConfig.parse(_qa_config(lm_run, lm_data={**data, "tokenizer": "gpt2"})), tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        qa.QARecipe.build_task(qa.QAConfig.parse(_qa_config(tmp_path / "missing")), tmp_path / "d")
    # Restating the LM run's own settings is accepted, and every inherited section is filled in.
    cfg = qa.resolve_config(qa.QAConfig.parse(_qa_config(lm_run, pe=SEQPE, lm_data=data, model={"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 64, "dropout": 0.0})))
    assert cfg.resolved and cfg.pe.hidden == 32 and cfg.random_shift is True and cfg.context_length == CONTEXT
    assert cfg.init_checkpoint == str(qa.ckpt.latest_checkpoint(lm_run).resolve())
    assert qa.resolve_config(qa.QAConfig.parse({**_qa_config(lm_run), "context_length": None})).context_length == 128


def test_fine_tuning_dropout_overrides_the_lm_runs_and_survives_a_resume(lm_run: Path) -> None:
    cfg = qa.resolve_config(qa.QAConfig.parse(_qa_config(lm_run, dropout=0.3)))
    assert cfg.model.dropout == 0.3  # the LM run's is 0.0
    again = qa.resolve_config(qa.QAConfig.parse(cfg.model_dump(mode="json")))  # the run's own config.json, on resume
    assert again.model == cfg.model
    model = qa.QARecipe(cfg, None, documents=DOCS).build_model()
    backbone = {m.p for name, m in model.named_modules() if isinstance(m, torch.nn.Dropout) and ".pe." not in f".{name}"}
    assert backbone == {0.3}  # the SeqPE encoder keeps its own pe.dropout
    with pytest.raises(ValueError, match="dropout"):
        qa.QAConfig.parse(_qa_config(lm_run, dropout=1.5))


def test_cli_train_refuses_mismatched_lm_run_naming_the_field(lm_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "qa.yaml"
    config.write_text(f"task: qa\ninit_from: {lm_run}\npe: {{method: rope, base: 1.0e6}}\n")
    assert main(["train", str(config), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "does not match this config" in err and "pe.method: LM run has 'seqpe', config has 'rope'" in err
    assert not (tmp_path / "run").exists()


def test_qa_run_is_refused_as_a_starting_point(lm_run: Path, tmp_path: Path) -> None:
    fake = tmp_path / "qa-run"
    fake.mkdir()
    (fake / "config.json").write_text(json.dumps({"task": "qa"}))
    with pytest.raises(ValueError, match="is a 'qa' run; allowed: an 'lm' run"):
        qa.QARecipe.build_task(qa.QAConfig.parse(_qa_config(fake)), tmp_path / "e")


def test_ood_loss_only_on_unshifted_steps(lm_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    task = qa.QARecipe(qa.resolve_config(qa.QAConfig.parse(_qa_config(lm_run))), None, documents=DOCS)
    model = task.build_model().train()
    seen: list[tuple[bool, float]] = []
    step = model.pe.regularizer.step

    def record(*args, shifted: bool, **kwargs):
        out = step(*args, shifted=shifted, **kwargs)
        seen.append((shifted, out.parts["loss_ood"]))
        return out

    monkeypatch.setattr(model.pe.regularizer, "step", record)
    batch = task.train_batch(0, 0, 0, 1)
    for applied in (True, False):
        monkeypatch.setattr(GridSpace, "sample_shift", lambda self, g, extent=None, rows=1, pool=None, a=applied: Shift(a, torch.tensor([[500 if a else 0]] * rows)))
        _, metrics = task.loss(model, batch, generator=torch.Generator().manual_seed(0))
        assert metrics["shifted"] == float(applied)
    assert seen[0][0] is True and seen[0][1] == 0.0
    assert seen[1][0] is False and seen[1][1] > 0.0


@pytest.mark.slow
def test_tiny_fine_tune_lowers_validation_answer_ppl_and_evaluates(lm_run: Path, tmp_path: Path) -> None:
    config = _qa_config(lm_run)
    cfg = qa.resolve_config(qa.QAConfig.parse(config))
    run = tmp_path / "qa"
    task = qa.QARecipe(cfg, run, documents=DOCS)
    before = task.validate(task.build_model().eval())["answer_ppl"]
    result = train(task, cfg.train, run)
    assert result["val/answer_ppl"] < 0.5 * before
    found = qa.ckpt.latest_checkpoint(run / qa.BEST)
    assert found is not None
    best = json.loads((found / "state.json").read_text())
    assert best["val_answer_ppl"] <= result["val/answer_ppl"] + 1e-9

    out = qa.QARecipe.evaluate(run, documents=DOCS, quiet=True)
    saved = json.loads((run / EVAL_JSON).read_text())
    assert saved["lengths"].keys() == {str(CONTEXT), str(2 * CONTEXT)} and (run / EVAL_PNG).stat().st_size > 0
    for length, row in out["lengths"].items():
        assert row["examples"] == 4 and 0.0 <= row["strict_em"] <= row["em"] <= 100.0
        assert row["mean_tokens"] <= int(length) and row["ppl"] > 1.0
    assert out["checkpoint"].startswith(str(run / qa.BEST))


def test_qa_configs_validate() -> None:
    paths = sorted((REPO / "configs" / "qa").rglob("*.yaml"))
    assert paths, "configs/qa has no YAML"
    for path in paths:
        config = recipes.load_config(path)
        assert config.task == "qa" and isinstance(config, qa.QAConfig)
        assert config.init_from
    assert recipes.get_recipe("qa") is qa.QARecipe


def test_stock_gpt2_run_is_refused_as_a_starting_point(tmp_path: Path) -> None:
    """Table 1's stock GPT-2 control learned a wpe of the LM run's evaluation lengths: not a QA starting point."""
    config = {**_lm_config(tmp_path, {"method": "nope"}), "random_shift": False}
    config["model"] = {**config["model"], "arch": "gpt2_stock"}
    run = tmp_path / "stock"
    task = lm.LMRecipe.build_task(lm.LMConfig.parse(config), run)
    full = {**task.config_dict(), "train": TrainConfig(**config["train"]).model_dump(mode="json")}
    qa.ckpt.save_checkpoint(run, 1, model=task.build_model(), optimizer={}, rng={}, state={"world": 1}, config=full)
    qa.ckpt.atomic_write_text(run / "config.json", json.dumps(full))
    with pytest.raises(ValueError, match="is a gpt2_stock run .* allowed: LM runs of arch gpt2 or llama"):
        qa.QARecipe.build_task(qa.QAConfig.parse(_qa_config(run)), tmp_path / "qa")
