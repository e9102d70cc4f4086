"""The RoI family for JAX with native CPU and CUDA kernels: Position-Sensitive
RoI Align, RoI Align, Position-Sensitive RoI Pool, RoI Pool and multi-scale
RoI Align; and jax.numpy references of the whole family."""

from jax_psroi._arguments import rois_from_boxes
from jax_psroi._extension import build_info, export_safety_checks
from jax_psroi.ops import (
    multi_scale_roi_align,
    ps_roi_align,
    ps_roi_pool,
    roi_align,
    roi_pool,
)
from jax_psroi.reference import (
    multi_scale_roi_align_reference,
    ps_roi_align_reference,
    roi_align_reference,
)
from jax_psroi.reference_pools import ps_roi_pool_reference, roi_pool_reference

__all__ = ["build_info", "export_safety_checks", "multi_scale_roi_align",
           "multi_scale_roi_align_reference", "ps_roi_align", "ps_roi_align_reference",
           "ps_roi_pool", "ps_roi_pool_reference", "roi_align", "roi_align_reference",
           "roi_pool", "roi_pool_reference", "rois_from_boxes"]
__version__ = "0.1.0"
