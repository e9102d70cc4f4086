// What an operator's policy (lib/operators/*.h) declares, and the two ways a
// bin pools. A policy is a type with
//   kName:            the operator's name in target names and in Python;
//   Pooling:          AveragePooling or MaxPooling, below;
//   kAttribute:       the name of its one operator attribute (an int64, 0 or
//                     1), or nullptr for none; kAttributeRule says what it
//                     must be when a call's value is neither;
//   channel_order(a): which input channel each bin of an output channel
//                     reads, for attribute value a (PositionSensitiveChannels
//                     or SharedChannels, below, give it);
//   box_rule(a):      how it turns an RoI into bins (BoxRule, roi_math.h);
//   kBoxDerivatives:  whether it has the box directions (kernel_table.h):
//                     the operators of samples, whose pooled tensor varies
//                     continuously with the boxes.
// No XLA types: the kernels include the policies too.
#ifndef JAX_PSROI_OPERATORS_POOLING_H_
#define JAX_PSROI_OPERATORS_POOLING_H_

#include <cstdint>

#include "roi_math.h"

namespace jax_psroi {

// A bin is the average of its samples (or of its window's pixels): the
// operator is linear, and its backward spreads each cotangent over what the
// bin read. Calls take a sampling ratio and the bin rows of a split grid.
struct AveragePooling {};

// A bin is the maximum of its window, and the forward records where it is
// (the arg-max pixels), which the backward sends each cotangent to.
struct MaxPooling {};

// The channels of a position-sensitive operator: each bin reads its own
// input channels, in the order its one attribute, channel_order, picks.
struct PositionSensitiveChannels {
  static constexpr const char* kAttribute = "channel_order";
  static constexpr const char* kAttributeRule =
      "channel_order must be 0 (torchvision) or 1 (bin_major)";
  static PSROI_HD ChannelOrder channel_order(int64_t attribute) {
    return static_cast<ChannelOrder>(attribute);
  }
};

// The channels of an operator whose every bin of output channel c reads
// input channel c.
struct SharedChannels {
  static PSROI_HD ChannelOrder channel_order(int64_t) { return ChannelOrder::kShared; }
};

}  // namespace jax_psroi

#endif  // JAX_PSROI_OPERATORS_POOLING_H_
