"""Pascal VOC XML: the real NEON tree-crown files, round trips, data set folders, bad input."""

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgekit.data.dota import DotaAnnotation, DotaObject
from edgekit.data.images import save_image
from edgekit.data.voc import (VocFile, box_polygon, format_voc_xml, parse_voc_xml, read_voc_annotation,
                              read_voc_dataset, write_voc_annotation, write_voc_labels)
from edgekit.errors import EdgekitError

NEON = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "neon_trees"
NEON_FILES = {"train/annotations/2019_YELL_2_528000_4978000_image_crop2.xml": 574,
              "train/annotations/2019_YELL_2_541000_4977000_image_crop.xml": 279,
              "val/annotations/OSBS_029.xml": 61}


def _regex_boxes(text: str) -> list[tuple[float, ...]]:
    """The boxes of a VOC file found with regular expressions, independent of the XML parser."""
    return [tuple(float(re.search(rf"<{t}>\s*([^<]+?)\s*</{t}>", b).group(1)) for t in ("xmin", "ymin", "xmax", "ymax"))
            for b in re.findall(r"<bndbox>(.*?)</bndbox>", text, flags=re.S)]


@pytest.mark.parametrize("relative,count", NEON_FILES.items())
def test_neon_files_read_exactly(relative, count):
    path = NEON / relative
    voc = read_voc_annotation(path)
    objects = voc.annotation.objects
    assert len(objects) == count
    assert {o.label for o in objects} == {"Tree"}
    assert [o.poly for o in objects] == [box_polygon(*b) for b in _regex_boxes(path.read_text())]
    assert all(o.difficult == 0 for o in objects) and voc.truncated == [0] * count
    width = int(re.search(r"<width>(\d+)</width>", path.read_text()).group(1))
    assert voc.width == width and voc.filename == re.search(r"<filename>(.+?)</filename>", path.read_text()).group(1)


def test_neon_dataset_folders():
    classes, train = read_voc_dataset(NEON / "train")
    assert classes == ["Tree"]
    assert sorted(len(a.objects) for _, a in train) == [279, 574]
    assert all(p.suffix == ".png" for p, _ in train)
    _, val = read_voc_dataset(NEON / "val")
    # OSBS_029.png is the same scene as the annotated OSBS_029.tif: one item, not two.
    assert [(p.name, len(a.objects)) for p, a in val] == [("OSBS_029.tif", 61)]


def _random_voc(rng, n: int) -> VocFile:
    width, height = int(rng.integers(50, 3000)), int(rng.integers(50, 3000))
    objects, truncated = [], []
    for _ in range(n):
        if rng.random() < 0.5:  # integer boxes, as most VOC tools write
            x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
            x = (x0, int(rng.integers(x0 + 1, width + 1)))
            y = (y0, int(rng.integers(y0 + 1, height + 1)))
        else:
            x, y = np.sort(rng.uniform(0, width, 2)), np.sort(rng.uniform(0, height, 2))
        objects.append(DotaObject(box_polygon(x[0], y[0], x[1], y[1]), str(rng.choice(["Tree", "car", "a-b_c"])),
                                  int(rng.integers(0, 2))))
        truncated.append(int(rng.integers(0, 2)))
    return VocFile("scene.png", width, height, DotaAnnotation(objects), 3, truncated)


def test_round_trip(rng, tmp_path):
    voc = _random_voc(rng, int(rng.integers(0, 40)))
    back = read_voc_annotation(write_voc_annotation(tmp_path / "a.xml", voc))
    assert back == voc
    assert format_voc_xml(back) == format_voc_xml(voc)


def test_neon_round_trip_is_byte_stable(tmp_path):
    voc = read_voc_annotation(NEON / "val/annotations/OSBS_029.xml")
    again = read_voc_annotation(write_voc_annotation(tmp_path / "x.xml", voc))
    assert again == voc


GOOD = """<annotation><filename>a.png</filename><size><width>100</width><height>50</height><depth>3</depth></size>
<object><name>Tree</name><difficult>0</difficult><bndbox><xmin>1</xmin><ymin>2</ymin><xmax>30</xmax><ymax>40</ymax>
</bndbox></object></annotation>"""

