"""Anytime prediction (accuracy of every exit) and MSDNet budgeted batch classification."""

from __future__ import annotations

import numpy as np
import torch

from edgeexit.data import ImageDataset, normalize
from edgeexit.errors import UserError
from edgeexit.models import MultiExitNet, count_unit_cost, cumulative_exit_flops
from edgeexit.runtime.plan import MSDNET_QS, CascadePlan


@torch.no_grad()
def exit_outputs(
    model: MultiExitNet, data: ImageDataset, batch_size: int = 256, device: str | torch.device = "cpu"
) -> dict[str, np.ndarray]:
    """Every exit's prediction and max-softmax confidence for every sample: arrays (N, K)."""
    model.eval().to(device)
    preds, confs, logits_all = [], [], []
    for start in range(0, len(data), batch_size):
        x = normalize(data.slice(start, start + batch_size).to(device), data.mean, data.std)
        logits, _ = model(x)
        z = torch.stack(logits, dim=1).float()  # (B, K, C)
        p = z.softmax(dim=2)
        c, y = p.max(dim=2)
        preds.append(y.cpu())
        confs.append(c.cpu())
        logits_all.append(z.cpu())
    pred = torch.cat(preds).numpy()
    labels = data.labels.numpy()
    return {
        "prediction": pred,
        "confidence": torch.cat(confs).numpy().astype(np.float64),
        "correct": pred == labels[:, None],
        "logits": torch.cat(logits_all).numpy(),
        "labels": labels,
    }


def anytime_accuracy(correct: np.ndarray) -> list[float]:
    return [float(a) for a in correct.mean(axis=0)]


def budgeted_curve(
    val_conf: np.ndarray, test_conf: np.ndarray, test_correct: np.ndarray, cumulative_flops: list[float]
) -> list[dict]:
    """MSDNet budgeted batch classification: thresholds from the held-out split, measured on test."""
    cum = np.asarray(cumulative_flops)
    points = []
    for q in MSDNET_QS:
        plan = CascadePlan.msdnet(val_conf, q)
        e = plan.exit_positions(test_conf)
        points.append(
            {
                "q": q,
                "thresholds": plan.to_list(),
                "expected_flops": float(cum[e].mean()),
                "accuracy": float(test_correct[np.arange(len(e)), e].mean()),
                "exit_shares": np.bincount(e, minlength=len(cum)).astype(float).__truediv__(len(e)).tolist(),
            }
        )
    return sorted(points, key=lambda p: p["expected_flops"])


def evaluate(
    model: MultiExitNet,
    test: ImageDataset,
    val: ImageDataset | None,
    device="cpu",
    batch_size: int = 256,
) -> dict:
    units = count_unit_cost(model)
    cum = cumulative_exit_flops(units)
    out_test = exit_outputs(model, test, batch_size, device)
    acc = anytime_accuracy(out_test["correct"])
    result = {
        "split": "test",
        "num_samples": int(len(test)),
        "exits": [
            {"exit": pos + 1, "accuracy": a, "cumulative_flops": c}
            for pos, (a, c) in enumerate(zip(acc, cum, strict=True))
        ],
        "average_accuracy": float(np.mean(acc)),
        "units": units,
    }
    if val is not None and len(val) > 0:
        out_val = exit_outputs(model, val, batch_size, device)
        result["budgeted"] = budgeted_curve(out_val["confidence"], out_test["confidence"], out_test["correct"], cum)
        result["threshold_split"] = "held-out validation"
    else:
        result["budgeted"] = []
    return result


def evaluate_checkpoint(
    checkpoint, data: str | None = None, images: int | None = None, device: str = "auto", data_dir=None
) -> dict:
    """`edgeexit eval`: the checkpoint on the test split of its dataset (or ``data``), with the
    budgeted curve's thresholds from the held-out split it recorded."""
    from edgeexit.data import load_dataset
    from edgeexit.data.datasets import load_heldout
    from edgeexit.data.names import canonical_dataset
    from edgeexit.train.checkpoint import load_checkpoint, model_from_checkpoint
    from edgeexit.train.torch_device import resolve_device

    if images is not None and images < 1:
        raise UserError(f"--images must be at least 1, got {images}")
    ckpt = load_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt)
    name = data or ckpt.get("dataset") or ckpt.get("split", {}).get("dataset")
    if not name:
        raise UserError("the checkpoint records no dataset; pass --data")
    ddir = str(data_dir) if data_dir else ckpt.get("split", {}).get("data_dir")
    test = load_dataset(name, "test", ddir, image_size=ckpt["preprocessing"]["input_size"])
    _check_compatible(test, ckpt)
    test = match_classes(test, list(ckpt["class_names"]), name)
    # One source of preprocessing truth: the checkpoint's statistics (what the deployed model uses),
    # never the test folder's own mean/std.
    test.mean, test.std = list(ckpt["preprocessing"]["mean"]), list(ckpt["preprocessing"]["std"])
    if images:
        test = test.subset(np.arange(min(images, len(test))))
    same = ckpt.get("dataset") is not None and canonical_dataset(name) == canonical_dataset(ckpt["dataset"])
    val = load_heldout(ckpt["split"], ddir, name) if same else None
    result = evaluate(model, test, val, device=resolve_device(device))
    result["checkpoint"] = str(checkpoint)
    result["dataset"] = name
    return result


def match_classes(ds: ImageDataset, model_classes: list[str], name: str) -> ImageDataset:
    """Labels of ``ds`` renumbered to the model's class order, matched by class *name* (an
    ImageFolder's labels are its sorted folder names: another folder set would otherwise be matched
    by position). A class the model does not know is refused, naming it."""
    if ds.class_names == model_classes:
        return ds
    index = {c: i for i, c in enumerate(model_classes)}
    unknown = [c for c in ds.class_names if c not in index]
    if unknown:
        raise UserError(
            f"{name} has class '{unknown[0]}', which the model was not trained on "
            f"(its classes: {', '.join(model_classes[:10])}{' …' if len(model_classes) > 10 else ''})"
        )
    remap = torch.tensor([index[c] for c in ds.class_names], dtype=torch.long)
    ds.labels = remap[ds.labels]
    ds.class_names = list(model_classes)
    return ds


def _check_compatible(ds, ckpt: dict) -> None:
    pre = ckpt["preprocessing"]
    if ds.in_chans != pre["in_chans"] or ds.num_classes > ckpt["config"]["num_classes"]:
        raise UserError(
            f"dataset has {ds.in_chans} channels / {ds.num_classes} classes but the model expects "
            f"{pre['in_chans']} / {ckpt['config']['num_classes']}"
        )
