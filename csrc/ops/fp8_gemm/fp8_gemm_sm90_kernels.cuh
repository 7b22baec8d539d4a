// The Hopper (sm_90a) FP8 GEMMs, built on CUTLASS 4.2's warp-specialized block-scaled mainloop
// (cutlass/gemm/collective/sm90_mma_tma_gmma_ss_warpspecialized_fp8_blockwise_scaling.hpp): a producer
// warp loads A and B tiles with TMA (multicast across a cluster) and the scales with TMA or cp.async into
// a ring of shared-memory stages; one or two consumer warpgroups run FP8 WGMMA into a temporary FP32
// accumulator and, after every 128 of K (4 WGMMAs of k = 32), promote it into the main FP32 accumulator
// multiplied by the two scales of that 128-block: DeepSeek-V3's fix for the ~14-bit accumulation of the
// FP8 tensor cores (arXiv 2412.19437, 3.3.2). A persistent tile scheduler (or stream-K for few tiles)
// keeps every SM busy; the epilogue multiplies by an optional per-channel / per-tensor alpha, adds an
// optional bias and stores D through TMA.
//
// One template, instantiated once per configuration in its own file (fp8_gemm_sm90_<name>.cu): each
// instantiation costs ~75 s and 4-5 GB of memory to compile, so files let CI and ccache parallelise, and
// the configurations are exactly the ones the heuristic (fp8_gemm_heuristic.cpp) can select.
//
// Layouts and the meaning of every argument: fp8_gemm_sm90.h.
#pragma once

#include "ops/fp8_gemm/fp8_gemm_sm90.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/detail/blockwise_scale_layout.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/dispatch_policy.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/gemm/kernel/tile_scheduler.hpp"
#include "cutlass/numeric_types.h"
#include "cutlass/util/packed_stride.hpp"

#include <mutex>
#include <string>

namespace anvil::ops::sm90 {

using namespace cute;

template <OutType kOut>
struct OutElement;
template <>
struct OutElement<OutType::kBFloat16> {
  using type = cutlass::bfloat16_t;
};
template <>
struct OutElement<OutType::kHalf> {
  using type = cutlass::half_t;
};
template <>
struct OutElement<OutType::kFloat> {
  using type = float;
};

inline std::string status_text(cutlass::Status s) { return cutlass::cutlassGetStatusString(s); }

// A workspace from torch's caching allocator on the current device (stream-ordered, CUDA-graph safe).
inline at::Tensor workspace_tensor(size_t bytes, int device) {
  return at::empty({static_cast<int64_t>(std::max<size_t>(bytes, 1))},
                   at::TensorOptions().dtype(at::kByte).device(at::kCUDA, device));
}

// The run-time scheduler arguments (fp8_gemm_sm90.h, SchedulerKnobs) into CUTLASS's: raster order and
// swizzle for every persistent scheduler; the decomposition, splits and reduction mode where the scheduler
// is stream-K's (detected by its decomposition_mode member).
template <class T, class = void>
struct HasDecomposition : std::false_type {};
template <class T>
struct HasDecomposition<T, std::void_t<decltype(std::declval<T&>().decomposition_mode)>> : std::true_type {};

template <class SchedulerArgs>
void set_scheduler_args(SchedulerArgs& s, const SchedulerKnobs& k, bool keep_default_raster = false) {
  using Raster = decltype(s.raster_order);
  if (k.raster == 1) s.raster_order = Raster::AlongM;
  else if (k.raster == 2) s.raster_order = Raster::AlongN;
  else if (!keep_default_raster) s.raster_order = Raster::Heuristic;
  s.max_swizzle_size = k.swizzle;
  if constexpr (HasDecomposition<SchedulerArgs>::value) {
    using Mode = decltype(s.decomposition_mode);
    using Reduce = decltype(s.reduction_mode);
    s.decomposition_mode = k.mode == 1 ? Mode::DataParallel : k.mode == 2 ? Mode::SplitK
                           : k.mode == 3 ? Mode::StreamK : Mode::Heuristic;
    s.splits = k.mode == 2 ? k.splits : 1;
    s.reduction_mode = k.atomic_reduce ? Reduce::Nondeterministic : Reduce::Deterministic;
  }
}

// ---- dense ------------------------------------------------------------------------------------------
// Tile: CTA tile (M, N, K = 128, the scale block); Cluster: CTAs sharing TMA multicasts; Schedule: the
// kernel schedule (cooperative: 2 consumer warpgroups split one tile; pingpong: each owns a tile, so
// one's epilogue overlaps the other's mainloop); Scheduler: void (persistent) or StreamKScheduler;
// kSfaMMajor: a's scales M-major (TMA-loaded; the launcher transposes them) or K-major (cp.async;
// anvil's (M, Kb) layout as is).
template <class Tile, class Cluster, class Schedule, class EpilogueSchedule, class Scheduler, bool kSfaMMajor,
          OutType kOut>
struct DenseGemm {
  using ElementA = cutlass::float_e4m3_t;
  using ElementB = cutlass::float_e4m3_t;
  using ElementD = typename OutElement<kOut>::type;
  using LayoutA = cutlass::layout::RowMajor;      // a (M, K): K-major
  using LayoutB = cutlass::layout::ColumnMajor;   // b (N, K) row-major is B (K, N) column-major: K-major
  using LayoutD = cutlass::layout::RowMajor;      // out (M, N)
  static constexpr int kAlignAB = 16;             // elements of 16 bytes (TMA)
  static constexpr int kAlignD = 128 / cutlass::sizeof_bits<ElementD>::value;

