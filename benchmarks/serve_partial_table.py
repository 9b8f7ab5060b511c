"""The batch sizes a serving part has timed so far (``phase4/deployment[/<arch>]/partial/b<B>.json``, written by
``serving.benchmark`` after each batch size), as one table: per batch size the mean latency per call of merged (one
adapter) against batched, and of merged-vllm against vllm with every adapter mixed, plus the eager rows and peak
memory. For reading an interrupted pass; the finished pass's overhead CIs and H2 are in its
``overhead_analysis.json`` and the report.

    python benchmarks/serve_partial_table.py PARTIAL_DIR [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def table(partial: Path) -> list[dict]:
    """One row per batch size: mean latency (ms) per engine at the adapter count the H2 comparison uses (merged
    variants with one adapter, the others with every adapter mixed), overheads, peak memory (MiB)."""
    recs = [r for f in sorted(partial.glob("b*.json")) for r in json.loads(f.read_text())["records"]]
    if not recs:
        raise SystemExit(f"{partial}: no b<B>.json files")
    n = max(r["n_adapters"] for r in recs)
    out = []
    for b in sorted({r["batch_size"] for r in recs}):
        def ms(engine: str, k: int, b=b) -> float | None:
            r = next((r for r in recs if r["batch_size"] == b and r["engine"] == engine and r["n_adapters"] == k), None)
            return None if r is None else r["latency_ms"]["mean"]

        def mib(engine: str, k: int, b=b) -> float | None:
            r = next((r for r in recs if r["batch_size"] == b and r["engine"] == engine and r["n_adapters"] == k), None)
            return None if r is None or r["peak_memory_bytes"] is None else r["peak_memory_bytes"] / 2**20

        row = {"batch_size": b, "n_adapters": n, "merged_ms": ms("merged", 1), "batched_ms": ms("batched", n),
               "merged_eager_ms": ms("merged-eager", 1), "batched_eager_ms": ms("batched-eager", n),
               "peft_ms": ms("peft", n), "merged_vllm_ms": ms("merged-vllm", 1), "vllm_ms": ms("vllm", n),
               "merged_peak_mib": mib("merged", 1), "batched_peak_mib": mib("batched", n)}
        for key, num, den in (("batched_overhead", "batched_ms", "merged_ms"),
                              ("vllm_overhead", "vllm_ms", "merged_vllm_ms")):
            row[key] = None if row[num] is None or row[den] is None else row[num] / row[den] - 1
        out.append(row)
    return out


def markdown(rows: list[dict], label: str = "batch") -> list[str]:
    """``table``'s rows as Markdown lines (mean ms per call; ``label`` heads the first column)."""
    f = lambda x, spec=".2f": "-" if x is None else format(x, spec)  # noqa: E731
    out = [f"| {label} | merged | batched (all {rows[0]['n_adapters']}) | overhead | merged-eager | batched-eager | "
           "peft | merged-vllm | vllm | vLLM overhead | peak MiB merged / batched |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['batch_size']} | {f(r['merged_ms'])} | {f(r['batched_ms'])} | "
                   f"{f(r['batched_overhead'], '.1%')} | {f(r['merged_eager_ms'])} | {f(r['batched_eager_ms'])} | "
                   f"{f(r['peft_ms'])} | {f(r['merged_vllm_ms'])} | {f(r['vllm_ms'])} | "
                   f"{f(r['vllm_overhead'], '.1%')} | {f(r['merged_peak_mib'], '.0f')} / "
                   f"{f(r['batched_peak_mib'], '.0f')} |")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("partial", type=Path)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    rows = table(a.partial)
    print("\n".join(markdown(rows)))
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
