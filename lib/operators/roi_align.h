// roi_align (Mask R-CNN): every bin of output channel c averages bilinear
// samples of input channel c; `aligned` picks the -0.5 pixel shift
// (torchvision's aligned=True) or none, with RoI sizes of at least 1.
#ifndef JAX_PSROI_OPERATORS_ROI_ALIGN_H_
#define JAX_PSROI_OPERATORS_ROI_ALIGN_H_

#include <cstdint>

#include "operators/pooling.h"
#include "roi_math.h"

namespace jax_psroi {

struct RoiAlign : SharedChannels {
  static constexpr const char* kName = "roi_align";
  using Pooling = AveragePooling;
  static constexpr bool kBoxDerivatives = true;
  static constexpr const char* kAttribute = "aligned";
  static constexpr const char* kAttributeRule = "aligned must be 0 or 1";
  static PSROI_HD BoxRule box_rule(int64_t aligned) { return BoxRule::samples(aligned == 1); }
};

}  // namespace jax_psroi

#endif  // JAX_PSROI_OPERATORS_ROI_ALIGN_H_
