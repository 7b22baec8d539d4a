"""anvil.patch(model): anvil's fused kernels swapped into a transformers causal LM, in place, in one call.

What each option replaces (transformers 5.17's modeling code; docs/PYTHON.md has the table):
  rms_norm       every <Arch>RMSNorm module (the layer norms, the final norm, Qwen3's q/k norms, MLA's latent
                 norms) by anvil.nn.RMSNorm holding the same weight Parameter
  swiglu         every dense <Arch>MLP (DeepSeek's dense layers and shared experts, Qwen2-MoE's shared expert
                 included) by anvil.nn.SwiGLUMLP holding the same gate/up/down Linears, and the routed experts' gate
                 (Mixtral, Qwen-MoE, DeepSeek: the
                 ``_apply_gate`` of transformers' grouped_mm / batched_mm experts paths) by anvil::swiglu; hidden_act
                 must be silu, and the experts path not "eager" (its Python loop has the product inline)
  moe_gate       the MoE routers' scoring, group limiting and top-k (MixtralTopKRouter, Qwen2MoeTopKRouter,
                 Qwen3MoeTopKRouter, DeepseekV2TopkRouter, DeepseekV3TopkRouter) by anvil::moe_gate, the router's own
                 weight and correction bias
  rope           the attention modules' apply_rotary_pos_emb (DeepSeek-V3's interleaved variant too) by anvil::rope
  cross_entropy  the CausalLM's forward: with labels in training mode, the loss comes from the last hidden states
                 through anvil.nn.linear_cross_entropy (chunked; logits are returned as None, as Liger does); without
                 labels, or in eval mode, the original forward runs unchanged
  attention      the model's attention implementation: "anvil" (anvil.nn.attention_forward over anvil::sparse_attention,
                 causal with each layer's sliding window, grouped kv heads, packed documents of position_ids),
                 registered in transformers' AttentionInterface with the flash-attention mask function (None when
                 nothing is padded). The one option off unless asked (None = off): inside a model it has not yet been
                 measured against the SDPA/cuDNN kernels transformers uses by default.

Each option is None (the default: on where the architecture supports it, otherwise skipped and said so in the
report), True (required: an architecture that cannot take it is an error) or False (off). Every check runs before
the first module is touched, so an error leaves the model as it was.

The rotary hook is the one piece that is not per instance: transformers' attention forwards call the module-level
function ``apply_rotary_pos_emb`` of their modeling file, so patching installs a wrapper there once, and the wrapper
runs anvil::rope only inside the forward of an attention module that was patched (a thread-local depth count) and
calls the original function otherwise: unpatched models in the same process compute what they always did.
"""
import dataclasses
import importlib
import threading
import types

import torch

from . import nn as _nn

_OPTIONS = ("rms_norm", "swiglu", "moe_gate", "rope", "cross_entropy", "attention")


@dataclasses.dataclass(frozen=True)
class _Arch:
    module: str  # transformers.models.<x>.modeling_<x>
    norm: str  # the RMSNorm class
    mlp: str | None  # the dense SwiGLU MLP class
    experts: str | None  # the routed experts class (3-D gate_up_proj, transformers' experts interface)
    router: str | None  # the MoE router class, whose forward becomes _ROUTER_FORWARDS[router]
    attention: str  # the attention class whose forward calls the rope functions
    rope: tuple  # ((module-level function name, interleaved), ...); () when the rotation is not anvil::rope's
    rope_missing: str = ""  # why rope is unsupported, when it is
    moe_forward: bool = False  # the CausalLM forward adds the router aux loss (Mixtral, Qwen-MoE)
    not_patched: str = ""  # what of the architecture stays transformers' (said in the report)


_HALF = (("apply_rotary_pos_emb", False),)
_EXPERTS = ("the routed experts' GEMMs and their dispatch (transformers' experts implementation; anvil's "
            "moe_permute/moe_unpermute and grouped GEMMs are not swapped in)")

