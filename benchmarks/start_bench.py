"""Start cost of a random-init preset: building the base and hashing it, the two things every
rank did before its first step (issue 22, section 8).

Run once per code tree, so two versions can be compared side by side on one machine:

    PYTHONPATH=OLD_TREE python benchmarks/start_bench.py --preset llava-interleave-qwen-0.5b
    PYTHONPATH=NEW_TREE python benchmarks/start_bench.py --preset llava-interleave-qwen-0.5b

Prints one JSON line: seconds to build (`factory.build_for_run` as a ZeRO-1/2 rank builds,
fp32, whole), seconds to hash (`factory.base_record`, in that tree's scheme), parameters, and
the process's peak resident memory. Both trees expose the same two calls.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llava-interleave-qwen-0.5b")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import umbrella_ds
    from umbrella_ds.config import load_config
    from umbrella_ds.train import factory

    cfg = load_config(
        None,
        [
            f"model.preset={args.preset}",
            'model.modalities={"T1": {"size": [96, 96, 96], "patch": [16, 16, 16]}}',
        ],
    )
    t0 = time.perf_counter()
    built = factory.build_for_run(cfg)
    t1 = time.perf_counter()
    record = factory.base_record(built)
    t2 = time.perf_counter()
    print(
        json.dumps(
            {
                "tree": umbrella_ds.__file__,
                "preset": args.preset,
                "threads": args.threads,
                "parameters": sum(p.numel() for p in built.model.parameters()),
                "build_s": round(t1 - t0, 2),
                "hash_s": round(t2 - t1, 2),
                "record": record,
                "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
