"""The pretraining evidence suites (label efficiency, disjoint vs random masking): config
checks with one-line errors, the label subset, the curve reading behind the masking floor,
the command-line wiring; the plumbing runs themselves are slow."""

import json

import numpy as np
import pytest

from conftest import one_line_error
from edgekit.benchmarks.label_efficiency import (SPEED_RATIO_LIMIT, LabelEfficiencySuiteConfig, label_subset,
                                                 unequal_speeds)
from edgekit.benchmarks.masking import (MaskingSuiteConfig, mean_curves, resummarise, steps_to_reach,
                                       steps_to_stay, summarise)
from edgekit.benchmarks.suites import SUITES
from edgekit.cli import main
from edgekit.data.synthetic import generate_synthetic_dataset


@pytest.mark.parametrize("options, flag", [
    ({"label_fraction": 1.0}, "--label-fraction"),
    ({"label_fraction": 0.0}, "--label-fraction"),
    ({"num_train": 10, "label_fraction": 0.1}, "--label-fraction"),  # one image: too few to train on
    ({"pretrain_seconds": 0}, "--pretrain-seconds"),
    ({"finetune_seconds": -1}, "--finetune-seconds"),
    ({"image_size": 100}, "--image-size"),
    ({"mask_ratio": 1.2}, "mask"),
    ({"masking": "disjoint"}, "--views"),          # disjoint with one view is random masking
    ({"masking": "blocks"}, "--masking"),
    ({"threads": 0}, "--threads"),
    ({"lr": 0}, "--lr"),
    ({"quick": True, "num_train": 50}, "--num-train"),  # quick sets the sizes itself
])
def test_label_efficiency_config_refuses_bad_options_in_one_line(options, flag):
    assert flag in one_line_error(LabelEfficiencySuiteConfig, **options)


def test_label_efficiency_config_plans_quick_and_full_runs():
    full = LabelEfficiencySuiteConfig(label_fraction=0.25, num_train=40)
    assert full.plan()["num_train"] == 40 and full.low_label_images() == 10
    quick = LabelEfficiencySuiteConfig(quick=True)
    assert quick.plan()["num_train"] < full.plan()["num_train"] and quick.low_label_images() >= 2
    pre = quick.pretrain_config("images", "out")
    assert pre.input_size == quick.plan()["image_size"] and pre.time_limit == quick.plan()["pretrain_seconds"]


@pytest.mark.parametrize("options, flag", [
    ({"seeds": []}, "--seeds"), ({"seeds": [1, 1]}, "--seeds"), ({"steps": 1}, "--steps"),
    ({"eval_every": 0}, "--eval-every"), ({"eval_every": 400, "steps": 300}, "--eval-every"),
    ({"num_images": 3}, "--num-images"), ({"input_size": 512}, "--input-size"),
    ({"mask_ratio": 0.0}, "mask"), ({"input_size": 96, "source_size": 128, "crops_per_image": 1}, None),
])
def test_masking_config_checks(options, flag):
    if flag is None:
        assert MaskingSuiteConfig(**options).input_size == options["input_size"]
    else:
        assert flag in one_line_error(MaskingSuiteConfig, **options)


def test_label_subset_links_a_seeded_share_of_the_training_images(tmp_path, rng):
    data = tmp_path / "data"
    generate_synthetic_dataset(data, num_train=8, num_val=2, image_size=64, seed=int(rng.integers(1000)))
    count, seed = int(rng.integers(2, 7)), int(rng.integers(1000))
    chosen = label_subset(data, tmp_path / "a", count, seed)
    assert chosen == label_subset(data, tmp_path / "b", count, seed)
    images = sorted(p.name for p in (tmp_path / "a" / "train" / "images").iterdir())
    labels = sorted(p.stem for p in (tmp_path / "a" / "train" / "labelTxt").iterdir())
    assert images == sorted(chosen) and len(set(images)) == count
    assert labels == [name.rsplit(".", 1)[0] for name in images]
    for name in images:  # the same bytes as the originals
        assert (tmp_path / "a" / "train" / "images" / name).read_bytes() == (data / "train" / "images" / name).read_bytes()
    assert sorted(p.name for p in (tmp_path / "a" / "val" / "images").iterdir()) == \
        sorted(p.name for p in (data / "val" / "images").iterdir())


