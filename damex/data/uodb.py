"""The Universal Object Detection Benchmark (UODB; Wang et al., CVPR 2019) as DAMEX uses it.

Facts only (docs/design.md §4.1-§4.3): the 12 sources (VOC07 and VOC12 separate), their class
names in native-id order (native id = position + 1), the COCO slot count of the paper's
178-way head, the paper's dataset -> expert map (written by name, docs/design.md Q1) and UODB's
per-dataset test scales. Paths live in ``damex.data.catalog``.
"""

from __future__ import annotations

__all__ = [
    "UODB_DATASETS",
    "UODB_CLASSES",
    "COCO_CLASSES",
    "VOC_CLASSES",
    "UODB_NUM_SLOTS",
    "UODB_TEST_SCALES",
    "PAPER_EXPERT_MAP",
    "COCO_CATEGORY_IDS",
]

VOC_CLASSES: list[str] = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
]  # fmt: skip

# COCO-80 names and their native (non-contiguous, 1..90) category ids.
COCO_CLASSES: list[str] = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
]  # fmt: skip
COCO_CATEGORY_IDS: list[int] = [
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27,
    28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53,
    54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80,
    81, 82, 84, 85, 86, 87, 88, 89, 90,
]  # fmt: skip

_SIX = ["bicycle", "bird", "car", "cat", "dog", "person"]

UODB_CLASSES: dict[str, list[str]] = {
    "coco": COCO_CLASSES,
    "voc07": VOC_CLASSES,
    "voc12": VOC_CLASSES,
    "clipart": VOC_CLASSES,
    "watercolor": _SIX,
    "comic": _SIX,
    "kitti": ["pedestrian", "cyclist", "vehicle"],
    "lisa": ["stop", "speedlimit", "warning", "noturn"],
    "widerface": ["face"],
    "dota": [  # DOTA-devkit order, as UODB's dota_voc.py and DAMEX's voc_to_coco.py
        "plane", "baseball-diamond", "bridge", "ground-track-field", "small-vehicle",
        "large-vehicle", "ship", "tennis-court", "basketball-court", "storage-tank",
        "soccer-ball-field", "roundabout", "harbor", "swimming-pool", "helicopter",
    ],
    "kitchen": [
        "coca_cola_glass_bottle", "coffee_mate_french_vanilla",
        "honey_bunches_of_oats_honey_roasted", "hunts_sauce", "mahatma_rice",
        "nature_valley_soft_baked_oatmeal_squares_cinnamon_brown_sugar",
        "nature_valley_sweet_and_salty_nut_almond", "palmolive_orange", "pop_secret_light_butter",
        "pringles_bbq", "red_bull",
    ],
    "deeplesion": ["lesion"],
}  # fmt: skip

# The 12 sources in the paper's label-space order (docs/design.md §4.2): coco, voc (07/12 share one
# block in the paper; here each source is its own dataset and `voc12` reuses voc07's test set),
# clipart, watercolor, comic, deeplesion, dota, kitchen, kitti, lisa, widerface.
UODB_DATASETS: list[str] = [
    "coco", "voc07", "voc12", "clipart", "watercolor", "comic", "deeplesion", "dota", "kitchen",
    "kitti", "lisa", "widerface",
]  # fmt: skip

# COCO keeps its native 1..90 ids in a 91-slot block (DINO's num_classes=91), which makes the
# paper's head 178-way; every other dataset uses ids 1..C in a C-slot block.
UODB_NUM_SLOTS: dict[str, int] = {"coco": 91}

# UODB's per-dataset test scales (short side; docs/design.md §4.5, uodb-code datasets_info.py).
UODB_TEST_SCALES: dict[str, int] = {
    "coco": 800, "voc07": 600, "voc12": 600, "clipart": 600, "watercolor": 600, "comic": 600,
    "kitti": 576, "lisa": 800, "widerface": 800, "dota": 600, "kitchen": 800, "deeplesion": 512,
}  # fmt: skip

# The released 12-source / 8-expert map (docs/design.md §4.3), by name instead of by position (Q1).
PAPER_EXPERT_MAP: dict[str, int] = {
    "clipart": 0, "coco": 1, "voc07": 1, "voc12": 1, "comic": 1, "deeplesion": 2, "dota": 3,
    "kitchen": 4, "lisa": 5, "kitti": 5, "watercolor": 6, "widerface": 7,
}  # fmt: skip
