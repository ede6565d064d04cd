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


def test_merge_results_keeps_sizes_not_measured_again():
    from seqpe_nd.tasks.engine.evaluation import merge_results

    before = {"checkpoint": "step_2", "pe": {"method": "rope"}, "lengths": {"64": {"ppl": 3.0}, "16": {"ppl": 1.0}}}
    now = {"checkpoint": "step_2", "pe": {"method": "rope"}, "lengths": {"32": {"ppl": 2.0}, "16": {"ppl": 1.5}}}
    merged, kept, differ = merge_results(before, now, rows_key="lengths", same=["checkpoint", "pe"])
    assert list(merged["lengths"]) == ["16", "32", "64"] and merged["lengths"]["16"] == {"ppl": 1.5}  # by size
    assert kept == ["64"] and differ == []
    other, kept, differ = merge_results({**before, "checkpoint": "step_1"}, now, rows_key="lengths", same=["checkpoint", "pe"])
    assert other == now and kept == [] and differ == ["checkpoint"]  # measured otherwise: replaced, and said why
    assert merge_results(None, now, rows_key="lengths", same=["checkpoint"])[0] == now
    pairs = merge_results({"sizes": {"8x64": {}, "4x32": {}}}, {"sizes": {"8x32": {}}}, rows_key="sizes", same=[])[0]
    assert list(pairs["sizes"]) == ["4x32", "8x32", "8x64"]
