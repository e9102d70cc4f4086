// ps_roi_align (R-FCN): output channel c of bin (i, j) averages bilinear
// samples of its own input channel; torchvision's geometry (-0.5 pixel shift).
#ifndef JAX_PSROI_OPERATORS_PS_ROI_ALIGN_H_
#define JAX_PSROI_OPERATORS_PS_ROI_ALIGN_H_

#include <cstdint>

#include "operators/pooling.h"
#include "roi_math.h"

namespace jax_psroi {

struct PsRoiAlign : PositionSensitiveChannels {
  static constexpr const char* kName = "ps_roi_align";
  using Pooling = AveragePooling;
  static constexpr bool kBoxDerivatives = true;
  static PSROI_HD BoxRule box_rule(int64_t) { return BoxRule::samples(/*aligned=*/true); }
};

}  // namespace jax_psroi

#endif  // JAX_PSROI_OPERATORS_PS_ROI_ALIGN_H_
