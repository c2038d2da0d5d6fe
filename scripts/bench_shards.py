"""Shard balance: the spread between the heaviest and lightest shard of ``--moe-shard`` (LPT over expected
GPU-seconds) next to a naive round-robin over config ids, for the seed matrix and a 300-config synthetic one.

The nightly fans each GPU-count label out into shards, so the seed matrix is shown per label too.
Costs are the estimate (no history on this machine); with a history the same code uses medians.
Usage: python scripts/bench_shards.py [--matrix model_matrix.yaml]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pytest_moe.matrix import load_matrix  # noqa: E402
from pytest_moe.shards import partition, shard_loads  # noqa: E402


def synthetic_matrix(path: Path, seed: int = 11) -> Path:
    """25 models (3B to 1T parameters, a third FP8) x TP 1/2/4/8 x 3 MoE backends = 300 configs."""
    rng = random.Random(seed)
    models = {}
    for i in range(25):
        size = rng.choice([3, 7, 16, 30, 57, 80, 106, 120, 235, 355, 480, 671, 1000])
        models[f"Syn{i:02d}-{size}B"] = {"path": f"synthetic/syn{i:02d}-{size}b", "precision": rng.choice(["fp8", "native", "native"]),
                                         "tp": [1, 2, 4, 8]}
    doc = {"defaults": {"engine": "sglang", "moe_backends": ["auto", "triton", "flashinfer_cutlass"]}, "models": models}
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


def describe(label: str, configs: list, counts: tuple[int, ...]) -> None:
    for n in counts:
        if n > len(configs):
            continue
        lpt = shard_loads(partition(configs, n))
        ordered = sorted(configs, key=lambda c: c.id)
        naive = shard_loads([ordered[i::n] for i in range(n)])
        print(f"{label:<28} {len(configs):>4} configs  N={n:<2}  LPT: max {max(lpt) / 3600:7.2f} min {min(lpt) / 3600:7.2f} "
              f"spread {(max(lpt) - min(lpt)) / 3600:6.2f} GPU-h ({(max(lpt) - min(lpt)) / max(lpt):5.1%})   "
              f"round-robin spread {(max(naive) - min(naive)) / 3600:6.2f} GPU-h ({(max(naive) - min(naive)) / max(naive):5.1%})")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--matrix", default=str(Path(__file__).resolve().parent.parent / "model_matrix.yaml"))
    args = parser.parse_args()
    seed = load_matrix(args.matrix).configs
    describe("seed matrix (all)", seed, (2, 4, 8))
    for gpus in sorted({c.gpus_needed for c in seed}, reverse=True):
        describe(f"seed matrix, gpus{gpus} label", [c for c in seed if c.gpus_needed == gpus], (2, 3, 4))
    with tempfile.TemporaryDirectory() as tmp:
        synthetic = load_matrix(synthetic_matrix(Path(tmp) / "synthetic.yaml")).configs
        describe("synthetic 300", synthetic, (2, 4, 8, 16))
        for gpus in (8, 1):
            describe(f"synthetic, gpus{gpus} label", [c for c in synthetic if c.gpus_needed == gpus], (2, 4, 8))


if __name__ == "__main__":
    main()
