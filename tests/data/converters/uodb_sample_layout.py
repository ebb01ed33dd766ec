"""Builds an ORIGINALS_DIR in a temp folder from the real sample files in tests/fixtures/samples.

Sample annotation files are copied byte for byte. Where the samples lack the images, small
placeholder images of the documented size are written with PIL (only their headers are read
by the converters; DeepLesion slices are real 16-bit PNGs with known pixel values). Files for
formats without a real sample (LISA, Kitchen, a WIDER 0-face record) are written from the
documented formats and say so.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image

# The real sample files, kept in the repository (provenance: tests/fixtures/samples/README.md).
SAMPLES = Path(__file__).resolve().parents[2] / "fixtures" / "samples"

# DeepLesion: the stored value at (y, x) = (10, 20) of every written slice is HU 0 + 32768,
# and at (11, 20) HU -85; the slices are otherwise HU -1000 (air).
DL_PIXEL_HU0 = (10, 20)
DL_PIXEL_HU_MINUS85 = (11, 20)

LISA_HEADER = (
    "Filename;Annotation tag;Upper left corner X;Upper left corner Y;Lower right corner X;"
    "Lower right corner Y;Occluded,On another road;Origin file;Origin frame number;"
    "Origin track;Origin track frame number"
)
# The first row is the real row quoted in README (its tail completed with plausible fields);
# the others are written in the same format.
LISA_STOP = (
    "aiua120214-0/frameAnnotations-DataLog02142012_external_camera.avi_annotations/"
    "stop_1330545910.avi_image0.png"
)
LISA_ROWS = [
    f"{LISA_STOP};stop;862;104;916;158;0,0;aiua120214-0/DataLog02142012_external_camera.avi;"
    "2667;stop_1330545910.avi;0",
    f"{LISA_STOP};speedLimit25;100;120;130;160;0,0;aiua120214-0/DataLog02142012_external_camera"
    ".avi;2667;speedLimit25_1330545910.avi;0",
    "vid0/frameAnnotations-vid_cmp2.avi_annotations/keepRight_1323804419.avi_image0.png;"
    "keepRight;10;20;40;60;0,0;vid0/vid_cmp2.avi;100;keepRight_1323804419.avi;0",
    "vid0/frameAnnotations-vid_cmp2.avi_annotations/pedestrianCrossing_1323804463.avi_image1."
    "png;pedestrianCrossing;500;200;540;250;1,0;vid0/vid_cmp2.avi;120;"
    "pedestrianCrossing_1323804463.avi;1",
]
LISA_SIZE = (1024, 522)

# A WIDER val file in the official format with a 0-face record (its line of ten zeros must be
# consumed), an invalid face and a zero-width face.
WIDER_VAL = (
    "0--Parade/0_Parade_marchingband_1_465.jpg\n"
    "0\n"
    "0 0 0 0 0 0 0 0 0 0 \n"
    "0--Parade/0_Parade_Parade_0_628.jpg\n"
    "3\n"
    "26 299 10 16 2 0 0 0 0 0 \n"
    "25 329 7 11 2 0 0 1 0 0 \n"
    "100 100 0 12 2 0 0 0 0 0 \n"
)
WIDER_SIZE = (1024, 768)

KITCHEN_NAMES = {"dog": "coca_cola_glass_bottle", "person": "red_bull", "train": "pringles_bbq"}


def write_image(path: Path, size: tuple[int, int], mode: str = "L") -> Path:
    """A blank image of ``size`` (w, h); the format follows the extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size).save(path)
    return path


def write_dl_slice(path: Path, *, size: tuple[int, int] = (512, 512)) -> Path:
    """A 16-bit DeepLesion-style slice: HU -1000 everywhere, HU 0 and -85 at known pixels."""
    w, h = size
    raw = np.full((h, w), 32768 - 1000, dtype=np.uint16)
    raw[DL_PIXEL_HU0] = 32768
    raw[DL_PIXEL_HU_MINUS85] = 32768 - 85
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(raw).save(path)
    return path


