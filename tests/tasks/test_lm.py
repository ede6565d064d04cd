"""The LM recipe: §4.1's chunking protocol, configs and presets, checkpoint checks, end to end."""

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from seqpe_nd.tasks.recipes import lm
from seqpe_nd.tasks.cli import main
from seqpe_nd.tasks.cli.compare import compare, method_config
from seqpe_nd.tasks.engine.trainer import train


class Recorder(nn.Module):
    """Uniform logits over ``vocab``; remembers every sequence and its positions."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab, self.calls = vocab, []
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, *, input_ids: torch.Tensor, position_ids: torch.Tensor, use_cache: bool) -> nn.Module:
        self.calls.append((input_ids.clone(), position_ids.clone()))
        out = nn.Module()
        out.logits = torch.zeros(*input_ids.shape, self.vocab) + self.anchor
        return out


@pytest.mark.parametrize(("num_tokens", "length", "want"), [(10, 5, [0, 5]), (11, 5, [0, 5]), (9, 5, [0]), (4, 5, [])])
def test_chunks_keep_the_last_full_chunk(num_tokens: int, length: int, want: list[int]) -> None:
    assert list(lm.chunk_starts(num_tokens, length)) == want  # the released code gives [0] for (10, 5)


def test_chunks_can_be_capped() -> None:
    assert list(lm.chunk_starts(100, 8, max_tokens=20)) == [0, 8]


def test_perplexity_protocol_on_a_handmade_stream() -> None:
    stream = np.arange(20) % 7  # 20 tokens: four full chunks of 5, none dropped
    model = Recorder(vocab=7)
    res = lm.perplexity(model, stream, 5)
    assert (res["chunks"], res["tokens"]) == (4, 4 * 4)  # 4 next-token predictions per chunk
    assert res["ppl"] == pytest.approx(7.0)  # uniform over 7 tokens
    for i, (ids, pos) in enumerate(model.calls):
        assert ids.shape == (1, 5)  # batch 1
        assert ids[0].tolist() == stream[5 * i : 5 * i + 5].tolist()  # non-overlapping, in order
        assert pos[0].tolist() == [0, 1, 2, 3, 4]  # every chunk starts at position 0


def test_perplexity_is_token_weighted() -> None:
    """exp(Σ loss / Σ tokens), not a mean of per-chunk perplexities."""
    model = Recorder(vocab=3)
    res = lm.perplexity(model, np.zeros(12, dtype=np.int64), 4)
    assert res["loss"] == pytest.approx(math.log(3))
    assert res["tokens"] == 9


# --- configs and presets -------------------------------------------------------------------------------

def corpus_file(directory: Path) -> Path:
    rng = random.Random(0)
    words = "the cat sat on a mat while seven dogs ran past one old tree near river banks".split()
    docs = ["\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(8)) for _ in range(60)]
    path = directory / "corpus.txt"
    path.write_text("\n\n".join(docs))
    return path


def tiny_config(tmp_path: Path, pe: dict | None = None, **train: object) -> dict:
    return {
        "task": "lm",
        "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "dropout": 0.0, "block_size": 16},
        "data": {"source": "files", "data_files": [str(corpus_file(tmp_path))], "vocab_size": 300, "cache_dir": str(tmp_path / "cache")},
        "space": {"kind": "grid", "L": 16, "L_max": 1000, "contrastive": {"batch": 4, "num_candidates": 8}, "ood": {"num_starts": 2, "num_teachers": 8}},
        "pe": pe or {"method": "seqpe", "hidden": 32, "layers": 1},
        "train": {"steps": 6, "batch_size": 4, "lr": 1e-3, "seed": 0, "log_every": 2, "save_every": 3, **train},
        "eval": {"lengths": [16, 32, 64], "max_tokens": 512, "val_blocks": 4},
    }


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path)
    with pytest.raises(ValueError, match=r"model\.n_layr"):
        lm.LMConfig.parse({**cfg, "model": {**cfg["model"], "n_layr": 2}})
    with pytest.raises(ValueError, match=r"pe\.alpha: unknown field .alpha."):
        lm.LMConfig.parse({**cfg, "pe": {"method": "rope", "alpha": 0.1}})
    with pytest.raises(ValueError, match=r"space\.L = 16 must equal model\.block_size = 32"):
        lm.LMRecipe(lm.LMConfig.parse({**cfg, "model": {**cfg["model"], "block_size": 32}}))


def test_method_files_set_the_pe_section_and_keep_same_method_options(tmp_path: Path) -> None:
    base = {"task": "lm", "pe": {"method": "seqpe", "hidden": 128, "alpha": 0.1}, "random_shift": True}
    assert method_config(base, "seqpe-a0-b0.1", tmp_path)["pe"] == {"method": "seqpe", "hidden": 128, "alpha": 0.0, "beta": 0.1, "integration": "attn_bias", "per_layer": False}
    rope = method_config(base, "rope-1e6", tmp_path)
    assert rope["pe"] == {"method": "rope", "base": 1e6} and rope["random_shift"] is True
    assert method_config(base, "ape_learn", tmp_path)["random_shift"] is False
    with pytest.raises(ValueError, match="unknown method 'rope-1e5'.*allowed: alibi, ape_learn"):
        method_config(base, "rope-1e5", tmp_path)
    (tmp_path / "rope-1e5.yaml").write_text("pe: {method: rope, base: 1.0e5}\n")  # a method of your own, beside the config
    assert method_config(base, "rope-1e5", tmp_path)["pe"] == {"method": "rope", "base": 1e5}


def test_ape_sin_amplitude_matches_the_token_embeddings_unless_given(tmp_path: Path) -> None:
    """GPT-2's tokens are N(0, init_std): unset, the sinusoids get RMS init_std (amplitude init_std·√2)."""
    cfg = tiny_config(tmp_path, pe={"method": "ape_sin"})
    cfg["model"]["init_std"] = 0.05
    model = lm.build_model(lm.LMConfig.parse(cfg), vocab_size=300, eos_id=0)
    e = model.pe.embed(model.pe.prepare(torch.arange(16)[None, :, None]))  # (1, 16, 32)
    assert e[0, 0, 1].item() == pytest.approx(0.05 * math.sqrt(2))  # cos(0) · scale
    assert e.pow(2).mean().sqrt().item() == pytest.approx(0.05, rel=1e-5)  # RMS = the tokens' std
    given = lm.build_model(lm.LMConfig.parse({**cfg, "pe": {"method": "ape_sin", "scale": 1.0}}), vocab_size=300, eos_id=0)
    assert given.pe.embed(given.pe.prepare(torch.zeros(1, 1, 1, dtype=torch.long)))[0, 0, 1].item() == 1.0


