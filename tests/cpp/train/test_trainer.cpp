// The core trainer (anvil/train/trainer.h) as a recipe that is not a causal LM uses it: a loss callback with
// a logged term, the per-step callback the CLI's progress line and the Python bindings build on, metrics.jsonl,
// and a checkpoint that a second Trainer resumes from.
#include "anvil/train/trainer.h"

#include "anvil/io/fs.h"

#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <unistd.h>
#include <vector>

namespace anvil::train {
namespace {

// A scratch output.dir, removed at the end.
struct TempDir {
  std::string path;
  TempDir() {
    char tmpl[] = "/tmp/anvil_trainer_XXXXXX";
    path = ::mkdtemp(tmpl);
  }
  ~TempDir() { io::remove_tree(path); }
};

std::vector<data::Example> examples(int n) {
  std::vector<data::Example> out;
  for (int i = 0; i < n; ++i) out.push_back({{3, 4, 5, 6}, {0, 1, 1, 1}});
  return out;
}

LoopSettings settings(const std::string& dir, int64_t steps, int64_t save_every) {
  LoopSettings s;
  s.recipe = "test";
  s.out_dir = dir;
  s.train.lr = 0.1, s.train.schedule = "constant", s.train.grad_accum = 2, s.train.max_grad_norm = 0.0;
  s.train.mixed_precision = "none";
  s.total_steps = steps, s.save_every = save_every, s.log_every = 1, s.plot = false;
  s.config = {{"train", {{"batch_size", 2}, {"grad_accum", 2}, {"seed", 0}}}};
  return s;
}

// Pulls w (4,) towards 1: each micro-batch's share of the step's squared error, weighted by its targets.
LossFn pull_towards_one(const at::Tensor& w) {
  return [w](const data::Batch& b, double normalizer) {
    const auto share = (w - 1.0).pow(2).sum() * (double(b.targets) / normalizer);
    return Loss{share, {{"mse", share.detach()}}};  // a term is given as its share, as the loss is
  };
}

// RunOptions with only a step callback.
RunOptions on_step(StepCallback f) {
  RunOptions o;
  o.on_step = std::move(f);
  return o;
}

TEST(Trainer, StepCallbackSeesEveryStepWithTermsTokensAndRate) {
  TempDir dir;
  const auto ex = examples(8);
  data::BatchStream stream(ex, 4, 0, 2, 0);
  auto w = at::zeros({4}).requires_grad_();
  Trainer trainer(settings(dir.path, 5, 0), {{"w", w}}, at::kCPU);
  trainer.open(false, stream);
  std::vector<StepReport> reports;
  ASSERT_EQ(trainer.fit(stream, pull_towards_one(w), nullptr, on_step([&](const StepReport& r) { reports.push_back(r); })),
            kExitOk);
  ASSERT_EQ(reports.size(), 5u);
  for (size_t i = 0; i < reports.size(); ++i) {
    const auto& r = reports[i];
    EXPECT_EQ(r.step, int64_t(i) + 1);
    EXPECT_EQ(r.total_steps, 5);
    ASSERT_EQ(r.terms.size(), 1u);
    EXPECT_EQ(r.terms[0].first, "mse");
    EXPECT_NEAR(r.loss, r.terms[0].second, 1e-6);  // the only term is the whole loss
    EXPECT_GT(reports[0].tokens, 0);
    EXPECT_EQ(r.tokens, (int64_t(i) + 1) * reports[0].tokens);  // every step trains on the same number
    EXPECT_GT(r.tokens_per_s, 0);
    EXPECT_DOUBLE_EQ(r.lr, 0.1);
    EXPECT_EQ(r.peak_mem_gib, -1);  // off CUDA
    if (i > 0) EXPECT_LT(r.loss, reports[i - 1].loss);
  }
  EXPECT_NEAR(reports[0].loss, 4.0, 1e-6);  // w = 0: four errors of 1
  EXPECT_TRUE(io::is_regular_file(trainer.path("metrics.jsonl")));
  EXPECT_TRUE(io::is_regular_file(io::join_path(trainer.path("checkpoint"), "state.json")));
}

TEST(Trainer, ResumesFromItsCheckpointBitForBit) {
  TempDir a, b;
  const auto ex = examples(8);
  auto run = [&](const std::string& dir, int64_t steps, bool resume) {
    data::BatchStream stream(ex, 4, 0, 2, 0);
    auto w = at::zeros({4}).requires_grad_();
    Trainer trainer(settings(dir, 6, 2), {{"w", w}}, at::kCPU);
    trainer.open(resume, stream);
    std::vector<double> losses;
    const int status = trainer.fit(stream, pull_towards_one(w), nullptr, on_step([&](const StepReport& r) {
      losses.push_back(r.loss);
      if (r.step == steps) throw std::runtime_error("stop here");  // a crash after this step's log
    }));
    EXPECT_EQ(status, kExitOk);
    return std::make_pair(losses, w.detach().clone());
  };
  const auto [full, w_full] = run(a.path, 0, false);
  ASSERT_EQ(full.size(), 6u);
  EXPECT_THROW(run(b.path, 5, false), std::runtime_error);  // the checkpoint of step 4 was written in step 5
  const auto [rest, w_rest] = run(b.path, 0, true);
  ASSERT_EQ(rest.size(), 2u);  // steps 5 and 6
  EXPECT_EQ(rest[0], full[4]);
  EXPECT_EQ(rest[1], full[5]);
  EXPECT_TRUE(at::equal(w_full, w_rest));
}

}  // namespace
TEST(Trainer, StopCallbackHearsWhyANonFiniteRunStopped) {
  TempDir dir;
  const auto ex = examples(8);
  data::BatchStream stream(ex, 4, 0, 2, 0);
  auto w = at::zeros({4}).requires_grad_();
  Trainer trainer(settings(dir.path, 4, 0), {{"w", w}}, at::kCPU);
  trainer.open(false, stream);
  const LossFn nan_at_step_3 = [w, calls = 0](const data::Batch& b, double normalizer) mutable {
    const double poison = ++calls > 4 ? std::nan("") : 1.0;  // two micro-batches a step: step 3 on
    const auto share = (w - 1.0).pow(2).sum() * (poison * double(b.targets) / normalizer);
    return Loss{share, {}};
  };
  RunOptions options = on_step([](const StepReport&) {});
  std::vector<std::pair<int, std::string>> stops;
  options.on_stop = [&](int status, const std::string& message) { stops.emplace_back(status, message); };
  EXPECT_EQ(trainer.fit(stream, nan_at_step_3, nullptr, options), kExitFailed);
  ASSERT_EQ(stops.size(), 1u);
  EXPECT_EQ(stops[0].first, kExitFailed);
  EXPECT_NE(stops[0].second.find("anvil test: the loss is "), std::string::npos) << stops[0].second;
  EXPECT_NE(stops[0].second.find("at step 3"), std::string::npos) << stops[0].second;
  EXPECT_NE(stops[0].second.find("lower train.lr (now 0.1"), std::string::npos) << stops[0].second;
}

}  // namespace anvil::train
