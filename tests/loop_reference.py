"""A third, independent oracle: torchvision's loops transcribed to numpy
(RoI operators here; non-maximum suppression at the end).

One output element at a time, every sample of the grid visited (so only for
small boxes), arithmetic in numpy scalars of the case's dtype so rounding
follows torchvision's. It includes the deliberate deviations of jax_psroi
(invalid batch index, non-finite geometry and empty grids give 0).
"""

import math

import numpy as np


def _bilinear(plane, y, x):
    height, width = plane.shape
    t = type(y)
    if not (y >= -1.0 and y <= height and x >= -1.0 and x <= width):
        return t(0), []
    y = max(y, t(0))
    x = max(x, t(0))
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_high = y_low = height - 1
        y = t(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_high = x_low = width - 1
        x = t(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - t(y_low), x - t(x_low)
    hy, hx = t(1) - ly, t(1) - lx
    taps = [(y_low, x_low, hy * hx), (y_low, x_high, hy * lx),
            (y_high, x_low, ly * hx), (y_high, x_high, ly * lx)]
    value = t(0)
    for r, c, wgt in taps:
        value = value + wgt * plane[r, c]
    return value, taps


def _bins(features, rois, output_size, spatial_scale, sampling_ratio):
    """Yields (k, c_out, ph, pw, image, c_in, [(y, x)] samples, count)."""
    n, c, _, _ = features.shape
    ph_n, pw_n = output_size
    c_out_n = c // (ph_n * pw_n)
    t = features.dtype.type
    scale = t(spatial_scale)
    for k, roi in enumerate(rois.astype(features.dtype)):
        start_w = roi[1] * scale - t(0.5)
        start_h = roi[2] * scale - t(0.5)
        bin_w = (roi[3] * scale - t(0.5) - start_w) / t(pw_n)
        bin_h = (roi[4] * scale - t(0.5) - start_h) / t(ph_n)
        ok = (roi[0] > -1 and roi[0] < n
              and all(np.isfinite([start_w, start_h, bin_w, bin_h])))
        grid_h = sampling_ratio if sampling_ratio > 0 else (
            max(0, math.ceil(bin_h)) if ok else 0)
        grid_w = sampling_ratio if sampling_ratio > 0 else (
            max(0, math.ceil(bin_w)) if ok else 0)
        for c_out in range(c_out_n):
            for ph in range(ph_n):
                for pw in range(pw_n):
                    if not ok or grid_h == 0 or grid_w == 0:
                        yield k, c_out, ph, pw, None, None, [], 0
                        continue
                    hstart = t(ph) * bin_h + start_h
                    wstart = t(pw) * bin_w + start_w
                    samples = [
                        (hstart + t(iy + 0.5) * bin_h / t(grid_h),
                         wstart + t(ix + 0.5) * bin_w / t(grid_w))
                        for iy in range(grid_h) for ix in range(grid_w)]
                    c_in = (c_out * ph_n + ph) * pw_n + pw
                    yield (k, c_out, ph, pw, int(roi[0]), c_in, samples,
                           t(grid_h * grid_w))


def ps_roi_align_loops(features, rois, output_size, spatial_scale,
                       sampling_ratio):
    features = np.asarray(features)
    ph_n, pw_n = output_size
    c_out_n = features.shape[1] // (ph_n * pw_n)
    out = np.zeros((len(rois), c_out_n, ph_n, pw_n), features.dtype)
    for k, c_out, ph, pw, image, c_in, samples, count in _bins(
            features, np.asarray(rois), output_size, spatial_scale,
            sampling_ratio):
        if image is None:
            continue
        total = features.dtype.type(0)
        for y, x in samples:
            total = total + _bilinear(features[image, c_in], y, x)[0]
        out[k, c_out, ph, pw] = total / count
    return out


def ps_roi_align_grad_loops(features, rois, cotangent, output_size,
                            spatial_scale, sampling_ratio):
    """Gradient with respect to the features for the given cotangent."""
    features = np.asarray(features)
    grad = np.zeros_like(features)
    for k, c_out, ph, pw, image, c_in, samples, count in _bins(
            features, np.asarray(rois), output_size, spatial_scale,
            sampling_ratio):
        if image is None:
            continue
        g = cotangent[k, c_out, ph, pw]
        for y, x in samples:
            for r, c, wgt in _bilinear(features[image, c_in], y, x)[1]:
                grad[image, c_in, r, c] += g * wgt / count
    return grad


def deform_roi_align_loops(features, rois, offset, output_size, spatial_scale,
                           sampling_ratio, gamma, position_sensitive):
    """Deformable RoI Align (position_sensitive False: every bin of output
    channel c reads channel c) or Deformable PS-RoI Align, from the
    Deformable ConvNets paper's equations as mmcv's deform_roi_pool
    computes them: the RoI shifted by -0.5 pixel, no size clamp, bin (ph,
    pw) starting at roi_start + gamma * roi_size * offset[k, :, ph, pw]
    (x, then y), ceil(bin size) samples per axis when sampling_ratio <= 0,
    the average of their bilinear values (0 outside [-1, size]); and
    jax_psroi's deviations (invalid batch index, non-finite geometry, empty
    grid: 0)."""
    features = np.asarray(features)
    rois = np.asarray(rois).astype(features.dtype)
    offset = np.asarray(offset).astype(features.dtype)
    n, c, _, _ = features.shape
    ph_n, pw_n = output_size
    c_out_n = c // (ph_n * pw_n) if position_sensitive else c
    t = features.dtype.type
    scale, half, gamma = t(spatial_scale), t(0.5), t(gamma)
    out = np.zeros((len(rois), c_out_n, ph_n, pw_n), features.dtype)
    for k, roi in enumerate(rois):
        roi_start_w, roi_start_h = roi[1] * scale - half, roi[2] * scale - half
        roi_width = (roi[3] * scale - half) - roi_start_w
        roi_height = (roi[4] * scale - half) - roi_start_h
        bin_w, bin_h = roi_width / t(pw_n), roi_height / t(ph_n)
        if not (roi[0] > -1 and roi[0] < n
                and np.all(np.isfinite([roi_start_w, roi_start_h, bin_w, bin_h]))):
            continue
        grid_h = sampling_ratio if sampling_ratio > 0 else max(0, math.ceil(bin_h))
        grid_w = sampling_ratio if sampling_ratio > 0 else max(0, math.ceil(bin_w))
        if grid_h == 0 or grid_w == 0:
            continue
        image = int(roi[0])
        for ph in range(ph_n):
            for pw in range(pw_n):
                start_w = roi_start_w + gamma * roi_width * offset[k, 0, ph, pw]
                start_h = roi_start_h + gamma * roi_height * offset[k, 1, ph, pw]
                if not np.isfinite([start_w, start_h]).all():
                    continue
                for c_out in range(c_out_n):
                    c_in = (c_out * ph_n + ph) * pw_n + pw if position_sensitive else c_out
                    total = t(0)
                    for iy in range(grid_h):
                        y = t(ph) * bin_h + start_h + t(iy + 0.5) * bin_h / t(grid_h)
                        for ix in range(grid_w):
                            x = t(pw) * bin_w + start_w + t(ix + 0.5) * bin_w / t(grid_w)
                            total = total + _bilinear(features[image, c_in], y, x)[0]
                    out[k, c_out, ph, pw] = total / t(grid_h * grid_w)
    return out


def greedy_nms(boxes, scores, threshold, idxs=None, max_output=None):
    """torchvision's CPU NMS loop (torchvision/csrc/ops/cpu/nms_kernel.cpp)
    in numpy: the kept indices, best first, at most `max_output` (None: all).
    Visits NaN scores first, then descending scores, ties in index order;
    IoUs in float32 (float64 for float64 boxes) with NaN-propagating max and
    min, compared with the threshold in float64; boxes of different `idxs`
    never suppress each other."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        return _greedy_nms(np.asarray(boxes), scores, threshold, idxs, max_output)


def _greedy_nms(boxes, scores, threshold, idxs, max_output):
    # IEEE arithmetic throughout: overflowing areas, 0 / 0 and NaN are cases.
    compute = np.float64 if boxes.dtype == np.float64 else np.float32
    boxes = boxes.astype(compute)
    scores = np.asarray(scores).astype(compute)
    n = len(scores)
    idxs = np.zeros(n, np.int64) if idxs is None else np.asarray(idxs)
    descending = -scores
    descending[(descending == 0) | np.isnan(descending)] = 0
    order = np.lexsort((np.arange(n), descending, ~np.isnan(scores)))
    x1, y1, x2, y2 = boxes.T
    area = (x2 - x1) * (y2 - y1)
    removed = np.zeros(n, bool)
    keep = []
    for position, i in enumerate(order):
        if len(keep) == max_output:
            break
        if removed[i]:
            continue
        keep.append(int(i))
        later = order[position + 1:]
        w = np.maximum(compute(0), np.minimum(x2[i], x2[later]) - np.maximum(x1[i], x1[later]))
        h = np.maximum(compute(0), np.minimum(y2[i], y2[later]) - np.maximum(y1[i], y1[later]))
        inter = w * h
        iou = inter / (area[i] + area[later] - inter)
        removed[later] |= (iou.astype(np.float64) > threshold) & (idxs[later] == idxs[i])
    return np.array(keep, np.int64)
