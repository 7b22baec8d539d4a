"""anvil.nn: modules over anvil's fused ops, drop-in for the pieces of a transformers decoder they replace.

Each module computes what its transformers counterpart computes (the CPU kernels reproduce the composites'
roundings: docs/FORMATS.md, "Fused training ops"), with parameters of the same names, so a state_dict moves
between the two unchanged and ``anvil.patch`` can swap them into a loaded model:

    RMSNorm                 LlamaRMSNorm / Qwen2RMSNorm / Qwen3RMSNorm / MistralRMSNorm / ...    anvil::rms_norm
    SwiGLUMLP               LlamaMLP's down_proj(act_fn(gate_proj(x)) * up_proj(x)), act silu    anvil::swiglu
    apply_rotary_pos_emb    transformers' apply_rotary_pos_emb (and DeepSeek's interleaved one)  anvil::rope
    linear_cross_entropy    lm_head + ForCausalLMLoss, chunked, gradients formed in the forward  cross_entropy_chunk
    attention_forward       transformers' attention interface (causal, sliding window, GQA)      anvil::sparse_attention
    Fp8Linear               a Linear over a frozen FP8 weight                                    anvil::fp8_linear

Gradients come from the ops' C++ autograd (registered for the Autograd key), except linear_cross_entropy, whose
Python Function forms the gradients of the hidden states and the head chunk by chunk in its forward (as Liger's
fused linear cross-entropy): no (tokens, vocab) logits tensor ever exists whole, in any dtype.
"""
import torch
import torch.nn.functional as F

ops = torch.ops.anvil


# ---- RMSNorm --------------------------------------------------------------------------------------------------


class RMSNorm(torch.nn.Module):
    """y = weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype), through anvil::rms_norm.

    The attribute names are transformers' (``weight``, ``variance_epsilon``), so LlamaRMSNorm's state_dict loads
    and code reading ``norm.variance_epsilon`` keeps working. The op needs weight in x's dtype; otherwise (an fp32
    weight under a bf16 activation, as mixed-precision setups produce) the module runs transformers' composite,
    which promotes the product to the wider dtype as transformers does."""

    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    @classmethod
    def from_module(cls, module):
        """An RMSNorm sharing ``module.weight`` (the same Parameter object, so optimizers holding it still step it)."""
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        if eps is None:
            raise ValueError(f"anvil.nn.RMSNorm.from_module: {type(module).__name__} has no variance_epsilon or eps")
        new = cls.__new__(cls)
        torch.nn.Module.__init__(new)
        new.weight = module.weight
        new.variance_epsilon = float(eps)
        return new

    def forward(self, x):
        if self.weight.dtype == x.dtype and x.is_floating_point():
            # (..., H) in x's dtype; the op wants a contiguous x (the residual stream always is)
            return ops.rms_norm(x.contiguous(), self.weight, self.variance_epsilon)[0]
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(x.dtype)

    def extra_repr(self):
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, anvil::rms_norm"


# ---- SwiGLU ---------------------------------------------------------------------------------------------------


def swiglu(gate, up):
    """silu(gate) * up (both (..., F), one dtype) through anvil::swiglu: one pass instead of three."""
    return ops.swiglu(gate.contiguous(), up.contiguous())


class SwiGLUMLP(torch.nn.Module):
    """down_proj(silu(gate_proj(x)) * up_proj(x)), LlamaMLP's forward with the activation and product fused.

    Submodules are named as transformers names them (gate_proj, up_proj, down_proj), so checkpoints, LoRA
    targeting and PEFT wrappers see the same tree. ``from_module`` reuses an MLP's own Linear children."""

    def __init__(self, hidden_size, intermediate_size, bias=False):
        super().__init__()
        self.gate_proj = torch.nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = torch.nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = torch.nn.Linear(intermediate_size, hidden_size, bias=bias)

    @classmethod
    def from_module(cls, module):
        new = cls.__new__(cls)
        torch.nn.Module.__init__(new)
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(new, name, getattr(module, name))
        return new

    def forward(self, x):
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


# ---- rotary embedding -----------------------------------------------------------------------------------------


