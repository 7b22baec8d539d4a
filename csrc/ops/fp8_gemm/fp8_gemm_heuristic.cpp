// Which Hopper configuration fp8_gemm runs, and with which scheduler arguments, in one place so the tuning
// round changes one table.
//
// The compiled configurations (one file each, fp8_gemm_sm90_<name>_<dtype>.cu):
//   coop_128x128_c1x2     cooperative 128x128x128, cluster 1x2, persistent, a scales M-major (TMA)
//                         bf16, fp16, fp32 out: the one every output dtype has
//   streamk_128x128_c2x1  the same tile, cluster 2x1, stream-K scheduler, a scales M-major            bf16
//   pingpong_64x128_c1x2  ping-pong 64x128x128, cluster 1x2, persistent, a scales K-major (cp.async)  bf16
//   streamk_128x128       cooperative 128x128x128, cluster 1x1, stream-K, a scales K-major            bf16
//   swapab_128x32         operands swapped (out^T = b a^T), cooperative 128(N)x32(M)x128, cluster 1x1,
//                         stream-K scheduler, a scales K-major                                       bf16
//   swapab_128x64         the same with 128(N)x64(M) tiles                                           bf16
//   grouped_128x128_c1x2  pointer-array grouped cooperative 128x128x128, cluster 1x2 (MoE)            bf16
//
// Selection (dense), from the sweep of 2026-11-23 on the H100 (scripts/fp8-sweep.sh; 132 SMs; the issue's
// six (N, K) at M = 1, 64, 128, 4096, 8192; docs/BENCHMARKS.md). Nt = ceil(N/128) weight tiles.
//   M <= 64    -> swapab_128x32: ceil(M/32) Nt tiles. Data-parallel, or split-K in s = round(SMs / (2
//                 tiles)) slices (2..4, at least 8 blocks of K each) when that is 2 or more (N = 2112 and
//                 4096 at M = 1, N = 2112 at M = 64), or in 2 when the tiles fill under half the SMs and K
//                 has 64 blocks or more (M = 1, N 7168, K 16384): the weight is streamed by s times as many
//                 SMs, against one reduction of the partial tiles (0.96x, 0.96x, 1.12x, 0.96x the best
//                 baseline; CUTLASS's own stream-K choice 0.82x, 0.82x, 1.01x, 1.00x; its unordered
//                 "atomic" reduction as fast or slower, and not deterministic). Data-parallel elsewhere:
//                 0.89-1.39x (M = 1, N 7168, K 2048: split-K 0.72x, data-parallel 0.89x).
//   M <= 128   -> swapab_128x32 when its ceil(M/32) Nt tiles fit one wave (N <= 4224 at M = 128: 1.14x,
//                 1.39x), else swapab_128x64 (half the tiles: 0.96-1.05x where swapab_128x32 needed two
//                 or more waves, 0.76-0.85x); both data-parallel. (streamk_128x128 won only N = 14336,
//                 0.93x against 0.91x: within the noise.)
//   128 < M and ceil(M/128) Nt < 4 x SMs -> streamk_128x128 (mid-size M; not re-measured in the sweep)
//   M < 2048   -> pingpong_64x128_c1x2 (not re-measured; at M >= 4096 it ran 0.5-0.8x, never pick it there)
//   otherwise  -> coop_128x128_c1x2, unless whole waves of its 128x128 tiles would leave the last wave
//                 short (tiles / (SMs x ceil(tiles / SMs)) < 0.93, N = 2112 at M = 4096 and 8192): then
//                 streamk_128x128_c2x1, whose stream-K tail spreads the last tiles' K over every SM
//                 (0.91x / 0.94x against 0.77x / 0.87x). Raster order and swizzle stay CUTLASS's defaults:
//                 the best of them per shape moved by less than the run-to-run noise (up to 0.16x between
//                 two timings of one kernel), and each lost badly somewhere (swizzle 8: 0.49x at N = 2112).
//                 2x1 clusters for every shape and K-major a scales (no transposing launch) measured within
//                 noise of coop_128x128_c1x2; tiles 128x192 / 64x192 (b's scales per 64 rows) do not
//                 compile in CUTLASS 4.2's block-scaled mainloop (fp8_accumulation.hpp shape assertion).
// falling back to coop_128x128_c1x2 where the preferred one is not compiled for the dtype.
// Grouped: grouped_128x128_c1x2 (the 2x1-cluster and ping-pong 64x128 variants ran 0.93-0.97x and 0.70x of
// it; raster N / swizzle 2, 4 within noise or slower).
//
// ANVIL_FP8_GEMM_CONFIG=<name> forces a configuration (bench/fp8_gemm.py --configs uses it); an unknown
// name is an error that lists the compiled ones. ANVIL_FP8_GEMM_GROUPED_CONFIG does the same for the
// grouped kernels. ANVIL_FP8_GEMM_SCHED overrides the scheduler's run-time arguments (SchedulerKnobs).
//
// The tuning sweep (cmake -DANVIL_FP8_GEMM_SWEEP=ON, scripts/fp8-sweep.sh) compiles candidate
// configurations beside these, listed under ANVIL_FP8_GEMM_SWEEP below (none between tuning rounds); the
// heuristic never picks them unless forced, so a sweep build measures them without changing the defaults.
#include "ops/fp8_gemm/fp8_gemm_sm90.h"

