"""A PyTorch reference of the demo's two recipes (transformers + PEFT + plain AdamW), used to choose the
tiny model's size, seq_len, steps and learning rates before `anvil train` / `anvil lora` existed, and
kept as a yardstick for them (losses and tokens/s on the same data and settings).

It reads the same JSONL files and tokenizer and builds the same training rows as anvil's recipe
(include/anvil/data/dataset.h): bos + text + eos, or bos + prompt (no loss) + completion + eos; examples
packed first-fit into rows of seq_len tokens, positions restarting per example and a block-diagonal
causal mask so no example attends to another; a cosine schedule with linear warmup; AdamW; clipping.

  # (a) pretraining the base model (what examples/tiny/pretrain.json asks of `anvil train`)
  .venv/bin/python examples/tiny/reference_train.py pretrain --out /tmp/tiny-base
  # (b) the LoRA fine-tune on FOLDOC (what examples/tiny/lora.json asks of `anvil lora`)
  .venv/bin/python examples/tiny/reference_train.py lora --base /tmp/tiny-base
Both print one line per log step and the validation loss every --eval-every steps.
"""
import argparse
import json
import math
import os
import random
import time

import sentencepiece as spm
import torch
import transformers

HERE = os.path.dirname(os.path.abspath(__file__))


def tokenize(row, sp, loss_on_completion):
    """(ids, targets) for one JSONL object, as anvil's tokenize_example (add_eos = true)."""
    if "text" in row:
        ids = [sp.bos_id()] + sp.encode(row["text"]) + [sp.eos_id()]
        return ids, [1] * len(ids)
    prompt = [sp.bos_id()] + sp.encode(row["prompt"])
    completion = sp.encode(row["completion"]) + [sp.eos_id()]
    return prompt + completion, [0 if loss_on_completion else 1] * len(prompt) + [1] * len(completion)


def pack(examples, seq_len, pad_id):
    """First-fit packing in order: (ids, labels, positions, doc_ids) tensors of shape (rows, seq_len)."""
    rows, row = [], []
    for ids, target in examples:
        ids, target = ids[:seq_len], target[:seq_len]
        if len(row) + len(ids) > seq_len:
            rows.append(row)
            row = []
        doc = len({d for *_, d in row})
        row += [(ids[i], ids[i + 1] if i + 1 < len(ids) and target[i + 1] else -100, i, doc) for i in range(len(ids))]
    if row:
        rows.append(row)
    out = torch.full((4, len(rows), seq_len), -1, dtype=torch.long)
    out[0].fill_(pad_id)
    out[1].fill_(-100)
    out[2].fill_(0)
    for r, row in enumerate(rows):
        out[:, r, : len(row)] = torch.tensor(row, dtype=torch.long).T
    return out[0], out[1], out[2], out[3]


def block_causal_mask(doc_ids):
    """(B, 1, T, T) bool: query i sees key j when j <= i and both belong to the same example."""
    t = doc_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (same & causal & (doc_ids[:, :, None] >= 0))[:, None] | torch.eye(t, dtype=torch.bool)


def load_rows(path, sp, seq_len, loss_on_completion, seed):
    with open(path, encoding="utf-8") as f:
        examples = [tokenize(json.loads(line), sp, loss_on_completion) for line in f if line.strip()]
    random.Random(seed).shuffle(examples)
    return pack(examples, seq_len, sp.pad_id())


def forward_loss(model, batch):
    ids, labels, pos, docs = batch
    logits = model(input_ids=ids, position_ids=pos, attention_mask=block_causal_mask(docs)).logits.float()
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


@torch.no_grad()
def evaluate(model, rows, batch_size):
    model.eval()
    total, count = 0.0, 0
    for i in range(0, rows[0].shape[0], batch_size):
        batch = [t[i: i + batch_size] for t in rows]
        n = int((batch[1] != -100).sum())
        total += float(forward_loss(model, batch)) * n
        count += n
    model.train()
    return total / count


@torch.no_grad()
def generate(model, sp, prompt, max_new_tokens):
    model.eval()
    ids = torch.tensor([[sp.bos_id()] + sp.encode(prompt)])
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=sp.eos_id(),
                         pad_token_id=sp.pad_id())
    model.train()
    return sp.decode(out[0, ids.shape[1]:].tolist())


