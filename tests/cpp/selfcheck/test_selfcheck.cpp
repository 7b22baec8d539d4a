// The self-check behind `anvil` covers every registered op and passes on this machine.
#include "anvil/selfcheck.h"

#include <gtest/gtest.h>

TEST(SelfCheck, CoversEveryOpAndPassesOnCpu) {
  const auto rows = anvil::run_selfcheck(/*cuda=*/false);
  ASSERT_FALSE(rows.empty());
  for (const auto& r : rows) EXPECT_NE(r.status, "unchecked") << r.op << " has no self-check case";
  EXPECT_TRUE(anvil::selfcheck_passed(rows)) << anvil::format_selfcheck(rows);
  const auto table = anvil::format_selfcheck(rows);
  EXPECT_NE(table.find("quantize_fp8[block1x128]"), std::string::npos);
}
