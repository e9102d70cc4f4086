// Python module `jax_psroi._cpu`: the CPU handlers as FFI capsules.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "gpu_schedule.h"
#include "python_targets.h"
#include "targets.h"
#include "xla/ffi/api/c_api.h"

namespace nb = nanobind;

NB_MODULE(_cpu, m) {
  m.doc() = "jax_psroi CPU kernels as XLA FFI handlers.";
  m.attr("ffi_api_version") =
      nb::make_tuple(XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR);
  m.def("targets", []() { return jax_psroi::python_targets(jax_psroi::cpu_targets()); },
        "The product's targets: [(name, operation, direction, layout, dtype, capsule)].");
  m.def("nms_targets", []() { return jax_psroi::python_targets(jax_psroi::cpu_nms_targets()); },
        "Non-maximum suppression's targets, one per dtype, as targets() lists them.");
  m.def("deform_targets",
        []() { return jax_psroi::python_targets(jax_psroi::cpu_deform_targets()); },
        "Deformable RoI Align's targets, as targets() lists them.");
  // Here rather than in _cuda: exporting for CUDA works without a CUDA build.
  m.def(
      "cuda_workspace_elements",
      [](bool backward, int64_t num_images, int64_t num_rois, int64_t height, int64_t pooled_h,
         int64_t pooled_w) {
        jax_psroi::CallShape shape{};
        shape.num_images = num_images;
        shape.num_rois = num_rois;
        shape.height = height;
        shape.pooled_h = pooled_h;
        shape.pooled_w = pooled_w;
        return jax_psroi::gpu_schedule::workspace_elements<jax_psroi::gpu_schedule::DefaultTuning>(
            shape, backward);
      },
      "Int32 elements of a CUDA call's workspace (lib/gpu_schedule.h).");
  m.def(
      "cpu_backward_workspace_bytes",
      [](const std::string& operation, const std::string& layout, const std::string& dtype,
         int64_t num_images, int64_t channels, int64_t height, int64_t width, int64_t num_rois,
         int64_t channels_out, int64_t pooled_h, int64_t pooled_w, int64_t channel_order,
         int64_t pass_rois) {
        jax_psroi::CallShape shape{};
        shape.num_images = num_images;
        shape.channels = channels;
        shape.height = height;
        shape.width = width;
        shape.num_rois = num_rois;
        shape.channels_out = channels_out;
        shape.pooled_h = pooled_h;
        shape.pooled_w = pooled_w;
        shape.channel_order = static_cast<jax_psroi::ChannelOrder>(channel_order);
        return jax_psroi::cpu_backward_workspace_bytes(operation, layout, dtype, shape, pass_rois);
      },
      "Bytes of a CPU backward call's workspace (lib/cpu/average_kernels.h): what the "
      "lowering asks for (pass_rois -1), or room for passes of pass_rois RoIs.");
  m.def(
      "forward_scratch_bytes",
      [](const std::string& operation, const std::string& layout, int64_t num_images,
         int64_t channels, int64_t height, int64_t width, int64_t channels_out, int64_t pooled_h,
         int64_t pooled_w, bool aligned, const std::vector<float>& rois, double spatial_scale,
         int64_t sampling_ratio) {
        jax_psroi::CallShape shape{};
        shape.num_images = num_images;
        shape.channels = channels;
        shape.height = height;
        shape.width = width;
        shape.num_rois = static_cast<int64_t>(rois.size() / 5);
        shape.channels_out = channels_out;
        shape.pooled_h = pooled_h;
        shape.pooled_w = pooled_w;
        return jax_psroi::cpu_forward_scratch_bytes(operation, layout, shape, aligned ? 1 : 0, rois,
                                                    spatial_scale, sampling_ratio);
      },
      "Test-only: the most scratch one task of the float32 CPU forward holds for `rois` (a "
      "flat list of [K, 5]) on a map of zeros (lib/cpu/average_kernels.h).");
}
