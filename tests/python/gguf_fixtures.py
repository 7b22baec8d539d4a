"""GGUF fixtures for test_gguf.py, written with gguf-py (ggml's own Python writer, the oracle).

hf_llama_to_gguf converts a transformers Llama the way llama.cpp's convert_hf_to_gguf.py does: llama.*
metadata keys, llama.cpp tensor names, dims reversed (ggml order), and the q/k rows permuted for ggml's
RoPE layout (LlamaModel.permute: per head, rows (2, head_dim/2) -> (head_dim/2, 2)). Tensors can be
stored as F32, F16 or quantized with gguf.quants (Q8_0, Q4_0, Q4_1) for 2-D weights.
"""
import numpy as np
import torch

gguf = __import__("gguf")
Q = gguf.GGMLQuantizationType

HF_TO_GGUF = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def llama_cpp_permute(w, n_head):
    """convert_hf_to_gguf.py's LlamaModel.permute, for a (n_head * head_dim, in) weight."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf_name):
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    parts = hf_name.split(".")
    assert parts[:2] == ["model", "layers"], hf_name
    return f"blk.{parts[2]}." + HF_TO_GGUF[".".join(parts[3:])]


def add_tensor(writer, name, array, qtype):
    """array: fp32 numpy in PyTorch shape; stored as qtype (the writer reverses the shape to ggml order)."""
    array = np.ascontiguousarray(array, dtype=np.float32)
    if qtype == Q.F32:
        writer.add_tensor(name, array)
    elif qtype == Q.F16:
        writer.add_tensor(name, array.astype(np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)


def hf_llama_to_gguf(model, path, qtype=Q.F32, vocab=None):
    """Writes a transformers LlamaForCausalLM as llama.cpp would; 2-D weights stored as qtype, norms F32.
    Returns {hf name: the fp32 tensor a GGUF reader should reconstruct (the qtype round trip, unpermuted)}."""
    cfg = model.config
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    if vocab is not None:
        w.add_tokenizer_model("gpt2")
        w.add_token_list(vocab)
    if cfg.bos_token_id is not None:
        w.add_bos_token_id(cfg.bos_token_id)
    if cfg.eos_token_id is not None:
        w.add_eos_token_id(cfg.eos_token_id)
    expected = {}
    for name, p in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        t = p.detach().float().numpy()
        if name.endswith("q_proj.weight"):
            t = llama_cpp_permute(t, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            t = llama_cpp_permute(t, cfg.num_key_value_heads)
        q = qtype if t.ndim == 2 else Q.F32
        add_tensor(w, gguf_name(name), t, q)
        # What the file holds, dequantized by gguf-py and unpermuted by the inverse of llama_cpp_permute.
        stored = gguf.quants.dequantize(gguf.quants.quantize(t, q), q)
        stored = torch.from_numpy(np.ascontiguousarray(stored, dtype=np.float32)).reshape(p.shape)
        if name.endswith("q_proj.weight") or name.endswith("k_proj.weight"):
            n = cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads
            stored = stored.reshape(n, stored.shape[0] // n // 2, 2, -1).transpose(1, 2).reshape(p.shape)
        expected[name] = stored
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected
