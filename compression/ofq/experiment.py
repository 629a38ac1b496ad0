"""``gdpo ofq``: quantization-aware training of a vision transformer with OFQ against the LSQ baseline.

One run: train (or load) the full-precision ViT, then for each bit width and method QAT from it
(optionally distilling from it), tracking weight oscillation every step; OFQ anneals with CGA over its
last epochs. Writes ``DIR/results.json`` (accuracy and final oscillation rate per method and bit
width, the curves), ``DIR/ofq.png`` and ``DIR/fp/`` (the full-precision model, a transformers dir).

Data sources (``data.source``): ``digits`` (scikit-learn's 8x8 digits, 1,797 real images shipped with
scikit-learn), ``imagefolder:PATH`` (PATH/{train,val}/<class>/<image>), ``hf:NAME[:CONFIG]`` (a
datasets image-classification dataset with train and validation splits).
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F

from gdpo.config import preset_path
from gdpo.structured import ConfigError, build, doc, doc_factory, read_yaml, to_dict
from gdpo.fileio import atomic_write_text


@dataclass(frozen=True)
class OFQData:
    source: str = doc("digits", "digits | imagefolder:PATH | hf:NAME[:CONFIG]")
    image_size: int = doc(8, "images are resized to image_size x image_size", ge=1)
    num_channels: int = doc(1, "1 (grey) or 3 (RGB)")
    test_fraction: float = doc(0.2, "digits: held-out share (stratified, seeded)", gt=0, lt=1)
    augment_shift: int = doc(1, "random translation in pixels while training (0 = off)", ge=0)
    limit: int = doc(0, "use at most this many training images (0 = all)", ge=0)
    mean: Optional[tuple[float, ...]] = doc(None, "per-channel mean to normalize with (None: estimated on train)")
    std: Optional[tuple[float, ...]] = doc(None, "per-channel standard deviation (with data.mean)")
    stats_images: int = doc(512, "a streamed source: training images the mean and std are estimated on", ge=1)
    workers: int = doc(0, "a streamed source: image-decoding loader processes (0 = in the training process)", ge=0)


@dataclass(frozen=True)
class OFQModel:
    arch: Literal["vit", "deit"] = doc(
        "vit", "transformers class: ViTForImageClassification or DeiTForImageClassification"
    )
    pretrained: Optional[str] = doc(None, "a local transformers dir to start from (skips full-precision training)")
    patch_size: int = doc(2, "patch size", ge=1)
    hidden_size: int = doc(64, "width", ge=1)
    num_layers: int = doc(4, "depth", ge=1)
    num_heads: int = doc(4, "attention heads", ge=1)
    mlp_size: int = doc(128, "MLP hidden width", ge=1)
    num_labels: int = doc(10, "classes", ge=2)


@dataclass(frozen=True)
class OFQTrain:
    epochs: int = doc(150, "epochs", ge=0)
    lr: float = doc(2e-3, "peak AdamW learning rate (cosine to 1%)", gt=0)
    batch_size: int = doc(64, "images per step", ge=1)
    weight_decay: float = doc(0.05, "AdamW decoupled weight decay (not on biases, norms and LSQ steps)", ge=0)
    warmup_epochs: int = doc(5, "linear warm-up epochs", ge=0)


@dataclass(frozen=True)
class OFQQat:
    bits: tuple[int, ...] = doc((4, 3, 2), "weight and activation bit widths to train")
    methods: tuple[str, ...] = doc(("lsq", "ofq"), "lsq (baseline) and/or ofq")
    epochs: int = doc(60, "QAT epochs per method and bit width", ge=1)
    lr: float = doc(5e-4, "peak learning rate", gt=0)
    batch_size: int = doc(64, "images per step", ge=1)
    weight_decay: float = doc(0.05, "as in full-precision training", ge=0)
    warmup_epochs: int = doc(2, "linear warm-up epochs", ge=0)
    distill: bool = doc(True, "add KL(teacher || student) at T=1 from the full-precision model")
    cga_epochs: int = doc(15, "OFQ: confidence-guided annealing over the last cga_epochs epochs (0 = off)", ge=0)
    cga_br: float = doc(
        0.05,
        "OFQ: the boundary range in quantization steps; CGA freezes the weights beyond it, the mask "
        "recomputed every step (the authors' code)",
        gt=0,
        lt=0.5,
    )

    near_br: float = doc(0.05, "the near-boundary metric's threshold, in steps", gt=0, le=0.5)


@dataclass(frozen=True)
class OFQConfig:
    seed: int = doc(0, "seed for the split, initialization and batching")
    threads: int = doc(2, "torch intra-op threads", ge=1)
    device: str = doc("auto", "where the models train: auto (cuda when available, else cpu), cpu, cuda or cuda:N")
    data: OFQData = doc_factory(OFQData, "images")
    model: OFQModel = doc_factory(OFQModel, "the vision transformer")
    fp: OFQTrain = doc_factory(OFQTrain, "full-precision training")
    qat: OFQQat = doc_factory(OFQQat, "quantization-aware training")


def validate(cfg: OFQConfig) -> None:
    def need(ok, key, msg):
        if not ok:
            raise ConfigError(f"config key '{key}': {msg}")

    d, m, q = cfg.data, cfg.model, cfg.qat
    need(
        d.source == "digits" or d.source.startswith(("imagefolder:", "hf:")),
        "data.source",
        f"must be digits, imagefolder:PATH or hf:NAME[:CONFIG], got {d.source!r}",
    )
    need(d.image_size % m.patch_size == 0, "model.patch_size", f"must divide data.image_size {d.image_size}")
    need(m.hidden_size % m.num_heads == 0, "model.num_heads", f"must divide model.hidden_size {m.hidden_size}")
    need(d.num_channels in (1, 3), "data.num_channels", "must be 1 or 3")
    need(all(b in (2, 3, 4, 8) for b in q.bits) and q.bits, "qat.bits", f"must be among 2, 3, 4, 8, got {list(q.bits)}")
    need(
        set(q.methods) <= {"lsq", "ofq"} and q.methods, "qat.methods", f"must be lsq and/or ofq, got {list(q.methods)}"
    )
    need(q.cga_epochs <= q.epochs, "qat.cga_epochs", f"must lie in 0..qat.epochs ({q.epochs})")
    need(cfg.fp.epochs >= 1 or m.pretrained, "fp.epochs", "must be >= 1 (0 only with model.pretrained)")
    for key, v in (("data.mean", d.mean), ("data.std", d.std)):
        need(v is None or len(v) == d.num_channels, key, f"needs one value per channel ({d.num_channels}), got {v}")
    need((d.mean is None) == (d.std is None), "data.std", "data.mean and data.std are given together")
    need(d.std is None or min(d.std) > 0, "data.std", f"must be > 0, got {d.std}")
    need(
        cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:") and cfg.device[5:].isdigit(),
        "device",
        f"must be auto, cpu, cuda or cuda:N, got {cfg.device!r}",
    )


def resolve_device(cfg: OFQConfig) -> torch.device:
    """``device``, with auto resolved; a CUDA device that is not there is a config error."""
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(cfg.device)
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"config key 'device': {cfg.device} is not available on this machine")
    return dev


def load_ofq_config(path: str, overrides: list[str] | tuple[str, ...] = ()) -> OFQConfig:
    cfg = build(OFQConfig, read_yaml(preset_path(path)), overrides)
    validate(cfg)
    return cfg


# ----------------------------------------------------------------------------- data


def load_images(d: OFQData, seed: int):
    """(train, test) splits for ``data.source``: in memory or streamed (compression.ofq.data)."""
    from compression.ofq.data import open_splits

    return open_splits(d, seed)


# ----------------------------------------------------------------------------- model and training


def build_model(cfg: OFQConfig):
    from transformers import (
        AutoModelForImageClassification,
        DeiTConfig,
        DeiTForImageClassification,
        ViTConfig,
        ViTForImageClassification,
    )

    m = cfg.model
    if m.pretrained:
        return AutoModelForImageClassification.from_pretrained(m.pretrained)
    kw = dict(
        image_size=cfg.data.image_size,
        patch_size=m.patch_size,
        num_channels=cfg.data.num_channels,
        hidden_size=m.hidden_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads,
        intermediate_size=m.mlp_size,
        num_labels=m.num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(cfg.seed)
    return (
        ViTForImageClassification(ViTConfig(**kw)) if m.arch == "vit" else DeiTForImageClassification(DeiTConfig(**kw))
    )


def _shift(x: torch.Tensor, pixels: int, g: torch.Generator) -> torch.Tensor:
    """Random translation by up to ``pixels`` (zero padding)."""
    if not pixels:
        return x
    h, w = x.shape[-2:]
    padded = F.pad(x, (pixels,) * 4)
    dy, dx = torch.randint(0, 2 * pixels + 1, (2,), generator=g).tolist()
    return padded[..., dy : dy + h, dx : dx + w]


@torch.no_grad()
def accuracy(model, split, batch: int = 256, workers: int = 0) -> float:
    """Top-1 accuracy on a split, streamed ``batch`` images at a time to the model's device."""
    from compression.ofq.data import batches

    model.eval()
    device = next(model.parameters()).device
    correct = torch.zeros((), dtype=torch.long, device=device)
    order = torch.arange(len(split))
    for x, y in batches(split, order, batch, workers, pin=device.type == "cuda"):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        correct += (model(pixel_values=x).logits.argmax(-1) == y).sum()
    return int(correct) / len(split)