ARCHITECTURES = {
    "LlamaForCausalLM": _Arch("transformers.models.llama.modeling_llama", "LlamaRMSNorm", "LlamaMLP", None, None,
                              "LlamaAttention", _HALF),
    "MistralForCausalLM": _Arch("transformers.models.mistral.modeling_mistral", "MistralRMSNorm", "MistralMLP", None, None,
                                "MistralAttention", _HALF),
    "Qwen2ForCausalLM": _Arch("transformers.models.qwen2.modeling_qwen2", "Qwen2RMSNorm", "Qwen2MLP", None, None,
                              "Qwen2Attention", _HALF),
    "Qwen3ForCausalLM": _Arch("transformers.models.qwen3.modeling_qwen3", "Qwen3RMSNorm", "Qwen3MLP", None, None,
                              "Qwen3Attention", _HALF),
    "MixtralForCausalLM": _Arch("transformers.models.mixtral.modeling_mixtral", "MixtralRMSNorm", None,
                                "MixtralExperts", "MixtralTopKRouter", "MixtralAttention", _HALF, moe_forward=True, not_patched=_EXPERTS),
    "Qwen2MoeForCausalLM": _Arch("transformers.models.qwen2_moe.modeling_qwen2_moe", "Qwen2MoeRMSNorm", "Qwen2MoeMLP",
                                 "Qwen2MoeExperts", "Qwen2MoeTopKRouter", "Qwen2MoeAttention", _HALF, moe_forward=True,
                                 not_patched=_EXPERTS + "; the shared expert's sigmoid gate"),
    "Qwen3MoeForCausalLM": _Arch("transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3MoeRMSNorm", "Qwen3MoeMLP",
                                 "Qwen3MoeExperts", "Qwen3MoeTopKRouter", "Qwen3MoeAttention", _HALF, moe_forward=True,
                                 not_patched=_EXPERTS),
    "DeepseekV2ForCausalLM": _Arch("transformers.models.deepseek_v2.modeling_deepseek_v2", "DeepseekV2RMSNorm",
                                   "DeepseekV2MLP", "DeepseekV2Experts", "DeepseekV2TopkRouter",
                                   "DeepseekV2Attention", (),
                                   rope_missing="DeepSeek-V2 rotates q/k as complex numbers (apply_rotary_emb with "
                                                "freqs_cis), not through cos/sin",
                                   not_patched=_EXPERTS + "; the complex-number rotary embedding"),
    "DeepseekV3ForCausalLM": _Arch("transformers.models.deepseek_v3.modeling_deepseek_v3", "DeepseekV3RMSNorm",
                                   "DeepseekV3MLP", "DeepseekV3Experts", "DeepseekV3TopkRouter",
                                   "DeepseekV3Attention",
                                   (("apply_rotary_pos_emb", False), ("apply_rotary_pos_emb_interleave", True)),
                                   not_patched=_EXPERTS),
}


@dataclasses.dataclass
class PatchReport:
    """What anvil.patch did: the architecture, modules replaced per kernel, kernels skipped and why."""
    architecture: str
    options: dict
    replaced: dict = dataclasses.field(default_factory=dict)  # kernel -> number of modules (1 for the loss forward)
    skipped: dict = dataclasses.field(default_factory=dict)  # kernel -> reason
    not_patched: str = ""

    def __str__(self):
        lines = [f"anvil.patch: {self.architecture}"]
        for k in _OPTIONS:
            if k in self.replaced:
                lines.append(f"  {k:<14} {self.replaced[k]} module(s)")
            elif k in self.skipped:
                lines.append(f"  {k:<14} skipped: {self.skipped[k]}")
        if self.not_patched:
            lines.append(f"  unchanged      {self.not_patched}")
        return "\n".join(lines)


# ---- the rotary hook --------------------------------------------------------------------------------------------

