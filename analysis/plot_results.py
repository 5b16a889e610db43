"""Thin wrapper: the figures and effective-length table of a results directory.

Usage: python analysis/plot_results.py RESULTS_DIR [--threshold 0.5]   (same as `longctx plot`)
"""
import argparse

from longctx.plots import plot_all

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("results")
    parser.add_argument("--threshold", type=float, default=0.5)
    args = parser.parse_args()
    paths, table = plot_all(args.results, threshold=args.threshold)
    print(table.to_string(index=False))
    print("\n".join(str(p) for p in paths))
