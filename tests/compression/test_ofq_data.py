"""OFQ's data streams from disk (nothing stacks a split) and its training step runs where the model is."""

import json

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from compression.ofq.data import FileImages, TensorImages, batches, open_splits
from compression.ofq.experiment import OFQConfig, load_ofq_config, resolve_device, run_ofq, train_step
from gdpo.config import ConfigError
from gdpo.structured import build


def _folder(root, per_class=6, size=12):
    """PATH/{train,val}/<class>/*.png: class 'dark' images are dark, 'light' ones light (learnable)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", 2)):
        for ci, name in enumerate(("dark", "light")):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                base = 40 + 160 * ci
                a = np.clip(base + rng.integers(-30, 30, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(a).save(d / f"{i}.png")
    return root


def _data(source, **kw):
    return build(OFQConfig, {"data": {"source": source, "image_size": 8, "num_channels": 3, **kw}}).data


def test_an_image_folder_streams_decoded_images_normalized(tmp_path):
    root = _folder(tmp_path / "imgs")
    train, test = open_splits(_data(f"imagefolder:{root}"), seed=0)
    assert isinstance(train, FileImages) and not hasattr(train, "x")  # files, not a stacked tensor
    assert (len(train), len(test)) == (12, 4) and test.classes == ["dark", "light"]
    xs = torch.stack([train[i][0] for i in range(len(train))])
    assert xs.shape == (12, 3, 8, 8)
    torch.testing.assert_close(xs.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)  # estimated on train
    got = list(batches(train, torch.tensor([3, 0, 7, 11, 5]), 2, workers=2))
    assert [len(y) for _, y in got] == [2, 2, 1]
    torch.testing.assert_close(got[0][0][0], train[3][0])  # the order asked for, decoded by worker processes
    assert [int(v) for v in torch.cat([y for _, y in got])] == [0, 0, 1, 1, 0]
    given = _data(f"imagefolder:{root}", mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    tr, _ = open_splits(given, seed=0)
    torch.testing.assert_close(tr[0][0], (tr.raw(0) - 0.5) / 0.25)


def test_digits_stay_in_memory_and_batch_by_indexing():
    train, test = open_splits(_data("digits", num_channels=1), seed=0)
    assert isinstance(train, TensorImages) and len(train) + len(test) == 1797
    (x, y), *_ = batches(train, torch.arange(len(train)), 64)
    torch.testing.assert_close(x[5], train[5][0])
    assert int(y[5]) == train[5][1]


def test_bad_image_sources_are_named(tmp_path):
    (tmp_path / "empty" / "train" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "val" / "a").mkdir(parents=True)
    with pytest.raises(ConfigError, match="no images under"):
        open_splits(_data(f"imagefolder:{tmp_path / 'empty'}"), 0)
    with pytest.raises(ConfigError, match=r"no .*nowhere/train directory"):
        open_splits(_data(f"imagefolder:{tmp_path / 'nowhere'}"), 0)
    root = _folder(tmp_path / "imgs")
    (root / "train" / "dark" / "9.png").write_bytes(b"not an image")
    train, _ = open_splits(_data(f"imagefolder:{root}", mean=[0.5] * 3, std=[0.2] * 3), 0)
    bad = next(i for i, (f, _) in enumerate(train.files) if f.endswith("9.png"))
    with pytest.raises(ConfigError, match="cannot read image .*9.png"):
        train[bad]


def test_device_settings_are_checked(tmp_path):
    for override, msg in (("device=tpu", "must be auto, cpu, cuda or cuda:N"), ("data.mean=[0.5]", "data.std")):
        with pytest.raises(ConfigError, match=msg):
            load_ofq_config("ofq_digits_cpu", [override])
    with pytest.raises(ConfigError, match="needs one value per channel"):
        load_ofq_config("ofq_digits_cpu", ["data.mean=[0.5,0.5]", "data.std=[1,1]"])
    assert resolve_device(load_ofq_config("ofq_digits_cpu", ["device=cpu"])).type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="cuda:3 is not available"):
            resolve_device(load_ofq_config("ofq_digits_cpu", ["device=cuda:3"]))
        assert resolve_device(load_ofq_config("ofq_digits_cpu")).type == "cpu"  # auto


@pytest.mark.parametrize("method", ["lsq", "ofq"])
def test_the_training_step_moves_each_batch_to_the_models_device(method):
    """The model on another device than the loader's CPU batches (fake tensors on ``meta``: a CPU
    tensor meeting a model tensor raises, as it would on CUDA)."""
    from transformers import DeiTConfig, DeiTForImageClassification

    from compression.ofq.modules import quantize_vit

    torch.manual_seed(0)
    cfg = DeiTConfig(
        image_size=8,
        patch_size=2,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=2,
    )
    model = quantize_vit(DeiTForImageClassification(cfg), 4, method)
    teacher = DeiTForImageClassification(cfg)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 1, 0])  # as the loader yields them: on the CPU
    with torch.no_grad():
        model(pixel_values=x)  # LSQ steps initialize on a first batch, as run_ofq does, before the move
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        model, teacher = model.to_empty(device="meta"), teacher.to_empty(device="meta")
        loss = train_step(model, x, y, teacher)
    assert loss.device.type == "meta" and x.device.type == "cpu"
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in model.parameters() if p.requires_grad)


def test_ofq_runs_end_to_end_on_a_streamed_image_folder(tmp_path):
    root = _folder(tmp_path / "imgs", per_class=16)
    cfg = load_ofq_config(
        "ofq_digits_cpu",
        [
            f"data.source=imagefolder:{root}",
            "data.num_channels=3",
            "data.workers=1",
            "model.num_labels=2",
            "model.num_layers=1",
            "model.hidden_size=32",
            "model.mlp_size=64",
            "fp.epochs=2",
            "qat.epochs=2",
            "qat.cga_epochs=1",
            "qat.bits=[4]",
            "qat.batch_size=8",
            "fp.batch_size=8",
        ],
    )
    run_ofq(cfg, str(tmp_path / "out"), log=lambda s: None)
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(res["runs"]) == {"lsq-w4a4", "ofq-w4a4"}
    assert res["config"]["data"]["source"].startswith("imagefolder:")
    for r in res["runs"].values():
        assert len(r["history"]) == 2 and 0 <= r["test_accuracy"] <= 1