BAD = [
    (GOOD.replace("<filename>a.png</filename>", ""), "missing <filename>"),
    (GOOD.replace("<width>100</width>", ""), "missing <width>"),
    (re.sub(r"<size>.*?</size>", "", GOOD), "missing <size>"),
    (GOOD.replace("<name>Tree</name>", ""), "missing <name>"),
    (re.sub(r"<bndbox>.*?</bndbox>", "", GOOD, flags=re.S), "missing <bndbox>"),
    (GOOD.replace("<ymax>40</ymax>", ""), "missing <ymax>"),
    (GOOD.replace("<xmin>1</xmin>", "<xmin>one</xmin>"), "<xmin> is 'one', not a number"),
    (GOOD.replace("<xmin>1</xmin>", "<xmin>nan</xmin>"), "finite"),
    (GOOD.replace("<xmax>30</xmax>", "<xmax>101</xmax>"), "leaves the 100x50 image"),
    (GOOD.replace("<ymax>40</ymax>", "<ymax>50.5</ymax>"), "leaves the 100x50 image"),
    (GOOD.replace("<xmin>1</xmin>", "<xmin>-1</xmin>"), "leaves the 100x50 image"),
    (GOOD.replace("<xmin>1</xmin>", "<xmin>30</xmin>"), "need xmin < xmax"),
    (GOOD.replace("<ymin>2</ymin>", "<ymin>41</ymin>"), "need xmin < xmax and ymin < ymax"),
    (GOOD.replace("<width>100</width>", "<width>0</width>"), "positive integer"),
    (GOOD.replace("<difficult>0</difficult>", "<difficult>yes</difficult>"), "<difficult> must be 0 or 1"),
    (GOOD.replace("</object>", ""), "malformed XML"),
    (GOOD.replace("annotation>", "notes>"), "expected <annotation>"),
    ('<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x "y">]>' + GOOD, "DTD or entity"),
    ('<!DOCTYPE annotation SYSTEM "file:///etc/passwd">' + GOOD, "DTD or entity"),
]


@pytest.mark.parametrize("text,message", BAD)
def test_bad_input_is_one_line_naming_the_file(tmp_path, text, message):
    path = tmp_path / "broken.xml"
    path.write_text(text)
    with pytest.raises(EdgekitError) as info:
        read_voc_annotation(path)
    line = str(info.value)
    assert message in line and str(path) in line and "\n" not in line


def test_good_input_and_class_filter():
    voc = parse_voc_xml(GOOD)
    assert voc.annotation.objects == [DotaObject((1.0, 2.0, 30.0, 2.0, 30.0, 40.0, 1.0, 40.0), "Tree", 0)]
    assert (voc.width, voc.height, voc.depth, voc.truncated) == (100, 50, 3, [0])
    with pytest.raises(EdgekitError, match=r"object 0 \('Tree'\): unknown class; known classes: car"):
        parse_voc_xml(GOOD, "f.xml", classes=["car"])


def test_missing_file_bad_bytes_and_other_encodings(tmp_path):
    with pytest.raises(EdgekitError, match="not found"):
        read_voc_annotation(tmp_path / "none.xml")
    (tmp_path / "bin.xml").write_bytes(b"\x81\x00\xfe<annotation>")
    with pytest.raises(EdgekitError, match=r"bin.xml:1: malformed XML"):
        read_voc_annotation(tmp_path / "bin.xml")
    (tmp_path / "dir.xml").mkdir()
    with pytest.raises(EdgekitError, match="cannot read annotation file"):
        read_voc_annotation(tmp_path / "dir.xml")
    # A declared encoding is honoured (UTF-16, Latin-1), and a DTD hidden in UTF-16 is still found.
    latin = GOOD.replace("Tree", "\u00e9rable")
    (tmp_path / "latin.xml").write_bytes(('<?xml version="1.0" encoding="ISO-8859-1"?>' + latin).encode("latin-1"))
    assert read_voc_annotation(tmp_path / "latin.xml").annotation.objects[0].label == "\u00e9rable"
    (tmp_path / "wide.xml").write_bytes(('<?xml version="1.0" encoding="UTF-16"?>' + GOOD).encode("utf-16"))
    assert len(read_voc_annotation(tmp_path / "wide.xml").annotation.objects) == 1
    (tmp_path / "bomb.xml").write_bytes(('<!DOCTYPE a [<!ENTITY x "yyyy">]>' + GOOD).encode("utf-16"))
    with pytest.raises(EdgekitError, match="DTD or entity"):
        read_voc_annotation(tmp_path / "bomb.xml")