def rope(x, cos, sin, interleaved=False):
    """Rotates x (B, H, S, D), transformers' head layout, by cos, sin (B or 1, S, D) through anvil::rope.

    Equal bit for bit to transformers' ``q * cos + rotate_half(q) * sin`` (interleaved=False) or DeepSeek's
    ``apply_rotary_pos_emb_interleave`` (interleaved=True). Returns a (B, H, S, D) view of a contiguous
    (B, S, H, D) tensor (the layout the projection produced it in, so no copy either way)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos = cos.to(x.dtype).contiguous()
    sin = sin.to(x.dtype).contiguous()
    return ops.rope(x.transpose(1, 2), cos, sin, interleaved).transpose(1, 2)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1, interleaved=False):
    """transformers' ``apply_rotary_pos_emb(q, k, cos, sin)`` for q, k (B, H, S, D) and cos, sin (B, S, D)."""
    if unsqueeze_dim != 1:
        raise ValueError(f"anvil.nn.apply_rotary_pos_emb: unsqueeze_dim must be 1 (q and k as (B, H, S, D)), "
                         f"got {unsqueeze_dim}")
    return rope(q, cos, sin, interleaved), rope(k, cos, sin, interleaved)


# ---- fused linear + cross-entropy -------------------------------------------------------------------------------

