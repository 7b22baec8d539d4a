// include/anvil/quant_reference.h: the dequantization formula in plain ATen ops.
#include "anvil/quant_reference.h"
#include "ops/quantize/quantize_common.h"

#include <ATen/ATen.h>

namespace anvil::ops {

at::Tensor expand_scale_inv(const at::Tensor& scale_inv, at::IntArrayRef x_shape, const std::string& granularity) {
  const Granularity g = parse_granularity(granularity, "anvil::expand_scale_inv");
  switch (g) {
    case Granularity::kTensor:
    case Granularity::kRow:
      return scale_inv.expand(x_shape);
    case Granularity::kBlock1x128:
      return scale_inv.repeat_interleave(kBlock, -1).narrow(-1, 0, x_shape.back());
    case Granularity::kBlock128x128:
      return scale_inv.repeat_interleave(kBlock, 0)
          .repeat_interleave(kBlock, 1)
          .narrow(0, 0, x_shape[0])
          .narrow(1, 0, x_shape[1]);
  }
  return scale_inv;
}

at::Tensor reference_dequantize(const at::Tensor& q, const at::Tensor& scale_inv, const std::string& granularity) {
  return q.to(at::kFloat) * expand_scale_inv(scale_inv.to(at::kFloat), q.sizes(), granularity);
}

}  // namespace anvil::ops
