"""Weight-sync cost, side by side in one run: the node-local file, the gloo broadcast, a memory copy.

    .venv/bin/python bench/bench_sync.py [--repeats 5] [--bucket-mb 32] [--out /tmp/bench_sync]

The policy is bench_throughput.py's 24M-parameter Qwen2 shape (hidden 512, 8 layers, fp32) with the
project's DoRA adapters (rank 8, alpha 16) on every projection, perturbed so that every merged weight
differs from the base. One vLLM engine (CPU) in this process holds the policy; this process plays
learner rank 0. Each repeat measures, interleaved:

- ``memcpy``: one copy of a buffer of the payload's size: the floor for moving the bytes once;
- ``merge``: the learner computing every merged tensor (the DoRA merge), nothing sent;
- ``file``: learner 0 streams the safetensors file into /dev/shm (hashing as it writes), then the
  engine checks the sha256 and the version and reloads it (``cluster.weight_sync`` for engines on
  learner 0's node);
- ``broadcast``: learner 0 broadcasts over a gloo group of itself and the engine's worker (the
  transport of engines on other nodes, here over loopback), the engine reloading as buckets arrive.

Seconds run from the learner's first merge to the engine's prefix-cache reset; MiB/s is the payload
over those seconds. Medians over the repeats after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _in_thread(fn, *args) -> threading.Thread:
    t = threading.Thread(target=fn, args=args, daemon=True)
    t.start()
    return t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--bucket-mb", type=int, default=32, help="learner.sync_bucket_mb")
    p.add_argument("--out", type=Path, default=Path("/tmp/bench_sync"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    import torch

    from bench.bench_throughput import build_policy
    from gdpo import learner, rollout, sync_transport, weight_sync
    from gdpo.config import load_config
    from gdpo.records import SyncGroup, WeightUpdate

    policy = args.out / "policy"
    info = build_policy(policy)
    cfg = load_config(None, [f"model.path={policy}", f"learner.sync_bucket_mb={args.bucket_mb}"])
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    llm = rollout.make_engine(str(policy), cfg)
    model, _ = learner.build_policy(str(policy), cfg)
    torch.manual_seed(0)
    for param in model.parameters():
        if param.requires_grad:
            param.data += 0.05 * torch.randn_like(param)
    tensors = weight_sync.sync_tensors(model, weight_sync.sync_module_names(model, cfg.learner.target_modules))
    payload = sum(t.nbytes for t in tensors)
    bucket = args.bucket_mb << 20
    directory = tempfile.mkdtemp(prefix="gdpo-bench-sync-", dir=sync_transport.node_local_dir())

    listen = sync_transport.listen_socket("127.0.0.1")
    spec = SyncGroup(
        "gloo", "127.0.0.1", listen.getsockname()[1], 2, "bench", 300.0, bucket, weight_sync.manifest_of(tensors)
    )
    opening = _in_thread(weight_sync.engine_open, llm, spec, 1)
    comm = sync_transport.open_comm(spec, 0, "cpu", listen)
    opening.join()

    src = torch.ones(payload, dtype=torch.uint8)
    dst = torch.empty_like(src)
    times: dict[str, list[float]] = {k: [] for k in ("memcpy", "merge", "file", "file_publish", "broadcast")}
    for rep in range(args.repeats + 1):
        version = 2 * rep + 1
        t0 = time.perf_counter()
        dst.copy_(src)
        t1 = time.perf_counter()
        with torch.no_grad():
            for t in tensors:
                t.make()
        t2 = time.perf_counter()
        path, digest, size = weight_sync.publish(tensors, version, bucket, directory=directory)
        t3 = time.perf_counter()
        weight_sync.engine_load_file(llm, WeightUpdate(version=version, num_bytes=size, path=path, checksum=digest))
        t4 = time.perf_counter()
        receiving = _in_thread(weight_sync.engine_receive, llm, version + 1)
        weight_sync.publish(tensors, version + 1, bucket, comm=comm)
        receiving.join()
        t5 = time.perf_counter()
        assert rollout.engine_version(llm) == version + 1, "the broadcast did not land"
        if rep == 0:
            continue  # warm-up
        for key, seconds in (
            ("memcpy", t1 - t0),
            ("merge", t2 - t1),
            ("file", t4 - t2),
            ("file_publish", t3 - t2),
            ("broadcast", t5 - t4),
        ):
            times[key].append(seconds)
    weight_sync.engine_close(llm)
    comm.close()

    med = {k: statistics.median(v) for k, v in times.items()}
    mib = payload / 2**20
    import platform

    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor(),
    )
    print(
        f"\n{info['parameters'] / 1e6:.1f}M-parameter policy, {len(tensors)} tensors, {mib:.1f} MiB per version, "
        f"{args.bucket_mb} MiB buckets; {cpu}, {os.cpu_count()} cores; median of {args.repeats}"
    )
    print(f"{'transfer':<42}{'seconds':>10}{'MiB/s':>10}{'x memcpy':>10}")
    labels = {
        "memcpy": "memory copy of the payload (floor)",
        "merge": "DoRA merge alone (learner compute)",
        "file": "file: publish + engine reload",
        "broadcast": "gloo broadcast + engine reload",
    }
    for key, label in labels.items():
        print(f"{label:<42}{med[key]:>10.3f}{mib / med[key]:>10.0f}{med[key] / med['memcpy']:>10.1f}")
    print(f"(file: {med['file_publish']:.3f} s of it is the learner writing and hashing the file)")
    (args.out / "results.json").write_text(
        json.dumps(
            {
                "payload_bytes": payload,
                "tensors": len(tensors),
                "bucket_mb": args.bucket_mb,
                "cpu": cpu,
                "seconds": times,
                "median_s": med,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
