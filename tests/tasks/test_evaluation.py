import json

import pytest
import torch
import torch.nn.functional as F

from seqpe_nd.tasks.engine.evaluation import EVAL_JSON, classify, reject_unknown_options, write_result


def test_classify_matches_the_whole_batch_at_once():
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(10, 3, generator=g), torch.randint(0, 3, (10,), generator=g)
    got = classify(lambda x: x, ((logits[s : s + 4], y[s : s + 4]) for s in range(0, 10, 4)), unit="images")
    assert got["images"] == 10
    assert got["top1"] == pytest.approx(100.0 * float((logits.argmax(-1) == y).float().mean()))
    assert got["loss"] == pytest.approx(float(F.cross_entropy(logits, y)))
    assert got["images_per_s"] > 0 and got["seconds"] >= 0


def test_classify_refuses_an_empty_split():
    with pytest.raises(ValueError, match="no clips to evaluate"):
        classify(lambda x: x, iter(()), unit="clips")


def test_unknown_options_are_named_and_unset_ones_ignored():
    reject_unknown_options("vit", {"lengths": None}, ("resolutions",))
    with pytest.raises(ValueError, match=r"the vit recipe's evaluate\(\) has no option\(s\) \['lengths'\]; allowed: resolutions"):
        reject_unknown_options("vit", {"lengths": [128]}, ("resolutions",))


def test_write_result_replaces_the_file_whole(tmp_path):
    write_result(tmp_path, {"a": 1})
    path = write_result(tmp_path, {"a": 2})
    assert path == tmp_path / EVAL_JSON and json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == [EVAL_JSON]  # no temporary left behind