_rope_state = threading.local()  # .depth: patched attention forwards currently running on this thread


def _rope_active():
    return getattr(_rope_state, "depth", 0) > 0


def _rope_hook(original, interleaved):
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        # the interleaved variant's optional position_ids (unused by transformers too) may come positionally
        unsqueeze_dim = kwargs.get("unsqueeze_dim", args[-1] if len(args) == (2 if interleaved else 1) else 1)
        if (_rope_active() and unsqueeze_dim == 1 and q.dim() == 4 and k.dim() == 4
                and q.dtype == k.dtype == cos.dtype == sin.dtype and cos.dim() == 3):
            return _nn.apply_rotary_pos_emb(q, k, cos, sin, interleaved=interleaved)
        return original(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb._anvil_original = original
    apply_rotary_pos_emb.__doc__ = f"anvil::rope inside patched attention modules, else {original.__qualname__}."
    return apply_rotary_pos_emb


def _install_rope_hooks(modeling, names):
    for name, interleaved in names:
        fn = getattr(modeling, name)
        if not hasattr(fn, "_anvil_original"):
            setattr(modeling, name, _rope_hook(fn, interleaved))


def _rope_attention_forward(self, *args, **kwargs):
    """A patched attention module's forward: its own forward with the rotary hook active on this thread.

    Bound with types.MethodType and the inner forward kept as a bound method (never a closure), so that
    copy.deepcopy of a patched model (TRL's reference models, EMA copies) binds both to the copy."""
    _rope_state.depth = getattr(_rope_state, "depth", 0) + 1
    try:
        return self._anvil_inner_forward(*args, **kwargs)
    finally:
        _rope_state.depth -= 1


# ---- the experts' gate ------------------------------------------------------------------------------------------

_GATED_EXPERT_PATHS = ("grouped_mm", "batched_mm")  # transformers' experts paths that call self._apply_gate


def _swiglu_gate(self, gate_up_out):
    """transformers' _default_apply_gate, act_fn(gate) * up of the (S, 2F) [gate; up] rows, through anvil::swiglu."""
    gate, up = gate_up_out.chunk(2, dim=-1)  # (S, F) each, strided views
    return _nn.swiglu(gate, up)


# ---- the MoE routers --------------------------------------------------------------------------------------------
# Each returns what the router it replaces returns: (router_logits (T, E), weights (T, k) fp32, indices (T, k)
# int64), the logits computed as transformers computes them (fp32 for DeepSeek, the model dtype for Mixtral), the
# scoring, group limiting, top-k, renormalization and scaling in anvil::moe_gate (docs/FORMATS.md "moe_gate";
# weights differentiable wrt the logits through its C++ autograd). Ties go to the lower expert index (torch.topk's
# order is unspecified there); moe_gate lists the k experts in descending score, transformers' topk(sorted=False)
# in an order of its own, which only changes the order the experts' outputs are summed in.


def _mixtral_router_forward(self, hidden_states):
    logits = torch.nn.functional.linear(hidden_states.reshape(-1, self.hidden_dim), self.weight)  # (T, E)
    weights, indices = _nn.ops.moe_gate(logits, None, None, self.top_k, 1, 1, "softmax", True, 1.0)
    return logits, weights, indices.long()


def _qwen_moe_router_forward(self, hidden_states):
    # Qwen2MoeTopKRouter / Qwen3MoeTopKRouter: logits in the model dtype, softmax over all experts in fp32, top-k,
    # renormalised only with norm_topk_prob; the weights are handed on in the logits' dtype, as transformers does.
    logits = torch.nn.functional.linear(hidden_states.reshape(-1, self.hidden_dim), self.weight)  # (T, E)
    weights, indices = _nn.ops.moe_gate(logits, None, None, self.top_k, 1, 1, "softmax", bool(self.norm_topk_prob), 1.0)
    return logits, weights.to(logits.dtype), indices.long()


def _deepseek_v2_router_forward(self, hidden_states):
    h = hidden_states.view(-1, self.hidden_dim)
    logits = torch.nn.functional.linear(h.float(), self.weight.float())  # (T, E) fp32
    groups = (self.num_group, self.topk_group) if self.topk_method == "group_limited_greedy" else (1, 1)
    weights, indices = _nn.ops.moe_gate(logits, None, None, self.top_k, *groups, "softmax", False,
                                        float(self.routed_scaling_factor))
    return logits, weights, indices.long()


def _deepseek_v3_router_forward(self, hidden_states):
    h = hidden_states.view(-1, self.hidden_dim)
    logits = torch.nn.functional.linear(h.float(), self.weight.float())  # (T, E) fp32
    weights, indices = _nn.ops.moe_gate(logits, self.e_score_correction_bias.float(), None, self.top_k,
                                        self.num_group, self.topk_group, "sigmoid", bool(self.norm_topk_prob),
                                        float(self.routed_scaling_factor))
    return logits, weights, indices.long()


_ROUTER_FORWARDS = {"MixtralTopKRouter": _mixtral_router_forward,
                    "Qwen2MoeTopKRouter": _qwen_moe_router_forward,
                    "Qwen3MoeTopKRouter": _qwen_moe_router_forward,
                    "DeepseekV2TopkRouter": _deepseek_v2_router_forward,
                    "DeepseekV3TopkRouter": _deepseek_v3_router_forward}


# ---- the loss forward --------------------------------------------------------------------------------------------


def _lce_forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                 inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
    """The CausalLM forward with the head and loss fused (training with labels); the original otherwise.

    A module-level function bound with types.MethodType (deepcopy rebinds it to the copy). return_dict is
    handled as transformers' can_return_tuple does: a tuple of the output's non-None fields when False."""
    shift_labels = kwargs.get("shift_labels")
    if not self.training or (labels is None and shift_labels is None):
        return self._anvil_original_forward(input_ids=input_ids, attention_mask=attention_mask,
                                            position_ids=position_ids, past_key_values=past_key_values,
                                            inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                                            logits_to_keep=logits_to_keep, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast, MoeCausalLMOutputWithPast
    moe = ARCHITECTURES[self._anvil_patch_report.architecture].moe_forward
    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    model_kwargs = dict(kwargs)
    if moe:
        output_router_logits = model_kwargs.pop("output_router_logits", None)
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        model_kwargs["output_router_logits"] = output_router_logits
    outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                         **model_kwargs)
    hidden = outputs.last_hidden_state  # (B, S, H)
    slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
    loss = _nn.linear_cross_entropy(hidden[:, slice_indices, :], self.lm_head.weight, labels,
                                    bias=self.lm_head.bias, ignore_index=kwargs.get("ignore_index", -100),
                                    num_items_in_batch=kwargs.get("num_items_in_batch"), shift_labels=shift_labels,
                                    chunk_tokens=self._anvil_chunk_tokens)
    if not moe:
        out = CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=outputs.past_key_values,
                                     hidden_states=outputs.hidden_states, attentions=outputs.attentions)
        return out if return_dict else out.to_tuple()
    aux_loss = None
    if model_kwargs["output_router_logits"]:
        modeling = importlib.import_module(ARCHITECTURES[self._anvil_patch_report.architecture].module)
        aux_loss = modeling.load_balancing_loss_func(outputs.router_logits, self.num_experts,
                                                     self.num_experts_per_tok, attention_mask)
        loss = loss + self.router_aux_loss_coef * aux_loss.to(loss.device)
    out = MoeCausalLMOutputWithPast(loss=loss, aux_loss=aux_loss, logits=None, past_key_values=outputs.past_key_values,
                                    hidden_states=outputs.hidden_states, attentions=outputs.attentions,
                                    router_logits=outputs.router_logits)
    return out if return_dict else out.to_tuple()


