"""Correctness of every compiled fp8 GEMM configuration, each forced, for the tuning sweep (scripts/fp8-sweep.sh)
in one process: every dense configuration (ANVIL_FP8_GEMM_CONFIG) under several scheduler settings
(ANVIL_FP8_GEMM_SCHED: CUTLASS's defaults, each stream-K decomposition, a raster / swizzle change) on cheap
shapes that cover partial tiles, M = 1 and M not a multiple of 4; every grouped configuration
(ANVIL_FP8_GEMM_GROUPED_CONFIG) on the contiguous layout with 1, 8 and 64 experts (empty experts included)
and the masked layout. The oracle is tests/python/test_fp8_gemm.py's: the fp32 (dense) or fp64 (grouped)
matmul of the dequantized inputs, 1 - 2 sum(xy) / sum(x^2 + y^2) < 1e-3. Prints one line per configuration
and setting; exits 1 if any check fails.

    PYTHONPATH=build-sweep/python python3 scripts/fp8_sweep_check.py [--failed-out file] [--config name:dtype]
"""
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "python"))

import torch  # noqa: E402

import anvil  # noqa: E402
import test_fp8_gemm as t  # noqa: E402

ops = anvil.ops
KNOBS = ["", "mode=dp", "mode=splitk,splits=3", "mode=streamk", "mode=streamk,reduce=atomic", "raster=n,swizzle=4"]
SHAPES = [(1, 2112, 7168), (45, 4096, 1024), (300, 136, 512), (4096, 2112, 1024)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def set_env(var, value):
    if value:
        os.environ[var] = value
    else:
        os.environ.pop(var, None)


def check_dense(name, dt, knobs):
    grans = t.ISSUE_GRANS if not knobs else t.ISSUE_GRANS[:1]   # every granularity once, blocks under each knob
    worst, errors = 0.0, []
    for m, n, k in SHAPES:
        for ga, gb in grans:
            qa, sa, qb, sb = t.quantized(m, n, k, ga, gb, "cuda")
            try:
                got = ops.fp8_gemm(qa, sa, qb, sb, DTYPES[dt])
            except RuntimeError as err:
                errors.append(f"M={m} N={n} K={k} {ga}x{gb}: {str(err).splitlines()[0][:160]}")
                continue
            d = t.gemm_diff(got, t.gpu_reference(qa, sa, ga, qb, sb, gb))
            worst = max(worst, d)
            if not d < t.MAX_DIFF:
                errors.append(f"M={m} N={n} K={k} {ga}x{gb}: diff {d:.2e}")
    return worst, errors


def check_grouped():
    worst, errors = 0.0, []
    n, k = 256, 512
    for experts in (1, 8, 64):
        g = torch.Generator().manual_seed(experts)
        rows = [0 if e % 3 == 1 else int(v) for e, v in enumerate(torch.randint(1, 300, (experts,), generator=g))]
        offsets = torch.tensor([0] + list(torch.tensor(rows).cumsum(0)), dtype=torch.int32, device="cuda")
        total = int(offsets[-1])
        qa, sa = ops.quantize_fp8(torch.randn(total + 5, k, generator=g).cuda(), "block1x128")  # 5 rows past the end
        qb, sb = t.expert_weights(experts, n, k, "cuda")
        try:
            got = ops.fp8_grouped_gemm(qa, sa, qb, sb, offsets, torch.bfloat16)
        except RuntimeError as err:
            errors.append(f"{experts} experts: {str(err).splitlines()[0][:160]}")
            continue
        off = offsets.tolist()
        for e in range(experts):
            if off[e + 1] > off[e]:
                d = t.gemm_diff(got[off[e]:off[e + 1]], t.formula(qa[off[e]:off[e + 1]], sa[off[e]:off[e + 1]], qb[e], sb[e]))
                worst = max(worst, d)
                if not d < t.MAX_DIFF:
                    errors.append(f"{experts} experts, expert {e}: diff {d:.2e}")
        if got[total:].abs().max().item() != 0:
            errors.append(f"{experts} experts: rows past offsets[E] are not zero")
    e, c = 8, 64
    qa, sa = ops.quantize_fp8(torch.randn(e, c, k).cuda(), "block1x128")
    qb, sb = t.expert_weights(e, n, k, "cuda")
    valid = [64, 0, 1, 17, 0, 63, 5, 64]
    try:
        out = ops.fp8_grouped_gemm_masked(qa, sa, qb, sb, torch.tensor(valid, dtype=torch.int32, device="cuda"),
                                          torch.bfloat16)
        for i, v in enumerate(valid):
            if v:
                d = t.gemm_diff(out[i, :v], t.formula(qa[i, :v], sa[i, :v], qb[i], sb[i]))
                worst = max(worst, d)
                if not d < t.MAX_DIFF:
                    errors.append(f"masked expert {i}: diff {d:.2e}")
    except RuntimeError as err:
        errors.append(f"masked: {str(err).splitlines()[0][:160]}")
    return worst, errors


def check_config(c):
    """Every setting of one configuration ("name:dtype"); prints a line per setting; True if all pass."""
    name, dt = c.split(":")
    grouped = name.startswith("grouped")
    ok = True
    for knobs in (["", "raster=n,swizzle=2"] if grouped else KNOBS):
        set_env("ANVIL_FP8_GEMM_GROUPED_CONFIG" if grouped else "ANVIL_FP8_GEMM_CONFIG", name)
        set_env("ANVIL_FP8_GEMM_SCHED", knobs)
        try:
            worst, errors = check_grouped() if grouped else check_dense(name, dt, knobs)
        finally:
            set_env("ANVIL_FP8_GEMM_CONFIG", "")
            set_env("ANVIL_FP8_GEMM_GROUPED_CONFIG", "")
            set_env("ANVIL_FP8_GEMM_SCHED", "")
        ok = ok and not errors
        print(f"check {c:<36} sched {knobs or 'default':<28} {'FAIL' if errors else 'ok':<5} worst diff {worst:.1e}",
              flush=True)
        for e in errors:
            print(f"    {e}", flush=True)
    return ok


def main():
    """Each configuration in a process of its own (a kernel fault leaves the CUDA context unusable: it must
    cost only that configuration), four at a time; --failed-out lists the failing ones for the sweep."""
    os.environ["ANVIL_FP8_GEMM_STRICT"] = "1"
    args = sys.argv[1:]
    if args and args[0] == "--config":
        return 0 if check_config(args[1]) else 1
    failed_out = args[args.index("--failed-out") + 1] if "--failed-out" in args else None
    configs = anvil.fp8_gemm_configs()
    running, results = [], {}
    pending = list(configs)
    while pending or running:
        while pending and len(running) < 4:
            c = pending.pop(0)
            running.append((c, subprocess.Popen([sys.executable, os.path.abspath(__file__), "--config", c],
                                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
        c, proc = running.pop(0)
        out, _ = proc.communicate()
        results[c] = (proc.returncode, out)
    failed = []
    for c in configs:
        rc, out = results[c]
        print(out.rstrip())
        if rc != 0:
            failed.append(c)
            if "check " + c not in out or rc < 0:
                print(f"check {c:<36} CRASHED (exit {rc})")
    print(f"fp8_sweep_check: {len(configs) - len(failed)} of {len(configs)} configurations pass every setting"
          + (f"; failing: {', '.join(failed)}" if failed else ""))
    if failed_out:
        with open(failed_out, "w") as f:
            f.write("".join(c.split(":")[0] + "\n" for c in failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
