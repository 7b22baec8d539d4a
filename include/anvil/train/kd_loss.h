// Knowledge-distillation losses: a divergence between the student's and a frozen teacher's next-token
// distributions, over the LM heads, in chunks of token rows so that neither model's logits for the whole
// batch exist in fp32 at once.
//
// The divergences (p = teacher, q = student, both softmax(logits / temperature) over the vocabulary; one
// value per target token, summed over the vocabulary):
//   forward_kl       KL(p || q)                                        torchtune ForwardKLLoss, DistiLLM forward_kl
//   reverse_kl       KL(q || p)                                        torchtune ReverseKLLoss, DistiLLM reverse_kl
//   skew_forward_kl  KL(p || lambda p + (1 - lambda) q)                DistiLLM skewed_forward_kl (lambda = skew_lambda)
//   skew_reverse_kl  KL(q || (1 - lambda) p + lambda q)                DistiLLM skewed_reverse_kl
//   jsd              beta KL(p || m) + (1 - beta) KL(q || m),          TRL GKDTrainer.generalized_jsd_loss
//                    m = beta p + (1 - beta) q; beta 0 is KL(p || q) and beta 1 is KL(q || p), as TRL special-cases them
//   tv               1/2 sum |p - q|                                   DistiLLM tv_distance
// Each is a true divergence: 0 when the student equals the teacher. torchtune's and DistiLLM's forward and
// skew-forward losses omit the teacher's entropy sum p log p (a constant for the student: the same gradient),
// so their values are ours plus the teacher's entropy; the tests compare with that accounted for.
// Temperature: both models' logits are divided by it before the softmax, as TRL's generalized_jsd_loss does,
// with no temperature^2 factor (torchtune's losses have no temperature; temperature 1 gives them exactly).
//
// The chunked loss is a C++ autograd Function, the pattern of train/loss.h, with its gradient taken in the
// forward (as Liger's fused linear cross-entropy does): per chunk of rows, the student's logits h_s W_s^T and the
// teacher's h_t W_t^T in their model dtypes, log-softmax in fp32, the divergence summed and its analytic gradient
// wrt the student's logits (kd_loss.cpp) turned at once into dh = dz W_s and dW_s += dz^T h_s; the logits are
// dropped. The backward scales dh and dW by the upstream gradient: no LM-head GEMM runs twice. kd_ce_loss adds
// the student's cross-entropy on the same rows into the same pass (one set of student logits for both terms).
// The teacher gets no gradient.
#pragma once

#include "anvil/data/batches.h"
#include "anvil/model/transformer.h"
#include "anvil/train/config.h"
#include "anvil/train/setup.h"
#include "anvil/train/trainer.h"

#include <ATen/ATen.h>

#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace anvil::train {

enum class KdLoss { kForwardKl, kReverseKl, kSkewForwardKl, kSkewReverseKl, kJsd, kTv };

/// "forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "jsd", "tv" (distill.loss's values).
const std::vector<std::string>& kd_loss_names();
/// The loss named `name`; throws std::invalid_argument naming `what` and the allowed names.
KdLoss parse_kd_loss(const std::string& name, const std::string& what = "kd loss");

struct KdOptions {
  KdLoss loss = KdLoss::kForwardKl;
  double temperature = 1.0;  ///< > 0; both models' logits are divided by it
  double skew_lambda = 0.1;  ///< [0, 1]: the teacher's (skew_forward_kl) or student's (skew_reverse_kl) share of the mixture
  double jsd_beta = 0.5;     ///< [0, 1]: the teacher's share of the JSD mixture (TRL's beta)
  int64_t chunk = 1024;      ///< token rows per chunk
  /// CUDA: each chunk through the fused kernel anvil::kd_rows instead of the ATen composite (the reference, and
  /// what runs on the CPU). KdLossCuda.FusedChunksEqualTheCompositeOnTheCpu holds them equal (H100, 2026-12-07).
  bool fused = true;
};

/// The divergence of each row from log-probabilities (tempered log-softmax of each model's logits): student
/// (N, V) and teacher (N, V), fp32 or fp64 -> (N). Plain ATen ops, differentiable (the reference the chunked
/// loss's analytic backward is tested against).
at::Tensor kd_divergence(const at::Tensor& student_logprobs, const at::Tensor& teacher_logprobs, const KdOptions& o);

