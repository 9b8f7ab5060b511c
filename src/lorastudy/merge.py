"""Task shards of one study, run on several machines, merged into one results dir (``lorastudy merge-shards``).

A study can be run at task granularity: ``lorastudy run CONFIG --set tasks=[sst2]`` on one machine and
``--set tasks=[mrpc,rte]`` on another, each into its own results dir (a shard). ``merge_shards`` checks that the
shards are the same study as CONFIG except for ``tasks`` (recorded configs, data identity per task), that no task
is in two shards with different results and that every task of CONFIG is covered, then builds one results dir for
CONFIG from the shards' small artifacts only:

- phase 0 ``sanity.json`` / ``baselines.json``: the union of the shards' per-task records, in CONFIG's order;
- phase 1 per task x method: ``trials.{csv,json}``, ``best.yaml``, plots, ``analysis/*_optimal.yaml``, the Optuna
  studies (copied into the merged ``optuna.db`` when a shard used the default SQLite storage), ``summary.json``;
- phase 2 run dirs: ``metrics.json``, ``config.yaml``, ``code_version.json``, LoRA adapters (and the tiny model's
  ``base_model/``), failure records; full fine-tuned weights (``model/``) are left out and listed in ``MERGED.json``;
- phase 3: ``probe.json`` only (representations stay where they were extracted);
- phase 4A: each task's analysis state (``drift.write_task_state``), from which ``drift.run_drift`` recomputes
  every statistic pooled across tasks (overall H1b, Holm over tasks, H1a's family) exactly as on one machine.

Serving results are not copied: a shard's benchmark covers only its own tasks' adapters, so the study's serving
benchmark is measured on the merged dir (it holds every adapter): ``lorastudy run CONFIG --only serve``.
The merged ``manifest.json`` records the shards (dir name, config hash, code version, tasks, phase wall times)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from lorastudy import store
from lorastudy.config import EXECUTION_KEYS, StudyConfig, config_differences

# Keys of the resolved config that may differ between the shards of one study: the tasks (what shards split),
# where results and data lie (the data are compared by identity instead), and what does not change results
# (the config hash leaves out serving knobs, experiment tracking and how runs are executed too: each run's
# metrics.json records its step path and levers).
SHARD_FREE_KEYS = ("tasks", "output_dir", "data.source", "serve", "tracking", *EXECUTION_KEYS)
MERGED = "MERGED.json"
WEIGHTS = ("model/",)  # full fine-tuned weights in a run dir: not merged (GBs), not needed by drift or the report


class MergeError(store.StoreError):
    """The shards cannot be merged into one study (exit 2); the message names the shard dir and the field."""


@dataclass
class Shard:
    path: Path
    cfg: StudyConfig  # the config recorded in the shard (its output_dir pointing at the shard)
    manifest: dict

    @property
    def name(self) -> str:
        return self.path.name


def study_differences(cfg: StudyConfig, shard: StudyConfig) -> list[str]:
    """Dotted config keys (``SHARD_FREE_KEYS`` left out) whose values differ between CONFIG and a shard's recorded
    config, as 'key: config X, shard Y' lines; empty when they are the same study."""
    return config_differences(cfg, shard, labels=("config", "shard"), ignore=SHARD_FREE_KEYS)


def load_shard(path: Path) -> Shard:
    """A shard's recorded config and manifest. Raises MergeError when ``path`` is not a results dir."""
    from lorastudy.report.build import recorded_config

    path = Path(path)
    if not path.is_dir():
        raise MergeError(f"shard {path}: not a directory")
    man = path / "manifest.json"
    if not (path / "config.yaml").is_file() or not man.is_file():
        raise MergeError(f"shard {path}: no config.yaml/manifest.json; not a results dir of `lorastudy run`")
    return Shard(path, recorded_config(path), store.read_json(man))


