"""Ensemble/crop averaging, errors and cost of Table 3, on hand-made probability tensors."""

import pytest
import torch

from pipeline.evaluate.crops import crop_subset
from pipeline.evaluate.ensemble import Counts, Table3Accumulator, scheme_indices


def test_counts_top1_top5():
    c = Counts()
    p = torch.tensor([[0.1, 0.6, 0.3, 0, 0, 0, 0],
                      [0.5, 0.2, 0.1, 0.09, 0.06, 0.03, 0.02],
                      [0.5, 0.2, 0.1, 0.09, 0.06, 0.03, 0.02]])
    c.add(p, torch.tensor([1, 4, 6]))  # right; 5th best; 7th best
    assert (c.n, c.top1, c.top5) == (3, 1, 2)
    assert c.top1_err == pytest.approx(2 / 3) and c.top5_err == pytest.approx(1 / 3)


def test_schemes_are_positions_within_the_largest():
    idx = scheme_indices(144, [1, 10, 144])
    assert idx[144] == list(range(144)) and idx[10] == crop_subset(10) and idx[1] == crop_subset(1)
    assert scheme_indices(10, [1, 10])[1] == [crop_subset(10).index(crop_subset(1)[0])]
    with pytest.raises(ValueError):
        scheme_indices(10, [144])


def test_mean_and_max_rules_models_and_cost_by_hand():
    # 2 models, 1 image, 10 crops, 3 classes; true label 2.
    probs = torch.zeros(2, 1, 10, 3)
    probs[0, 0, :, :] = torch.tensor([0.5, 0.1, 0.4])  # model 0: wrong on every crop, 2nd guess right
    probs[0, 0, 3] = torch.tensor([0.0, 0.0, 1.0])  # ...except one confident crop
    probs[1, 0, :, :] = torch.tensor([0.2, 0.2, 0.6])  # model 1: right everywhere
    ranking = [0, 1]  # model 0 has the better single-crop val error (given)
    acc = Table3Accumulator(ranking, [1, 2], [1, 10], 10)
    acc.add(probs, torch.tensor([2]))
    rows = {(r["models"], r["crops"], r["rule"]): r for r in acc.table()}
    one_crop = crop_subset(10).index(crop_subset(1)[0])  # position of the center crop among the 10
    assert one_crop == 8
    # 1 model (model 0), 1 crop: [0.5, 0.1, 0.4] -> wrong top-1, right top-5
    assert rows[(1, 1, "mean")]["top1_err"] == 1.0 and rows[(1, 1, "mean")]["top5_err"] == 0.0
    # 1 model, 10 crops, mean: class 0 = (9*0.5)/10 = 0.45, class 2 = (9*0.4 + 1)/10 = 0.46 -> right
    assert rows[(1, 10, "mean")]["top1_err"] == 0.0
    # max rule: class 0 max 0.5, class 2 max 1.0 -> right
    assert rows[(1, 10, "max")]["top1_err"] == 0.0
    # 2 models, 1 crop: mean([0.5,0.1,0.4],[0.2,0.2,0.6]) = [0.35, 0.15, 0.5] -> right
    assert rows[(2, 1, "mean")]["top1_err"] == 0.0
    assert [(r["models"], r["crops"], r["cost"]) for r in acc.table() if r["rule"] == "mean"] == \
        [(1, 1, 1), (1, 10, 10), (2, 1, 2), (2, 10, 20)]
    assert rows[(1, 10, "mean")]["delta_top5"] == 0.0
    singles = acc.single_summary()
    assert singles[1]["top1_mean"] == 0.5 and singles[1]["top1_std"] == 0.5  # model 0 wrong, model 1 right


def test_merging_ranks_equals_one_pass():
    torch.manual_seed(0)
    probs = torch.rand(3, 8, 10, 5).softmax(-1)
    labels = torch.randint(0, 5, (8,))
    whole = Table3Accumulator([2, 0, 1], [1, 3], [1, 10], 10)
    whole.add(probs, labels)
    a, b = Table3Accumulator([2, 0, 1], [1, 3], [1, 10], 10), Table3Accumulator([2, 0, 1], [1, 3], [1, 10], 10)
    a.add(probs[:, :5], labels[:5])
    b.add(probs[:, 5:], labels[5:])
    a.merge(b)
    assert a.table() == whole.table()
    per_class = a.rows[(3, 10, "mean")]
    assert sum(per_class.per_class_n.values()) == 8
