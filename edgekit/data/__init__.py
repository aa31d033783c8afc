"""Data: DOTA/YOLO/COCO formats and conversion, tiling of large images, the built-in
synthetic aerial set, and the torch Dataset the trainer reads.

Import from the sub-modules (``edgekit.data.dota`` ...); the most used names are
re-exported here.
"""

from edgekit.data.convert import convert_dataset
from edgekit.data.dataset import DetectionDataset, collate_detection
from edgekit.data.dota import (DOTA_V1_CLASSES, DOTA_V2_CLASSES, DOTA_V15_CLASSES, DotaAnnotation, DotaObject,
                               read_dota_dataset, read_dota_labels, write_dota_labels)
from edgekit.data.images import load_image, save_image
from edgekit.data.synthetic import SYNTHETIC_CLASSES, generate_synthetic_dataset
from edgekit.data.tiling import iter_tiles, merge_tile_detections, split_annotation, tile_dataset, tile_windows

__all__ = ["convert_dataset", "DetectionDataset", "collate_detection", "DOTA_V1_CLASSES", "DOTA_V15_CLASSES",
           "DOTA_V2_CLASSES", "DotaAnnotation", "DotaObject", "read_dota_dataset", "read_dota_labels",
           "write_dota_labels", "load_image", "save_image", "SYNTHETIC_CLASSES", "generate_synthetic_dataset",
           "iter_tiles", "merge_tile_detections", "split_annotation", "tile_dataset", "tile_windows"]
