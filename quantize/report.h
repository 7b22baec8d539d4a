// What `anvil quantize` tells about a quantization: per-layer SQNR (worst first), sizes before and after, and on
// held-out text the perplexity of both models and the KL divergence of the quantized model's next-token
// distribution from the unquantized one's. Written as OUT/report.json and printed as a table.
//
// The "after" model computes as an engine serving the export does: its quantized weights are read back from the
// written files and dequantized exactly (q * scale in fp32, rounded once to the model dtype), and every quantized
// Linear quantizes its input activations the way the scheme says (dynamic per token, per 1x128 block or per tensor)
// before the product. So the figures are those of the bytes a user ships, not of the in-memory copy.
#pragma once

#include "anvil/data/tokenizer.h"
#include "anvil/model/transformer.h"
#include "quantize/calibrate.h"

#include <nlohmann/json.hpp>

#include <memory>
#include <string>
#include <vector>

namespace anvil::quantize {

/// Token windows of `seq_len` ids (1-D int64) from a JSONL file of examples (text, prompt/completion, messages or
/// ids; each ends with eos), concatenated and cut; at most `max_windows` (0: all). `key` names the config key in
/// errors: a missing file or one with no usable row is an error naming it.
std::vector<at::Tensor> read_token_windows(const std::string& path, const data::Tokenizer& tok, int64_t seq_len,
                                           int64_t max_windows, int64_t vocab_size, const std::string& key);

/// The unquantized model at `source_dir` with the quantized weights of the export at `export_dir` (format "fp8" or
/// "compressed-tensors") dequantized into it and the scheme's activation quantization on each of those Linears.
std::shared_ptr<model::CausalLM> load_export_for_eval(const std::string& source_dir, const std::string& export_dir,
                                                      const std::string& format, const Scheme& scheme,
                                                      at::ScalarType dtype, at::Device device);

struct EvalFigures {
  int64_t tokens = 0;
  double nll_before = 0, nll_after = 0, kl = 0;  ///< means per predicted token (nats)
  double ppl_before() const;
  double ppl_after() const;
  double ppl_increase_pct() const;
};

/// Perplexity of both models and mean KL(before || after) over the windows.
EvalFigures evaluate_pair(model::CausalLM& before, model::CausalLM& after, const std::vector<at::Tensor>& windows);

/// report.json's object.
nlohmann::json report_json(const std::string& scheme, const std::string& format, const StreamResult& r,
                           const EvalFigures* eval);

/// The printed table (worst layers first, at most `rows` of them) and the summary lines.
std::string format_report(const nlohmann::json& report, size_t rows = 12);

}  // namespace anvil::quantize
