"""The unified label space of a multi-dataset run: unified index <-> (dataset, native category id).

Two policies (docs/design.md §4.2):

- ``disjoint`` (default, the paper's): datasets in the run's order, each owns one contiguous
  block of slots; nothing is merged across datasets, not even identical names. A dataset given
  ``num_slots`` uses ``slot = start + native_id - 1`` (so COCO keeps its native ids 1..90 in a
  91-slot block, DINO's ``num_classes=91``); any other dataset gets one slot per JSON category,
  in sorted native-id order (or in its configured ``classes`` order). Datasets named together in
  a ``share`` group (they must have identical categories) share one block, placed where the
  first of them appears: the paper gives voc07 and voc12 one 20-slot block, which makes the 12
  UODB sources a 178-way head (COCO at ``id - 1``, WiderFace "face" at 177).
- ``merged``: one slot per distinct class name (case-insensitive), in order of first
  appearance, so "car" of two datasets is one class.

Unified labels are 0-based. Native category ids only appear in JSON files and evaluation
output (docs/design.md §10). The label space is plain data (``state_dict``) stored in checkpoints.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from damex.config import LabelPolicy, choices
from damex.data.coco_json import read_categories
from damex.errors import DatasetError

if TYPE_CHECKING:
    from damex.data.catalog import DatasetCatalog

__all__ = [
    "LabelSpace",
    "DatasetLabels",
    "LABEL_POLICIES",
    "DEFAULT_SHARE_GROUPS",
    "build_label_space",
]

logger = logging.getLogger(__name__)

LABEL_POLICIES: tuple[str, ...] = choices(LabelPolicy)

# The paper's 178-way head gives VOC07 and VOC12 (same 20 classes, same JSON categories) one
# shared block (docs/design.md §4.2). A group only applies when at least two members are present.
DEFAULT_SHARE_GROUPS: tuple[tuple[str, ...], ...] = (("voc07", "voc12"),)

_STATE_VERSION = 1


@dataclass(frozen=True)
class DatasetLabels:
    """The label inputs of one dataset of the run.

    Attributes:
        name: dataset name (catalog key).
        categories: the JSON ``categories`` as ``(native_id, name)`` pairs, sorted by id.
        num_slots: size of the dataset's block with ``slot = native_id - 1`` (disjoint policy);
            None gives one slot per category.
        classes: optional class order of the block (names); must name exactly the categories.
    """

    name: str
    categories: tuple[tuple[int, str], ...]
    num_slots: int | None = None
    classes: tuple[str, ...] | None = None


def _normalize_categories(name: str, categories: Iterable[Any]) -> tuple[tuple[int, str], ...]:
    pairs: list[tuple[int, str]] = []
    for i, cat in enumerate(categories):
        if isinstance(cat, Mapping):
            if "id" not in cat or "name" not in cat:
                raise DatasetError(
                    f"dataset {name!r}: category #{i} must have 'id' and 'name', got {dict(cat)}"
                )
            cid, cname = cat["id"], cat["name"]
        else:
            cid, cname = cat
        if isinstance(cid, bool) or not isinstance(cid, int):
            raise DatasetError(f"dataset {name!r}: category id must be an int, got {cid!r}")
        if not isinstance(cname, str) or not cname:
            raise DatasetError(
                f"dataset {name!r}: category {cid} name must be a non-empty str, got {cname!r}"
            )
        pairs.append((int(cid), cname))
    ids = [c for c, _ in pairs]
    dup = sorted({c for c in ids if ids.count(c) > 1})
    if dup:
        raise DatasetError(f"dataset {name!r}: duplicate category ids {dup}")
    if not pairs:
        raise DatasetError(f"dataset {name!r}: no categories")
    return tuple(sorted(pairs))


def _as_dataset_labels(entry: Any) -> DatasetLabels:
    if isinstance(entry, DatasetLabels):
        return DatasetLabels(
            entry.name,
            _normalize_categories(entry.name, entry.categories),
            entry.num_slots,
            tuple(entry.classes) if entry.classes is not None else None,
        )
    if not isinstance(entry, Sequence) or len(entry) not in (3, 4):
        raise TypeError(
            "LabelSpace.build expects (name, categories, num_slots[, classes]) tuples or "
            f"DatasetLabels, got {entry!r}"
        )
    name, categories, num_slots = entry[0], entry[1], entry[2]
    classes = entry[3] if len(entry) == 4 else None
    return DatasetLabels(
        str(name),
        _normalize_categories(str(name), categories),
        None if num_slots is None else int(num_slots),
        tuple(classes) if classes is not None else None,
    )


class LabelSpace:
    """Two-way map between unified 0-based labels and ``(dataset_id, native_category_id)``.

    ``dataset_id`` is the position of the dataset in the list given to :meth:`build` (the
    run's ordered dataset list, docs/design.md §9). Build with :meth:`build`; restore with
    :meth:`from_state_dict`.

    Example:
        >>> ls = LabelSpace.build([("a", [{"id": 1, "name": "car"}], None),
        ...                        ("b", [{"id": 7, "name": "Car"}], None)], policy="merged")
        >>> ls.num_classes, ls.to_unified(1, 7), ls.to_native(0)
        (1, 0, [(0, 1), (1, 7)])
    """

    def __init__(
        self,
        *,
        datasets: Sequence[DatasetLabels],
        policy: str,
        share: Sequence[Sequence[str]],
    ) -> None:
        # Use LabelSpace.build(...); this constructor trusts normalized inputs.
        self._datasets = tuple(datasets)
        self._policy = policy
        self._share = tuple(tuple(g) for g in share)
        self._to_unified: list[dict[int, int]] = []
        self._owners: list[list[tuple[int, int]]] = []
        self._names: list[str] = []
        self._assign()

    # ------------------------------------------------------------------------- construction
    @classmethod
    def build(
        cls,
        datasets: Sequence[tuple[Any, ...] | DatasetLabels],
        policy: str = "disjoint",
        share: Sequence[Sequence[str]] | None = None,
    ) -> LabelSpace:
        """Build the label space of an ordered list of datasets.

        Args:
            datasets: one ``(name, categories, num_slots)`` or
                ``(name, categories, num_slots, classes)`` tuple (or :class:`DatasetLabels`) per
                dataset, in the run's order. ``categories`` is the JSON list of
                ``{"id": int, "name": str}`` (or ``(id, name)`` pairs).
            policy: ``"disjoint"`` or ``"merged"``.
            share: disjoint policy only: groups of dataset names that share one block. Their
                categories must be identical. Default :data:`DEFAULT_SHARE_GROUPS` (voc07 +
                voc12). Members absent from ``datasets`` are ignored; pass ``[]`` to share
                nothing.

        Returns:
            The label space.

        Raises:
            ValueError: unknown policy, duplicate dataset names, a name in two share groups.
            DatasetError: invalid categories, ids outside ``1..num_slots``, shared datasets
                with different categories, a ``classes`` list that does not match the JSON.
        """
        if policy not in LABEL_POLICIES:
            raise ValueError(f"label policy must be one of {list(LABEL_POLICIES)}, got {policy!r}")
        items = [_as_dataset_labels(d) for d in datasets]
        names = [d.name for d in items]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate dataset names in the label space: {dup}")
        groups = DEFAULT_SHARE_GROUPS if share is None else share
        present: list[tuple[str, ...]] = []
        seen: dict[str, int] = {}
        for gi, group in enumerate(groups):
            members = tuple(n for n in names if n in group)  # in run order: block of the first
            for n in members:
                if n in seen:
                    raise ValueError(f"dataset {n!r} is in two share groups: {list(groups)}")
                seen[n] = gi
            if len(members) >= 2:
                present.append(members)
        return cls(datasets=items, policy=policy, share=present if policy == "disjoint" else [])

    def _block_order(self, d: DatasetLabels) -> list[tuple[int, str]]:
        """Categories of ``d`` in block order (sorted ids, or the configured class order)."""
        if d.classes is None:
            return list(d.categories)
        by_name = {n: c for c, n in d.categories}
        if sorted(by_name) != sorted(d.classes) or len(by_name) != len(d.categories):
            raise DatasetError(
                f"dataset {d.name!r}: JSON categories {sorted(n for _, n in d.categories)} do not "
                f"match the configured classes {sorted(d.classes)}"
            )
        return [(by_name[n], n) for n in d.classes]

    def _assign(self) -> None:
        n_ds = len(self._datasets)
        self._to_unified = [{} for _ in range(n_ds)]
        owners: list[list[tuple[int, int]]] = []
        names: list[str] = []
        if self._policy == "merged":
            slot_of_name: dict[str, int] = {}
            for di, d in enumerate(self._datasets):
                for cid, cname in self._block_order(d):
                    key = cname.casefold()
                    if key not in slot_of_name:
                        slot_of_name[key] = len(names)
                        names.append(cname)
                        owners.append([])
                    slot = slot_of_name[key]
                    if any(o == di for o, _ in owners[slot]):
                        raise DatasetError(
                            f"dataset {d.name!r}: two categories named {cname!r} (case-"
                            "insensitive) cannot share one merged slot"
                        )
                    owners[slot].append((di, cid))
                    self._to_unified[di][cid] = slot
        else:
            group_of = {n: g for g in self._share for n in g}
            block_start: dict[tuple[str, ...], int] = {}
            index = {d.name: i for i, d in enumerate(self._datasets)}
            for di, d in enumerate(self._datasets):
                group = group_of.get(d.name, (d.name,))
                if group in block_start:  # a later member of a share group reuses the block
                    first = self._datasets[index[group[0]]]
                    if first.categories != d.categories or first.num_slots != d.num_slots:
                        raise DatasetError(
                            f"datasets {first.name!r} and {d.name!r} share a label block but "
                            f"their categories differ: {list(first.categories)} vs "
                            f"{list(d.categories)} (num_slots {first.num_slots} vs "
                            f"{d.num_slots})"
                        )
                    start = block_start[group]
                    for cid in (c for c, _ in d.categories):
                        slot = self._to_unified[index[group[0]]][cid]
                        self._to_unified[di][cid] = slot
                        owners[slot].append((di, cid))
                    continue
                start = len(names)
                block_start[group] = start
                label = "+".join(group)
                if d.num_slots is not None:
                    if d.num_slots < 1:
                        raise DatasetError(f"dataset {d.name!r}: num_slots must be >= 1")
                    bad = [c for c, _ in d.categories if not 1 <= c <= d.num_slots]
                    if bad:
                        raise DatasetError(
                            f"dataset {d.name!r}: category ids {bad} outside 1..{d.num_slots} "
                            f"(num_slots={d.num_slots} uses slot = native_id - 1)"
                        )
                    by_id = dict(d.categories)
                    for k in range(d.num_slots):
                        cname = by_id.get(k + 1)
                        names.append(f"{label}/{cname}" if cname else f"{label}/<unused:{k + 1}>")
                        owners.append([])
                    for cid in by_id:
                        slot = start + cid - 1
                        self._to_unified[di][cid] = slot
                        owners[slot].append((di, cid))
                else:
                    for k, (cid, cname) in enumerate(self._block_order(d)):
                        names.append(f"{label}/{cname}")
                        owners.append([(di, cid)])
                        self._to_unified[di][cid] = start + k
        self._owners = owners
        self._names = names

    # ------------------------------------------------------------------------------ queries
    @property
    def policy(self) -> str:
        return self._policy

    @property
    def num_classes(self) -> int:
        """Number of unified labels (the classification head size)."""
        return len(self._names)

    @property
    def names(self) -> list[str]:
        """Display name of every unified label (``"coco/person"``; merged: the class name)."""
        return list(self._names)

    @property
    def dataset_names(self) -> list[str]:
        """Dataset names in ``dataset_id`` order."""
        return [d.name for d in self._datasets]

    @property
    def num_datasets(self) -> int:
        return len(self._datasets)

    @property
    def share_groups(self) -> list[tuple[str, ...]]:
        """The share groups in effect (only those with >= 2 members present)."""
        return list(self._share)

    def dataset_index(self, name: str) -> int:
        """``dataset_id`` of a dataset name."""
        for i, d in enumerate(self._datasets):
            if d.name == name:
                return i
        raise KeyError(f"dataset {name!r} is not in the label space {self.dataset_names}")

    def categories(self, dataset_id: int) -> list[dict[str, Any]]:
        """The dataset's native categories ``[{"id", "name"}]`` sorted by id."""
        d = self._datasets[self._check_dataset(dataset_id)]
        return [{"id": c, "name": n} for c, n in d.categories]

    def native_ids(self, dataset_id: int) -> list[int]:
        """The dataset's native category ids, sorted."""
        return [c for c, _ in self._datasets[self._check_dataset(dataset_id)].categories]

    def _check_dataset(self, dataset_id: int) -> int:
        if not 0 <= dataset_id < len(self._datasets):
            raise IndexError(
                f"dataset_id {dataset_id} out of range 0..{len(self._datasets) - 1} "
                f"({self.dataset_names})"
            )
        return dataset_id

    def to_unified(self, dataset_id: int, native_category_id: int) -> int:
        """Unified 0-based label of a dataset's native category id.

        Raises:
            DatasetError: the id is not one of the dataset's categories.
        """
        table = self._to_unified[self._check_dataset(dataset_id)]
        try:
            return table[native_category_id]
        except KeyError:
            raise DatasetError(
                f"dataset {self._datasets[dataset_id].name!r}: category_id {native_category_id} "
                f"not in categories {sorted(table)}"
            ) from None

    def native_to_unified(self, dataset_id: int) -> dict[int, int]:
        """The dataset's whole ``native id -> unified label`` table (a copy)."""
        return dict(self._to_unified[self._check_dataset(dataset_id)])

    def to_native(self, unified: int) -> list[tuple[int, int]]:
        """Every ``(dataset_id, native_id)`` that owns a unified label.

        One pair for a plain disjoint slot, one per sharing dataset for a shared block, one per
        dataset with that class name under ``merged``; empty for an unused slot (COCO's gaps).
        """
        self._check_label(unified)
        return list(self._owners[unified])

    def native_id(self, dataset_id: int, unified: int) -> int | None:
        """The dataset's native id of a unified label, None if the dataset lacks that label."""
        self._check_dataset(dataset_id)
        self._check_label(unified)
        for di, cid in self._owners[unified]:
            if di == dataset_id:
                return cid
        return None

    def native_table(self, dataset_id: int) -> list[int]:
        """``[num_classes]`` native id of every unified label for a dataset, ``-1`` if absent.

        Lets evaluation map a whole prediction tensor at once:
        ``native = torch.tensor(table)[labels]`` then drop ``native < 0``.
        """
        self._check_dataset(dataset_id)
        table = [-1] * self.num_classes
        for cid, slot in self._to_unified[dataset_id].items():
            table[slot] = cid
        return table

    def dataset_slice(self, dataset_id: int) -> list[int]:
        """Sorted unified labels of a dataset's categories (restrict-to-dataset-labels oracle)."""
        return sorted(self._to_unified[self._check_dataset(dataset_id)].values())

    def _check_label(self, unified: int) -> None:
        if not 0 <= unified < self.num_classes:
            raise IndexError(f"unified label {unified} out of range 0..{self.num_classes - 1}")

    def check_labels(self, labels: Any, *, where: str = "") -> None:
        """Raise if any label is outside ``[0, num_classes)``.

        The startup check of docs/design.md §10: DINO crashes with a CUDA index assert when a label
        is
        >= num_classes (IDEA-Research/DINO#81; DAMEX's WiderFace id 178 of a 178-way head, Q6).

        Args:
            labels: a tensor, array or sequence of ints.
            where: what the labels are, for the message (e.g. a file name).

        Raises:
            DatasetError: naming the offending label, ``num_classes`` and ``where``.
        """
        if hasattr(labels, "numel"):  # torch.Tensor
            if labels.numel() == 0:
                return
            lo, hi = int(labels.min()), int(labels.max())
        else:
            values = [int(v) for v in (labels.tolist() if hasattr(labels, "tolist") else labels)]
            if not values:
                return
            lo, hi = min(values), max(values)
        suffix = f" ({where})" if where else ""
        if hi >= self.num_classes:
            raise DatasetError(
                f"label {hi} >= num_classes {self.num_classes}{suffix}: the classification head "
                "and the DN label book must be larger than every label"
            )
        if lo < 0:
            raise DatasetError(f"negative label {lo}{suffix}; labels must be in [0, num_classes)")

    # ------------------------------------------------------------------------ serialization
    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able description (stored in checkpoints)."""
        return {
            "version": _STATE_VERSION,
            "policy": self._policy,
            "share": [list(g) for g in self._share],
            "datasets": [
                {
                    "name": d.name,
                    "categories": [{"id": c, "name": n} for c, n in d.categories],
                    "num_slots": d.num_slots,
                    "classes": list(d.classes) if d.classes is not None else None,
                }
                for d in self._datasets
            ],
            "num_classes": self.num_classes,
            "names": list(self._names),
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> LabelSpace:
        """Rebuild from :meth:`state_dict`; checks that the rebuilt space is identical.

        Raises:
            DatasetError: unknown version, missing keys, or a mismatch of the stored names.
        """
        try:
            if state["version"] != _STATE_VERSION:
                raise DatasetError(
                    f"label space state version {state['version']} is not supported "
                    f"(expected {_STATE_VERSION})"
                )
            datasets = [
                (d["name"], d["categories"], d["num_slots"], d.get("classes"))
                for d in state["datasets"]
            ]
            ls = cls.build(datasets, policy=state["policy"], share=state["share"])
        except KeyError as e:
            raise DatasetError(f"label space state is missing key {e}") from None
        if "names" in state and list(state["names"]) != ls.names:
            raise DatasetError("label space state is inconsistent: rebuilt names differ")
        return ls

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LabelSpace):
            return NotImplemented
        return self.state_dict() == other.state_dict()

    def __hash__(self) -> int:
        return hash((self._policy, tuple(self._names)))

    def __repr__(self) -> str:
        return (
            f"LabelSpace(policy={self._policy!r}, num_classes={self.num_classes}, "
            f"datasets={self.dataset_names})"
        )

    def summary(self) -> str:
        """One line per dataset: its unified label range(s)."""
        lines = [f"label space: {self.num_classes} classes, policy {self._policy}"]
        for i, d in enumerate(self._datasets):
            sl = self.dataset_slice(i)
            lines.append(f"  {d.name}: {len(sl)} categories -> unified {sl[0]}..{sl[-1]}")
        return "\n".join(lines)


def build_label_space(
    catalog: DatasetCatalog,
    names: Sequence[str],
    *,
    policy: str = "disjoint",
    share: Sequence[Sequence[str]] | None = None,
    splits: Sequence[str] = ("train", "val", "test"),
) -> LabelSpace:
    """Build the label space of catalog datasets, reading categories from their JSON files.

    The categories come from the first of ``splits`` the dataset has. Each dataset's
    ``num_slots`` and ``classes`` come from its catalog entry.

    Args:
        catalog: the dataset catalog.
        names: dataset names in the run's order (``dataset_id`` = position).
        policy: ``"disjoint"`` or ``"merged"``.
        share: see :meth:`LabelSpace.build`.
        splits: split preference order for reading the categories.

    Returns:
        The label space.
    """
    entries = []
    for name in names:
        spec = catalog.get(name)
        split = next((s for s in splits if s in spec.splits), None)
        if split is None:
            raise DatasetError(
                f"dataset {name!r} has none of the splits {list(splits)} (has {list(spec.splits)})"
            )
        cats = read_categories(Path(spec.splits[split]))
        entries.append((name, cats, spec.num_slots, spec.classes))
    ls = LabelSpace.build(entries, policy=policy, share=share)
    logger.info("%s", ls.summary())
    return ls
