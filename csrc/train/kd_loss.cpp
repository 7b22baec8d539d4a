// The knowledge-distillation losses (include/anvil/train/kd_loss.h).
//
// Forward, per chunk of target rows: z_s = h_s W_s^T, z_t = h_t W_t^T (each in its model dtype), then in fp32
// ls = log_softmax(z_s / T), lt = log_softmax(z_t / T) and the rows' divergence (kd_divergence, the one
// formula the reference and the chunked loss share), and at once the analytic gradient wrt the tempered student
// logits, turned into dh and dW in the forward (ChunkedKdCeLoss below). Every divergence here is a function of the student's
// probabilities q = exp(ls), so with g = dL/dq its gradient wrt the logits is
//   dL/dz_j = q_j (g_j - sum_i q_i g_i),
// computed from "qg" = q * g, which stays bounded where g alone would not (g = -p/q for forward KL):
//   forward_kl        qg = -p                          (so dz = q - p, used directly)
//   reverse_kl        qg = q (log q - log p)            (the +q of d(q log q) cancels against sum q = 1)
//   skew_forward_kl   qg = -(1 - lambda) p q / m,       m = lambda p + (1 - lambda) q
//   skew_reverse_kl   qg = q (log q - log m) - lambda q^2 / m,   m = (1 - lambda) p + lambda q
//   jsd               qg = (1 - beta) q (log q - log m),         m = beta p + (1 - beta) q
//   tv                qg = q sign(q - p) / 2            (sign(0) = 0, as the derivative torch gives |x|)
// The mixtures' logs are computed in log space (logaddexp), so a probability that underflows is no 0 * inf.
// Then dz_raw = dz / T. Peak extra memory per chunk: a few (rows, V) fp32 buffers.
#include "anvil/train/kd_loss.h"

#include "anvil/ops.h"
#include "anvil/train/loss.h"

#include <ATen/autocast_mode.h>
#include <torch/autograd.h>

#include <cmath>
#include <limits>
#include <stdexcept>

