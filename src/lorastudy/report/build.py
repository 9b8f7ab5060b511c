"""ANALYSIS_REPORT.md (and .html with the figures embedded), generated from the artifacts only.

Every number in the report comes from a JSON artifact through ``collect`` and the template; nothing is typed by
hand. The configuration is the one recorded with the results (``config.yaml``, hash from ``manifest.json``), not one
re-resolved from the command line, and the data is shown by its identity (``manifest.json`` "data"), never by a
path, so the report reads the same wherever the results directory lies. ``check_report`` re-reads the artifacts,
renders both files again and fails on any line of either that differs (a tampered or stale number)."""

from __future__ import annotations

import base64
import difflib
import math
import re
from pathlib import Path

import jinja2
import numpy as np

from lorastudy import store
from lorastudy.config import StudyConfig, load_config
from lorastudy.report import evidence
from lorastudy.serving.analysis import graph_weights_only

REPORT = "ANALYSIS_REPORT.md"
# The operator's notes: what no artifact holds (the conditions a phase ran under, a neighbour on the host), written
# by hand into the results dir and quoted as written in their own, labelled section; `--check` compares the section
# with the file's current text, so a stale report is caught, but it cannot vouch for what the notes say.
NOTES = "NOTES.md"


class ReportCheckError(RuntimeError):
    pass


def _read(path: Path):
    return store.read_json(path) if path.is_file() else None


def _ms(values) -> dict:
    v = np.asarray(values, float)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": len(v)} if len(v) \
        else None


def recorded_config(out: Path, fallback: StudyConfig | None = None) -> StudyConfig:
    """The configuration recorded with the results in ``out`` (``out/config.yaml``, written by ``run`` and every
    phase command), with ``output_dir`` pointing at ``out`` (the directory may have moved). Without a recorded
    config: ``fallback`` (a results directory no phase has written to yet).

    Raises ``StoreError`` when there is neither, ``ConfigError`` when the recorded file is not a valid config."""
    path = Path(out) / "config.yaml"
    if not path.is_file():
        if fallback is not None:
            return fallback
        raise store.StoreError(f"{out}: no config.yaml; not a results directory (run `lorastudy run` first)")
    rec = load_config(path)
    return rec.model_copy(update={"output_dir": str(out).replace("{", "{{").replace("}", "}}")})


def data_identity(man: dict, cfg: StudyConfig, runs: list[dict]) -> dict:
    """Per task: where the data came from (kind, not path), rows per split, file checksums.

    From ``manifest.json`` "data" (``lorastudy.data.data_identity``: per task the source kind, the files with
    their sha256 and the rows per split) when the results recorded it; otherwise the kind from the recorded config
    and the split sizes the phase-2 runs recorded, with ``recorded: False``."""
    rec = man.get("data") if isinstance(man.get("data"), dict) else None
    tasks = {}
    for t in cfg.tasks:
        d = (rec or {}).get(t) if isinstance((rec or {}).get(t), dict) else None
        if d is not None:
            files = d.get("files") or []
            if isinstance(files, dict):
                files = [{"name": (v or {}).get("name", k) if isinstance(v, dict) else k,
                          "sha256": v if isinstance(v, str) else (v or {}).get("sha256")}
                         for k, v in files.items()]
            named = []
            for f in files:
                if isinstance(f, dict):
                    name = f.get("name") or f.get("file") or f.get("path") or "?"
                    named.append({"name": Path(str(name)).name, "sha256": f.get("sha256")})
            rows = d.get("rows") or d.get("row_counts") or {}
            kind = d.get("source") or d.get("kind") or d.get("source_kind")
            tasks[t] = {"kind": str(kind) if kind is not None else "n/a", "files": named,
                        "rows": {k: v for k, v in rows.items()} if isinstance(rows, dict) else {}}
        else:
            mt = next((r for r in runs if r["task"] == t and not r.get("failed")), None)
            rows = {} if mt is None else {k: mt[f"n_{k}"] for k in ("train", "validation", "test")
                                          if mt.get(f"n_{k}") is not None}
            tasks[t] = {"kind": _source_kind(cfg.data.source), "files": [], "rows": rows}
    return {"recorded": rec is not None, "tasks": tasks}