  using ScaleConfig = cutlass::detail::Sm90BlockwiseScaleConfig<1, 128, 128,
                                                                kSfaMMajor ? cute::GMMA::Major::MN : cute::GMMA::Major::K,
                                                                cute::GMMA::Major::K>;
  using LayoutSFA = decltype(ScaleConfig::deduce_layoutSFA());
  using LayoutSFB = decltype(ScaleConfig::deduce_layoutSFB());

  // D = alpha * acc + bias. alpha: a scalar or an (N) vector chosen at run time (bool stride), 1 when null;
  // bias: an (N) vector, 0 when null. No source C is read.
  using Alpha = cutlass::epilogue::fusion::Sm90RowBroadcast<0, Tile, float, float, Stride<_0, bool, int64_t>>;
  using Bias = cutlass::epilogue::fusion::Sm90RowBroadcast<0, Tile, float, float, Stride<_0, _1, int64_t>>;
  using Fusion = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<cutlass::homogeneous_multiply_add, ElementD, float,
                                             cutlass::FloatRoundStyle::round_to_nearest>,
      Alpha, cutlass::epilogue::fusion::Sm90AccFetch, Bias>;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, LayoutD, kAlignD, ElementD, LayoutD,
      kAlignD, EpilogueSchedule, Fusion>::CollectiveOp;

  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementA, cute::tuple<LayoutA, LayoutSFA>, kAlignAB,
      ElementB, cute::tuple<LayoutB, LayoutSFB>, kAlignAB, float, Tile, Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename Epilogue::SharedStorage))>,
      Schedule>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue, Scheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static LayoutSFA layout_sfa(const DenseArgs& p) {
    const int32_t m = int32_t(p.m), kb = int32_t((p.k + 127) / 128), ld = int32_t(p.sfa_ld);
    if constexpr (kSfaMMajor) {  // (Kb, M) with column stride ld
      return make_layout(make_shape(make_shape(_1{}, m), make_shape(_128{}, kb), int32_t(1)),
                         make_stride(make_stride(_0{}, _1{}), make_stride(_0{}, ld), int32_t(ld * kb)));
    } else {  // (M, Kb) with row stride ld
      return make_layout(make_shape(make_shape(_1{}, m), make_shape(_128{}, kb), int32_t(1)),
                         make_stride(make_stride(_0{}, ld), make_stride(_0{}, _1{}), int32_t(ld * m)));
    }
  }

  static LayoutSFB layout_sfb(const DenseArgs& p) {
    const int32_t nb = int32_t((p.n + 127) / 128), kb = int32_t((p.k + 127) / 128), ld = int32_t(p.sfb_ld);
    return make_layout(make_shape(make_shape(_128{}, nb), make_shape(_128{}, kb), int32_t(1)),
                       make_stride(make_stride(_0{}, ld), make_stride(_0{}, _1{}), int32_t(nb * kb)));
  }

  static typename Gemm::Arguments arguments(const DenseArgs& p) {
    using StrideA = typename Kernel::StrideA;
    using StrideB = typename Kernel::StrideB;
    using StrideD = typename Kernel::StrideD;
    const int m = int(p.m), n = int(p.n), k = int(p.k);
    cutlass::KernelHardwareInfo hw;
    hw.device_id = p.device;
    hw.sm_count = p.sm_count;
    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {m, n, k, 1},
        {static_cast<const ElementA*>(p.a), cutlass::make_cute_packed_stride(StrideA{}, make_shape(m, k, 1)),
         static_cast<const ElementB*>(p.b), cutlass::make_cute_packed_stride(StrideB{}, make_shape(n, k, 1)), p.sfa,
         layout_sfa(p), p.sfb, layout_sfb(p)},
        {{},
         nullptr,
         cutlass::make_cute_packed_stride(StrideD{}, make_shape(m, n, 1)),
         static_cast<ElementD*>(p.out),
         cutlass::make_cute_packed_stride(StrideD{}, make_shape(m, n, 1))},
        hw};
    auto& f = args.epilogue.thread;  // {alpha, acc, bias, op}
    f = {{p.alpha, 1.0f, {_0{}, p.alpha_is_vector, 0}}, {}, {p.bias, 0.0f, {}}, {}};
    set_scheduler_args(args.scheduler, p.knobs);
    return args;
  }

  static std::string run(const DenseArgs& p) {
    if (p.sfa_m_major != kSfaMMajor) return "scale layout of a does not match the configuration";
    auto args = arguments(p);
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

// ---- grouped (MoE) ----------------------------------------------------------------------------------
// CUTLASS's pointer-array grouped GEMM: one problem per expert, its shape, operand pointers, strides and
// scale layouts written on the device by grouped_setup_kernel from the offsets / masked counts (so no
// host synchronisation), and a persistent scheduler walking the tiles of all experts; an expert with no
// rows has no tiles. The tensor maps are rewritten in place per expert (CUTLASS's tensormap update).
template <class Tile, class Cluster, class Schedule, class EpilogueSchedule, OutType kOut>
struct GroupedGemm {
  using ElementA = cutlass::float_e4m3_t;
  using ElementB = cutlass::float_e4m3_t;
  using ElementD = typename OutElement<kOut>::type;
  using LayoutA = cutlass::layout::RowMajor;
  using LayoutB = cutlass::layout::ColumnMajor;
  using LayoutD = cutlass::layout::RowMajor;
  static constexpr int kAlignAB = 16;
  static constexpr int kAlignD = 128 / cutlass::sizeof_bits<ElementD>::value;
  using ProblemShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;

  using ScaleConfig = cutlass::detail::Sm90BlockwiseScaleConfig<1, 128, 128, cute::GMMA::Major::K, cute::GMMA::Major::K>;
  using LayoutSFA = decltype(ScaleConfig::deduce_layoutSFA());
  using LayoutSFB = decltype(ScaleConfig::deduce_layoutSFB());

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, LayoutD*, kAlignD, ElementD, LayoutD*,
      kAlignD, EpilogueSchedule, cutlass::epilogue::fusion::LinearCombination<ElementD, float, void, float>>::CollectiveOp;

  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementA, cute::tuple<LayoutA*, LayoutSFA*>, kAlignAB,
      ElementB, cute::tuple<LayoutB*, LayoutSFB*>, kAlignAB, float, Tile, Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename Epilogue::SharedStorage))>,
      Schedule>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;
  using Shape3 = typename ProblemShape::UnderlyingProblemShape;

  // The per-expert arrays, carved out of one device buffer.
  struct Arrays {
    Shape3* shapes;
    const ElementA** a;
    const ElementB** b;
    const float** sfa;
    const float** sfb;
    ElementD** d;
    StrideA* stride_a;
    StrideB* stride_b;
    StrideD* stride_d;
    LayoutSFA* layout_sfa;
    LayoutSFB* layout_sfb;
  };

  static size_t align16(size_t x) { return (x + 15) / 16 * 16; }

  static Arrays carve(uint8_t* base, int64_t e, size_t* total) {
    size_t off = 0;
    auto take = [&](size_t bytes) {
      uint8_t* p = base ? base + off : nullptr;
      off += align16(bytes);
      return p;
    };
    Arrays r;
    r.shapes = reinterpret_cast<Shape3*>(take(sizeof(Shape3) * e));
    r.a = reinterpret_cast<const ElementA**>(take(sizeof(void*) * e));
    r.b = reinterpret_cast<const ElementB**>(take(sizeof(void*) * e));
    r.sfa = reinterpret_cast<const float**>(take(sizeof(void*) * e));
    r.sfb = reinterpret_cast<const float**>(take(sizeof(void*) * e));
    r.d = reinterpret_cast<ElementD**>(take(sizeof(void*) * e));
    r.stride_a = reinterpret_cast<StrideA*>(take(sizeof(StrideA) * e));
    r.stride_b = reinterpret_cast<StrideB*>(take(sizeof(StrideB) * e));
    r.stride_d = reinterpret_cast<StrideD*>(take(sizeof(StrideD) * e));
    r.layout_sfa = reinterpret_cast<LayoutSFA*>(take(sizeof(LayoutSFA) * e));
    r.layout_sfb = reinterpret_cast<LayoutSFB*>(take(sizeof(LayoutSFB) * e));
    if (total) *total = off;
    return r;
  }

  static std::string run(const GroupedArgs& p);
};

