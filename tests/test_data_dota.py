"""DOTA label reading/writing, against the real DOTA v1.0 label files in shared/data."""

import random
from collections import Counter
from pathlib import Path

import pytest

from edgekit.data.dota import (DOTA_V1_CLASSES, DOTA_V2_CLASSES, DOTA_V15_CLASSES, DotaAnnotation, DotaObject,
                               read_dota_dataset, read_dota_labels, write_dota_labels)
from edgekit.errors import EdgekitError

EXAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "dota_example"
needs_example = pytest.mark.skipif(not EXAMPLE.is_dir(), reason=f"real DOTA sample data not found at {EXAMPLE}")

# Facts about the sample files, counted once with awk ('NR>2 {print $9, $10}' | sort | uniq -c).
EXPECTED = {
    "P0706": ("GoogleEarth", 0.255589285596, {"ship": 531, "harbor": 5}, 6),
    "P0770": ("GoogleEarth", 0.266578848023,
              {"baseball-diamond": 2, "ground-track-field": 1, "swimming-pool": 9, "tennis-court": 10}, 0),
    "P1088": ("GoogleEarth", 0.1377814038, {"large-vehicle": 3, "plane": 22, "small-vehicle": 9}, 0),
    "P1234": ("GF", 1.0, {"bridge": 6, "harbor": 4, "ship": 24, "storage-tank": 110}, 44),
    "P1888": ("GoogleEarth", 0.266170468393, {"large-vehicle": 50, "small-vehicle": 14}, 0),
    "P2598": ("GoogleEarth", 0.113068841441, {"ground-track-field": 1, "large-vehicle": 3, "small-vehicle": 16,
                                              "soccer-ball-field": 2, "tennis-court": 4}, 0),
    "P2709": ("GoogleEarth", 0.283767057345, {"large-vehicle": 7, "ship": 6, "storage-tank": 145}, 17),
}


def test_class_lists():
    assert len(DOTA_V1_CLASSES) == 15 and len(set(DOTA_V1_CLASSES)) == 15
    assert DOTA_V15_CLASSES == DOTA_V1_CLASSES + ("container-crane",)
    assert DOTA_V2_CLASSES == DOTA_V15_CLASSES + ("airport", "helipad")


@needs_example
@pytest.mark.parametrize("stem", sorted(EXPECTED))
def test_real_label_files(stem, tmp_path):
    source, gsd, counts, difficult = EXPECTED[stem]
    ann = read_dota_labels(EXAMPLE / "labelTxt" / f"{stem}.txt", classes=DOTA_V1_CLASSES)
    assert ann.imagesource == source
    assert ann.gsd == pytest.approx(gsd, rel=1e-12)
    assert Counter(o.label for o in ann.objects) == counts
    assert sum(o.difficult > 0 for o in ann.objects) == difficult
    for o in ann.objects:
        x1, y1, x2, y2 = o.box
        assert x1 == min(o.poly[0::2]) and y2 == max(o.poly[1::2]) and x1 <= x2 and y1 <= y2
    # Round trip through our writer.
    write_dota_labels(tmp_path / "x.txt", ann)
    assert read_dota_labels(tmp_path / "x.txt") == ann


@needs_example
def test_read_dataset_pairs_images_with_labels():
    items = read_dota_dataset(EXAMPLE)
    assert [p.name for p, _ in items] == ["P0706.png", "P1888.png"]
    assert len(items[0][1].objects) == 536 and len(items[1][1].objects) == 64


def test_round_trip_random(tmp_path):
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    objects = [DotaObject(tuple(rng.choice([rng.uniform(-50, 5000), float(rng.randrange(0, 5000))]) for _ in range(8)),
                          rng.choice(DOTA_V2_CLASSES), rng.choice([0, 1, 2])) for _ in range(rng.randrange(0, 40))]
    for ann in (DotaAnnotation(objects), DotaAnnotation(objects, "GoogleEarth", None),
                DotaAnnotation(objects, "GF", rng.uniform(0.05, 2))):
        write_dota_labels(tmp_path / "a.txt", ann)
        assert read_dota_labels(tmp_path / "a.txt") == ann, f"seed {seed}"
    assert not list(tmp_path.glob(".*tmp*")), "temporary files left behind"


def test_optional_difficult_blank_lines_null_gsd(tmp_path):
    p = tmp_path / "l.txt"
    p.write_text("imagesource:GoogleEarth\r\ngsd:null\r\n\r\n1 2 3 4 5 6 7 8.5 plane\r\n\n1 1 2 1 2 2 1 2 ship 1\n")
    ann = read_dota_labels(p)
    assert ann.gsd is None and ann.imagesource == "GoogleEarth"
    assert ann.objects == [DotaObject((1, 2, 3, 4, 5, 6, 7, 8.5), "plane", 0), DotaObject((1, 1, 2, 1, 2, 2, 1, 2), "ship", 1)]


@pytest.mark.parametrize("line,expect", [
    ("1 2 3 4 5 6 7 plane", "9 or 10 fields"),
    ("1 2 3 4 5 6 7 plane 0", "'plane' is not a number"),
    ("1 2 3 4 5 6 7 8 9 plane 0", "9 or 10 fields"),
    ("1 2 3 4 5 six 7 8 plane 0", "'six' is not a number"),
    ("1 2 3 4 5 6 7 nan plane 0", "finite"),
    ("1 2 3 4 5 6 7 8 9 0", "class name"),
    ("1 2 3 4 5 6 7 8 plane x", "difficult"),
    ("1 2 3 4 5 6 7 8 plane -1", "difficult"),
])
def test_malformed_line_names_file_and_line(tmp_path, line, expect):
    p = tmp_path / "bad.txt"
    p.write_text(f"imagesource:GF\ngsd:1\n1 1 2 1 2 2 1 2 ship 0\n{line}\n")
    with pytest.raises(EdgekitError) as e:
        read_dota_labels(p)
    msg = str(e.value)
    assert f"{p}:4:" in msg and expect in msg and "\n" not in msg


def test_bad_gsd(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_text("imagesource:GF\ngsd:abc\n")
    with pytest.raises(EdgekitError, match=r"bad.txt:2: gsd"):
        read_dota_labels(p)


def test_unknown_class(tmp_path):
    p = tmp_path / "l.txt"
    p.write_text("1 1 2 1 2 2 1 2 ship 0\n1 1 2 1 2 2 1 2 spaceship 0\n")
    assert len(read_dota_labels(p).objects) == 2  # no class list: anything goes
    with pytest.raises(EdgekitError) as e:
        read_dota_labels(p, classes=DOTA_V1_CLASSES)
    msg = str(e.value)
    assert f"{p}:2:" in msg and "spaceship" in msg and "small-vehicle" in msg and "\n" not in msg


def test_missing_file_and_folders(tmp_path):
    with pytest.raises(EdgekitError, match="not found"):
        read_dota_labels(tmp_path / "nope.txt")
    with pytest.raises(EdgekitError, match="images"):
        read_dota_dataset(tmp_path)
    (tmp_path / "images").mkdir()
    with pytest.raises(EdgekitError, match="holds no images"):  # named as such, not as missing labels
        read_dota_dataset(tmp_path)
    (tmp_path / "images" / "a.png").write_bytes(b"")
    with pytest.raises(EdgekitError, match="labelTxt"):
        read_dota_dataset(tmp_path)
    (tmp_path / "labelTxt").mkdir()
    assert [(p.name, a.objects) for p, a in read_dota_dataset(tmp_path)] == [("a.png", [])]