def check_shards(cfg: StudyConfig, shards: list[Shard], allow_partial: bool = False) -> dict[str, Shard]:
    """Which shard provides each task of ``cfg``; MergeError (naming the shard dir and the field) when a shard is
    another study (config other than ``tasks``, data of a task with another identity), has a task outside the
    config, shares a task with another shard, lacks a task's drift analysis state, or when a task of the config is
    in no shard (unless ``allow_partial``). Reads the config's data (``data.data_identity``): DataError."""
    from lorastudy.data import data_identity
    from lorastudy.drift import task_state_path

    want = data_identity(cfg)
    owner: dict[str, Shard] = {}
    for sh in shards:
        diff = study_differences(cfg, sh.cfg)
        if diff:
            raise MergeError(f"shard {sh.path}: its recorded config.yaml is another study than the config (only "
                             f"tasks may differ): " + "; ".join(diff[:8]) + ("; …" if len(diff) > 8 else ""))
        data = sh.manifest.get("data") or {}
        for t in sh.cfg.tasks:
            if t not in cfg.tasks:
                raise MergeError(f"shard {sh.path}: task {t!r} is not in the config's tasks {cfg.tasks}")
            if t in owner:
                why = _differs(cfg, t, owner[t], sh)
                if why:
                    raise MergeError(f"task {t!r} is in two shards, {owner[t].path} and {sh.path}, with different "
                                     f"results ({why}); a task must come from one shard (merge one of them "
                                     "without it)")
                continue  # the same results twice (e.g. one shard copied twice): the first shard's are used
            if data.get(t) != want[t]:
                keys = sorted(k for k in set(data.get(t) or {}) | set(want[t])
                              if (data.get(t) or {}).get(k) != want[t].get(k))
                raise MergeError(f"shard {sh.path}: manifest.json data.{t} differs from the config's data "
                                 f"({', '.join(keys) or 'missing'}): the shard was run on other data")
            state = task_state_path(sh.path, t)
            if not state.is_file():
                raise MergeError(f"shard {sh.path}: no drift analysis state for {t} "
                                 f"({state.relative_to(sh.path)}); run the drift phase "
                                 "there first (`lorastudy run SHARD_CONFIG --only drift`)")
            done = sorted([m, s] for m in cfg.methods for s in cfg.seeds
                          if run_complete(store.run_dir(sh.path, t, m, s)))
            if sorted(store.read_json(state).get("runs", [])) != done:
                raise MergeError(f"shard {sh.path}: {state.relative_to(sh.path)} covers other runs than the "
                                 f"shard's complete phase-2 runs of {t} ({done}); rerun extract and drift there "
                                 "(`lorastudy run SHARD_CONFIG --from extract`)")
            owner[t] = sh
    missing = [t for t in cfg.tasks if t not in owner]
    if missing and not allow_partial:
        raise MergeError(f"tasks {missing} of the config are in no shard (shards: "
                         f"{', '.join(str(s.path) for s in shards)}); add their shard, or --allow-partial for a "
                         "report without them")
    return {t: owner[t] for t in cfg.tasks if t in owner}


# keys of a run's metrics.json that measure the machine, not the result (they differ between identical reruns)
TIMING_KEYS = ("train_time_s", "wall_time_s", "tokens_per_s", "peak_memory_bytes", "device_name")


def _differs(cfg: StudyConfig, task: str, a: Shard, b: Shard) -> str | None:
    """The first artifact of ``task`` whose content differs between shards ``a`` and ``b`` (its drift analysis
    state, byte for byte; a phase-2 run's metrics apart from ``TIMING_KEYS``, or its presence), else None."""
    from lorastudy.drift import task_state_path

    sa, sb = task_state_path(a.path, task), task_state_path(b.path, task)
    if not (sa.is_file() and sb.is_file()) or sa.read_bytes() != sb.read_bytes():
        return str(sa.relative_to(a.path))
    for m in cfg.methods:
        for s in cfg.seeds:
            ma, mb = (store.run_dir(sh.path, task, m, s) / "metrics.json" for sh in (a, b))
            if ma.is_file() != mb.is_file():
                return str(ma.relative_to(a.path))
            if ma.is_file():
                da, db = (store.read_json(x) for x in (ma, mb))
                if {k: v for k, v in da.items() if k not in TIMING_KEYS} != \
                        {k: v for k, v in db.items() if k not in TIMING_KEYS}:
                    return str(ma.relative_to(a.path))
    return None


