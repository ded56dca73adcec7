"""An on-disk vector index for libraries past RAM: FAISS IVF vs LanceDB, against exact search, on the CPU.

    python bench/vector_index.py --write   # 100,000 and 1,000,000 rows, random and clustered (minutes)
    python bench/vector_index.py --quick   # 20,000 rows: a smoke run (seconds)

Rows are 512-d float32 unit vectors made in chunks from a seeded RNG, so 1M rows (2 GiB) fit on a small
machine. Two kinds: ``random`` (i.i.d. Gaussian directions: no cluster structure, the worst case for any
inverted-file index, since a query's neighbours are spread over all cells; the recall there is pessimistic)
and ``clustered`` (rows around N/200 random centres, cosine ~0.7 within a cluster: closer to real CLAP or
SigLIP embeddings, where similar sounds sit together). Queries are new vectors of the same kind.

For each engine: build time (training on a sample, adding all rows, writing to disk), size on disk, single-
query top-10 latency p50/p95, and recall@10 against exact search (NumPy-exact ids from one matrix product
over all rows). Exact search is timed as ``AudioIndex`` scores: one ``torch.mv`` over the rows, partial top-k.
The FAISS rows go through ``mmdemo.models.vector_index`` (what the library uses past the threshold: IVF-Flat,
memory-mapped, the lists probed swept around its default). LanceDB is called directly, with as many partitions
and probes: IVF_FLAT at every size, and IVF_PQ (8 dimensions per sub-vector, full-precision re-rank of 10 x k
candidates) up to 100,000 rows, its training being too slow for 1M rows on 2 cores. LanceDB's size on disk
includes its own copy of the rows (its table); FAISS's is the index file beside ``embeddings.npy``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import environment, percentile, write_section

DIM = 512
K = 10
CHUNK = 50_000
PQ_MAX_ROWS = 100_000  # LanceDB IVF_PQ is built up to this many rows only


def make_rows(kind: str, n: int, seed: int, centres: np.ndarray | None = None) -> np.ndarray:
    """``n`` unit rows of ``kind``, generated chunk by chunk (no float64 copy of the whole matrix)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, DIM), np.float32)
    for start in range(0, n, CHUNK):
        stop = min(n, start + CHUNK)
        block = rng.standard_normal((stop - start, DIM), dtype=np.float32)
        if kind == "clustered":
            block *= 0.65 / np.sqrt(DIM)  # noise of norm ~0.65 around a unit centre: cosine ~0.7 in a cluster
            block += centres[rng.integers(0, len(centres), stop - start)]
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start:stop] = block
    return out


