"""The shared training loop: exact resume, schedule, weight-decay groups, run-dir safety, the CLI."""

import json
import math
import time
import sys
import types
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file
from torch import nn

from seqpe_nd.encodings.absolute import NoPE
from seqpe_nd.tasks import recipes
from seqpe_nd.tasks.recipes.config import RunConfig
from seqpe_nd.tasks.cli import main
from seqpe_nd.tasks.engine.param_groups import param_groups
from seqpe_nd.tasks.engine.trainer import STRICT_SECTIONS, TrainConfig, TrainTask, lr_at, train, train_or_reuse, unwrap

VOCAB, LENGTH = 32, 8


class Interrupt(Exception):
    """Stands in for a crash or a pre-emption in the middle of a run."""


class ToyLM(nn.Module):
    """A tiny next-token model with dropout, so RNG state matters for the losses."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.drop = nn.Dropout(0.3)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.drop(self.emb(tokens))))


class ToyTask:
    """Random-token LM with a noisy regularizer drawn from the loop's generator."""

    def __init__(self, config: dict[str, Any] | None = None, *, crash_at: int | None = None) -> None:
        self.config = config or {"task": "toy", "pe": {"base": 10000.0}, "model": {"width": 16}}
        self.crash_at = crash_at
        self.batch_size = 4
        self.validating = False
        self.batches_during_validation = 0
        self.validations = 0
        self.model: nn.Module | None = None

    def build_model(self) -> nn.Module:
        self.model = ToyLM()
        return self.model

    def train_batch(self, step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        if step == self.crash_at:
            raise Interrupt(f"interrupted at step {step}")
        if self.validating:
            self.batches_during_validation += 1
        g = torch.Generator().manual_seed(((step * 7 + micro) * 5 + rank) * 3 + world)
        return {"tokens": torch.randint(0, VOCAB, (self.batch_size, LENGTH + 1), generator=g)}

    def loss(
        self, model: nn.Module, batch: Any, *, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        tokens = batch["tokens"]
        logits = model(tokens[:, :-1])
        main = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
        probe = torch.randint(0, VOCAB, (4,), generator=generator, device=tokens.device)
        reg = unwrap(model).emb(probe).pow(2).mean()
        return main + 0.01 * reg, {"main": float(main.detach()), "reg": reg.detach()}  # a float and a tensor

    def validate(self, model: nn.Module) -> dict[str, float]:
        self.validating = True
        self.validations += 1
        tokens = torch.arange(LENGTH + 1).remainder(VOCAB)[None]
        logits = model(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits[0], tokens[0, 1:])
        self.validating = False
        return {"loss": float(loss), "ppl": math.exp(float(loss))}

    def batch_tokens(self, batch: Any) -> int:
        return int(batch["tokens"][:, 1:].numel())

    def no_weight_decay(self, name: str, param: nn.Parameter) -> bool:
        return param.ndim < 2 or name.startswith("emb")

    def config_dict(self) -> dict[str, Any]:
        return self.config

    strict_sections = STRICT_SECTIONS

    def normalize_config(self, saved: dict[str, Any]) -> dict[str, Any]:
        return saved

    def prepare_data(self) -> None:
        """Its batches are drawn on the fly: nothing to open."""


# A recipe for the CLI tests (registered under "toy" by a fixture).
class ToyConfig(RunConfig):
    task: Literal["toy"] = "toy"
    space: Any = None
    pe: dict[str, Any] = {}
    model: dict[str, Any] = {}


class ToyRecipe:
    config_type = ToyConfig

    @classmethod
    def build_task(cls, config: ToyConfig, run_dir: Path) -> ToyTask:
        return ToyTask(config.model_dump(mode="json"))


CFG = TrainConfig(
    steps=10, batch_size=4, grad_accum=2, lr=3e-3, weight_decay=0.1, warmup_steps=2, clip_grad=1.0,
    log_every=1, eval_every=5, save_every=3, keep_last=2, seed=7, device="cpu", precision="fp32",
)


def train_losses(run_dir: Path) -> list[float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if r["split"] == "train"]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    return load_file(str(run_dir / "checkpoints" / latest / "model.safetensors"))


def test_toy_task_satisfies_protocol() -> None:
    assert isinstance(ToyTask(), TrainTask)


def test_interrupted_and_resumed_run_matches_uninterrupted(tmp_path: Path) -> None:
    full = train(ToyTask(), CFG, tmp_path / "full")
    with pytest.raises(Interrupt):
        train(ToyTask(crash_at=7), CFG, tmp_path / "cut")  # last checkpoint at step 6
    assert len(train_losses(tmp_path / "cut")) == 7
    resumed = train(ToyTask(), CFG, tmp_path / "cut", resume=True)

    want, got = train_losses(tmp_path / "full"), train_losses(tmp_path / "cut")
    assert len(want) == CFG.steps
    assert got == want  # bitwise: JSON round-trips Python floats exactly
    assert resumed == {k: v for k, v in full.items() if k != "train/tokens_per_s"} | {
        "train/tokens_per_s": resumed["train/tokens_per_s"]
    }
    w_full, w_cut = final_weights(tmp_path / "full"), final_weights(tmp_path / "cut")
    assert w_full.keys() == w_cut.keys()
    for k in w_full:
        assert torch.equal(w_full[k], w_cut[k]), k


def test_dropout_and_generator_streams_matter(tmp_path: Path) -> None:
    """Guard against the resume test passing trivially: another seed changes the losses."""
    train(ToyTask(), CFG.model_copy(update={"steps": 3}), tmp_path / "a")
    train(ToyTask(), CFG.model_copy(update={"steps": 3, "seed": 8}), tmp_path / "b")
    assert train_losses(tmp_path / "a") != train_losses(tmp_path / "b")


def test_checkpoints_rotate_and_metrics_and_config_are_written(tmp_path: Path) -> None:
    task = ToyTask()
    result = train(task, CFG, tmp_path / "run")
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["latest", "step_00000009", "step_00000010"]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["pe"] == {"base": 10000.0} and config["train"]["steps"] == 10
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["seed"] == 7 and run["world"] == 1
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["split"] == "val"] == [5, 10]
    assert task.validations == 2 and task.batches_during_validation == 0
    assert {"loss", "lr", "tokens_per_s", "grad_norm", "main", "reg"} <= set(lines[0])
    assert lines[0]["tokens_per_s"] > 0
    assert result["step"] == 10 and "val/ppl" in result and "train/loss" in result


def test_resume_refuses_a_sampler_rng_state_of_another_size(tmp_path: Path) -> None:
    """The loop's generator lives on the host; a state saved from a GPU generator (16 bytes) cannot restore it."""
    train(ToyTask(), CFG.model_copy(update={"steps": 3}), tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints" / (tmp_path / "run" / "checkpoints" / "latest").read_text().strip()
    tensors = load_file(str(ckpt / "rng.safetensors"))
    (key,) = [k for k in tensors if k.endswith("generator")]
    assert tensors[key].numel() == torch.Generator().get_state().numel()  # saved from a host generator
    tensors[key] = torch.zeros(16, dtype=torch.uint8)
    save_file(tensors, str(ckpt / "rng.safetensors"))
    with pytest.raises(ValueError, match="sampler RNG state has 16 bytes, this run's cpu generator needs 5056"):
        train(ToyTask(), CFG, tmp_path / "run", resume=True)


def test_run_dir_with_content_is_refused_without_resume(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        train(ToyTask(), CFG, tmp_path / "run")
    assert (tmp_path / "run" / "notes.txt").read_text() == "keep me"


def test_resume_refuses_a_different_pe_config(tmp_path: Path) -> None:
    train(ToyTask(), CFG.model_copy(update={"steps": 3}), tmp_path / "run")
    other = ToyTask({"task": "toy", "pe": {"base": 1000000.0}, "model": {"width": 16}})
    with pytest.raises(ValueError, match=r"pe\.base: checkpoint has 10000\.0, config has 1000000\.0"):
        train(other, CFG, tmp_path / "run", resume=True)


def test_resume_without_checkpoint_starts_fresh_and_finished_run_is_a_no_op(tmp_path: Path) -> None:
    short = CFG.model_copy(update={"steps": 2})
    train(ToyTask(), short, tmp_path / "run", resume=True)
    assert len(train_losses(tmp_path / "run")) == 2
    again = train(ToyTask(), short, tmp_path / "run", resume=True)
    assert again["step"] == 2 and len(train_losses(tmp_path / "run")) == 2


def test_cuda_requested_without_cuda_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="train.device is 'cuda' but no CUDA device is available"):
        train(ToyTask(), CFG.model_copy(update={"device": "cuda"}), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_bf16_autocast_runs_on_cpu(tmp_path: Path) -> None:
    result = train(ToyTask(), CFG.model_copy(update={"steps": 2, "precision": "bf16"}), tmp_path / "run")
    assert math.isfinite(result["train/loss"])


def test_parameters_without_gradient_are_named(tmp_path: Path) -> None:
    class Idle(ToyTask):
        def build_model(self) -> nn.Module:
            model = ToyLM()
            model.unused = nn.Linear(2, 2)
            return model

    msg = r"2 trainable parameters received no gradient .*: unused\.weight, unused\.bias"
    with pytest.warns(UserWarning, match=msg):
        train(Idle(), CFG.model_copy(update={"steps": 1}), tmp_path / "run")


def test_compiled_model_trains_and_saves_bare_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # aot_eager exercises dynamo's wrapping (and our unwrapping) without a C++ toolchain; the backend is the config's.
    real, backends = torch.compile, []
    monkeypatch.setattr(torch, "compile", lambda model, backend: backends.append(backend) or real(model, backend=backend))
    cfg = CFG.model_copy(update={"steps": 2, "compile": True, "compile_backend": "aot_eager"})
    train(ToyTask(), cfg, tmp_path / "compiled")
    train(ToyTask(), cfg.model_copy(update={"compile": False}), tmp_path / "eager")
    assert train_losses(tmp_path / "compiled") == pytest.approx(train_losses(tmp_path / "eager"), rel=1e-5)
    assert final_weights(tmp_path / "compiled").keys() == final_weights(tmp_path / "eager").keys()
    assert backends == ["aot_eager"]


class SeqPEToyTask(ToyTask):
    """ToyTask with one SeqPE attention layer (or SeqPE added to the input), logging the PE's logs as the recipes
    do. ``collapsed``: the encoder's output weight zeroed and frozen, so every position gets the same embedding;
    otherwise the encoder and W_PE are scaled up so position clearly steers attention from the first step."""

    def __init__(self, integration: str, *, collapsed: bool) -> None:
        super().__init__()
        self.integration, self.collapsed = integration, collapsed

    def build_model(self) -> nn.Module:
        from seqpe_nd.encodings import build_position_encoding

        model = ToyLM()
        model.qkv = nn.Linear(16, 3 * 16)
        model.pe = build_position_encoding(
            {"method": "seqpe", "integration": self.integration, "hidden": 16, "layers": 1, "dropout": 0.0,
             "alpha": 0.0, "beta": 0.0},
            space={"L": LENGTH, "L_max": 64}, num_heads=2, head_dim=8, num_layers=1, d_model=16,
        )
        proj = model.pe.encoder.proj
        with torch.no_grad():
            if self.collapsed:
                proj.weight.zero_()
                proj.bias.fill_(0.5)
                proj.requires_grad_(False)
            else:
                proj.weight.normal_()
                if self.integration != "input_add":
                    model.pe.w_pe[0].weight.normal_(std=2.0)
        self.model = model
        return model

    def loss(
        self, model: nn.Module, batch: Any, *, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        m, tokens = unwrap(model), batch["tokens"]
        b, n = tokens.shape[0], tokens.shape[1] - 1
        state = m.pe.prepare(torch.arange(n)[None, :, None].expand(b, -1, -1), generator=generator)
        x = m.emb(tokens[:, :-1])
        added = m.pe.embed(state)
        x = x if added is None else x + added
        q, k, v = m.qkv(x).view(b, n, 3, 2, 8).permute(2, 0, 3, 1, 4)  # 3 × (b, h, n, e)
        y = m.pe.attend(q, k, v, state, 0, causal=True).transpose(1, 2).reshape(b, n, 16)
        logits = m.head(m.norm(x + y))
        main = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
        return main, {"main": main.detach(), **state.logs}


SEQPE_CFG = TrainConfig(
    steps=8, batch_size=4, lr=1e-3, warmup_steps=2, log_every=1, eval_every=0, save_every=0, seed=0,
    device="cpu", precision="fp32",
)


@pytest.mark.parametrize("integration", ["attn_sum", "attn_mul", "attn_bias", "input_add"])
@pytest.mark.parametrize("collapsed", [True, False])
def test_a_collapsed_seqpe_is_warned_once_and_recorded(
    integration: str, collapsed: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """pe_spread below COLLAPSED_SPREAD on COLLAPSE_LOGS (4) logs in a row after warmup (steps 3-6 here): one
    line, and ``"pe_collapsed": true`` on the train record that completed the run; a healthy encoder: neither."""
    from seqpe_nd.encodings.seqpe import COLLAPSED_SPREAD

    result = train(SeqPEToyTask(integration, collapsed=collapsed), SEQPE_CFG, tmp_path / "run")
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in lines if r["split"] == "train"]
    assert len(train_records) == 8 and all("pe_spread" in r and "pe_cos" in r for r in train_records)
    flagged = [r["step"] for r in train_records if "pe_collapsed" in r]
    warned = (captured.out + captured.err).count("position channel looks collapsed")
    if collapsed:
        assert all(r["pe_spread"] < 1e-6 and r["pe_cos"] == pytest.approx(1.0) for r in train_records)
        assert warned == 1 and "for 4 logs since step 3" in captured.out
        assert flagged == [6] and train_records[5]["pe_collapsed"] is True
    else:
        assert all(r["pe_spread"] > 10 * COLLAPSED_SPREAD for r in train_records)
        assert warned == 0 and flagged == []
    assert "train/pe_spread" in result and "train/pe_collapsed" not in result


def test_collapse_watch_counts_consecutive_low_logs_after_warmup_and_warns_once() -> None:
    from seqpe_nd.tasks.engine.collapse import COLLAPSE_LOGS, CollapseWatch

    watch = CollapseWatch(warmup_steps=10, steps=30)
    low, high = {"pe_spread": 0.001}, {"pe_spread": 0.5}
    assert COLLAPSE_LOGS == 4
    assert [watch.update(s, low) for s in range(0, 10, 2)] == [None] * 5  # warmup logs do not count
    assert [watch.update(s, m) for s, m in [(10, low), (12, low), (14, low), (16, high)]] == [None] * 4  # reset
    assert watch.update(18, {"pe_spread": float("nan")}) is None  # NaN is not a collapse (and resets)
    assert [watch.update(s, low) for s in (20, 22, 24)] == [None] * 3
    message = watch.update(26, low)
    assert message is not None and "pe_spread 0.001 < 0.05 for 4 logs since step 21" in message
    assert watch.update(28, low) is None and watch.update(100, low) is None  # once per run
    assert CollapseWatch(0, 30).update(0, {"loss": 1.0}) is None  # no SeqPE: nothing to watch
    # the watch starts after warmup and a third of the run: a healthy encoder needs a few hundred steps to grow
    assert CollapseWatch(150, 1500).start == 500 and CollapseWatch(150, 300).start == 150
    late = CollapseWatch(150, 1500)
    assert [late.update(s, low) for s in range(150, 500, 25)] == [None] * 14
    assert [late.update(s, low) for s in (500, 525, 550)] == [None] * 3 and late.update(575, low) is not None
    skip = CollapseWatch(0, 2)  # a log without pe_spread (a shifted step) neither counts nor resets
    assert [skip.update(s, m) for s, m in [(0, low), (1, low), (2, {"loss": 1.0}), (3, low)]] == [None] * 4
    assert skip.update(4, low) is not None


def test_a_collapsed_seqpe_is_not_warned_before_four_logs_after_warmup(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A short run: 3 logs after warmup are not yet a trend."""
    train(SeqPEToyTask("attn_bias", collapsed=True), SEQPE_CFG.model_copy(update={"steps": 5}), tmp_path / "run")
    captured = capsys.readouterr()
    assert "looks collapsed" not in captured.out + captured.err
    assert "pe_collapsed" not in (tmp_path / "run" / "metrics.jsonl").read_text()


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_lr_schedule(schedule: str) -> None:
    cfg = TrainConfig(steps=110, lr=1.0, warmup_steps=10, schedule=schedule, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(cfg.steps)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lrs[10] == pytest.approx(1.0)
    if schedule == "constant":
        assert lrs[10:] == pytest.approx([1.0] * 100)
        return
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lr_at(cfg.steps, cfg) == pytest.approx(0.1)
    mid = 0.1 + 0.9 * (0.5 if schedule == "linear" else 0.5 * (1 + math.cos(math.pi / 2)))
    assert lr_at(60, cfg) == pytest.approx(mid)


def test_no_weight_decay_groups() -> None:
    model = ToyLM()
    decay, no_decay = param_groups(model, 1e-3, 0.1, no_weight_decay=ToyTask().no_weight_decay)
    assert decay["lr_scale"] == no_decay["lr_scale"] == 1.0
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert [p is model.head.weight for p in decay["params"]] == [True]
    assert len(no_decay["params"]) == 4  # emb.weight, norm.weight, norm.bias, head.bias


class ScaledNorm(NoPE):
    """A PositionEncoding that is ToyLM's LayerNorm (same keys) and asks for its own rate, as SeqPE's encoder does:
    ``min(scale, cap / lr)`` times the run's."""

    def __init__(self, scale: float = 1.0, cap: float | None = None) -> None:
        super().__init__(num_heads=1, head_dim=16, num_layers=1, width=1)
        self.weight, self.bias = nn.Parameter(torch.ones(16)), nn.Parameter(torch.zeros(16))
        self.scale, self.cap = scale, cap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.layer_norm(x, (16,), self.weight, self.bias)

    def lr_scales(self, lr: float) -> list[tuple[list[nn.Parameter], float]]:
        return [([self.weight, self.bias], min(self.scale, self.cap / lr) if self.cap else self.scale)]


class ScaledToyTask(ToyTask):
    """ToyTask whose LayerNorm trains at a quarter of the run's rate (as a SeqPE encoder's ``encoder_lr_scale``)."""

    def build_model(self) -> nn.Module:
        model = super().build_model()
        model.norm = ScaledNorm(scale=0.25)
        return model


def test_pe_lr_scale_trains_its_parameters_at_that_multiple(tmp_path: Path) -> None:
    """Adam's first step moves every element with a gradient by ≈ lr: the scaled module moves 4x less."""
    task = ScaledToyTask()
    torch.manual_seed(CFG.seed)
    before = {k: v.clone() for k, v in ToyLM().state_dict().items()}  # train() seeds the same init
    cfg = CFG.model_copy(update={"steps": 1, "warmup_steps": 0, "grad_accum": 1, "weight_decay": 0.0, "clip_grad": 0.0})
    train(task, cfg, tmp_path / "run")
    after = final_weights(tmp_path / "run")
    names = ("norm.weight", "norm.bias", "head.weight", "head.bias")
    step = {k: (after[k] - before[k]).abs().max().item() for k in names}
    for name in names:
        want = cfg.lr / 4 if name.startswith("norm") else cfg.lr
        assert step[name] == pytest.approx(want, rel=0.05), name
    groups = param_groups(task.model, cfg.lr, 0.1, no_weight_decay=task.no_weight_decay)
    assert sorted((g["lr_scale"], g["weight_decay"], len(g["params"])) for g in groups) == [
        (0.25, 0.0, 2), (1.0, 0.0, 2), (1.0, 0.1, 1)  # norm.{weight,bias}; emb.weight + head.bias; head.weight
    ]


def test_pe_lr_max_caps_its_peak_rate(tmp_path: Path) -> None:
    """A cap (a SeqPE encoder's ``encoder_lr_max``): the parameters' scale becomes min(scale, cap / lr),
    so its first Adam step is ≈ lr_max when the run's rate is higher, and ≈ lr when it is lower."""
    class CappedToyTask(ToyTask):
        def build_model(self) -> nn.Module:
            model = super().build_model()
            model.norm = ScaledNorm(cap=1e-3)
            return model

    for lr, want in ((4e-3, 1e-3), (5e-4, 5e-4)):
        task = CappedToyTask()
        torch.manual_seed(CFG.seed)
        before = {k: v.clone() for k, v in ToyLM().state_dict().items()}
        cfg = CFG.model_copy(update={"steps": 1, "warmup_steps": 0, "grad_accum": 1, "weight_decay": 0.0,
                                     "clip_grad": 0.0, "lr": lr})
        train(task, cfg, tmp_path / f"run-{lr}")
        after = final_weights(tmp_path / f"run-{lr}")
        assert (after["norm.weight"] - before["norm.weight"]).abs().max().item() == pytest.approx(want, rel=0.05)
        assert (after["head.weight"] - before["head.weight"]).abs().max().item() == pytest.approx(lr, rel=0.05)
    groups = param_groups(task.model, 4e-3, 0.0, no_weight_decay=task.no_weight_decay)
    assert sorted(g["lr_scale"] for g in groups if g["params"]) == [0.25, 1.0, 1.0]
    assert all(g["lr_scale"] == 1.0 for g in param_groups(task.model, 1e-3, 0.0))  # at the cap: the run's rate


def test_seqpe_encoder_trains_at_most_at_encoder_lr_max() -> None:
    """The PE config's default cap reaches the encoder's parameter group (and W_PE stays at the run's rate)."""
    from seqpe_nd.encodings import build_position_encoding

    pe = build_position_encoding({"method": "seqpe", "hidden": 16, "layers": 1}, space={"L": 8, "L_max": 64},
                                 num_heads=2, head_dim=4, num_layers=1, d_model=8)
    model = nn.ModuleDict({"pe": pe})
    task = ToyTask()
    scales = {id(p): g["lr_scale"] for g in param_groups(model, 3e-3, 0.0, no_weight_decay=task.no_weight_decay) for p in g["params"]}
    assert [round(scales[id(p)], 9) for p in pe.encoder.parameters()] == [0.1] * len(list(pe.encoder.parameters()))
    assert {scales[id(p)] for p in pe.w_pe.parameters()} == {1.0}
    scales = {id(p): g["lr_scale"] for g in param_groups(model, 2e-4, 0.0, no_weight_decay=task.no_weight_decay) for p in g["params"]}
    assert {scales[id(p)] for p in pe.encoder.parameters()} == {1.0}  # below the cap: the run's rate


def test_train_or_reuse_resumes_reuses_and_refuses_another_config(tmp_path: Path) -> None:
    run, cfg = tmp_path / "run", CFG.model_copy(update={"steps": 4, "eval_every": 0})
    config = {"task": "toy", "pe": {"base": 10000.0}, "model": {"width": 16}}
    builds: list[int] = []

    def build(c: dict[str, Any] = config, crash_at: int | None = None) -> ToyTask:
        builds.append(1)
        return ToyTask(c, crash_at=crash_at)

    with pytest.raises(Interrupt):  # killed mid-run: no timing recorded
        train_or_reuse(lambda: build(crash_at=3), cfg, run, config=config)
    seconds = train_or_reuse(build, cfg, run, config=config)  # resumed from step 3's checkpoint
    assert seconds > 0 and len(builds) == 2 and len(train_losses(run)) == 4
    assert train_or_reuse(build, cfg, run, config=config) == seconds and len(builds) == 2  # reused, never built
    other = {**config, "pe": {"base": 500.0}}
    with pytest.raises(ValueError, match="pe.base"):  # a finished run of another config is not taken for this one
        train_or_reuse(lambda: build(other), cfg, run, config=other)


class SlowTask(ToyTask):
    """Each batch takes a known minimum time, so a run's recorded seconds can be bounded from below."""

    def train_batch(self, step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        time.sleep(0.05)
        return super().train_batch(step, micro, rank, world)


def test_interrupted_run_reports_the_seconds_of_every_part(tmp_path: Path) -> None:
    """A benchmark resumed after a kill reports the whole run's training time, not only the part after the resume."""
    run, cfg = tmp_path / "run", CFG.model_copy(update={"steps": 6, "grad_accum": 1, "eval_every": 0, "save_every": 1})
    config = {"task": "toy", "pe": {"base": 10000.0}, "model": {"width": 16}}
    with pytest.raises(Interrupt):  # 5 slow steps, then killed
        train_or_reuse(lambda: SlowTask(config, crash_at=5), cfg, run, config=config)
    before = json.loads((run / "checkpoints" / "step_00000005" / "state.json").read_text())["elapsed_seconds"]
    assert before >= 5 * 0.05
    seconds = train_or_reuse(lambda: SlowTask(config), cfg, run, config=config)  # the sixth step only
    assert seconds >= before + 0.05 and seconds < before + 5 * 0.05  # both parts, the first counted once


def test_train_config_errors_name_the_field() -> None:
    with pytest.raises(ValidationError, match="stepz"):
        TrainConfig.model_validate({"stepz": 3})
    with pytest.raises(ValidationError, match="schedule"):
        TrainConfig(schedule="exp")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match=r"betas\.1\s+Input should be less than 1"):
        TrainConfig(betas=(0.9, 1.0))
    with pytest.raises(ValidationError, match="compile_backend"):
        TrainConfig(compile=True, compile_backend="inductr")  # type: ignore[arg-type]
    assert lr_at(3, TrainConfig(steps=4, warmup_steps=50, lr=1.0)) == pytest.approx(4 / 50)  # a shortened smoke run


# --- the CLI ---------------------------------------------------------------------------------------

@pytest.fixture
def toy_recipe(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    module = types.ModuleType("toy_recipe")
    module.ToyRecipe = ToyRecipe  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "toy_recipe", module)
    monkeypatch.setitem(recipes.RECIPES, "toy", "toy_recipe:ToyRecipe")
    config = tmp_path / "toy.yaml"
    config.write_text(
        "task: toy\npe:\n  base: 10000.0\nmodel:\n  width: 16\n"
        "train:\n  steps: 4\n  lr: 3e-3\n  log_every: 1\n  device: cpu\n"
    )
    return config


def test_cli_train_overrides_and_resume(toy_recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    overrides = ["--set", "train.steps=2", "--set", "pe.base=1e4"]
    assert main(["train", str(toy_recipe), "--run-dir", str(run), *overrides]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["steps"] == 2 and config["train"]["lr"] == 3e-3 and config["pe"]["base"] == 10000.0
    assert len(train_losses(run)) == 2
    assert main(["train", str(toy_recipe), "--run-dir", str(run)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["train", str(toy_recipe), "--run-dir", str(run), "--resume"]) == 0
    assert len(train_losses(run)) == 4
    assert main(["train", str(toy_recipe), "--run-dir", str(run), "--resume", "--set", "pe.base=1e6"]) == 2
    assert "pe.base: checkpoint has 10000.0, config has 1000000.0" in capsys.readouterr().err


def test_cli_errors_name_the_key(toy_recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = str(tmp_path / "run")
    assert main(["train", str(toy_recipe), "--run-dir", run, "--set", "train.stepz=3"]) == 2
    assert "train.stepz: unknown field 'stepz' (did you mean 'steps'?)" in capsys.readouterr().err
    assert main(["train", str(toy_recipe), "--run-dir", run, "--set", "train.steps.x=3"]) == 2
    assert "train.steps is a value" in capsys.readouterr().err
    assert main(["train", str(toy_recipe), "--run-dir", run, "--set", "task=vid"]) == 2
    assert "unknown task 'vid'" in capsys.readouterr().err
    assert main(["train", str(toy_recipe), "--run-dir", run, "--set", "extra.x=1"]) == 2
    assert "extra: unknown field 'extra'" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_cli_default_run_dir(toy_recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(toy_recipe), "--set", "train.steps=1"]) == 0
    (made,) = (tmp_path / "runs").iterdir()
    assert made.name.startswith("toy-") and (made / "metrics.jsonl").is_file()


@pytest.mark.parametrize(
    ("text", "value"),
    [("10", 10), ("1e-4", 1e-4), ("5E+3", 5000.0), ("0.5", 0.5), ("true", True), ("[1, 2]", [1, 2]), ("abc", "abc"),
     ("null", None)],
)
def test_override_values_use_yaml_semantics(text: str, value: Any) -> None:
    config: dict[str, Any] = {"train": {}}
    recipes.apply_override(config, f"train.x={text}")
    assert config["train"]["x"] == value and type(config["train"]["x"]) is type(value)


def test_recipe_registry_lists_known_tasks() -> None:
    with pytest.raises(ValueError, match=r"unknown task 'nope'; allowed: \[.*'lm'"):
        recipes.get_recipe("nope")


def test_resume_drops_a_torn_last_metrics_line_with_a_warning(tmp_path: Path) -> None:
    """A crash or a full disk mid-append leaves half a line: resume drops it and still matches exactly."""
    train(ToyTask(), CFG, tmp_path / "full")
    with pytest.raises(Interrupt):
        train(ToyTask(crash_at=7), CFG, tmp_path / "cut")
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "split": "tra')
    with pytest.warns(UserWarning, match="torn last line"):
        train(ToyTask(), CFG, tmp_path / "cut", resume=True)
    assert train_losses(tmp_path / "cut") == train_losses(tmp_path / "full")


def test_a_torn_line_inside_metrics_is_named_and_nothing_is_rewritten(tmp_path: Path) -> None:
    with pytest.raises(Interrupt):
        train(ToyTask(crash_at=7), CFG, tmp_path / "cut")
    path = tmp_path / "cut" / "metrics.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "not json", *lines[1:]]) + "\n")
    before = path.read_bytes()
    with pytest.raises(ValueError, match=r"metrics.jsonl line 2 is not JSON"):
        train(ToyTask(), CFG, tmp_path / "cut", resume=True)
    assert path.read_bytes() == before


def test_resume_falls_back_from_a_corrupt_newest_checkpoint(tmp_path: Path) -> None:
    """The newest checkpoint torn after it was marked complete: resume names it, starts from the one before, and
    ends exactly where an uninterrupted run does."""
    train(ToyTask(), CFG, tmp_path / "full")
    with pytest.raises(Interrupt):
        train(ToyTask(crash_at=7), CFG, tmp_path / "cut")  # checkpoints at steps 3 and 6
    newest = tmp_path / "cut" / "checkpoints" / "step_00000006" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])
    with pytest.warns(UserWarning, match=r"step_00000006.*model.safetensors.*trying the one before it"):
        train(ToyTask(), CFG, tmp_path / "cut", resume=True)
    assert train_losses(tmp_path / "cut") == train_losses(tmp_path / "full")
    w_full, w_cut = final_weights(tmp_path / "full"), final_weights(tmp_path / "cut")
    assert all(torch.equal(w_full[k], w_cut[k]) for k in w_full)


def test_every_checkpoint_corrupt_is_one_error_naming_them(tmp_path: Path) -> None:
    with pytest.raises(Interrupt):
        train(ToyTask(crash_at=7), CFG, tmp_path / "cut")
    for state in (tmp_path / "cut" / "checkpoints").glob("step_*/state.json"):
        state.write_text('{"step": ')
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"no checkpoint of .* can be read: .*state.json is torn"):
        train(ToyTask(), CFG, tmp_path / "cut", resume=True)


def test_clip_grad_pe_clips_the_encoder_and_the_rest_apart_as_released() -> None:
    """train.clip_grad_pe: SeqPE's encoder on its own norm, everything else (W_PE included) on another, as the
    released code's two clip_grad_norm_ calls (model, then pe_model); without it, one global norm."""
    from seqpe_nd.encodings import build_position_encoding
    from seqpe_nd.tasks.engine.clipping import clip_gradients, split_for_clipping

    def model_with_grads() -> nn.Module:
        torch.manual_seed(0)
        pe = build_position_encoding({"method": "seqpe", "hidden": 16, "layers": 1}, space={"L": 8, "L_max": 64},
                                     num_heads=2, head_dim=4, num_layers=1, d_model=8)
        model = nn.ModuleDict({"body": nn.Linear(8, 8), "pe": pe})
        for i, p in enumerate(model.parameters()):
            p.grad = torch.full_like(p, 0.5 + i)  # norms far above the limits
        return model

    def norm(params: list[nn.Parameter]) -> float:
        return math.sqrt(sum(float(p.grad.pow(2).sum()) for p in params))

    cfg = TrainConfig(steps=1, clip_grad=5.0, clip_grad_pe=2.0)
    model = model_with_grads()
    pe = model["pe"]
    encoder = list(pe.encoder.parameters())
    rest = [p for n, p in model.named_parameters() if not n.startswith("pe.encoder.")]
    assert any(p is pe.w_pe[0].weight for p in rest)  # W_PE is clipped with the backbone, as released
    before_rest, before_enc = norm(rest), norm(encoder)
    got, got_pe = clip_gradients(split_for_clipping(model, [pe], separate=True), cfg.clip_grad, cfg.clip_grad_pe)
    assert float(got) == pytest.approx(before_rest, rel=1e-5) and float(got_pe) == pytest.approx(before_enc, rel=1e-5)
    assert norm(rest) == pytest.approx(5.0, rel=1e-4) and norm(encoder) == pytest.approx(2.0, rel=1e-4)

    model = model_with_grads()  # default: one norm over every parameter
    params = list(model.parameters())
    before = norm(params)
    got, got_pe = clip_gradients(split_for_clipping(model, [model["pe"]], separate=False), cfg.clip_grad, None)
    assert got_pe is None and float(got) == pytest.approx(before, rel=1e-5) and norm(params) == pytest.approx(5.0, rel=1e-4)
