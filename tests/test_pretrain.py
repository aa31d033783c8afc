"""FCMAE pretraining end to end on small generated images: checkpoint, record,
reconstructions, resume, learning on a fixed image, and bad input refused before anything
is written."""

import itertools
import json

import numpy as np
import pytest
import torch
from PIL import Image

from edgekit.data.images import load_image
from edgekit.engine.checkpoint import save_checkpoint
from edgekit.engine.pretrain import (PretrainConfig, compare_masking, epoch_crops, find_images,
                                     load_fcmae_checkpoint, pretrain, resolve_device, to_tensor)
from edgekit.errors import EdgekitError
from edgekit.models import create_model
from edgekit.models.fcmae import FCMAE, load_pretrained_encoder

FAST = {"decoder_dim": 32, "progress": False, "extra": {"grn_backend": "torch"}}

pytestmark = pytest.mark.usefixtures("one_thread")


def scene(rng, height, width):
    """Smooth random colour fields plus noise: structure a masked autoencoder can learn."""
    ys, xs = np.mgrid[0:height, 0:width] / 6.0
    channels = [np.sin(ys * rng.uniform(0.5, 2) + rng.uniform(0, 6)) * np.cos(xs * rng.uniform(0.5, 2))
                for _ in range(3)]
    pixels = (np.stack(channels, -1) * 90 + 128 + rng.normal(0, 3, (height, width, 3))).clip(0, 255)
    return pixels.astype(np.uint8)


@pytest.fixture
def image_folder(tmp_path, rng):
    root = tmp_path / "unlabeled"
    (root / "sub").mkdir(parents=True)
    for i in range(2):
        Image.fromarray(scene(rng, 96, 128)).save(root / f"scene{i}.png")
    Image.fromarray(scene(rng, 80, 72)).save(root / "sub" / "photo.jpg", quality=95)
    grey16 = (scene(rng, 70, 90)[..., 0].astype(np.uint16) * 257)
    Image.fromarray(grey16).save(root / "sub" / "raster.tif")  # 16-bit grey, rescaled by load_image
    Image.fromarray(scene(rng, 40, 200)).save(root / "narrow.png")  # shorter than a crop: skipped
    (root / "broken.png").write_bytes(b"\x89PNG not really")  # unreadable: skipped
    (root / "notes.txt").write_text("not an image")
    return root


