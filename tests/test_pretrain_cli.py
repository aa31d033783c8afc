"""`edgekit pretrain` then `edgekit train --init`: the pretrained encoder starts the detector."""

from __future__ import annotations

import pytest
import torch

from edgekit.cli import main


def test_pretrain_then_train_from_its_encoder(tmp_path, tiny_data, capsys, monkeypatch):
    from edgekit.engine import train as train_module
    from edgekit.engine.pretrain import load_fcmae_checkpoint
    from edgekit.models.fcmae import encoder_state_dict

    torch.set_num_threads(1)
    code = main(["pretrain", "--data", str(tiny_data / "train" / "images"), "--out", str(tmp_path / "pre"),
                 "--input-size", "64", "--patch-size", "32", "--epochs", "1", "--batch-size", "4",
                 "--decoder-dim", "32", "--reconstructions", "2", "--quiet"])
    assert code == 0, capsys.readouterr().err
    ckpt = tmp_path / "pre" / "last.safetensors"
    assert "pretrained on 8 images" in capsys.readouterr().out and (tmp_path / "pre" / "reconstructions.png").is_file()
    fcmae, _ = load_fcmae_checkpoint(ckpt)
    encoder = encoder_state_dict(fcmae.state_dict())

    seen = {}
    real = train_module.create_model

    def spy(name, **kwargs):  # the detector as train() builds it, before the first step
        model = real(name, **kwargs)
        seen["model"] = model
        return model

    monkeypatch.setattr(train_module, "create_model", spy)
    monkeypatch.setattr(train_module, "ModelEMA", lambda model, *a, **k: seen.setdefault(
        "at_start", {k: v.clone() for k, v in model.backbone.state_dict().items()}) and None)
    code = main(["train", "--data", str(tiny_data), "--out", str(tmp_path / "det"), "--init", str(ckpt),
                 "--image-size", "128", "--epochs", "1", "--batch-size", "4", "--quiet"])
    assert code == 0, capsys.readouterr().err
    start = seen["at_start"]
    shared = [k for k in start if k in encoder]
    assert len(shared) > 50 and all(torch.equal(start[k], encoder[k]) for k in shared)


@pytest.mark.parametrize("argv, needle", [
    (["train", "--data", "{data}", "--out", "{tmp}/o", "--init", "{tmp}/nope.safetensors"], "not found"),
    (["train", "--data", "{data}", "--out", "{tmp}/o", "--init", "x", "--resume", "y"], "give one of them"),
    (["pretrain", "--data", "{tmp}", "--out", "{tmp}/o", "--mask-ratio", "1.5"], "--mask-ratio must be in (0, 1)"),
    (["pretrain", "--data", "{data}/train/images", "--out", "{tmp}/o", "--input-size", "96", "--patch-size", "64"],
     "--patch-size must be a divisor of --input-size 96"),
    (["pretrain", "--data", "{data}", "--out", "{tmp}/o", "--model", "rsdet_atto"], "rsdet_atto"),
])
def test_bad_pretraining_input_is_one_line(tmp_path, tiny_data, capsys, argv, needle):
    argv = [a.format(data=tiny_data, tmp=tmp_path) for a in argv]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and needle in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()
