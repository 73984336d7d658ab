import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from edgeexit.errors import UserError
from edgeexit.train.checkpoint import load_checkpoint
from edgeexit.train.trainer import TrainingError, train


def test_checkpoint_contract(tiny_run):
    out, result = tiny_run
    ckpt = torch.load(out / "model.pt", weights_only=True)
    assert ckpt["format"] == "edgeexit-checkpoint" and ckpt["version"] == 1
    for key in ("config", "state_dict", "preprocessing", "class_names", "metrics", "split"):
        assert key in ckpt
    json.dumps(ckpt["config"])  # plain JSON types only
    json.dumps(ckpt["preprocessing"])
    assert ckpt["preprocessing"]["input_size"] == [28, 28] and ckpt["preprocessing"]["in_chans"] == 1
    assert ckpt["split"]["val_size"] == 600 and "val_indices_seed" in ckpt["split"]
    assert len(ckpt["units"]) == 16
    assert not list(out.glob("*.tmp"))  # atomic writes leave no temporaries
    # trained: the held-out accuracy of the final exit is far above chance (0.1)
    assert ckpt["metrics"]["val_exit_accuracy"][-1] > 0.5
    assert result["images_per_s"] > 0


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path, fashion_test):
    # bit-exact comparisons need a fixed thread count (the contention guard may change it)
    straight = tmp_path / "straight"
    train(tiny_config(straight, epochs=2, train_images=512, adapt_threads=False), progress=False)
    resumed = tmp_path / "resumed"
    cfg = tiny_config(resumed, epochs=2, train_images=512, adapt_threads=False)
    _train_epochs(cfg, stop_after=1)  # the same 2-epoch schedule, interrupted after epoch 1
    cfg.resume = True
    train(cfg, progress=False)
    a = load_checkpoint(straight / "last.pt")["state_dict"]
    b = load_checkpoint(resumed / "last.pt")["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _train_epochs(cfg, stop_after: int):
    """Run the first `stop_after` epochs of cfg's schedule, as an interrupted run would leave it."""
    from edgeexit.train import trainer

    original = trainer.heldout_accuracy
    calls = {"n": 0}

    def validate_then_stop(*args, **kwargs):
        result = original(*args, **kwargs)
        calls["n"] += 1
        return result

    class Stop(Exception):
        pass

    real_save = trainer.atomic_torch_save

    def save_and_maybe_stop(obj, path):
        real_save(obj, path)
        if Path(path).name == "last.pt" and calls["n"] >= stop_after:
            raise Stop

    trainer.heldout_accuracy, trainer.atomic_torch_save = validate_then_stop, save_and_maybe_stop
    try:
        with pytest.raises(Stop):
            train(cfg, progress=False)
    finally:
        trainer.heldout_accuracy, trainer.atomic_torch_save = original, real_save


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, fashion_test):
    out = tmp_path / "nan"
    train(tiny_config(out, epochs=1, train_images=256), progress=False)
    good = (out / "model.pt").read_bytes()
    with pytest.raises(UserError, match="already holds a run"):
        tiny_config(out, epochs=2, train_images=256)  # would silently replace model.pt and last.pt
    assert (out / "model.pt").read_bytes() == good
    cfg = tiny_config(out, epochs=2, train_images=256, lr=1e30, force=True)
    with pytest.raises(TrainingError, match="last good checkpoint"):
        train(cfg, progress=False)
    assert (out / "model.pt").read_bytes() == good


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"epochs": 0}, "--epochs must be at least 1"),
        ({"train_images": 0}, "--train-images must be at least 1"),
        ({"eval_images": -100}, "--eval-images must be at least 1"),
        ({"width": float("nan")}, "--width must be a positive number"),
        ({"exits": 5}, "--exits must be 4, 8 or 9"),
        ({"teacher_weights": "magic"}, "--teacher-weights"),
        ({"two_stage": 1}, "--two-stage 1 leaves no joint training in 1 epochs"),
        ({"distill_gate": 0.5, "method": "ce"}, "--distill-gate gates distillation"),
        ({"distill_gate": 1.5}, "--distill-gate must be within"),
        ({"target_budget": 0.0, "method": "l2w"}, "--target-budget must be within"),
        ({"meta_interval": 0, "method": "l2w"}, "--meta-interval must be a whole number"),
    ],
)
def test_out_of_range_options_are_refused_before_training(tmp_path, overrides, match):
    with pytest.raises(UserError, match=match):
        tiny_config(tmp_path / "x", **overrides)


def test_out_below_a_file_is_refused_before_training(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"x")
    with pytest.raises(UserError, match="a file is in the way"):
        tiny_config(tmp_path / "model.pt" / "sub")


def test_resume_without_state_is_a_user_error(tmp_path):
    cfg = tiny_config(tmp_path / "none", epochs=1)
    cfg.resume = True
    with pytest.raises(UserError, match="no .*last.pt"):
        train(cfg, progress=False)


