import pytest
import torch

from edgeexit.models import MultiExitConfig, build_model, count_unit_cost, cumulative_exit_flops


@pytest.mark.parametrize("exits", [8, 4, 9])
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


def test_early_exit_layout_adds_a_cheap_first_exit_and_keeps_the_paper_taps():
    """exits=9: a tap inside the first block (stem + one conv), then the paper's eight taps."""
    torch.manual_seed(0)
    nine = build_model(MultiExitConfig(exits=9, width=0.25, in_chans=1, input_size=[28, 28])).eval()
    eight = build_model(MultiExitConfig(exits=8, width=0.25, in_chans=1, input_size=[28, 28])).eval()
    state, sizes = (torch.zeros(1, 1, 28, 28),), []
    for seg in nine.segments:
        state = seg(*state)
        sizes.append(len(state))
    assert sizes == [2, 2, 1] + [2, 1] * 3
    # same backbone: with the 8-exit model's weights, exits 2..9 give the 8-exit model's answers
    nine.segments[0].stem.load_state_dict(eight.segments[0].stem.state_dict())
    for blocks9, blocks8 in zip(nine.stages, eight.stages, strict=True):
        for b9, b8 in zip(blocks9, blocks8, strict=True):
            b9.load_state_dict(b8.state_dict())
    for k in range(8):
        nine.heads[k + 1].load_state_dict(eight.heads[k].state_dict())
    x = torch.randn(2, 1, 28, 28)
    (z9, _), (z8, _) = nine(x), eight(x)
    for k in range(8):
        torch.testing.assert_close(z9[k + 1], z8[k])
    cum9, cum8 = cumulative_exit_flops(count_unit_cost(nine)), cumulative_exit_flops(count_unit_cost(eight))
    assert cum9[0] < 0.45 * cum8[0]  # the first exit is the cheap one: stem and one conv
    backbone = [sum(u["macs"] for u in count_unit_cost(m) if u["kind"] == "segment") for m in (nine, eight)]
    assert backbone[0] == backbone[1]


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
