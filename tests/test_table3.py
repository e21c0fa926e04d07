"""Ensemble/crop averaging, errors and cost of Table 3, on hand-made probability tensors."""

import pytest
import torch

from pipeline.data.crops import crop_subset
from pipeline.evaluate.ensemble import Counts, Table3Accumulator, scheme_indices
from pipeline.evaluate.stats import holm, wilson_interval


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


def _one_hot_probs(correct: list[list[bool]], labels: torch.Tensor, crops: int, classes: int = 3) -> torch.Tensor:
    """probs [M, B, crops, C]: model m puts 0.9 on the right class of image b if correct[m][b], else on
    the next class."""
    m, b = len(correct), len(labels)
    p = torch.full((m, b, crops, classes), 0.1 / (classes - 1))
    for i in range(m):
        for j in range(b):
            cls = int(labels[j]) if correct[i][j] else (int(labels[j]) + 1) % classes
            p[i, j, :, cls] = 0.9
    return p


def test_rows_carry_wilson_intervals_and_comparisons_are_paired():
    # 2 models, 20 images, 1 crop. Model 0 (the "1 model") is right on images 0-9, model 1 on 0-17 and more
    # confident (0.9 vs 0.62), so the 2-model average is right exactly where model 1 is: 8 images that only
    # the single model gets wrong, none the other way round.
    labels = torch.zeros(20, dtype=torch.long)
    probs = _one_hot_probs([[j < 10 for j in range(20)], [j < 18 for j in range(20)]], labels, crops=1)
    probs[0] = probs[0] * 0.5 + 1 / 6  # flatter model 0 (still sums to 1)
    acc = Table3Accumulator([0, 1], [1, 2], [1], 1)
    acc.add(probs, labels)
    rows = {(r["models"], r["rule"]): r for r in acc.table()}
    one, two = rows[(1, "mean")], rows[(2, "mean")]
    assert one["top1_err"] == 0.5 and two["top1_err"] == pytest.approx(0.1)
    assert (one["top1_err_lo"], one["top1_err_hi"]) == pytest.approx(wilson_interval(10, 20))
    assert (two["top1_err_lo"], two["top1_err_hi"]) == pytest.approx(wilson_interval(2, 20))
    comps = [c for c in acc.comparisons() if c["metric"] == "top1"]
    assert len(comps) == 1  # one crop scheme: only 2 vs 1 models
    c = comps[0]
    assert (c["a_models"], c["b_models"], c["only_a_wrong"], c["only_b_wrong"]) == (2, 1, 0, 8)
    assert c["p_mcnemar"] == 2 / 2**8 and c["significant"]
    # Holm over the whole table: this top-1 test and its top-5 twin are one family
    assert c["p_holm"] == pytest.approx(holm([x["p_mcnemar"] for x in acc.comparisons()])[0]) == 2 * c["p_mcnemar"]
    assert c["diff"] == pytest.approx(-0.4)


def test_comparisons_are_the_papers_with_holm_over_the_whole_table():
    torch.manual_seed(1)
    probs = torch.rand(3, 30, 10, 4).softmax(-1)
    labels = torch.randint(0, 4, (30,))
    acc = Table3Accumulator([1, 0, 2], [1, 3], [1, 10], 10)
    acc.add(probs[:, :13], labels[:13])
    acc.add(probs[:, 13:], labels[13:])  # two batches: per-image indicators stay aligned across rows
    comps = acc.comparisons()
    top1 = [(c["a"], c["b"]) for c in comps if c["metric"] == "top1"]
    assert top1 == [("3 models x 1 crops", "1 models x 1 crops"), ("3 models x 10 crops", "1 models x 10 crops"),
                    ("1 models x 10 crops", "1 models x 1 crops"), ("3 models x 10 crops", "3 models x 1 crops")]
    # one family: the 4 top-1 and 4 top-5 comparisons together (family-wise error 5% for the table)
    assert len(comps) == 8
    assert [c["p_holm"] for c in comps] == pytest.approx(holm([c["p_mcnemar"] for c in comps]))
    rows = {(r["models"], r["crops"], r["rule"]): r for r in acc.table()}
    for c in comps:
        a = rows[(c["a_models"], c["a_crops"], "mean")]
        b = rows[(c["b_models"], c["b_crops"], "mean")]
        assert c["diff"] == pytest.approx(a[f"{c['metric']}_err"] - b[f"{c['metric']}_err"])