def _copytree(src: Path, dst: Path, ignore=None) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=ignore)


def _unfinished_serving(src: Path, log):
    """A ``shutil.copytree`` ignore for a copy out of the results dir ``src``: a serving part's per-batch-size
    checkpoints (``phase4/deployment/partial``, ``phase4/deployment/<arch>/partial``: serving.benchmark) are
    unfinished work, not a result; each one left out is named through ``log``."""
    def ignore(d: str, names: list[str]) -> set[str]:
        d = Path(d)  # (partial/ lies in phase4/deployment or in phase4/deployment/<arch>)
        if store.SERVING_PARTIAL not in names or "deployment" not in (d.name, d.parent.name):
            return set()
        log(f"export: {(d / store.SERVING_PARTIAL).relative_to(src)}/ (an unfinished serving benchmark's batch "
            "sizes): left out")
        return {store.SERVING_PARTIAL}

    return ignore


def _copyfile(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dst)


def run_complete(rd: Path) -> bool:
    """Whether a shard's phase-2 run dir is complete apart from full fine-tuned weights (``model/``), which need
    not travel with a shard. Raises StoreError when its marker is there but another listed file is missing or
    corrupted."""
    return store.check_not_damaged(rd, "copying the shard again (or rerunning its training there)", skip=WEIGHTS)


def _copy_run(src: Path, dst: Path, shard_name: str, omit: tuple[str, ...] = WEIGHTS) -> None:
    """One phase-2 run dir without the top-level folders ``omit`` (default: full fine-tuned weights, ``model/``),
    rebuilt with its own COMPLETE marker (so it lists what is there) and a ``MERGED.json`` naming the source dir
    and what was left out."""
    try:
        marker = json.loads((src / store.COMPLETE).read_text())
    except ValueError:  # a marker of older code ("ok")
        marker = {}
    names = {o.rstrip("/") for o in omit}
    omitted = {k: v for k, v in marker.get("files", {}).items() if k.startswith(omit)} or {
        str(p.relative_to(src)): {"size": p.stat().st_size} for n in sorted(names) if (src / n).is_dir()
        for p in sorted((src / n).rglob("*")) if p.is_file()}
    if (src / MERGED).is_file():  # a run dir already merged (its weights left out then): keep that record too
        omitted = {**store.read_json(src / MERGED).get("omitted", {}), **omitted}
    with store.staging_dir(dst) as tmp:
        for p in src.iterdir():
            if p.name == store.COMPLETE or p.name in names:
                continue
            (_copytree if p.is_dir() else _copyfile)(p, tmp / p.name)
        cfg_json = tmp / "adapter" / "adapter_config.json"
        if cfg_json.is_file():  # the tiny model's base is saved beside the run: point at the merged copy
            ac = json.loads(cfg_json.read_text())
            # (recorded where the shard was written, maybe another machine: matched by its place in the layout)
            base = Path(str(ac.get("base_model_name_or_path")))
            if (src / "base_model").is_dir() and base.parts[-5:] == (*src.parts[-4:], "base_model"):
                ac["base_model_name_or_path"] = str(dst.resolve() / "base_model")
                cfg_json.write_text(json.dumps(ac, indent=2, sort_keys=True) + "\n")
        (tmp / MERGED).write_text(json.dumps({"shard": shard_name, "finished": marker.get("finished"),
                                              "omitted": omitted}, indent=1) + "\n")


def _phase_file(shard: Shard, name: str):
    """A shard's phase-0 results (``write_current`` format) when they belong to its recorded config, else None."""
    p = shard.path / "phase0" / name
    if not p.is_file():
        return None
    doc = store.read_json(p)
    return doc.get("results") if doc.get("config_hash") == shard.manifest.get("config_hash") else None