@pytest.mark.slow
def test_two_process_ddp_on_cpu_with_gloo(tmp_path, fashion_test):
    script = tmp_path / "ddp.py"
    # each rank records the DDP module the trainer wraps, and writes its weights after training
    script.write_text(
        "import sys; sys.path.insert(0, {!r})\n"
        "import torch\n"
        "seen = []\n"
        "class Recorded(torch.nn.parallel.DistributedDataParallel):\n"
        "    def __init__(self, *a, **k):\n"
        "        super().__init__(*a, **k)\n"
        "        seen.append(self)\n"
        "torch.nn.parallel.DistributedDataParallel = Recorded\n"
        "from conftest import tiny_config\n"
        "from edgeexit.train.trainer import train\n"
        "r = train(tiny_config({!r}, epochs=1, train_images=512, device='cpu'), progress=False)\n"
        "open({!r} + str(r['rank']), 'w').write(str(r['world_size']))\n"
        "torch.save({{k: v.detach().clone() for k, v in seen[0].module.named_parameters()}}, "
        "{!r} + str(r['rank']) + '.pt')\n".format(
            str(Path(__file__).parent), str(tmp_path / "ddp"), str(tmp_path / "rank"), str(tmp_path / "weights")
        )
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533", str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "rank0").read_text() == "2" and (tmp_path / "rank1").read_text() == "2"
    ckpt = load_checkpoint(tmp_path / "ddp" / "model.pt")
    assert ckpt["metrics"]["val_exit_accuracy"][-1] > 0.1
    # the two ranks trained on different shards and end with identical parameters (gradients all-reduced;
    # a rank that stepped alone would differ after 4 steps). BatchNorm running statistics are not compared:
    # DDP broadcasts them from rank 0 before each forward, so each rank's last batch leaves its own.
    w0, w1 = (torch.load(tmp_path / f"weights{r}.pt", weights_only=True) for r in (0, 1))
    assert w0.keys() == w1.keys() and len(w0) > 10
    assert all(torch.equal(w0[k], w1[k]) for k in w0), [k for k in w0 if not torch.equal(w0[k], w1[k])][:3]
    saved = ckpt["state_dict"]  # rank 0 saved what it trained
    model_keys = [k for k in w0 if k.startswith("model.")]
    assert model_keys and all(torch.equal(w0[k], saved[k.removeprefix("model.")]) for k in model_keys)


def test_contention_guard_drops_to_one_thread_while_others_run_and_recovers():
    from edgeexit.util import ContentionGuard

    threads = [2]
    readings = iter([2, 5, 6, 5, 5, 3, 1, 1, 1, 1])  # runnable threads on the machine, over time
    guard = ContentionGuard(lambda: threads[0], lambda n: threads.__setitem__(0, n), reader=lambda: next(readings))
    seen = []
    for _ in range(10):
        guard.check()
        seen.append(threads[0])
    # alone (2 = our own threads): keep 2; three checks with others running: 1; then 3 quiet checks: 2
    assert seen == [2, 2, 2, 1, 1, 1, 1, 1, 2, 2]
    assert guard.switches == 2


@pytest.mark.slow
def test_l2w_trains_with_meta_steps_and_resumes_its_meta_optimizer(tmp_path, fashion_test):
    """A real (tiny) l2w run: meta steps happen (Adam's state is saved in last.pt) and --resume restores it."""
    from edgeexit.train import trainer

    out = tmp_path / "l2w"
    cfg = tiny_config(out, method="l2w", epochs=2, train_images=256, meta_interval=2, adapt_threads=False)
    _train_epochs(cfg, stop_after=1)
    state = load_checkpoint(out / "last.pt")["train_state"]
    meta = state["meta_optimizer"]
    assert meta["state"] and all(int(v["step"]) == 2 for v in meta["state"].values())  # 4 steps, every 2nd
    assert not any(k.startswith("weight_net") for k in load_checkpoint(out / "model.pt")["state_dict"])
    seen = []
    real_setup = trainer._setup

    def setup_and_look(cfg):
        run = real_setup(cfg)
        seen.append(copy.deepcopy(run.task.meta_opt.state_dict()))
        return run

    cfg.resume = True
    trainer._setup = setup_and_look
    try:
        result = train(cfg, progress=False)
    finally:
        trainer._setup = real_setup
    assert all(int(v["step"]) == 2 for v in seen[0]["state"].values())  # restored before epoch 2
    assert result["history"][-1]["epoch"] == 2 and result["best_val_average"] > 0.1


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
                                      "regnet_y_400mf"])  # fmt: skip
def test_two_stage_leaves_every_backbones_early_heads_alone_in_stage_one(backbone):
    """The trainer's optimizer and task on a torchvision backbone: in stage one the early heads (weights
    and BatchNorm statistics) do not change while the trunk and the final exit do."""
    from edgeexit.models.backbones import BackboneConfig, BackboneNet
    from edgeexit.train.losses import LossConfig, build_task
    from edgeexit.train.recipes import get_recipe
    from edgeexit.train.trainer import _optimizer

    torch.manual_seed(0)
    net = BackboneNet(BackboneConfig(backbone=backbone, width=0.25, in_chans=1, input_size=[28, 28]))
    task = build_task("ce", net, LossConfig(two_stage=1.0, gradient_equilibrium=True))
    opt = _optimizer(task, net, get_recipe("fashion-mnist", "ce"))
    early = {k: v.clone() for k, v in net.heads[:-1].state_dict().items()}
    final = [p.detach().clone() for p in net.heads[-1].parameters()]
    first = [p.detach().clone() for p in net.segments[0].parameters()]
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)
    task.train()
    for step in range(2):
        task.set_progress(0.4 * step)
        opt.zero_grad(set_to_none=True)
        task(x, y)["loss"].backward()
        opt.step()
    assert all(torch.equal(early[k], v) for k, v in net.heads[:-1].state_dict().items())
    assert any(not torch.equal(a, b) for a, b in zip(final, net.heads[-1].parameters(), strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(first, net.segments[0].parameters(), strict=True))
    task.set_progress(1.0)
    assert len(task(x, y)["logits"]) == net.num_exits > 2


def test_two_stage_and_freeze_trunk_are_refused_together(tmp_path):
    init = tmp_path / "w.pt"
    init.write_bytes(b"")
    with pytest.raises(UserError, match="--two-stage trains the trunk first"):
        tiny_config(tmp_path / "x", method="ce", epochs=2, backbone="resnet18", exits=None, init=str(init),
                    freeze_trunk=True, two_stage=1)  # fmt: skip