def test_arms_trained_at_unequal_speeds_are_flagged(rng):
    """Equal time is equal work only when both arms train at the same rate (a shared machine)."""
    def arm(images, seconds):
        return {"images_seen": images, "train_seconds": seconds}

    rate = rng.uniform(5, 50)
    slow = rate / (SPEED_RATIO_LIMIT * rng.uniform(1.05, 4))
    even = rate / rng.uniform(1.0, SPEED_RATIO_LIMIT * 0.95)
    record = {"arms": [
        {"labelled_images": 40, "pretrain_finetune": arm(round(slow * 233), 233), "scratch": arm(round(rate * 705), 705)},
        {"labelled_images": 400, "pretrain_finetune": arm(round(even * 233), 233), "scratch": arm(round(rate * 702), 702)}]}
    lines = unequal_speeds(record)
    low = record["arms"][0]
    ratio = (low["scratch"]["images_seen"] / 705) / (low["pretrain_finetune"]["images_seen"] / 233)
    assert len(lines) == 1 and "at 40 labels" in lines[0] and f"{ratio:.1f}x apart" in lines[0]


def test_steps_to_reach_matches_a_dense_reading_of_the_curve(rng):
    xs = np.cumsum(rng.integers(1, 30, 12)).astype(float)
    losses = 1.0 - np.cumsum(rng.uniform(0, 0.05, 12))  # decreasing, as held-out loss mostly is
    target = float(rng.uniform(losses[-1], losses[0]))
    dense = np.linspace(xs[0], xs[-1], 200_001)
    expected = dense[np.argmax(np.interp(dense, xs, losses) <= target)]
    assert steps_to_reach(list(xs), list(losses), target) == pytest.approx(expected, abs=(xs[-1] - xs[0]) / 1e5)
    assert steps_to_reach(list(xs), list(losses), losses[-1] - 0.01) is None
    assert steps_to_reach(list(xs), list(losses), losses[0] + 0.01) == xs[0]


def test_steps_to_stay_matches_a_dense_reading_of_a_noisy_curve(rng):
    xs = np.cumsum(rng.integers(1, 30, 16)).astype(float)
    losses = np.linspace(1.0, 0.6, 16) + rng.uniform(-0.08, 0.08, 16)  # dips below and climbs back
    target = float(rng.uniform(losses[-1], losses.max()))
    dense = np.linspace(xs[0], xs[-1], 200_001)
    above = np.nonzero(np.interp(dense, xs, losses) > target)[0]
    expected = dense[above[-1] + 1] if len(above) else xs[0]
    assert steps_to_stay(list(xs), list(losses), target) == pytest.approx(expected, abs=(xs[-1] - xs[0]) / 1e5)
    assert steps_to_stay(list(xs), list(losses), target) >= steps_to_reach(list(xs), list(losses), target)
    assert steps_to_stay(list(xs), list(losses), losses[-1] - 0.01) is None


def test_summary_ratios_are_against_the_one_view_random_run(rng):
    steps = [0, 10, 20]
    base_loss = [1.0, 0.8, float(rng.uniform(0.5, 0.7))]
    curves = [{"masking": "random", "views": 1, "steps": steps, "seconds": [0, 5, 10], "eval_loss": base_loss,
               "train_loss": [None, 0.9, 0.7]},
              {"masking": "disjoint", "views": 2, "steps": steps, "seconds": [0, 10, 20],
               "eval_loss": [1.0, base_loss[2], 0.4], "train_loss": [None, 0.8, 0.5]}]
    rows = summarise({"curves": curves})["settings"]
    assert rows["random x1"]["step_ratio"] == 1.0 and rows["random x1"]["seconds_ratio"] == 1.0
    assert rows["disjoint x2"]["step_ratio"] == pytest.approx(0.5)
    assert rows["disjoint x2"]["seconds_ratio"] == pytest.approx(1.0)
    assert rows["disjoint x2"]["stay_step_ratio"] == pytest.approx(0.5)