def _copy_studies(mcfg: StudyConfig, shard: Shard, names: list[str]) -> None:
    """The shard's Optuna studies into the merged storage (so that tuning sees them complete); only from the
    default per-results-dir SQLite file: a shared storage (``search.storage``) already holds them."""
    import optuna

    from lorastudy.tuning import storage_url

    db = shard.path / "phase1" / "optuna.db"
    if mcfg.search.storage or not db.is_file():
        return
    src, dst = f"sqlite:///{db.resolve()}", storage_url(mcfg)
    have = {s.study_name for s in optuna.get_all_study_summaries(dst)}
    for n in names:
        if n not in have:
            optuna.copy_study(from_study_name=n, from_storage=src, to_storage=dst)


def merge_shards(cfg: StudyConfig, shard_dirs: list[Path], out: Path | None = None, allow_partial: bool = False,
                 log=print) -> dict:
    """Build one results dir for ``cfg`` (at ``out``, default ``cfg.out``) from task shards (module docstring),
    recompute drift over the union of tasks from the per-task analysis states, and write the report.

    Returns ``{"out", "tasks": {task: shard dir name}, "missing": [...]}``. Raises MergeError (a StoreError: exit
    2) naming the shard and field when the shards are not one study, DataError when the config's data cannot be
    read, StoreError when ``out`` holds another config's results or cannot be written."""
    from lorastudy.drift import run_drift, task_state_path
    from lorastudy.report.build import build_report
    from lorastudy.tuning import _write_summary

    shards = [load_shard(Path(d)) for d in shard_dirs]
    if not shards:
        raise MergeError("no shard dirs given")
    out = Path(out) if out is not None else cfg.out
    for sh in shards:
        if sh.path.resolve() == out.resolve():
            raise MergeError(f"shard {sh.path} is the output dir; merge into another directory")
        # an earlier merge at --out is emptied first: a shard inside it would be deleted before it is read
        if out.resolve() in sh.path.resolve().parents:
            raise MergeError(f"shard {sh.path} lies inside the output dir {out}, which merging empties first; "
                             "move the shard out of it, or merge into another directory")
    owner = check_shards(cfg, shards, allow_partial)
    mcfg = cfg.model_copy(update={"output_dir": str(out).replace("{", "{{").replace("}", "}}")})
    order = {(t, m): i for i, (t, m) in enumerate((t, m) for t in cfg.tasks for m in cfg.methods)}
    with store.results_lock(out):
        _clear_previous_merge(out)
        store.check_manifest(mcfg)
        sanity, baselines, studies, failures = [], {}, [], []
        p2 = {"trained": [], "skipped_complete": [], "failures": [], "not_started": 0}
        for t, sh in owner.items():
            src = sh.path
            for m in cfg.methods:
                if (src / "phase1" / f"{t}_{m}").is_dir():
                    _copytree(src / "phase1" / f"{t}_{m}", out / "phase1" / f"{t}_{m}")
                opt = src / "analysis" / f"{t}_{m}_optimal.yaml"
                if opt.is_file():
                    _copyfile(opt, out / "analysis" / opt.name)
                for s in cfg.seeds:
                    rs, rd = store.run_dir(src, t, m, s), store.run_dir(out, t, m, s)
                    failed = store.failed_marker(rs)
                    if run_complete(rs):
                        _copy_run(rs, rd, sh.name)
                    elif failed.is_file():
                        _copyfile(failed, rd.parent / failed.name)
            probe = src / "phase3" / t / "probe.json"
            if probe.is_file():
                _copyfile(probe, out / "phase3" / t / "probe.json")
            _copyfile(task_state_path(src, t), task_state_path(out, t))
        for sh in shards:
            tasks = [t for t, o in owner.items() if o is sh]
            sanity += [r for r in _phase_file(sh, "sanity.json") or [] if r["task"] in tasks]
            baselines.update({t: v for t, v in (_phase_file(sh, "baselines.json") or {}).items() if t in tasks})
            p1 = sh.path / "phase1" / "summary.json"
            if p1.is_file():
                summ = store.read_json(p1)
                mine = [s for s in summ["studies"] if s["task"] in tasks]
                studies += mine
                failures += [{**f, "shard": sh.name} for f in summ.get("failures", [])]
                _copy_studies(mcfg, sh, [s["study"] for s in mine if s.get("study")])
            if (sh.path / "phase2" / "summary.json").is_file():
                s2 = store.read_json(sh.path / "phase2" / "summary.json")
                for k in ("trained", "skipped_complete", "failures"):
                    p2[k] += s2.get(k, [])
                p2["not_started"] += s2.get("not_started", 0)
        if sanity:
            sanity.sort(key=lambda r: order.get((r["task"], r["method"]), len(order)))
            store.write_current(out / "phase0" / "sanity.json", mcfg, sanity)
        if baselines:
            store.write_current(out / "phase0" / "baselines.json", mcfg,
                                {t: baselines[t] for t in cfg.tasks if t in baselines})
        if studies:
            studies.sort(key=lambda s: order.get((s["task"], s["method"]), len(order)))
            _write_summary(mcfg, studies, failures)
        store.atomic_write_json(out / "phase2" / "summary.json", p2)
        record_shards(out, [{"dir": sh.name, "config_hash": sh.manifest.get("config_hash"),
                             "code": sh.manifest.get("code"), "tasks": [t for t, o in owner.items() if o is sh],
                             "same_as_another_shard": [t for t in sh.cfg.tasks if t in owner and owner[t] is not sh],
                             "phases_seconds": _phase_seconds(sh.path)} for sh in shards])
        run_drift(mcfg, log=log)
        build_report(mcfg)
    missing = [t for t in cfg.tasks if t not in owner]
    return {"out": str(out), "tasks": {t: sh.name for t, sh in owner.items()}, "missing": missing}


