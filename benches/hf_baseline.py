#!/usr/bin/env python3
"""HF Transformers baseline for omnistage's realistic serving benchmark.

What it measures
----------------
How an ordinary Hugging Face Transformers deployment serves the same
workload that omnistage serves: the same checkpoint, the same requests
(prompt token ids, output lengths, arrival times), greedy decoding with EOS
ignored, so every request yields exactly ``max_tokens`` tokens.

Serving follows the usual HF pattern, static batching around
``model.generate``: a real-time loop whose clock starts at 0 once the model
is loaded and warmed up. When nothing is waiting it sleeps until the next
arrival. Otherwise it takes the requests that have arrived so far, in
arrival order, up to ``--max-batch`` of them, left-pads their prompts into
one batch (with an attention mask; ``generate`` derives position ids from
the mask) and runs one ``generate`` call for the longest ``max_tokens`` in
the batch; each row is then cut to its own ``max_tokens``. Requests that
arrive while a batch runs wait for the next batch.

Per request it records the generated ids, the completion time (seconds
since serving start) and the job completion time (completion - arrival);
overall the makespan (last completion - first arrival), generated tokens
per second over the makespan, mean JCT and the number of ``generate``
calls.

Input (written by the Rust bench)::

    {"model": "/abs/checkpoint", "seed": 7,
     "requests": [{"id": 0, "arrival_s": 0.0, "prompt_ids": [...],
                   "max_tokens": 40}, ...]}

Output (``--out``)::

    {"engine": "hf-transformers X, torch Y", "threads": N,
     "makespan_s", "generated_tokens", "tokens_per_s", "mean_jct_s",
     "batches", "max_batch", "batch_sizes",
     "requests": [{"id", "output_ids", "completion_s", "jct_s"}]}

Install (a venv outside the repo; PyPI's Linux torch wheel brings the CUDA
packages along, several GB, though only the CPU is used)::

    python3 -m venv /work/hf-venv
    /work/hf-venv/bin/pip install -r benches/hf_requirements.txt

Run::

    /work/hf-venv/bin/python benches/hf_baseline.py \\
        --workload W.json --out R.json [--max-batch 32] [--threads 2]

Raw batched decode instead (one ``generate`` call per batch size, ``--new-tokens`` per row,
prefill included; ``cargo bench -p omnistage-benches --bench decode`` runs it next to its own
levels)::

    /work/hf-venv/bin/python benches/hf_baseline.py --raw-decode 1,8,32 \\
        --model DIR --out R.json [--prompt-len 24] [--new-tokens 64]

The Rust bench (``cargo bench -p omnistage-benches --bench realistic``)
writes the workload, runs this script on it side by side with omnistage,
and compares the two results (throughput, JCT, and the greedy output ids).
"""

import argparse
import json
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", help="workload JSON (input; not with --raw-decode)")
    p.add_argument("--out", required=True, help="result JSON (output)")
    p.add_argument("--raw-decode", default=None, metavar="B1,B2,..",
                   help="instead of a workload: time one generate call per batch size "
                        "(needs --model)")
    p.add_argument("--prompt-len", type=int, default=24,
                   help="--raw-decode: prompt tokens per row (default 24)")
    p.add_argument("--new-tokens", type=int, default=64,
                   help="--raw-decode: tokens generated per row (default 64)")
    p.add_argument("--max-batch", type=int, default=32,
                   help="most requests in one generate call (default 32)")
    p.add_argument("--threads", type=int, default=2,
                   help="torch intra-op threads (default 2)")
    p.add_argument("--model", default=None,
                   help="checkpoint directory; defaults to the workload's \"model\"")
    args = p.parse_args(argv)
    if args.raw_decode is None and args.workload is None:
        p.error("--workload is required (or --raw-decode with --model)")
    if args.raw_decode is not None and args.model is None:
        p.error("--raw-decode needs --model")
    return args


def pick_pad_id(model_dir, model):
    """The tokenizer's pad id, else its eos id, else 0."""
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        if tok.pad_token_id is not None:
            return int(tok.pad_token_id)
        if tok.eos_token_id is not None:
            return int(tok.eos_token_id)
    except Exception as e:  # no/odd tokenizer: fall back to the configs
        print(f"hf_baseline: tokenizer not loaded ({e}); pad id from config", file=sys.stderr)
    for cfg in (model.generation_config, model.config):
        for name in ("pad_token_id", "eos_token_id"):
            v = getattr(cfg, name, None)
            if isinstance(v, (list, tuple)):
                v = v[0] if v else None
            if v is not None:
                return int(v)
    return 0


class Generator:
    """Greedy, EOS-ignoring batched generation with left padding."""

    def __init__(self, model_dir, threads):
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, GenerationConfig

        self.torch = torch
        torch.set_num_threads(threads)
        transformers.utils.logging.disable_progress_bar()
        # transformers 5 renamed torch_dtype to dtype (the old name still
        # works there, with a deprecation warning).
        dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, **{dtype_kw: torch.float32})
        self.model.eval()
        self.pad_id = pick_pad_id(model_dir, self.model)
        # Replace the checkpoint's generation config (which may ask for
        # sampling and lists EOS ids) with a clean one. generate() fills any
        # field left None from model.generation_config, so passing
        # eos_token_id=None to generate() alone would not drop EOS; with no
        # EOS anywhere there is no EOS stopping criterion, and EOS tokens are
        # generated like any other (the same as omnistage's ignore_eos: the
        # token is emitted, it just doesn't stop the sequence). We do NOT use
        # min_new_tokens, which would mask the EOS logits and so change the
        # greedy output.
        self.model.generation_config = GenerationConfig(
            do_sample=False,
            num_beams=1,
            eos_token_id=None,
            pad_token_id=self.pad_id,
            bos_token_id=getattr(self.model.config, "bos_token_id", None),
            use_cache=True,
        )
        self.engine = f"hf-transformers {transformers.__version__}, torch {torch.__version__}"

    def generate(self, prompts, max_tokens):
        """prompts: list of id lists; max_tokens: list of ints.
        Returns one list of exactly max_tokens[i] ids per prompt."""
        torch = self.torch
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            if p:
                ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
                mask[i, width - len(p):] = 1
        n = max(max_tokens)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=n,
                do_sample=False,
            )
        gen = out[:, width:]
        if gen.shape[1] != n:
            raise RuntimeError(f"generate stopped early: {gen.shape[1]} of {n} new tokens")
        return [gen[i, : max_tokens[i]].tolist() for i in range(len(prompts))]


