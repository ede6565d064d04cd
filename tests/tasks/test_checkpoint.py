"""Checkpoints: pickle-free round trips, atomicity under injected failures, rotation, config diffs."""

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from seqpe_nd.tasks.engine import checkpoint as ckpt


class Tied(nn.Module):
    """Embedding and output layer share a weight, as GPT-2's do."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(11, 4)
        self.lm_head = nn.Linear(4, 11, bias=False)
        self.lm_head.weight = self.wte.weight
        self.norm = nn.LayerNorm(4)


def trained_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW(
        [
            {"params": [model.wte.weight], "weight_decay": 0.1},
            {"params": list(model.norm.parameters()), "weight_decay": 0.0},
        ],
        lr=1e-2, betas=(0.8, 0.95),
    )
    for _ in range(2):
        out = model.lm_head(model.norm(model.wte(torch.tensor([[1, 2, 3]]))))
        out.square().mean().backward()
        opt.step()
        opt.zero_grad()
    return opt


RNG = torch.Generator().manual_seed(5).get_state()


def save(run: Path, step: int, model: nn.Module, opt: torch.optim.Optimizer, **kw: Any) -> Path:
    return ckpt.save_checkpoint(
        run, step, model=model, optimizer=opt.state_dict(),
        rng={"rank0": {"cpu": RNG, "seed": 3}}, state={"world": 1, "seed": 3},
        config={"pe": {"base": 10000.0}, "train": {"lr": 1e-2}}, **kw,
    )


def test_flatten_round_trip_keeps_types() -> None:
    obj = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2, 3)}, 1: {}},
        "groups": [{"betas": (0.9, 0.99), "params": [0, 1], "name": None, "flag": True, "lr": float("inf")}],
    }
    tree, tensors = ckpt.flatten_state(obj)
    back = ckpt.unflatten_state(tree, tensors)
    assert back["groups"] == obj["groups"] and isinstance(back["groups"][0]["betas"], tuple)
    assert list(back["state"]) == [0, 1] and back["state"][1] == {}
    assert torch.equal(back["state"][0]["exp_avg"], obj["state"][0]["exp_avg"])
    assert back["state"][0]["step"].shape == ()


def test_flatten_keeps_tensors_whose_dotted_paths_collide() -> None:
    obj = {"a.b": torch.zeros(1), "a": {"b": torch.ones(1)}}
    back = ckpt.unflatten_state(*ckpt.flatten_state(obj))
    assert torch.equal(back["a.b"], torch.zeros(1)) and torch.equal(back["a"]["b"], torch.ones(1))


def test_flatten_refuses_objects_that_would_need_pickle() -> None:
    with pytest.raises(TypeError, match=r"type object at 'a\.b'"):
        ckpt.flatten_state({"a": {"b": object()}})


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Tied()
    opt = trained_optimizer(model)
    path = save(tmp_path, 5, model, opt)
    assert sorted(p.suffix for p in path.iterdir()) == [".json"] * 4 + [".safetensors"] * 3  # no pickle anywhere

    fresh = Tied()
    ckpt.load_weights(fresh, tmp_path)
    assert fresh.lm_head.weight is fresh.wte.weight  # tying survives
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), name

    loaded = ckpt.load_checkpoint(tmp_path)
    assert loaded.path == path and loaded.step == 5 and loaded.state["world"] == 1
    assert loaded.config == {"pe": {"base": 10000.0}, "train": {"lr": 1e-2}}
    assert torch.equal(loaded.rng["rank0"]["cpu"], RNG) and loaded.rng["rank0"]["seed"] == 3
    opt2 = torch.optim.AdamW(
        [{"params": [fresh.wte.weight]}, {"params": list(fresh.norm.parameters())}], lr=0.5,
    )
    opt2.load_state_dict(loaded.optimizer)
    want, got = opt.state_dict(), opt2.state_dict()
    assert got["param_groups"] == want["param_groups"]
    for i, s in want["state"].items():
        for k, v in s.items():
            assert torch.equal(got["state"][i][k], v), (i, k)


def test_failure_mid_save_leaves_previous_checkpoint_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = Tied()
    opt = trained_optimizer(model)
    first = save(tmp_path, 1, model, opt)
    before = {p.name: p.read_bytes() for p in first.iterdir()}

    real = ckpt._save_tree

    def crash_on_rng(directory: Path, stem: str, obj: Any) -> None:
        if stem == "rng":
            raise OSError("disk full (injected)")
        real(directory, stem, obj)

    monkeypatch.setattr(ckpt, "_save_tree", crash_on_rng)
    with pytest.raises(OSError, match="injected"):
        save(tmp_path, 2, model, opt, keep_last=1)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000001"]  # no half checkpoint, no temp dir
    assert (root / "latest").read_text().strip() == "step_00000001"
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    assert ckpt.load_checkpoint(tmp_path).step == 1


def test_failure_before_pointer_update_still_resumes_from_a_complete_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = Tied()
    opt = trained_optimizer(model)
    save(tmp_path, 1, model, opt)

    def crash(path: Path, text: str) -> None:
        raise OSError("killed before moving the pointer (injected)")

    monkeypatch.setattr(ckpt, "atomic_write_text", crash)
    with pytest.raises(OSError, match="injected"):
        save(tmp_path, 2, model, opt, keep_last=1)
    assert ckpt.load_checkpoint(tmp_path).step == 1  # the pointer still names a complete checkpoint
    (tmp_path / "checkpoints" / "latest").unlink()
    assert ckpt.load_checkpoint(tmp_path).step == 2  # without a pointer: the newest complete one


def test_keep_last_rotation_and_stale_temp_dirs(tmp_path: Path) -> None:
    model = Tied()
    opt = trained_optimizer(model)
    stale = tmp_path / "checkpoints" / ".tmp-step_00000009.12345"
    stale.mkdir(parents=True)
    for step in range(1, 6):
        save(tmp_path, step, model, opt, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000004", "step_00000005"]
    assert not stale.exists()
    save(tmp_path, 5, model, opt, keep_last=2)  # the same step again replaces it in place
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_00000005"
    save(tmp_path, 6, model, opt, keep_last=0)
    assert len(ckpt.list_checkpoints(tmp_path)) == 3


def test_diff_configs_names_dotted_paths() -> None:
    expected = {"pe": {"base": 1000000.0, "k": 5, "dims": [1, 2]}, "model": {"layers": 2}, "new": 1}
    found = {"pe": {"base": 10000.0, "k": 5.0, "dims": (1, 2)}, "model": {"layers": 2, "old": True}}
    assert ckpt.diff_configs(expected, found) == [
        "model.old: checkpoint has True, config has no such field",
        "new: checkpoint has no such field, config has 1",
        "pe.base: checkpoint has 10000.0, config has 1000000.0",
    ]
    assert ckpt.diff_configs(expected, expected) == []


def test_load_checkpoint_refuses_a_different_pe_config(tmp_path: Path) -> None:
    model = Tied()
    save(tmp_path, 1, model, trained_optimizer(model))
    expected = {"pe": {"base": 1000000.0}, "train": {"lr": 5e-5}}
    with pytest.raises(ValueError, match=r"pe\.base: checkpoint has 10000\.0, config has 1000000\.0") as err:
        ckpt.load_checkpoint(tmp_path, expected_config=expected)
    assert "train.lr" not in str(err.value)  # only the strict sections are refused
    assert ckpt.load_checkpoint(tmp_path, expected_config=expected, strict_sections=("model",)).step == 1


def test_load_weights_names_mismatched_keys(tmp_path: Path) -> None:
    model = Tied()
    save(tmp_path, 1, model, trained_optimizer(model))
    with pytest.raises(ValueError, match=r"unexpected \['lm_head.weight', 'norm.bias', 'norm.weight'\]"):
        ckpt.load_weights(nn.Sequential(), tmp_path)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        ckpt.load_checkpoint(tmp_path / "nowhere")


def test_a_field_added_later_and_unset_is_no_difference() -> None:
    """A run saved before an optional field existed (e.g. rope's ``scaling``) still loads while the field is unset."""
    assert ckpt.diff_configs({"pe": {"base": 1.0, "scaling": None}}, {"pe": {"base": 1.0}}) == []
    assert ckpt.diff_configs({"pe": {"base": 1.0, "scaling": {"type": "linear"}}}, {"pe": {"base": 1.0}}) == [
        "pe.scaling: checkpoint has no such field, config has {'type': 'linear'}"
    ]
