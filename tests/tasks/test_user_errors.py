"""Every user mistake gets one clear line: a table of bad inputs across the CLI and the public API.

Each case asserts the exit status (CLI: 2, never a traceback) or the exception type (API: ValueError in
the CLI's words, never pydantic's raw ValidationError, or FileNotFoundError; never AttributeError /
IndexError / TypeError),
that the message names the bad value, and that no run directory changed.
"""

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydantic
import pytest
import torch
import yaml

from seqpe_nd.encodings import build_position_encoding, load_pe_config
from seqpe_nd.positions import load_space
from seqpe_nd.tasks.cli import main
from seqpe_nd.tasks.engine import checkpoint as ckpt
from seqpe_nd.tasks.engine.trainer import train
from seqpe_nd.tasks.recipes import load_config
from seqpe_nd.tasks.recipes.lm import LMConfig, LMRecipe
from seqpe_nd.tasks.recipes.vit import ViTConfig, ViTRecipe
from tests.tasks.test_lm import tiny_config as lm_config
from tests.tasks.test_vit_recipe import tiny_config as vit_config

SIZES = {"num_heads": 2, "head_dim": 8, "num_layers": 1, "d_model": 16}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Trained LM and ViT runs, and a folder of bad files, shared by every case."""
    root = tmp_path_factory.mktemp("errors")
    lm = lm_config(root, pe={"method": "rope"}, steps=2, save_every=0)
    (root / "lm.yaml").write_text(yaml.safe_dump(lm))
    cfg = LMConfig.parse(lm)
    train(LMRecipe.build_task(cfg, root / "lm-run"), cfg.train, root / "lm-run")
    vit = vit_config({"method": "rope_axial"}, steps=1)
    (root / "vit.yaml").write_text(yaml.safe_dump(vit))
    vcfg = ViTConfig.parse(vit)
    train(ViTRecipe.build_task(vcfg, root / "vit-run"), vcfg.train, root / "vit-run")
    bad = root / "bad"
    bad.mkdir()
    (bad / "syntax.yaml").write_text("task: lm\nmodel: {n_layer: 2\n")
    (bad / "binary.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    (bad / "space-typo.yaml").write_text("L: 16\nlmax: 1000\n")
    (bad / "space-syntax.yaml").write_text("L: [16\n")
    (bad / "pe-typo.yaml").write_text("method: rope\nbse: 100.0\n")
    (bad / "hybrid.yaml").write_text(yaml.safe_dump({"kind": "hybrid", "modalities": [
        {"name": "text", "space": {"L": 8, "L_max": 100}}, {"name": "image", "space": {"L": [3, 3], "L_max": [20, 20]}}]}))
    (bad / "unknown-task.yaml").write_text("task: vid\n")
    (bad / "space-of-lm.yaml").write_text(yaml.safe_dump({**lm, "space": "space-typo.yaml"}))  # beside the config
    # copies of the LM run with a torn file each
    for name, tear in (("torn-config", "config.json"), ("torn-weights", "model.safetensors"), ("torn-state", "state.json")):
        run = root / name
        shutil.copytree(root / "lm-run", run)
        target = run / tear if tear == "config.json" else next((run / "checkpoints").glob("step_*")) / tear
        target.write_bytes(target.read_bytes()[: max(1, len(target.read_bytes()) // 3)])
    return {"root": root, "lm": root / "lm-run", "vit": root / "vit-run", "bad": bad}


def snapshot(root: Path) -> dict[str, str]:
    """Every file under the trained runs, by content."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for run in ("lm-run", "vit-run", "torn-config", "torn-weights", "torn-state")
        for p in sorted((root / run).rglob("*")) if p.is_file()
    }


