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

``--adapter-ranks 8,128`` adds the adapter sync of ``learner.adapter=lora`` (issue 32) to the same
repeats: plain LoRA adapters of each rank (alpha = 2 x rank) on every projection of the same policy,
published as a peft directory (file) or broadcast, loaded as its policy LoRA by an engine of that
rank's own, started as a run of that rank starts it (LoRA enabled, ``max_lora_rank`` fitting the rank).
Every engine then runs in processes of its own (``rollout.in_process=false``, the GPU default), so the
merged figures are not the in-process ones of the table in bench/RESULTS.md (issue 15). Two ranks separate the fixed cost of a LoRA load from
the per-byte cost, for the extrapolation to larger models; ``--gen-tokens`` also times decoding the same
prompts on the merged engine and through the LoRA, what serving the adapter costs the rollout.
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
    p.add_argument("--adapter-ranks", default="", help="LoRA ranks for the adapter sync, e.g. 8,128 ('' = none)")
    p.add_argument("--gen-tokens", type=int, default=0, help="decode this many tokens x 8 prompts per engine")
    args = p.parse_args()
    ranks = [int(r) for r in args.adapter_ranks.split(",") if r]
    args.out.mkdir(parents=True, exist_ok=True)

    import torch

    from bench.bench_throughput import build_policy
    from gdpo import learner, rollout, sync_transport, weight_sync
    from gdpo.config import load_config
    from gdpo.records import SyncGroup, WeightUpdate

    policy = args.out / "policy"
    info = build_policy(policy)
    own = ["rollout.in_process=false"] if ranks else []  # two engines: each in its own processes
    cfg = load_config(None, [f"model.path={policy}", f"learner.sync_bucket_mb={args.bucket_mb}", *own])
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    llm = rollout.make_engine(str(policy), cfg)
    adapters = [_Adapter(str(policy), r, args.bucket_mb, own) for r in ranks]
    for a in adapters:  # each rank's engine as a run of that rank starts it (max_lora_rank fits the rank)
        a.llm = rollout.make_engine(str(policy), a.cfg, lora_rank=a.rank)
        a.join()

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
        for a in adapters:
            a.sync(version)
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
    gen = {}
    if args.gen_tokens:
        gen["merged"] = _decode(llm, args.gen_tokens)
        for a in adapters:
            gen[f"LoRA rank {a.rank}"] = _decode(a.llm, args.gen_tokens)
    weight_sync.engine_close(llm)
    comm.close()
    for a in adapters:
        a.close()

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
    adapter_rows = {}
    for a in adapters:
        row = {k: statistics.median(v) for k, v in a.times.items()}
        adapter_rows[a.rank] = {"payload_bytes": a.payload, **row}
        kib = a.payload / 2**10
        print(f"LoRA rank {a.rank}: {kib:.0f} KiB per version ({a.payload / payload:.4f} of merged)")
        for key in ("file", "broadcast"):
            print(f"  adapter {key:<34}{row[key]:>10.3f}{kib / 1024 / row[key]:>10.1f}")
    for name, tps in gen.items():
        print(f"decode {args.gen_tokens} tokens x 8 prompts, {name} engine: {tps:.0f} tokens/s")
    if len(adapters) >= 2:
        _extrapolate(med, payload, adapters)
    (args.out / "results.json").write_text(
        json.dumps(
            {
                "payload_bytes": payload,
                "tensors": len(tensors),
                "bucket_mb": args.bucket_mb,
                "cpu": cpu,
                "seconds": times,
                "median_s": med,
                "adapter": adapter_rows,
                "decode_tokens_per_s": gen,
            },
            indent=2,
        )
    )