def _clear_previous_merge(out: Path) -> None:
    """Empty ``out`` when it holds an earlier merge (everything in it came from shards; what a task no longer in
    the shards left there must not enter the new one). MergeError when it holds anything else: a study's own
    results (e.g. an unfinished one-machine run) are never overwritten."""
    entries = [p for p in out.iterdir() if p.name != store.LOCK]
    if not entries:
        return
    man = out / "manifest.json"
    if not man.is_file() or "shards" not in store.read_json(man):
        raise MergeError(f"--out {out} is not empty and not an earlier merge of shards; merge into an empty "
                         "directory (the results there are left as they are)")
    for p in entries:
        shutil.rmtree(p) if p.is_dir() else p.unlink()


# phases whose results a merge takes from the shards (serving is measured on the merged dir; the report rebuilt)
MERGED_PHASES = ("sanity", "baselines", "tune", "train", "extract", "drift")


def _phase_seconds(path: Path) -> dict:
    """A shard's wall time per phase (run_summary.json) for the phases whose results the merge takes from it."""
    p = path / "run_summary.json"
    try:
        phases = store.read_json(p).get("phases", {}) if p.is_file() else {}
    except store.StoreError:
        return {}
    return {k: v.get("seconds") for k, v in phases.items() if isinstance(v, dict) and k in MERGED_PHASES}


def record_shards(out: Path, shards: list[dict]) -> None:
    """Add the shards' provenance to ``out/manifest.json`` (kept by later ``check_manifest`` calls)."""
    man = store.read_json(Path(out) / "manifest.json")
    man["shards"] = shards
    store.atomic_write_json(Path(out) / "manifest.json", man)


# What an exported study leaves out of each run dir: full fine-tuned weights, LoRA adapters, the tiny model's base.
EXPORT_OMIT = ("model/", "adapter/", "base_model/")
EXPORTED = "EXPORTED.json"


