// libFuzzer target for one module of a quantized checkpoint as the loader takes it (csrc/model/quantized_modules.cpp,
// which transformer.cpp's loader calls per module): compressed-tensors (csrc/model/compressed_tensors.cpp: the
// quantization_config, then ct::dequantize_module's unpacking of weight_packed at weight_shape, the scale and zero
// point shapes, act-order g_idx) and, where the scheme is a Linear weight format, the module kept quantized through
// model::Linear::set_quantized_weight's checks (attention.cpp; its products, which need the ops library, are dropped
// by the linker: GC_SECTIONS); and a FineGrainedFP8 weight (F8_E4M3 `weight` + `weight_scale_inv`) kept as an fp8
// Linear. The module's tensors come from a safetensors file in the input (the header parser is compiled in too).
// An input: byte 0 picks the mode (bit 7 set: FineGrainedFP8, else compressed-tensors) and the Linear's (out, in)
// (bits 0-2, from kShapes); compressed-tensors: the quantization_config object's JSON, kSeparator, the module's
// tensors (local names: weight_packed, weight_shape, weight_scale, ...); FineGrainedFP8: the tensors (weight,
// weight_scale_inv). Refusals are c10::Error / std::invalid_argument / std::runtime_error; a kept module must hold
// the Linear's shape. Any other exception, a crash, a sanitizer report or an allocation over the limit (a hostile
// shape that makes the reader allocate what the file does not hold) is a finding.
#include "anvil/io/safetensors.h"
#include "anvil/model/compressed_tensors.h"
#include "model/quantized_modules.h"

#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <unordered_map>

namespace {

namespace ct = anvil::model::ct;
using anvil::model::Linear;

const std::string kSeparator = "\n@@anvil-tensors@@\n";
constexpr int64_t kShapes[8][2] = {{4, 8}, {8, 32}, {16, 128}, {128, 256}, {3, 7}, {256, 128}, {1, 1}, {32, 384}};
const std::string kModule = "model.layers.0.mlp.down_proj";

// The tensors of a safetensors file held in memory, by name (copies: the input's bytes need no alignment).
ct::ModuleTensors read_tensors(const std::string& bytes, anvil::io::SafetensorsHeader& header) {
  header = anvil::io::parse_safetensors_header(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), "fuzz");
  const char* section = bytes.data() + 8 + header.header_bytes;
  ct::ModuleTensors out;
  for (const auto& e : header.entries) {
    auto t = at::empty(e.shape, e.dtype);
    if (e.end > e.begin) std::memcpy(t.data_ptr(), section + e.begin, e.end - e.begin);
    out[e.name] = t;
  }
  return out;
}

void check_kept(const Linear& linear, int64_t out, int64_t in) {
  if (linear.weight_format().empty()) return;
  if (linear.weight.dim() != 2 || linear.weight.size(0) != out || linear.weight.size(1) != in) std::abort();
  if (!linear.weight_scale.defined() || linear.weight_scale.scalar_type() != at::kFloat) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const bool fp8 = data[0] & 0x80;
  const int64_t out = kShapes[data[0] & 7][0], in = kShapes[data[0] & 7][1];
  const std::string body(reinterpret_cast<const char*>(data) + 1, size - 1);
  try {
    anvil::io::SafetensorsHeader header;
    if (fp8) {
      (void)read_tensors(body, header);
      const anvil::io::TensorEntry *w = nullptr, *s = nullptr;
      for (const auto& e : header.entries) {
        if (e.name == "weight") w = &e;
        if (e.name == "weight_scale_inv") s = &e;
      }
      if (w == nullptr || s == nullptr) return 0;
      Linear linear(in, out, false, at::kFloat);
      if (anvil::model::keep_fp8_weight(linear, *w, *s)) check_kept(linear, out, in);
      return 0;
    }
    const size_t cut = body.find(kSeparator);
    if (cut == std::string::npos) return 0;
    const auto j = nlohmann::json::parse(body.substr(0, cut), nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded()) return 0;
    const ct::Config config = ct::parse_quantization_config(j);
    const auto hit = ct::scheme_for(config, kModule, {"Linear"});
    if (!hit) return 0;
    const ct::Scheme& scheme = *hit->second;
    const std::string format = ct::effective_format(config, scheme);
    const auto tensors = read_tensors(body.substr(cut + kSeparator.size()), header);
    // As the loader: the scheme's tensors must all be there (it names the missing ones), g_idx is taken too.
    ct::ModuleTensors used;
    for (const auto& k : ct::required_keys("", scheme, format)) {
      auto it = tensors.find(k);
      if (it == tensors.end()) return 0;
      used[k] = it->second;
    }
    if (auto it = tensors.find("weight_g_idx"); it != tensors.end()) used["weight_g_idx"] = it->second;
    for (const auto& rules : {anvil::model::KeepRules{"auto", true, true}, anvil::model::KeepRules{"dense", false, false}}) {
      Linear linear(in, out, false, at::kFloat);
      std::unordered_map<std::string, at::Tensor> loaded;
      anvil::model::load_compressed_module(&linear, scheme, format, used, at::kFloat, kModule, rules, loaded);
      const auto& w = loaded.at(kModule + ".weight");
      if (!w.defined() || w.dim() != 2) std::abort();
      check_kept(linear, out, in);
    }
  } catch (const c10::Error&) {
  } catch (const std::invalid_argument&) {
  } catch (const std::runtime_error&) {
    // clean refusals
  }
  return 0;
}