/// The same from logits (N, V) in any float dtype: log_softmax(logits / temperature) in fp32 (fp64 for fp64), then
/// kd_divergence. Differentiable; it holds every row's fp32 logits, so it is for tests and small batches.
at::Tensor kd_divergence_from_logits(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                                     const KdOptions& o);

/// sum over rows of the divergence between softmax(h_s W_s^T / T) and softmax(h_t W_t^T / T), / normalizer:
/// an fp32 scalar (fp64 for fp64 inputs) with autograd to student_hidden and (when it requires grad)
/// student_weight. student_hidden (N, Hs), student_weight (Vs, Hs); teacher_hidden (N, Ht), teacher_weight (V, Ht)
/// on the same device (no gradient flows to them). The rows are the target rows only (select them first:
/// target_rows). normalizer <= 0 gives 0.
/// Padded vocabularies: the teacher's head rows are the compared vocabulary, V <= Vs; the student's logits are cut
/// to their first V columns before its softmax, so both distributions renormalise over the same V real tokens
/// (rows past V, padding no token id reaches, get no divergence gradient). kd_ce_loss's CE keeps all Vs columns:
/// it is the student's own loss, and it pushes the padded rows' logits down. See train/vocab.h.
at::Tensor kd_loss(const at::Tensor& student_hidden, const at::Tensor& student_weight, const at::Tensor& teacher_hidden,
                   const at::Tensor& teacher_weight, double normalizer, const KdOptions& o);

/// The KD loss blended with the student's cross-entropy on the same rows, in one chunked pass:
/// total = kd_weight * sum_rows divergence + ce_weight * sum_rows CE(student logits, labels), with autograd to
/// student_hidden / student_weight as kd_loss; kd and ce are the two unweighted sums, detached (ce 0 without
/// labels). labels (N) int64 targets, all valid (select target rows first), or undefined for KD alone.
/// kd_loss(.., normalizer, o) is kd_ce_loss(.., {}, 1 / normalizer, 0, o).total.
struct KdCeLoss {
  at::Tensor total, kd, ce;  ///< () fp32 (fp64 for fp64 inputs)
};
KdCeLoss kd_ce_loss(const at::Tensor& student_hidden, const at::Tensor& student_weight, const at::Tensor& teacher_hidden,
                    const at::Tensor& teacher_weight, const at::Tensor& labels, double kd_weight, double ce_weight,
                    const KdOptions& o);
// ---- a sparse teacher: top-k ids and log-probabilities (the offline cache, train/teacher_cache.h) ---------
//
// The teacher is given at each row as its k most likely token ids (N, k) and their tempered log-probabilities
// log softmax(z_t / T) (N, k). The tail mass is an "other" bucket, DistillKit's SYMMETRIC_UNIFORM handling
// (arcee-ai/DistillKit, distillkit/lossfuncs/common.py get_target_logprobs, kl.py sparse_kl_div_inner):
// both distributions are coarsened to k + 1 outcomes, the k ids and "every other token",
//   teacher  P = (p_1 .. p_k, max(1 - sum p_i, 1e-30)) / its sum   (the renormalization only absorbs rounding)
//   student  Q = (q_1 .. q_k, sum of q_j over the other V - k ids)  (q = softmax(z_s / T) over the vocabulary)
// and the divergence of KdOptions is taken between P and Q. With k = V the bucket is empty and left out, and
// the value is the dense kd_divergence's (up to the teacher's storage rounding). For k < V it is a lower bound
// of the dense divergence (coarsening never increases an f-divergence) that ignores how the student spreads its
// tail mass. The 1e-30 floor keeps 0 log 0 out of the formulas (a tail of 0 contributes 1e-30 log ..., nothing).

/// The divergence of each row between the student's log-probabilities (N, V) fp32/fp64 and a sparse teacher:
/// ids (N, k) int64 (distinct, in [0, V)) and log-probabilities (N, k). Plain ATen ops, differentiable wrt
/// student_logprobs: the reference of the chunked kd_loss_sparse.
at::Tensor kd_divergence_sparse(const at::Tensor& student_logprobs, const at::Tensor& teacher_ids,
                                const at::Tensor& teacher_logprobs, const KdOptions& o);

