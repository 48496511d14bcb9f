"""Image classification: both data layouts, their errors, seeded augmentation (training only), each transform,
LoRA on conv and linear layers, the preview grid, and a tiny end-to-end run on scikit-learn's bundled digits."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from peft.tuners.lora import layer
from PIL import Image
from sklearn.datasets import load_digits
from transformers import (
    ConvNextConfig,
    ConvNextForImageClassification,
    ResNetConfig,
    ResNetForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

from tests.conftest import write_recipe_file
from tuneguard.adapters.registry import apply_adapter
from tuneguard.adapters.state import frozen_checksum
from tuneguard.backbones import ImageSpec, load_backbone
from tuneguard.cli import main as cli_main
from tuneguard.data.image_augment import Draw, adjust_color, augment, draw, rotate_zoom
from tuneguard.data.images import ImagePipeline
from tuneguard.data.prepare import Prepared, prepare_data
from tuneguard.data.preview import image_augmentation_preview
from tuneguard.errors import TuneguardError
from tuneguard.recipe import AdapterConfig, ModelConfig, QuantizationConfig, load_recipe
from tuneguard.train.batches import eval_batches, step_windows
from tuneguard.train.losses import ClassificationLoss

SPEC = ImageSpec(1, (0.5,), (0.5,))


@pytest.fixture(scope="module")
def resnet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    config = ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                          num_labels=3, image_size=16)
    path = tmp_path_factory.mktemp("tiny-resnet")
    ResNetForImageClassification(config).save_pretrained(path)
    return path


def save_digits(root: Path, per_class: int, offset: int = 0) -> dict[str, list[Path]]:
    """scikit-learn's bundled 8x8 digits as PNGs in class folders (``per_class`` images of each digit)."""
    digits = load_digits()
    kept: dict[str, list[Path]] = {}
    for i, (image, target) in enumerate(zip(digits.images, digits.target, strict=True)):
        label = str(int(target))
        count = sum(1 for t in digits.target[:i] if t == target)
        if not offset <= count < offset + per_class:
            continue
        path = root / label / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.rint(image * 255 / 16).astype(np.uint8)).save(path)
        kept.setdefault(label, []).append(path)
    return kept


def write_recipe(tmp_path: Path, model: Path, data: dict, **sections: dict) -> Path:
    recipe = {
        "model": {"source": str(model)},
        "adapter": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"kind": "image_classification", "labels": [str(d) for d in range(10)], "image_size": 16} | data,
        "train": {"lr": 1e-2, "epochs": 1, "batch_size": 8, "warmup_ratio": 0.0, "log_every": 1},
        "eval": {"task": True},
        "output": {"dir": str(tmp_path / "runs" / "{name}")},
    }
    return write_recipe_file(tmp_path, recipe, sections)


def prepared(path: Path, *overrides: str, seed: int = 0) -> Prepared:
    return prepare_data(load_recipe(path, list(overrides)).data, None, is_encoder=True, seed=seed, image=SPEC)


# ------------------------------------------------------------------------------------------------ data