def _source_kind(source: str) -> str:
    return "Hugging Face hub (nyu-mll/glue)" if source == "hub" else "a local GLUE directory"


def phase2_runs(cfg) -> list[dict]:
    """Every phase-2 run of ``cfg`` (tasks x methods x seeds, in that order) that is complete (its metrics) or
    failed (``failed``: True and its error); a run that is neither is left out. A complete run is read first: a
    FAILED.json beside it is a failed retry (``train --force``), and the complete run is what the statistics use.
    Raises store.StoreError for a run whose artifacts do not match its COMPLETE marker."""
    out = cfg.out
    runs = []
    for t in cfg.tasks:
        prim = cfg.task(t).primary
        for m in cfg.methods:
            for s in cfg.seeds:
                rd = store.run_dir(out, t, m, s)
                failed = store.failed_marker(rd)
                if store.check_not_damaged(rd, "`lorastudy run CONFIG --only train` (or `train-all`)"):
                    mt = store.read_json(rd / "metrics.json")
                    test = {k: v for k, v in mt["test"].items() if k != "loss"}  # the task's declared metrics
                    runs.append({"task": t, "method": m, "seed": s, "test_accuracy": test.get("accuracy"),
                                 "test_metrics": test, "primary": prim, "test_primary": test.get(prim),
                                 "val_primary": mt["validation"].get(prim),
                                 "collapsed": mt["collapsed"],
                                 **{f"n_{k}": mt.get(f"n_{k}") for k in ("train", "validation", "test")},
                                 "majority": mt.get("majority_baseline", {}).get(prim, mt["majority_accuracy"]),
                                 "best_step": mt["best_step"], "steps": mt["steps"],
                                 "train_time_s": mt["train_time_s"], "trainable_params": mt["trainable_params"],
                                 "hparams": mt["hparams"], "failed": False,
                                 "device": mt.get("device_name") or mt.get("device"),
                                 "step_mode": mt.get("step_mode"), "step_levers": mt.get("step_levers") or []})
                elif failed.is_file():
                    runs.append({"task": t, "method": m, "seed": s, "failed": True,
                                 "error": store.read_json(failed).get("error")})
    return runs


