import pytest
import torch

from edgeexit.models import MultiExitConfig, build_model, count_unit_cost, cumulative_exit_flops


@pytest.mark.parametrize("exits", [8, 4])
@pytest.mark.parametrize("size,in_chans", [((32, 32), 3), ((28, 28), 1), ((40, 24), 3)])
def test_running_the_units_in_order_equals_forward(exits, size, in_chans):
    torch.manual_seed(0)
    model = build_model(
        MultiExitConfig(exits=exits, width=0.125, in_chans=in_chans, num_classes=7, input_size=list(size))
    ).eval()
    x = torch.randn(3, in_chans, *size)
    logits, feats = model(x)
    assert len(logits) == exits and all(z.shape == (3, 7) for z in logits)
    assert len({f.shape[1] for f in feats}) == 1  # every exit's pooled feature has 512·w channels
    state = (x,)
    for k, (seg, head) in enumerate(zip(model.segments, model.heads, strict=True)):
        state = seg(*state)
        z, f = head(state[-1])
        assert torch.equal(z, logits[k]) and torch.equal(f, feats[k])


def test_paper_layout_states_and_taps():
    model = build_model(MultiExitConfig(exits=8, width=0.25)).eval()
    state = (torch.zeros(1, 3, 32, 32),)
    sizes = []
    for seg in model.segments:
        state = seg(*state)
        sizes.append(len(state))
    # inside the last block of each stage (block input + conv1 activation), then the stage output
    assert sizes == [2, 1] * 4


def test_flops_counted_from_the_modules_match_resnet18():
    model = build_model(MultiExitConfig(exits=8, width=1.0, in_chans=3, num_classes=10, input_size=[32, 32]))
    units = count_unit_cost(model)
    backbone_macs = sum(u["macs"] for u in units if u["kind"] == "segment")
    assert backbone_macs / 1e9 == pytest.approx(0.556, rel=0.005)
    assert sum(u["params"] for u in units) == sum(p.numel() for p in model.parameters())
    # FLOPs scale with the input area
    bigger = count_unit_cost(model, [64, 64])
    assert bigger[0]["macs"] == 4 * units[0]["macs"]
    cum = cumulative_exit_flops(units)
    assert len(cum) == 8 and all(b > a for a, b in zip(cum, cum[1:], strict=False))


def test_width_scales_channels_and_config_round_trips():
    cfg = MultiExitConfig(exits=4, width=0.5, in_chans=1, num_classes=3, input_size=[28, 28])
    model = build_model(cfg.to_dict())
    assert model.feat_dim == 256 and model.config == cfg
    with pytest.raises(ValueError):
        MultiExitConfig(exits=5)