def test_training_step_uses_shifted_positions_and_the_aux_loss(tmp_path: Path) -> None:
    space = {"kind": "grid", "L": 16, "L_max": 1000, "shift": {"prob": 1.0}, "contrastive": {"batch": 4, "num_candidates": 8}, "ood": {"num_starts": 2, "num_teachers": 8}}
    task = lm.LMRecipe(lm.LMConfig.parse({**tiny_config(tmp_path), "space": space}))
    model = task.build_model().train()
    seen = []
    prepare = model.pe.prepare
    model.pe.prepare = lambda pos_q, pos_k=None, **kw: seen.append((pos_q, kw)) or prepare(pos_q, pos_k, **kw)
    loss, metrics = task.loss(model, task.train_batch(0, 0, 0, 1), generator=torch.Generator().manual_seed(0))
    pos, kwargs = seen[0]
    assert metrics["shifted"] == 1.0 and kwargs["shifted"] is True
    starts = pos[:, 0, 0]  # each row its own start (App. A.5 as released: distinct starts a shifted step)
    assert len(set(starts.tolist())) == min(len(starts), task.space.shift.starts) and bool((starts > 0).all())
    assert torch.equal(pos[..., 0], starts[:, None] + torch.arange(16))
    assert set(starts.tolist()) <= {int(z) for z in task.shift_pool([16])[:, 0]}  # drawn from the run's pool
    assert "pe_aux_loss" in metrics
    assert loss.item() == pytest.approx(float(metrics["lm_loss"]) + float(metrics["pe_aux_loss"]), rel=1e-5)
    assert isinstance(metrics["lm_loss"], torch.Tensor)  # no host sync per micro-batch
    # the PE's own logs reach the metrics as 0-dim tensors (read by the trainer only when it logs)
    for name in ("loss_delta", "loss_ood", "loss_reg"):
        assert isinstance(metrics[name], torch.Tensor) and metrics[name].shape == (), name
    assert float(metrics["loss_delta"]) > 0 and float(metrics["loss_ood"]) == 0.0  # shifted step: no L_OOD
    # a shifted step's rows start far apart: no collapse signals (they describe the training positions)
    assert "pe_cos" not in metrics and "pe_spread" not in metrics
    unshifted = lm.LMRecipe(lm.LMConfig.parse({**tiny_config(tmp_path), "space": {**space, "shift": {"prob": 0.0}}}))
    _, metrics = unshifted.loss(model, unshifted.train_batch(0, 0, 0, 1), generator=torch.Generator().manual_seed(0))
    for name in ("pe_cos", "pe_spread"):
        assert isinstance(metrics[name], torch.Tensor) and metrics[name].shape == (), name
    assert -1.0 <= float(metrics["pe_cos"]) <= 1.0 + 1e-6 and float(metrics["pe_spread"]) >= 0.0


