// What a run records: metrics.jsonl (one JSON object per logged step or evaluation), its loss plot, and
// the device's peak memory.
#pragma once

#include <ATen/Device.h>
#include <nlohmann/json.hpp>

#include <fstream>
#include <string>

namespace anvil::train {

/// Appends JSON lines to a file, flushed line by line (a killed run keeps every line it wrote).
class MetricsLog {
 public:
  explicit MetricsLog(const std::string& path);
  void write(const nlohmann::json& line);

 private:
  std::string path_;
  std::ofstream out_;
};

/// Keeps the lines of steps <= step (a resumed run rewrites what came after its checkpoint); atomic.
void truncate_metrics(const std::string& path, int64_t step);

/// The train "loss" and the "val_loss" lines of a metrics.jsonl as an SVG plot (anvil/train/plot.h).
void plot_metrics(const std::string& metrics_path, const std::string& svg_path, const std::string& title);

/// The peak of memory allocated on a CUDA device since the process started, in GiB; -1 for other devices.
double peak_memory_gib(at::Device device);

}  // namespace anvil::train