namespace anvil::train {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::ScalarType accumulate_type(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// log(a p + b q) for weights a, b in [0, 1] from log p, log q: log-space, a weight of 0 drops its term.
at::Tensor log_mixture(const at::Tensor& lp, double a, const at::Tensor& lq, double b) {
  if (a <= 0) return lq + std::log(b);
  if (b <= 0) return lp + std::log(a);
  return at::logaddexp(lp + std::log(a), lq + std::log(b));
}

// jsd with beta 0 or 1 is a plain KL, as TRL's generalized_jsd_loss special-cases them.
KdLoss effective(const KdOptions& o) {
  if (o.loss == KdLoss::kJsd && o.jsd_beta <= 0) return KdLoss::kForwardKl;
  if (o.loss == KdLoss::kJsd && o.jsd_beta >= 1) return KdLoss::kReverseKl;
  return o.loss;
}

// q * dL/dq (rows, C) of the divergence between two distributions over C outcomes (the table above), from
// their log-probabilities: the part of the gradient the dense and the sparse (coarse) paths share.
at::Tensor divergence_qg(const at::Tensor& ls, const at::Tensor& lt, const KdOptions& o) {
  const auto q = ls.exp(), p = lt.exp();  // (rows, C)
  at::Tensor qg;  // (rows, C) q * dL/dq
  switch (effective(o)) {
    case KdLoss::kForwardKl: qg = -p; break;
    case KdLoss::kReverseKl: qg = q * (ls - lt); break;
    case KdLoss::kSkewForwardKl: {
      const double lam = o.skew_lambda;
      if (lam >= 1) return at::zeros_like(q);  // KL(p || p)
      qg = (ls + lt - log_mixture(lt, lam, ls, 1 - lam)).exp_().mul_(-(1 - lam));
      break;
    }
    case KdLoss::kSkewReverseKl: {
      const double lam = o.skew_lambda;
      const auto lm = log_mixture(lt, 1 - lam, ls, lam);
      qg = q * (ls - lm);
      if (lam > 0) qg -= lam * (2 * ls - lm).exp();  // lambda q^2 / m, with m >= lambda q
      break;
    }
    case KdLoss::kJsd: {
      const double beta = o.jsd_beta;
      qg = (1 - beta) * q * (ls - log_mixture(lt, beta, ls, 1 - beta));
      break;
    }
    case KdLoss::kTv: qg = 0.5 * q * (q - p).sign(); break;
    default: break;
  }
  return qg;
}

// The analytic dL/dz (rows, V) wrt the tempered student logits, from the chunk's log-probabilities.
at::Tensor divergence_grad(const at::Tensor& ls, const at::Tensor& lt, const KdOptions& o) {
  if (effective(o) == KdLoss::kForwardKl) return ls.exp() - lt.exp();  // (rows, V) q - p
  const auto q = ls.exp();
  const auto qg = divergence_qg(ls, lt, o);  // (rows, V)
  return qg - q * qg.sum(1, /*keepdim=*/true);
}

// ---- the sparse teacher (kd_loss.h: the k + 1 outcomes of the "other" bucket) ----

constexpr double kTailFloor = 1e-30;  // the teacher's smallest tail mass (kd_loss.h)

// A chunk's coarse distributions: student and teacher log-probabilities (rows, C), C = k + 1 (the tail bucket
// last) or k when the ids cover the vocabulary.
struct Coarse {
  at::Tensor ls, lt;
  bool tail = false;
};

Coarse coarsen(const at::Tensor& ls_full, const at::Tensor& ids, const at::Tensor& teacher_lp) {
  const int64_t vocab = ls_full.size(1), k = ids.size(1);
  Coarse c;
  const auto lsk = ls_full.gather(1, ids);                     // (rows, k)
  const auto ltk = teacher_lp.to(ls_full.scalar_type());       // (rows, k)
  if (k == vocab) {
    c.ls = lsk, c.lt = at::log_softmax(ltk, 1);
    return c;
  }
  // log of the student's mass outside the ids, in log space (no 1 - sum cancellation): (rows, 1)
  const auto ls_tail = at::logsumexp(ls_full.scatter(1, ids, -std::numeric_limits<double>::infinity()), 1, true);
  const auto lt_tail = at::log((1 - ltk.exp().sum(1, true)).clamp_min(kTailFloor));  // (rows, 1)
  c.ls = at::cat({lsk, ls_tail}, 1), c.lt = at::log_softmax(at::cat({ltk, lt_tail}, 1), 1), c.tail = true;
  return c;
}

// dL/dz (rows, V) of the coarse divergence wrt the tempered student logits. With g_b = dL/dQ_b of bucket b and
// b(j) the bucket of token j, dL/dz_j = q_j (g_b(j) - sum_b Q_b g_b): the ids get their coarse qg directly, a
// tail token j gets (q_j / Q_tail) qg_tail, taken as exp(ls_j - log Q_tail) so that no tiny Q_tail divides.
at::Tensor sparse_divergence_grad(const at::Tensor& ls_full, const at::Tensor& ids, const Coarse& c,
                                  const KdOptions& o) {
  const int64_t k = ids.size(1);
  const auto qg = divergence_qg(c.ls, c.lt, o);  // (rows, C)
  const auto s = qg.sum(1, /*keepdim=*/true);    // (rows, 1)
  at::Tensor dz = c.tail ? (ls_full - c.ls.slice(1, k, k + 1)).exp_().mul_(qg.slice(1, k, k + 1))
                         : at::zeros_like(ls_full);  // (rows, V); the ids' entries are overwritten next
  dz.scatter_(1, ids, qg.slice(1, 0, k));
  return dz.sub_(ls_full.exp() * s);
}

// The chunked KD loss, optionally blended with the student's cross-entropy on the same rows, with its gradient
// computed in the forward (as Liger's fused linear cross-entropy does): each chunk's logits exist once, the
// analytic dL/dz is formed from them at once, dh = dz W_s and dW_s += dz^T h_s are taken there, and the logits
// are dropped. The backward only scales dh and dW by the upstream gradient: no LM-head GEMM is recomputed (the
// recompute design ran two more student and one more teacher head GEMM per chunk). The price: dh (N, Hs) and
// dW (V, Hs) fp32 live from the forward to the backward, where the recompute design allocated the same dW in
// its backward. Outputs: the weighted total (differentiable), and the unweighted sums of the divergence and of
// the cross-entropy over the rows (detached; 0 without labels).
class ChunkedKdCeLoss : public torch::autograd::Function<ChunkedKdCeLoss> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& hs, const at::Tensor& ws, const at::Tensor& ht,
                               const at::Tensor& wt, const at::Tensor& labels_or_empty, double kd_weight,
                               double ce_weight, int64_t loss, double temperature, double skew_lambda, double jsd_beta,
                               int64_t chunk, bool grad_enabled, bool fused_cuda) {
    KdOptions o;
    o.loss = KdLoss(loss), o.temperature = temperature, o.skew_lambda = skew_lambda, o.jsd_beta = jsd_beta;
    const auto acc = accumulate_type(hs);
    const bool with_ce = labels_or_empty.numel() > 0;
    const bool need_dh = grad_enabled && hs.requires_grad(), need_dw = grad_enabled && ws.requires_grad();
    const int64_t n = hs.size(0);
    // The compared vocabulary: the teacher's head rows, the first `vocab` of the student's (kd_loss.h). The student's
    // rows past it (padding) take no part in the divergence; its cross-entropy stays over every row it has.
    const int64_t vocab = wt.size(0);
    const bool padded = vocab < ws.size(0);
    auto kd_sum = at::zeros({}, hs.options().dtype(acc)), ce_sum = at::zeros({}, hs.options().dtype(acc));
    at::Tensor dh = need_dh ? at::empty_like(hs) : at::Tensor();                                   // (N, Hs)
    at::Tensor dw = need_dw ? at::zeros(ws.sizes(), ws.options().dtype(acc)) : at::Tensor();        // (V, Hs) fp32
    // CUDA with KdOptions::fused: one fused kernel per chunk (ops::kd_rows) over the model-dtype logits, the gradient
    // written over the student's; otherwise (and with ANVIL_FUSED_OPS=0) the composite below (the reference, the CPU path).
    const bool fused = fused_cuda && hs.is_cuda() && ops::use_fused_ops(hs) && hs.scalar_type() != at::kDouble;
    for (int64_t start = 0; start < n; start += chunk) {
      const int64_t end = std::min(n, start + chunk);
      const auto h = hs.slice(0, start, end);  // (rows, Hs)
      if (fused && !(padded && with_ce)) {
        // Padded rows without CE: the kernel sees the compared columns only (a copy), their gradient written there.
        auto zs = at::linear(h, ws);                               // (rows, Vs) model dtype
        auto zk = padded ? zs.narrow(1, 0, vocab).contiguous() : zs.contiguous();  // (rows, V)
        auto zt = at::linear(ht.slice(0, start, end), wt);         // (rows, V) teacher dtype
        if (zt.scalar_type() != zk.scalar_type()) zt = zt.to(zk.scalar_type());
        c10::optional<at::Tensor> labels;
        if (with_ce) labels = labels_or_empty.slice(0, start, end).contiguous();
        const auto [kd_r, ce_r] =
            ops::kd_rows(zk, zt.contiguous(), labels, int64_t(effective(o)), temperature, skew_lambda, jsd_beta,
                         kd_weight, ce_weight, need_dh || need_dw);
        kd_sum.add_(kd_r.sum());
        if (with_ce) ce_sum.add_(ce_r.sum());
        const auto wk = padded ? ws.narrow(0, 0, vocab) : ws;     // (V, Hs): the padded rows' dz is 0
        if (need_dh) dh.slice(0, start, end).copy_(at::matmul(zk, wk));  // zk now holds dz
        if (need_dw) accumulate_product(dw.narrow(0, 0, vocab), zk.t(), h);
        continue;
      }
      // The composite (also the fused flag's path for padded rows with CE: the kernel's CE would see V columns).
      const auto zs = at::linear(h, ws).to(acc);                                   // (rows, Vs) from the model dtype
      const auto lt = at::log_softmax(at::linear(ht.slice(0, start, end), wt).to(acc).div_(temperature), 1);
      const auto zk = padded ? zs.narrow(1, 0, vocab) : zs;                        // (rows, V) compared columns
      const auto ls = at::log_softmax(zk / temperature, 1);                        // (rows, V) tempered
      kd_sum.add_(kd_divergence(ls, lt, o).sum());
      at::Tensor dz;  // (rows, Vs) dL/dz of the raw student logits, the two terms weighted
      if (need_dh || need_dw) {
        auto dk = divergence_grad(ls, lt, o).mul_(kd_weight / temperature);       // (rows, V)
        if (!padded) dz = dk;
        else (dz = at::zeros_like(zs)).narrow(1, 0, vocab).copy_(dk);  // the padded columns: no divergence gradient
      }
      if (with_ce) {
        const auto labels = labels_or_empty.slice(0, start, end).unsqueeze(1);    // (rows, 1)
        const auto l1 = temperature == 1.0 && !padded ? ls : at::log_softmax(zs, 1);  // (rows, Vs) at T = 1
        ce_sum.sub_(l1.gather(1, labels).sum());
        if (dz.defined() && ce_weight != 0) {
          auto dce = l1.exp().mul_(ce_weight);                                    // softmax - onehot, weighted
          dce.scatter_add_(1, labels, at::full({end - start, 1}, -ce_weight, dce.options()));
          dz.add_(dce);
        }
      }
      if (!dz.defined()) continue;
      const auto d = dz.to(hs.scalar_type());  // (rows, V) rounded once to the model dtype
      if (need_dh) dh.slice(0, start, end).copy_(at::matmul(d, ws));
      if (need_dw) accumulate_product(dw, d.t(), h);
    }
    ctx->save_for_backward({dh.defined() ? dh : at::Tensor(), dw.defined() ? dw : at::Tensor()});
    ctx->saved_data["ws_dtype"] = int64_t(ws.scalar_type());
    auto total = kd_sum * kd_weight + ce_sum * ce_weight;
    ctx->mark_non_differentiable({kd_sum, ce_sum});
    return {total, kd_sum, ce_sum};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const auto &dh = saved[0], &dw = saved[1];
    TORCH_CHECK(!(ctx->needs_input_grad(0) && !dh.defined()) && !(ctx->needs_input_grad(1) && !dw.defined()),
                "kd_loss: backward through a loss computed with grad mode off");
    const auto& g = grad_outputs[0];  // () the upstream gradient of the total
    const auto ws_dtype = at::ScalarType(ctx->saved_data["ws_dtype"].toInt());
    at::Tensor gh = dh.defined() ? dh * g : at::Tensor();  // bf16 * 0-dim fp32 stays bf16, computed in fp32
    at::Tensor gw = dw.defined() ? (dw * g).to(ws_dtype) : at::Tensor();
    return {gh, gw, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

class ChunkedSparseKdLoss : public torch::autograd::Function<ChunkedSparseKdLoss> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& hs, const at::Tensor& ws, const at::Tensor& ids,
                            const at::Tensor& tlp, double scale, int64_t loss, double temperature, double skew_lambda,
                            double jsd_beta, int64_t chunk) {
    KdOptions o;
    o.loss = KdLoss(loss), o.temperature = temperature, o.skew_lambda = skew_lambda, o.jsd_beta = jsd_beta;
    const int64_t n = hs.size(0);
    const auto acc = accumulate_type(hs);
    auto total = at::zeros({}, hs.options().dtype(acc));
    for (int64_t start = 0; start < n; start += chunk) {
      const int64_t end = std::min(n, start + chunk);
      const auto ls = at::log_softmax(at::linear(hs.slice(0, start, end), ws).to(acc).div_(temperature), 1);  // (rows, V)
      const auto c = coarsen(ls, ids.slice(0, start, end), tlp.slice(0, start, end));
      total.add_(kd_divergence(c.ls, c.lt, o).sum());
    }
    ctx->save_for_backward({hs, ws, ids, tlp});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["loss"] = loss;
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["skew_lambda"] = skew_lambda;
    ctx->saved_data["jsd_beta"] = jsd_beta;
    ctx->saved_data["chunk"] = chunk;
    return total * scale;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const auto &hs = saved[0], &ws = saved[1], &ids = saved[2], &tlp = saved[3];
    KdOptions o;
    o.loss = KdLoss(ctx->saved_data["loss"].toInt());
    o.temperature = ctx->saved_data["temperature"].toDouble();
    o.skew_lambda = ctx->saved_data["skew_lambda"].toDouble();
    o.jsd_beta = ctx->saved_data["jsd_beta"].toDouble();
    const int64_t chunk = ctx->saved_data["chunk"].toInt();
    const bool need_dh = ctx->needs_input_grad(0), need_dw = ctx->needs_input_grad(1);
    const auto acc = accumulate_type(hs);
    const auto g = grad_outputs[0].to(acc) * (ctx->saved_data["scale"].toDouble() / o.temperature);  // ()
    const int64_t n = hs.size(0);
    at::Tensor dh = need_dh ? at::empty_like(hs) : at::Tensor();
    at::Tensor dw = need_dw ? at::zeros(ws.sizes(), ws.options().dtype(acc)) : at::Tensor();
    for (int64_t start = 0; start < n; start += chunk) {
      const int64_t end = std::min(n, start + chunk);
      const auto h = hs.slice(0, start, end);
      const auto ls = at::log_softmax(at::linear(h, ws).to(acc).div_(o.temperature), 1);  // (rows, V)
      const auto id = ids.slice(0, start, end);
      const auto c = coarsen(ls, id, tlp.slice(0, start, end));
      const auto d = (sparse_divergence_grad(ls, id, c, o) * g).to(hs.scalar_type());  // (rows, V) model dtype
      if (need_dh) dh.slice(0, start, end).copy_(at::matmul(d, ws));
      if (need_dw) accumulate_product(dw, d.t(), h);
    }
    return {dh,          need_dw ? dw.to(ws.scalar_type()) : at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

void check_sparse_teacher(const at::Tensor& ids, const at::Tensor& lp, int64_t rows, int64_t vocab, const char* what) {
  TORCH_CHECK(ids.dim() == 2 && lp.dim() == 2 && ids.sizes() == lp.sizes(), what, ": the teacher's ids ", ids.sizes(),
              " and log-probabilities ", lp.sizes(), " must both be (N, k)");
  TORCH_CHECK(ids.size(0) == rows, what, ": the sparse teacher has ", ids.size(0), " rows and the student ", rows,
              "; they must be the same target positions");
  TORCH_CHECK(ids.size(1) >= 1 && ids.size(1) <= vocab, what, ": k (", ids.size(1),
              " teacher ids per row) must be in [1, vocabulary size ", vocab, "]");
  TORCH_CHECK(!at::isFloatingType(ids.scalar_type()) && at::isFloatingType(lp.scalar_type()), what,
              ": the teacher's ids must be integers and its log-probabilities floats, got ", ids.scalar_type(), " and ",
              lp.scalar_type());
}

void check_options(const KdOptions& o) {
  if (!(o.temperature > 0) || !std::isfinite(o.temperature))
    throw std::invalid_argument("kd loss: temperature must be > 0, got " + std::to_string(o.temperature));
  if (!(o.skew_lambda >= 0 && o.skew_lambda <= 1))
    throw std::invalid_argument("kd loss: skew_lambda must be in [0, 1], got " + std::to_string(o.skew_lambda));
  if (!(o.jsd_beta >= 0 && o.jsd_beta <= 1))
    throw std::invalid_argument("kd loss: jsd_beta must be in [0, 1], got " + std::to_string(o.jsd_beta));
  if (o.chunk < 1) throw std::invalid_argument("kd loss: chunk must be >= 1, got " + std::to_string(o.chunk));
}

}  // namespace

const std::vector<std::string>& kd_loss_names() {
  static const std::vector<std::string> names = {"forward_kl",      "reverse_kl", "skew_forward_kl",
                                                 "skew_reverse_kl", "jsd",        "tv"};
  return names;
}

KdLoss parse_kd_loss(const std::string& name, const std::string& what) {
  const auto& names = kd_loss_names();
  for (size_t i = 0; i < names.size(); ++i)
    if (names[i] == name) return KdLoss(i);
  std::string list;
  for (const auto& n : names) list += (list.empty() ? "\"" : ", \"") + n + "\"";
  throw std::invalid_argument(what + ": must be one of " + list + ", got \"" + name + "\"");
}

at::Tensor kd_divergence(const at::Tensor& ls, const at::Tensor& lt, const KdOptions& o) {
  check_options(o);
  TORCH_CHECK(ls.dim() == 2 && ls.sizes() == lt.sizes(), "kd_divergence: student (", ls.sizes(), ") and teacher (",
              lt.sizes(), ") log-probabilities must both be (N, V)");
  const auto q = ls.exp(), p = lt.exp();  // (N, V)
  switch (effective(o)) {
    case KdLoss::kForwardKl: return (p * (lt - ls)).sum(1);
    case KdLoss::kReverseKl: return (q * (ls - lt)).sum(1);
    case KdLoss::kSkewForwardKl:
      return (p * (lt - log_mixture(lt, o.skew_lambda, ls, 1 - o.skew_lambda))).sum(1);
    case KdLoss::kSkewReverseKl:
      return (q * (ls - log_mixture(lt, 1 - o.skew_lambda, ls, o.skew_lambda))).sum(1);
    case KdLoss::kJsd: {
      const double beta = o.jsd_beta;
      const auto lm = log_mixture(lt, beta, ls, 1 - beta);  // (N, V) log(beta p + (1 - beta) q)
      return beta * (p * (lt - lm)).sum(1) + (1 - beta) * (q * (ls - lm)).sum(1);
    }
    case KdLoss::kTv: return 0.5 * (p - q).abs().sum(1);
  }
  return {};
}

at::Tensor kd_divergence_from_logits(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                                     const KdOptions& o) {
  check_options(o);
  const auto acc = accumulate_type(student_logits);
  return kd_divergence(at::log_softmax(student_logits.to(acc) / o.temperature, -1),
                       at::log_softmax(teacher_logits.to(acc) / o.temperature, -1), o);
}

at::Tensor kd_loss(const at::Tensor& student_hidden, const at::Tensor& student_weight, const at::Tensor& teacher_hidden,
                   const at::Tensor& teacher_weight, double normalizer, const KdOptions& o) {
  const double scale = normalizer > 0 ? 1.0 / normalizer : 0.0;
  return kd_ce_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, at::Tensor(), scale, 0.0, o).total;
}

KdCeLoss kd_ce_loss(const at::Tensor& student_hidden, const at::Tensor& student_weight, const at::Tensor& teacher_hidden,
                    const at::Tensor& teacher_weight, const at::Tensor& labels, double kd_weight, double ce_weight,
                    const KdOptions& o) {
  check_options(o);
  TORCH_CHECK(student_hidden.dim() == 2 && student_weight.dim() == 2 && student_hidden.size(1) == student_weight.size(1),
              "kd_loss: student hidden (N, H) ", student_hidden.sizes(), " must match its head (V, H) ",
              student_weight.sizes());
  TORCH_CHECK(teacher_hidden.dim() == 2 && teacher_weight.dim() == 2 && teacher_hidden.size(1) == teacher_weight.size(1),
              "kd_loss: teacher hidden (N, H) ", teacher_hidden.sizes(), " must match its head (V, H) ",
              teacher_weight.sizes());
  TORCH_CHECK(teacher_hidden.size(0) == student_hidden.size(0), "kd_loss: the teacher has ", teacher_hidden.size(0),
              " rows and the student ", student_hidden.size(0), "; they must be the same target positions");
  TORCH_CHECK(teacher_weight.size(0) <= student_weight.size(0), "kd_loss: the teacher's head has ",
              teacher_weight.size(0), " rows (the compared vocabulary) and the student's only ", student_weight.size(0),
              "; the compared vocabulary must be the first rows of both (slice the teacher's head: freeze_teacher)");
  TORCH_CHECK(!labels.defined() || (labels.dim() == 1 && labels.size(0) == student_hidden.size(0) &&
                                    labels.scalar_type() == at::kLong),
              "kd_ce_loss: labels must be (N) int64 for the ", student_hidden.size(0), " rows, got ",
              labels.defined() ? labels.sizes() : at::IntArrayRef{});
  auto hs = student_hidden, ws = student_weight;
  const auto device_type = hs.device().type();
  if (at::autocast::is_autocast_enabled(device_type)) {
    // As train/loss.h: autocast does not reach into a Function, so cast where autograd records it.
    const auto dtype = at::autocast::get_autocast_dtype(device_type);
    hs = hs.to(dtype), ws = ws.to(dtype);
  } else if (hs.scalar_type() != ws.scalar_type()) {
    hs = hs.to(ws.scalar_type());
  }
  auto ht = teacher_hidden.detach(), wt = teacher_weight.detach();
  if (ht.scalar_type() != wt.scalar_type()) ht = ht.to(wt.scalar_type());
  const auto lab = labels.defined() ? labels.to(hs.device()) : at::empty({0}, hs.options().dtype(at::kLong));
  const auto out = ChunkedKdCeLoss::apply(hs, ws, ht, wt, lab, kd_weight, ce_weight, int64_t(o.loss), o.temperature,
                                          o.skew_lambda, o.jsd_beta, o.chunk, at::GradMode::is_enabled(), o.fused);
  return KdCeLoss{out[0], out[1], out[2]};
}

at::Tensor kd_divergence_sparse(const at::Tensor& student_logprobs, const at::Tensor& teacher_ids,
                                const at::Tensor& teacher_logprobs, const KdOptions& o) {
  check_options(o);
  TORCH_CHECK(student_logprobs.dim() == 2, "kd_divergence_sparse: the student's log-probabilities must be (N, V), got ",
              student_logprobs.sizes());
  check_sparse_teacher(teacher_ids, teacher_logprobs, student_logprobs.size(0), student_logprobs.size(1),
                       "kd_divergence_sparse");
  const auto c = coarsen(student_logprobs, teacher_ids.to(at::kLong), teacher_logprobs);
  return kd_divergence(c.ls, c.lt, o);
}

at::Tensor kd_loss_sparse(const at::Tensor& student_hidden, const at::Tensor& student_weight,
                          const at::Tensor& teacher_ids, const at::Tensor& teacher_logprobs, double normalizer,
                          const KdOptions& o) {
  check_options(o);
  TORCH_CHECK(student_hidden.dim() == 2 && student_weight.dim() == 2 && student_hidden.size(1) == student_weight.size(1),
              "kd_loss_sparse: student hidden (N, H) ", student_hidden.sizes(), " must match its head (V, H) ",
              student_weight.sizes());
  check_sparse_teacher(teacher_ids, teacher_logprobs, student_hidden.size(0), student_weight.size(0), "kd_loss_sparse");
  auto hs = student_hidden, ws = student_weight;
  const auto device_type = hs.device().type();
  if (at::autocast::is_autocast_enabled(device_type)) {  // as kd_loss
    const auto dtype = at::autocast::get_autocast_dtype(device_type);
    hs = hs.to(dtype), ws = ws.to(dtype);
  } else if (hs.scalar_type() != ws.scalar_type()) {
    hs = hs.to(ws.scalar_type());
  }
  const auto ids = teacher_ids.detach().to(hs.device(), at::kLong);                           // (N, k)
  const auto tlp = teacher_logprobs.detach().to(hs.device(), accumulate_type(student_hidden));  // (N, k)
  const double scale = normalizer > 0 ? 1.0 / normalizer : 0.0;
  return ChunkedSparseKdLoss::apply(hs, ws, ids, tlp, scale, int64_t(o.loss), o.temperature, o.skew_lambda,
                                    o.jsd_beta, o.chunk);
}

at::Tensor uld_divergence(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                          const at::Tensor& shared_student_ids, const at::Tensor& shared_teacher_ids,
                          const UldOptions& o) {
  TORCH_CHECK(student_logits.dim() == 2 && teacher_logits.dim() == 2 && student_logits.size(0) == teacher_logits.size(0),
              "uld_divergence: student (N, Vs) ", student_logits.sizes(), " and teacher (N, Vt) ", teacher_logits.sizes(),
              " logits must have the same aligned rows");
  if (!(o.student_temperature > 0) || !(o.teacher_temperature > 0))
    throw std::invalid_argument("uld_divergence: temperatures must be > 0");
  const auto acc = accumulate_type(student_logits);
  return uld_divergence_probs(at::softmax(student_logits.to(acc) / o.student_temperature, 1),   // (N, Vs)
                              at::softmax(teacher_logits.to(acc) / o.teacher_temperature, 1),   // (N, Vt)
                              shared_student_ids, shared_teacher_ids, o);
}

at::Tensor uld_divergence_probs(const at::Tensor& q, const at::Tensor& p, const at::Tensor& shared_student_ids,
                                const at::Tensor& shared_teacher_ids, const UldOptions& o) {
  TORCH_CHECK(q.dim() == 2 && p.dim() == 2 && q.size(0) == p.size(0), "uld_divergence: student (N, Vs) ", q.sizes(),
              " and teacher (N, Vt) ", p.sizes(), " probabilities must have the same aligned rows");
  if (!(o.jsd_beta >= 0 && o.jsd_beta <= 1)) throw std::invalid_argument("uld_divergence: jsd_beta must be in [0, 1]");
  if ((o.matched_weight < 0) != (o.unmatched_weight < 0))
    throw std::invalid_argument("uld_divergence: matched_weight and unmatched_weight must both be set (>= 0) or both "
                                "adaptive (< 0), as GOLD's uld_hybrid_*_weight");
  // sum_i |sort(a)_i - sort(b)_i| per row, the shorter zero-padded (probabilities sorted descending).
  auto sorted_l1 = [](const at::Tensor& a, const at::Tensor& b) {
    auto sa = std::get<0>(a.sort(1, /*descending=*/true)), sb = std::get<0>(b.sort(1, /*descending=*/true));
    const int64_t w = std::max(sa.size(1), sb.size(1));
    if (sa.size(1) < w) sa = at::constant_pad_nd(sa, {0, w - sa.size(1)});
    if (sb.size(1) < w) sb = at::constant_pad_nd(sb, {0, w - sb.size(1)});
    return (sa - sb).abs().sum(1);  // (N)
  };
  const int64_t m = shared_teacher_ids.defined() ? shared_teacher_ids.numel() : 0;
  if (!o.hybrid || m == 0) return sorted_l1(q, p);
  TORCH_CHECK(shared_student_ids.numel() == m, "uld_divergence: ", m, " shared teacher ids but ",
              shared_student_ids.numel(), " student ids");
  const auto sid = shared_student_ids.to(q.device(), at::kLong), tid = shared_teacher_ids.to(q.device(), at::kLong);
  TORCH_CHECK(sid.min().item<int64_t>() >= 0 && sid.max().item<int64_t>() < q.size(1) &&
                  tid.min().item<int64_t>() >= 0 && tid.max().item<int64_t>() < p.size(1),
              "uld_divergence: a shared id lies outside the logits' columns (student ", q.size(1), ", teacher ",
              p.size(1), ")");
  // 1. The shared tokens, id by id: GOLD's generalized JSD on the probabilities (logits_are_probs: log of clamped).
  KdOptions jsd;
  jsd.loss = KdLoss::kJsd, jsd.jsd_beta = o.jsd_beta;
  const auto matched = kd_divergence(q.index_select(1, sid).clamp_min(1e-8).log(),
                                     p.index_select(1, tid).clamp_min(1e-8).log(), jsd);  // (N)
  // 2. The rest, sorted.
  auto rest = [](const at::Tensor& probs, const at::Tensor& ids) {
    auto keep = at::ones({probs.size(1)}, probs.options().dtype(at::kBool));
    keep.index_fill_(0, ids, false);
    return probs.index_select(1, keep.nonzero().squeeze(1));  // (N, V - M')
  };
  const auto qr = rest(q, sid), pr = rest(p, tid);
  const auto unmatched = qr.size(1) > 0 && pr.size(1) > 0 ? sorted_l1(qr, pr) : at::zeros_like(matched);
  const double wm = o.matched_weight >= 0 ? o.matched_weight : double(m) / double(std::max<int64_t>(1, p.size(1)));
  const double wu = o.unmatched_weight >= 0 ? o.unmatched_weight : 1.0 - wm;
  return wm * matched + wu * unmatched;
}

at::Tensor target_rows(const at::Tensor& labels) {
  return (labels.reshape({-1}) != kIgnoreIndex).nonzero().squeeze(1);  // (T) int64
}

// ---- a student and a frozen teacher on packed batches --------------------------------------------------

at::Tensor head_weight(const model::CausalLM& m) {
  return m.lm_head ? m.lm_head->weight : m.model->embed_tokens->weight;
}

at::Tensor batch_hidden(model::CausalLM& m, const at::Tensor& all, bool packed) {
  return m.hidden_states(all[0], nullptr, all[1], packed ? c10::optional<at::Tensor>(all[2]) : c10::nullopt);
}

at::Tensor student_ce(model::CausalLM& student, const at::Tensor& h, const at::Tensor& labels, double normalizer,
                      int64_t ce_chunk, double kd_ratio) {
  c10::optional<at::NoGradGuard> no_grad;
  if (kd_ratio >= 1) no_grad.emplace();
  if (student.lm_head && student.lm_head->adapter) {
    const double inv = normalizer > 0 ? 1.0 / normalizer : 0.0;
    return at::cross_entropy_loss(student.lm_head->forward(h).to(at::kFloat), labels, {}, at::Reduction::Sum,
                                  kIgnoreIndex) * inv;
  }
  return causal_lm_loss(h, head_weight(student), labels, normalizer, ce_chunk);
}

namespace {

// The teacher's hidden states at the target rows (T, Ht), on `device`, without autograd.
at::Tensor teacher_rows(const Teacher& teacher, const data::Batch& b, const at::Tensor& rows, at::Device device) {
  at::NoGradGuard no_grad;
  const auto all = batch_to_device(b, teacher.model->device());
  auto h = batch_hidden(*teacher.model, all, b.packed);  // (B, S, Ht)
  return h.reshape({-1, h.size(-1)}).index_select(0, rows.to(h.device())).to(device);
}

}  // namespace

Teacher freeze_teacher(std::shared_ptr<model::CausalLM> model, at::Device student_device, int64_t vocab) {
  model->eval();
  for (auto& p : model->parameters(/*recurse=*/true)) p.set_requires_grad(false);
  Teacher t;
  t.head = head_weight(*model).detach();  // (V_teacher, Ht)
  if (vocab < 0 || vocab > t.head.size(0))
    throw std::invalid_argument("freeze_teacher: the compared vocabulary (" + std::to_string(vocab) +
                                " rows) must be 0 (all) or at most the teacher's " + std::to_string(t.head.size(0)) + " head rows");
  if (vocab > 0 && vocab < t.head.size(0)) t.head = t.head.narrow(0, 0, vocab);  // the padded rows left out
  if (t.head.device() != student_device) t.head = t.head.to(student_device);
  t.model = std::move(model);
  return t;
}

KdBatchLoss kd_batch_loss(model::CausalLM& student, const Teacher& teacher, const data::Batch& b, double normalizer,
                          const KdOptions& o, double kd_ratio, int64_t ce_chunk, at::Device device) {
  const auto all = batch_to_device(b, device);  // (4, B, S) ids, positions, doc ids, labels
  const auto labels = all[3].reshape({-1});     // (B*S)
  auto h = batch_hidden(student, all, b.packed);   // (B, S, Hs)
  h = h.reshape({-1, h.size(-1)});                 // (B*S, Hs)
  const auto ws = head_weight(student);
  KdBatchLoss out;
  // The student's head with an adapter (a LoRA on lm_head) is no plain (V, H) matrix: its logits are taken whole.
  const bool adapted_head = student.lm_head && student.lm_head->adapter;
  const double inv = normalizer > 0 ? 1.0 / normalizer : 0.0;
  if (kd_ratio > 0 && !adapted_head) {
    // One pass over the target rows gives both terms: the student's logits are made once for CE and KD.
    const auto rows = target_rows(labels);                   // (T)
    const auto ht = teacher_rows(teacher, b, rows, device);  // (T, Ht)
    const double ce_weight = kd_ratio >= 1 ? 0.0 : (1 - kd_ratio) * inv;
    const auto l = kd_ce_loss(h.index_select(0, rows), ws, ht, teacher.head, labels.index_select(0, rows),
                              kd_ratio * inv, ce_weight, o);
    out.total = l.total.to(at::kFloat);
    out.kd = (l.kd * inv).to(at::kFloat), out.ce = (l.ce * inv).to(at::kFloat);
    return out;
  }
  at::Tensor kd = at::zeros({}, h.options().dtype(at::kFloat));
  const at::Tensor ce = student_ce(student, h, labels, normalizer, ce_chunk, kd_ratio);  // logged at kd_ratio 1 too
  if (kd_ratio > 0) {  // the adapted head: its logits taken whole
    const auto rows = target_rows(labels);                   // (T)
    const auto ht = teacher_rows(teacher, b, rows, device);  // (T, Ht)
    const auto zt = at::linear(ht, teacher.head);            // (T, V)
    const auto zs = student.lm_head->forward(h.index_select(0, rows)).narrow(1, 0, zt.size(1));  // (T, V) compared
    kd = kd_divergence_from_logits(zs, zt, o).sum().to(at::kFloat) * inv;
  }
  out.total = kd_ratio >= 1 ? kd : kd_ratio <= 0 ? ce : (1 - kd_ratio) * ce + kd_ratio * kd;
  out.kd = kd.detach(), out.ce = ce.detach();
  return out;
}

LossFn kd_loss_fn(model::CausalLM& student, const Teacher& teacher, const KdOptions& o, double kd_ratio,
                  int64_t ce_chunk, at::Device device) {
  return [&student, &teacher, o, kd_ratio, ce_chunk, device](const data::Batch& b, double normalizer) {
    auto l = kd_batch_loss(student, teacher, b, normalizer, o, kd_ratio, ce_chunk, device);
    if (kd_ratio <= 0) return Loss{l.total, {{"ce", l.ce}}};  // the teacher is not run: no kd to log
    return Loss{l.total, {{"kd", l.kd}, {"ce", l.ce}}};
  };
}

EvalResult evaluate_student(model::CausalLM& student, const data::PackedRows& rows, int64_t batch_size,
                            int64_t max_batches, int64_t chunk, at::Device device, const BatchTeacher& teacher,
                            const EvalShard& shard) {
  const bool was_training = student.is_training();
  student.eval();
  at::NoGradGuard no_grad;
  const auto dopt = at::TensorOptions().dtype(at::kDouble).device(device);
  auto ce_sum = at::zeros({}, dopt), kl_sum = at::zeros({}, dopt), agree = at::zeros({}, dopt);
  int64_t targets = 0;
  const auto ws = head_weight(student);
  for (int64_t i = 0, begin = 0; begin < rows.rows; ++i, begin += batch_size) {
    if (max_batches > 0 && i >= max_batches) break;
    if (!shard.mine(i)) continue;
    const auto b = data::slice_rows(rows, begin, std::min(rows.rows, begin + batch_size));
    if (b.targets == 0) continue;
    const auto all = batch_to_device(b, device);
    const auto labels = all[3].reshape({-1});
    auto h = batch_hidden(student, all, b.packed);
    h = h.reshape({-1, h.size(-1)});  // (B*S, Hs)
    const auto sel = target_rows(labels);
    const auto hs = h.index_select(0, sel);       // (T, Hs)
    const auto tl = labels.index_select(0, sel);  // (T)
    const auto score = teacher(b, sel);
    for (int64_t s = 0; s < hs.size(0); s += chunk) {
      const int64_t e = std::min(hs.size(0), s + chunk);
      const auto zs = (student.lm_head ? student.lm_head->forward(hs.slice(0, s, e)) : at::linear(hs.slice(0, s, e), ws))
                          .to(at::kFloat);  // (rows, V)
      const auto ls = at::log_softmax(zs, 1);
      ce_sum -= ls.gather(1, tl.slice(0, s, e).unsqueeze(1)).sum().to(at::kDouble);
      const auto [kl, same] = score(s, e, zs, ls);
      kl_sum += kl.to(at::kDouble);
      agree += same.to(at::kDouble);
    }
    targets += b.targets;
  }
  if (was_training) student.train();
  EvalResult r;
  r.targets = targets;
  const double n = targets ? double(targets) : 1.0;
  r.loss = ce_sum.item<double>() / n;
  r.ppl = std::exp(r.loss);
  r.terms = {{"kl", kl_sum.item<double>() / n}, {"top1", agree.item<double>() / n}};
  return r;
}

EvalResult evaluate_against_teacher(model::CausalLM& student, const Teacher& teacher, const data::PackedRows& rows,
                                    int64_t batch_size, int64_t max_batches, int64_t chunk, at::Device device,
                                    const EvalShard& shard) {
  KdOptions kl;  // forward KL at temperature 1: the student's KL to the teacher
  kl.chunk = chunk;
  return evaluate_student(student, rows, batch_size, max_batches, chunk, device,
                          [&](const data::Batch& b, const at::Tensor& sel) -> ChunkScore {
                            const auto ht = teacher_rows(teacher, b, sel, device);  // (T, Ht)
                            return [&teacher, &kl, ht](int64_t s, int64_t e, const at::Tensor& zs, const at::Tensor& ls) {
                              const auto zt = at::linear(ht.slice(0, s, e), teacher.head).to(at::kFloat);  // (rows, V)
                              const auto lt = at::log_softmax(zt, 1);
                              // KL and agreement over the compared vocabulary (the teacher's head rows; the
                              // student's padding left out).
                              const bool padded = zt.size(1) < zs.size(1);
                              const auto zk = padded ? zs.narrow(1, 0, zt.size(1)) : zs;  // (rows, V)
                              return std::make_pair(kd_divergence(padded ? at::log_softmax(zk, 1) : ls, lt, kl).sum(),
                                                    (zk.argmax(1) == zt.argmax(1)).sum());
                            };
                          }, shard);
}

EvalFn kd_eval_fn(model::CausalLM& student, const Teacher& teacher, const TrainingData& data, const TrainSection& t,
                  const EvalSection& e, int64_t chunk, at::Device device) {
  if (data.validation_rows.rows == 0) return nullptr;
  return [&student, &teacher, &data, batch = t.batch_size, max = e.max_batches, chunk, device](const EvalShard& shard) {
    return evaluate_against_teacher(student, teacher, data.validation_rows, batch, max, chunk, device, shard);
  };
}

}  // namespace anvil::train
