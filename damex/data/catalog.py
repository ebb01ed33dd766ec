"""The dataset catalog: dataset name -> files, classes, label-slot count, expert and scales.

``build_catalog(cfg.data)`` returns the built-in entries (the 12 UODB sources under
``{data.root}/uodb`` and the synthetic benchmark under ``data.synthetic.root``) overridden and
extended by the config's ``data.datasets``. Paths are not checked here: a dataset's files are
only read when it is used (``damex.data.coco``).

Built-in layout (see data/README.md)::

    {data.root}/uodb/NAME/annotations/{train,test}.json    images: {data.root}/uodb/NAME/images
    {synthetic.root}/NAME/annotations/{train,val,test}.json  images: {synthetic.root}/NAME/images
    {data.root}/synthetic_alt/alt_*/annotations/{train,val,test}.json   (damex.data.synthetic_alt)
    {data.root}/synthetic_conflict/conf_*/annotations/{train,val,test}.json
                                                            (damex.data.synthetic_conflict)
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from damex.config import DataConfig, DatasetEntry
from damex.data.synthetic import SPLITS, SYNTHETIC_DATASETS
from damex.data.synthetic_alt import ALT_DATASETS
from damex.data.synthetic_alt import SPLITS as ALT_SPLITS
from damex.data.synthetic_conflict import CONFLICT_DATASETS
from damex.data.uodb import UODB_CLASSES, UODB_DATASETS, UODB_NUM_SLOTS, UODB_TEST_SCALES
from damex.errors import ConfigError, DatasetError

__all__ = ["DatasetSpec", "DatasetCatalog", "build_catalog", "uodb_train_scales"]


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset's files are and how it enters the label space.

    Attributes:
        name: the catalog key.
        image_root: folder the JSON ``file_name`` fields are relative to.
        splits: split name (train / val / test) -> COCO JSON file.
        image_roots: per-split image folder overrides of ``image_root``.
        classes: class order of the dataset's label block; None = JSON categories by id.
        num_slots: disjoint label space: a block of ``num_slots`` with slot = native_id - 1
            (COCO: 91); None = one slot per category.
        expert: default expert when ``moe.expert_map`` does not name the dataset.
        scales: per-dataset short-side train scales (used with ``data.per_dataset_scales``).
        test_scale: per-dataset short-side test scale.
        max_size: per-dataset long-side cap.
    """

    name: str
    image_root: Path
    splits: dict[str, Path] = field(default_factory=dict)
    image_roots: dict[str, Path] = field(default_factory=dict)
    classes: list[str] | None = None
    num_slots: int | None = None
    expert: int | None = None
    scales: list[int] | None = None
    test_scale: int | None = None
    max_size: int | None = None

    def has_split(self, split: str) -> bool:
        return split in self.splits

    def ann_file(self, split: str) -> Path:
        """The COCO JSON of a split.

        Raises:
            DatasetError: the dataset has no such split (lists the ones it has).
        """
        try:
            return self.splits[split]
        except KeyError:
            raise DatasetError(
                f"dataset {self.name!r} has no split {split!r}; it has {sorted(self.splits)}"
            ) from None

    def images_dir(self, split: str) -> Path:
        """The image folder of a split (its override, else ``image_root``)."""
        return self.image_roots.get(split, self.image_root)


