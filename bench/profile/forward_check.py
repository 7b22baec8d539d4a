"""anvil's causal LM against transformers at 7B widths on the GPU (fewer layers): fp32 agreement, and
the bf16 errors of both against the fp32 reference (transformers loaded in bf16 by from_pretrained, so
its rotary inv_freq stays fp32). A diagnostic for bench/model_forward.py's logits line."""
import shutil
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import anvil

layers = int(sys.argv[1]) if len(sys.argv) > 1 else 4
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                  num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5)
d = "/tmp/anvil-forward-check"
shutil.rmtree(d, ignore_errors=True)
LlamaForCausalLM(cfg).save_pretrained(d)
ids = torch.randint(0, 32000, (4, 2048), device="cuda")
with torch.no_grad():
    hf32 = LlamaForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="sdpa").cuda().eval()
    ref = hf32(ids).logits
    del hf32
    ours32 = anvil._C.CausalLM(d, "float32", "cuda")
    o32 = ours32.logits(ids)
    del ours32
    m = ref.abs().max()
    print(f"layers {layers}: fp32 anvil vs transformers: {((o32 - ref).abs().max() / m).item():.2e}")
    del o32
    hf16 = LlamaForCausalLM.from_pretrained(d, dtype=torch.bfloat16, attn_implementation="sdpa").cuda().eval()
    e_hf = ((hf16(ids).logits.float() - ref).abs().max() / m).item()
    del hf16
    ours16 = anvil._C.CausalLM(d, "bfloat16", "cuda")
    e_ours = ((ours16.logits(ids).float() - ref).abs().max() / m).item()
    print(f"bf16 error vs fp32: transformers {e_hf:.2e}, anvil {e_ours:.2e} (rule: anvil <= 2x transformers)")
