// A progress line for long work (evaluation, generation, training): done/total, rate, ETA and any
// fields the caller adds (loss, lr, GPU memory). On a terminal it redraws one line in place; elsewhere
// (a log file, CI) it prints a plain line at most every `interval` seconds, and always the last one.
#pragma once

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>
#include <utility>
#include <vector>

namespace anvil::train {

class Progress {
 public:
  /// total: units of work (0: unknown, no ETA); unit: what a unit is ("tok", "docs", "steps").
  /// stream: where to print (stderr by default, so stdout stays the command's result).
  Progress(std::string label, int64_t total, std::string unit, FILE* stream = stderr, double interval = 10.0);

  /// Sets the work done so far and redraws (on a terminal at most 10 times a second).
  /// rate_units counts what the rate is of (e.g. tokens while done counts documents); < 0: done itself.
  void update(int64_t done, const std::vector<std::pair<std::string, std::string>>& fields = {},
              int64_t rate_units = -1);

  /// Prints the final line (and a newline on a terminal).
  void finish(const std::vector<std::pair<std::string, std::string>>& fields = {}, int64_t rate_units = -1);

  /// Work already done before this run (a resumed training run): the rate and ETA count only the
  /// work done since, while the line still shows done/total.
  void resume_from(int64_t done) { done_start_ = done; }

  /// Seconds since construction.
  double elapsed() const;

  /// "1h02m", "3m05s", "12s".
  static std::string format_duration(double seconds);

 private:
  std::string line(int64_t done, const std::vector<std::pair<std::string, std::string>>& fields,
                   int64_t rate_units) const;

  std::string label_, unit_;
  int64_t total_;
  FILE* stream_;
  double interval_;
  bool tty_;
  std::chrono::steady_clock::time_point start_, last_print_;
  int64_t done_ = 0;
  int64_t done_start_ = 0;
  size_t last_width_ = 0;
};

/// "12.3 GiB of 80.0 GiB" for the current CUDA device's allocated memory, or "" without CUDA.
std::string cuda_memory_text();

}  // namespace anvil::train