def test_class_folders_and_tables_give_the_same_images(tmp_path: Path, resnet_dir: Path) -> None:
    kept = save_digits(tmp_path / "digits", per_class=2)
    rows = [{"image": str(p.relative_to(tmp_path)), "label": label} for label, paths in kept.items() for p in paths]
    (tmp_path / "table.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "table.csv").write_text("image,label\n" + "".join(f"{r['image']},{r['label']}\n" for r in rows))
    (tmp_path / "named.csv").write_text("file,digit\n" + "".join(f"{r['image']},{r['label']}\n" for r in rows))
    seen = []
    for train, fields in [("digits", {}), ("table.jsonl", {}), ("table.csv", {}),
                          ("named.csv", {"image_field": "file", "label_field": "digit"})]:
        data = prepared(write_recipe(tmp_path, resnet_dir, {"train": train, "val_fraction": 0.0} | fields))
        seen.append(sorted((e.label, e.pixels.sum().item(), tuple(e.pixels.shape)) for e in data.train))
    assert seen[0] == seen[1] == seen[2] == seen[3]
    assert len(seen[0]) == 20 and {label for label, _, _ in seen[0]} == set(range(10))
    assert seen[0][0][2] == (1, 16, 16)  # the backbone's one channel, resized to data.image_size


def test_hidden_files_in_class_folders_are_not_images(tmp_path: Path) -> None:
    """macOS writes ``._name.png`` sidecars on exFAT and network drives: not images, so not bad rows."""
    from tuneguard.data.images import folder_rows
    from tuneguard.recipe import DataConfig

    kept = save_digits(tmp_path / "digits", per_class=1)
    (tmp_path / "digits" / "0" / "._0000.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    cfg = DataConfig(kind="image_classification", train=str(tmp_path / "digits"), labels=[str(i) for i in range(10)])
    rows = folder_rows(tmp_path / "digits", cfg)
    assert len(rows) == sum(len(p) for p in kept.values()) and not any("._" in r.where for r in rows)


def test_sixteen_bit_images_are_scaled_and_float_ones_refused(tmp_path: Path) -> None:
    """Pillow's convert clips 16-bit greyscale to 255 (a scan's pixels nearly all white); floats have no scale."""
    import numpy as np
    from PIL import Image

    from tuneguard.data.images import decode

    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "scan.png")
    assert Image.open(tmp_path / "scan.png").mode == "I;16"
    pixels = decode(str(tmp_path / "scan.png"), 1, 32)
    assert pixels.min().item() == 0 and pixels.max().item() == 255 and (pixels == 255).float().mean() < 0.01
    Image.fromarray(np.random.default_rng(0).random((8, 8), dtype=np.float32)).save(tmp_path / "f.tiff")
    with pytest.raises(ValueError, match="floating-point pixels have no fixed 8-bit scale"):
        decode(str(tmp_path / "f.tiff"), 3, 8)


def test_the_processor_config_says_how_pixels_are_normalized(tmp_path: Path, resnet_dir: Path) -> None:
    """Mean and std from preprocessor_config.json; none where it turns normalization off; BGR processors refused."""
    import shutil

    from transformers import AutoConfig

    from tuneguard.backbones import image_spec
    from tuneguard.errors import TuneguardError

    folder = tmp_path / "model"
    shutil.copytree(resnet_dir, folder)
    config = AutoConfig.from_pretrained(folder)
    for settings, expected in (({"image_mean": [0.2], "image_std": [0.4]}, ImageSpec(1, (0.2,), (0.4,))),
                               ({"do_normalize": False, "image_mean": [0.2], "image_std": [0.4]},
                                ImageSpec(1, (0.0,), (1.0,)))):
        (folder / "preprocessor_config.json").write_text(json.dumps(settings))
        assert image_spec(str(folder), config, None) == expected
    (folder / "preprocessor_config.json").write_text(json.dumps({"do_flip_channel_order": True}))
    with pytest.raises(TuneguardError, match="BGR order"):
        image_spec(str(folder), config, None)


def test_missing_and_unreadable_images_are_named(tmp_path: Path, resnet_dir: Path) -> None:
    save_digits(tmp_path / "digits", per_class=1)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "t.csv").write_text("image,label\ndigits/0/0000.png,0\nnowhere.png,1\nbroken.png,2\ndigits/0/0000.png,x\n")
    path = write_recipe(tmp_path, resnet_dir, {"train": "t.csv", "val_fraction": 0.0})
    with pytest.raises(TuneguardError) as err:
        prepared(path)
    message = str(err.value)
    assert "3 of 4 training rows are bad" in message
    assert f"{tmp_path / 't.csv'}:3: image not found: {tmp_path / 'nowhere.png'}" in message
    assert f"{tmp_path / 't.csv'}:4: unreadable image {tmp_path / 'broken.png'}" in message
    assert "label 'x' is not in the label set" in message
    (tmp_path / "empty" / "0").mkdir(parents=True)
    with pytest.raises(TuneguardError, match="no images in class folders"):
        prepared(write_recipe(tmp_path, resnet_dir, {"train": "empty"}))