def train_step(model, x: torch.Tensor, y: torch.Tensor, teacher=None) -> torch.Tensor:
    """The loss of one batch (cross-entropy, plus KL from the teacher at T=1), backpropagated; the batch
    is moved to the model's device first. Returns the loss on that device."""
    device = next(model.parameters()).device
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    logits = model(pixel_values=x).logits
    loss = F.cross_entropy(logits, y)
    if teacher is not None:
        with torch.no_grad():
            soft = teacher(pixel_values=x).logits.softmax(-1)
        loss = loss + F.kl_div(logits.log_softmax(-1), soft, reduction="batchmean")
    loss.backward()
    return loss.detach()


def _param_groups(model, wd: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() <= 1 or name.endswith(".step") else decay).append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def train(
    model,
    data: tuple,
    t,
    seed: int,
    shift: int,
    teacher=None,
    tracker=None,
    cga_br: Optional[float] = None,
    cga_from: int = 0,
    log: Callable[[str], None] = print,
    label: str = "",
    workers: int = 0,
) -> list[dict]:
    """AdamW with warm-up and cosine decay over ``data`` = (train, test) splits, on the model's device;
    returns one row per epoch (loss, test accuracy, oscillation). With ``cga_br``, CGA is set up at
    epoch ``cga_from`` (it merges QKR's product and freezes StatsQ scales then) and anneals to the end."""
    from compression.ofq.cga import CGA
    from compression.ofq.data import batches

    train_split, test_split = data
    pin = next(model.parameters()).device.type == "cuda"
    g = torch.Generator().manual_seed(seed)
    n = len(train_split)
    steps_per_epoch = math.ceil(n / t.batch_size)
    total = steps_per_epoch * t.epochs
    warm = steps_per_epoch * t.warmup_epochs
    opt = torch.optim.AdamW(_param_groups(model, t.weight_decay), lr=t.lr)

    def lr_at(step: int) -> float:  # linear warm-up, cosine to 1%; set by hand so groups added later follow it
        if step < warm:
            return t.lr * (step + 1) / warm
        return t.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(total - warm, 1))))

    step = 0
    history = []
    for epoch in range(t.epochs):
        model.train()
        annealing = cga_br is not None and epoch >= cga_from
        if annealing and epoch == cga_from:
            known = {id(p) for group in opt.param_groups for p in group["params"]}
            cga = CGA(model, cga_br)  # QKR's Wq·Wk becomes a parameter here: the optimizer must see it
            fresh = [p for p in model.parameters() if p.requires_grad and id(p) not in known]
            if fresh:
                opt.add_param_group({"params": fresh, "weight_decay": t.weight_decay})
        order = torch.randperm(n, generator=g)
        losses, osc, near, frozen = [], [], [], []
        for x, y in batches(train_split, order, t.batch_size, workers, pin):
            opt.zero_grad(set_to_none=True)
            losses.append(train_step(model, _shift(x, shift, g), y, teacher))
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            step += 1
            if annealing:
                frozen.append(cga.update_masks())  # from the current weights, every step
                cga.before_step()
            opt.step()
            if annealing:
                cga.after_step()
            if tracker is not None:
                m = tracker.step(cga.masks if annealing else None)
                osc.append(m["oscillation_rate"])
                near.append(m["near_boundary"])
        row = {
            "epoch": epoch + 1,
            "loss": float(torch.stack(losses).mean()),  # one device sync an epoch
            "test_accuracy": accuracy(model, test_split, workers=workers),
        }
        if tracker is not None:
            frozen_share = sum(frozen) / len(frozen) if frozen else 0.0
            row.update(oscillation_rate=sum(osc) / len(osc), near_boundary=sum(near) / len(near), frozen=frozen_share)
        history.append(row)
        if (epoch + 1) % 10 == 0 or epoch + 1 == t.epochs:
            extra = (
                f", oscillation {row['oscillation_rate']:.2e}, frozen {row['frozen']:.0%}"
                if tracker is not None
                else ""
            )
            log(f"{label} epoch {epoch + 1}/{t.epochs}: loss {row['loss']:.3f}, test {row['test_accuracy']:.1%}{extra}")
    return history