W = "{root}"  # placeholder for the shared folder in argv
# (id, argv with {root}, text the one error line must contain)
CLI: list[tuple[str, list[str], str]] = [
    ("yaml-syntax", ["train", "{root}/bad/syntax.yaml"], "not valid YAML at line 3"),
    ("config-is-a-directory", ["train", "{root}/bad"], "is a directory"),
    ("config-is-binary", ["train", "{root}/bad/binary.yaml"], "not a text file"),
    ("config-missing", ["train", "{root}/nope.yaml"], "nope.yaml' does not exist"),
    ("field-typo-model", ["train", "{root}/lm.yaml", "--set", "model.n_heads=4"], "unknown field 'n_heads' (did you mean 'n_head'?)"),
    ("field-typo-train", ["train", "{root}/lm.yaml", "--set", "train.stpes=4"], "did you mean 'steps'?"),
    ("field-typo-pe", ["train", "{root}/lm.yaml", "--set", "pe.bse=100"], "pe.bse: unknown field 'bse' (did you mean 'base'?)"),
    ("alibi-has-no-base", ["train", "{root}/lm.yaml", "--set", "pe={method: alibi, base: 2}"], "pe.base: unknown field 'base'; allowed: backend, method"),
    ("unknown-method", ["train", "{root}/lm.yaml", "--set", "pe.method=rop"], "pe.method: unknown method 'rop' (did you mean 'rope'?); allowed: nope, ape_sin"),
    ("unknown-choice", ["train", "{root}/lm.yaml", "--set", "train.schedule=cosin"], "train.schedule: 'cosin' is not allowed (did you mean 'cosine'?); allowed: linear, cosine, constant"),
    ("bad-value", ["train", "{root}/lm.yaml", "--set", "train.lr=-1"], "train.lr"),
    ("bad-value-type", ["train", "{root}/lm.yaml", "--set", "train.steps=many"], "'many'"),
    ("space-does-not-fit", ["train", "{root}/lm.yaml", "--set", "model.block_size=32"], "must equal model.block_size = 32"),
    ("space-field-typo", ["train", "{root}/bad/space-of-lm.yaml"], "space-typo.yaml: lmax: unknown field 'lmax' (did you mean 'L_max'?)"),
    ("space-file-missing", ["train", "{root}/lm.yaml", "--set", "space=nowhere.yaml"], "space file 'nowhere.yaml' does not exist; looked for "),
    ("unknown-task", ["train", "{root}/bad/unknown-task.yaml"], "unknown task 'vid' (did you mean 'video'?)"),
    ("override-without-value", ["train", "{root}/lm.yaml", "--set", "train.steps"], "not of the form dotted.key=value"),
    ("override-into-a-value", ["train", "{root}/lm.yaml", "--set", "train.steps.x=1"], "train.steps is a value"),
    ("run-dir-not-empty", ["train", "{root}/lm.yaml", "--run-dir", "{root}/lm-run"], "is not empty"),
    ("resume-without-run-dir", ["train", "{root}/lm.yaml", "--resume"], "--resume needs --run-dir"),
    ("resume-another-pe", ["train", "{root}/lm.yaml", "--run-dir", "{root}/lm-run", "--resume", "--set", "pe.base=20000"], "pe.base: checkpoint has 10000.0, config has 20000.0"),
    ("eval-option-of-vit-on-lm", ["eval", "{root}/lm-run", "--resolutions", "64"], "the lm recipe's evaluation has no option(s) --resolutions; its options: --lengths, --split, --max-tokens"),
    ("eval-zero-length", ["eval", "{root}/lm-run", "--lengths", "32", "0"], "eval.lengths.1: Input should be greater than 0 (got 0)"),
    ("eval-max-tokens-0", ["eval", "{root}/lm-run", "--max-tokens", "0"], "eval.max_tokens: Input should be greater than 0 (got 0)"),
    ("eval-resolution-off-patch", ["eval", "{root}/vit-run", "--resolutions", "26"], "resolution(s) [26] not allowed: multiples of the patch size 4"),
    ("eval-option-of-lm-on-vit", ["eval", "{root}/vit-run", "--lengths", "64"], "the vit recipe's evaluation has no option(s) --lengths; its options: --resolutions, --max-images, --batch-size"),
    ("eval-option-of-video-on-lm", ["eval", "{root}/lm-run", "--sizes", "8x32"], "has no option(s) --sizes"),
    ("eval-not-a-run", ["eval", "{root}/bad"], "has no config.json"),
    ("eval-torn-config", ["eval", "{root}/torn-config"], "config.json is torn or not JSON"),
    ("eval-torn-weights", ["eval", "{root}/torn-weights"], "model.safetensors cannot be read"),
    ("eval-torn-state", ["eval", "{root}/torn-state", "--lengths", "16"], "state.json is torn or not JSON"),
    ("eval-mixed-tasks", ["eval", "{root}/lm-run", "{root}/vit-run"], "different tasks ['lm', 'vit']"),
    ("space-show-syntax", ["space", "show", "{root}/bad/space-syntax.yaml"], "space-syntax.yaml: not valid YAML"),
    ("space-show-negative-num", ["space", "show", "{root}/bad/hybrid.yaml", "--num", "-3"], "--num -3"),
    ("space-show-typo", ["space", "show", "{root}/bad/space-typo.yaml"], "did you mean 'L_max'?"),
    ("space-show-empty-segment", ["space", "show", "{root}/bad/hybrid.yaml", "--segments", "image:0x3"], "image:0x3 has an empty extent"),
    ("space-show-segments-on-grid", ["space", "show", "configs/positions/text-512.yaml", "--segments", "text:3"], "--segments is for hybrid spaces"),
    ("space-show-directory", ["space", "show", "{root}/bad"], "is a directory"),
    ("compare-unknown-method", ["compare", "{root}/lm.yaml", "--methods", "rope-1e5", "--out", "{root}/cmp"], "unknown method 'rope-1e5'"),
    ("compare-jobs-0", ["compare", "{root}/lm.yaml", "--methods", "rope", "--jobs", "0", "--out", "{root}/cmp"], "--jobs 0"),
    ("compare-bad-length-before-training", ["compare", "{root}/lm.yaml", "--methods", "rope", "--lengths", "0", "--out", "{root}/cmp"], "eval.lengths.0: Input should be greater than 0 (got 0)"),
    ("compare-out-is-a-file", ["compare", "{root}/lm.yaml", "--methods", "rope", "--out", "{root}/lm.yaml"], "--out"),
    ("run-dir-is-a-file", ["train", "{root}/lm.yaml", "--run-dir", "{root}/lm.yaml"], "is a file"),
    ("compare-not-lm", ["compare", "{root}/vit.yaml", "--methods", "rope", "--out", "{root}/cmp"], "needs an LM config"),
    ("plot-num-too-small", ["plot", "similarity", "--space", "configs/positions/text-512.yaml", "--num", "1", "--out", "{root}/plots"], "--num = 1"),
    ("plot-extent-not-hxw", ["plot", "similarity", "--space", "configs/positions/image-14x14.yaml", "--extent", "3y3", "--out", "{root}/plots"], "not HxW"),
]