// One thread per expert: where its rows are, and everything CUTLASS needs to find them.
template <class G>
__global__ void grouped_setup_kernel(GroupedArgs p, typename G::Arrays arr) {
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= p.experts) return;
  int64_t row0, rows;
  if (p.masked_m) {
    row0 = e * p.capacity;
    rows = min(max(int64_t(p.masked_m[e]), int64_t(0)), p.capacity);
  } else {
    row0 = min(max(int64_t(p.offsets[e]), int64_t(0)), p.rows);
    const int64_t row1 = min(max(int64_t(p.offsets[e + 1]), row0), p.rows);
    rows = row1 - row0;
  }
  const int m = int(rows), n = int(p.n), k = int(p.k);
  const int64_t kb = (p.k + 127) / 128, nb = (p.n + 127) / 128;
  arr.shapes[e] = typename G::Shape3(m, n, k);
  arr.a[e] = static_cast<const typename G::ElementA*>(p.a) + row0 * p.k;
  arr.b[e] = static_cast<const typename G::ElementB*>(p.b) + e * p.n * p.k;
  arr.sfa[e] = p.sfa + row0 * kb;
  arr.sfb[e] = p.sfb + e * nb * kb;
  arr.d[e] = static_cast<typename G::ElementD*>(p.out) + row0 * p.n;
  arr.stride_a[e] = cutlass::make_cute_packed_stride(typename G::StrideA{}, make_shape(m, k, 1));
  arr.stride_b[e] = cutlass::make_cute_packed_stride(typename G::StrideB{}, make_shape(n, k, 1));
  arr.stride_d[e] = cutlass::make_cute_packed_stride(typename G::StrideD{}, make_shape(m, n, 1));
  arr.layout_sfa[e] = G::ScaleConfig::tile_atom_to_shape_SFA(make_shape(m, n, k, 1));
  arr.layout_sfb[e] = G::ScaleConfig::tile_atom_to_shape_SFB(make_shape(m, n, k, 1));
}

