"""Self-BLEU: trace_dist.metrics (n-gram index, O(tokens)) vs the Texygen loop over nltk.sentence_bleu
(O(N^2 * tokens)), on the same synthetic corpus; checks the values agree.

    python benchmarks/bench_self_bleu.py [--n 300] [--big 1000]
"""

import argparse
import json
import random
import time

from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

from trace_dist.metrics import self_bleu


def corpus(n, seed=0, vocab=2000, length=(10, 60)):
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(vocab)]
    weights = [1.0 / (i + 1) for i in range(vocab)]  # Zipf-like, so n-grams repeat as in text
    return [rng.choices(words, weights, k=rng.randint(*length)) for _ in range(n)]


def texygen_self_bleu(samples, n):
    smooth = SmoothingFunction().method1
    return sum(sentence_bleu(samples[:i] + samples[i + 1:], h, (1.0 / n,) * n, smoothing_function=smooth)
               for i, h in enumerate(samples)) / len(samples)


def timed(fn, *args):
    start = time.perf_counter()
    value = fn(*args)
    return value, time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300, help="samples for the side-by-side run")
    ap.add_argument("--big", type=int, default=1000, help="samples for the index-only run")
    args = ap.parse_args()
    samples = corpus(args.n)
    ours, t_ours = timed(self_bleu, samples, 4)
    ref, t_ref = timed(texygen_self_bleu, samples, 4)
    big, t_big = timed(self_bleu, corpus(args.big, seed=1), 4)
    print(f"{'method':<28}{'N':>6}{'seconds':>10}{'self-BLEU-4':>14}")
    print(f"{'nltk sentence_bleu loop':<28}{args.n:>6}{t_ref:>10.2f}{ref:>14.6f}")
    print(f"{'trace_dist.metrics':<28}{args.n:>6}{t_ours:>10.2f}{ours:>14.6f}")
    print(f"{'trace_dist.metrics':<28}{args.big:>6}{t_big:>10.2f}{big:>14.6f}")
    print(json.dumps({"n": args.n, "speedup": round(t_ref / t_ours, 1), "abs_diff": abs(ours - ref),
                      "big_n": args.big, "big_seconds": round(t_big, 3),
                      "naive_big_seconds_extrapolated": round(t_ref * (args.big / args.n) ** 2, 1)}))


if __name__ == "__main__":
    main()
