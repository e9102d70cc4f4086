// The one table of native kernels: every (operation, direction, layout,
// dtype) that has a kernel. Each platform's handler file instantiates its
// handler for every row (for_each_kernel), its Python module hands the rows
// to Python with their target names, and the Python side and the tests take
// the supported dtypes and layouts from those rows. A new dtype or layout is
// one line in a list below (plus, of course, kernels that compile for it).
//
// No XLA types here: the kernels include this header too.
#ifndef JAX_PSROI_KERNEL_TABLE_H_
#define JAX_PSROI_KERNEL_TABLE_H_

#include "operators/ps_roi_align.h"
#include "operators/ps_roi_pool.h"
#include "operators/roi_align.h"
#include "operators/roi_pool.h"
#include "roi_math.h"

// X(operator policy): every operator, its policy in lib/operators/ (what
// it reads, how its bins pool, its attribute). A new operator is its policy
// header, an #include above and one line here.
#define JAX_PSROI_OPERATIONS(X) \
  X(PsRoiAlign)                 \
  X(RoiAlign)                   \
  X(PsRoiPool)                  \
  X(RoiPool)

// X(storage type (storage_types.h), dtype name as JAX spells it, XLA FFI
// data type). The compute type of each is Storage<type>::Compute.
#define JAX_PSROI_DTYPES(X)  \
  X(float, float32, F32)     \
  X(double, float64, F64)    \
  X(BFloat16, bfloat16, BF16) \
  X(Float16, float16, F16)

// X(layout of roi_math.h, data_format name)
#define JAX_PSROI_LAYOUTS(X) \
  X(NchwLayout, NCHW)        \
  X(NhwcLayout, NHWC)

namespace jax_psroi {

// A row's direction. The box directions, of the operators whose policy has
// kBoxDerivatives, are the derivative of the forward with respect to one
// sampling parameter of every box (BoxParameter, roi_math.h; the call's
// attribute box_parameter) and its transpose: linear in their first operand
// and called as the forward (without a pooled tensor to update) and the
// backward are.
enum class Direction { kForward, kBackward, kBoxForward, kBoxBackward };

// Whether a direction is called as the forward (else as the backward).
constexpr bool is_forward(Direction d) {
  return d == Direction::kForward || d == Direction::kBoxForward;
}

template <typename... Ts>
struct TypeList {};

// A type or a direction as a value, to pass through generic lambdas.
template <typename T>
struct Tag {
  using type = T;
};
template <Direction D>
struct DirectionTag {
  static constexpr Direction value = D;
  static constexpr const char* name = D == Direction::kForward      ? "forward"
                                      : D == Direction::kBackward   ? "backward"
                                      : D == Direction::kBoxForward ? "box_forward"
                                                                    : "box_backward";
};

// Names of the table's entries, as the target names and Python spell them.
template <typename T>
struct KernelName;

#define JAX_PSROI_OPERATION_NAME_(policy)               \
  template <>                                           \
  struct KernelName<policy> {                           \
    static constexpr const char* value = policy::kName; \
  };
#define JAX_PSROI_DTYPE_NAME_(type, name, ffi_type) \
  template <>                                       \
  struct KernelName<type> {                         \
    static constexpr const char* value = #name;     \
  };
#define JAX_PSROI_LAYOUT_NAME_(layout, name)    \
  template <>                                   \
  struct KernelName<layout> {                   \
    static constexpr const char* value = #name; \
  };
JAX_PSROI_OPERATIONS(JAX_PSROI_OPERATION_NAME_)
JAX_PSROI_DTYPES(JAX_PSROI_DTYPE_NAME_)
JAX_PSROI_LAYOUTS(JAX_PSROI_LAYOUT_NAME_)
#undef JAX_PSROI_OPERATION_NAME_
#undef JAX_PSROI_DTYPE_NAME_
#undef JAX_PSROI_LAYOUT_NAME_

namespace internal {
template <typename First, typename... Rest>
struct DropFirst {
  using type = TypeList<Rest...>;
};
}  // namespace internal

#define JAX_PSROI_LIST_ENTRY_(entry, ...) , entry
#define JAX_PSROI_OPERATION_ENTRY_(policy) , policy

// The lists as types (the leading void only absorbs the first comma).
using KernelOperations =
    internal::DropFirst<void JAX_PSROI_OPERATIONS(JAX_PSROI_OPERATION_ENTRY_)>::type;
using KernelDTypes = internal::DropFirst<void JAX_PSROI_DTYPES(JAX_PSROI_LIST_ENTRY_)>::type;
using KernelLayouts = internal::DropFirst<void JAX_PSROI_LAYOUTS(JAX_PSROI_LIST_ENTRY_)>::type;
#undef JAX_PSROI_LIST_ENTRY_
#undef JAX_PSROI_OPERATION_ENTRY_

template <typename... Ts, typename Visit>
void for_each_type(TypeList<Ts...>, Visit&& visit) {
  (visit(Tag<Ts>{}), ...);
}

// Calls visit(Tag<operation>, DirectionTag, Tag<layout>, Tag<dtype>) once per
// row of the table.
template <typename Visit>
void for_each_kernel(Visit&& visit) {
  for_each_type(KernelOperations{}, [&](auto operation) {
    auto for_direction = [&](auto direction) {
      for_each_type(KernelLayouts{}, [&](auto layout) {
        for_each_type(KernelDTypes{}, [&](auto dtype) {
          visit(operation, direction, layout, dtype);
        });
      });
    };
    for_direction(DirectionTag<Direction::kForward>{});
    for_direction(DirectionTag<Direction::kBackward>{});
    if constexpr (decltype(operation)::type::kBoxDerivatives) {
      for_direction(DirectionTag<Direction::kBoxForward>{});
      for_direction(DirectionTag<Direction::kBoxBackward>{});
    }
  });
}

}  // namespace jax_psroi

#endif  // JAX_PSROI_KERNEL_TABLE_H_