#include "anvil/ops.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <exception>

namespace anvil::ops::sm90 {

#ifdef ANVIL_WITH_SM90A
std::string run_coop_128x128_c1x2_bf16(const DenseArgs&);
std::string run_coop_128x128_c1x2_fp16(const DenseArgs&);
std::string run_coop_128x128_c1x2_fp32(const DenseArgs&);
std::string run_pingpong_64x128_c1x2_bf16(const DenseArgs&);
std::string run_streamk_128x128_bf16(const DenseArgs&);
std::string run_swapab_128x64_bf16(const DenseArgs&);
std::string run_grouped_128x128_c1x2_bf16(const GroupedArgs&);
std::string run_swapab_128x32_bf16(const DenseArgs&);
std::string run_streamk_128x128_c2x1_bf16(const DenseArgs&);
#ifdef ANVIL_FP8_GEMM_SWEEP
// Candidates, declared weak: scripts/fp8-sweep.sh leaves out one whose file fails to compile
// (ANVIL_FP8_GEMM_SWEEP_EXCLUDE) rather than lose the whole sweep; a missing one is a null pointer here
// and is not listed. E.g.  std::string run_coop_128x128_c2x1_bf16(const DenseArgs&) ANVIL_SWEEP_DECL;
#define ANVIL_SWEEP_DECL __attribute__((weak))
// (candidates' declarations here)
#undef ANVIL_SWEEP_DECL
#endif
#endif

// The list without the sweep candidates that were not built (null run pointers).
template <class Config>
std::vector<Config> built(std::vector<Config> all) {
  std::vector<Config> out;
  for (const auto& c : all)
    if (c.run) out.push_back(c);
  return out;
}

const std::vector<Sm90Config>& dense_configs() {
  static const std::vector<Sm90Config> configs = built<Sm90Config>({
#ifdef ANVIL_WITH_SM90A
      {"coop_128x128_c1x2", true, OutType::kBFloat16, &run_coop_128x128_c1x2_bf16},
      {"coop_128x128_c1x2", true, OutType::kHalf, &run_coop_128x128_c1x2_fp16},
      {"coop_128x128_c1x2", true, OutType::kFloat, &run_coop_128x128_c1x2_fp32},
      {"pingpong_64x128_c1x2", false, OutType::kBFloat16, &run_pingpong_64x128_c1x2_bf16},
      {"streamk_128x128", false, OutType::kBFloat16, &run_streamk_128x128_bf16},
      {"swapab_128x64", false, OutType::kBFloat16, &run_swapab_128x64_bf16},
      {"swapab_128x32", false, OutType::kBFloat16, &run_swapab_128x32_bf16},
      {"streamk_128x128_c2x1", true, OutType::kBFloat16, &run_streamk_128x128_c2x1_bf16},
#ifdef ANVIL_FP8_GEMM_SWEEP  // candidates: {"name", sfa_m_major, OutType::kBFloat16, &run_name_bf16},
#endif
#endif
  });
  return configs;
}

const std::vector<Sm90GroupedConfig>& grouped_configs() {
  static const std::vector<Sm90GroupedConfig> configs = built<Sm90GroupedConfig>({
#ifdef ANVIL_WITH_SM90A
      {"grouped_128x128_c1x2", OutType::kBFloat16, &run_grouped_128x128_c1x2_bf16},
#ifdef ANVIL_FP8_GEMM_SWEEP  // candidates
#endif
#endif
  });
  return configs;
}

const char* out_type_name(OutType t) {
  return t == OutType::kBFloat16 ? "bf16" : t == OutType::kHalf ? "fp16" : "fp32";
}

namespace {

const Sm90Config* find_dense(const std::string& name, OutType out) {
  for (const auto& c : dense_configs())
    if (name == c.name && c.out == out) return &c;
  return nullptr;
}

std::string dense_names(OutType out) {
  std::string s;
  for (const auto& c : dense_configs())
    if (c.out == out) s += (s.empty() ? "" : ", ") + std::string(c.name);
  return s.empty() ? "(none)" : s;
}

std::string forced_config(const char* var = "ANVIL_FP8_GEMM_CONFIG") {
  const char* env = std::getenv(var);
  return env && *env && std::string(env) != "auto" ? std::string(env) : std::string();
}

// ANVIL_FP8_GEMM_SCHED: comma-separated key=value pairs over the heuristic's knobs.
//   raster=auto|m|n  swizzle=1|2|4|8  mode=auto|dp|splitk|streamk  splits=1..64  reduce=ordered|atomic
void parse_knobs(const std::string& text, SchedulerKnobs* k) {
  const char* var = "ANVIL_FP8_GEMM_SCHED";
  size_t pos = 0;
  while (pos <= text.size()) {
    const size_t end = std::min(text.find(',', pos), text.size());
    const std::string item = text.substr(pos, end - pos);
    pos = end + 1;
    if (item.empty()) continue;
    const size_t eq = item.find('=');
    TORCH_CHECK(eq != std::string::npos, "anvil::fp8_gemm: ", var, " item '", item, "' is not key=value");
    const std::string key = item.substr(0, eq), val = item.substr(eq + 1);
    auto number = [&](int lo, int hi) {
      int v = 0;
      try {
        v = std::stoi(val);
      } catch (const std::exception&) {
        TORCH_CHECK(false, "anvil::fp8_gemm: ", var, " ", key, "='", val, "' is not a number");
      }
      TORCH_CHECK(v >= lo && v <= hi, "anvil::fp8_gemm: ", var, " ", key, "=", v, " is outside [", lo, ", ", hi, "]");
      return v;
    };
    if (key == "raster") {
      TORCH_CHECK(val == "auto" || val == "m" || val == "n", "anvil::fp8_gemm: ", var, " raster must be auto, m or n, got '", val, "'");
      k->raster = val == "m" ? 1 : val == "n" ? 2 : 0;
    } else if (key == "swizzle") {
      k->swizzle = number(1, 8);
      TORCH_CHECK((k->swizzle & (k->swizzle - 1)) == 0, "anvil::fp8_gemm: ", var, " swizzle must be 1, 2, 4 or 8");
    } else if (key == "mode") {
      TORCH_CHECK(val == "auto" || val == "dp" || val == "splitk" || val == "streamk", "anvil::fp8_gemm: ", var,
                  " mode must be auto, dp, splitk or streamk, got '", val, "'");
      k->mode = val == "dp" ? 1 : val == "splitk" ? 2 : val == "streamk" ? 3 : 0;
    } else if (key == "splits") {
      k->splits = number(1, 64);
    } else if (key == "reduce") {
      TORCH_CHECK(val == "ordered" || val == "atomic", "anvil::fp8_gemm: ", var, " reduce must be ordered or atomic");
      k->atomic_reduce = val == "atomic";
    } else {
      TORCH_CHECK(false, "anvil::fp8_gemm: ", var, " has an unknown key '", key,
                  "' (known: raster, swizzle, mode, splits, reduce)");
    }
  }
}

int64_t ceil_div64(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The fraction of SM slots that do work when `tiles` equal tiles run in whole waves over `sms` SMs.
double wave_efficiency(int64_t tiles, int64_t sms) {
  return double(tiles) / double(sms * ceil_div64(tiles, sms));
}

// The rule in the header comment (bf16; the caller falls back to coop_128x128_c1x2 for other dtypes).
const char* preferred_dense(int64_t m, int64_t n, int sm_count) {
  const int64_t sms = sm_count, nt = ceil_div64(n, 128);
  if (m <= 64) return "swapab_128x32";
  if (m <= 128) return ceil_div64(m, 32) * nt <= sms ? "swapab_128x32" : "swapab_128x64";
  const int64_t tiles = ceil_div64(m, 128) * nt;
  if (tiles < 4 * sms) return "streamk_128x128";
  if (m < 2048) return "pingpong_64x128_c1x2";
  return wave_efficiency(tiles, sms) < 0.93 ? "streamk_128x128_c2x1" : "coop_128x128_c1x2";
}

// The scheduler arguments the rule gives a configuration (CUTLASS's defaults unless said).
SchedulerKnobs preferred_knobs(int64_t m, int64_t n, int64_t k, const std::string& config, int sm_count) {
  SchedulerKnobs knobs;
  if (config == "swapab_128x32" || config == "swapab_128x64") {
    const int64_t tiles = ceil_div64(m, config == "swapab_128x32" ? 32 : 64) * ceil_div64(n, 128);
    const int64_t kb = ceil_div64(k, 128);
    // split-K in round(SMs / (2 tiles)) slices (2..4, >= 8 K blocks each) where that is >= 2 (tiles up to
    // a third of the SMs); 2 slices where the tiles fill under half the SMs and K is long (>= 64 blocks:
    // the reduction is then cheap against the K loop)
    int64_t splits = std::min<int64_t>(4, (int64_t(sm_count) + tiles) / (2 * tiles));
    if (splits < 2 && 2 * tiles <= int64_t(sm_count) && kb >= 64) splits = 2;
    while (splits > 1 && kb / splits < 8) --splits;
    knobs.mode = splits >= 2 ? 2 : 1;
    knobs.splits = int(std::max<int64_t>(splits, 1));
  }
  return knobs;
}

}  // namespace

const Sm90Config* choose_dense(int64_t m, int64_t n, int64_t /*k*/, OutType out, int sm_count) {
  const std::string forced = forced_config();
  if (!forced.empty()) {
    const Sm90Config* c = find_dense(forced, out);
    TORCH_CHECK(c, "anvil::fp8_gemm: ANVIL_FP8_GEMM_CONFIG='", forced, "' is not a compiled configuration for ",
                out_type_name(out), " output; compiled: ", dense_names(out));
    return c;
  }
  const char* preferred = preferred_dense(m, n, sm_count);
  if (const Sm90Config* c = find_dense(preferred, out)) return c;
  return find_dense("coop_128x128_c1x2", out);
}

const Sm90GroupedConfig* choose_grouped(OutType out) {
  const std::string forced = forced_config("ANVIL_FP8_GEMM_GROUPED_CONFIG");
  std::string names;
  for (const auto& c : grouped_configs()) {
    if (c.out != out) continue;
    if (forced.empty() || forced == c.name) return &c;
    names += (names.empty() ? "" : ", ") + std::string(c.name);
  }
  TORCH_CHECK(forced.empty(), "anvil::fp8_grouped_gemm: ANVIL_FP8_GEMM_GROUPED_CONFIG='", forced,
              "' is not a compiled grouped configuration for ", out_type_name(out), " output; compiled: ",
              names.empty() ? "(none)" : names);
  return nullptr;
}

SchedulerKnobs choose_knobs(int64_t m, int64_t n, int64_t k, const char* config, int sm_count) {
  SchedulerKnobs knobs = preferred_knobs(m, n, k, config, sm_count);
  if (const char* env = std::getenv("ANVIL_FP8_GEMM_SCHED")) parse_knobs(env, &knobs);
  return knobs;
}

}  // namespace anvil::ops::sm90

namespace anvil::ops {

std::vector<std::string> fp8_gemm_configs() {
  std::vector<std::string> names;
  for (const auto& c : sm90::dense_configs()) names.push_back(std::string(c.name) + ":" + sm90::out_type_name(c.out));
  for (const auto& c : sm90::grouped_configs())
    names.push_back(std::string(c.name) + ":" + sm90::out_type_name(c.out));
  return names;
}

#ifndef ANVIL_WITH_CUDA
std::string fp8_gemm_config(int64_t, int64_t, int64_t, at::ScalarType) { return ""; }
#endif

}  // namespace anvil::ops