@pytest.mark.parametrize(("argv", "needle"), [c[1:] for c in CLI], ids=[c[0] for c in CLI])
def test_cli_mistakes_are_one_line(world: dict[str, Path], argv: list[str], needle: str,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    before = snapshot(world["root"])
    code = main([a.replace(W, str(world["root"])) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith(f"seqpe-nd {argv[0]}: error: ") and "Traceback" not in err
    assert err.count("\n") == 1, err  # one paragraph
    assert needle in err, err
    assert snapshot(world["root"]) == before
    assert not (world["root"] / "cmp").exists()  # compare refused before it trained (or made) anything


def unchecked(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` without the test suite's run-time type checker (jaxtyping + beartype): what a user's code calls."""
    while hasattr(fn, "__wrapped__"):
        fn = fn.__wrapped__
    return fn


def _prepare(pe: Any, pos: torch.Tensor) -> Any:
    return unchecked(type(pe).prepare)(pe, pos)


def _gpt2() -> Any:
    from seqpe_nd.tasks.recipes.lm import build_model

    cfg = LMConfig.parse({"task": "lm", "model": {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16},
                          "space": {"L": 16, "L_max": 200}, "pe": {"method": "rope"}})
    model = build_model(cfg, vocab_size=50, eos_id=0).eval()
    return lambda **kw: unchecked(type(model).forward)(model, **kw)  # what a user's code runs (no test type checker)


def _vit() -> Any:
    from seqpe_nd.tasks.recipes.vit import build_model

    return build_model(ViTConfig.parse(vit_config({"method": "rope_axial"}))).eval()


def _pe(method: str, **kw: Any) -> Any:
    space = load_space({"L": [4, 4], "L_max": [40, 40]} if method in ("ape_learn", "rope_axial") else {"L": 16, "L_max": 200})
    return build_position_encoding({"method": method, **kw}, space=space, **SIZES)


# (id, call, exception type, text the message must contain)
API: list[tuple[str, Callable[[dict[str, Path]], Any], type[BaseException], str]] = [
    ("space-typo", lambda w: load_space({"L": 4, "lmax": 40}), ValueError, "lmax: unknown field 'lmax' (did you mean 'L_max'?)"),
    ("space-file-typo", lambda w: load_space(w["bad"] / "space-typo.yaml"), ValueError, "did you mean 'L_max'?"),
    ("space-missing", lambda w: load_space(w["bad"] / "none.yaml"), FileNotFoundError, "none.yaml"),
    ("space-directory", lambda w: load_space(w["bad"]), ValueError, "is a directory"),
    ("pe-typo", lambda w: load_pe_config({"method": "rope", "bse": 1.0}), ValueError, "bse: unknown field 'bse' (did you mean 'base'?); allowed: base, method, scaling"),
    ("pe-file-typo", lambda w: load_pe_config(w["bad"] / "pe-typo.yaml"), ValueError, "pe-typo.yaml: bse: unknown field 'bse' (did you mean 'base'?)"),
    ("ape-learn-negative", lambda w: _prepare(_pe("ape_learn"), torch.tensor([[[0, -1]]])), ValueError, "negative coordinate (-1)"),
    ("ape-learn-float", lambda w: _prepare(_pe("ape_learn"), torch.tensor([[[0.5, 1.0]]])), ValueError, "integer positions, got dtype torch.float32"),
    ("rope-negative", lambda w: _prepare(_pe("rope"), torch.tensor([[[3], [-2]]])), ValueError, "negative coordinate (-2)"),
    ("alibi-wrong-width", lambda w: _prepare(_pe("alibi"), torch.zeros(1, 3, 2, dtype=torch.long)), ValueError, "2 coordinates per position"),
    ("rope-axial-2d-unbatched", lambda w: _prepare(_pe("rope_axial"), torch.zeros(3, 2, dtype=torch.long)), ValueError, "shape (batch, tokens, 2)"),
    ("pe-space-of-wrong-type", lambda w: unchecked(build_position_encoding)({"method": "rope"}, space=3.5, **SIZES), ValueError, "got float"),
    ("hybrid-empty-segment", lambda w: load_space(w["bad"] / "hybrid.yaml").layout("text:2, image:0x3"), ValueError, "image:0x3 has an empty extent"),
    ("gpt2-float-positions", lambda w: _gpt2()(input_ids=torch.zeros(1, 5, dtype=torch.long), position_ids=torch.arange(5.0)[None]), ValueError, "integer positions, got dtype torch.float32"),
    ("gpt2-token-outside-vocab", lambda w: _gpt2()(input_ids=torch.full((1, 5), 999), position_ids=torch.arange(5)[None]), ValueError, "token 999, outside the vocabulary 0..49"),
    ("gpt2-positions-do-not-match", lambda w: _gpt2()(input_ids=torch.zeros(1, 5, dtype=torch.long), position_ids=torch.arange(4)[None]), ValueError, "position_ids of shape (1, 4)"),
    ("vit-one-channel", lambda w: _vit()(torch.zeros(1, 1, 16, 16)), ValueError, "input has 1 channels, the patch embedding 3"),
    ("vit-unbatched", lambda w: _vit()(torch.zeros(3, 16, 16)), ValueError, "is not (b, c, height, width)"),
    ("vit-size-off-patch", lambda w: _vit()(torch.zeros(1, 3, 18, 18)), ValueError, "[18, 18] is not a whole number of patches [4, 4]"),
    ("run-config-typo", lambda w: LMConfig.parse({"task": "lm", "modle": {}}), ValueError, "unknown field 'modle' (did you mean 'model'?)"),
    ("run-config-inline-space-typo", lambda w: load_config(w["root"] / "lm.yaml", ["space.Lmax=300"]), ValueError,
     "lm.yaml: space.Lmax: unknown field 'Lmax' (did you mean 'L_max'?); allowed: L, L_max, base"),
    ("run-config-pe-typo", lambda w: load_config(w["root"] / "lm.yaml", ["pe.bse=2"]), ValueError, "pe.bse: unknown field 'bse' (did you mean 'base'?)"),
    ("space-unknown-kind", lambda w: load_space({"kind": "gird", "L": 4, "L_max": 40}), ValueError, "kind: unknown kind 'gird' (did you mean 'grid'?); allowed: grid, hybrid"),
    ("space-hybrid-typo", lambda w: load_space({"kind": "hybrid", "modalitys": []}), ValueError, "unknown field 'modalitys' (did you mean 'modalities'?)"),
    ("space-min-shift-out-of-reach", lambda w: load_space({"L": 16, "L_max": 40, "ood": {"min_shift": 2.0}}), ValueError, "ood.min_shift = 2.0 is not allowed for this space: it must be in [0, 1.5]"),
    ("pe-unknown-method", lambda w: load_pe_config({"method": "rop"}), ValueError, "method: unknown method 'rop' (did you mean 'rope'?); allowed: nope"),
    ("pe-build-typo", lambda w: build_position_encoding({"method": "alibi", "base": 2.0}, space={"L": 16, "L_max": 200}, **SIZES), ValueError, "base: unknown field 'base'; allowed: backend, method"),
    ("pe-build-space-typo", lambda w: build_position_encoding({"method": "rope"}, space={"L": 16, "Lmax": 200}, **SIZES), ValueError, "Lmax: unknown field 'Lmax' (did you mean 'L_max'?)"),
    ("seqpe-ood-without-room", lambda w: build_position_encoding({"method": "seqpe", "hidden": 8, "layers": 1}, space={"L": 16, "L_max": 16}, **SIZES), ValueError,
     "pe.beta = 0.1 trains L_OOD, but space: ood.min_shift = 0.25 is not allowed for this space: it must be in [0, 0]"),
    ("seqpe-ood-heads-do-not-divide", lambda w: build_position_encoding({"method": "seqpe", "hidden": 8, "layers": 1, "ood_heads": 3}, space={"L": 16, "L_max": 200}, **SIZES), ValueError,
     "pe.ood_heads = 3 must divide d_model = 16"),
    ("seqpe-contrast-one-position", lambda w: build_position_encoding({"method": "seqpe", "hidden": 8, "layers": 1, "beta": 0.0}, space={"L": 1, "L_max": 1}, **SIZES), ValueError,
     "pe.alpha = 0.1 trains L_δ, which needs at least 2 positions"),
    ("load-config-syntax", lambda w: load_config(w["bad"] / "syntax.yaml"), ValueError, "syntax.yaml: not valid YAML"),
    ("evaluate-unknown-option", lambda w: LMRecipe.evaluate(w["lm"], resolutions=[64]), ValueError, "['resolutions']"),
    ("evaluate-torn-weights", lambda w: LMRecipe.evaluate(w["root"] / "torn-weights", lengths=[16]), ValueError, "model.safetensors cannot be read"),
    ("load-checkpoint-torn-config", lambda w: ckpt.load_checkpoint(next((w["root"] / "torn-state" / "checkpoints").glob("step_*"))), ValueError, "state.json"),
    ("read-json-torn", lambda w: ckpt.read_json(w["root"] / "torn-config" / "config.json"), ValueError, "config.json is torn"),
]


@pytest.mark.parametrize(("call", "kind", "needle"), [c[1:] for c in API], ids=[c[0] for c in API])
def test_api_mistakes_raise_the_documented_errors(world: dict[str, Path], call: Callable[[dict[str, Path]], Any],
                                                  kind: type[BaseException], needle: str) -> None:
    before = snapshot(world["root"])
    with pytest.raises(kind) as info:
        call(world)
    assert not isinstance(info.value, (AttributeError, IndexError, TypeError, KeyError))
    assert needle in str(info.value), str(info.value)
    assert snapshot(world["root"]) == before


@pytest.mark.parametrize("call", [
    lambda: load_space({"L": 4, "Lmax": 40}),
    lambda: load_space({"kind": "hybrid", "modalities": [{"name": "t", "space": {"L": 4, "L_max": 40, "bse": 3}}]}),
    lambda: load_pe_config({"method": "seqpe", "integration": "attn_scalar"}),
    lambda: build_position_encoding({"method": "rope", "bse": 1.0}, space={"L": 4, "L_max": 40}, **SIZES),
    lambda: LMConfig.parse({"task": "lm", "space": {"L": 4, "Lmax": 40}}),
], ids=["space", "hybrid-modality", "pe-choice", "build", "run-config"])
def test_the_api_speaks_as_the_cli(call: Callable[[], Any]) -> None:
    """One ValueError in the CLI's words: no tagged-union header, no pydantic boilerplate, one line."""
    with pytest.raises(ValueError) as info:
        call()
    text = str(info.value)
    assert not isinstance(info.value, pydantic.ValidationError), text
    assert "tagged-union" not in text and "Extra inputs are not permitted" not in text and "errors.pydantic.dev" not in text
    assert "\n" not in text and ("did you mean" in text or "allowed" in text), text


def test_a_space_may_be_given_as_a_mapping_or_a_path() -> None:
    """What raised AttributeError before is now simply accepted, as everywhere else."""
    pe = build_position_encoding({"method": "rope"}, space={"L": 16, "L_max": 200}, **SIZES)
    assert pe.width == 1
    assert build_position_encoding({"method": "nope"}, space=Path("configs/positions/text-512.yaml"), **SIZES).width == 1


def test_a_bug_still_shows_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a user's mistake is one line: an error of the code itself propagates, traceback and all."""
    import seqpe_nd.tasks.cli.space as space_cmd

    def broken(args: Any) -> int:
        raise KeyError("a bug")

    monkeypatch.setattr(space_cmd, "run_show", broken)
    with pytest.raises(KeyError, match="a bug"):
        main(["space", "show", "configs/positions/text-512.yaml"])


def test_case_counts() -> None:
    kinds = {"cli": len(CLI), "api": len(API)}
    assert sum(kinds.values()) >= 40, kinds


def test_a_run_config_validates_against_its_own_recipe_alone() -> None:
    """An LM config imports the LM recipe only: no timm (the ViT recipes' backbone) in a fresh interpreter."""
    import subprocess
    import sys

    code = ("import sys; from seqpe_nd.tasks.recipes import load_config; "
            "c = load_config('configs/lm/smoke/seqpe.yaml'); print(type(c).__name__, 'timm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["LMConfig", "False"]
