#!/usr/bin/env python3
"""diffusers baseline for omnistage's text-to-image benchmark (``benches/benches/images.rs``).

What it measures
----------------
How a diffusers user generates the same images omnistage serves: the same diffusers pipeline
folder (``omnistage make-tiny`` writes one at ``tiny-omni/image/``), the same prompts, negative
prompt, size, steps and guidance, on the CPU in float32.

The folder's text encoder is an LLM (Qwen3, as Qwen-Image conditions its DiT), which
``StableDiffusion3Pipeline`` cannot drive itself, so prompts are encoded here exactly as
omnistage's LLM encoder does (``engines/src/diffusion/text/llm.rs``): tokenize with
``add_special_tokens=True``, keep the first ``max_text_tokens`` ids, pad at the end to
``max_text_tokens`` with the pad token (``<|endoftext|>``), run ``AutoModel`` (``Qwen3Model``)
over the padded row with no padding mask (the model is causal, so pads never change a real
token's row); the token rows are ``last_hidden_state`` (after the final norm) and the pooled
vector is their mean over the real tokens (the first row when there are none). The negative
prompt is encoded the same way. The pipeline is built with every text encoder absent and gets
``prompt_embeds`` / ``pooled_prompt_embeds`` / ``negative_prompt_embeds`` /
``negative_pooled_prompt_embeds``.

Two ways of serving, both timed after a warm-up, both including text encoding, each run
``--repeats`` times back to back (the run with the median makespan is reported):

* ``sequential``: one request at a time, one pipeline call each (the loop a diffusers user
  writes); a request's JCT is its own call's wall time.
* ``batch N``: diffusers' own static batching: the requests, all there at time 0, in pipeline
  calls of up to N prompts (lists of embeddings); a request's JCT is the time from 0 until its
  batch's call returns.

Optionally, an end-to-end check of one request with given initial latents: ``--check-latents``
names a ``.npy`` f32 array ``[n, C, height/s, width/s]`` (``s`` the VAE's downscale factor), as
omnistage's DiT stage draws them; the first image is written as PNG to ``--check-out`` for the
Rust bench to compare with omnistage's pixels.

Input (``--requests``, written by the Rust bench)::

    {"pipeline": "/abs/tiny-omni/image", "width": 64, "height": 64, "steps": 12,
     "guidance_scale": 4.0, "negative_prompt": "...", "max_text_tokens": 16,
     "requests": [{"id": 0, "prompt": "...", "seed": 1}, ...]}

Output (``--out``)::

    {"engine": "diffusers X, transformers Y, torch Z", "threads": N, "images": K,
     "modes": [{"mode": "sequential", "makespan_s", "images_per_s", "mean_jct_s",
                "p50_jct_s", "p90_jct_s", "jct_s": [...], "images_per_s_runs": [...]},
               {"mode": "batch 8", ...}, ...],
     "check": {"png": "...", "seconds": s}}            (only with --check-latents)

Install: ``benches/hf_requirements.txt`` (torch 2.15, transformers 5.24, diffusers 0.42.1).

Run::

    /work/hf-venv/bin/python benches/diffusers_baseline.py --requests R.json --out O.json \\
        [--threads 2] [--batch-sizes 8,24] [--repeats 3] \\
        [--check-latents L.npy --check-prompt P --check-out image.png]
"""

import argparse
import json
import os
import time


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", help="request list (JSON, see the docstring)")
    ap.add_argument("--pipeline", help="pipeline folder (overrides the request file's)")
    ap.add_argument("--out", help="result JSON")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument(
        "--batch-sizes",
        default="all",
        help="comma-separated static batch sizes to time ('all' = every request in one call; "
        "empty = none)",
    )
    ap.add_argument("--no-sequential", action="store_true", help="skip the sequential mode")
    ap.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="runs of each mode, back to back; the one with the median makespan is reported",
    )
    ap.add_argument("--check-latents", help=".npy initial latents for the end-to-end check")
    ap.add_argument("--check-prompt", help="prompt of the end-to-end check")
    ap.add_argument("--check-out", help="PNG written by the end-to-end check")
    return ap.parse_args()


def percentile(sorted_values, p):
    return sorted_values[int(round((len(sorted_values) - 1) * p))]