class DatasetCatalog(Mapping[str, DatasetSpec]):
    """An ordered, read-only ``name -> DatasetSpec`` mapping with helpful lookup errors."""

    def __init__(self, specs: Mapping[str, DatasetSpec] | None = None) -> None:
        self._specs: dict[str, DatasetSpec] = dict(specs or {})
        for key, spec in self._specs.items():
            if key != spec.name:
                raise ValueError(f"catalog key {key!r} differs from DatasetSpec.name {spec.name!r}")

    def get(self, name: str) -> DatasetSpec:  # type: ignore[override]
        """The spec of a dataset.

        Raises:
            DatasetError: unknown name; the message lists the known names and the closest one.
        """
        try:
            return self._specs[name]
        except KeyError:
            close = difflib.get_close_matches(name, list(self._specs), n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise DatasetError(
                f"unknown dataset {name!r}{hint} Known datasets: {', '.join(self._specs)}"
            ) from None

    def __getitem__(self, name: str) -> DatasetSpec:
        return self.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def names(self) -> list[str]:
        """Dataset names in catalog order (built-in UODB, built-in synthetic, then config)."""
        return list(self._specs)

    def with_spec(self, spec: DatasetSpec) -> DatasetCatalog:
        """A new catalog with ``spec`` added (or replacing the entry of the same name)."""
        specs = dict(self._specs)
        specs[spec.name] = spec
        return DatasetCatalog(specs)

    def __repr__(self) -> str:
        return f"DatasetCatalog({self.names()})"


def uodb_train_scales(test_scale: int) -> list[int]:
    """UODB single-dataset train scales: 480, 512, ... up to the first step >= ``test_scale``.

    Reproduces the per-dataset lists of the official single-dataset configs (docs/design.md
    §4.5): test 600 -> [480..608], 576 -> [480..576], 512 -> [480, 512], 800 -> [480..800].
    """
    scales = [480]
    while scales[-1] < test_scale:
        scales.append(scales[-1] + 32)
    return scales


def _builtin_uodb(root: Path) -> dict[str, DatasetSpec]:
    specs = {}
    for name in UODB_DATASETS:
        base = root / "uodb" / name
        # voc12 has no test set of its own: UODB evaluates VOC on voc07's (docs/design.md §4.1).
        split_names = ("train",) if name == "voc12" else ("train", "test")
        test_scale = UODB_TEST_SCALES[name]
        specs[name] = DatasetSpec(
            name=name,
            image_root=base / "images",
            splits={s: base / "annotations" / f"{s}.json" for s in split_names},
            classes=list(UODB_CLASSES[name]),
            num_slots=UODB_NUM_SLOTS.get(name),
            scales=uodb_train_scales(test_scale),
            test_scale=test_scale,
        )
    return specs


def _builtin_synthetic(root: Path) -> dict[str, DatasetSpec]:
    specs = {}
    for name, classes in SYNTHETIC_DATASETS.items():
        base = root / name
        specs[name] = DatasetSpec(
            name=name,
            image_root=base / "images",
            splits={s: base / "annotations" / f"{s}.json" for s in SPLITS},
            classes=list(classes),
        )
    return specs


def _builtin_synthetic_alt(root: Path) -> dict[str, DatasetSpec]:
    """The second generated benchmark (``damex.data.synthetic_alt``) under ``root``."""
    return {
        name: DatasetSpec(
            name=name,
            image_root=root / name / "images",
            splits={s: root / name / "annotations" / f"{s}.json" for s in ALT_SPLITS},
            classes=list(classes),
        )
        for name, classes in ALT_DATASETS.items()
    }


def _builtin_synthetic_conflict(root: Path) -> dict[str, DatasetSpec]:
    """The domain-conflict benchmark (``damex.data.synthetic_conflict``) under ``root``."""
    return {
        name: DatasetSpec(
            name=name,
            image_root=root / name / "images",
            splits={s: root / name / "annotations" / f"{s}.json" for s in SPLITS},
            classes=list(classes),
        )
        for name, classes in CONFLICT_DATASETS.items()
    }


def _resolve(root: Path, path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else root / p


def _apply_entry(
    name: str, entry: DatasetEntry | Mapping, root: Path, base: DatasetSpec | None
) -> DatasetSpec:
    key = f"data.datasets.{name}"
    if isinstance(entry, Mapping):
        try:
            entry = DatasetEntry(**entry)
        except TypeError as e:
            raise ConfigError(f"{key}: {e}") from None
    splits = {s: _resolve(root, p) for s, p in entry.splits.items()}
    image_roots = {s: _resolve(root, p) for s, p in entry.image_roots.items()}
    for s, p in entry.splits.items():
        if not p:
            raise ConfigError(f"{key}.splits.{s}: empty path")
    if base is None:
        if not entry.image_root and not image_roots:
            raise ConfigError(f"{key}.image_root: a new dataset needs an image folder")
        if not splits:
            raise ConfigError(
                f"{key}.splits: a new dataset needs at least one split, e.g. "
                "{train: path/to/train.json}"
            )
        missing_root = [s for s in splits if s not in image_roots]
        if not entry.image_root and missing_root:
            raise ConfigError(f"{key}.image_root: needed for splits {missing_root}")
        base = DatasetSpec(name=name, image_root=_resolve(root, entry.image_root or "."))
    elif entry.image_root:
        base = replace(base, image_root=_resolve(root, entry.image_root))
    overrides: dict[str, object] = {
        "splits": {**base.splits, **splits},
        "image_roots": {**base.image_roots, **image_roots},
    }
    for attr in ("classes", "num_slots", "expert", "scales", "test_scale", "max_size"):
        value = getattr(entry, attr)
        if value is not None:
            overrides[attr] = list(value) if isinstance(value, list) else value
    return replace(base, **overrides)


def build_catalog(data_cfg: DataConfig) -> DatasetCatalog:
    """The catalog of a run: built-in UODB and synthetic entries, then ``data.datasets``.

    Config entries with a built-in name override the fields they set (``splits`` and
    ``image_roots`` are merged per split); other names add datasets. Relative paths in config
    entries are resolved against ``data.root``; absolute ones are kept.

    Args:
        data_cfg: the ``data`` section of the config.

    Returns:
        The catalog.

    Raises:
        ConfigError: a new entry without image folder or splits, or an invalid value.
    """
    root = Path(data_cfg.root).expanduser()
    specs = _builtin_uodb(root)
    specs.update(_builtin_synthetic(Path(data_cfg.synthetic.root).expanduser()))
    specs.update(_builtin_synthetic_alt(root / "synthetic_alt"))
    specs.update(_builtin_synthetic_conflict(root / "synthetic_conflict"))
    for name, entry in data_cfg.datasets.items():
        specs[name] = _apply_entry(name, entry, root, specs.get(name))
    return DatasetCatalog(specs)
