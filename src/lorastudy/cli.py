"""The ``lorastudy`` command. Every subcommand takes the config file and ``--set key=value`` overrides."""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import rich.markup
import typer
from rich.console import Console
from rich.table import Table

from lorastudy.config import ConfigError, StudyConfig, dump_yaml, load_config
from lorastudy.execution import checkpoint_on_signal, default_streams, exit_if_threads_alive
from lorastudy.pipeline import PHASES

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)  # help: main()
config_app = typer.Typer(no_args_is_help=True, help="Inspect study configs.")
app.add_typer(config_app, name="config")
console = Console(stderr=True, soft_wrap=True)

PHASES_HELP = " | ".join(PHASES)
ConfigArg = Annotated[Path, typer.Argument(help="Study config (YAML), e.g. configs/quick.yaml")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override: dotted.key=value (YAML value)")]
DataDirOpt = Annotated[
    Path | None,
    typer.Option("--data-dir", help="Local GLUE directory (<task>/{train,validation}.parquet or TSV); "
                                    "same as data.source=DIR or LORASTUDY_GLUE_DIR"),
]


def _handle_errors(fn):
    """User errors (bad config, bad data, refused results dir) print one clear message and exit 2."""

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        from lorastudy.data import DataError
        from lorastudy.modeling import ModelError
        from lorastudy.store import StoreError

        try:
            return fn(*a, **kw)
        except (ConfigError, DataError, ModelError, StoreError) as e:
            # the message is text, not markup: "[errno 28]" or a path with brackets must print as written
            console.print(f"[bold red]error:[/] {rich.markup.escape(str(e))}", markup=True, highlight=False)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM where a command turns it into one (tune)
            _exit_interrupted()

    return wrapper


def _exit_interrupted() -> None:
    """Exit 130 after an interrupt (at once when run threads are still inside torch calls: see execution)."""
    exit_if_threads_alive(130)
    raise typer.Exit(130)


def _load(config: Path, sets: list[str] | None, data_dir: Path | None = None) -> StudyConfig:
    sets = list(sets or [])
    if data_dir is not None:
        if not data_dir.is_dir():
            raise ConfigError(f"--data-dir {data_dir}: not a directory")
        sets.append(f"data.source={data_dir}")
    return load_config(config, sets)


def _check_levers_here(cfg: StudyConfig) -> None:
    """Training commands: a step lever that needs CUDA (train.step_levers) where the runs would train on the CPU
    through the static or fused step (which apply the levers) is a ConfigError (exit 2) before anything is written,
    not a failure of every run. The eager path (fast_step eager, or auto on a CPU) ignores the levers: no error.
    Likewise fused groups asked for the Triton optimizer pass (train.fuse_optimizer=triton) where it cannot run."""
    from lorastudy.execution import fuse_enabled, resolve_device
    from lorastudy.step_levers import LEVERS

    dev = resolve_device(cfg.train.device)
    if fuse_enabled(cfg) and cfg.train.fuse_optimizer == "triton":
        from lorastudy.fused_step import resolve_optimizer

        try:
            resolve_optimizer("triton", dev)
        except ValueError as e:
            raise ConfigError(f"train.fuse_optimizer=triton: {e} (--set train.fuse_optimizer=auto here)") from None
    if dev.type == "cuda" or not (cfg.train.fast_step in ("static", "cuda_graph") or fuse_enabled(cfg)):
        return
    bad = [n for n in cfg.train.step_levers if LEVERS[n].cuda_only]
    if bad:
        raise ConfigError(f"train.step_levers {bad}: need a CUDA device, and train.device={cfg.train.device!r} is "
                          f"{dev} on this machine (--set train.step_levers=[] here)")


def _setup_logging(verbose: bool = False) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False)], force=True)
    for noisy in ("transformers", "peft", "optuna", "httpx", "urllib3", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log lorastudy's progress at INFO level "
                                               "(libraries stay at errors)")] = False) -> None:
    """lorastudy: LoRA (rank 8) vs full fine-tuning — representation drift (RQ1) and multi-adapter serving (RQ2).

    Every subcommand takes a study config (YAML) and --set key=value overrides; `lorastudy run CONFIG` runs the whole study, resumably."""  # noqa: E501 (rich keeps line breaks)
    _setup_logging(verbose)
    import os
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers/peft deprecation chatter

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


