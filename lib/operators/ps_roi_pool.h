// ps_roi_pool (R-FCN's original): output channel c of bin (i, j) averages a
// window of whole pixels of its own input channel (corners rounded, then
// the unshifted geometry).
#ifndef JAX_PSROI_OPERATORS_PS_ROI_POOL_H_
#define JAX_PSROI_OPERATORS_PS_ROI_POOL_H_

#include <cstdint>

#include "operators/pooling.h"
#include "roi_math.h"

namespace jax_psroi {

struct PsRoiPool : PositionSensitiveChannels {
  static constexpr const char* kName = "ps_roi_pool";
  using Pooling = AveragePooling;
  static constexpr bool kBoxDerivatives = false;
  static PSROI_HD BoxRule box_rule(int64_t) {
    return BoxRule::windows(/*inclusive_corners=*/false);
  }
};

}  // namespace jax_psroi

#endif  // JAX_PSROI_OPERATORS_PS_ROI_POOL_H_