def collect(cfg) -> dict:
    """Everything the report shows, read from the artifacts in ``cfg.out`` with the config recorded there."""
    cfg = recorded_config(cfg.out, fallback=cfg)
    out = cfg.out
    man = _read(out / "manifest.json") or {}
    ctx: dict = {"cfg": cfg.resolved(), "name": cfg.name, "config_hash": man.get("config_hash", cfg.hash()),
                 "tasks": cfg.tasks, "methods": cfg.methods, "seeds": cfg.seeds}
    ctx["code"] = man.get("code", store.code_version())
    ctx["notes"] = operator_notes(out)
    ctx["shards"] = man.get("shards")  # a dir merged from task shards (lorastudy.merge): their provenance
    ctx["sanity"] = (_read(out / "phase0" / "sanity.json") or {}).get("results")
    ctx["baselines"] = (_read(out / "phase0" / "baselines.json") or {}).get("results")
    ctx["tuning"] = _read(out / "phase1" / "summary.json")
    runs = phase2_runs(cfg)
    acc = {}
    for t in cfg.tasks:
        prim = cfg.task(t).primary
        for m in cfg.methods:
            vals: dict[str, list] = {}
            for r in runs:
                if r["task"] == t and r["method"] == m and not r["failed"]:
                    for k, v in r["test_metrics"].items():
                        vals.setdefault(k, []).append(v)
            ordered = [prim, *(k for k in vals if k != prim)] if prim in vals else list(vals)
            acc[(t, m)] = {"accuracy": _ms(vals.get("accuracy", [])), "primary": prim,
                           "metrics": {k: _ms(vals[k]) for k in ordered}, "n": len(vals.get(prim, []))}
    ctx["runs"] = runs
    ctx["collapsed"] = [r for r in runs if r.get("collapsed")]
    ctx["failed_runs"] = [r for r in runs if r.get("failed")]
    ctx["acc"] = {f"{t}/{m}": v for (t, m), v in acc.items()}
    ctx["drift"] = _read(out / "phase4" / "drift" / "drift_analysis_results.json")
    ctx["hyp"] = _read(out / "phase4" / "drift" / "hypothesis_test_results.json")
    ctx["serve"] = _read(out / "phase4" / "deployment" / "benchmark_results.json")
    ctx["overhead"] = _read(out / "phase4" / "deployment" / "overhead_analysis.json")
    ctx["figures"] = {p.stem: str(p.relative_to(out)) for p in sorted(out.glob("phase4/*/*.png"))}
    ctx["real_model"] = cfg.model.source
    ctx["paper_model"] = "TinyLlama/TinyLlama_v1.1"
    ctx["data"] = data_identity(man, cfg, runs)
    ctx["limits"] = {"train": cfg.data.train_limit, "test": cfg.data.test_limit}
    ctx["serve_best"] = _serve_summary(ctx["serve"], ctx["overhead"])
    ctx["ev"] = evidence.assess(cfg, runs, ctx["drift"], ctx["hyp"], ctx["overhead"])
    ctx["serve_archs"] = _serve_archs(cfg, ctx["ev"]["smoke"])
    # tasks of the config that the drift statistics do not cover (not extracted yet, or in no shard of a merge):
    # the pooled H1b is over the others only, which the summary must say
    ctx["tasks_without_drift"] = ([t for t in cfg.tasks if t not in ctx["hyp"]["H1b"]["per_task"]]
                                  if ctx["hyp"] else [])
    ctx["tuning_failed"] = _failed_trials(out, ctx["tuning"])
    ctx["prior"] = PRIOR_CLAIMS
    ctx["wall"] = wall_times(out, ctx["shards"])
    # the step path and levers of each run (the config hash leaves them out: phases and shards may differ)
    ctx["run_devices"] = sorted({f"{r['device']} ({r['step_mode']}"
                                 + (f", levers {'+'.join(r['step_levers'])}" if r["step_levers"] else "") + ")"
                                 for r in runs if not r["failed"] and r.get("device")})
    # what "N adapters" means at each batch size (the overhead tables' "mixing" column says it per condition)
    ctx["mixing_words"] = ("mixed within a batch where the batch holds them all, served in rotation at smaller "
                           "batch sizes")
    ctx["tuning_subsets"] = {t: n for t, n in cfg.search.train_subset.items() if t in cfg.tasks}
    ctx["test_split_words"] = ("the GLUE validation split (GLUE's test labels are not public); validation is a "
                               "seeded, stratified carve-out of GLUE train.")
    ctx["tasks_in_no_shard"] = ([t for t in cfg.tasks if not any(t in sh.get("tasks", []) for sh in ctx["shards"])]
                                if ctx["shards"] else [])
    return ctx


# What the study plan reports from its prior implementation (TinyLlama-1.1B; quoted in the reference-study issue):
# drift reduction 1 - D_LoRA/D_full per task, and LoRA minus full FT test accuracy. Its report contradicted its
# own CSV files and averaged representations over padding, so these are claims to compare with, not evidence.
PRIOR_CLAIMS = {"drift_reduction": {"sst2": 0.286, "mrpc": 0.016, "rte": 0.001}, "accuracy_points": (-5.0, -1.0)}


NOTES_MAX_BYTES = 64 * 1024  # notes qualify a study; a file larger than this is a mistake (a log pasted in)