def test_the_single_model_is_chosen_without_the_evaluated_images():
    from pipeline.evaluate.run import EvaluationError, Replica, choose_single

    reps = [Replica(i, f"s{i}", f"run{i}", "bn", 32, 10, err, {}) for i, err in enumerate([0.30, 0.20, 0.25])]
    order, how = choose_single(reps, "0", disjoint=False)  # fixed in advance: fine even on overlapping images
    assert order == [0, 1, 2] and "fixed in advance" in how
    order, how = choose_single(reps, "best-val", disjoint=True)
    assert order == [1, 2, 0] and "disjoint" in how
    # larger-ensemble rows: by training-time validation error only where those images are disjoint from
    # the evaluated ones; otherwise in replica order (nothing chosen on the images it is scored on)
    assert choose_single(reps, "2", disjoint=True)[0] == [2, 1, 0]
    assert choose_single(reps, "2", disjoint=False)[0] == [2, 0, 1]
    with pytest.raises(EvaluationError, match="overlap"):
        choose_single(reps, "best-val", disjoint=False)
    with pytest.raises(EvaluationError, match="no finished replica 7"):
        choose_single(reps, "7", disjoint=True)
    with pytest.raises(EvaluationError, match="replica index or best-val"):
        choose_single(reps, "best", disjoint=True)


def test_deduplicated_multicrop_equals_the_plain_144(tmp_path):
    """A real model on real DALI crops: computing each distinct crop once and expanding by `inverse`
    gives the plain 144-crop probabilities (to 1e-5) and the same Table 3 rows."""
    from conftest import jpeg_bytes, write_test_split

    from pipeline.data.dali import Normalizer
    from pipeline.data.dali_eval import DALIEvalLoader
    from pipeline.evaluate.run import forward_probs, unpack_eval_batch
    from pipeline.model.googlenet import GoogLeNet

    sizes = [(28, 28), (60, 45), (45, 60), (40, 40), (33, 31)]
    split = write_test_split(tmp_path / "val", [jpeg_bytes(wh, seed=i) for i, wh in enumerate(sizes)],
                             [i % 3 for i in range(5)])
    torch.manual_seed(0)
    models = [GoogLeNet(3, variant="bn", aux_logits=False).eval() for _ in range(2)]
    for m in models:  # He init: the small initial weights leave a fresh model's output the same for every crop
        for mod in m.modules():
            if isinstance(mod, torch.nn.Conv2d | torch.nn.Linear):
                torch.nn.init.kaiming_normal_(mod.weight)
    norm, dev, fmt = Normalizer(), torch.device("cpu"), torch.channels_last
    accs = {}
    for dedup in (False, True):
        acc, got = Table3Accumulator([0, 1], [1, 2], [1, 10, 144], 144), []
        for batch in DALIEvalLoader(split, n_crops=144, input_size=32, batch_size=3, device="cpu", dedup=dedup):
            x, y, inverse, b, k = unpack_eval_batch(batch, 32)
            p = forward_probs([m.to(memory_format=fmt) for m in models], norm(x).contiguous(memory_format=fmt),
                              inverse, b, k, dev, fmt)
            acc.add(p, y)
            got.append(p)
        accs[dedup] = (acc, torch.cat(got, 1))
    (plain, p_plain), (dedup, p_dedup) = accs[False], accs[True]
    assert p_plain.shape == p_dedup.shape == (2, 5, 144, 3)
    assert torch.allclose(p_plain, p_dedup, atol=1e-5)
    assert p_plain.std(2).max() > 1e-3  # the crops really differ: the check is not vacuous
    assert plain.table() == dedup.table()


def test_singles_table_names_replicas_when_one_is_missing():
    """Replicas 0 and 2 finished, 1 did not: the singles table names each row's own replica (it used to
    look positions up as replica indices: KeyError, and an evaluation run left RUNNING)."""
    from pipeline.evaluate.run import Replica, markdown_table

    reps = [Replica(i, f"strategy-{i}", f"run{i}", "bn", 32, 4, 0.1 * (i + 1), {}) for i in (0, 2)]
    torch.manual_seed(0)
    probs = torch.rand(2, 12, 1, 4).softmax(-1)
    acc = Table3Accumulator([1, 0], [1, 2], [1], 1)  # replica 2 (position 1) as the single model
    acc.add(probs, torch.randint(0, 4, (12,)))
    md = markdown_table(acc.table(), acc.singles(), acc.comparisons(), reps, "val", "replica 2", "all")
    single_rows = [line for line in md.splitlines() if "strategy-" in line]
    assert [line.split("|")[1:3] for line in single_rows] == [[" 2 ", " strategy-2 "], [" 0 ", " strategy-0 "]]
