"""Converters from each UODB dataset's original release to COCO JSON (docs/design.md §4.1).

One module per original format (``voc``, ``kitti``, ``widerface``, ``lisa``, ``dota``,
``deeplesion``, ``kitchen``, ``coco``); ``prepare`` lays the results out as
``OUT/NAME/{annotations/{train,test}.json, images/}``. See ``docs/preparing_uodb.md``.
"""

from damex.data.converters.coco import convert_coco
from damex.data.converters.common import BadRecord, ConversionReport
from damex.data.converters.deeplesion import convert_deeplesion, window_hu
from damex.data.converters.dota import convert_dota
from damex.data.converters.kitchen import convert_kitchen
from damex.data.converters.kitti import KITTI_CLASS_MAP, convert_kitti
from damex.data.converters.lisa import convert_lisa, lisa_tag_to_class
from damex.data.converters.prepare import PrepareOptions, format_summary, prepare_uodb
from damex.data.converters.voc import convert_voc
from damex.data.converters.widerface import convert_widerface

__all__ = [
    "BadRecord",
    "ConversionReport",
    "KITTI_CLASS_MAP",
    "PrepareOptions",
    "convert_coco",
    "convert_deeplesion",
    "convert_dota",
    "convert_kitchen",
    "convert_kitti",
    "convert_lisa",
    "convert_voc",
    "convert_widerface",
    "format_summary",
    "lisa_tag_to_class",
    "prepare_uodb",
    "window_hu",
]
