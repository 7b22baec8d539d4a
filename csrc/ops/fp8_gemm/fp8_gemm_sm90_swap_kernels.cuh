// The swapped-operand ("swap AB") Hopper FP8 GEMM for small M (decode): out^T (N, M) = b (N, K) a^T.
// With M = 1..64 tokens a 128-row tile over M would be mostly empty; swapping puts the weight's N on the
// tile's 128-row side and the few tokens on a narrow 64-column side, so a pipeline stage holds 24 KB
// instead of 32 KB (more stages in flight while streaming the weight, which bounds a small-M GEMM) and a
// stream-K partial tile is 128 x 64 instead of 128 x 128 (half the fix-up traffic).
//
// The same CUTLASS block-scaled mainloop as fp8_gemm_sm90_kernels.cuh, operands renamed:
//   kernel A = b (N, K) K-major, its scales 128 x 128 blocks: anvil's (Nb, Kb) as is (SFA granularity 128)
//   kernel B = a (M, K) K-major, its scales one per (row, 128-block): anvil's (M, Kb) (SFB granularity 1)
//   kernel D (N, M) column-major = out (M, N) row-major
// alpha (per-tensor / per-channel b scale) and bias are per kernel row: column broadcasts.
// Kept apart from fp8_gemm_sm90_kernels.cuh so that neither header's edits recompile the other's files.
#pragma once

#include "ops/fp8_gemm/fp8_gemm_sm90_kernels.cuh"

namespace anvil::ops::sm90 {

template <class Tile, class Cluster, class Scheduler, OutType kOut>
struct SwapAbGemm {
  using ElementA = cutlass::float_e4m3_t;
  using ElementB = cutlass::float_e4m3_t;
  using ElementD = typename OutElement<kOut>::type;
  using LayoutA = cutlass::layout::RowMajor;     // b (N, K): K-major
  using LayoutB = cutlass::layout::ColumnMajor;  // a (M, K) row-major is (K, M) column-major: K-major
  using LayoutD = cutlass::layout::ColumnMajor;  // D (N, M) column-major is out (M, N) row-major
  static constexpr int kAlignAB = 16;
  static constexpr int kAlignD = 128 / cutlass::sizeof_bits<ElementD>::value;

  using ScaleConfig = cutlass::detail::Sm90BlockwiseScaleConfig<128, 1, 128, cute::GMMA::Major::K, cute::GMMA::Major::K>;
  using LayoutSFA = decltype(ScaleConfig::deduce_layoutSFA());
  using LayoutSFB = decltype(ScaleConfig::deduce_layoutSFB());

  using Alpha = cutlass::epilogue::fusion::Sm90ColBroadcast<0, Tile, float, float, Stride<bool, _0, int64_t>>;
  using Bias = cutlass::epilogue::fusion::Sm90ColBroadcast<0, Tile, float, float, Stride<_1, _0, int64_t>>;
  using Fusion = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<cutlass::homogeneous_multiply_add, ElementD, float,
                                             cutlass::FloatRoundStyle::round_to_nearest>,
      Alpha, cutlass::epilogue::fusion::Sm90AccFetch, Bias>;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, LayoutD, kAlignD, ElementD, LayoutD,
      kAlignD, cutlass::epilogue::TmaWarpSpecializedCooperative, Fusion>::CollectiveOp;

  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementA, cute::tuple<LayoutA, LayoutSFA>, kAlignAB,
      ElementB, cute::tuple<LayoutB, LayoutSFB>, kAlignAB, float, Tile, Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperativeFP8BlockScaledAccum>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue, Scheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static std::string run(const DenseArgs& p) {
    if (p.sfa_m_major) return "scale layout of a does not match the configuration (K-major expected)";
    using StrideA = typename Kernel::StrideA;
    using StrideB = typename Kernel::StrideB;
    using StrideD = typename Kernel::StrideD;
    const int m = int(p.n), n = int(p.m), k = int(p.k);  // the kernel's problem: (N, M, K)
    const int32_t kb = int32_t((p.k + 127) / 128), nb = int32_t((p.n + 127) / 128);
    // kernel SFA: b's (Nb, Kb) with N-block stride sfb_ld (0 broadcasts one row of ones)
    const LayoutSFA sfa = make_layout(make_shape(make_shape(_128{}, nb), make_shape(_128{}, kb), int32_t(1)),
                                      make_stride(make_stride(_0{}, int32_t(p.sfb_ld)), make_stride(_0{}, _1{}),
                                                  int32_t(nb * kb)));
    // kernel SFB: a's (M, Kb), row stride sfa_ld
    const LayoutSFB sfb = make_layout(make_shape(make_shape(_1{}, int32_t(p.m)), make_shape(_128{}, kb), int32_t(1)),
                                      make_stride(make_stride(_0{}, int32_t(p.sfa_ld)), make_stride(_0{}, _1{}),
                                                  int32_t(p.sfa_ld * p.m)));
    cutlass::KernelHardwareInfo hw;
    hw.device_id = p.device;
    hw.sm_count = p.sm_count;
    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {m, n, k, 1},
        {static_cast<const ElementA*>(p.b), cutlass::make_cute_packed_stride(StrideA{}, make_shape(m, k, 1)),
         static_cast<const ElementB*>(p.a), cutlass::make_cute_packed_stride(StrideB{}, make_shape(n, k, 1)), p.sfb,
         sfa, p.sfa, sfb},
        {{},
         nullptr,
         cutlass::make_cute_packed_stride(StrideD{}, make_shape(m, n, 1)),
         static_cast<ElementD*>(p.out),
         cutlass::make_cute_packed_stride(StrideD{}, make_shape(m, n, 1))},
        hw};
    auto& f = args.epilogue.thread;  // {alpha, acc, bias, op}
    f = {{p.alpha, 1.0f, {p.alpha_is_vector, _0{}, 0}}, {}, {p.bias, 0.0f, {}}, {}};
    set_scheduler_args(args.scheduler, p.knobs);  // the kernel's M is out's N: raster "along M" walks N
    Gemm gemm;
    const cutlass::Status can = gemm.can_implement(args);
    if (can != cutlass::Status::kSuccess) return "CUTLASS can_implement: " + status_text(can);
    auto workspace = workspace_tensor(Gemm::get_workspace_size(args), p.device);
    cutlass::Status st = gemm.initialize(args, workspace.data_ptr(), p.stream);
    if (st != cutlass::Status::kSuccess) return "CUTLASS initialize: " + status_text(st);
    st = gemm.run(p.stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (st != cutlass::Status::kSuccess) return "CUTLASS run: " + status_text(st);
    return "";
  }
};

}  // namespace anvil::ops::sm90