def auto_chunk_tokens(n, vocab, hidden):
    """Rows per chunk when none is given: about N / ceil(V / H), rounded up to a power of two, so that a chunk's
    logits (c, V) take about as much memory as the hidden states (N, H) themselves (Liger's rule; e.g. 256 rows
    for 8192 tokens of a 2048-wide, 128256-row head)."""
    per = max(1, -(-n // max(1, -(-vocab // hidden))))
    return 1 << (per - 1).bit_length()



def _accumulate_product(acc, a, b):
    """acc (V, H) += a (V, c) @ b (c, H). On CUDA acc has the operands' dtype and the GEMM adds into it in its
    epilogue (forming the product, widening it and adding moved ~20 bytes per head element per chunk); the CPU
    accumulates in fp32: the product in the operands' dtype, widened and added."""
    if acc.is_cuda:
        acc.addmm_(a, b)
    else:
        acc += (a @ b).to(acc.dtype)


# At most this many chunks add into a half/bf16 head gradient on CUDA (each rounds the running sum once).
_MAX_HEAD_GRAD_CHUNKS = 16


class _LinearCrossEntropy(torch.autograd.Function):
    """sum over rows of CE(hidden @ weight^T + bias, labels) / divisor, chunk by chunk.

    Per chunk of rows: logits (c, V) in hidden's dtype -> anvil::cross_entropy_chunk (fp32 loss and lse) ->
    anvil::cross_entropy_chunk_backward in place (the logits buffer becomes dloss/dlogits, scaled by 1/divisor)
    -> dh rows = dlogits @ W, dW += dlogits^T @ h (fp32 on the CPU; on CUDA in the head's dtype, as Liger's, added
    in the GEMM's epilogue over at most 16 chunks). The backward only scales what the forward
    formed by the upstream gradient, so the head GEMM runs twice per chunk (forward, two gradient GEMMs) and
    never again, and memory is one chunk of logits plus dh (N, H) and dW (V, H)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, divisor, chunk_tokens, want_grad):
        # hidden (N, H), weight (V, H), bias (V) or None, labels (N) int64, divisor () fp32
        n = hidden.shape[0]
        need_h, need_w, need_b = (want_grad and t is not None and t.requires_grad for t in (hidden, weight, bias))
        need_any = need_h or need_w or need_b
        scale = (1.0 / divisor).to(torch.float32).reshape(())  # () fp32, the mean's 1/valid (or 1/num_items)
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None  # (N, H)
        # (V, H). On CUDA in the head's own dtype, as Liger's: an fp32 accumulator (V x H x 4 bytes, 1 GiB for a
        # 128256 x 2048 head) and its cast at the end lie on the step's memory peak (the loss runs when every
        # activation is alive) and cost 0.9 GiB there, and its read-modify-write doubles the epilogue's traffic.
        # The GEMM adds each chunk in fp32 and rounds the sum once per chunk; the caller's chunking keeps that to
        # at most _MAX_HEAD_GRAD_CHUNKS roundings. The CPU (the reference) accumulates in fp32.
        acc_dtype = weight.dtype if weight.is_cuda else torch.float32
        grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None  # (V)
        for lo in range(0, n, chunk_tokens):
            h = hidden[lo:lo + chunk_tokens]  # (c, H)
            y = labels[lo:lo + chunk_tokens]  # (c)
            logits = F.linear(h, weight, bias).contiguous()  # (c, V) in hidden's dtype
            loss, lse = ops.cross_entropy_chunk(logits, y, ignore_index)  # (c) fp32 each, 0 where ignored
            loss_sum = loss_sum + loss.sum()
            if not need_any:
                continue
            ops.cross_entropy_chunk_backward(logits, y, lse, scale, ignore_index)  # logits <- dloss/dlogits
            if need_h:
                grad_h[lo:lo + chunk_tokens] = logits @ weight
            if need_w:
                _accumulate_product(grad_w, logits.t(), h)
            if need_b:
                grad_b += logits.float().sum(0)
        ctx.save_for_backward(grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                              None if grad_b is None else grad_b.to(bias.dtype))
        return loss_sum / divisor  # as F.cross_entropy's mean (sum / count), not sum * (1 / count)

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        # The loss is almost always the graph's root (grad_out == 1): eager skips the multiply and its (V, H)
        # copy, which would land on the step's memory peak. torch.compile cannot branch on a tensor's value, so
        # a compiled graph always multiplies (fullgraph=True holds: no graph break).
        unit = not torch.compiler.is_compiling() and torch.equal(grad_out, torch.ones_like(grad_out))
        scaled = [g if g is None or unit else g * grad_out.to(g.dtype) for g in (grad_h, grad_w, grad_b)]
        return scaled[0], scaled[1], scaled[2], None, None, None, None, None


def linear_cross_entropy(hidden, weight, labels, bias=None, ignore_index=-100, num_items_in_batch=None,
                         shift=True, shift_labels=None, chunk_tokens=None):
    """A causal LM's loss from its last hidden states, as transformers' ``ForCausalLMLoss(lm_head(hidden), labels)``.

    hidden (B, S, H) or (N, H); weight (V, H), the head's; labels (B, S) (shifted here when ``shift``: position t
    predicts labels[t + 1], the last position ignored) or ``shift_labels`` already aligned. The mean over labels
    != ignore_index, or the sum / ``num_items_in_batch`` when given (transformers' gradient-accumulation rule).
    Rows run ``chunk_tokens`` at a time (None: auto_chunk_tokens, and at least N / 16 rows for a half/bf16 head
    that requires grad on CUDA); the (N, V) logits are never formed whole and never upcast."""
    if chunk_tokens is not None and (isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int)
                                     or chunk_tokens < 1):
        raise ValueError(f"anvil.nn.linear_cross_entropy: chunk_tokens must be None or an int >= 1, "
                         f"got {chunk_tokens!r}")
    if shift_labels is None:
        if shift:
            shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        else:
            shift_labels = labels
    h = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    y = shift_labels.reshape(-1).to(device=h.device, dtype=torch.long).contiguous()  # (N)
    if y.shape[0] != h.shape[0]:
        raise ValueError(f"anvil.nn.linear_cross_entropy: labels give {y.shape[0]} targets for {h.shape[0]} "
                         f"hidden rows")
    if num_items_in_batch is None:
        divisor = (y != ignore_index).sum().to(torch.float32)
    else:
        divisor = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=h.device)
    if chunk_tokens is None:
        chunk_tokens = auto_chunk_tokens(h.shape[0], weight.shape[0], weight.shape[1])
        if weight.is_cuda and weight.requires_grad and weight.dtype in (torch.bfloat16, torch.float16):
            # the head gradient's roundings (see _LinearCrossEntropy.forward); a 1B Llama at 8192 tokens: 512 rows
            per = -(-h.shape[0] // _MAX_HEAD_GRAD_CHUNKS)
            chunk_tokens = max(chunk_tokens, 1 << (per - 1).bit_length())
    want_grad = torch.is_grad_enabled()
    return _LinearCrossEntropy.apply(h, weight, bias, y, ignore_index, divisor, chunk_tokens, want_grad)


class LinearCrossEntropyLoss(torch.nn.Module):
    """Module form of linear_cross_entropy: ``loss_fn(hidden, lm_head.weight, labels)``."""

    def __init__(self, ignore_index=-100, shift=True, chunk_tokens=None):
        super().__init__()
        self.ignore_index, self.shift, self.chunk_tokens = ignore_index, shift, chunk_tokens

    def forward(self, hidden, weight, labels, bias=None, num_items_in_batch=None):
        return linear_cross_entropy(hidden, weight, labels, bias, self.ignore_index, num_items_in_batch, self.shift,
                                    chunk_tokens=self.chunk_tokens)


# ---- attention backend -----------------------------------------------------------------------------------------


def _packed_documents(position_ids):
    """The packed documents of position_ids (B, S) (a new one wherever the position does not step by 1, transformers'
    rule) -> (docs, cu): docs (B, S) int64 document index per token and, for B = 1, cu (docs + 1) int32 the
    cu_seqlens of anvil::sparse_attention; (None, None) when every row is one document. Computed once per
    position_ids tensor (every layer of a forward gets the same one): it reads back from the device."""
    hit = getattr(position_ids, "_anvil_documents", None)  # (its version, the result), set below
    if hit is not None and hit[0] == position_ids._version:
        return hit[1]
    new_doc = F.pad(position_ids.diff(dim=-1) != 1, (1, 0), value=False)  # (B, S)
    docs = cu = None
    if bool(new_doc.any()):
        docs = new_doc.long().cumsum(-1)
        if docs.shape[0] == 1:
            lengths = torch.bincount(docs[0], minlength=int(docs[0, -1]) + 1)  # (docs)
            cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    position_ids._anvil_documents = (position_ids._version, (docs, cu))
    return docs, cu


def _allowed_keys(attention_mask, q_len, kv_len, window, device, docs=None):
    """(B or 1, 1, q_len, kv_len) bool: causal (the queries are the last q_len of the kv_len positions), within the
    window, and not a padded key of the 2-D mask; a query row with no key left (a padded query) sees every key, as
    transformers' sdpa mask does, so that no row of the softmax is empty."""
    i = torch.arange(q_len, device=device).view(-1, 1) + (kv_len - q_len)  # (q, 1)
    j = torch.arange(kv_len, device=device).view(1, -1)  # (1, kv)
    allowed = j <= i
    if window > 0:
        allowed = allowed & (j > i - window)
    allowed = allowed.view(1, 1, q_len, kv_len)
    if docs is not None:  # (B, S) document of each token, q_len == kv_len: no key of another document
        allowed = allowed & (docs.unsqueeze(-1) == docs.unsqueeze(-2)).unsqueeze(1)
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, -kv_len:].to(device=device, dtype=torch.bool).view(-1, 1, 1, kv_len)
    return allowed | ~allowed.any(-1, keepdim=True)


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                      **kwargs):
    """transformers' attention interface through anvil::sparse_attention: query (B, Hq, S, Dqk), key (B, Hkv, S, Dqk),
    value (B, Hkv, S, Dv) -> ((B, S, Hq, Dv), None), causal, with the layer's sliding window (query i sees key j when
    i - window < j <= i, transformers' rule) and grouped kv heads read directly.

    The mask it gets is transformers' flash-attention one (``anvil.patch`` registers it): None when nothing is padded.
    The kernel runs for that case in training and prefill, packed documents of one row (position_ids restarting,
    as transformers' packing collators make them) through cu_seqlens; a padded batch, packed rows with B > 1, a
    decode step (fewer queries than cached keys), attention dropout, or an argument the kernel has no notion of (softcap, sinks) runs transformers' SDPA
    with the equivalent dense mask instead, so every call computes what transformers would."""
    window = int(sliding_window) if sliding_window else -1
    q_len, kv_len = query.shape[2], key.shape[2]
    exotic = kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None
    pos = kwargs.get("position_ids")
    docs, cu = (_packed_documents(pos) if pos is not None and q_len == kv_len and pos.shape[-1] == q_len
                else (None, None))
    if attention_mask is None and q_len == kv_len and not dropout and not exotic and (docs is None or cu is not None):
        o, _ = ops.sparse_attention(query, key, value, None, None, cu, window, 0, 64, scaling, False)
        return o.transpose(1, 2), None  # (B, S, Hq, Dv), a view of the kernel's (B, Hq, S, Dv)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is not None and attention_mask.dim() == 4:
        mask = attention_mask  # already dense (a mask function other than the one anvil.patch registers)
    else:
        mask = _allowed_keys(attention_mask, q_len, kv_len, window, query.device, docs)
    return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)


