#!/usr/bin/env python3
"""numpy baseline for `analysis::histogram::all_pairs_histogram`.

All pairs i < j of N x d L2-normalised float32 embeddings, genuine (same label) and
impostor histograms of cosine similarity, 100 bins over [-1, 1], scores outside clamped
to the edge bins. Computed in row blocks (E[r0:r1] @ E[r0:].T) so the N x N matrix is
never held at once.

    python3 scripts/numpy_histogram_baseline.py [--n 20000] [--dim 512] [--ids 400]
        [--block 2048] [--method histogram|bincount] [--repeat 3]

Only numpy is needed. Prints the wall and CPU time of each repeat and the pair totals.
"""

import argparse
import time

import numpy as np


def make_data(n, dim, ids, seed=0):
    rng = np.random.default_rng(seed)
    emb = rng.uniform(-1.0, 1.0, size=(n, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    labels = np.arange(n) * ids // n
    return emb, labels


def block_scores(emb, labels, r0, r1):
    """Scores and same-label mask of rows r0..r1 against columns j > i."""
    scores = emb[r0:r1] @ emb[r0:].T
    same = labels[r0:r1, None] == labels[None, r0:]
    upper = np.arange(r0, r1)[:, None] < np.arange(r0, len(labels))[None, :]
    return scores, same, upper


def histogram_method(emb, labels, block, bins):
    gen = np.zeros(bins, np.int64)
    imp = np.zeros(bins, np.int64)
    for r0 in range(0, len(labels), block):
        r1 = min(r0 + block, len(labels))
        scores, same, upper = block_scores(emb, labels, r0, r1)
        np.clip(scores, -1.0, 1.0, out=scores)
        gen += np.histogram(scores[upper & same], bins=bins, range=(-1.0, 1.0))[0]
        imp += np.histogram(scores[upper & ~same], bins=bins, range=(-1.0, 1.0))[0]
    return gen, imp


def bincount_method(emb, labels, block, bins):
    counts = np.zeros(2 * bins, np.int64)
    half = np.float32(bins / 2)
    for r0 in range(0, len(labels), block):
        r1 = min(r0 + block, len(labels))
        scores, same, upper = block_scores(emb, labels, r0, r1)
        idx = np.floor((scores + np.float32(1.0)) * half)
        idx = np.clip(idx, 0, bins - 1).astype(np.int64) + bins * same
        counts += np.bincount(idx[upper], minlength=2 * bins)
    return counts[bins:], counts[:bins]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--ids", type=int, default=400)
    ap.add_argument("--bins", type=int, default=100)
    ap.add_argument("--block", type=int, default=2048)
    ap.add_argument("--method", choices=["histogram", "bincount"], default="histogram")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    emb, labels = make_data(args.n, args.dim, args.ids)
    method = histogram_method if args.method == "histogram" else bincount_method
    for _ in range(args.repeat):
        t, c = time.perf_counter(), time.process_time()
        gen, imp = method(emb, labels, args.block, args.bins)
        elapsed, cpu = time.perf_counter() - t, time.process_time() - c
        print(
            f"{args.n}x{args.dim} {args.method}: {elapsed:.3f} s wall, {cpu:.2f} s cpu, "
            f"total {gen.sum() + imp.sum()} genuine {gen.sum()}"
        )


if __name__ == "__main__":
    main()
