"""Ensemble x multi-crop evaluation (paper sec. 7, Table 3), as pure accumulation over batches.

For each batch the evaluator holds softmax probabilities `probs[M, B, K, C]` (M models, B images, K
crops of the largest scheme, C classes). A row of Table 3 is (models, crops, rule):
- rule "mean": average the probabilities over the crops of the scheme, then over the models (the
  paper's rule: "averaging ... softmax probabilities over multiple crops and over all the
  individual classifiers");
- rule "max": the best crop's probability per class, then the average over models (the alternative
  the paper mentions trying).
The models of a row are the first `models` of `ranking` (the evaluation job puts the chosen single
model first; see pipeline.evaluate.run). Counts are summed over batches (and ranks) and each row keeps
one bit per image and metric (right or wrong), for the paired tests of `comparisons`; no per-image
probabilities are kept, so memory stays small (a few bytes per image and row).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.data.crops import crop_subset
from pipeline.evaluate.stats import compare, holm, wilson_interval

# The paper's Table 3 (ImageNet val, top-5 error %), for reference beside ours.
PAPER_TABLE3 = [(1, 1, 10.07), (1, 10, 9.15), (1, 144, 7.89), (7, 1, 8.09), (7, 10, 7.62), (7, 144, 6.67)]


@dataclass
class Counts:
    n: int = 0
    top1: int = 0
    top5: int = 0
    per_class_n: dict[int, int] = field(default_factory=dict)
    per_class_top1: dict[int, int] = field(default_factory=dict)
    wrong1: list[np.ndarray] = field(default_factory=list)  # per image, in evaluation order: top-1 wrong
    wrong5: list[np.ndarray] = field(default_factory=list)

    def add(self, p: torch.Tensor, labels: torch.Tensor, per_class: bool = False) -> None:
        """p: [B, C] scores on any device (labels on the same); only the per-image hits come to the host."""
        k = min(5, p.shape[-1])
        top = p.topk(k, dim=-1).indices
        hit1 = (top[:, 0] == labels).cpu()
        hit5 = (top == labels[:, None]).any(1).cpu()
        self.n += len(labels)
        self.top1 += int(hit1.sum())
        self.top5 += int(hit5.sum())
        self.wrong1.append((~hit1).numpy().copy())
        self.wrong5.append((~hit5).numpy().copy())
        if per_class:
            for c, h in zip(labels.tolist(), hit1.tolist(), strict=True):
                self.per_class_n[c] = self.per_class_n.get(c, 0) + 1
                self.per_class_top1[c] = self.per_class_top1.get(c, 0) + int(h)

    def merge(self, other: Counts) -> None:
        self.n += other.n
        self.top1 += other.top1
        self.top5 += other.top5
        self.wrong1 += other.wrong1
        self.wrong5 += other.wrong5
        for c, v in other.per_class_n.items():
            self.per_class_n[c] = self.per_class_n.get(c, 0) + v
            self.per_class_top1[c] = self.per_class_top1.get(c, 0) + other.per_class_top1[c]

    @property
    def top1_err(self) -> float:
        return 1 - self.top1 / self.n if self.n else float("nan")

    @property
    def top5_err(self) -> float:
        return 1 - self.top5 / self.n if self.n else float("nan")

    def wrong(self, metric: str) -> np.ndarray:
        """Per-image error indicators ("top1" or "top5"), in the order the images were added."""
        parts = self.wrong1 if metric == "top1" else self.wrong5
        return np.concatenate(parts) if parts else np.zeros(0, dtype=bool)

    def interval(self, metric: str) -> tuple[float, float]:
        """95% Wilson interval of the error rate."""
        hits = self.top1 if metric == "top1" else self.top5
        return wilson_interval(self.n - hits, self.n) if self.n else (float("nan"), float("nan"))

    def summary(self) -> dict:
        out = {"images": self.n}
        for e in ("top1", "top5"):
            lo, hi = self.interval(e)
            out |= {f"{e}_err": getattr(self, f"{e}_err"), f"{e}_err_lo": lo, f"{e}_err_hi": hi}
        return out


def scheme_indices(largest: int, schemes: list[int]) -> dict[int, list[int]]:
    """Positions of each scheme's crops inside the largest scheme's crop list (1 and 10 lie in 144)."""
    base = crop_subset(largest)
    pos = {c: i for i, c in enumerate(base)}
    out = {}
    for n in schemes:
        if n > largest:
            raise ValueError(f"crop scheme {n} is larger than the evaluated {largest}")
        out[n] = [pos[c] for c in crop_subset(n)]
    return out


class Table3Accumulator:
    """Counts for every (models, crops, rule) row and for every single model, batch after batch."""

    def __init__(self, ranking: list[int], model_counts: list[int], schemes: list[int], largest: int):
        self.ranking = ranking  # model indices: the 1-model row's model first, then the order of larger rows
        self.model_counts = model_counts
        self.schemes = scheme_indices(largest, schemes)
        self.rows: dict[tuple[int, int, str], Counts] = {
            (m, n, rule): Counts() for m in model_counts for n in schemes for rule in ("mean", "max")}
        self.single: dict[tuple[int, int], Counts] = {(i, n): Counts() for i in ranking for n in schemes}

    def add(self, probs: torch.Tensor, labels: torch.Tensor) -> None:
        """probs: [M, B, K, C] softmax probabilities of every model and crop of the largest scheme, on any
        device (the GPU keeps them: a 144-crop ImageNet batch of 8 is 32 MB per model)."""
        labels = labels.to(probs.device)
        for n, idx in self.schemes.items():
            sub = probs[:, :, idx]  # [M, B, k, C]
            mean_c, max_c = sub.mean(2), sub.amax(2)  # [M, B, C]
            for i in self.ranking:
                self.single[(i, n)].add(mean_c[i], labels)
            for m in self.model_counts:
                chosen = self.ranking[:m]
                largest_row = m == max(self.model_counts) and n == max(self.schemes)
                self.rows[(m, n, "mean")].add(mean_c[chosen].mean(0), labels, per_class=largest_row)
                self.rows[(m, n, "max")].add(max_c[chosen].mean(0), labels)

    def merge(self, other: Table3Accumulator) -> None:
        for k, c in other.rows.items():
            self.rows[k].merge(c)
        for k, c in other.single.items():
            self.single[k].merge(c)

    def table(self) -> list[dict]:
        """Rows of Table 3: models, crops, rule, cost (forward passes per image), errors, delta vs base."""
        base = self.rows[(min(self.model_counts), min(self.schemes), "mean")]
        out = []
        for rule in ("mean", "max"):
            for m in self.model_counts:
                for n in self.schemes:
                    c = self.rows[(m, n, rule)]
                    out.append({"models": m, "crops": n, "rule": rule, "cost": m * n} | c.summary()
                               | {"delta_top5": c.top5_err - base.top5_err})
        return out

    def singles(self) -> list[dict]:
        """Every single model at every crop scheme, with intervals (ranking order)."""
        return [{"model": i, "crops": n} | self.single[(i, n)].summary() for i in self.ranking for n in self.schemes]

    def comparisons(self, rule: str = "mean") -> list[dict]:
        """The paper's comparisons, paired on the same images: all models vs 1 at each crop scheme, and
        each larger crop scheme vs 1 crop at each model count; for top-1 and top-5 error. The p-values
        are Holm-adjusted over all of them together (top-1 and top-5: one family, so the family-wise
        error of the whole table is 5%); `significant` is adjusted p < 0.05."""
        pairs = []
        ms, ns = self.model_counts, sorted(self.schemes)
        if len(ms) > 1:
            pairs += [((ms[-1], n), (ms[0], n)) for n in ns]
        pairs += [((m, n), (m, ns[0])) for m in ms for n in ns[1:]]
        out = []
        for metric in ("top1", "top5"):
            for (ma, na), (mb, nb) in pairs:
                ra, rb = self.rows[(ma, na, rule)], self.rows[(mb, nb, rule)]
                out.append({"metric": metric, "rule": rule, "a": f"{ma} models x {na} crops",
                            "b": f"{mb} models x {nb} crops", "a_models": ma, "a_crops": na, "b_models": mb,
                            "b_crops": nb} | compare(ra.wrong(metric), rb.wrong(metric)))
        for c, adj in zip(out, holm([c["p_mcnemar"] for c in out]), strict=True):
            c["p_holm"] = adj
            c["significant"] = adj < 0.05
        return out

    def single_summary(self) -> dict[int, dict]:
        """Per crop scheme: mean and spread (std) of the single replicas' errors."""
        out = {}
        for n in self.schemes:
            t1 = torch.tensor([self.single[(i, n)].top1_err for i in self.ranking], dtype=torch.float64)
            t5 = torch.tensor([self.single[(i, n)].top5_err for i in self.ranking], dtype=torch.float64)
            out[n] = {"top1_mean": float(t1.mean()), "top1_std": float(t1.std(unbiased=False)),
                      "top1_min": float(t1.min()), "top1_max": float(t1.max()),
                      "top5_mean": float(t5.mean()), "top5_std": float(t5.std(unbiased=False))}
        return out
