"""Span attention kernels side by side: one call per block (``loop``) against one call per layer (``mask``).

    python3 benchmarks/span_kernels.py [--size 5m|42m] [--pairs 8,32] [--repeats 7] [--device cpu|cuda]

A DPO micro-batch in the shared-prefix layout (prompts 64-128 tokens, completions 64-256, the GPU issue's
shapes scaled by ``--scale``), forward + backward of the summed completion log-probs, the two kernels
interleaved so that a noisy machine slows both alike; prints the median time of each and their ratio. This
is the measurement behind ``span_attention: auto`` (``loop`` on a CPU, ``mask`` on CUDA).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_fixtures import build_model, build_tokenizer

from posttrain.data.collate import collate_pairs
from posttrain.data.examples import PreferenceRecord
from posttrain.model.logps import completion_logps


def pairs(n: int, vocab: int, scale: float, seed: int = 0) -> list[PreferenceRecord]:
    g = torch.Generator().manual_seed(seed)

    def length(lo: int, hi: int) -> int:
        return max(2, int(int(torch.randint(lo, hi + 1, (1,), generator=g)) * scale))

    def ids(k: int) -> tuple[int, ...]:
        return tuple(torch.randint(10, vocab, (k,), generator=g).tolist())

    return [PreferenceRecord(ids(length(64, 128)), ids(length(64, 256)), ids(length(64, 256)), i) for i in range(n)]


def step(model: torch.nn.Module, batch: object, kernel: str, device: torch.device) -> float:
    b: object = batch
    t0 = time.perf_counter()
    out = completion_logps(
        model, b.input_ids.to(device), b.attention_mask.to(device), b.loss_mask.to(device),  # type: ignore[attr-defined]
        position_ids=b.position_ids.to(device), spans=b.spans, span_kernel=kernel,  # type: ignore[attr-defined]
    )  # fmt: skip
    out.logps.sum().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="5m")
    parser.add_argument("--pairs", default="8,32")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--scale", type=float, default=0.5, help="length scale of the GPU issue's shapes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, args.size).to(device)
    print(f"device {device}, torch {torch.__version__}, model {args.size}, length scale {args.scale}")
    print("| pairs | tokens in the row | loop (s) | mask (s) | loop / mask |")
    print("|---|---|---|---|---|")
    for n in (int(x) for x in args.pairs.split(",")):
        batch = collate_pairs(pairs(n, len(tokenizer), args.scale), tokenizer.pad_token_id, "shared_prefix")
        times: dict[str, list[float]] = {"loop": [], "mask": []}
        for kernel in times:  # warm-up (FlexAttention compiles on its first call)
            step(model, batch, kernel, device)
        for _ in range(args.repeats):
            for kernel in times:
                times[kernel].append(step(model, batch, kernel, device))
        loop, mask = statistics.median(times["loop"]), statistics.median(times["mask"])
        print(f"| {n} | {batch.input_ids.shape[1]} | {loop:.3f} | {mask:.3f} | {loop / mask:.2f} |")


if __name__ == "__main__":
    main()