def run_ofq(cfg: OFQConfig, out_dir: str, log: Callable[[str], None] = print) -> dict:
    """Full precision, then QAT for every (bits, method); results.json and ofq.png in ``out_dir``."""
    from compression.ofq.data import batches
    from compression.ofq.modules import quantize_vit
    from compression.ofq.oscillation import OscillationTracker

    torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data = load_images(cfg.data, cfg.seed)
    workers = cfg.data.workers
    log(f"data: {len(data[0])} train / {len(data[1])} test images from {cfg.data.source}; device {device}")
    fp_model = build_model(cfg).to(device)
    fp_history = []
    if not cfg.model.pretrained:
        fp_history = train(
            fp_model, data, cfg.fp, cfg.seed, cfg.data.augment_shift, log=log, label="fp", workers=workers
        )
        fp_model.save_pretrained(out / "fp")
    fp_acc = accuracy(fp_model, data[1], workers=workers)
    log(f"full precision: test accuracy {fp_acc:.1%}")
    fp_model.eval()
    runs = {}
    for bits in cfg.qat.bits:
        for method in cfg.qat.methods:
            label = f"{method}-w{bits}a{bits}"
            model = quantize_vit(copy.deepcopy(fp_model), bits, method).to(device)
            first, _ = next(batches(data[0], torch.arange(len(data[0])), cfg.qat.batch_size, workers))
            with torch.no_grad():  # LSQ steps initialize on this batch
                model(pixel_values=first.to(device))
            tracker = OscillationTracker(model, cfg.qat.near_br)
            cga_br = cfg.qat.cga_br if method == "ofq" and cfg.qat.cga_epochs else None
            hist = train(
                model,
                data,
                cfg.qat,
                cfg.seed,
                cfg.data.augment_shift,
                teacher=fp_model if cfg.qat.distill else None,
                tracker=tracker,
                cga_br=cga_br,
                cga_from=cfg.qat.epochs - cfg.qat.cga_epochs,
                log=log,
                label=label,
                workers=workers,
            )
            last = hist[-max(1, min(5, len(hist))) :]
            runs[label] = {
                "method": method,
                "bits": bits,
                "test_accuracy": hist[-1]["test_accuracy"],
                "final_oscillation_rate": sum(r["oscillation_rate"] for r in last) / len(last),
                "final_near_boundary": sum(r["near_boundary"] for r in last) / len(last),
                "history": hist,
            }
    results = {
        "full_precision": {"test_accuracy": fp_acc, "history": fp_history},
        "runs": runs,
        "config": to_dict(cfg),
        "seconds": time.time() - t0,
        "oscillation_rate_definition": "share of quantized weights whose integer level flips back per step, "
        "mean over the last 5 epochs",
    }
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    _plot(results, out / "ofq.png")
    return results


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for label, r in results["runs"].items():
        epochs = [h["epoch"] for h in r["history"]]
        ax1.plot(epochs, [h["test_accuracy"] for h in r["history"]], label=label)
        ax2.plot(epochs, [max(h["oscillation_rate"], 1e-7) for h in r["history"]], label=label)
    ax1.axhline(results["full_precision"]["test_accuracy"], color="k", ls="--", lw=1, label="full precision")
    ax1.set(xlabel="QAT epoch", ylabel="test accuracy", title="accuracy")
    ax2.set(xlabel="QAT epoch", ylabel="oscillating weights per step", yscale="log", title="oscillation rate")
    ax1.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
