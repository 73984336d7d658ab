"""Real camera models: the ImageNet stem and torchvision ResNet18 weights."""

from __future__ import annotations

import pytest
import torch
import torchvision

from edgeexit.errors import UserError
from edgeexit.models import MultiExitConfig, build_model
from edgeexit.models.pretrained import load_init_file, load_torchvision_resnet18


@pytest.fixture(scope="module")
def seeded_torchvision():
    torch.manual_seed(1234)
    tv = torchvision.models.resnet18(weights=None).eval()
    with torch.no_grad():  # non-trivial batch-norm statistics, so the test can see them
        for m in tv.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return tv


@pytest.mark.parametrize("exits", [8, 4])
def test_torchvision_weights_reproduce_layer4_and_the_logits(seeded_torchvision, exits):
    tv = seeded_torchvision
    model = build_model(MultiExitConfig(exits=exits, stem="imagenet", num_classes=1000, input_size=[224, 224]))
    copied = load_torchvision_resnet18(model.eval(), tv.state_dict(), include_fc=True)
    assert len(copied) == len(tv.state_dict())  # every torchvision tensor has a home
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        ref = tv.layer4(tv.layer3(tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))))))
        state = (x,)
        for segment in model.segments:
            state = segment(*state)
        logits, _ = model(x)
        ref_logits = tv(x)
    torch.testing.assert_close(state[-1], ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[-1], ref_logits, atol=1e-5, rtol=1e-5)


def test_init_refuses_what_does_not_fit(tmp_path, seeded_torchvision):
    cifar = build_model(MultiExitConfig(num_classes=10))
    with pytest.raises(UserError, match="--stem imagenet"):
        load_torchvision_resnet18(cifar, seeded_torchvision.state_dict())
    with pytest.raises(UserError, match="hub/checkpoints"):
        load_init_file(tmp_path / "resnet18-f37072fd.pth")
    sd = dict(seeded_torchvision.state_dict())
    sd.pop("layer3.1.conv2.weight")
    model = build_model(MultiExitConfig(stem="imagenet", num_classes=10))
    with pytest.raises(UserError, match="layer3.1.conv2.weight"):
        load_torchvision_resnet18(model, sd)
    path = tmp_path / "w.pth"
    torch.save(seeded_torchvision.state_dict(), path)
    assert len(load_torchvision_resnet18(model, load_init_file(path))) == len(sd) + 1 - 2  # fc not copied


@pytest.mark.slow
def test_the_imagenet_stem_costs_what_torchvision_costs():
    from edgeexit.models import count_unit_cost, cumulative_exit_flops

    model = build_model(MultiExitConfig(stem="imagenet", num_classes=1000, input_size=[224, 224]))
    backbone_macs = sum(u["macs"] for u in count_unit_cost(model) if u["kind"] == "segment")
    # torchvision ResNet18 at 224 px: 1.814 GMACs with fc (0.000512); the CIFAR stem at 224 px: ~27
    assert 1.80e9 < backbone_macs < 1.82e9
    cifar = build_model(MultiExitConfig(stem="cifar", num_classes=1000, input_size=[224, 224]))
    assert cumulative_exit_flops(count_unit_cost(cifar))[-1] > 10 * cumulative_exit_flops(count_unit_cost(model))[-1]