def operator_notes(out: Path) -> str | None:
    """The text of ``out/NOTES.md`` as the report shows it, or None when there is no such file or it is blank.

    The notes are Markdown written by hand; they are quoted (every line prefixed with ``> ``), so a heading, an
    unclosed code fence or an HTML comment in them stays inside the labelled section instead of reshaping the
    report (an HTML block ends with the quote); the HTML report renders no raw HTML at all (``_html``). Read as
    UTF-8 (a byte-order mark is dropped); blank lines around the text are removed, the first line's indentation
    kept.

    Raises ``store.StoreError`` (exit 2, naming the file) when NOTES.md is not a regular file (a directory, a
    dangling link), is larger than ``NOTES_MAX_BYTES``, or is not UTF-8."""
    p = Path(out) / NOTES
    if not p.exists() and not p.is_symlink():
        return None
    if not p.is_file():
        raise store.StoreError(f"{p}: the operator's notes must be a Markdown file (this is "
                               f"{'a dangling link' if p.is_symlink() else 'a directory or special file'})")
    size = p.stat().st_size
    if size > NOTES_MAX_BYTES:
        raise store.StoreError(f"{p}: {size:,} bytes; the operator's notes are at most {NOTES_MAX_BYTES:,} bytes "
                               "(say what no artifact records; point to logs, do not paste them)")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise store.StoreError(f"{p}: the operator's notes must be UTF-8 Markdown ({e})") from e
    lines = text.replace("\r\n", "\n").split("\n")
    while lines and not lines[0].strip():
        lines.pop(0)
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        return None
    return "\n".join(f"> {ln}" if ln.strip() else ">" for ln in lines)


def _failed_trials(out: Path, tuning: dict | None) -> dict:
    """Per ``task/method``: failed tuning trials in its trials table (replaced by others; not in the count of
    complete ones) and how many of them diverged (non-finite loss)."""
    res = {}
    for st in (tuning or {}).get("studies", []):
        rows = (_read(out / "phase1" / f"{st['task']}_{st['method']}" / "trials.json") or {}).get("trials", [])
        bad = [r for r in rows if r.get("state") == "FAIL"]
        res[f"{st['task']}/{st['method']}"] = {"n": len(bad),
                                               "diverged": sum("non-finite" in str(r.get("error", "")) for r in bad)}
    return res


def wall_times(out: Path, shards: list[dict] | None) -> dict:
    """Wall time per phase: ``{"columns": [source, ...], "rows": [(phase, ["532.6" | "–", ...])]}`` (seconds) from
    the results dir's ``run_summary.json`` (the passes that did the work) and, in a dir merged from shards, each
    shard's phases as recorded by ``merge-shards``. Empty rows when none was recorded."""
    from lorastudy.pipeline import PHASES

    cols: dict[str, dict] = {}
    for sh in shards or []:
        cols[str(sh.get("dir"))] = sh.get("phases_seconds") or {}
    own = (_read(out / "run_summary.json") or {}).get("phases") or {}
    own = {k: v.get("seconds") for k, v in own.items() if isinstance(v, dict)}
    if own:
        cols["this dir" if shards else "run"] = own
    # (not the report's own phase: a report cannot contain the time it took to write it)
    rows = [(ph, ["–" if c.get(ph) is None else f"{c[ph]:.1f}" for c in cols.values()]) for ph in PHASES
            if ph != "report" and any(c.get(ph) is not None for c in cols.values())]
    return {"columns": list(cols), "rows": rows}


def _serve_archs(cfg, smoke: list[str]) -> list[dict]:
    """Per random-weight architecture served as its own part with a finished result
    (``phase4/deployment/<arch>/benchmark_results.json``, in ``serve.archs`` order, then any other found there, e.g.
    copied in from another machine): ``{"arch", "serve", "overhead", "summary", "verdict", "figures": {stem: path
    relative to the results dir}}``; ``verdict`` is H2's decision as the report shows it (a smoke-run outcome in a
    smoke-size study)."""
    from lorastudy.report.evidence import _verdict

    root = cfg.out / "phase4" / "deployment"
    found = sorted(p.parent.name for p in root.glob("*/benchmark_results.json"))
    res = []
    for a in dict.fromkeys([*cfg.serve.archs, *found]):
        d = root / a
        serve, ov = _read(d / "benchmark_results.json"), _read(d / "overhead_analysis.json")
        if serve and ov and serve.get("synthetic_arch") == a:
            res.append({"arch": a, "serve": serve, "overhead": ov, "summary": _serve_summary(serve, ov),
                        "verdict": _verdict(ov["H2"]["decision"], {}, smoke) if ov["H2"]["decision"] else None,
                        "figures": {p.stem: str(p.relative_to(cfg.out)) for p in sorted(d.glob("*.png"))}})
    return res