def test_images_are_found_recursively_and_crops_cover_large_scenes(image_folder):
    images = find_images([image_folder], 64)
    assert sorted(p.name for p in images.paths) == ["photo.jpg", "raster.tif", "scene0.png", "scene1.png"]
    assert images.skipped == {"unreadable": 1, "too_small": 1}
    crops = epoch_crops(images, 64, 0, seed=3, epoch=0)
    per_image = {i: sum(c[0] == i for c in crops) for i in range(4)}
    for i, (h, w) in enumerate(images.sizes):
        assert per_image[i] == max(1, (h // 64) * (w // 64))
    for i, top, left, _ in crops:
        assert 0 <= top <= images.sizes[i][0] - 64 and 0 <= left <= images.sizes[i][1] - 64
    assert crops != epoch_crops(images, 64, 0, seed=3, epoch=1)  # fresh crops every epoch


def test_tiny_run_writes_checkpoint_record_and_reconstructions_then_resumes(image_folder, tmp_path):
    out = tmp_path / "run"
    cfg = PretrainConfig(data=str(image_folder), out=str(out), input_size=64, batch_size=4, epochs=1,
                         crops_per_image=2, masking="disjoint", views=2, mask_ratio=0.5, reconstructions=3, ema=True,
                         **FAST)
    result = pretrain(cfg)
    assert result.checkpoint == out / "last.safetensors" and result.images == 4
    assert [h["epoch"] for h in result.history] == [1] and result.history[0]["steps"] == 2
    model, info = load_fcmae_checkpoint(result.checkpoint)
    assert isinstance(model, FCMAE) and info["model"] == "fcmae_convnextv2_atto" and info["image_size"] == 64
    assert model.config()["mask_ratio"] == 0.5 and model.config()["decoder_dim"] == 32
    classifier = create_model("convnextv2_atto", grn_backend="torch").eval()
    load_pretrained_encoder(classifier, result.checkpoint)
    detector = create_model("rsdet_atto", num_classes=2)
    load_pretrained_encoder(detector, result.checkpoint)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(classifier.forward_stages(x)[-1], model.encoder(x)[0])
    record = json.loads((out / "pretrain.json").read_text())
    assert record["skipped"] == {"unreadable": 1, "too_small": 1} and record["history"] == result.history
    sheet = load_image(out / "reconstructions.png")
    assert sheet.shape == (3 * 64 + 2 * 4, 3 * 64 + 2 * 4, 3)
    first_input = sheet[:64, :64].astype(int)
    masked_input = sheet[:64, 68:132].astype(int)
    assert (first_input != masked_input).any() and (first_input == masked_input).all(axis=-1).any()
    assert not list(out.glob(".*"))  # nothing half-written left behind

    again = tmp_path / "resumed"
    resumed = pretrain(cfg.replace(out=str(again), epochs=2, resume=str(out / "last.state.pt")))
    assert [h["epoch"] for h in resumed.history] == [1, 2] and resumed.history[0] == result.history[0]
    _, info = load_fcmae_checkpoint(resumed.checkpoint)
    assert info["epoch"] == 2
    state = torch.load(again / "last.state.pt", weights_only=True)
    assert state["epoch"] == 2 and state["ema"]["updates"] == 4  # the EMA went on counting from the saved state


def test_only_fcmae_checkpoints_load_as_fcmae(tmp_path):
    other = save_checkpoint(tmp_path / "classifier.safetensors", create_model("convnextv2_atto"), "convnextv2_atto", {})
    with pytest.raises(EdgekitError, match="is a convnextv2_atto checkpoint, not an FCMAE pretraining one"):
        load_fcmae_checkpoint(other)
    odd = save_checkpoint(tmp_path / "odd.safetensors", FCMAE(decoder_dim=8), "fcmae_convnextv2_atto", {"width": 3})
    with pytest.raises(EdgekitError, match="odd.safetensors: fcmae_convnextv2_atto: .*width"):
        load_fcmae_checkpoint(odd)


def test_time_limit_ends_the_run_early_with_a_checkpoint(image_folder, tmp_path):
    cfg = PretrainConfig(data=str(image_folder), out=str(tmp_path / "run"), input_size=64, batch_size=4, epochs=50,
                         crops_per_image=1, time_limit=0.01, reconstructions=0, **FAST)
    result = pretrain(cfg)
    assert len(result.history) == 1 and load_fcmae_checkpoint(result.checkpoint)[1]["epoch"] == 1


def all_masks_loss(model, image):
    """The masked-patch loss on ``image`` and its mirror under every mask of 2 of its 4
    patches: a noise-free measure of how well the model reconstructs it."""
    masks = torch.tensor([[float(i in pair) for i in range(4)] for pair in itertools.combinations(range(4), 2)])
    imgs = torch.cat([image, image.flip(-1)]).repeat_interleave(len(masks), dim=0)
    with torch.no_grad():
        return float(model.eval()(imgs, masks.repeat(2, 1))[0])


def test_loss_decreases_on_a_fixed_image(tmp_path, rng):
    folder = tmp_path / "one"
    folder.mkdir()
    pixels = scene(rng, 64, 64)
    Image.fromarray(pixels).save(folder / "fixed.png")  # the crop is the whole image
    cfg = PretrainConfig(data=str(folder), out=str(tmp_path / "run"), input_size=64, batch_size=2, epochs=2,
                         crops_per_image=80, mask_ratio=0.5, lr=2e-3, grad_clip=1.0, warmup_epochs=0.2,
                         reconstructions=0, **FAST)
    result = pretrain(cfg)
    assert sum(h["steps"] for h in result.history) == 80
    image = to_tensor(pixels)[None]
    trained = all_masks_loss(load_fcmae_checkpoint(result.checkpoint)[0], image)
    untrained = all_masks_loss(FCMAE(**load_fcmae_checkpoint(result.checkpoint)[1]["kwargs"]), image)
    print(f"loss before {untrained:.3f}, after 80 steps {trained:.3f}; per epoch {result.history}")
    # lr 3e-3 without clipping diverged on one seed in 20 (1.05); at this setting the 7 hardest of 21 seeds
    # gave 0.41-0.70 of the untrained loss (50 steps: 0.36-0.75 over 21); a model that does not learn stays near 1
    assert trained < 0.85 * untrained


@pytest.mark.parametrize("options,message", [
    ({"mask_ratio": 1.2}, "--mask-ratio must be in (0, 1)"),
    ({"mask_ratio": 0.0}, "--mask-ratio must be in (0, 1)"),
    ({"input_size": 96, "patch_size": 64}, "--patch-size must be a divisor of --input-size 96"),
    ({"patch_size": 16}, "--patch-size must be a multiple of the encoder stride 32"),
    ({"model": "rsdet_atto"}, "has no FCMAE form"),
    ({"masking": "disjoint", "views": 1}, "needs --views >= 2"),
    ({"masking": "blocks"}, "--masking must be random or disjoint"),
    ({"input_size": 64, "mask_ratio": 0.9}, "leaves 0 visible"),
    ({"extra": {"decoder_width": 3}}, "unknown: ['decoder_width']"),
])
def test_bad_options_are_one_line(options, message, tmp_path):
    with pytest.raises(EdgekitError) as info:
        PretrainConfig(data=str(tmp_path), out=str(tmp_path / "out"), **options)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_folder_without_usable_images_writes_nothing(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "broken.jpg").write_bytes(b"junk")
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(empty / "tiny.png")
    out = tmp_path / "out"
    with pytest.raises(EdgekitError, match="no readable image of at least 64x64 px .*1 unreadable, 1 smaller"):
        pretrain(PretrainConfig(data=str(empty), out=str(out), input_size=64, **FAST))
    with pytest.raises(EdgekitError, match="is not a folder"):
        pretrain(PretrainConfig(data=str(tmp_path / "missing"), out=str(out), input_size=64, **FAST))
    assert not out.exists()


def test_resume_from_a_foreign_state_is_refused_before_writing(image_folder, tmp_path):
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {}, "epoch": 1}, foreign)
    out = tmp_path / "out"
    with pytest.raises(EdgekitError, match="not a state written by edgekit pretrain"):
        pretrain(PretrainConfig(data=str(image_folder), out=str(out), input_size=64, resume=str(foreign), **FAST))
    assert not out.exists()