class Baseline:
    def __init__(self, folder, max_text_tokens, threads):
        import torch
        from diffusers import (
            AutoencoderKL,
            FlowMatchEulerDiscreteScheduler,
            SD3Transformer2DModel,
            StableDiffusion3Pipeline,
        )
        from transformers import AutoModel, AutoTokenizer

        torch.set_num_threads(threads)
        self.torch = torch
        self.max_text_tokens = max_text_tokens
        self.tokenizer = AutoTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))
        self.text_encoder = AutoModel.from_pretrained(
            os.path.join(folder, "text_encoder"), dtype=torch.float32
        ).eval()
        pad = None
        for name in ("<|endoftext|>", "<pad>", "</s>", "<|end_of_text|>"):
            tid = self.tokenizer.convert_tokens_to_ids(name)
            if isinstance(tid, int) and tid != self.tokenizer.unk_token_id and tid >= 0:
                pad = tid
                break
        self.pad = 0 if pad is None else pad
        transformer = SD3Transformer2DModel.from_pretrained(
            os.path.join(folder, "transformer"), torch_dtype=torch.float32
        ).eval()
        vae = AutoencoderKL.from_pretrained(
            os.path.join(folder, "vae"), torch_dtype=torch.float32
        ).eval()
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(
            os.path.join(folder, "scheduler")
        )
        self.pipe = StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=scheduler,
            vae=vae,
            text_encoder=None,
            tokenizer=None,
            text_encoder_2=None,
            tokenizer_2=None,
            text_encoder_3=None,
            tokenizer_3=None,
        )
        self.pipe.set_progress_bar_config(disable=True)

    def encode(self, prompts):
        """(token rows [B, L, D], pooled [B, D]) as omnistage's LLM encoder computes them."""
        torch = self.torch
        ids, real = [], []
        for p in prompts:
            t = self.tokenizer(p, add_special_tokens=True)["input_ids"][: self.max_text_tokens]
            real.append(len(t))
            ids.append(t + [self.pad] * (self.max_text_tokens - len(t)))
        with torch.no_grad():
            out = self.text_encoder(
                input_ids=torch.tensor(ids, dtype=torch.long),
                attention_mask=torch.ones(len(ids), self.max_text_tokens, dtype=torch.long),
            ).last_hidden_state
        pooled = torch.stack([out[i, : max(r, 1)].mean(0) for i, r in enumerate(real)])
        return out, pooled

    def generate(self, prompts, negative, width, height, steps, guidance, seeds=None, latents=None):
        """PIL images for `prompts` (one pipeline call)."""
        torch = self.torch
        emb, pooled = self.encode(prompts)
        neg, neg_pooled = self.encode([negative] * len(prompts))
        generator = None
        if latents is None and seeds is not None:
            generator = [torch.Generator().manual_seed(int(s)) for s in seeds]
        with torch.no_grad():
            return self.pipe(
                prompt_embeds=emb,
                pooled_prompt_embeds=pooled,
                negative_prompt_embeds=neg,
                negative_pooled_prompt_embeds=neg_pooled,
                width=width,
                height=height,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=generator,
                latents=latents,
                output_type="pil",
            ).images


def summarise(mode, jct, makespan, images):
    s = sorted(jct)
    return {
        "mode": mode,
        "makespan_s": makespan,
        "images_per_s": images / makespan,
        "mean_jct_s": sum(jct) / len(jct),
        "p50_jct_s": percentile(s, 0.5),
        "p90_jct_s": percentile(s, 0.9),
        "jct_s": jct,
    }


def main():
    args = parse_args()
    spec = {}
    if args.requests:
        with open(args.requests) as f:
            spec = json.load(f)
    folder = args.pipeline or spec.get("pipeline")
    if not folder:
        raise SystemExit("name the pipeline folder (--pipeline or the request file's `pipeline`)")
    width, height = spec.get("width", 64), spec.get("height", 64)
    steps, guidance = spec.get("steps", 12), spec.get("guidance_scale", 4.0)
    negative = spec.get("negative_prompt", "")
    requests = spec.get("requests", [])

    import diffusers
    import torch
    import transformers

    # Loading chatter (the causal LM head the base model leaves out, accelerate hints).
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    diffusers.logging.set_verbosity_error()

    b = Baseline(folder, spec.get("max_text_tokens", 16), args.threads)
    result = {
        "engine": f"diffusers {diffusers.__version__}, transformers {transformers.__version__}, "
        f"torch {torch.__version__} (cpu, float32)",
        "threads": torch.get_num_threads(),
        "images": len(requests),
        "modes": [],
    }

    if args.check_latents:
        import numpy as np

        lat = torch.from_numpy(np.load(args.check_latents).astype(np.float32))
        prompt = args.check_prompt or (requests[0]["prompt"] if requests else "")
        t0 = time.perf_counter()
        images = b.generate([prompt] * lat.shape[0], negative, width, height, steps, guidance, latents=lat)
        seconds = time.perf_counter() - t0
        out = args.check_out or "check.png"
        images[0].save(out)
        result["check"] = {"png": out, "seconds": seconds}

    if requests:
        # Warm-up (first calls allocate and pick kernels).
        b.generate([requests[0]["prompt"]], negative, width, height, steps, guidance, seeds=[0])
        prompts = [r["prompt"] for r in requests]
        seeds = [r.get("seed", i) for i, r in enumerate(requests)]

        def sequential():
            jct = []
            start = time.perf_counter()
            for p, s in zip(prompts, seeds):
                t0 = time.perf_counter()
                b.generate([p], negative, width, height, steps, guidance, seeds=[s])
                jct.append(time.perf_counter() - t0)
            return jct, time.perf_counter() - start

        def batched(size):
            jct = []
            start = time.perf_counter()
            for i in range(0, len(prompts), size):
                chunk = slice(i, i + size)
                b.generate(
                    prompts[chunk], negative, width, height, steps, guidance, seeds=seeds[chunk]
                )
                jct.extend([time.perf_counter() - start] * len(prompts[chunk]))
            return jct, time.perf_counter() - start

        def timed(mode, run):
            runs = sorted((run() for _ in range(max(1, args.repeats))), key=lambda r: r[1])
            jct, makespan = runs[len(runs) // 2]
            row = summarise(mode, jct, makespan, len(prompts))
            row["images_per_s_runs"] = [len(prompts) / m for _, m in runs]
            result["modes"].append(row)

        if not args.no_sequential:
            timed("sequential", sequential)
        sizes = []
        for tok in args.batch_sizes.split(","):
            tok = tok.strip()
            if tok == "all":
                sizes.append(len(prompts))
            elif tok:
                sizes.append(max(1, min(int(tok), len(prompts))))
        for size in dict.fromkeys(sizes):
            timed(f"batch {size}", lambda size=size: batched(size))

    text = json.dumps(result)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    for m in result["modes"]:
        print(
            f"diffusers {m['mode']:<12} {m['images_per_s']:8.2f} images/s, "
            f"mean JCT {m['mean_jct_s']:.3f} s"
        )


if __name__ == "__main__":
    main()
