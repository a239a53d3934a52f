"""Sampling time against ``generation.batch_size``: one online step's rollout decoded in batches of each size.

    python3 benchmarks/decode_batch.py [--model embedded:smollm2-135m-instruct] [--prompts 8] [--samples 4]
                                       [--new-tokens 32] [--sizes 8,16,32] [--repeats 3] [--device cpu|cuda]

The rollout of the sentiment frontier's online runs (8 openings of ``bundled:sentiment_train.jsonl`` x 4
samples of 32 tokens at temperature 1) through posttrain's decoding loop (``generation.loop``), split into
batches of each size as the ``hf`` generator splits it; the sizes interleaved round by round, so that a noisy
machine slows each alike. Prints the median seconds per rollout and each size's time relative to the first.
``generation.batch_size`` also changes the draws (another batch, other random numbers): a run's samples
depend on it, its speed does not depend on anything else here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from posttrain.data.formats import resolve_source
from posttrain.model.load import load_causal_lm, load_tokenizer
from posttrain.rollout.decode import decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--sizes", default="8,16,32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    model = load_causal_lm(args.model, trainable=False).to(args.device).eval()
    tok = load_tokenizer(args.model)
    with open(resolve_source("bundled:sentiment_train.jsonl")) as f:
        texts = [json.loads(line)["prompt"] for line, _ in zip(f, range(args.prompts), strict=False)]
    rows = [tuple(tok(t, add_special_tokens=False)["input_ids"]) for t in texts for _ in range(args.samples)]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    times: dict[int, list[float]] = {b: [] for b in sizes}
    torch.manual_seed(0)
    with torch.no_grad():
        decode(model, rows[: sizes[0]], 2, 1.0, 0, 1.0, [tok.eos_token_id], pad)  # warm-up
        for _ in range(args.repeats):
            for b in sizes:
                if args.device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                for i in range(0, len(rows), b):
                    decode(model, rows[i : i + b], args.new_tokens, 1.0, 0, 1.0, [tok.eos_token_id], pad)
                if args.device == "cuda":
                    torch.cuda.synchronize()
                times[b].append(time.perf_counter() - start)
    shape = f"{args.prompts} prompts x {args.samples} samples x {args.new_tokens} new tokens, {args.repeats} repeats"
    threads = torch.get_num_threads()
    print(f"{args.model} on {args.device} (torch {torch.__version__}, {threads} threads): {shape}")
    print("| generation.batch_size | median s per rollout | relative to the first |\n|---|---:|---:|")
    first = statistics.median(times[sizes[0]])
    for b in sizes:
        med = statistics.median(times[b])
        print(f"| {b} | {med:.2f} | {med / first:.2f} |")


if __name__ == "__main__":
    main()