def _serve_summary(serve, ov) -> dict | None:
    """What the executive summary says of a serving result: ``n_adapters`` (the most mixed), per engine the range of
    its overhead over merged at that count across batch sizes (``engines``), vLLM against ``batched``
    (``vllm_vs_batched``: min/max of vllm's mean latency over batched's - 1) and peak memory of ``merged`` (one
    model per adapter) and ``batched`` at the largest batch with every adapter (``memory``: bytes, weights and
    activations as the result's ``memory_kind`` says); None without a result."""
    if not serve or not ov:
        return None
    rows = ov["rows"]
    nmax = max((r["n_adapters"] for r in rows), default=1)
    pick = {}
    for e in sorted({r["engine"] for r in rows}):
        rs = [r for r in rows if r["engine"] == e and r["n_adapters"] == nmax]
        if rs:
            pick[e] = {"max_overhead": max(r["overhead"] for r in rs), "min_overhead": min(r["overhead"] for r in rs)}
    vs = [r["vllm_over_batched"] for r in ov.get("vllm_vs_batched") or []]
    recs = serve.get("records") or []
    bmax = max((r["batch_size"] for r in recs), default=None)
    # (each at the largest batch, in its condition with the most adapters: the row the bullet names)
    mem = {}
    for e in ("merged", "batched"):
        rs = [r for r in recs if r["engine"] == e and r["batch_size"] == bmax]
        mem[e] = max(rs, key=lambda r: r["n_adapters"]).get("peak_memory_bytes") if rs else None
    kind = serve.get("memory_kind")
    if kind and {"merged", "batched"} <= set(graph_weights_only(serve)):
        kind = "weights only: their CUDA graphs' memory pool, reserved at capture, is not counted"
    return {"n_adapters": nmax, "engines": pick,
            "vllm_vs_batched": {"min": min(vs), "max": max(vs)} if vs else None,
            "memory": {"batch_size": bmax, **mem, "kind": kind} if None not in mem.values() else None}


