"""Data: DOTA/YOLO/COCO formats and conversion, tiling of large images, the built-in
synthetic aerial set, and the torch Dataset the trainer reads.

The most used names are re-exported here, imported on first use so that
``import edgekit.data.dota`` (e.g. for ``edgekit convert``) does not pull in torch.
"""

from importlib import import_module

_EXPORTS = {
    "convert_dataset": "convert",
    "DetectionDataset": "dataset", "collate_detection": "dataset",
    "DOTA_V1_CLASSES": "dota", "DOTA_V15_CLASSES": "dota", "DOTA_V2_CLASSES": "dota", "DotaAnnotation": "dota",
    "DotaObject": "dota", "read_dota_dataset": "dota", "read_dota_labels": "dota", "write_dota_labels": "dota",
    "load_image": "images", "save_image": "images",
    "SYNTHETIC_CLASSES": "synthetic", "generate_synthetic_dataset": "synthetic",
    "iter_tiles": "tiling", "merge_tile_detections": "tiling", "split_annotation": "tiling",
    "tile_dataset": "tiling", "tile_windows": "tiling",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f"edgekit.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'edgekit.data' has no attribute '{name}'")
