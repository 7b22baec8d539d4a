// How one module of a quantized checkpoint becomes a Linear (private to csrc/model: the loader in transformer.cpp,
// and tests/fuzz/fuzz_quantized_checkpoint.cpp, which reaches Linear::set_quantized_weight's checks through it as a
// checkpoint does).
//   - compressed-tensors (anvil/model/compressed_tensors.h): a module whose scheme is one of the Linear weight
//     formats (anvil/model/attention.h) may keep its quantized weights as stored (`kept_format`): the module's
//     Linear is switched to that format and its tensors are handed to load_state under the format's own names
//     (weight, weight_scale(_inv), weight_zero_point), so no dense copy is made; any other is dequantized.
//   - FineGrainedFP8 (DeepSeek-V3's `weight` F8_E4M3 + `weight_scale_inv` (ceil(out/128), ceil(in/128))): an fp8
//     Linear with empty tensors of the stored shapes, which load_state then fills.
#pragma once

#include "anvil/io/safetensors.h"
#include "anvil/model/attention.h"
#include "anvil/model/compressed_tensors.h"

#include <ATen/core/Tensor.h>

#include <string>
#include <unordered_map>

namespace anvil::model {

/// Which compressed-tensors modules keep their quantized weights (load_causal_lm's base_weights and the device).
struct KeepRules {
  std::string base_weights;  ///< load_causal_lm's: "auto", "dense", or a format name
  bool fp8_gemm = false;     ///< the FP8 GEMM runs on the model's device
  bool cuda = false;         ///< the model's device is a GPU (int8_gemm's INT8 tensor cores)
};

/// The Linear format that holds a module's compressed-tensors tensors as stored, or "" (load it dense).
/// fp8: channel -> fp8-channel, tensor -> fp8-tensor, 128x128 blocks -> fp8 (DeepSeek-V3's layout; in % 128
/// for the GEMM's activation blocks); int8 symmetric per channel with int8 activations -> w8a8; weight-only
/// int8 / int4, per channel or group, zero points or not -> int8 / int4. Legacy act-order (g_idx) stays dense.
/// "auto" keeps the weight-only formats on every device, fp8 where the FP8 GEMM runs, w8a8 on a GPU; a format
/// name as base_weights keeps the modules of that format (elsewhere, load_causal_lm quantizes the dense ones).
std::string kept_format(const ct::Scheme& s, const std::string& format, const ct::ModuleTensors& t, int64_t in_features,
                        const KeepRules& rules);

/// One compressed-tensors module `name` (its tensors `used`, complete for `scheme` in `format`) into `out` as
/// load_state takes it: kept in its Linear's format when `linear` (null: the model has no such Linear) is dense
/// and kept_format names one (`name`.weight, .weight_scale or .weight_scale_inv, .weight_zero_point; the Linear
/// switched), else `name`.weight dense in `dtype`. Every shape, dtype and value range is checked as
/// ct::dequantize_module checks it, then by Linear::set_quantized_weight; errors name the module.
void load_compressed_module(Linear* linear, const ct::Scheme& scheme, const std::string& format,
                            const ct::ModuleTensors& used, at::ScalarType dtype, const std::string& name,
                            const KeepRules& rules, std::unordered_map<std::string, at::Tensor>& out);

/// A FineGrainedFP8 checkpoint's weight kept as stored: when `weight` is F8_E4M3 and `linear` is a dense 2-D
/// Linear with in_features % 128 == 0, `linear` becomes an fp8 Linear with empty tensors of the stored shapes
/// (set_quantized_weight checks them against the layer). Returns whether it did.
bool keep_fp8_weight(Linear& linear, const io::TensorEntry& weight, const io::TensorEntry& scale_inv);

}  // namespace anvil::model