template <class Tile, class Cluster, class Schedule, class EpilogueSchedule, OutType kOut>
std::string GroupedGemm<Tile, Cluster, Schedule, EpilogueSchedule, kOut>::run(const GroupedArgs& p) {
  using G = GroupedGemm<Tile, Cluster, Schedule, EpilogueSchedule, kOut>;
  size_t bytes = 0;
  carve(nullptr, p.experts, &bytes);
  auto buffer = workspace_tensor(bytes, p.device);
  const Arrays arr = carve(static_cast<uint8_t*>(buffer.data_ptr()), p.experts, nullptr);
  const int threads = 128;
  grouped_setup_kernel<G><<<int((p.experts + threads - 1) / threads), threads, 0, p.stream>>>(p, arr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  cutlass::KernelHardwareInfo hw;
  hw.device_id = p.device;
  hw.sm_count = p.sm_count;
  typename Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGrouped,
      {int(p.experts), arr.shapes, nullptr},  // no host shapes: the scheduler reads them on the device
      {arr.a, arr.stride_a, arr.b, arr.stride_b, arr.sfa, arr.layout_sfa, arr.sfb, arr.layout_sfb},
      {{}, nullptr, nullptr, arr.d, arr.stride_d},
      hw};
  auto& f = args.epilogue.thread;
  f.alpha = 1.0f;
  f.beta = 0.0f;
  // The grouped scheduler keeps its own default raster (along M) unless one is asked for: CUTLASS applies
  // no heuristic across groups.
  set_scheduler_args(args.scheduler, p.knobs, /*keep_default_raster=*/true);
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

}  // namespace anvil::ops::sm90
