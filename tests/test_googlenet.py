"""GoogLeNet: Table 1 from the model itself, torchvision equivalence, heads, gradients, determinism."""

import subprocess
import sys

import pytest
import torch
import torchvision
from torch import nn

from pipeline.model.googlenet import GoogLeNet, GoogLeNetOutputs, googlenet_loss
from pipeline.model.summary import table1

# Table 1's output sizes (H, W, C) per row: the paper's published figures, checked against the model.
TABLE1_OUT = {
    "conv1": (112, 112, 64), "pool1": (56, 56, 64), "conv2": (56, 56, 192), "pool2": (28, 28, 192),
    "inception3a": (28, 28, 256), "inception3b": (28, 28, 480), "pool3": (14, 14, 480),
    "inception4a": (14, 14, 512), "inception4b": (14, 14, 512), "inception4c": (14, 14, 512),
    "inception4d": (14, 14, 528), "inception4e": (14, 14, 832), "pool4": (7, 7, 832),
    "inception5a": (7, 7, 832), "inception5b": (7, 7, 1024), "avgpool": (1, 1, 1024),
    "dropout": (1, 1, 1024), "linear": (1, 1, 1000), "softmax": (1, 1, 1000),
}


@pytest.fixture(scope="module")
def paper():
    torch.manual_seed(0)
    return GoogLeNet(1000, variant="paper")


def test_table1_output_sizes_ops_and_params(paper):
    rows = {r.name: r for r in table1(paper, 224)}
    assert {k: r.out for k, r in rows.items()} == TABLE1_OUT
    assert round(rows["inception3a"].ops / 1e6) == 128
    assert round(rows["inception3b"].ops / 1e6) == 304
    assert sum(r.params for r in rows.values()) == 6_990_272  # weights only, no aux heads


def test_every_inception_module_has_one_5x5_conv(paper):
    for name in [n for n, _ in paper.named_children() if n.startswith("inception")]:
        kernels = [m.kernel_size for m in getattr(paper, name).modules() if isinstance(m, nn.Conv2d)]
        assert kernels.count((5, 5)) == 1, name
    assert sum(1 for n, _ in paper.named_children() if n.startswith("inception")) == 9


def test_paper_layers_lrn_pools_dropout(paper):
    lrn = [m for m in paper.modules() if isinstance(m, nn.LocalResponseNorm)]
    assert len(lrn) == 2 and all((m.size, m.alpha, m.beta, m.k) == (5, 1e-4, 0.75, 1.0) for m in lrn)
    assert paper.maxpool4.kernel_size == 3 and paper.maxpool1.ceil_mode
    assert paper.dropout.p == 0.4 and paper.aux1.dropout.p == 0.7
    assert not any(isinstance(m, nn.BatchNorm2d) for m in paper.modules())


def test_caffe_initialisation(paper):
    conv = paper.inception4a.branch3[1].conv
    bound = (3.0 / conv.weight[0].numel()) ** 0.5
    assert conv.weight.abs().max() <= bound and conv.weight.abs().max() > 0.9 * bound
    assert torch.all(conv.bias == 0.2) and torch.all(paper.aux1.fc1.bias == 0.2)
    assert torch.all(paper.fc.bias == 0) and torch.all(paper.aux2.fc2.bias == 0)


@pytest.mark.parametrize("variant", ["paper", "bn"])
@pytest.mark.parametrize("size", [32, 64, 224])
def test_train_and_eval_outputs(variant, size):
    torch.manual_seed(0)
    m = GoogLeNet(10, variant=variant)
    x = torch.randn(2, 3, size, size)
    out = m.train()(x)
    assert isinstance(out, GoogLeNetOutputs)
    assert [t.shape for t in out] == [torch.Size([2, 10])] * 3
    y = m.eval()(x)
    assert isinstance(y, torch.Tensor) and y.shape == (2, 10)


def test_aux_free_models_have_no_aux_weights_or_outputs():
    m = GoogLeNet(10, aux_logits=False)
    assert not any(k.startswith(("aux1", "aux2")) for k in m.state_dict())
    out = m.train()(torch.randn(2, 3, 64, 64))
    assert out.aux1 is None and out.aux2 is None


def test_aux_loss_weighting():
    torch.manual_seed(0)
    target = torch.tensor([1, 3])
    logits, a1, a2 = torch.randn(2, 5), torch.randn(2, 5), torch.randn(2, 5)
    ce = nn.functional.cross_entropy
    got = googlenet_loss(GoogLeNetOutputs(logits, a1, a2), target)
    assert torch.allclose(got, ce(logits, target) + 0.3 * ce(a1, target) + 0.3 * ce(a2, target))
    assert torch.allclose(googlenet_loss(logits, target), ce(logits, target))
    assert torch.allclose(googlenet_loss(GoogLeNetOutputs(logits, None, None), target), ce(logits, target))