def test_compare_masking_starts_every_setting_alike_and_records_curves(image_folder):
    result = compare_masking(str(image_folder), settings=(("random", 1), ("disjoint", 2)), steps=4, eval_every=2,
                             eval_crops=4, input_size=64, mask_ratio=0.5, batch_size=2, **FAST)
    random_curve, disjoint_curve = result["curves"]
    assert result["held_out_images"] and result["train_images"] == 3 and result["eval_crops"] == 4
    assert (random_curve["masking"], random_curve["views"]) == ("random", 1)
    assert (disjoint_curve["masking"], disjoint_curve["views"]) == ("disjoint", 2)
    for curve in (random_curve, disjoint_curve):
        assert curve["steps"] == [0, 2, 4] and curve["train_loss"][0] is None
        assert curve["seconds"][0] == 0 < curve["seconds"][1] < curve["seconds"][2]
        assert all(np.isfinite(curve["eval_loss"])) and all(np.isfinite(curve["train_loss"][1:]))
    # same initial weights, same held-out crops and masks: the same loss before training
    assert random_curve["eval_loss"][0] == disjoint_curve["eval_loss"][0]
    assert random_curve["eval_loss"][1:] != disjoint_curve["eval_loss"][1:]
    with pytest.raises(EdgekitError, match="needs --views >= 2"):
        compare_masking(str(image_folder), settings=(("disjoint", 1),), input_size=64, **FAST)
    with pytest.raises(EdgekitError, match="compare_masking: ema do not apply"):
        compare_masking(str(image_folder), input_size=64, ema=True, **FAST)
    assert "epochs" not in result["config"] and result["config"]["mask_ratio"] == 0.5


def test_device_choice():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(EdgekitError, match="--device cuda:1: torch sees no CUDA GPU"):
            resolve_device("cuda:1")
    with pytest.raises(EdgekitError, match="--device must be auto, cpu, cuda or cuda:N"):
        PretrainConfig(data="x", device="gpu")