/// kd_loss with the teacher given sparsely: sum over rows of kd_divergence_sparse(log_softmax(h_s W_s^T / T),
/// teacher_ids, teacher_logprobs) / normalizer, in chunks of rows, with the analytic backward of kd_loss.
/// student_hidden (N, Hs), student_weight (V, Hs); teacher_ids (N, k) int32/int64, teacher_logprobs (N, k) any
/// float dtype (already at temperature T). normalizer <= 0 gives 0.
at::Tensor kd_loss_sparse(const at::Tensor& student_hidden, const at::Tensor& student_weight,
                          const at::Tensor& teacher_ids, const at::Tensor& teacher_logprobs, double normalizer,
                          const KdOptions& o);

// ---- different tokenizers: Universal Logit Distillation (experimental) ------------------------------------
//
// ULD (Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation Loss for LLMs",
// arXiv 2402.12030) compares two distributions over different vocabularies by their sorted probability vectors,
// zero-padded to one length: sum_i |sort(q)_i - sort(p)_i|, which is the Wasserstein-1 distance between them when
// the support is ordered by rank. TRL 1.16's GOLD trainer (trl/experimental/gold/gold_trainer.py, ULDLoss) adds a
// hybrid: tokens both vocabularies spell the same (train/vocab.h shared_tokens) are compared id by id with GOLD's
// generalized JSD on their (unrenormalised) probabilities, log(clamp(p, 1e-8)), and only the rest by sorting:
//   row value = w_m JSD_beta(q[shared_s], p[shared_t]) + w_u sum_i |sort(q[rest_s])_i - sort(p[rest_t])_i|,
// with w_m = M / Vt and w_u = 1 - w_m (M shared tokens, Vt the teacher's columns; GOLD's adaptive default) unless
// both weights are given. q = softmax(z_s / Ts), p = softmax(z_t / Tt): GOLD's two temperatures.

struct UldOptions {
  double student_temperature = 1.0;  ///< > 0 (GOLD's uld_student_temperature)
  double teacher_temperature = 1.0;  ///< > 0 (GOLD's uld_teacher_temperature)
  bool hybrid = true;                ///< the shared tokens by JSD, the rest sorted (GOLD's uld_use_hybrid_loss)
  double jsd_beta = 0.5;             ///< [0, 1]: the matched JSD's beta (GOLD's beta; 0 forward KL, 1 reverse)
  double matched_weight = -1;        ///< w_m, or < 0 for GOLD's adaptive M / Vt (then both must be < 0)
  double unmatched_weight = -1;      ///< w_u, or < 0 for 1 - w_m
};

/// The ULD value of each aligned row (N): student logits (N, Vs), teacher logits (N, Vt), any float dtype,
/// computed in fp32 (fp64 for fp64); shared ids (M) int64 (empty, or hybrid off: plain ULD over all columns).
/// Its mean over a sequence's rows is GOLD's per-sequence aligned_loss (tests/python/test_distill_vocab.py);
/// GOLD then takes the mean over sequences and multiplies by uld_distillation_weight. Differentiable (ATen ops).
at::Tensor uld_divergence(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                          const at::Tensor& shared_student_ids, const at::Tensor& shared_teacher_ids,
                          const UldOptions& o);

/// uld_divergence from probability rows rather than logits: student q (N, Vs) and teacher p (N, Vt), already
/// tempered and possibly unnormalised (GOLD's merged rows of several tokens, train/vocab.h
/// merge_aligned_probabilities); o's temperatures are not applied. uld_divergence is this on the softmaxes.
at::Tensor uld_divergence_probs(const at::Tensor& student_probs, const at::Tensor& teacher_probs,
                                const at::Tensor& shared_student_ids, const at::Tensor& shared_teacher_ids,
                                const UldOptions& o);

/// The (T) int64 indices of the target positions (labels != kIgnoreIndex) of labels (...) flattened.
at::Tensor target_rows(const at::Tensor& labels);

/// The LM head weight (V, H) of a model: lm_head's, or the tied embedding's.
at::Tensor head_weight(const model::CausalLM& m);

/// The hidden states (B, S, H) of a batch moved by batch_to_device (`all`: (4, B, S) ids, positions, doc ids,
/// labels); doc ids only where a row packs several documents (setup.cpp's rule).
at::Tensor batch_hidden(model::CausalLM& m, const at::Tensor& all, bool packed);