# ---- FP8 Linear -----------------------------------------------------------------------------------------------


class Fp8Linear(torch.nn.Module):
    """y = x W^T + bias over a frozen FP8 weight, as include/anvil/fp8_linear.h: buffers ``weight`` (N, K)
    float8_e4m3fn and ``weight_scale_inv`` (ceil(N/128), K/128) fp32 (DeepSeek-V3 / FineGrainedFP8 names),
    an optional trainable ``bias``; x is quantized to 1x128 blocks on the fly. Gradients reach x and bias."""

    def __init__(self, weight, weight_scale_inv, bias=None):
        super().__init__()
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("weight_scale_inv", weight_scale_inv.contiguous())
        self.bias = torch.nn.Parameter(bias.contiguous()) if bias is not None else None

    @classmethod
    def from_float(cls, weight, bias=None):
        """Quantizes a float weight (N, K) to e4m3 with 128x128 block scales."""
        q, s = ops.quantize_fp8(weight.contiguous(), "block128x128")
        return cls(q, s, bias)

    def forward(self, x):
        return ops.fp8_linear(x, self.weight, self.weight_scale_inv, self.bias)


__all__ = ["RMSNorm", "swiglu", "SwiGLUMLP", "rope", "apply_rotary_pos_emb", "linear_cross_entropy",
           "LinearCrossEntropyLoss", "auto_chunk_tokens", "attention_forward", "Fp8Linear"]
