// A loss plot as a self-contained SVG (no plotting library: the file is a few hundred lines of text
// that any browser shows): title, axes with ticks, the training loss as a line, validation loss as
// points joined by a line, and a legend.
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace anvil::train {

struct LossSeries {
  std::string name;                            ///< legend label ("train", "validation")
  std::vector<std::pair<double, double>> xy;   ///< (step, loss)
  bool points = false;                         ///< draw markers at each point (validation)
  std::string color = "#1f77b4";
};

/// The SVG text of the series on shared axes (x: step, y: loss).
std::string loss_plot_svg(const std::vector<LossSeries>& series, const std::string& title);

/// Writes loss_plot_svg(...) to `path` (through a temp file renamed over it).
void write_loss_plot(const std::string& path, const std::vector<LossSeries>& series, const std::string& title);

}  // namespace anvil::train
