"""``seqpe-nd export RUN_DIR --out DIR``: a trained run as a model others load without this project's run layout.

- ``lm`` and ``qa`` runs: the Hugging Face format (``save_pretrained``: ``config.json`` recording the PE and its
  space, ``model.safetensors``, the tokenizer), loaded back by ``AutoModelForCausalLM.from_pretrained(DIR)`` and
  ``AutoTokenizer.from_pretrained(DIR)`` after ``import seqpe_nd.tasks.attach`` (which registers the PE classes).
- ``vit`` runs: the timm format of :func:`seqpe_nd.tasks.backbones.timm_vit.save_vit`, loaded back by
  ``load_vit(DIR)`` (a timm ``VisionTransformer`` with the PE attached).
"""

import argparse
from pathlib import Path

from seqpe_nd.tasks.engine import checkpoint as ckpt
from seqpe_nd.tasks.engine.evaluation import read_run_config
from seqpe_nd.tasks.recipes import get_recipe

EXPORTABLE = ("lm", "qa", "vit")


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("export", help="write a trained run as a shareable model (Hugging Face or timm format)")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a training run directory (lm, qa or vit)")
    p.add_argument("--out", type=Path, required=True, help="directory to write (must be new or empty)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="checkpoint directory (default: the one the run is evaluated with: QA's best, else the latest)")
    p.set_defaults(func=run_export)


def export_run(run_dir: Path, out: Path, checkpoint: Path | None = None) -> Path:
    """Write ``run_dir``'s model to ``out``; every check (task, checkpoint, free destination) runs before writing."""
    run_dir, out = Path(run_dir), Path(out)
    task = read_run_config(run_dir).get("task")
    if task not in EXPORTABLE:
        raise ValueError(f"{run_dir}: export writes runs of task {', '.join(EXPORTABLE)}; this one is {task!r}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not an empty directory; nothing was written")
    recipe = get_recipe(task).from_run(run_dir)
    found = ckpt.resolve_checkpoint(checkpoint) if checkpoint is not None else recipe.trained_checkpoint()
    model = recipe.load_trained(found)
    if task == "vit":
        from seqpe_nd.tasks.backbones.timm_vit import from_wrapper, save_vit

        save_vit(from_wrapper(model), out)
    else:
        from transformers import PreTrainedTokenizerFast

        from seqpe_nd.tasks.data.text import load_tokenizer

        model.save_pretrained(out)
        tok = load_tokenizer(recipe.cfg.lm_data, section="lm_data") if task == "qa" else load_tokenizer(recipe.cfg.data)
        PreTrainedTokenizerFast(tokenizer_object=tok.tokenizer, eos_token=tok.tokenizer.id_to_token(tok.eos_id)
                                ).save_pretrained(out)
    print(f"wrote {out} ({task} run {run_dir}, checkpoint {found.name})")
    return out


def run_export(args: argparse.Namespace) -> int:
    export_run(args.run_dir, args.out, args.checkpoint)
    return 0