def _copy(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst


def _dota_size(label: Path) -> tuple[int, int]:
    xs, ys = [0.0], [0.0]
    for line in label.read_text().splitlines():
        t = line.split()
        if len(t) >= 9:
            c = [float(v) for v in t[:8]]
            xs += c[0::2]
            ys += c[1::2]
    return int(max(xs)) + 1, int(max(ys)) + 1


def make_voc07(root: Path) -> Path:
    voc = root / "voc07" / "VOC2007"
    for stem, size in (("000001", (353, 500)), ("000002", (335, 500))):
        _copy(
            SAMPLES / "voc/VOC2007/Annotations" / f"{stem}.xml", voc / "Annotations" / f"{stem}.xml"
        )
        write_image(voc / "JPEGImages" / f"{stem}.jpg", size, "RGB")
    _copy(SAMPLES / "voc/VOC2007/ImageSets/Main/test.txt", voc / "ImageSets/Main/test.txt")
    (voc / "ImageSets/Main/trainval.txt").write_text("000002\n")
    return voc


def make_kitti(root: Path, *, splits: bool = True) -> Path:
    kitti = root / "kitti"
    for stem in ("000000", "000001", "000002"):
        _copy(
            SAMPLES / "kitti/training/label_2" / f"{stem}.txt",
            kitti / "training/label_2" / f"{stem}.txt",
        )
    img = kitti / "training/image_2"
    img.mkdir(parents=True)
    for stem in ("000001", "000002"):
        (img / f"{stem}.png").symlink_to(SAMPLES / "kitti/training/image_2" / f"{stem}.png")
    write_image(img / "000000.png", (1242, 375))
    if splits:
        (kitti / "splits").mkdir()
        (kitti / "splits/train.txt").write_text("000000\n000001\n")
        (kitti / "splits/test.txt").write_text("000002\n")
    return kitti


def make_widerface(root: Path) -> Path:
    wider = root / "widerface"
    split = wider / "wider_face_split"
    _copy(
        SAMPLES / "widerface/wider_face_train_bbx_gt.HEAD_EXCERPT_secondhand.txt",
        split / "wider_face_train_bbx_gt.txt",
    )
    (split / "wider_face_val_bbx_gt.txt").write_text(WIDER_VAL)
    for rel in ("0--Parade/0_Parade_marchingband_1_849.jpg", "0--Parade/0_Parade_Parade_0_904.jpg"):
        write_image(wider / "WIDER_train/images" / rel, WIDER_SIZE)
    for rel in ("0--Parade/0_Parade_marchingband_1_465.jpg", "0--Parade/0_Parade_Parade_0_628.jpg"):
        write_image(wider / "WIDER_val/images" / rel, WIDER_SIZE)
    return wider


def make_dota(root: Path) -> Path:
    dota = root / "dota"
    layout = {"train": ("P1888", "P0770"), "val": ("P2709",)}
    for split, stems in layout.items():
        for stem in stems:
            label = _copy(
                SAMPLES / "dota/labelTxt" / f"{stem}.txt", dota / split / "labelTxt" / f"{stem}.txt"
            )
            image = dota / split / "images" / f"{stem}.png"
            if stem == "P1888":
                image.parent.mkdir(parents=True, exist_ok=True)
                image.symlink_to(SAMPLES / "dota/images/P1888.png")
            else:
                write_image(image, _dota_size(label), "1")
    return dota


def make_deeplesion(root: Path) -> Path:
    dl = root / "deeplesion"
    csv = _copy(SAMPLES / "deeplesion/DL_info_sample.csv", dl / "DL_info.csv")
    names = {line.split(",")[0] for line in csv.read_text().splitlines()[1:] if line}
    for name in names:
        folder, slice_png = name.rsplit("_", 1)
        write_dl_slice(dl / "Images_png" / folder / slice_png)
    return dl


def make_coco(root: Path) -> Path:
    coco = root / "coco"
    src = SAMPLES / "coco/annotations/instances_val2017.json"
    _copy(src, coco / "annotations/instances_valminusminival2014.json")
    _copy(src, coco / "annotations/instances_minival2014.json")
    write_image(coco / "val2014/000000255917.jpg", (640, 427), "RGB")
    write_image(coco / "val2014/000000000139.jpg", (640, 426), "RGB")
    return coco


def make_lisa(root: Path) -> Path:
    lisa = root / "lisa"
    lisa.mkdir(parents=True)
    (lisa / "allAnnotations.csv").write_text("\n".join([LISA_HEADER, *LISA_ROWS]) + "\n")
    for row in LISA_ROWS:
        write_image(lisa / row.split(";")[0], LISA_SIZE)
    return lisa


def kitchen_xml(voc_stem: str, *, folder: str, filename: str) -> str:
    """A GMU-Kitchen-style frame XML made from a real VOC sample (names mapped to kitchen's)."""
    text = (SAMPLES / "voc/VOC2007/Annotations" / f"{voc_stem}.xml").read_text()
    for voc_name, kitchen_name in KITCHEN_NAMES.items():
        text = text.replace(f"<name>{voc_name}</name>", f"<name>{kitchen_name}</name>")
    text = text.replace("<folder>VOC2007</folder>", f"<folder>{folder}</folder>")
    return text.replace(f"<filename>{voc_stem}.jpg</filename>", f"<filename>{filename}</filename>")


def make_kitchen(root: Path, *, num_scenes: int = 3) -> Path:
    kitchen = root / "kitchen"
    for s in range(1, num_scenes + 1):
        scene = kitchen / f"gmu_scene_{s:03d}"
        (scene / "Annotations").mkdir(parents=True)
        for n, stem in ((1, "000001"), (2, "000002")):
            (scene / "Annotations" / f"rgb_{n}.xml").write_text(
                kitchen_xml(stem, folder=scene.name, filename=f"rgb_{n}.png")
            )
        (scene / "Images").mkdir()
    return kitchen


def make_all(root: Path) -> Path:
    """Every dataset with a sample or a documented format (not clipart/watercolor/comic/voc12)."""
    root.mkdir(parents=True, exist_ok=True)
    make_voc07(root)
    make_kitti(root)
    make_widerface(root)
    make_dota(root)
    make_deeplesion(root)
    make_coco(root)
    make_lisa(root)
    make_kitchen(root)
    return root