@config_app.command("show")
@_handle_errors
def config_show(config: ConfigArg, set_: SetOpt = None, data_dir: DataDirOpt = None) -> None:
    """Print the resolved config (defaults filled in, overrides applied) and its hash."""
    cfg = _load(config, set_, data_dir)
    digest = cfg.hash()  # reads the data files: an error stops here, before a config is printed as if valid
    typer.echo(dump_yaml(cfg).rstrip())
    typer.echo(f"# config hash: {digest}  output: {cfg.out}")


@app.command("data-stats")
@_handle_errors
def data_stats(config: ConfigArg, set_: SetOpt = None, data_dir: DataDirOpt = None) -> None:
    """Per task and split: rows, label balance, token-length percentiles, rows truncated by max_length; the input
    layout; exact text copies between every pair of splits (and GLUE-train rows kept out of validation as copies)."""
    from lorastudy import data as D
    from lorastudy import modeling as M

    cfg = _load(config, set_, data_dir)
    tok = M.load_tokenizer(cfg.model)
    table = Table(title=f"{cfg.name}: data ({cfg.data_source()}, max_length={cfg.data.max_length}, "
                        f"normalize_text={cfg.data.normalize_text})")
    for col in ["task", "split", "rows", "label balance", "p50", "p90", "p99", "max", "truncated"]:
        table.add_column(col, justify="right" if col not in ("task", "split", "label balance") else "left")
    copies = Table(title="exact text copies between splits (rows of the second split whose text occurs in another "
                         "example of the first)")
    for col in ["task", "input layout", "kept out of validation (repeated in train / in test)",
                *(p.replace("~", " ~ ") for p in _pairs())]:
        copies.add_column(col, justify="left" if col in ("task", "input layout") else "right")
    out = {}
    for task in cfg.tasks:
        spec = cfg.task(task)
        splits = D.splits_for(cfg, task)
        probe = D.probe_set(splits, cfg.data.probe_size)
        for name, df in [*zip(("train", "validation", "test"), (splits.train, splits.validation, splits.test),
                              strict=True), ("probe", probe)]:
            enc = D.encode(tok, df, spec, cfg.data)
            st = D.length_stats(enc, cfg.data.max_length)
            counts = df["label"].value_counts().sort_index()
            bal = " ".join(f"{spec.label_names[i][:8]}={c / len(df):.1%}" for i, c in counts.items())
            st["label_balance"] = {spec.label_names[i]: int(c) for i, c in counts.items()}
            out[f"{task}/{name}"] = st
            table.add_row(task, name, str(st["rows"]), bal, f"{st['tokens_p50']:.0f}", f"{st['tokens_p90']:.0f}",
                          f"{st['tokens_p99']:.0f}", f"{st['tokens_max']:.0f}", str(st["truncated"]))
        ov = D.split_overlaps(splits, probe, spec)
        inputs = D.input_format(tok, cfg.data, spec)
        out[task] = {"inputs": inputs, "kept_in_train": dict(splits.kept_in_train),
                     "overlaps": {k: v["rows"] for k, v in ov.items()}}
        copies.add_row(task, repr(inputs["layout"]),
                       f"{splits.kept_in_train['repeated_in_train']} / {splits.kept_in_train['in_test']}",
                       *(str(ov[p]["rows"]) for p in _pairs()))
    Console(width=200).print(table)
    Console(width=200).print(copies)
    from lorastudy.store import atomic_write_json

    atomic_write_json(cfg.out / "data_stats.json", out)


def _pairs() -> list[str]:
    from lorastudy.data import OVERLAP_SPLITS

    return [f"{a}~{b}" for i, a in enumerate(OVERLAP_SPLITS) for b in OVERLAP_SPLITS[i + 1:]]


