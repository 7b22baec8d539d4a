// The progress line of include/anvil/train/progress.h. The ETA is the remaining work at the average
// rate so far (steady for the regular work anvil does: evaluation windows, training steps).
#include "anvil/train/progress.h"

#include <ATen/Context.h>
#include <c10/core/Device.h>

#if defined(ANVIL_WITH_CUDA)
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <cuda_runtime_api.h>
#endif

#include <unistd.h>

#include <cmath>

namespace anvil::train {

Progress::Progress(std::string label, int64_t total, std::string unit, FILE* stream, double interval)
    : label_(std::move(label)),
      unit_(std::move(unit)),
      total_(total),
      stream_(stream),
      interval_(interval),
      tty_(isatty(fileno(stream)) != 0),
      start_(std::chrono::steady_clock::now()),
      last_print_(start_ - std::chrono::hours(1)) {}

double Progress::elapsed() const {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
}

std::string Progress::format_duration(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  char buf[32];
  const auto t = static_cast<int64_t>(s + 0.5);
  if (t >= 3600) {
    std::snprintf(buf, sizeof(buf), "%lldh%02lldm", static_cast<long long>(t / 3600),
                  static_cast<long long>(t % 3600 / 60));
  } else if (t >= 60) {
    std::snprintf(buf, sizeof(buf), "%lldm%02llds", static_cast<long long>(t / 60), static_cast<long long>(t % 60));
  } else {
    std::snprintf(buf, sizeof(buf), "%llds", static_cast<long long>(t));
  }
  return buf;
}

std::string Progress::line(int64_t done, const std::vector<std::pair<std::string, std::string>>& fields,
                           int64_t rate_units) const {
  const double secs = std::max(elapsed(), 1e-9);
  std::string out = label_ + " ";
  char buf[96];
  if (total_ > 0) {
    std::snprintf(buf, sizeof(buf), "%lld/%lld %s (%.0f%%)", static_cast<long long>(done),
                  static_cast<long long>(total_), unit_.c_str(), 100.0 * double(done) / double(total_));
  } else {
    std::snprintf(buf, sizeof(buf), "%lld %s", static_cast<long long>(done), unit_.c_str());
  }
  out += buf;
  for (const auto& [k, v] : fields) out += " | " + k + " " + v;
  const double units = rate_units >= 0 ? double(rate_units) : double(done - done_start_);
  std::snprintf(buf, sizeof(buf), " | %.1f %s/s", units / secs, rate_units >= 0 ? "tok" : unit_.c_str());
  out += buf;
  out += " | " + format_duration(secs);
  if (total_ > 0 && done > done_start_ && done < total_)
    out += " elapsed, ETA " + format_duration(secs * double(total_ - done) / double(done - done_start_));
  return out;
}

void Progress::update(int64_t done, const std::vector<std::pair<std::string, std::string>>& fields,
                      int64_t rate_units) {
  done_ = done;
  const auto now = std::chrono::steady_clock::now();
  const double since = std::chrono::duration<double>(now - last_print_).count();
  if (since < (tty_ ? 0.1 : interval_)) return;
  last_print_ = now;
  const std::string text = line(done, fields, rate_units);
  if (tty_) {
    const size_t pad = last_width_ > text.size() ? last_width_ - text.size() : 0;
    std::fprintf(stream_, "\r%s%*s", text.c_str(), static_cast<int>(pad), "");
    last_width_ = text.size();
  } else {
    std::fprintf(stream_, "%s\n", text.c_str());
  }
  std::fflush(stream_);
}

void Progress::finish(const std::vector<std::pair<std::string, std::string>>& fields, int64_t rate_units) {
  const std::string text = line(done_, fields, rate_units);
  if (tty_) {
    const size_t pad = last_width_ > text.size() ? last_width_ - text.size() : 0;
    std::fprintf(stream_, "\r%s%*s\n", text.c_str(), static_cast<int>(pad), "");
  } else {
    std::fprintf(stream_, "%s\n", text.c_str());
  }
  std::fflush(stream_);
}

std::string cuda_memory_text() {
#if defined(ANVIL_WITH_CUDA)
  if (!at::hasCUDA()) return "";
  const auto dev = c10::cuda::current_device();
  const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(dev);
  const double gib = 1024.0 * 1024.0 * 1024.0;
  size_t free_b = 0, total_b = 0;
  if (cudaMemGetInfo(&free_b, &total_b) != cudaSuccess) return "";
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.1f GiB of %.1f GiB",
                double(stats.allocated_bytes[0].current) / gib, double(total_b) / gib);
  return buf;
#else
  return "";
#endif
}

}  // namespace anvil::train