def test_train_batches_are_deterministic_per_step(tmp_path: Path) -> None:
    task = lm.LMRecipe(lm.LMConfig.parse(tiny_config(tmp_path)))
    a, b = task.train_batch(3, 0, 0, 1), task.train_batch(3, 0, 0, 1)
    assert torch.equal(a["input_ids"], b["input_ids"]) and a["input_ids"].shape == (4, 16)
    assert not torch.equal(a["input_ids"], task.train_batch(4, 0, 0, 1)["input_ids"])


def test_pe_cos_costs_its_encoder_pass_only_on_the_steps_that_write_logs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trainer turns the PE's diagnostics on for logging steps (3, 6 and the last, 7) and off for the rest,
    and every train record still carries pe_cos (no shifted steps here: a shifted step logs none)."""
    from seqpe_nd.encodings.seqpe import SeqPEEncoding

    config = tiny_config(tmp_path, steps=7, log_every=3, save_every=0)
    config["random_shift"] = False
    cfg = lm.LMConfig.parse(config)
    calls: list[int] = []
    probe = SeqPEEncoding._collapse_signal
    monkeypatch.setattr(SeqPEEncoding, "_collapse_signal", lambda self, *a: calls.append(1) or probe(self, *a))
    run_dir = tmp_path / "run"
    train(lm.LMRecipe.build_task(cfg, run_dir), cfg.train, run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train_records] == [3, 6, 7]
    assert all("pe_cos" in r and "pe_spread" in r for r in train_records)
    assert len(calls) == 3


# --- trained runs ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lm")
    config = tiny_config(root)
    run_dir = root / "run"
    train(lm.LMRecipe.build_task(lm.LMConfig.parse(config), run_dir), lm.LMConfig.parse(config).train, run_dir)
    return run_dir


def test_checkpoint_with_another_pe_config_names_the_field(trained_run: Path) -> None:
    config = json.loads((trained_run / "config.json").read_text())
    with pytest.raises(ValueError, match=r"pe\.alpha: checkpoint has 0\.1, config has 0\.5"):
        load_model(trained_run, {**config, "pe": {**config["pe"], "alpha": 0.5}})
    with pytest.raises(ValueError, match=r"pe\.method: checkpoint has 'seqpe', config has 'rope'"):
        load_model(trained_run, {**config, "pe": {"method": "rope"}})
    assert not lm.LMRecipe.from_run(trained_run).load_trained().training


def load_model(run_dir: Path, config: dict) -> nn.Module:
    return lm.LMRecipe(lm.LMConfig.parse(config), run_dir).load_trained()


def test_eval_options_of_another_recipe_are_refused_before_loading(trained_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = sorted(p.name for p in trained_run.iterdir())
    assert main(["eval", str(trained_run), "--resolutions", "64"]) == 2  # was a TypeError traceback
    assert "has no option(s) --resolutions" in capsys.readouterr().err
    with pytest.raises(ValueError, match="has no option"):
        lm.LMRecipe.evaluate(trained_run, max_images=3)
    with pytest.raises(ValueError, match="length"):
        lm.LMRecipe.evaluate(trained_run, lengths=[16, 1])  # every length is checked before any is evaluated
    assert sorted(p.name for p in trained_run.iterdir()) == before


def test_evaluate_writes_json_and_plot(trained_run: Path) -> None:
    res = lm.LMRecipe.evaluate(trained_run, lengths=[16, 64], quiet=True)
    saved = json.loads((trained_run / "eval.json").read_text())
    assert saved["lengths"].keys() == {"16", "64"} == res["lengths"].keys()
    num_test = lm.LMRecipe(lm.LMConfig.parse(json.loads((trained_run / "config.json").read_text()))).corpus.num_tokens("test")
    chunks = min(num_test // 64, 512 // 64)  # eval.max_tokens = 512
    assert saved["lengths"]["64"]["chunks"] == chunks > 0 and saved["lengths"]["64"]["tokens"] == chunks * 63
    assert (trained_run / "eval.png").read_bytes()[:4] == b"\x89PNG"
    assert all(math.isfinite(r["ppl"]) for r in saved["lengths"].values())


@pytest.mark.slow
def test_cli_train_eval_and_compare_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tmp_path)))
    run_dir = tmp_path / "run"
    assert main(["train", str(config), "--run-dir", str(run_dir), "--set", "train.steps=4"]) == 0
    bar = capsys.readouterr().err
    assert "loss_delta=" in bar and "loss_ood=" in bar and "pe_spread=" in bar  # SeqPE's health on the progress bar
    assert main(["eval", str(run_dir), "--lengths", "16", "32"]) == 0
    assert "test perplexity" in capsys.readouterr().out
    assert json.loads((run_dir / "eval.json").read_text())["lengths"].keys() == {"16", "32"}

    out = tmp_path / "cmp"
    results = compare(config, ["rope", "alibi", "seqpe-a0-b0"], out, overrides=["train.steps=3"], lengths=[16, 48])
    assert results.keys() == {"rope", "alibi", "seqpe-a0-b0"}
    table = json.loads((out / "compare.json").read_text())["rows"]
    assert set(table["alibi"]["ppl"]) == {"16", "48"}  # JSON keys
    assert (out / "compare.png").is_file() and "| rope |" in (out / "compare.md").read_text()
    again = compare(config, ["rope"], out, overrides=["train.steps=3"], lengths=[16, 48])  # reuses the finished run
    assert again["rope"]["train_seconds"] == results["rope"]["train_seconds"]

    # --jobs 2: two spawned one-thread workers train the same runs to the same perplexities
    parallel = compare(config, ["rope", "alibi"], tmp_path / "cmp2", overrides=["train.steps=3"], lengths=[16, 48], jobs=2)
    for name in ("rope", "alibi"):
        for length in ("16", "48"):
            assert parallel[name]["lengths"][length]["ppl"] == pytest.approx(results[name]["lengths"][length]["ppl"], rel=1e-5)
    with pytest.raises(ValueError, match="--jobs 0 is not allowed"):
        compare(config, ["rope"], out, jobs=0)


def test_a_run_saved_before_new_fields_existed_still_loads_and_resumes(tmp_path: Path) -> None:
    """Fields added to the configs since a run was saved (model.arch, pe.scaling) take their defaults."""
    config = tiny_config(tmp_path, pe={"method": "rope"}, steps=2, save_every=0)
    run = tmp_path / "old"
    train(lm.LMRecipe.build_task(lm.LMConfig.parse(config), run), lm.LMConfig.parse(config).train, run)
    for path in [run / "config.json", *run.glob("checkpoints/step_*/config.json")]:
        saved = json.loads(path.read_text())
        del saved["model"]["arch"], saved["model"]["kv_heads"], saved["pe"]["scaling"]  # as an older version wrote it
        path.write_text(json.dumps(saved))
    assert "16" in lm.LMRecipe.evaluate(run, lengths=[16], quiet=True, write=False)["lengths"]
    more = lm.LMConfig.parse({**config, "train": {**config["train"], "steps": 3}})
    assert train(lm.LMRecipe.build_task(more, run), more.train, run, resume=True)["step"] == 3


# --- the stock GPT-2 control (model.arch: gpt2_stock) ---------------------------------------------------

def stock_config(tmp_path: Path, **train: object) -> dict:
    config = tiny_config(tmp_path, pe={"method": "nope"}, **train)
    return {**config, "model": {**config["model"], "arch": "gpt2_stock"}, "random_shift": False}


def test_stock_gpt2_is_transformers_own_at_init(tmp_path: Path) -> None:
    """Same config and seed: the same weights and logits as ``GPT2LMHeadModel``, position ids honoured."""
    from transformers import GPT2LMHeadModel

    from seqpe_nd.tasks.backbones.language_model import gpt2_config

    cfg = lm.LMConfig.parse(stock_config(tmp_path))
    torch.manual_seed(0)
    ours = lm.build_model(cfg, vocab_size=300, eos_id=0).eval()
    torch.manual_seed(0)
    stock = GPT2LMHeadModel(gpt2_config(cfg.model, vocab_size=300, eos_id=0, n_positions=64)).eval()
    assert ours.transformer.wpe.weight.shape == (64, 32)  # a row per position up to the longest eval length
    want, got = stock.state_dict(), ours.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    ids = torch.randint(0, 300, (2, 16))
    for start in (0, 40):  # the recipe's (b, n, 1) positions and GPT-2's (b, n) ones, from 0 and shifted
        pos = torch.arange(start, start + 16).expand(2, 16)
        ref = stock(input_ids=ids, position_ids=pos, use_cache=False).logits
        torch.testing.assert_close(ours(input_ids=ids, position_ids=pos, use_cache=False).logits, ref, rtol=0, atol=0)
        out = ours(input_ids=ids, position_ids=pos[..., None], use_cache=False)
        torch.testing.assert_close(out.logits, ref, rtol=0, atol=0)
        assert out.pe_aux_loss is None
    at0 = ours(input_ids=ids, position_ids=torch.arange(16).expand(2, 16)).logits
    assert not torch.equal(at0, ref)  # shifted positions read other wpe rows


def test_stock_gpt2_config_is_checked(tmp_path: Path) -> None:
    cfg = stock_config(tmp_path)
    with pytest.raises(ValueError, match=r"gpt2_stock .* pe: \{method: nope\} \(got 'rope'\)"):
        lm.LMConfig.parse({**cfg, "pe": {"method": "rope"}})
    with pytest.raises(ValueError, match="random_shift: false"):
        lm.LMConfig.parse({**cfg, "random_shift": True})
    with pytest.raises(ValueError, match=r"length\(s\) \[128\] not allowed: the stock GPT-2 learned 64 positions"):
        lm.eval_settings(lm.LMConfig.parse(cfg).with_eval(lengths=[16, 128]), lm.LMConfig.parse(cfg))


def test_stock_gpt2_trains_and_evaluates(tmp_path: Path) -> None:
    """A few steps through the LM recipe; positions past the training length keep their init (no decay either)."""
    config = stock_config(tmp_path, steps=3, save_every=0, weight_decay=0.1)
    cfg = lm.LMConfig.parse(config)
    run = tmp_path / "stock"
    task = lm.LMRecipe.build_task(cfg, run)
    torch.manual_seed(cfg.train.seed)  # as the loop builds its model
    init = task.build_model().transformer.wpe.weight.detach().clone()
    train(task, cfg.train, run)
    res = lm.LMRecipe.evaluate(run, quiet=True)
    assert res["lengths"].keys() == {"16", "32", "64"} and all(math.isfinite(r["ppl"]) for r in res["lengths"].values())
    wpe = lm.LMRecipe.from_run(run).load_trained().transformer.wpe.weight
    assert torch.equal(wpe[16:], init[16:]) and not torch.equal(wpe[:16], init[:16])
    # an evaluation's own lengths never resize the trained wpe (its rows come from the config's eval.lengths)
    assert lm.LMRecipe.evaluate(run, lengths=[16, 32], quiet=True, write=False)["lengths"].keys() == {"16", "32"}
    with pytest.raises(ValueError, match=r"length\(s\) \[128\] not allowed: the stock GPT-2 learned 64 positions"):
        lm.LMRecipe.evaluate(run, lengths=[16, 128], quiet=True, write=False)


# --- several seeds ------------------------------------------------------------------------------------------

def fake_result(ppl: dict[str, float], seconds: float = 1.0) -> dict:
    return {"lengths": {k: {"ppl": v} for k, v in ppl.items()}, "train_seconds": seconds, "eval_seconds": seconds}


def test_seed_summary_is_the_mean_and_sample_std() -> None:
    results = {s: {"a": fake_result({"16": 10.0 + s, "32": 20.0 * (s + 1)}, s)} for s in (0, 1, 2)}
    row = lm.LMRecipe.summarize_seeds(results)["a"]
    assert row["seeds"] == [0, 1, 2] and row["ppl"]["16"] == pytest.approx(11.0) and row["std"]["16"] == pytest.approx(1.0)
    assert row["std"]["32"] == pytest.approx(20.0)  # 20, 40, 60: sample std (n - 1)
    assert row["avg"] == pytest.approx((15 + 25.5 + 36) / 3) and row["train_seconds"] == pytest.approx(1.0)
    assert row["by_seed"]["2"]["ppl"] == {"16": 12.0, "32": 60.0}
    md = lm.LMRecipe.print_summary({"a": row}, "t", reference="16")
    assert "| a | 11.00 ± 1.00 | 40.00 ± 20.00 |" in md and "std % at 16" in md and "| 9.1 |" in md
    one = lm.LMRecipe.summarize_seeds({0: results[0]})["a"]
    assert one["std"]["16"] is None and "| a | 10.00 | 20.00 | 15.00 | - |" in lm.LMRecipe.print_summary({"a": one}, "t", reference="16")


def test_seed_summary_refuses_a_missing_seed() -> None:
    results = {0: {"a": fake_result({"16": 1.0}), "b": fake_result({"16": 2.0})}, 1: {"a": fake_result({"16": 1.5})}}
    with pytest.raises(ValueError, match=r"no evaluated run for b \(seed 1\)"):
        lm.LMRecipe.summarize_seeds(results)
