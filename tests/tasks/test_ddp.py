"""DDP: two CPU processes on gloo train in sync, only rank 0 writes, and an interrupted run resumes exactly."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = textwrap.dedent(
    """
    import builtins, os, sys
    from pathlib import Path

    sys.path.insert(0, {tests!r})
    import torch.distributed as dist
    from safetensors.torch import save_file

    from seqpe_nd.tasks.engine import checkpoint as ckpt
    from seqpe_nd.tasks.engine.trainer import train
    from test_trainer import CFG, Interrupt, ToyTask

    out = Path(sys.argv[1])
    runs = out / "runs"
    rank = int(os.environ["RANK"])

    if rank != 0:  # any write under runs/ by another rank is an error
        def guard(fn, flagged=lambda *a, **k: True):
            def wrapped(*args, **kwargs):
                for a in args[:2]:
                    if isinstance(a, (str, os.PathLike)) and str(a).startswith(str(runs)) and flagged(*args, **kwargs):
                        raise AssertionError(f"rank {{rank}} wrote {{a}}")
                return fn(*args, **kwargs)
            return wrapped
        writes = lambda path, mode="r", *a, **k: any(c in mode for c in "wax+")
        builtins.open = guard(builtins.open, writes)
        os.open = guard(os.open, lambda path, flags, *a, **k: flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        os.replace = guard(os.replace)
        os.mkdir = guard(os.mkdir)
        ckpt.save_checkpoint = guard(ckpt.save_checkpoint)

    cfg = CFG.model_copy(update={{"steps": 6, "save_every": 2, "eval_every": 3}})
    if sys.argv[2] == "own":
        task = ToyTask()
        train(task, cfg, runs / "full")  # train() makes the gloo group from torchrun's env and destroys it
        assert not dist.is_initialized()
        save_file(dict(task.model.state_dict()), str(out / f"params{{rank}}.safetensors"))
    else:
        # A group made by the caller is used and left alone. (torchrun's store does not allow a
        # second group after destroying one, hence a second launch rather than a second call.)
        dist.init_process_group("gloo")
        try:
            train(ToyTask(crash_at=3), cfg, runs / "cut")
        except Interrupt:
            pass
        train(ToyTask(), cfg, runs / "cut", resume=True)
        assert dist.is_initialized()
        dist.destroy_process_group()
    """
)


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_gloo_processes_train_in_sync_and_resume_exactly(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launches = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
             str(script), str(tmp_path), mode],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True,
        )
        for mode in ("own", "given")
    ]
    try:
        for proc in launches:
            out, _ = proc.communicate(timeout=240)
            assert proc.returncode == 0, out[-4000:]
    finally:
        for proc in launches:  # never leave workers behind, whatever failed
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    p0, p1 = load_file(str(tmp_path / "params0.safetensors")), load_file(str(tmp_path / "params1.safetensors"))
    assert p0.keys() == p1.keys()
    for k in p0:
        assert torch.equal(p0[k], p1[k]), f"ranks diverged on {k}"

    full, cut = tmp_path / "runs" / "full", tmp_path / "runs" / "cut"
    train_full = [r for r in records(full) if r["split"] == "train"]
    assert [r["step"] for r in train_full] == [1, 2, 3, 4, 5, 6]  # one line per step: only rank 0 logs
    assert [r["step"] for r in records(full) if r["split"] == "val"] == [3, 6]
    assert [r["loss"] for r in records(cut) if r["split"] == "train"] == [r["loss"] for r in train_full]

    latest = (full / "checkpoints" / "latest").read_text().strip()
    saved = load_file(str(full / "checkpoints" / latest / "model.safetensors"))
    for k, v in saved.items():
        assert torch.equal(v, p0[k])
    rng = json.loads((full / "checkpoints" / latest / "rng.json").read_text())["__dict__"]
    assert sorted(rng) == ["rank0", "rank1"]  # every rank's RNG streams are checkpointed by rank 0
    state = json.loads((full / "checkpoints" / latest / "state.json").read_text())
    assert state["world"] == 2 and state["step"] == 6
