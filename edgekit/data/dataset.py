"""The torch Dataset the trainer and evaluator read: a DOTA folder as letterboxed,
normalised square images with horizontal and rotated boxes.

Small data sets are decoded and letterboxed once and kept in memory (uint8, size^2 * 3
bytes per image), because PNG decoding otherwise dominates an epoch on a CPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from edgekit.data.dota import read_dota_dataset
from edgekit.data.images import image_size, load_image
from edgekit.data.transforms import (letterbox, letterbox_content, normalize, random_color_jitter,
                                     random_flip_rotate, to_tensor)
from edgekit.errors import EdgekitError
from edgekit.rotated import poly_to_rbox

PRELOAD_LIMIT_BYTES = 1 << 30  # "auto" preloads when the letterboxed images fit in 1 GiB


class DetectionDataset(Dataset):
    """Items: (image float [3, S, S], target dict).

    target: ``boxes`` float [N, 4] xyxy in the letterboxed image's pixels, ``labels`` long
    [N] (index into ``classes``), ``difficult`` bool [N], ``image_id`` int (index in this
    data set), ``orig_size`` (h, w), ``scale`` (letterbox factor: original = boxes / scale).
    Boxes are clipped to the image; boxes with no area inside it are dropped.

    ``rboxes`` float [N, 5] (unless ``rotated=False``): each polygon's minimum-area rectangle
    (cx, cy, w, h, angle), canonical as in :mod:`edgekit.rotated`, in the letterboxed
    image's pixels, row for row with ``boxes``; rotated boxes are not clipped (a cut
    rectangle is no rectangle), objects are dropped by the same rule as their boxes.
    On by default so that every stage reading a data set (training, evaluation,
    calibration, QAT, parity) serves oriented models without knowing about them; the
    cost is one vectorised rectangle fit per object at load time.
    """

    def __init__(self, root, classes, image_size: int = 256, augment: bool = False, preload="auto",
                 allow_downscale: bool = False, rotated: bool = True, color_jitter: float = 0.0):
        self.root, self.classes, self.image_size, self.augment = Path(root), list(classes), int(image_size), augment
        if color_jitter and not augment:
            raise EdgekitError("color jitter is an augmentation: it needs augment=True")
        if not 0 <= color_jitter < 1:
            raise EdgekitError(f"color jitter must be in [0, 1), got {color_jitter}")
        self.color_jitter = float(color_jitter)
        self.rotated = bool(rotated)
        if self.image_size <= 0:
            raise EdgekitError(f"image size must be positive, got {image_size}")
        items = read_dota_dataset(self.root, self.classes)
        if not items:
            raise EdgekitError(f"{self.root / 'images'} holds no images (.png, .jpg, .tif, .bmp)")
        index = {c: i for i, c in enumerate(self.classes)}
        self.paths = [p for p, _ in items]
        if not allow_downscale:
            self._check_scale()
        self.boxes, self.labels, self.difficult, self.rboxes = [], [], [], []
        for _, annotation in items:
            objs = annotation.objects
            self.boxes.append(np.array([o.box for o in objs], dtype=np.float32).reshape(-1, 4))
            if self.rotated:
                polys = np.array([o.poly for o in objs], dtype=np.float64).reshape(-1, 4, 2)
                self.rboxes.append(poly_to_rbox(polys).astype(np.float32))
            self.labels.append(np.array([index[o.label] for o in objs], dtype=np.int64))
            self.difficult.append(np.array([o.difficult > 0 for o in objs], dtype=bool))
        if preload == "auto":
            preload = len(items) * self.image_size ** 2 * 3 <= PRELOAD_LIMIT_BYTES
        self._cache = [self._load(i) for i in range(len(items))] if preload else None

    def _check_scale(self):
        """Refuse images larger than the model input: letterboxing a large aerial scene
        would shrink its objects far below the scale that ``predict`` (which tiles large
        images at native resolution) shows the model. Such data sets are tiled first;
        ``allow_downscale=True`` letterboxes them anyway (for whole-image models)."""
        for path in self.paths:
            h, w = image_size(path)
            if max(h, w) > self.image_size:
                raise EdgekitError(
                    f"{path} is {w}x{h}, larger than the model input {self.image_size}; tile the data set first "
                    f"(edgekit tile SRC DST --tile-size {self.image_size}) or raise the image size")

    def __len__(self) -> int:
        return len(self.paths)

    def _load(self, i: int) -> tuple[np.ndarray, float, tuple[int, int]]:
        image = load_image(self.paths[i])
        boxed, scale = letterbox(image, self.image_size)
        return boxed, scale, image.shape[:2]

    def __getitem__(self, i: int):
        boxed, scale, (h, w) = self._cache[i] if self._cache is not None else self._load(i)
        boxes = self.boxes[i].copy()
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes = torch.from_numpy(boxes[keep] * np.float32(scale))
        rboxes = None
        if self.rotated:
            rboxes = torch.from_numpy(self.rboxes[i][keep].copy())
            rboxes[:, :4] *= np.float32(scale)
        image = to_tensor(boxed)
        if self.color_jitter:  # the image only, not the letterbox's zero padding
            (nh, nw), _ = letterbox_content(h, w, self.image_size)
            image[:, :nh, :nw] = random_color_jitter(image[:, :nh, :nw], self.color_jitter)
        if self.augment:
            image, boxes, *rest = random_flip_rotate(image, boxes, rboxes=rboxes)
            rboxes = rest[0] if rest else None
        target = {"boxes": boxes, "labels": torch.from_numpy(self.labels[i][keep]),
                  "difficult": torch.from_numpy(self.difficult[i][keep]), "image_id": i,
                  "orig_size": (int(h), int(w)), "scale": float(scale)}
        if rboxes is not None:
            target["rboxes"] = rboxes
        return normalize(image), target


def collate_detection(batch):
    """(images [B, 3, S, S], list of target dicts): boxes differ in number per image."""
    images, targets = zip(*batch)
    return torch.stack(images), list(targets)


def sample_batches(dataset, count: int, batch_size: int) -> list:
    """``count`` shuffled detection batches (fewer if the set is small): the data of
    calibration and sensitivity estimates."""
    import itertools

    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=collate_detection)
    return list(itertools.islice(loader, count))