class _Adapter:
    """One LoRA rank's adapter sync: its learner (plain LoRA, B perturbed), a publish directory and a gloo
    group with the LoRA engine; ``sync`` times the file and the broadcast of one version each."""

    def __init__(self, policy: str, rank: int, bucket_mb: int, own: list):
        import torch

        from gdpo import dora, learner, learner_sync, sync_transport
        from gdpo.config import load_config

        self.rank, self.bucket = rank, bucket_mb << 20
        self.cfg = load_config(
            None,
            [
                f"model.path={policy}",
                f"learner.sync_bucket_mb={bucket_mb}",
                "learner.adapter=lora",
                f"learner.dora_rank={rank}",
                f"learner.dora_alpha={2 * rank}",
                *own,
            ],
        )
        self.model, _ = learner.build_policy(policy, self.cfg)
        torch.manual_seed(rank)
        for _, layer in dora.dora_layers(self.model):
            layer.lora_B.data += 0.05 * torch.randn_like(layer.lora_B)
        self.tensors = learner_sync.sync_payload(self.model, [], adapter=True)
        self.manifest, self.config = learner_sync.sync_manifest(self.model, [], adapter=True)
        self.payload = sum(t.nbytes for t in self.tensors)
        self.directory = tempfile.mkdtemp(prefix=f"gdpo-bench-lora{rank}-", dir=sync_transport.node_local_dir())
        self.times: dict[str, list[float]] = {"file": [], "broadcast": []}
        self.comm = self.llm = None

    def join(self) -> None:
        from gdpo import sync_transport, weight_sync
        from gdpo.records import SyncGroup

        listen = sync_transport.listen_socket("127.0.0.1")
        port = listen.getsockname()[1]
        spec = SyncGroup(
            "gloo", "127.0.0.1", port, 2, f"lora{self.rank}", 300.0, self.bucket, self.manifest, self.config
        )
        opening = _in_thread(weight_sync.engine_open, self.llm, spec, 1)
        self.comm = sync_transport.open_comm(spec, 0, "cpu", listen)
        opening.join()

    def sync(self, version: int) -> None:
        from gdpo import dora, rollout, weight_sync
        from gdpo.records import WeightUpdate

        config = dora.peft_config(self.model)
        t0 = time.perf_counter()
        path, digest, size = weight_sync.publish(
            self.tensors, version, self.bucket, directory=self.directory, adapter_config=config
        )
        update = WeightUpdate(version=version, num_bytes=size, path=path, checksum=digest, adapter=True)
        weight_sync.engine_load_file(self.llm, update)
        t1 = time.perf_counter()
        receiving = _in_thread(weight_sync.engine_receive, self.llm, version + 1)
        weight_sync.publish(self.tensors, version + 1, self.bucket, comm=self.comm, adapter_config=config)
        receiving.join()
        t2 = time.perf_counter()
        assert rollout.engine_state(self.llm)[0] == version + 1, "the adapter broadcast did not land"
        if version > 1:  # version 1 is the warm-up
            self.times["file"].append(t1 - t0)
            self.times["broadcast"].append(t2 - t1)

    def close(self) -> None:
        import shutil

        from gdpo import weight_sync

        weight_sync.engine_close(self.llm)
        self.comm.close()
        shutil.rmtree(self.directory, ignore_errors=True)


# (hidden, intermediate, layers, KV width) of Qwen2.5-1.5B and -7B, whose projections all get adapters
SHAPES = {"1.5B": (1536, 8960, 28, 256), "7B": (3584, 18944, 28, 512)}


def _projections(hidden: int, inter: int, kv: int) -> list[tuple[int, int]]:
    """(in, out) of q, k, v, o, gate, up, down."""
    return [
        (hidden, hidden),
        (hidden, kv),
        (hidden, kv),
        (hidden, hidden),
        (hidden, inter),
        (hidden, inter),
        (inter, hidden),
    ]


def _extrapolate(med: dict, payload: int, adapters: list) -> None:
    """Bytes per sync (bf16) at larger shapes, and seconds from this run's rates: the merged sync moves its
    bytes at the measured MiB/s; an adapter sync costs a fixed part (vLLM's adapter load) plus its bytes at
    the rate the two measured ranks' difference gives (a line through them)."""
    lo, hi = adapters[0], adapters[-1]
    print("\nextrapolated (bf16, every projection adapted; this CPU's rates, engine reload included):")
    print(
        f"{'model':<6}{'merged MiB':>12}{'file s':>9}{'bcast s':>9}{'rank':>6}{'adapter MiB':>13}{'file s':>9}{'bcast s':>9}"
    )
    for name, (hidden, inter, layers, kv) in SHAPES.items():
        proj = _projections(hidden, inter, kv)
        merged = layers * sum(i * o for i, o in proj) * 2
        for rank in (8, 64):
            adapter = layers * sum(rank * (i + o) for i, o in proj) * 2
            row = [
                name,
                merged / 2**20,
                merged / payload * med["file"],
                merged / payload * med["broadcast"],
                rank,
                adapter / 2**20,
            ]
            for key in ("file", "broadcast"):
                t_lo, t_hi = statistics.median(lo.times[key]), statistics.median(hi.times[key])
                per_byte = max(t_hi - t_lo, 0.0) / (hi.payload - lo.payload)
                row.append(t_lo + (adapter - lo.payload) * per_byte)
            print("{:<6}{:>12.0f}{:>9.2f}{:>9.2f}{:>6}{:>13.1f}{:>9.3f}{:>9.3f}".format(*row))


def _decode(llm, tokens: int) -> float:
    """Tokens per second decoding ``tokens`` tokens for each of 8 prompts (every one runs to the length),
    under the engine's current policy (through its policy LoRA if it holds one)."""
    from gdpo import rollout

    prompts = [f"Compute {a}+{a + 1}-{a + 2}\n" for a in range(8)]
    sampling = dict(max_new_tokens=tokens, min_new_tokens=tokens, temperature=1.0, seed=0)
    version = rollout.engine_state(llm)[0]
    rollout.generate_checked(llm, version, prompts, 1, **sampling)  # warm-up
    t0 = time.perf_counter()
    batch = rollout.generate_checked(llm, version, prompts, 1, **sampling)
    return sum(len(c) for c in batch.completion_ids) / (time.perf_counter() - t0)


if __name__ == "__main__":
    main()
