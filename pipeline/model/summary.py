"""Table 1 of the paper, computed from a built GoogLeNet.

Counted as the paper counts: params = weights of conv/linear layers (no biases, no BatchNorm), ops =
multiply-adds of conv/linear layers (weights x output positions). Every figure comes from the model
and a forward pass at the given input size; the paper's own columns are printed beside them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.model.googlenet import INCEPTION_SPECS, GoogLeNet

# The paper's Table 1 (ImageNet, 224x224): name -> (output size, depth, params, ops) as printed there.
PAPER_TABLE1 = {
    "conv1": ("112x112x64", 1, "2.7K", "34M"),
    "pool1": ("56x56x64", 0, "", ""),
    "conv2": ("56x56x192", 2, "112K", "360M"),
    "pool2": ("28x28x192", 0, "", ""),
    "inception3a": ("28x28x256", 2, "159K", "128M"),
    "inception3b": ("28x28x480", 2, "380K", "304M"),
    "pool3": ("14x14x480", 0, "", ""),
    "inception4a": ("14x14x512", 2, "364K", "73M"),
    "inception4b": ("14x14x512", 2, "437K", "88M"),
    "inception4c": ("14x14x512", 2, "463K", "100M"),
    "inception4d": ("14x14x528", 2, "580K", "119M"),
    "inception4e": ("14x14x832", 2, "840K", "170M"),
    "pool4": ("7x7x832", 0, "", ""),
    "inception5a": ("7x7x832", 2, "1072K", "54M"),
    "inception5b": ("7x7x1024", 2, "1388K", "71M"),
    "avgpool": ("1x1x1024", 0, "", ""),
    "dropout": ("1x1x1024", 0, "", ""),
    "linear": ("1x1x1000", 1, "1000K", "1M"),
    "softmax": ("1x1x1000", 0, "", ""),
}


@dataclass
class Row:
    name: str
    type: str
    patch: str
    out: tuple[int, int, int]  # H, W, C
    depth: int
    filters: tuple  # #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj ("" where not applicable)
    params: int
    ops: int


def _row_modules(model: GoogLeNet) -> list[tuple[str, str, str, list[nn.Module], int, tuple]]:
    paper = model.variant == "paper"
    pool4 = "3x3/2" if paper else "2x2/2"
    rows = [("conv1", "convolution", "7x7/2", [model.conv1], 1, ("",) * 6),
            ("pool1", "max pool", "3x3/2", [model.maxpool1], 0, ("",) * 6),
            ("conv2", "convolution", "3x3/1", [model.conv2, model.conv3], 2, ("", 64, 192, "", "", "")),
            ("pool2", "max pool", "3x3/2", [model.maxpool2], 0, ("",) * 6)]
    for name, *spec in INCEPTION_SPECS:
        rows.append((name, "inception", "", [getattr(model, name)], 2, tuple(spec)))
        if name == "inception3b":
            rows.append(("pool3", "max pool", "3x3/2", [model.maxpool3], 0, ("",) * 6))
        if name == "inception4e":
            rows.append(("pool4", "max pool", pool4, [model.maxpool4], 0, ("",) * 6))
    rows += [("avgpool", "avg pool", "7x7/1", [model.avgpool], 0, ("",) * 6),
             ("dropout", f"dropout ({model.dropout.p:.0%})", "", [model.dropout], 0, ("",) * 6),
             ("linear", "linear", "", [model.fc], 1, ("",) * 6)]
    return rows


def table1(model: GoogLeNet, input_size: int = 224) -> list[Row]:
    """One Row per line of Table 1, measured on `model` with a forward pass (eval mode)."""
    spatial: dict[nn.Module, tuple[int, ...]] = {}
    hooks = [m.register_forward_hook(lambda mod, _inp, out: spatial.__setitem__(mod, tuple(out.shape)))
             for m in model.modules() if m is not model]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, input_size, input_size))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)

    def shape_hwc(m: nn.Module) -> tuple[int, int, int]:
        s = spatial[m]
        return (s[2], s[3], s[1]) if len(s) == 4 else (1, 1, s[1])

    rows = []
    for name, typ, patch, mods, depth, filters in _row_modules(model):
        params = ops = 0
        for top in mods:
            for m in top.modules():
                if isinstance(m, nn.Conv2d | nn.Linear):
                    h, w, _ = shape_hwc(m)
                    params += m.weight.numel()
                    ops += m.weight.numel() * h * w
        rows.append(Row(name, typ, patch, shape_hwc(mods[-1]), depth, filters, params, ops))
    last = rows[-1]
    rows.append(Row("softmax", "softmax", "", last.out, 0, ("",) * 6, 0, 0))
    return rows


def _k(n: int) -> str:
    return f"{n / 1e3:,.1f}K" if n else ""


def _m(n: int) -> str:
    return f"{n / 1e6:,.1f}M" if n else ""


def print_summary(model: GoogLeNet, input_size: int = 224) -> None:
    rows = table1(model, input_size)
    print(f"GoogLeNet variant={model.variant} input={input_size}x{input_size} classes={model.num_classes} "
          f"aux_logits={model.aux_logits}")
    head = (f"{'type':<16}{'patch':<8}{'output':>12}{'depth':>6}{'#1x1':>6}{'#3x3r':>6}{'#3x3':>6}"
            f"{'#5x5r':>6}{'#5x5':>6}{'proj':>6}{'params':>11}{'ops':>10} | {'paper output':>12}"
            f"{'params':>8}{'ops':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        out = f"{r.out[0]}x{r.out[1]}x{r.out[2]}"
        typ = r.name.replace("inception", "inception (") + ")" if r.type == "inception" else r.type
        paper = PAPER_TABLE1[r.name] if input_size == 224 else ("", "", "", "")
        mark = "*" if paper[0] and paper[0] != out else " "
        print(f"{typ:<16}{r.patch:<8}{out:>12}{(r.depth or ''):>6}" + "".join(f"{f!s:>6}" for f in r.filters)
              + f"{_k(r.params):>11}{_m(r.ops):>10} | {paper[0]:>11}{mark}{paper[2]:>8}{paper[3]:>7}")
    main_params = sum(r.params for r in rows)
    aux_params = sum(m.weight.numel() for a in (model.aux1, model.aux2) if a is not None
                     for m in a.modules() if isinstance(m, nn.Conv2d | nn.Linear))
    all_params = sum(p.numel() for p in model.parameters())
    print("-" * len(head))
    print(f"total (Table 1 rows): {main_params:,} weights, {sum(r.ops for r in rows) / 1e9:.3f} G multiply-adds")
    print(f"aux heads (training only): {aux_params:,} weights; all parameters incl. biases/BN/aux: {all_params:,}")
    if input_size == 224:
        print("Notes on the paper's columns (rows marked * differ in output size):")
        print(" - conv1: the paper lists 2.7K params / 34M ops; a dense 7x7x3x64 conv has 9.4K weights and")
        print("   118M multiply-adds at 112x112. The paper's figure does not fit a dense 7x7 conv.")
        print(" - The params column is not internally consistent (e.g. the 3x3 row's 112K vs 4,096 + 110,592")
        print("   = 114.7K here; 4e's 840K vs the 5x5-based count); ops match within rounding for 3a (128M)")
        print("   and 3b (304M). LRN layers (after conv1's pool and after the 3x3 conv) have no row in Table 1.")
        if model.variant == "bn":
            print(" - variant=bn is torchvision's network: 3x3 convs in the 5x5 branches and a 2x2 pool4, so its")
            print("   params/ops differ from the paper's by design.")


def main(argv=None) -> int:
    import argparse

    from pipeline.model.googlenet import VARIANTS

    p = argparse.ArgumentParser(prog="python -m pipeline.model.summary", description="Print Table 1 of the paper "
                                "for the built GoogLeNet, beside the paper's figures")
    p.add_argument("--variant", choices=VARIANTS, default="paper", help="default: paper")
    p.add_argument("--input-size", type=int, default=224, help="default: 224")
    p.add_argument("--num-classes", type=int, default=1000, help="default: 1000")
    args = p.parse_args(argv)
    if args.input_size < 32:
        p.error(f"--input-size must be >= 32, not {args.input_size}")
    print_summary(GoogLeNet(args.num_classes, variant=args.variant), args.input_size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
