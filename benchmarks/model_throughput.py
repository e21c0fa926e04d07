"""Training throughput of our GoogLeNet variants vs torchvision's `googlenet`, in one process.

One step = forward + backward + SGD (momentum 0.9) step, aux heads on, batch 64 by default, at input
64 and 224. The models are measured in alternating rounds (median of the rounds) so that machine
noise hits them alike. Prints images/s and the ratios. Target: our `bn` >= 0.95x torchvision's.

    python benchmarks/model_throughput.py [--batch 64] [--sizes 64,224] [--rounds 5] [--device cpu]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.model.googlenet import GoogLeNet, googlenet_loss  # noqa: E402


def tv_loss(out, y):
    ce = torch.nn.functional.cross_entropy
    return ce(out.logits, y) + 0.3 * (ce(out.aux_logits1, y) + ce(out.aux_logits2, y))


def train_step(m, loss_fn, opt, x, y, amp: bool = False) -> None:
    opt.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        loss = loss_fn(m(x), y)
    loss.backward()
    opt.step()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64, help="default: 64")
    p.add_argument("--sizes", default="64,224", help="input sizes (default: 64,224)")
    p.add_argument("--rounds", type=int, default=5, help="measured rounds per model and size (default: 5)")
    p.add_argument("--steps", type=int, default=2, help="steps per round (default: 2)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (default: off)")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format (default: off)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default: cuda if present")
    args = p.parse_args()
    dev = torch.device(args.device)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    print(f"device={dev} threads={torch.get_num_threads()} batch={args.batch} torch={torch.__version__} "
          f"amp={'bf16' if args.amp else 'off'} channels_last={args.channels_last}")
    for size in [int(s) for s in args.sizes.split(",")]:
        torch.manual_seed(0)
        models = {
            "torchvision googlenet": (torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True), tv_loss),
            "ours bn": (GoogLeNet(1000, variant="bn"), googlenet_loss),
            "ours paper": (GoogLeNet(1000, variant="paper"), googlenet_loss),
        }
        x = torch.randn(args.batch, 3, size, size, device=dev).to(memory_format=fmt)
        y = torch.randint(0, 1000, (args.batch,), device=dev)
        state = {}
        for name, (m, loss_fn) in models.items():
            m.to(dev, memory_format=fmt).train()
            state[name] = (m, loss_fn, torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9))

        for name in state:  # warm-up
            train_step(*state[name], x, y, args.amp)
        times = {name: [] for name in state}
        for _ in range(args.rounds):
            for name in state:
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    train_step(*state[name], x, y, args.amp)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t0)
        rate = {n: args.batch * args.steps / statistics.median(t) for n, t in times.items()}
        base = rate["torchvision googlenet"]
        print(f"\ninput {size}x{size}: training images/s (median of {args.rounds} rounds of {args.steps} steps)")
        for n, r in rate.items():
            print(f"  {n:<24}{r:>10.1f} img/s   {r / base:>5.2f}x torchvision")
        print(f"  ours bn / torchvision = {rate['ours bn'] / base:.3f} (target >= 0.95)")


if __name__ == "__main__":
    main()
