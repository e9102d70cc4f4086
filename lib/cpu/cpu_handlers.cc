// XLA FFI handlers for the CPU: after the shared prologue (ffi_handlers.h),
// split the work over XLA's intra-op thread pool (parallel.h). Errors are
// returned, never thrown. One handler per row of the kernel table.
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu/average_kernels.h"
#include "cpu/huge_pages.h"
#include "cpu/max_kernels.h"
#include "cpu/parallel.h"
#include "ffi_common.h"
#include "ffi_handlers.h"
#include "kernel_table.h"
#include "targets.h"
#include "xla/ffi/api/ffi.h"

namespace jax_psroi {
namespace cpu {
namespace {

// A backward call's workspace, its further result (average_kernels.h,
// BackwardPlan).
using WorkspaceBytes = ffi::Buffer<ffi::DataType::U8, 1>;

// The shared state of a backward call, in the compute type T: its plan, its
// work units, the tables and bin-major cotangent of the pass at hand and the
// accumulator (in the workspace), and the pass's RoIs by image. Built by the
// handler, filled by the phases.
template <typename T, typename Layout>
struct BackwardState {
  BackwardState(const CallShape& shape, const BackwardPlan& plan, Carver memory)
      : plan(plan),
        units(shape, sizeof(T), Layout::kChannelsLast),
        run(staged_run<T>(shape, Layout::kChannelsLast)),
        tables(shape, plan.pass_rois, memory),
        // Every element is written before it is read: no zero fill.
        bin_major(memory.take<T>(plan.pass_rois * shape.bins() * run)),
        accumulator(plan.accumulates ? memory.take<T>(apart_elements<T, Layout>(shape))
                                     : nullptr) {}
  BackwardPlan plan;
  Units units;
  int64_t run;
  RoiTables<T> tables;
  T* bin_major;
  T* accumulator;
  RoisByImage by_image;
};

// The averaging operators' forward, by RoI.
template <typename Layout, typename S>
ffi::Future average_forward(ffi::ThreadPool pool, const ForwardCall<S>& call) {
  using T = ComputeType<S>;
  const CallShape shape = call.shape;
  const S* in = call.input;
  const T* boxes = call.rois;
  S* out = call.output;
  const T scale = call.spatial_scale;
  const int64_t sampling_ratio = call.sampling_ratio;
  const BoxRule rule = call.rule;
  const bool skip_empty_rois = call.skip_empty_rois;
  auto order = std::make_shared<const std::vector<int64_t>>(
      locality_order(boxes, shape, rule, scale, sampling_ratio));
  return run_phases(pool, call_work(shape, Direction::kForward),
                    {over_rois(pool, shape.num_rois, [=](int64_t begin, int64_t end) {
                      forward_rois<S, Layout>(in, boxes, shape, rule, scale, sampling_ratio,
                                              order->data(), begin, end, skip_empty_rois, out);
                    })});
}

// The averaging operators' backward, in passes of RoIs whose tables fit
// the workspace.
template <typename Layout, typename S>
ffi::Future average_backward(ffi::ThreadPool pool, const BackwardCall<S>& call) {
  using T = ComputeType<S>;
  const CallShape shape = call.shape;
  // The lowering asks for backward_workspace_bytes; less works too, in more
  // passes.
  ffi::ErrorOr<WorkspaceBytes> workspace = further_result<WorkspaceBytes>(
      call.further, 0, static_cast<int64_t>(least_workspace_bytes<S, Layout>(shape)),
      "a workspace of bytes");
  if (workspace.has_error()) return ready_with(workspace.error());
  const BackwardPlan plan = plan_backward<S, Layout>(shape, workspace->size_bytes());
  const S* cot = call.cotangent;
  const T* boxes = call.rois;
  S* grad = call.grad;
  advise_huge_pages(grad, call.grad_bytes);
  const BoxRule rule = call.rule;
  const T scale = call.spatial_scale;
  const int64_t sampling_ratio = call.sampling_ratio;
  auto state =
      std::make_shared<BackwardState<T, Layout>>(shape, plan, Carver(workspace->untyped_data()));
  // Per pass: its RoIs' tables and cotangent bin-major (by RoI); its RoIs of
  // each image (one item); then the gradient (by unit).
  std::vector<Phase> phases;
  for (int64_t p = 0; p < plan.passes; ++p) {
    const int64_t first = p * plan.pass_rois;
    const int64_t n = std::min(plan.pass_rois, shape.num_rois - first);
    const PassOrder<T> order{p == 0, p + 1 == plan.passes, state->accumulator};
    phases.push_back(over_rois(pool, n, [=](int64_t begin, int64_t end) {
      RoiWeights<T> weights(shape);
      state->tables.compute(boxes, rule, scale, sampling_ratio, first, first + begin, first + end,
                            &weights);
      to_bin_major<S, Layout>(cot, shape, state->tables, first, n, first + begin, first + end,
                              state->bin_major);
    }));
    phases.push_back(
        Phase{1, [=](int64_t) { state->by_image = rois_by_image(state->tables, shape, n); }});
    phases.push_back(Phase{state->units.count(), [=](int64_t unit) {
                             const Pass<T> pass{state->tables, state->by_image,
                                                state->bin_major, n, state->run};
                             backward_unit<S, Layout>(pass, shape, state->units, unit, order, grad);
                           }});
  }
  return run_phases(pool, call_work(shape, Direction::kBackward), std::move(phases));
}

// RoI Pool's forward: maxima and their pixels, or with `recorded` the
// input at recorded pixels (ffi_common.h). By RoI.
template <typename Layout, typename S>
ffi::Future max_forward(ffi::ThreadPool pool, const ForwardCall<S>& call) {
  using T = ComputeType<S>;
  const CallShape shape = call.shape;
  const S* in = call.input;
  const T* boxes = call.rois;
  const int32_t* at = call.recorded;
  S* out = call.output;
  int32_t* px = call.pixels;
  const BoxRule rule = call.rule;
  const T scale = call.spatial_scale;
  return run_phases(pool, call_work(shape, Direction::kForward),
                    {over_rois(pool, shape.num_rois, [=](int64_t begin, int64_t end) {
                      roi_pool_forward_rois<S, Layout>(in, boxes, shape, rule, scale, at, begin,
                                                       end, out, px);
                    })});
}

// RoI Pool's backward: the cotangent added at the recorded pixels, by
// (image, channel run).
template <typename Layout, typename S>
ffi::Future max_backward(ffi::ThreadPool pool, const BackwardCall<S>& call) {
  const CallShape shape = call.shape;
  const S* cot = call.cotangent;
  const int32_t* px = call.pixels;
  S* grad = call.grad;
  advise_huge_pages(grad, call.grad_bytes);
  const RoiPoolUnits units = RoiPoolUnits::of(shape, pool.num_threads(), Layout::kChannelsLast);
  auto by_image = std::make_shared<const RoiPoolByImage>(
      roi_pool_by_image(call.rois, shape, call.rule, call.spatial_scale));
  return run_phases(pool, call_work(shape, Direction::kBackward),
                    {Phase{units.count(shape), [=](int64_t unit) {
                             roi_pool_backward_unit<S, Layout>(cot, px, shape, *by_image, units,
                                                               unit, grad);
                           }}});
}

}  // namespace

// The CPU platform (ffi_handlers.h): XLA's intra-op thread pool, futures.
struct Cpu {
  using Context = ffi::ThreadPool;
  using Result = ffi::Future;
  static constexpr bool kCommandBuffer = false;
  static auto bind() { return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>(); }
  static ffi::Future fail(ffi::Error error) { return ready_with(std::move(error)); }
  template <typename Layout, typename S>
  static ffi::Future average_forward(ffi::ThreadPool pool, const ForwardCall<S>& call) {
    return cpu::average_forward<Layout>(pool, call);
  }
  template <typename Layout, typename S>
  static ffi::Future average_backward(ffi::ThreadPool pool, const BackwardCall<S>& call) {
    return cpu::average_backward<Layout>(pool, call);
  }
  template <typename Layout, typename S>
  static ffi::Future max_forward(ffi::ThreadPool pool, const ForwardCall<S>& call) {
    return cpu::max_forward<Layout>(pool, call);
  }
  template <typename Layout, typename S>
  static ffi::Future max_backward(ffi::ThreadPool pool, const BackwardCall<S>& call) {
    return cpu::max_backward<Layout>(pool, call);
  }
};

}  // namespace cpu

std::vector<FfiTarget> cpu_targets() {
  return ffi_targets<PlatformHandler<cpu::Cpu>::Row>("jax_psroi_");
}

int64_t cpu_backward_workspace_bytes(const std::string& operation, const std::string& layout,
                                     const std::string& dtype, CallShape shape, int64_t pass_rois) {
  int64_t bytes = 0;
  for_each_kernel([&](auto op, auto direction, auto row_layout, auto row_dtype) {
    using Operation = typename decltype(op)::type;
    using Layout = typename decltype(row_layout)::type;
    using S = typename decltype(row_dtype)::type;
    if constexpr (decltype(direction)::value == Direction::kBackward &&
                  std::is_same_v<typename Operation::Pooling, AveragePooling>) {
      if (operation == KernelName<Operation>::value && layout == KernelName<Layout>::value &&
          dtype == KernelName<S>::value) {
        shape.channel_order = Operation::channel_order(static_cast<int64_t>(shape.channel_order));
        bytes = static_cast<int64_t>(pass_rois < 0
                                         ? cpu::backward_workspace_bytes<S, Layout>(shape)
                                         : cpu::pass_workspace_bytes<S, Layout>(shape, pass_rois));
      }
    }
  });
  return bytes;
}

int64_t cpu_forward_scratch_bytes(const std::string& operation, const std::string& layout,
                                  CallShape shape, int64_t attribute,
                                  const std::vector<float>& rois, double spatial_scale,
                                  int64_t sampling_ratio) {
  int64_t bytes = 0;
  for_each_kernel([&](auto op, auto direction, auto row_layout, auto row_dtype) {
    using Operation = typename decltype(op)::type;
    using Layout = typename decltype(row_layout)::type;
    using S = typename decltype(row_dtype)::type;
    if constexpr (decltype(direction)::value == Direction::kForward &&
                  std::is_same_v<typename Operation::Pooling, AveragePooling> &&
                  std::is_same_v<S, float>) {
      if (operation == KernelName<Operation>::value && layout == KernelName<Layout>::value) {
        shape.channel_order = Operation::channel_order(static_cast<int64_t>(shape.channel_order));
        const BoxRule rule = Operation::box_rule(attribute);
        const std::vector<float> input(static_cast<size_t>(shape.feature_elements()));
        std::vector<float> output(static_cast<size_t>(shape.outputs()));
        const float scale = static_cast<float>(spatial_scale);
        const std::vector<int64_t> order =
            cpu::locality_order(rois.data(), shape, rule, scale, sampling_ratio);
        bytes = static_cast<int64_t>(cpu::forward_rois<float, Layout>(
            input.data(), rois.data(), shape, rule, scale, sampling_ratio, order.data(), 0,
            shape.num_rois, /*skip_empty_rois=*/false, output.data()));
      }
    }
  });
  return bytes;
}

}  // namespace jax_psroi