# ---- patch ------------------------------------------------------------------------------------------------------


def _architecture(model):
    for cls in type(model).__mro__:
        arch = ARCHITECTURES.get(cls.__name__)
        if arch is not None and cls.__module__ == arch.module:
            return cls.__name__, arch
    raise ValueError(f"anvil.patch: unsupported architecture {type(model).__name__} (supported: "
                     f"{', '.join(ARCHITECTURES)}); nothing was patched")


def _replace(model, cls, make):
    """Swaps every module of exact type cls for make(module); returns how many."""
    targets = [(name, m) for name, m in model.named_modules() if type(m) is cls]
    for name, m in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, make(m))
    return len(targets)


def _attention_reason(config):
    """'' when anvil::sparse_attention takes the model's head dims, else why not."""
    if getattr(config, "qk_nope_head_dim", None) is not None:  # MLA
        dqk, dv = config.qk_nope_head_dim + config.qk_rope_head_dim, config.v_head_dim
    else:
        dqk = dv = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if (dqk == dv and dqk in (64, 128)) or (dqk == 192 and dv == 128):
        return ""
    return (f"head dims {dqk} (q, k) and {dv} (v): anvil::sparse_attention takes 64 or 128, or 192 for q and k "
            f"with 128 for v")


def _register_attention():
    """Registers "anvil" in transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register("anvil", _nn.attention_forward)
    AttentionMaskInterface.register("anvil", flash_attention_mask)


def patch(model, rms_norm=None, swiglu=None, rope=None, cross_entropy=None, moe_gate=None, attention=None,
          chunk_tokens=None):
    """Swaps anvil's kernels into a transformers causal LM in place and returns a PatchReport.

    model: a LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, MixtralForCausalLM,
    Qwen2MoeForCausalLM, Qwen3MoeForCausalLM, DeepseekV2ForCausalLM or DeepseekV3ForCausalLM (or a subclass; a PEFT model is patched through its base
    model). Each kernel option: None = where supported, True = required, False = off. chunk_tokens: rows of the
    fused loss per chunk (None: anvil.nn.auto_chunk_tokens, about as much memory as the hidden states). Patching a patched model again with the same options changes nothing and returns the
    first report; with other options it is an error (load the model afresh)."""
    options = dict(rms_norm=rms_norm, swiglu=swiglu, moe_gate=moe_gate, rope=rope, cross_entropy=cross_entropy,
                   attention=attention)
    for k, v in options.items():
        if v is not None and not isinstance(v, bool):
            raise TypeError(f"anvil.patch: {k} must be None, True or False, got {v!r}")
    if chunk_tokens is not None and (isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int)
                                     or chunk_tokens < 1):
        raise ValueError(f"anvil.patch: chunk_tokens must be None or an int >= 1, got {chunk_tokens!r}")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"anvil.patch: model must be a torch.nn.Module, got {type(model).__name__}")
    if type(model).__module__.startswith("peft.") and hasattr(model, "get_base_model"):  # a peft.PeftModel
        model = model.get_base_model()
    options["chunk_tokens"] = chunk_tokens

    previous = getattr(model, "_anvil_patch_report", None)
    if previous is not None:
        if previous.options == options:
            return previous
        raise ValueError(f"anvil.patch: this {previous.architecture} was already patched with {previous.options}; "
                         f"patching it again with {options} is not supported (load the model afresh)")

    name, arch = _architecture(model)
    modeling = importlib.import_module(arch.module)
    report = PatchReport(name, options, not_patched=arch.not_patched)

    # ---- decide everything first, so an error patches nothing ----
    def decide(kernel, reason):
        """reason: '' when the architecture supports the kernel. Returns whether to apply it."""
        want = options[kernel]
        if want is False:
            report.skipped[kernel] = "off"
            return False
        if reason:
            if want:
                raise ValueError(f"anvil.patch: {kernel}=True is not supported for {name}: {reason}; "
                                 f"nothing was patched")
            report.skipped[kernel] = reason
            return False
        return True

    act = getattr(model.config, "hidden_act", None)
    experts_impl = getattr(model.config, "_experts_implementation", None)
    swiglu_reason = ("" if act in ("silu", "swish") else f"hidden_act is {act!r}, anvil::swiglu is silu(gate) * up")
    if not swiglu_reason and arch.experts and experts_impl not in _GATED_EXPERT_PATHS:
        swiglu_reason = (f"the routed experts run transformers' {experts_impl!r} experts implementation, whose loop "
                         f"multiplies act_fn(gate) * up inline (anvil patches the {' and '.join(_GATED_EXPERT_PATHS)} "
                         f"paths' _apply_gate; load with experts_implementation='grouped_mm')")
    lm_head = getattr(model, "lm_head", None)
    ce_reason = ("" if isinstance(lm_head, torch.nn.Linear) and hasattr(model, "model") else
                 f"lm_head is {type(lm_head).__name__}, not a torch.nn.Linear")
    if getattr(model.config, "final_logit_softcapping", None):
        ce_reason = "final_logit_softcapping is set (the fused loss has no softcap)"
    topk_method = getattr(model.config, "topk_method", "greedy")
    gate_reason = ("it has no MoE router" if not arch.router else
                   f"topk_method {topk_method!r} is not one anvil::moe_gate computes (greedy, group_limited_greedy)"
                   if arch.router == "DeepseekV2TopkRouter" and topk_method not in ("greedy", "group_limited_greedy")
                   else "")
    do = dict(rms_norm=decide("rms_norm", ""), swiglu=decide("swiglu", swiglu_reason),
              moe_gate=decide("moe_gate", gate_reason),
              rope=decide("rope", arch.rope_missing), cross_entropy=decide("cross_entropy", ce_reason),
              attention=attention is not None and decide("attention", _attention_reason(model.config)))
    if attention is None:
        report.skipped["attention"] = "off unless asked (attention=True)"


    # ---- apply ----
    if do["rms_norm"]:
        report.replaced["rms_norm"] = _replace(model, getattr(modeling, arch.norm), _nn.RMSNorm.from_module)
    if do["swiglu"]:
        n = _replace(model, getattr(modeling, arch.mlp), _nn.SwiGLUMLP.from_module) if arch.mlp else 0
        if arch.experts:
            experts_cls = getattr(modeling, arch.experts)
            for m in model.modules():
                if type(m) is experts_cls:
                    m._apply_gate = types.MethodType(_swiglu_gate, m)
                    n += 1
        report.replaced["swiglu"] = n
    if do["moe_gate"]:
        router_cls, n = getattr(modeling, arch.router), 0
        for m in model.modules():
            if type(m) is router_cls:
                m.forward = types.MethodType(_ROUTER_FORWARDS[arch.router], m)
                n += 1
        report.replaced["moe_gate"] = n
    if do["rope"]:
        _install_rope_hooks(modeling, arch.rope)
        attention_cls = getattr(modeling, arch.attention)
        n = 0
        for m in model.modules():
            if type(m) is attention_cls:
                m._anvil_inner_forward = m.forward
                m.forward = types.MethodType(_rope_attention_forward, m)
                n += 1
        report.replaced["rope"] = n
    if do["cross_entropy"]:
        model._anvil_original_forward = model.forward
        model._anvil_chunk_tokens = chunk_tokens
        model.forward = types.MethodType(_lce_forward, model)
        report.replaced["cross_entropy"] = 1
    if do["attention"]:
        _register_attention()
        model.set_attn_implementation("anvil")
        attention_cls = getattr(modeling, arch.attention)
        report.replaced["attention"] = sum(type(m) is attention_cls for m in model.modules())
    model._anvil_patch_report = report
    return report


__all__ = ["patch", "PatchReport", "ARCHITECTURES"]