@pytest.mark.parametrize("variant", ["paper", "bn"])
def test_gradient_reaches_the_stem_through_every_branch(variant):
    torch.manual_seed(0)
    m = GoogLeNet(10, variant=variant).train()
    loss = googlenet_loss(m(torch.randn(2, 3, 64, 64)), torch.tensor([1, 2]))
    loss.backward()
    assert m.conv1.conv.weight.grad.abs().sum() > 0
    for name, mod in m.named_children():
        if name.startswith("inception"):
            for b in ("branch1", "branch2", "branch3", "branch4"):
                convs = [c for c in getattr(mod, b).modules() if isinstance(c, nn.Conv2d)]
                assert all(c.weight.grad is not None and c.weight.grad.abs().sum() > 0 for c in convs), (name, b)
    for aux in (m.aux1, m.aux2):
        assert aux.fc1.weight.grad.abs().sum() > 0


def test_deterministic_under_a_fixed_seed():
    def run():
        torch.manual_seed(123)
        m = GoogLeNet(10).train()
        torch.manual_seed(7)
        return m(torch.randn(2, 3, 64, 64))

    a, b = run(), run()
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_bn_variant_matches_torchvision_exactly():
    torch.manual_seed(0)
    tv = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True, num_classes=1000)
    # make BatchNorm statistics non-trivial so that loading them is really tested
    for mod in tv.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.2, 0.2)
    ours = GoogLeNet(1000, variant="bn")
    ours.load_torchvision_state_dict(tv.state_dict())
    assert set(ours.state_dict()) == set(tv.state_dict())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(ours.eval()(x), tv.eval()(x), atol=1e-5, rtol=0)
        x64 = torch.randn(2, 3, 64, 64)
        assert torch.allclose(ours(x64), tv(x64), atol=1e-5, rtol=0)
    # aux heads too, in train mode with dropout off
    ours.train(), tv.train()
    for m in (ours, tv):
        for d in m.modules():
            if isinstance(d, nn.Dropout | nn.BatchNorm2d):
                d.eval()
    with torch.no_grad():
        o, t = ours(x), tv(x)
    assert torch.allclose(o.aux1, t.aux_logits1, atol=1e-5, rtol=0)
    assert torch.allclose(o.aux2, t.aux_logits2, atol=1e-5, rtol=0)


def test_torchvision_weights_without_aux_and_into_aux_free_model():
    tv = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=True)
    GoogLeNet(1000, variant="bn", aux_logits=True).load_torchvision_state_dict(tv.state_dict())
    tv_aux = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True)
    GoogLeNet(1000, variant="bn", aux_logits=False).load_torchvision_state_dict(tv_aux.state_dict())
    with pytest.raises(ValueError, match="variant='bn'"):
        GoogLeNet(1000, variant="paper").load_torchvision_state_dict(tv.state_dict())


def test_bad_arguments():
    with pytest.raises(ValueError, match="variant"):
        GoogLeNet(10, variant="v3")
    with pytest.raises(ValueError, match="num_classes"):
        GoogLeNet(0)


def test_channels_last_and_bf16_autocast_match_fp32():
    torch.manual_seed(0)
    m = GoogLeNet(10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = m(x)
        cl = m.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf = m(x)
    assert torch.allclose(cl, ref, atol=1e-4)
    assert bf.dtype == torch.float32 and torch.allclose(bf, ref, atol=0.1 * ref.abs().max().item())


def test_logits_are_float32_under_bf16_autocast():
    """The classifier runs in fp32 on the (bf16) features: logits keep their low bits for the softmax
    that evaluation averages over crops and models."""
    torch.manual_seed(0)
    m = GoogLeNet(10, variant="bn").train()
    seen = {}
    m.fc.register_forward_hook(lambda mod, inp, out: seen.update(x=inp[0], out=out))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(torch.randn(4, 3, 64, 64))
    for logits in (out.logits, out.aux1, out.aux2):
        assert logits.dtype == torch.float32
    expect = torch.nn.functional.linear(seen["x"].float(), m.fc.weight, m.fc.bias)
    assert torch.equal(out.logits, expect)
    assert not torch.equal(out.logits, out.logits.bfloat16().float())  # not rounded to bf16


def test_the_model_compiles_as_one_graph_that_matches_eager():
    """torch.compile captures the whole forward, without a graph break (fullgraph), and the captured
    program computes what eager does. (Inductor's CPU code generation is not run here: it takes about a
    minute on 2 cores and is torch's own; the GPU benchmark compiles and times the model on the GPU.)"""
    torch.manual_seed(0)
    m = GoogLeNet(10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = m(x)
        got = torch.compile(m, backend="aot_eager", fullgraph=True)(x)
    assert torch.allclose(got, ref, atol=1e-4)


def test_summary_command_prints_table1():
    out = subprocess.run([sys.executable, "-m", "pipeline.model.summary"],
                         capture_output=True, text=True, check=True).stdout
    assert "6,990,272 weights" in out and "inception (3a)" in out and "28x28x256" in out
    out = subprocess.run([sys.executable, "-m", "pipeline.model.summary", "--variant", "bn",
                          "--input-size", "64"], capture_output=True, text=True, check=True).stdout
    assert "variant=bn input=64x64" in out and "2x2/2" in out