def test_image_keys_are_validated(tmp_path: Path, resnet_dir: Path, capsys: pytest.CaptureFixture) -> None:
    save_digits(tmp_path / "digits", per_class=1)
    path = write_recipe(tmp_path, resnet_dir, {"train": "digits"})
    cases = {
        "data.image_augment=[rotat]": "unknown image transform 'rotat'; did you mean 'rotate'?",
        "data.image_scale=[1.2,0.8]": "0 < low <= high <= 4",
        "data.image_rotate_degrees=0": "data.image_rotate_degrees",
        "data.image_color=1.5": "data.image_color",
        "data.image_size=4": "data.image_size",
        "eval.suites=[general-small]": "general suites score language models",
        "quantization.method=nf4": "image backbones are not quantized",
        "adapter.method=ia3": "image backbones take 'lora'",
        "data.augment=[swap]": "for images use data.image_augment",
        "data.labels=null": "data.labels is required when data.kind is 'image_classification'",
        "train.layer_lr_decay=0.8": "train.layer_lr_decay: layer-wise settings count transformer layers",
        "adapter.freeze_layers_below=1": "adapter.freeze_layers_below: layer-wise settings",
    }
    for override, expected in cases.items():
        assert cli_main(["train", str(path), override]) == 2
        err = capsys.readouterr().err.strip()
        assert expected in err and err.count("\n") == 0, (override, err)
    text = write_recipe(tmp_path, resnet_dir, {"kind": "classification", "train": "digits"})
    assert cli_main(["train", str(text)]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert cli_main(["train", str(text), "data.kind=classification", "data.image_augment=[hflip]"]) == 2
    assert "applies to data.kind 'image_classification'" in capsys.readouterr().err


def test_a_backbone_built_for_another_size_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """ViT's position embeddings fix its input size: a recipe asking another is refused before training."""
    save_digits(tmp_path / "digits", per_class=2)
    config = ViTConfig(image_size=16, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=32, num_labels=10)
    ViTForImageClassification(config).save_pretrained(tmp_path / "vit")
    path = write_recipe(tmp_path, tmp_path / "vit", {"train": "digits", "image_size": 32}, train={"max_steps": 1})
    capsys.readouterr()  # transformers' saving progress
    assert cli_main(["train", str(path), "--no-eval"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tuneguard: error: data.image_size=32: the backbone cannot take 32x32 images")
    assert err.count("\n") == 0 and not (tmp_path / "runs" / "recipe" / "adapter").exists()
    assert cli_main(["train", str(path), "--no-eval", "--overwrite", "data.image_size=16"]) == 0


# -------------------------------------------------------------------------------------------- augmentation


def test_each_transform_does_what_it_says() -> None:
    images = torch.rand(2, 3, 6, 6)
    none = Draw(degrees=0.0, zoom=1.0, hflip=True, vflip=True, brightness=1.0, contrast=1.0)
    assert torch.equal(augment(images, [none, none], ["hflip"]), images.flip(-1))
    assert torch.equal(augment(images, [none, none], ["vflip"]), images.flip(-2))
    kept = Draw(0.0, 1.0, hflip=False, vflip=False, brightness=1.0, contrast=1.0)
    assert torch.equal(augment(images, [kept, none], ["hflip", "vflip"])[0], images[0])  # a flip is drawn per image
    # 90 degrees counter-clockwise moves each pixel exactly where torch.rot90 moves it (no interpolation left).
    turned = rotate_zoom(images, torch.tensor([90.0, 90.0]), torch.ones(2))
    assert torch.allclose(turned, torch.rot90(images, 1, (-2, -1)), atol=1e-5)
    assert torch.allclose(rotate_zoom(images, torch.zeros(2), torch.ones(2)), images, atol=1e-6)
    # Zoom 2: the centre 2x2 block (of a 4x4 image) fills the middle of the output; rotation pads with zeros.
    square = torch.zeros(1, 1, 4, 4)
    square[..., 1:3, 1:3] = 1.0
    assert torch.allclose(rotate_zoom(square, torch.zeros(1), torch.tensor([2.0]))[..., 1:3, 1:3], torch.ones(2, 2))
    assert rotate_zoom(torch.ones(1, 1, 8, 8), torch.tensor([45.0]), torch.ones(1))[0, 0, 0, 0] == 0
    assert torch.allclose(adjust_color(images, torch.ones(2), torch.ones(2)), images)
    assert torch.allclose(adjust_color(images, torch.tensor([0.5, 0.5]), torch.ones(2)), images * 0.5)
    flat = adjust_color(images, torch.ones(2), torch.zeros(2))
    grey = 0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]
    assert torch.allclose(flat, grey.mean((-2, -1)).view(2, 1, 1, 1).expand_as(images), atol=1e-6)


def test_drawn_parameters_stay_in_the_recipe_ranges(tmp_path: Path, resnet_dir: Path) -> None:
    (tmp_path / "x.csv").write_text("image,label\nx.png,0\n")
    cfg = load_recipe(write_recipe(tmp_path, resnet_dir, {"train": "x.csv", "image_rotate_degrees": 30,
                                                          "image_scale": [0.5, 2.0], "image_color": 0.4})).data
    draws = [draw(cfg, seed=3, epoch=e, index=i) for e in range(4) for i in range(250)]
    for name, low, high in [("degrees", -30, 30), ("zoom", 0.5, 2.0), ("brightness", 0.6, 1.4), ("contrast", 0.6, 1.4)]:
        values = [getattr(d, name) for d in draws]
        assert low <= min(values) < low + 0.05 * (high - low) and high - 0.05 * (high - low) < max(values) <= high
    assert 0.45 < sum(d.hflip for d in draws) / len(draws) < 0.55 and 0.45 < sum(d.vflip for d in draws) / len(draws) < 0.55


def _stream(data: Prepared, path: Path, steps: int, start: int = 0, *overrides: str) -> list[torch.Tensor]:
    stream = step_windows(data, load_recipe(path, list(overrides)), 0, 1, None, start=start)  # one micro-batch a step
    return [next(stream)[0][0]["pixel_values"] for _ in range(steps)]


def test_augmentation_is_seeded_per_epoch_and_never_touches_validation(tmp_path: Path, resnet_dir: Path) -> None:
    save_digits(tmp_path / "digits", per_class=3)
    path = write_recipe(tmp_path, resnet_dir, {"train": "digits", "val_fraction": 0.2,
                                               "image_augment": ["rotate", "scale", "hflip", "color"]})
    data, again = prepared(path, seed=1), prepared(path, seed=1)
    per_epoch = -(-len(data.train) // 8)
    first = _stream(data, path, 2 * per_epoch)
    assert all(torch.equal(a, b) for a, b in zip(first, _stream(again, path, 2 * per_epoch), strict=True))
    # A resumed stream (from micro-batch k) sees exactly what the uninterrupted one saw.
    assert all(torch.equal(a, b) for a, b in zip(first[3:], _stream(again, path, 2 * per_epoch - 3, 3), strict=True))
    plain_data = prepared(path, "data.image_augment=[]", seed=1)
    plain = _stream(plain_data, path, per_epoch, 0, "data.image_augment=[]")
    assert not torch.equal(first[0], plain[0])  # training batches are augmented ...
    assert set(map(tuple, (e.pixels.flatten().tolist() for e in data.train))) == set(
        map(tuple, (e.pixels.flatten().tolist() for e in plain_data.train)))  # ... the stored images are not
    # The same row: the same pixels for the same seed and epoch; other ones for another epoch or seed.
    row = data.train[0]
    pixels = {(seed, epoch): ImagePipeline(SPEC, row.pipeline.cfg, seed).batch([row], epoch)["pixel_values"]
              for seed in (1, 7) for epoch in (0, 1)}
    assert torch.equal(pixels[1, 0], row.pipeline.batch([row], 0)["pixel_values"])
    assert not torch.equal(pixels[1, 0], pixels[1, 1]) and not torch.equal(pixels[1, 0], pixels[7, 0])
    # Validation batches are the stored pixels, normalized, never augmented.
    val = torch.cat([b["pixel_values"] for b in eval_batches(data.val, 4, None)])
    expected = torch.stack([e.pixels for e in data.val]).float() / 255
    assert torch.allclose(val, (expected - 0.5) / 0.5)
    assert data.val and all(e.where.endswith(".png") for e in data.val)


# ------------------------------------------------------------------------------------------------ model


def test_lora_lands_on_convolutions_and_linear_layers(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = ConvNextConfig(num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=2, image_size=16)
    ConvNextForImageClassification(config).save_pretrained(tmp_path / "convnext")
    backbone = load_backbone(ModelConfig(source=str(tmp_path / "convnext")), QuantizationConfig(), num_labels=3)
    assert backbone.image == ImageSpec(3, (0.5,) * 3, (0.5,) * 3) and backbone.tokenizer is None
    model = apply_adapter(backbone.model, AdapterConfig(r=2, alpha=4), is_encoder=True, total_steps=10, image=True)
    adapted = {n: type(m) for n, m in model.named_modules() if isinstance(m, layer.LoraLayer)}
    assert any(t is layer.Conv2d for t in adapted.values()) and any(t is layer.Linear for t in adapted.values())
    assert "base_model.model.convnext.embeddings.patch_embeddings" in adapted  # the stem's dense convolution
    depthwise = [n for n, m in backbone.model.named_modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    assert depthwise and not any(n.endswith(d) for d in depthwise for n in adapted)  # grouped convs are left out
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("classifier.modules_to_save" in n for n in trainable)  # the new 3-way head trains with the adapter
    assert all("lora_" in n or "modules_to_save" in n for n in trainable)
    logits = model(pixel_values=torch.rand(2, 3, 16, 16)).logits
    assert logits.shape == (2, 3)


def test_batch_norm_statistics_stay_frozen_and_are_checksummed(tmp_path: Path, resnet_dir: Path) -> None:
    backbone = load_backbone(ModelConfig(source=str(resnet_dir)), QuantizationConfig(), num_labels=10)
    before = frozen_checksum(backbone.model)
    model = apply_adapter(backbone.model, AdapterConfig(r=2, alpha=4), is_encoder=True, total_steps=10, image=True)
    loss = ClassificationLoss(model).train()
    model.train()  # as scoring during training leaves it (early stopping on accuracy)
    loss(labels=torch.tensor([0, 1]), pixel_values=torch.randn(2, 1, 16, 16) * 3 + 1)[0].backward()
    assert frozen_checksum(model) == pytest.approx(before, rel=1e-12)
    norm = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert not norm.training and any(m.training for m in model.modules())  # dropout etc. still train
    norm.running_mean += 1.0  # what train-mode batch norm would have done: the guard's checksum sees it
    assert frozen_checksum(model) != pytest.approx(before, rel=1e-12)


# ------------------------------------------------------------------------------------------ preview, e2e


def test_preview_writes_a_grid_of_originals_and_copies(tmp_path: Path, resnet_dir: Path, capsys) -> None:
    save_digits(tmp_path / "digits", per_class=1)
    path = write_recipe(tmp_path, resnet_dir, {"train": "digits", "image_augment": ["rotate", "color"]})
    out = tmp_path / "grid.png"
    assert cli_main(["data", "preview", str(path), "--n", "3", "--epochs", "2", "--out", str(out)]) == 0
    with Image.open(out) as grid:
        assert grid.format == "PNG" and grid.width > 200 and grid.height > 200
    assert "3 training images" in capsys.readouterr().err
    assert cli_main(["data", "preview", str(path), "data.image_augment=[]", "--out", str(out)]) == 2
    assert "data.image_augment is empty" in capsys.readouterr().err
    for wrong in (tmp_path, tmp_path / "grid.jpgx"):
        assert cli_main(["data", "preview", str(path), "--out", str(wrong)]) == 2
        assert f"--out {wrong}: name the PNG file to write" in capsys.readouterr().err


def test_a_long_image_name_is_elided_in_the_grid() -> None:
    from tuneguard.report.image_grid import NAME_CHARS
    from tuneguard.report.plots import short

    def _short(name: str) -> str:
        return short(name, NAME_CHARS, middle=True)

    assert _short("0001.png") == "0001.png"
    assert _short("some_long_image_name_0.png") == "some_lo…me_0.png" and len(_short("x" * 40)) == 16
    assert short("x" * 50) == "x" * 39 + "…"  # a chart label: its end cut


def test_preview_takes_each_class_in_turn_and_draws_what_training_draws(tmp_path: Path) -> None:
    """Class folders list one class after another: the preview takes a row of each class in turn (not the first
    class n times), and each copy is the one training draws for that row (its index among the training rows)."""
    save_digits(tmp_path / "digits", per_class=3)
    path = write_recipe(tmp_path, tmp_path, {"train": "digits", "validation": None, "image_augment": ["rotate", "color"]})
    cfg = load_recipe(path).data
    rows = image_augmentation_preview(cfg, SPEC, seed=0, n=4, epochs=2)
    assert len({r.answer for r in rows}) == 4
    unscaled = ImagePipeline(ImageSpec(1, (0.0,), (1.0,)), cfg, 0)
    training = {e.where: e for e in prepared(path).train}
    for row in rows:
        seen = training[row.where]
        assert torch.equal(row.images[0], unscaled.batch([seen])["pixel_values"][0])
        for epoch in range(2):
            assert torch.equal(row.images[1 + epoch], unscaled.batch([seen], epoch)["pixel_values"][0])


def test_digits_end_to_end_beats_chance(tmp_path: Path, capsys) -> None:
    save_digits(tmp_path / "train", per_class=12)
    save_digits(tmp_path / "val", per_class=4, offset=12)
    shipped = Path(__file__).resolve().parents[1] / "recipes" / "models" / "resnet-tiny-random"  # 78k parameters
    path = write_recipe(tmp_path, shipped, {"train": "train", "validation": "val", "image_augment": ["rotate"],
                                            "image_rotate_degrees": 10},
                        train={"epochs": 4, "batch_size": 16, "lr": 2e-2})
    assert cli_main(["train", str(path)]) == 0
    run = tmp_path / "runs" / "recipe"
    report = json.loads((run / "report.json").read_text())
    (row,) = report["task"]
    assert row["task"] == "recipe (validation)" and row["n"] == 40
    assert row["tuned"] > 0.3 and row["tuned"] > report["baseline"]["chance"]["value"]  # chance: 0.1, ten classes
    guards = json.loads((run / "eval.json").read_text())["guards"]
    assert all(g["passed"] for g in guards) and "probe image" in guards[0]["detail"]
    record = json.loads((run / "run.json").read_text())
    assert record["data"]["train_examples"] == 120 and record["data"]["image_augment"] == ["rotate"]
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert cli_main(["export", str(run)]) == 2
    assert "merges language backbones" in capsys.readouterr().err


def test_shipped_digits_recipe_finds_its_model_and_data_beside_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # model.source and the data are found beside the recipe, wherever it is run from
    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "digits-resnet-lora.yaml")
    assert (Path(recipe.model.source) / "model.safetensors").is_file()
    data = prepare_data(recipe.data, None, is_encoder=True, seed=recipe.train.seed, image=SPEC)
    assert (len(data.train), len(data.val)) == (500, 200)
    assert sorted(e.label for e in data.val) == sorted(list(range(10)) * 20)

