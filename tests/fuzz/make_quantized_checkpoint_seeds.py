"""Writes the seeds of fuzz_quantized_checkpoint (tests/fuzz/corpus_quantized_checkpoint) with compressed-tensors'
own config model and packing (compressed-tensors 0.19: QuantizationConfig.model_dump, pack_to_int32), so the seeds
are what llm-compressor writes, not anvil's reading of it. The input layout: tests/fuzz/fuzz_quantized_checkpoint.cpp.

    python tests/fuzz/make_quantized_checkpoint_seeds.py
"""
import json
import os

import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme, preset_name_to_scheme
from safetensors.torch import save

# The harness's kShapes: byte 0's low bits pick the Linear's (out, in).
SHAPES = [(4, 8), (8, 32), (16, 128), (128, 256), (3, 7), (256, 128), (1, 1), (32, 384)]
SEPARATOR = b"\n@@anvil-tensors@@\n"
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus_quantized_checkpoint")


def config(scheme: QuantizationScheme, fmt: str, edit=None) -> bytes:
    c = QuantizationConfig(config_groups={"group_0": scheme}, format=fmt, ignore=["lm_head"], quantization_status="compressed")
    d = c.model_dump(mode="json")
    d["quant_method"] = "compressed-tensors"
    if edit:
        edit(d)
    return json.dumps(d).encode()


def write(name: str, head: int, parts: list[bytes]) -> None:
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(bytes([head]) + SEPARATOR.join(parts))


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    g = torch.Generator().manual_seed(0)

    def ints(shape, lo, hi):
        return torch.randint(lo, hi, shape, generator=g, dtype=torch.int8)

    def scales(shape):
        return (torch.rand(shape, generator=g) * 0.1 + 0.01).to(torch.bfloat16)

    int4_group = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=8)
    # W4A16, group 8, packed (kept as int4): (8, 32)
    q = ints((8, 32), -8, 8)
    t = {"weight_packed": pack_to_int32(q, 4), "weight_shape": torch.tensor([8, 32]), "weight_scale": scales((8, 4))}
    write("w4a16_group8_packed", 1, [config(QuantizationScheme(targets=["Linear"], weights=int4_group), "pack-quantized"), save(t)])
    # The same asymmetric: zero points packed along the output dimension.
    asym = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=8)
    t = dict(t, weight_zero_point=pack_to_int32(ints((8, 4), -8, 8), 4, packed_dim=0).contiguous())
    write("w4a16_asym_packed", 1, [config(QuantizationScheme(targets=["Linear"], weights=asym), "pack-quantized"), save(t)])
    # Legacy act-order "group" with weight_g_idx (stays dense); compressed-tensors 0.19 no longer writes the key.
    t = {"weight_packed": pack_to_int32(q, 4), "weight_shape": torch.tensor([8, 32]), "weight_scale": scales((8, 4)),
         "weight_g_idx": torch.randint(0, 4, (32,), generator=g, dtype=torch.int32)}
    write("w4a16_actorder_group", 1,
          [config(QuantizationScheme(targets=["Linear"], weights=int4_group), "pack-quantized",
                  lambda d: d["config_groups"]["group_0"]["weights"].update(actorder="group")), save(t)])
    # W8A8 int8 per channel, dynamic per-token activations (kept as w8a8 on a GPU): (16, 128)
    t = {"weight": ints((16, 128), -127, 128), "weight_scale": scales((16, 1))}
    write("w8a8_int_channel", 2, [config(preset_name_to_scheme("W8A8", ["Linear"]), "int-quantized"), save(t)])
    # W8A16 int8 per channel, naive-quantized (kept as int8): (3, 7)
    t = {"weight": ints((3, 7), -127, 128), "weight_scale": scales((3, 1))}
    write("w8a16_naive", 4, [config(preset_name_to_scheme("W8A16", ["Linear"]), "naive-quantized"), save(t)])
    # FP8 per channel with dynamic activations (fp8-channel): (4, 8)
    fp8 = lambda shape: (torch.randn(shape, generator=g) * 10).to(torch.float8_e4m3fn)
    t = {"weight": fp8((4, 8)), "weight_scale": scales((4, 1))}
    write("fp8_dynamic_channel", 0, [config(preset_name_to_scheme("FP8_DYNAMIC", ["Linear"]), "float-quantized"), save(t)])
    # FP8 128x128 blocks (kept as fp8, DeepSeek-V3's layout): (16, 128)
    t = {"weight": fp8((16, 128)), "weight_scale": scales((1, 1))}
    write("fp8_block", 2, [config(preset_name_to_scheme("FP8_BLOCK", ["Linear"]), "float-quantized"), save(t)])
    # FineGrainedFP8 (byte 0 bit 7): weight + weight_scale_inv (ceil(out/128), ceil(in/128)) fp32: (16, 128)
    write("finegrained_fp8", 0x80 | 2, [save({"weight": fp8((16, 128)), "weight_scale_inv": torch.rand((1, 1), generator=g)})])


if __name__ == "__main__":
    main()
