"""Visualization: detections, routing heatmaps and overlays, the HTML routing report."""

from damex.viz.boxes import draw_boxes, draw_detections, legend_strip, palette, save_png
from damex.viz.report import png_data_uri, write_routing_report
from damex.viz.routing import (
    draw_expert_overlay,
    expert_colors,
    plot_routing_accuracy,
    plot_routing_heatmap,
    query_experts,
    save_figure,
    save_routing_figures,
)

__all__ = [
    "draw_boxes",
    "draw_detections",
    "draw_expert_overlay",
    "expert_colors",
    "legend_strip",
    "palette",
    "plot_routing_accuracy",
    "plot_routing_heatmap",
    "png_data_uri",
    "query_experts",
    "save_figure",
    "save_png",
    "save_routing_figures",
    "write_routing_report",
]
