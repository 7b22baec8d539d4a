// The loss plot (include/anvil/train/plot.h): hand-written SVG.
//
// Layout: a 720 x 420 canvas, a plot area inset for the tick labels, "nice" ticks (1, 2 or 5 x 10^k)
// on both axes, one polyline per series (markers for point series), a legend in the top right.
#include "anvil/train/plot.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <limits>
#include <sstream>
#include <stdexcept>

namespace anvil::train {

namespace {

constexpr double kWidth = 720, kHeight = 420, kLeft = 70, kRight = 20, kTop = 40, kBottom = 50;

// Tick positions covering [lo, hi]: about `count` steps of 1, 2 or 5 x 10^k.
std::vector<double> nice_ticks(double lo, double hi, int count) {
  const double span = hi - lo;
  const double raw = span / count;
  const double mag = std::pow(10.0, std::floor(std::log10(raw)));
  const double norm = raw / mag;
  const double step = (norm < 1.5 ? 1 : norm < 3 ? 2 : norm < 7 ? 5 : 10) * mag;
  std::vector<double> ticks;
  for (double t = std::ceil(lo / step - 1e-9) * step; t <= hi + step * 1e-9; t += step) ticks.push_back(t);
  return ticks;
}

std::string format_number(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", std::abs(v) < 1e-12 ? 0.0 : v);
  return buf;
}

std::string escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '<') out += "&lt;";
    else if (c == '>') out += "&gt;";
    else if (c == '&') out += "&amp;";
    else out += c;
  }
  return out;
}

}  // namespace

std::string loss_plot_svg(const std::vector<LossSeries>& series, const std::string& title) {
  double x0 = std::numeric_limits<double>::infinity(), x1 = -x0, y0 = x0, y1 = -x0;
  for (const auto& s : series)
    for (const auto& [x, y] : s.xy) {
      if (!std::isfinite(x) || !std::isfinite(y)) continue;
      x0 = std::min(x0, x), x1 = std::max(x1, x), y0 = std::min(y0, y), y1 = std::max(y1, y);
    }
  if (!std::isfinite(x0)) x0 = 0, x1 = 1, y0 = 0, y1 = 1;
  if (x1 - x0 < 1e-12) x1 = x0 + 1;
  if (y1 - y0 < 1e-12) y0 -= 0.5, y1 += 0.5;
  const double pad = 0.05 * (y1 - y0);
  y0 -= pad, y1 += pad;
  const double pw = kWidth - kLeft - kRight, ph = kHeight - kTop - kBottom;
  auto sx = [&](double x) { return kLeft + (x - x0) / (x1 - x0) * pw; };
  auto sy = [&](double y) { return kTop + (1.0 - (y - y0) / (y1 - y0)) * ph; };

  std::ostringstream o;
  o.precision(6);
  o << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << kWidth << "\" height=\"" << kHeight
    << "\" viewBox=\"0 0 " << kWidth << " " << kHeight << "\" font-family=\"sans-serif\" font-size=\"12\">\n";
  o << "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
  o << "<text x=\"" << kWidth / 2 << "\" y=\"24\" text-anchor=\"middle\" font-size=\"15\">" << escape(title)
    << "</text>\n";
  // Grid and ticks.
  for (double t : nice_ticks(x0, x1, 8)) {
    if (t < x0 - 1e-9 || t > x1 + 1e-9) continue;
    o << "<line x1=\"" << sx(t) << "\" y1=\"" << kTop << "\" x2=\"" << sx(t) << "\" y2=\"" << kTop + ph
      << "\" stroke=\"#eee\"/>\n";
    o << "<text x=\"" << sx(t) << "\" y=\"" << kTop + ph + 16 << "\" text-anchor=\"middle\">" << format_number(t)
      << "</text>\n";
  }
  for (double t : nice_ticks(y0, y1, 6)) {
    if (t < y0 - 1e-9 || t > y1 + 1e-9) continue;
    o << "<line x1=\"" << kLeft << "\" y1=\"" << sy(t) << "\" x2=\"" << kLeft + pw << "\" y2=\"" << sy(t)
      << "\" stroke=\"#eee\"/>\n";
    o << "<text x=\"" << kLeft - 6 << "\" y=\"" << sy(t) + 4 << "\" text-anchor=\"end\">" << format_number(t)
      << "</text>\n";
  }
  // Axes and their labels.
  o << "<line x1=\"" << kLeft << "\" y1=\"" << kTop + ph << "\" x2=\"" << kLeft + pw << "\" y2=\"" << kTop + ph
    << "\" stroke=\"black\"/>\n";
  o << "<line x1=\"" << kLeft << "\" y1=\"" << kTop << "\" x2=\"" << kLeft << "\" y2=\"" << kTop + ph
    << "\" stroke=\"black\"/>\n";
  o << "<text x=\"" << kLeft + pw / 2 << "\" y=\"" << kHeight - 12 << "\" text-anchor=\"middle\">step</text>\n";
  o << "<text x=\"16\" y=\"" << kTop + ph / 2 << "\" text-anchor=\"middle\" transform=\"rotate(-90 16 "
    << kTop + ph / 2 << ")\">loss</text>\n";
  // Series and legend.
  int legend_row = 0;
  for (const auto& s : series) {
    if (s.xy.empty()) continue;
    o << "<polyline fill=\"none\" stroke=\"" << s.color << "\" stroke-width=\"1.5\" points=\"";
    for (const auto& [x, y] : s.xy)
      if (std::isfinite(y)) o << sx(x) << "," << sy(y) << " ";
    o << "\"/>\n";
    if (s.points)
      for (const auto& [x, y] : s.xy)
        if (std::isfinite(y))
          o << "<circle cx=\"" << sx(x) << "\" cy=\"" << sy(y) << "\" r=\"3\" fill=\"" << s.color << "\"/>\n";
    const double ly = kTop + 14 + 18 * legend_row++;
    o << "<line x1=\"" << kLeft + pw - 120 << "\" y1=\"" << ly << "\" x2=\"" << kLeft + pw - 96 << "\" y2=\"" << ly
      << "\" stroke=\"" << s.color << "\" stroke-width=\"2\"/>\n";
    o << "<text x=\"" << kLeft + pw - 90 << "\" y=\"" << ly + 4 << "\">" << escape(s.name) << "</text>\n";
  }
  o << "</svg>\n";
  return o.str();
}

void write_loss_plot(const std::string& path, const std::vector<LossSeries>& series, const std::string& title) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) throw std::runtime_error("loss plot: cannot write " + tmp);
    out << loss_plot_svg(series, title);
    if (!out) throw std::runtime_error("loss plot: write to " + tmp + " failed");
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) throw std::runtime_error("loss plot: cannot rename " + tmp + " to " + path);
}

}  // namespace anvil::train