/// The student's cross-entropy of hidden rows h (N, Hs) against labels (N) over its whole head (padded rows
/// included: only the KD terms compare a cut vocabulary), summed and divided by normalizer. A head with an
/// adapter (a LoRA on lm_head) takes its logits whole, a plain one goes through causal_lm_loss's chunks of
/// ce_chunk rows. At kd_ratio >= 1 CE gets no gradient, so it is computed without a graph (logged only).
at::Tensor student_ce(model::CausalLM& student, const at::Tensor& h, const at::Tensor& labels, double normalizer,
                      int64_t ce_chunk, double kd_ratio);

// ---- a student and a frozen teacher on packed batches --------------------------------------------------

/// The teacher's side of a distillation: the model (eval mode, no parameter requiring grad) and its LM head's
/// weight (V, Ht) on the student's device, cut to the compared vocabulary: every loss and measure here compares
/// the first V = head.size(0) rows of both models (the shared real vocabulary, train/vocab.h).
struct Teacher {
  std::shared_ptr<model::CausalLM> model;
  at::Tensor head;
};
/// `model` frozen: eval mode, requires_grad off, its head weight copied to `student_device` when it lives elsewhere
/// and cut to its first `vocab` rows (0: all; more than the teacher has is an error).
Teacher freeze_teacher(std::shared_ptr<model::CausalLM> model, at::Device student_device, int64_t vocab = 0);

/// One micro-batch of distillation: total = (1 - kd_ratio) ce + kd_ratio kd, each a sum over the batch's targets
/// / normalizer (the step's target count). ce: the student's chunked cross-entropy (ce_chunk rows); kd: kd_loss
/// over the target rows, the teacher's hidden states computed under no grad. kd_ratio 0 skips the teacher.
struct KdBatchLoss {
  at::Tensor total, kd, ce;  ///< () fp32; total with autograd, kd and ce detached
};
KdBatchLoss kd_batch_loss(model::CausalLM& student, const Teacher& teacher, const data::Batch& b, double normalizer,
                          const KdOptions& o, double kd_ratio, int64_t ce_chunk, at::Device device);

/// kd_batch_loss as the trainer's loss callback, with terms "kd" and "ce".
LossFn kd_loss_fn(model::CausalLM& student, const Teacher& teacher, const KdOptions& o, double kd_ratio,
                  int64_t ce_chunk, at::Device device);

/// The teacher's side of evaluate_student for the chunk [s, e) of a batch's target rows: from the student's
/// logits zs (rows, V) fp32 and their log_softmax ls, the chunk's summed KL(teacher || student) and the number of
/// its rows where both models' most likely token agree, () each.
using ChunkScore = std::function<std::pair<at::Tensor, at::Tensor>(int64_t s, int64_t e, const at::Tensor& zs,
                                                                   const at::Tensor& ls)>;
/// The teacher of one batch: called once per batch with it and its target rows sel (T) int64 on the device (the
/// hidden states' row order), before its chunks are scored.
using BatchTeacher = std::function<ChunkScore(const data::Batch& b, const at::Tensor& sel)>;
/// The evaluation loop of evaluate_against_teacher and evaluate_against_cache (train/teacher_cache.h): the
/// student's mean CE, perplexity, "kl" and "top1" with the teacher given per chunk by `teacher`. Eval mode and
/// no grad inside, the student's mode restored after; batch_size rows at a time, at most max_batches (> 0).
EvalResult evaluate_student(model::CausalLM& student, const data::PackedRows& rows, int64_t batch_size,
                            int64_t max_batches, int64_t chunk, at::Device device, const BatchTeacher& teacher,
                            const EvalShard& shard = {});

/// The student on packed validation rows beside the teacher: loss (mean CE) and perplexity, and the terms "kl"
/// (mean KL(teacher || student) per target token at temperature 1: the student's KL to the teacher) and
/// "top1" (the fraction of targets where both models' most likely next token agree). Eval mode and no grad
/// inside, the student's mode restored after; batch_size rows at a time, at most max_batches (> 0).
EvalResult evaluate_against_teacher(model::CausalLM& student, const Teacher& teacher, const data::PackedRows& rows,
                                    int64_t batch_size, int64_t max_batches, int64_t chunk, at::Device device,
                                    const EvalShard& shard = {});

/// evaluate_against_teacher over the data's validation rows as the trainer's eval callback; null without them.
EvalFn kd_eval_fn(model::CausalLM& student, const Teacher& teacher, const TrainingData& data, const TrainSection& t,
                  const EvalSection& e, int64_t chunk, at::Device device);

}  // namespace anvil::train
