"""The RoI family for JAX with native CPU and CUDA kernels: Position-Sensitive
RoI Align, RoI Align, Position-Sensitive RoI Pool, RoI Pool, multi-scale
RoI Align and deformable RoI Align (plain and position-sensitive); and
jax.numpy references of the whole family. Also non-maximum
suppression (nms, batched_nms) and the box utilities a detection head needs."""

from jax_psroi import boxes, ops
from jax_psroi import nms as _nms_api  # the module: `nms` is its function below
from jax_psroi._arguments import rois_from_boxes as rois_from_boxes
from jax_psroi._extension import build_info as build_info
from jax_psroi._extension import export_safety_checks as export_safety_checks
from jax_psroi.boxes import *  # noqa: F403 (the box utilities: every name of boxes.__all__)
from jax_psroi.nms import *  # noqa: F403 (nms, batched_nms: nms.__all__)
from jax_psroi.ops import *  # noqa: F403 (the operators: every name of ops.__all__)
from jax_psroi.reference import (
    multi_scale_roi_align_reference as multi_scale_roi_align_reference,
)
from jax_psroi.reference import ps_roi_align_reference as ps_roi_align_reference
from jax_psroi.reference import roi_align_reference as roi_align_reference
from jax_psroi.reference_deformable import (
    deform_ps_roi_align_reference as deform_ps_roi_align_reference,
)
from jax_psroi.reference_deformable import (
    deform_roi_align_reference as deform_roi_align_reference,
)
from jax_psroi.reference_pools import ps_roi_pool_reference as ps_roi_pool_reference
from jax_psroi.reference_pools import roi_pool_reference as roi_pool_reference

__all__ = sorted(["build_info", "deform_ps_roi_align_reference", "deform_roi_align_reference",
                  "export_safety_checks", "multi_scale_roi_align_reference",
                  "ps_roi_align_reference", "ps_roi_pool_reference", "roi_align_reference",
                  "roi_pool_reference", "rois_from_boxes", *boxes.__all__, *_nms_api.__all__,
                  *ops.__all__])
__version__ = "0.1.0"