def exact_ids(rows: np.ndarray, queries: np.ndarray, k: int = K) -> np.ndarray:
    """The true top-k ids of each query (one matrix product per chunk of rows)."""
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    for start in range(0, len(rows), 200_000):
        s = queries @ rows[start:start + 200_000].T
        i = np.argpartition(-s, k - 1, axis=1)[:, :k]
        best_s = np.concatenate([best_s, np.take_along_axis(s, i, 1)], 1)
        best_i = np.concatenate([best_i, i + start], 1)
        keep = np.argsort(-best_s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(best_s, keep, 1), np.take_along_axis(best_i, keep, 1)
    return best_i


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def timed_queries(search, queries: np.ndarray, truth: np.ndarray) -> tuple[list[float], float]:
    for q in queries[:3]:  # warm-up
        search(q)
    times, recall = [], []
    for q, t in zip(queries, truth):
        t0 = time.perf_counter()
        ids = search(q)
        times.append(time.perf_counter() - t0)
        recall.append(len(set(np.asarray(ids).tolist()) & set(t.tolist())) / K)
    return times, float(np.mean(recall))


def bench_exact(rows: np.ndarray, queries, truth) -> dict:
    import torch

    from mmdemo.models.retrieval import _top_k

    table = torch.from_numpy(rows)

    def search(q):
        return _top_k(torch.mv(table, torch.from_numpy(q)).numpy(), K)

    times, recall = timed_queries(search, queries, truth)
    return {"engine": "exact (torch.mv + partial top-k, in RAM)", "setting": "-", "build_s": 0.0,
            "disk_bytes": rows.nbytes, "times": times, "recall": recall}


def bench_faiss(rows: np.ndarray, queries, truth, tmp: Path, quick: bool) -> list[dict]:
    from mmdemo.models.vector_index import VectorIndex

    folder = tmp / "faiss"
    folder.mkdir()
    np.save(folder / "embeddings.npy", rows)
    t0 = time.perf_counter()
    index = VectorIndex.build(folder, rows)
    build = time.perf_counter() - t0
    index = VectorIndex.open(folder, len(rows))  # from disk, as the library opens it (memory-mapped lists)
    size = folder_size(folder) - (folder / "embeddings.npy").stat().st_size
    out = []
    probes = sorted({p for p in (4, 16, 64, index.nprobe, index.nlist // 4, index.nlist // 2) if 0 < p <= index.nlist})
    if quick:
        probes = [index.nprobe]
    for nprobe in probes:
        times, recall = timed_queries(lambda q, n=nprobe: index.search(q, K, nprobe=n)[0], queries, truth)
        default = " (default)" if nprobe == index.nprobe else ""
        out.append({"engine": f"FAISS IndexIVFFlat, inner product, nlist {index.nlist}, mmap",
                    "setting": f"nprobe {nprobe}{default}", "build_s": build, "disk_bytes": size,
                    "times": times, "recall": recall})
    return out


def bench_lancedb(rows: np.ndarray, queries, truth, tmp: Path, quick: bool) -> list[dict]:
    os.environ.setdefault("LANCE_LOG", "error")  # else one deprecation line per query
    try:
        import lancedb
        import pyarrow as pa
    except ImportError:
        print("lancedb is not installed (pip install lancedb): no LanceDB rows", file=sys.stderr)
        return []
    folder = tmp / "lancedb"
    t0 = time.perf_counter()
    db = lancedb.connect(str(folder))
    table = None
    for start in range(0, len(rows), 200_000):
        block = rows[start:start + 200_000]
        data = pa.table({"id": pa.array(np.arange(start, start + len(block)), pa.int64()),
                         "vector": pa.FixedSizeListArray.from_arrays(pa.array(block.reshape(-1)), DIM)})
        if table is None:
            table = db.create_table("rows", data=data)
        else:
            table.add(data)
    write = time.perf_counter() - t0
    from mmdemo.models.vector_index import lists_for, probes_for

    partitions = lists_for(len(rows))  # as many lists as the FAISS index, so the two compare probe for probe
    probes = probes_for(partitions)
    kinds = [("IVF_FLAT", {}, [(probes, 1)] if quick else [(probes, 1), (probes * 4, 1)])]
    if len(rows) <= PQ_MAX_ROWS:  # PQ training is slow on 2 cores: IVF_PQ up to 100,000 rows only
        kinds.append(("IVF_PQ", {"num_sub_vectors": DIM // 8}, [(probes, 10)] if quick else [(probes, 10),
                                                                                            (probes * 4, 10)]))
    out = []
    for index_type, extra, settings in kinds:
        t0 = time.perf_counter()
        # 10 k-means iterations, as the FAISS index trains with (LanceDB's default 50 took minutes for PQ here)
        table.create_index(metric="dot", num_partitions=partitions, index_type=index_type, replace=True,
                           max_iterations=10, **extra)
        build = write + time.perf_counter() - t0
        size = folder_size(folder)
        for nprobes, refine in settings:
            def search(q, n=nprobes, r=refine):
                query = table.search(q).distance_type("dot").nprobes(n).limit(K).select(["id"])
                return (query.refine_factor(r) if r > 1 else query).to_arrow()["id"].to_numpy()

            times, recall = timed_queries(search, queries, truth)
            detail = f", {DIM // 8} sub-vectors" if index_type == "IVF_PQ" else ""
            out.append({"engine": f"LanceDB {index_type}, dot, {partitions} partitions{detail}",
                        "setting": f"nprobes {nprobes}" + (f", refine x{refine}" if refine > 1 else ""),
                        "build_s": build, "disk_bytes": size, "times": times, "recall": recall})
    return out


def run_size(n: int, kind: str, queries_n: int, engines: list[str], quick: bool) -> list[dict]:
    centres = None
    if kind == "clustered":
        centres = make_rows("random", max(1, n // 200), seed=7)
    t0 = time.perf_counter()
    rows = make_rows(kind, n, seed=1, centres=centres)
    queries = make_rows(kind, queries_n, seed=2, centres=centres)
    truth = exact_ids(rows, queries)
    print(f"{kind} {n:,}: rows and ground truth in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    results = [bench_exact(rows, queries, truth)]
    with tempfile.TemporaryDirectory(dir=os.environ.get("MMDEMO_BENCH_CACHE")) as tmp:
        if "faiss" in engines:
            results += bench_faiss(rows, queries, truth, Path(tmp), quick)
        if "lancedb" in engines:
            results += bench_lancedb(rows, queries, truth, Path(tmp), quick)
        shutil.rmtree(tmp, ignore_errors=True)
    for r in results:
        r.update(rows=n, kind=kind)
        print(f"  {r['engine']} [{r['setting']}]: recall@10 {r['recall']:.3f}, "
              f"p50 {percentile(r['times'], 50) * 1000:.2f} ms, build {r['build_s']:.1f} s", file=sys.stderr)
    return results


def table(results: list[dict]) -> list[str]:
    lines = ["| rows | data | engine | setting | build | on disk | p50 | p95 | recall@10 | p50 vs exact |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    exact = {(r["rows"], r["kind"]): percentile(r["times"], 50) for r in results if r["setting"] == "-"}
    for r in results:
        p50, p95 = percentile(r["times"], 50), percentile(r["times"], 95)
        build = "-" if r["setting"] == "-" else f"{r['build_s']:.1f} s"
        lines.append(f"| {r['rows']:,} | {r['kind']} | {r['engine']} | {r['setting']} | {build} | "
                     f"{r['disk_bytes'] / 2**20:,.0f} MiB | {p50 * 1000:.2f} ms | {p95 * 1000:.2f} ms | "
                     f"{r['recall']:.3f} | {exact[(r['rows'], r['kind'])] / p50:.1f}x faster |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="20,000 rows, few queries: a smoke run")
    p.add_argument("--rows", default=None, help="comma-separated row counts (default 100000,1000000)")
    p.add_argument("--kinds", default="random,clustered")
    p.add_argument("--engines", default=None, help="faiss,lancedb (default; --quick: faiss)")
    p.add_argument("--queries", type=int, default=None)
    p.add_argument("--write", action="store_true")
    args = p.parse_args(argv)
    load_start = os.getloadavg()[0]
    sizes = [int(s) for s in args.rows.split(",")] if args.rows else ([20_000] if args.quick else [100_000, 1_000_000])
    queries_n = args.queries or (20 if args.quick else 200)
    engines = (args.engines or ("faiss" if args.quick else "faiss,lancedb")).split(",")
    results = []
    for n in sizes:
        for kind in args.kinds.split(","):
            results += run_size(n, kind, queries_n, engines, args.quick)

    import faiss

    cmd = "python bench/vector_index.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    env = environment("cpu") | {"faiss": faiss.__version__, "load average (1 min) at start": round(load_start, 2),
                                "at end": round(os.getloadavg()[0], 2)}
    try:
        import lancedb

        env["lancedb"] = lancedb.__version__
    except ImportError:
        pass
    name = "vector index" + (" (quick smoke)" if args.quick else "")
    lines = [f"## {name}", "", f"Command: `{cmd}`", "",
             "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), "",
             f"Single-query top-{K} over 512-d unit rows; recall@10 against exact search; {queries_n} queries.", "",
             *table(results)]
    section = "\n".join(lines) + "\n"
    print(section)
    record = [{k: v for k, v in r.items() if k != "times"} | {"p50_s": percentile(r["times"], 50),
                                                               "p95_s": percentile(r["times"], 95)}
              for r in results]
    print(json.dumps({"bench": name, "env": env, "rows": record}))
    if args.write:
        write_section(name, section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