def _parse_hp(sets: list[str] | None) -> tuple[list[str], dict]:
    """Split ``--set`` into config overrides and ``hp.NAME=value`` hyperparameter overrides."""
    from lorastudy.config import parse_overrides

    cfg_sets, hp = [], {}
    for item in sets or []:
        if item.startswith("hp."):
            (k, v), = parse_overrides([item[3:]])
            hp[k] = v
        else:
            cfg_sets.append(item)
    return cfg_sets, hp


@app.command()
@_handle_errors
def train(
    config: ConfigArg,
    task: Annotated[str, typer.Option(help="Task name, e.g. sst2")],
    method: Annotated[str, typer.Option(help="full | lora")],
    seed: Annotated[int, typer.Option(min=0, max=2**32 - 1, help="Run seed (initial head, data order, dropout)")] = 42,
    hparams: Annotated[Path | None, typer.Option(help="best.yaml from `tune` (hyperparameters)")] = None,
    out: Annotated[Path | None, typer.Option(help="Run directory (default: results/<study>/phase2/...)")] = None,
    force: Annotated[bool, typer.Option(help="Retrain even if the run is complete")] = False,
    set_: SetOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Train one run (task x method x seed). Hyperparameters: config `train`, then --hparams, then --set hp.X=v."""
    import yaml

    from lorastudy import store
    from lorastudy.training import HParams, TrainingError, run_and_save

    cfg_sets, hp_over = _parse_hp(set_)
    cfg = _load(config, cfg_sets, data_dir)
    _check_levers_here(cfg)
    if task not in cfg.tasks and task not in cfg.custom_tasks:
        raise ConfigError(f"--task {task!r} is not in the config's tasks {cfg.tasks}")
    if method not in ("full", "lora"):
        raise ConfigError(f"--method must be full or lora, got {method!r}")
    over = {}
    if hparams is not None:
        if not hparams.is_file():
            raise ConfigError(f"--hparams {hparams}: file not found")
        over.update((yaml.safe_load(hparams.read_text()) or {}).get("hparams", {}))
    over.update(hp_over)
    hp = HParams.from_config(cfg, method, over)
    run = out or store.run_dir(cfg.out, task, method, seed)
    if store.is_complete(run) and not force:
        console.print(f"{run} is complete; skipping (use --force to retrain)")
        return
    console.print(f"training {task}/{method}/seed{seed} with {hp}")
    try:
        with checkpoint_on_signal():  # SIGTERM/SIGINT: checkpoint at the next step, exit 130; rerun resumes
            m = run_and_save(cfg, task, method, seed, hp, run)
    except TrainingError as e:
        console.print(f"[bold red]run failed:[/] {e}")
        raise typer.Exit(1) from None
    res = {"validation": m["validation"], "test": m["test"], "primary_metric": m["primary_metric"],
           "collapsed": m["collapsed"], "best_step": m["best_step"],
           "steps": m["steps"], "train_time_s": round(m["train_time_s"], 1)}
    typer.echo(json.dumps(res))
    console.print(f"wrote {run}")


@app.command()
@_handle_errors
def sanity(config: ConfigArg, set_: SetOpt = None, data_dir: DataDirOpt = None) -> None:
    """Phase 0: every task x method must overfit a few training examples to loss < target."""
    from lorastudy.sanity import run_sanity

    cfg = _load(config, set_, data_dir)
    res = run_sanity(cfg, progress=console)
    bad = [r for r in res if not r["passed"]]
    for r in res:
        console.print(f"{r['task']}/{r['method']}: {'ok' if r['passed'] else 'FAILED'} — loss {r['final_loss']:.4f} "
                      f"after {r['steps']} steps")
    if bad:
        console.print("[bold red]sanity failed for:[/] " + ", ".join(f"{r['task']}/{r['method']}" for r in bad))
        raise typer.Exit(1)


@app.command()
@_handle_errors
def baselines(config: ConfigArg, set_: SetOpt = None, data_dir: DataDirOpt = None) -> None:
    """Phase 0: majority-class and random baselines on the test split, with bootstrap 95% CIs (JSON)."""
    from lorastudy.baselines import run_baselines

    cfg = _load(config, set_, data_dir)
    res = run_baselines(cfg)
    typer.echo(json.dumps(res, indent=2))


@app.command()
@_handle_errors
def extract(
    config: ConfigArg,
    batch_size: Annotated[int | None, typer.Option(
        "--batch-size", min=1, help="Probe batch size (default: extract.batch_size)")] = None,
    set_: SetOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Phase 3: layer-wise representations (last token, masked mean) of the base model and every phase-2 run."""
    from lorastudy.progress import Progress
    from lorastudy.representations import extract_study

    cfg = _load(config, set_, data_dir)
    with Progress("extract", console=console) as prog:
        res = extract_study(cfg, batch_size, progress=prog.advance_rows, log=console.print)
    typer.echo(json.dumps({k: len(v) for k, v in res.items()}))


@app.command()
@_handle_errors
def drift(config: ConfigArg, set_: SetOpt = None, data_dir: DataDirOpt = None) -> None:
    """Phase 4A: CKA/cosine drift vs base, noise floor, LoRA vs full FT, hypotheses H1a/H1b, figures."""
    from lorastudy.drift import run_drift

    cfg = _load(config, set_, data_dir)
    res = run_drift(cfg, log=console.print)
    for name in ("H1a", "H1b"):
        for task, d in res["hypotheses"][name]["per_task"].items():
            console.print(f"{name} {task}: {d['decision']} (p_holm={d['p_holm']:.3g})")
    console.print(f"wrote {cfg.out / 'phase4' / 'drift'}")


WorkersOpt = Annotated[int, typer.Option("--workers", min=1,
                                         help="Parallel worker processes (spread over visible GPUs)")]
StreamsOpt = Annotated[int | None, typer.Option(
    "--streams", min=1, help="Runs at once inside each worker process, one thread and CUDA stream each "
                      "(default: 8 when runs train on a GPU, else 1)")]


TaskSel = Annotated[list[str] | None, typer.Option("--task", help="Only these tasks")]
MethodSel = Annotated[list[str] | None, typer.Option("--method", help="Only these methods")]


def _check_selection(cfg, tasks: list[str] | None, methods: list[str] | None) -> None:
    for t in tasks or []:
        if t not in cfg.tasks:
            raise ConfigError(f"--task {t!r} is not in the config's tasks {cfg.tasks}")
    for m in methods or []:
        if m not in cfg.methods:
            raise ConfigError(f"--method {m!r} is not in the config's methods {cfg.methods}")


@app.command()
@_handle_errors
def tune(
    config: ConfigArg,
    task: TaskSel = None,
    method: MethodSel = None,
    workers: WorkersOpt = 1,
    streams: StreamsOpt = None,
    storage: Annotated[str | None, typer.Option(help="SQLAlchemy URL (default: sqlite in the results dir)")] = None,
    force: Annotated[bool, typer.Option(help="Reuse a results dir made by a different config")] = False,
    set_: SetOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Phase 1: Optuna TPE search per task x method (resumable; several processes or machines may share a study).
    Studies are keyed by their search space: after a change of space, a new study is searched."""
    from lorastudy import store
    from lorastudy.progress import Progress
    from lorastudy.tuning import tune as run_tune

    sets = list(set_ or []) + ([f"search.storage={storage}"] if storage else [])
    cfg = _load(config, sets, data_dir)
    _check_levers_here(cfg)
    _check_selection(cfg, task, method)
    store.check_manifest(cfg, force=force)
    with Progress("tune (trials)", console=console) as prog:
        res = run_tune(cfg, task or None, method or None, workers=workers, progress=prog,
                       streams=default_streams(streams, cfg.train.device))
    tbl = Table(title="phase 1: best validation score (the task's primary metric)")
    for c in ("task", "method", "complete", "objective", "best value", "best trial"):
        tbl.add_column(c)
    for s in res["studies"]:
        tbl.add_row(s["task"], s["method"], f"{s['n_complete']}/{s['n_trials_target']}", str(s.get("objective")),
                    f"{s.get('best_value', float('nan')):.4f}", str(s.get("best_trial")))
    Console(width=160).print(tbl)
    for f in res["failures"]:
        console.print(f"[red]worker failed[/] {f['unit']}: {f['error']}")


@app.command("train-all")
@_handle_errors
def train_all_cmd(config: ConfigArg, task: TaskSel = None, method: MethodSel = None, workers: WorkersOpt = 1,
                  streams: StreamsOpt = None,
                  force: Annotated[bool, typer.Option(help="Reuse a results dir made by a different config")] = False,
                  set_: SetOpt = None, data_dir: DataDirOpt = None) -> None:
    """Phase 2: every task x method x seed with the phase-1 best hyperparameters; finished runs are skipped.
    --task/--method train a part now (e.g. the LoRA runs on one machine, the full-FT runs later on another: LoRA
    adapters travel, full-FT weights do not); a later call without them trains the rest."""
    from lorastudy import store
    from lorastudy.pipeline import train_all
    from lorastudy.progress import Progress

    cfg = _load(config, set_, data_dir)
    _check_levers_here(cfg)
    _check_selection(cfg, task, method)
    with store.results_lock(cfg.out):
        store.check_manifest(cfg, force=force)
        with Progress("train-all (runs)", console=console) as prog, checkpoint_on_signal():
            res = train_all(cfg, workers, progress=prog, log=console.print,
                            streams=default_streams(streams, cfg.train.device), tasks=task, methods=method)
    console.print(f"trained {len(res['trained'])}, skipped {len(res['skipped_complete'])} complete, "
                  f"failed {len(res['failures'])}")
    for f in res["failures"]:
        console.print(f"[red]failed[/] {f['unit']}: {f['error']}")
    if res["failures"]:
        raise typer.Exit(1)


@app.command("serve-bench")
@_handle_errors
def serve_bench(
    config: ConfigArg,
    synthetic_arch: Annotated[str | None, typer.Option("--synthetic-arch",
                                                       help="tinyllama | smollm2: random-weight architecture")] = None,
    only: Annotated[str | None, typer.Option("--only", help="One part: 'adapters' (the study's, into "
                                             "phase4/deployment/) or one of serve.archs (into "
                                             "phase4/deployment/<arch>/); default: every part")] = None,
    force: Annotated[bool, typer.Option(help="Re-measure even if results exist")] = False,
    set_: SetOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Phase 4B: merged vs multi-adapter serving (latency, throughput, memory, parity, overhead, H2): the study's
    adapters, then each random-weight architecture of serve.archs."""
    from lorastudy.progress import Progress
    from lorastudy.serving.benchmark import deployment_dir, run_serve_bench, serve_parts

    if synthetic_arch not in (None, "tinyllama", "smollm2"):
        raise ConfigError(f"--synthetic-arch must be tinyllama or smollm2, got {synthetic_arch!r}")
    cfg = _load(config, set_, data_dir)
    parts = serve_parts(cfg)
    if only is not None:
        names = ["adapters", *cfg.serve.archs]
        if only not in names:
            raise ConfigError(f"--only must be one of {names} (serve.archs: {cfg.serve.archs}), got {only!r}")
        parts = [None if only == "adapters" else only]
        if synthetic_arch is not None and only != "adapters":
            raise ConfigError(f"--synthetic-arch replaces the study's adapters (the 'adapters' part); --only {only} "
                              "serves an architecture of serve.archs, which has random weights already")
    for part in parts:
        with Progress(f"serve-bench {part or 'adapters'} (conditions)", console=console) as prog:
            res = run_serve_bench(cfg, progress=prog, log=console.print, synthetic_arch=synthetic_arch, force=force,
                                  extra_arch=part)
        tbl = Table(title=f"serving: {res['adapter_source']} ({res['device']}, {res['dtype']})")
        for c in ("engine", "adapters", "batch", "p50 ms", "p95 ms", "rows/s", "mem MiB", "max|dlogit|"):
            tbl.add_column(c, justify="right")
        for r in res["records"]:
            d = r["max_abs_logit_diff"]
            tbl.add_row(r["engine"], str(r["n_adapters"]), str(r["batch_size"]), f"{r['latency_ms']['p50']:.2f}",
                        f"{r['latency_ms']['p95']:.2f}", f"{r['throughput_rps']:.0f}",
                        "-" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**20:.0f}",
                        "-" if d is None else f"{d:.2e}")
        Console(width=160).print(tbl)
        console.print(f"wrote {deployment_dir(cfg, part)}")


@app.command()
@_handle_errors
def report(
    config: Annotated[Path, typer.Argument(help="Study config (YAML) whose results to report, e.g. "
                                                "configs/quick.yaml, or the results directory itself")],
    check: Annotated[bool, typer.Option("--check", help="Fail if any line of ANALYSIS_REPORT.md or .html disagrees "
                                                        "with the artifacts")] = False,
    set_: SetOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Write ANALYSIS_REPORT.md (+ .html with figures embedded) from the artifacts; --check verifies both.

    The report uses the configuration recorded with the results (config.yaml in the results directory), so the
    config, --set and --data-dir only locate the results; differences from the recorded config are listed."""
    from lorastudy.config import config_differences
    from lorastudy.report.build import ReportCheckError, build_report, check_report, recorded_config

    if config.is_dir():
        if set_ or data_dir:
            raise ConfigError("report RESULTS_DIR: --set and --data-dir do not apply (the recorded config is used)")
        cfg = recorded_config(config)
    else:
        given = _load(config, set_, data_dir)
        cfg = recorded_config(given.out, fallback=given)
        diff = config_differences(given, cfg)
        if diff:
            console.print(f"note: reporting with the config recorded in {cfg.out / 'config.yaml'}; the config "
                          f"given differs in {len(diff)} field(s): " + "; ".join(diff[:5])
                          + ("; …" if len(diff) > 5 else ""), markup=False, highlight=False)
    if check:
        try:
            bad = check_report(cfg)
        except ReportCheckError as e:  # a report file is missing: the check fails (exit 1), without a traceback
            console.print(f"[bold red]report check failed:[/] {rich.markup.escape(str(e))}", markup=True,
                          highlight=False)
            raise typer.Exit(1) from None
        if bad:
            console.print(f"[bold red]report check failed:[/] {len(bad)} line(s) disagree with the artifacts")
            for line in bad[:20]:
                console.print("  " + line, markup=False, highlight=False)
            raise typer.Exit(1)
        console.print("report check passed: every line of the Markdown and HTML reports matches the artifacts")
        return
    path = build_report(cfg)
    console.print(f"wrote {path} and {path.with_suffix('.html')}")


@app.command("merge-shards")
@_handle_errors
def merge_shards_cmd(
    config: ConfigArg,
    shards: Annotated[list[Path], typer.Argument(help="Results dirs of task shards of CONFIG (`lorastudy run "
                                                      "CONFIG --set tasks=[...]` on each machine)")],
    out: Annotated[Path | None, typer.Option("--out", help="Merged results dir (default: CONFIG's output_dir)")] = None,
    allow_partial: Annotated[bool, typer.Option("--allow-partial", help="Merge even when some of CONFIG's tasks "
                                                                         "are in no shard (they are reported "
                                                                         "missing)")] = False,
    set_: SetOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Merge task shards of one study into one results dir: their small artifacts (metrics, trial tables, LoRA
    adapters, per-task drift state; not full-FT weights or representations), then drift's pooled statistics
    (overall H1b) recomputed over the union of tasks, and the report. Serving: run `--only serve` on the result."""
    from lorastudy.merge import merge_shards

    cfg = _load(config, set_, data_dir)
    res = merge_shards(cfg, shards, out=out, allow_partial=allow_partial, log=console.print)
    for t, name in res["tasks"].items():
        console.print(f"{t}: from {name}")
    if res["missing"]:
        console.print(f"[yellow]missing tasks (no shard):[/] {', '.join(res['missing'])}")
    # the serving command must name the same data (and overrides) as this one: the config hash covers the data,
    # and a results dir of another hash is refused
    import shlex

    same = "".join(f" --set {shlex.quote(s)}" for s in set_ or [])
    same += f" --data-dir {shlex.quote(str(data_dir))}" if data_dir is not None else ""
    console.print(f"wrote {res['out']} (drift and report over the merged tasks); serving: `lorastudy run "
                  f"{shlex.quote(str(config))} --only serve{same} --set "
                  f"{shlex.quote('output_dir=' + str(res['out']))}`, then `lorastudy report {res['out']}`",
                  markup=False, highlight=False)


@app.command("export")
@_handle_errors
def export_cmd(
    results_dir: Annotated[Path, typer.Argument(help="A results dir (of `lorastudy run` or `merge-shards`)")],
    out: Annotated[Path, typer.Option("--out", help="Where the exported study goes (empty, or an earlier export)")],
) -> None:
    """Copy a results dir without weights, adapters, representations or checkpoints: what the report reads, small
    enough to commit next to the code (studies/). `lorastudy report OUT --check` passes on it."""
    from lorastudy.merge import export_study

    res = export_study(results_dir, out, log=console.print)
    console.print(f"exported {res['runs']} run dir(s) to {res['out']} "
                  f"({res['omitted_bytes'] / 2**20:.1f} MiB of weights and adapters not in it)", markup=False)


@app.command()
@_handle_errors
def run(
    config: ConfigArg,
    only: Annotated[str | None, typer.Option("--only", help=f"Run just this phase: {PHASES_HELP}")] = None,
    from_: Annotated[str | None, typer.Option("--from", help=f"Start at this phase: {PHASES_HELP}")] = None,
    time_budget: Annotated[float | None, typer.Option("--time-budget", help="Stop cleanly after this many "
                                                                            "seconds: between units, and inside "
                                                                            "phase-2 runs at a step boundary with "
                                                                            "a checkpoint (the next run resumes)")
                           ] = None,
    workers: WorkersOpt = 1,
    streams: StreamsOpt = None,
    force: Annotated[bool, typer.Option(help="Reuse a results dir made by a different config")] = False,
    set_: SetOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """The whole study: sanity, baselines, tune, train, extract, drift, serve, report. Resumable."""
    from lorastudy.pipeline import run as run_pipeline

    for name, ph in (("--only", only), ("--from", from_)):
        if ph is not None and ph not in PHASES:
            raise ConfigError(f"{name} {ph!r}: phases are {', '.join(PHASES)}")
    if only is not None and from_ is not None and only != from_:  # --only wins: a --from beside it would be ignored
        raise ConfigError(f"--only {only} and --from {from_}: give one of them (--only runs one phase, --from "
                          "that phase and every later one)")
    if time_budget is not None and not time_budget > 0:
        raise ConfigError(f"--time-budget {time_budget:g}: must be a positive number of seconds")
    cfg = _load(config, set_, data_dir)
    first = PHASES.index(only or from_ or PHASES[0])
    if any(p in ("tune", "train") for p in ([only] if only else PHASES[first:])):  # (sanity steps eagerly)
        _check_levers_here(cfg)
    with checkpoint_on_signal():  # runs training at a signal checkpoint first (the next invocation resumes them)
        res = run_pipeline(cfg, only=only, from_=from_, time_budget=time_budget, workers=workers, force=force,
                           console=console, streams=default_streams(streams, cfg.train.device))
    tbl = Table(title=f"study {cfg.name}: {cfg.out}")
    tbl.add_column("phase")
    tbl.add_column("seconds", justify="right")
    tbl.add_column("output")
    for ph, d in res["phases"].items():
        tbl.add_row(ph, f"{d.get('seconds', 0):.0f}", str(d.get("path", "")))
    Console(width=160).print(tbl)
    if "stopped" in res:
        console.print(f"[yellow]{res['stopped']}[/]")


def entry() -> None:  # pragma: no cover
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    app()