def export_study(src: Path, out: Path, log=print) -> dict:
    """A copy of the results dir ``src`` at ``out`` that holds what the report reads and nothing heavy, for
    committing a study next to the code (``studies/``): every complete run dir without weights or adapters
    (``EXPORT_OMIT``; each run's ``MERGED.json`` lists what was left out), phase 3 without representations (its
    ``probe.json`` only), no checkpoints, partial dirs, lock or tracking store; every other artifact, the reports
    and figures as they are (``lorastudy report OUT --check`` passes when it passes on ``src``). Unfinished run dirs
    (no COMPLETE marker) are left out and named through ``log``. The copy is built beside ``out`` and moved into
    place at the end: a failed export leaves an earlier export at ``out`` as it was.

    Returns ``{"out", "runs", "omitted_bytes", "unfinished"}``. Raises MergeError (exit 2) when ``src`` is not a
    results dir, when ``out`` is ``src``, inside it or holds it, is a file or a symlink, or is neither empty nor an
    earlier export; StoreError when a run dir of ``src`` is damaged (nothing is written then) or ``out`` cannot be
    written."""
    src, out = Path(src), Path(out)
    if not src.is_dir() or not (src / "config.yaml").is_file() or not (src / "manifest.json").is_file():
        raise MergeError(f"{src}: not a results dir of `lorastudy run` or `merge-shards` (no config.yaml and "
                         "manifest.json there)")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise MergeError(f"--out {out}: {'a symbolic link' if out.is_symlink() else 'not a directory'}; give a "
                         "directory path")
    s_res, o_res = src.resolve(), out.resolve()
    if o_res == s_res or s_res in o_res.parents:
        raise MergeError(f"--out {out} lies inside the results dir {src}; export to another directory")
    if o_res in s_res.parents:
        raise MergeError(f"the results dir {src} lies inside --out {out}, which exporting replaces; export to "
                         "another directory")
    if out.is_dir() and any(out.iterdir()) and not (out / EXPORTED).is_file():
        raise MergeError(f"--out {out} is not empty and not an earlier export; export into an empty directory")
    # every run dir is checked before anything is written
    p2 = src / "phase2"
    runs, unfinished = [], []
    for rd in sorted(p2.glob("*/*/seed*")) if p2.is_dir() else []:
        if rd.is_dir() and not rd.name.endswith(".ckpt"):
            if store.check_not_damaged(rd, "`lorastudy run CONFIG --only train`"):
                runs.append(rd)
            else:
                unfinished.append(str(rd.relative_to(src)))
    for u in unfinished:
        log(f"export: {u} is not finished (no COMPLETE marker): left out")
    omitted = 0
    # (no COMPLETE marker: an export is not a unit of work; EXPORTED.json marks it)
    with store.staging_dir(o_res, marker=False) as tmp:
        for p in sorted(src.iterdir()):
            if p.name.startswith(".") or p.name in ("tracking", "phase3", "phase2"):
                continue
            if p.is_dir():
                _copytree(p, tmp / p.name, ignore=_unfinished_serving(src, log))
            else:
                _copyfile(p, tmp / p.name)
        for probe in sorted((src / "phase3").glob("*/probe.json")):
            _copyfile(probe, tmp / probe.relative_to(src))
        for f in sorted(p2.glob("*.json")) if p2.is_dir() else []:
            _copyfile(f, tmp / "phase2" / f.name)
        for f in sorted(p2.glob(f"*/*/seed*.{store.FAILED}")) if p2.is_dir() else []:
            _copyfile(f, tmp / f.relative_to(src))
        for rd in runs:
            rel = rd.relative_to(src)
            _copy_run(rd, tmp / rel, src.name, EXPORT_OMIT)
            omitted += sum(v.get("size", 0) for v in store.read_json(tmp / rel / MERGED)["omitted"].values())
        store.atomic_write_json(tmp / EXPORTED, {"from": src.name, "runs": len(runs), "omitted_bytes": omitted,
                                                 "omitted_per_run": list(EXPORT_OMIT), "unfinished": unfinished})
    return {"out": str(out), "runs": len(runs), "omitted_bytes": omitted, "unfinished": unfinished}
