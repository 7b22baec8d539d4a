// metrics.jsonl, its plot and peak memory (include/anvil/train/metrics.h).
#include "anvil/train/metrics.h"

#include "anvil/io/fs.h"
#include "anvil/train/plot.h"

#if defined(ANVIL_WITH_CUDA)
#include <c10/cuda/CUDACachingAllocator.h>
#endif

#include <stdexcept>

namespace anvil::train {

using nlohmann::json;

MetricsLog::MetricsLog(const std::string& path) : path_(path), out_(path, std::ios::app) {
  if (!out_) throw std::runtime_error("cannot append to " + path);
}

void MetricsLog::write(const json& line) {
  out_ << line.dump() << "\n";
  out_.flush();
  if (!out_) throw std::runtime_error("cannot append to " + path_);
}

void truncate_metrics(const std::string& path, int64_t step) {
  if (!io::path_exists(path)) return;
  std::ifstream in(path);
  std::string kept, line;
  while (std::getline(in, line)) {
    const auto j = json::parse(line, nullptr, false);
    if (j.is_object() && j.contains("step") && j["step"].is_number_integer() && j["step"].get<int64_t>() <= step)
      kept += line + "\n";
  }
  io::write_text_atomically(path, kept);
}

void plot_metrics(const std::string& metrics, const std::string& svg, const std::string& title) {
  LossSeries train{"train", {}, false, "#1f77b4"}, val{"validation", {}, true, "#d62728"};
  std::ifstream in(metrics);
  std::string line;
  while (std::getline(in, line)) {
    const auto j = json::parse(line, nullptr, false);
    if (!j.is_object() || !j.contains("step")) continue;
    if (j.contains("loss")) train.xy.emplace_back(j["step"].get<double>(), j["loss"].get<double>());
    if (j.contains("val_loss")) val.xy.emplace_back(j["step"].get<double>(), j["val_loss"].get<double>());
  }
  write_loss_plot(svg, {train, val}, title);
}

double peak_memory_gib(at::Device device) {
#if defined(ANVIL_WITH_CUDA)
  if (device.is_cuda()) {
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device.index() < 0 ? 0 : device.index());
    return double(stats.allocated_bytes[0].peak) / double(1ull << 30);
  }
#endif
  (void)device;
  return -1;
}

}  // namespace anvil::train
