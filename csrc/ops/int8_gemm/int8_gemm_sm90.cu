// The Hopper (sm_90a) INT8 GEMM of int8_gemm, with the scales fused into the epilogue: CUTLASS 4.2's
// warp-specialized TMA + WGMMA mainloop on int8 operands (exact int32 accumulators, the s8 x s8 -> s32 WGMMA
// at twice the FP16 rate), and an epilogue visitor tree that reads the int32 tile once from registers and
// writes bf16:
//   D = homogeneous_multiply_add(acc * a_scale[m], b_scale[n], bias[n])
// (a_scale a column broadcast: one per token; b_scale and bias row broadcasts: one per output channel; each
// scale also takes a scalar, chosen at run time through a bool stride). Against cuBLASLt's int32 output plus a
// separate epilogue pass this saves writing and reading M x N x 4 bytes, which at the 7B shapes is a third of
// the GEMM's time (bench/quantized_linear.py). The multiply-add rounds once where the reference rounds twice
// (int8_gemm_common.h), well inside the op's bf16 tolerance.
//
// One configuration, the large-M one (prefill and training batches; small M goes to cuBLASLt or the SIMT
// kernel): 128 x 128 x 128 CTA tiles, ping-pong consumer warpgroups (one's epilogue overlaps the other's
// mainloop), clusters of 2 x 1 sharing each B tile by TMA multicast, a persistent scheduler. bf16 output only:
// each instantiation costs minutes of CI compile (docs/ARCHITECTURE.md "CI time"); fp16 and fp32 take cuBLASLt.
#include "ops/int8_gemm/int8_gemm_sm90.h"

#include <c10/cuda/CUDAException.h>
#include <ATen/ATen.h>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/dispatch_policy.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/gemm/kernel/tile_scheduler.hpp"
#include "cutlass/numeric_types.h"
#include "cutlass/util/packed_stride.hpp"

#include <string>

namespace anvil::ops::int8sm90 {
namespace {

using namespace cute;

struct Bf16Gemm {
  using ElementA = int8_t;
  using ElementB = int8_t;
  using ElementAcc = int32_t;
  using ElementD = cutlass::bfloat16_t;
  using LayoutA = cutlass::layout::RowMajor;     // a (M, K): K-major
  using LayoutB = cutlass::layout::ColumnMajor;  // b (N, K) row-major is B (K, N) column-major: K-major
  using LayoutD = cutlass::layout::RowMajor;     // out (M, N)
  static constexpr int kAlignAB = 16;            // 16 int8 = 16 bytes (TMA)
  static constexpr int kAlignD = 8;              // 8 bf16 = 16 bytes
  using Tile = Shape<_128, _128, _128>;
  using Cluster = Shape<_2, _1, _1>;

  using ScaleA = cutlass::epilogue::fusion::Sm90ColBroadcast<0, Tile, float, float, Stride<bool, _0, int64_t>>;
  using ScaleB = cutlass::epilogue::fusion::Sm90RowBroadcast<0, Tile, float, float, Stride<_0, bool, int64_t>>;
  using Bias = cutlass::epilogue::fusion::Sm90RowBroadcast<0, Tile, float, float, Stride<_0, _1, int64_t>>;
  using AccTimesA = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<cutlass::multiplies, float, float, cutlass::FloatRoundStyle::round_to_nearest>,
      cutlass::epilogue::fusion::Sm90AccFetch, ScaleA>;
  using Fusion = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<cutlass::homogeneous_multiply_add, ElementD, float,
                                             cutlass::FloatRoundStyle::round_to_nearest>,
      AccTimesA, ScaleB, Bias>;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, ElementAcc, float, void, LayoutD, kAlignD, ElementD, LayoutD,
      kAlignD, cutlass::epilogue::TmaWarpSpecialized, Fusion>::CollectiveOp;

  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementA, LayoutA, kAlignAB, ElementB, LayoutB, kAlignAB,
      ElementAcc, Tile, Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedPingpong>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue, void>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

template <class G>
std::string run(const Args& p) {
  using Kernel = typename G::Kernel;
  using StrideA = typename Kernel::StrideA;
  using StrideB = typename Kernel::StrideB;
  using StrideD = typename Kernel::StrideD;
  const int m = int(p.m), n = int(p.n), k = int(p.k);
  cutlass::KernelHardwareInfo hw;
  hw.device_id = p.device;
  hw.sm_count = p.sm_count;
  typename G::Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {m, n, k, 1},
      {p.a, cutlass::make_cute_packed_stride(StrideA{}, make_shape(m, k, 1)), p.b,
       cutlass::make_cute_packed_stride(StrideB{}, make_shape(n, k, 1))},
      {{},
       nullptr,
       cutlass::make_cute_packed_stride(StrideD{}, make_shape(m, n, 1)),
       static_cast<typename G::ElementD*>(p.out),
       cutlass::make_cute_packed_stride(StrideD{}, make_shape(m, n, 1))},
      hw};
  // {{{acc}, {a_scale}, {multiplies}}, {b_scale}, {bias}, {multiply_add}}
  args.epilogue.thread = {{{}, {p.a_scale, 1.0f, {p.a_per_row, _0{}, 0}}, {}},
                          {p.b_scale, 1.0f, {_0{}, p.b_per_row, 0}},
                          {p.bias, 0.0f, {}},
                          {}};
  typename G::Gemm gemm;
  const cutlass::Status can = gemm.can_implement(args);
  if (can != cutlass::Status::kSuccess) return std::string("CUTLASS can_implement: ") + cutlassGetStatusString(can);
  const size_t bytes = G::Gemm::get_workspace_size(args);
  auto workspace = at::empty({static_cast<int64_t>(std::max<size_t>(bytes, 1))},
                             at::TensorOptions().dtype(at::kByte).device(at::kCUDA, p.device));
  cutlass::Status st = gemm.initialize(args, workspace.data_ptr(), p.stream);
  if (st != cutlass::Status::kSuccess) return std::string("CUTLASS initialize: ") + cutlassGetStatusString(st);
  st = gemm.run(p.stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (st != cutlass::Status::kSuccess) return std::string("CUTLASS run: ") + cutlassGetStatusString(st);
  return "";
}

}  // namespace

std::string run_bf16(const Args& p) { return run<Bf16Gemm>(p); }

}  // namespace anvil::ops::int8sm90