def serve(gen, requests, max_batch, log=print):
    """Real-time static-batch serving loop. Returns (results by id, batch sizes)."""
    reqs = sorted(requests, key=lambda r: (r["arrival_s"], r["id"]))
    results = {}
    batch_sizes = []
    nxt = 0  # index of the first request not yet taken into a batch
    t0 = time.perf_counter()
    while nxt < len(reqs):
        now = time.perf_counter() - t0
        wait = reqs[nxt]["arrival_s"] - now
        if wait > 0:
            time.sleep(wait)
            now = time.perf_counter() - t0
        end = nxt
        while end < len(reqs) and end - nxt < max_batch and reqs[end]["arrival_s"] <= now:
            end += 1
        batch = reqs[nxt:end]
        nxt = end
        outs = gen.generate([r["prompt_ids"] for r in batch], [r["max_tokens"] for r in batch])
        done = time.perf_counter() - t0
        batch_sizes.append(len(batch))
        for r, o in zip(batch, outs):
            results[r["id"]] = {
                "id": r["id"],
                "output_ids": o,
                "completion_s": done,
                "jct_s": done - r["arrival_s"],
            }
        log(f"  batch {len(batch_sizes)}: {len(batch)} req, "
            f"prompt<={max(len(r['prompt_ids']) for r in batch)}, "
            f"new<={max(r['max_tokens'] for r in batch)}, took {done - now:.2f}s, t={done:.2f}s")
    return results, batch_sizes


def raw_decode(args):
    """Greedy generation of --new-tokens tokens for a batch of --prompt-len-token prompts, one
    generate call per batch size: the raw batched decode rate, prefill included."""
    import random

    gen = Generator(args.model, args.threads)
    vocab = int(gen.model.config.vocab_size)
    rng = random.Random(0)
    gen.generate([[1] * 8, [2] * 4], [4, 4])  # warm-up
    rows = []
    for b in (int(x) for x in args.raw_decode.split(",") if x.strip()):
        prompts = [[rng.randrange(vocab - 16) for _ in range(args.prompt_len)] for _ in range(b)]
        t = time.perf_counter()
        gen.generate(prompts, [args.new_tokens] * b)
        secs = time.perf_counter() - t
        rate = b * args.new_tokens / secs
        rows.append({"batch": b, "seconds": secs, "tokens_per_s": rate})
        print(f"hf_baseline raw decode: batch {b}: {b * args.new_tokens} tokens in {secs:.2f}s "
              f"= {rate:.1f} tok/s", flush=True)
    with open(args.out, "w") as f:
        json.dump({"engine": gen.engine, "threads": args.threads, "prompt_len": args.prompt_len,
                   "new_tokens": args.new_tokens, "batches": rows}, f)


def main(argv=None):
    args = parse_args(argv)
    if args.raw_decode is not None:
        return raw_decode(args)
    with open(args.workload) as f:
        wl = json.load(f)
    model_dir = args.model or wl["model"]
    requests = wl["requests"]
    if not requests:
        raise SystemExit("hf_baseline: the workload has no requests")

    import torch

    torch.manual_seed(int(wl.get("seed", 0)))
    t_load = time.perf_counter()
    gen = Generator(model_dir, args.threads)
    # Short warm-up so that the first batch does not pay one-off costs.
    gen.generate([[1] * 8, [2] * 4], [4, 4])
    print(f"hf_baseline: {gen.engine}; loaded + warmed up in {time.perf_counter() - t_load:.1f}s; "
          f"{len(requests)} requests, max batch {args.max_batch}, {args.threads} threads", flush=True)

    results, batch_sizes = serve(gen, requests, args.max_batch,
                                 log=lambda s: print(s, flush=True))

    first_arrival = min(r["arrival_s"] for r in requests)
    last_done = max(r["completion_s"] for r in results.values())
    makespan = last_done - first_arrival
    generated = sum(int(r["max_tokens"]) for r in requests)
    out_reqs = [results[r["id"]] for r in sorted(requests, key=lambda r: r["id"])]
    mean_jct = sum(r["jct_s"] for r in out_reqs) / len(out_reqs)
    report = {
        "engine": gen.engine,
        "threads": args.threads,
        "makespan_s": makespan,
        "generated_tokens": generated,
        "tokens_per_s": generated / makespan if makespan > 0 else 0.0,
        "mean_jct_s": mean_jct,
        "batches": len(batch_sizes),
        "max_batch": args.max_batch,
        "batch_sizes": batch_sizes,
        "requests": out_reqs,
    }
    with open(args.out, "w") as f:
        json.dump(report, f)
    print(f"hf_baseline: {gen.engine}: {len(requests)} requests, {generated} tokens in "
          f"{makespan:.2f}s makespan = {report['tokens_per_s']:.1f} tok/s, mean JCT "
          f"{mean_jct:.2f}s, {len(batch_sizes)} batches, {args.threads} threads", flush=True)


if __name__ == "__main__":
    main()
