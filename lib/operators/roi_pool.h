// roi_pool (Fast R-CNN): every bin of output channel c is the maximum of a
// window of whole pixels of input channel c; both rounded corner pixels
// belong to the RoI. No operator attribute.
#ifndef JAX_PSROI_OPERATORS_ROI_POOL_H_
#define JAX_PSROI_OPERATORS_ROI_POOL_H_

#include <cstdint>

#include "operators/pooling.h"
#include "roi_math.h"

namespace jax_psroi {

struct RoiPool : SharedChannels {
  static constexpr const char* kName = "roi_pool";
  using Pooling = MaxPooling;
  static constexpr bool kBoxDerivatives = false;
  static constexpr const char* kAttribute = nullptr;
  static constexpr const char* kAttributeRule = "roi_pool takes no operator attribute";
  static PSROI_HD BoxRule box_rule(int64_t) { return BoxRule::windows(/*inclusive_corners=*/true); }
};

}  // namespace jax_psroi

#endif  // JAX_PSROI_OPERATORS_ROI_POOL_H_