def _classic_folder(tmp_path, rng) -> Path:
    root = tmp_path / "voc"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "Annotations").mkdir()
    for name, (h, w) in {"a": (40, 60), "b": (30, 20), "negative": (16, 16)}.items():
        save_image(root / "JPEGImages" / f"{name}.png", rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        if name != "negative":
            voc = VocFile(f"{name}.png", w, h, DotaAnnotation([DotaObject(box_polygon(1, 2, 10, 12), "car", 1)]))
            write_voc_annotation(root / "Annotations" / f"{name}.xml", voc)
    return root


def test_classic_layout_negatives_and_size_check(tmp_path, rng):
    root = _classic_folder(tmp_path, rng)
    classes, items = read_voc_dataset(root)
    assert classes == ["car"]
    assert [(p.name, len(a.objects)) for p, a in items] == [("a.png", 1), ("b.png", 1), ("negative.png", 0)]
    assert items[0][1].objects[0].difficult == 1
    xml = root / "Annotations" / "b.xml"
    xml.write_text(xml.read_text().replace("<width>20</width>", "<width>21</width>"))
    with pytest.raises(EdgekitError, match=r"b.xml: <size> says 21x30 but b.png is 20x30"):
        read_voc_dataset(root)


def test_dataset_missing_image_and_not_a_folder(tmp_path, rng):
    root = _classic_folder(tmp_path, rng)
    (root / "JPEGImages" / "a.png").unlink()
    with pytest.raises(EdgekitError, match=r"a.xml: image 'a.png' not found"):
        read_voc_dataset(root)
    with pytest.raises(EdgekitError, match="is not a VOC folder"):
        read_voc_dataset(tmp_path)


def test_write_labels_clips_to_the_image_and_reads_back(tmp_path, rng):
    images = tmp_path / "out" / "images"
    images.mkdir(parents=True)
    image = images / "scene.png"
    save_image(image, np.zeros((50, 80, 3), dtype=np.uint8))
    inside = DotaObject((10.5, 5.0, 30.0, 8.0, 25.0, 20.0, 12.0, 18.0), "ship", 0)  # oriented
    cut = DotaObject(box_polygon(70, 40, 95, 60), "ship", 1)
    outside = DotaObject(box_polygon(90, 10, 99, 20), "ship", 0)
    write_voc_labels(tmp_path / "out", ["ship"], [(image, DotaAnnotation([inside, cut, outside]))])
    classes, items = read_voc_dataset(tmp_path / "out")
    objects = items[0][1].objects
    assert classes == ["ship"] and len(objects) == 2
    assert objects[0].poly == box_polygon(10.5, 5.0, 30.0, 20.0)
    assert objects[1] == DotaObject(box_polygon(70, 40, 80, 50), "ship", 1)
    with pytest.raises(EdgekitError, match="not in the class list"):
        write_voc_labels(tmp_path / "out2", ["car"], [(image, DotaAnnotation([inside]))])


def test_copy_of_neon_val_reads_the_same(tmp_path):
    """A VOC folder written by write_voc_labels from the NEON val set reads back identically."""
    _, items = read_voc_dataset(NEON / "val")
    dst = tmp_path / "copy"
    (dst / "images").mkdir(parents=True)
    copied = [(Path(shutil.copy(p, dst / "images" / p.name)), a) for p, a in items]
    write_voc_labels(dst, ["Tree"], copied)
    _, back = read_voc_dataset(dst)
    assert [a.objects for _, a in back] == [a.objects for _, a in items]