def test_resummarise_rewrites_the_verdict_from_the_stored_curves(tmp_path, rng):
    loss = float(rng.uniform(0.5, 0.7))
    curves = [{"masking": "random", "views": 1, "steps": [0, 10, 20], "seconds": [0, 5, 10],
               "eval_loss": [1.0, 0.8, loss], "train_loss": [None, 0.9, 0.7]},
              {"masking": "random", "views": 2, "steps": [0, 10, 20], "seconds": [0, 9, 18],
               "eval_loss": [1.0, 0.9, 0.8], "train_loss": [None, 0.9, 0.8]},
              {"masking": "disjoint", "views": 2, "steps": [0, 10, 20], "seconds": [0, 10, 20],
               "eval_loss": [1.0, loss - 0.01, loss + 0.01], "train_loss": [None, 0.8, 0.5]}]
    record = {"config": MaskingSuiteConfig().to_dict(), "steps": 20, "seeds_done": [3], "num_images": 8,
              "source_size": 256, "machine": {"command": "c", "date": "d", "cpu": "x", "cores": 2, "versions": {}},
              "runs": [{"seed": 3, "curves": curves, "config": {"decoder_dim": 8, "input_size": 128},
                        "train_images": 6, "held_out_images": True, "eval_crops": 4, "warmup_steps": 1}]}
    path = tmp_path / "masking_cpu.json"
    path.write_text(json.dumps(record))
    out = resummarise(path)
    assert out["disjoint_step_ratios"][0] < 0.7 and out["floor_met_every_seed"]  # a dip at step ~10
    assert out["disjoint_stay_step_ratios"] == [None] and not out["stay_floor_met_every_seed"]  # ends above
    assert json.loads(path.read_text())["disjoint_stay_step_ratios"] == [None]
    assert "NOT met" in (tmp_path / "masking_cpu.md").read_text()


def test_the_verdict_on_seed_mean_curves_reads_the_averaged_losses(rng):
    steps = [0, 10, 20, 30]
    def curve(masking, views, losses):
        return {"masking": masking, "views": views, "steps": steps, "seconds": [0.0, 1.0, 2.0, 3.0],
                "eval_loss": losses, "train_loss": [None, 0.9, 0.8, 0.7]}
    runs = []
    for _ in range(3):
        base, other, disjoint = (np.sort(rng.uniform(0.3, 1.0, 4))[::-1].tolist() for _ in range(3))
        runs.append({"curves": [curve("random", 1, base), curve("random", 2, other), curve("disjoint", 2, disjoint)]})
    mean = mean_curves(runs)["curves"]
    averaged = {(c["masking"], c["views"]): np.mean([r["curves"][i]["eval_loss"] for r in runs], axis=0)
                for i, c in enumerate(runs[0]["curves"])}
    for c in mean:
        np.testing.assert_allclose(c["eval_loss"], averaged[c["masking"], c["views"]], rtol=1e-12)
        assert c["train_loss"][0] is None
    # The ratio read by dense interpolation of the averaged curves, independently of steps_to_reach.
    dense = np.linspace(0, 30, 300001)
    target = averaged["random", 1][-1]
    below = np.nonzero(np.interp(dense, steps, averaged["disjoint", 2]) <= target)[0]
    expected = None if len(below) == 0 else dense[below[0]] / 30
    got = summarise(mean_curves(runs))["settings"]["disjoint x2"]["step_ratio"]
    assert (got is None) == (expected is None)
    if expected is not None:
        assert got == pytest.approx(expected, abs=1e-4)
    runs[1]["curves"][0]["steps"] = [0, 10, 20, 40]
    with pytest.raises(ValueError, match="different steps"):
        mean_curves(runs)


def test_the_suites_are_on_the_command_line(capsys):
    assert {"label-efficiency", "masking"} <= set(SUITES)
    assert main(["bench", "label-efficiency", "--help"]) == 0
    assert "--label-fraction" in capsys.readouterr().out
    assert main(["bench", "masking", "--seeds", "1,1"]) == 2
    assert "--seeds" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_quick_label_efficiency_run_writes_its_results(tmp_path):
    assert main(["bench", "label-efficiency", "--quick", "--out", str(tmp_path), "--quiet"]) == 0
    record = json.loads((tmp_path / "label_efficiency_cpu.json").read_text())
    low, full = record["arms"]
    assert low["labelled_images"] < full["labelled_images"]
    pre_seconds = record["pretrain"]["wall_seconds"]
    assert low["scratch"]["time_limit"] == pytest.approx(pre_seconds + record["plan"]["finetune_seconds"])
    assert (tmp_path / "label_efficiency_cpu.md").is_file()
    assert (tmp_path / "label_efficiency_reconstructions.png").is_file()
