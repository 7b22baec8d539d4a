// The op self-check behind `anvil` (no subcommand) and `anvil selfcheck`: every registered anvil op
// runs on fresh random data on the CPU and, when one is present, on the GPU, and is compared with
// its formula (CPU) and with the CPU result (GPU). An op registered without a check is reported too,
// so the table always covers every op the library holds.
#pragma once

#include <string>
#include <vector>

namespace anvil {

struct SelfCheckRow {
  std::string op;       // e.g. "quantize_fp8[block1x128]"
  std::string device;   // "cpu" or "cuda"
  std::string status;   // "ok", "FAIL", "skip" (no GPU), "unchecked" (registered, no check exists)
  std::string detail;   // what was compared and the measured error
  double ms = 0.0;      // wall time of the op call (one call after a warm-up; a sanity figure, not a benchmark)
};

/// Runs every check; `cuda` false skips the GPU even when one is present.
std::vector<SelfCheckRow> run_selfcheck(bool cuda = true);

/// A fixed-width table of the rows and a last line "N ok, M failed, ...".
std::string format_selfcheck(const std::vector<SelfCheckRow>& rows);

/// True when no row failed and none is unchecked.
bool selfcheck_passed(const std::vector<SelfCheckRow>& rows);

}  // namespace anvil