def lr_at(step, args):
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=["pretrain", "lora"])
    p.add_argument("--config", default=os.path.join(HERE, "config.json"))
    p.add_argument("--tokenizer", default=os.path.join(HERE, "tokenizer"))
    p.add_argument("--base", default="", help="lora: the pretrained base folder")
    p.add_argument("--train", default="")
    p.add_argument("--val", default="")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=0, help="rows per step (default: 16 pretrain, 8 lora)")
    p.add_argument("--steps", type=int, default=0)
    p.add_argument("--lr", type=float, default=0.0)
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--eval-batches", type=int, default=0, help="0 = the whole validation set")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--time-limit", type=float, default=0, help="stop after this many seconds of training")
    p.add_argument("--out", default="", help="save the trained model (pretrain) or adapter (lora) here")
    p.add_argument("--prompts", nargs="*", default=None, help="default: the config's eval.prompts")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    pretrain = args.mode == "pretrain"
    data = os.path.join(HERE, "data")
    args.train = args.train or os.path.join(data, "general_train.jsonl" if pretrain else "foldoc_train.jsonl")
    args.val = args.val or os.path.join(data, "general_val.jsonl" if pretrain else "foldoc_val.jsonl")
    # The defaults are examples/tiny/pretrain.json's and lora.json's.
    args.batch = args.batch or (16 if pretrain else 8)
    args.steps = args.steps or (600 if pretrain else 60)
    args.lr = args.lr or (3e-3 if pretrain else 5e-3)
    args.warmup = args.warmup or (50 if pretrain else 5)
    args.eval_every = args.eval_every or (100 if pretrain else 10)

    if args.prompts is None:
        with open(os.path.join(HERE, "pretrain.json" if pretrain else "lora.json")) as f:
            args.prompts = json.load(f)["eval"]["prompts"]
    sp = spm.SentencePieceProcessor(model_file=os.path.join(args.tokenizer, "tokenizer.model"))
    train = load_rows(args.train, sp, args.seq_len, not pretrain, args.seed)
    val = load_rows(args.val, sp, args.seq_len, not pretrain, 0)
    if args.eval_batches:
        val = [t[: args.eval_batches * args.batch] for t in val]
    print(f"train rows {train[0].shape[0]} x {args.seq_len} ({int((train[1] != -100).sum())} target tokens), "
          f"validation rows {val[0].shape[0]}")

    if pretrain:
        config = transformers.AutoConfig.from_pretrained(args.config)
        config._attn_implementation = "sdpa"
        model = transformers.LlamaForCausalLM(config)
    else:
        import peft

        model = transformers.LlamaForCausalLM.from_pretrained(args.base, dtype=torch.float32)
        lora = peft.LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules="all-linear", lora_dropout=0.0)
        model = peft.get_peft_model(model, lora)
    params = [q for q in model.parameters() if q.requires_grad]
    print(f"parameters: {sum(q.numel() for q in model.parameters())}, trained {sum(q.numel() for q in params)}")
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95 if pretrain else 0.999),
                            weight_decay=0.1 if pretrain else 0.0)

    for prompt in args.prompts:
        print(f"before: {prompt!r} -> {generate(model, sp, prompt, 40)!r}")
    print(f"step 0 val_loss {evaluate(model, val, args.batch):.4f}")
    model.train()
    order = torch.randperm(train[0].shape[0], generator=torch.Generator().manual_seed(args.seed))
    cursor, tokens, start = 0, 0, time.time()
    for step in range(args.steps):
        if cursor + args.batch > len(order):
            order, cursor = torch.randperm(len(order)), 0
        idx = order[cursor: cursor + args.batch]
        cursor += args.batch
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        loss = forward_loss(model, [t[idx] for t in train])
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += args.batch * args.seq_len
        elapsed = time.time() - start
        if (step + 1) % args.log_every == 0 or step == 0:
            print(f"step {step + 1} loss {loss.item():.4f} lr {lr_at(step, args):.2e} grad_norm {norm:.3f} "
                  f"tokens/s {tokens / elapsed:.0f} elapsed {elapsed:.0f}s", flush=True)
        if args.eval_every and (step + 1) % args.eval_every == 0:
            print(f"step {step + 1} val_loss {evaluate(model, val, args.batch):.4f}", flush=True)
        if args.time_limit and elapsed > args.time_limit:
            print(f"time limit: stopped after step {step + 1}")
            break
    print(f"final val_loss {evaluate(model, val, args.batch):.4f}, {time.time() - start:.0f}s")
    for prompt in args.prompts:
        print(f"after: {prompt!r} -> {generate(model, sp, prompt, 40)!r}")
    if args.out:
        model.save_pretrained(args.out)
        if pretrain:
            import shutil

            for name in os.listdir(args.tokenizer):
                shutil.copy(os.path.join(args.tokenizer, name), args.out)
        print(f"saved {args.out}")


if __name__ == "__main__":
    main()