# -- formatting filters ----------------------------------------------------------------------------------------------
def f3(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def pct(x, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{100 * x:.{digits}f}%"


def pval(p) -> str:
    if p is None or (isinstance(p, float) and not math.isfinite(p)):
        return "n/a"
    return f"{p:.2e}" if p < 1e-3 else f"{p:.3f}"


def mib(b) -> str:
    return "n/a" if b is None else f"{b / 2**20:.1f}"


def _sizes(words: str, sizes) -> str:
    sizes = sorted(sizes)
    return f"{words} {'size' if len(sizes) == 1 else 'sizes'} {', '.join(str(b) for b in sizes)}"


def _and(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def resumed_words(serve: dict) -> str:
    """The sentence saying which conditions of a serving result an earlier, interrupted pass timed (its
    ``resumed_batch_sizes`` and ``resumed_traffic_batch_sizes``) and which the pass that finished did; empty when
    none was resumed."""
    rb = set(serve.get("resumed_batch_sizes") or [])
    rt = set(serve.get("resumed_traffic_batch_sizes") or [])
    if not rb and not rt:
        return ""
    all_b = {r["batch_size"] for r in serve.get("records", [])}
    all_t = {m["batch_size"] for m in serve.get("mixed_traffic") or []}
    earlier = ([_sizes("Batch", rb)] if rb else []) + ([_sizes("the mixed-traffic scenarios at batch", rt)] if rt
                                                        else [])
    earlier[0] = earlier[0][0].upper() + earlier[0][1:]
    later = ([_sizes("batch", all_b - rb)] if all_b - rb else []) \
        + ([_sizes("the mixed-traffic scenarios at batch", all_t - rt)] if all_t - rt else []) + ["parity"]
    one = len(rb) == 1 and not rt  # ("the mixed-traffic scenarios" are plural)
    where = "GPU model" if serve.get("gpu") else "machine"
    return (f"{_and(earlier)} {'was' if one else 'were'} timed by an earlier, interrupted pass of the benchmark (same "
            f"settings, adapters, recorded code version and {where}), in another process; {_and(later)} by the pass "
            "that finished.")


def _arch_part(a: dict) -> dict:
    """A serve.archs part as the statistical summary lists it: its label and its overhead analysis."""
    return {"label": f" (`{a['arch']}`)", "ov": a["overhead"]}


def template(name: str = "report.md.j2") -> jinja2.Template:
    """One of the report's Jinja templates (``serving.md.j2``: its macros are ``template(...).module.<name>``)."""
    env = jinja2.Environment(loader=jinja2.PackageLoader("lorastudy", "report/templates"),
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                             keep_trailing_newline=True)
    env.filters.update(f3=f3, pct=pct, pval=pval, mib=mib, graph_weights_only=graph_weights_only,
                       arch_part=_arch_part, resumed_words=resumed_words)
    return env.get_template(name)


def render(cfg) -> str:
    return template().render(**collect(cfg))


def _html(md_text: str, root: Path) -> str:
    import markdown

    md = markdown.Markdown(extensions=["tables", "fenced_code"])
    # no raw HTML: the report's own text has none, and the operator's notes must not bring any (a script, a
    # comment that hides what follows); it is shown as text instead. Nor javascript: links.
    md.preprocessors.deregister("html_block")
    md.inlinePatterns.deregister("html")
    body = re.sub(r'href="\s*javascript:[^"]*"', 'href="#"', md.convert(md_text), flags=re.I)

    def embed(m):
        src = m.group(1)
        p = (root / src).resolve()
        # only the results dir's own figures: a path in the notes must not pull other files into the HTML
        if p.is_file() and root.resolve() in p.parents:
            return f'src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}"'
        return m.group(0)

    body = re.sub(r'src="([^"]+\.png)"', embed, body)
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;line-height:1.45}"
             "table{border-collapse:collapse;font-size:0.9em}td,th{border:1px solid #ccc;padding:3px 7px}"
             "img{max-width:100%}code{background:#f4f4f4}"
             "blockquote{border-left:4px solid #c0392b;background:#fdf2f2;margin:1em 0;padding:0.2em 1em}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>lorastudy report</title><style>{style}</style>" \
           f"</head><body>{body}</body></html>\n"


def build_report(cfg) -> Path:
    """Write ``ANALYSIS_REPORT.md`` and ``ANALYSIS_REPORT.html`` (figures embedded) into ``cfg.out``; returns the
    Markdown path."""
    text = render(cfg)
    path = cfg.out / REPORT
    store.atomic_write_text(path, text)
    store.atomic_write_text(path.with_suffix(".html"), _html(text, cfg.out))
    return path


def _clip(line: str, width: int = 160) -> str:
    # HTML lines carry whole base64 figures: show where they differ, not megabytes
    return line if len(line) <= width else f"{line[:width]}… ({len(line)} characters)"


def check_report(cfg) -> list[str]:
    """Lines of the report files on disk (Markdown and HTML) that disagree with a fresh rendering from the
    artifacts, each prefixed with its file's name; an empty list means both are consistent.

    Raises ``ReportCheckError`` when a report file is missing."""
    path = cfg.out / REPORT
    html = path.with_suffix(".html")
    for p in (path, html):
        if not p.is_file():
            raise ReportCheckError(f"{p} does not exist; run `lorastudy report` first")
    want_md = render(cfg)
    bad = []
    for p, want in ((path, want_md), (html, _html(want_md, cfg.out))):
        have = p.read_text().splitlines()
        for line in difflib.unified_diff(want.splitlines(), have, "from artifacts", p.name, lineterm="", n=0):
            if line.startswith(("+", "-")) and not line.startswith(("+++", "---")):
                bad.append(f"{p.name}: {_clip(line)}")
    return bad
