"""A study run as task shards on two "machines" and merged (`lorastudy merge-shards`) equals the one-machine run.

The one-machine run is the session's tiny study (conftest ``tiny_study``); the shards run the same config with
``tasks=[sst2]`` and ``tasks=[mrpc,rte]`` into their own results dirs (~40 s of CPU in all)."""

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from lorastudy import store
from lorastudy.cli import app
from lorastudy.config import load_config
from tests.conftest import REPO

TINY = str(REPO / "configs" / "tiny.yaml")
SHARDS = {"a": "[sst2]", "b": "[mrpc,rte]"}
# what a rerun on another machine legitimately changes in a run's metrics.json
TIMING = {"train_time_s", "wall_time_s", "tokens_per_s", "peak_memory_bytes"}


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def shards(tmp_path_factory, glue_dir):
    root = tmp_path_factory.mktemp("shards")
    for name, tasks in SHARDS.items():
        r = _cli("run", TINY, "--data-dir", glue_dir, "--set", f"output_dir={root / name}", "--set", f"tasks={tasks}")
        assert r.exit_code == 0, r.output
    return root


@pytest.fixture(scope="module")
def merged(shards, glue_dir):
    """The README's recipe after the shards: merge, measure serving on the merged dir, report."""
    out = shards / "merged"
    b = _copy(shards / "b", shards / "light" / "b")  # as brought from machine B: no full-FT weights, no phase3/
    r = _cli("merge-shards", TINY, shards / "a", b, "--out", out, "--data-dir", glue_dir)
    assert r.exit_code == 0, r.output
    r = _cli("run", TINY, "--only", "serve", "--data-dir", glue_dir, "--set", f"output_dir={out}")
    assert r.exit_code == 0, r.output
    r = _cli("report", out)
    assert r.exit_code == 0, r.output
    return out


def _copy(src: Path, dst: Path) -> Path:
    """A shard as copied to the merging machine without what merging does not read (full-FT weights, phase3/)."""
    return Path(shutil.copytree(src, dst, ignore=shutil.ignore_patterns("phase3", "model")))


def _json(path: Path):
    return json.loads(path.read_text())


# lines outside the RQ2 section that carry serving timings: the summary's and statistical table's H2 lines
SERVING_LINES = ("- **H2 (serving):**", "| H2 |", "Serving one LoRA adapter per task costs")


def _report_without_timings(text: str) -> tuple[list[str], int]:
    """The report's lines with those that legitimately differ between a one-machine run and a merged one replaced
    by a placeholder: serving (its own measurement: the RQ2 section, H2 and the serving cost lines), the training
    wall-time column of the per-run table, the wall time per phase; the shard provenance paragraph (and its blank
    line) is removed.
    Returns (lines, lines replaced)."""
    out, n, section = [], 0, ""
    for line in text.splitlines():
        if line.startswith("## "):
            section = line
        if line.startswith("Merged from task shards"):
            assert out[-1] == ""
            out.pop()
            continue
        if section == "## How to reproduce" and (line.startswith(("Wall time per phase", "| phase |", "|---|"))
                                                 or re.match(r"\| (sanity|baselines|tune|train|extract|drift|"
                                                             r"serve) \|", line)):
            line = "<wall time>"  # per shard and the merged dir's own passes, against one run's
        elif re.match(r"\| (sst2|mrpc|rte) \| (full|lora) \| \d+ \|", line):
            line = line.rsplit("|", 2)[0] + "| <train seconds> |"  # last cell: wall time of the run
        elif (section.startswith("## RQ2") and not line.startswith("## ")) or line.startswith(SERVING_LINES):
            line, n = "<serving timing>", n + 1
        out.append(line)
    return out, n


def test_merged_shards_equal_the_one_machine_run(tiny_study, merged, shards, glue_dir):
    one, m = tiny_study, merged
    # drift: every per-task number and the pooled ones (overall H1b from the per-task analysis states)
    for f in ("hypothesis_test_results.json", "drift_analysis_results.json"):
        assert _json(m / "phase4/drift" / f) == _json(one / "phase4/drift" / f), f
    h_one, h_m = (_json(d / "phase4/drift/hypothesis_test_results.json")["H1b"]["overall"] for d in (one, m))
    for k in ("estimate", "ci95", "se", "p_one_sided", "decision", "rule_decision"):
        assert h_m[k] == h_one[k] and h_m[k] is not None, k
    # phase 0, phase 1 and every run's metrics (timings aside)
    for f in ("phase0/sanity.json", "phase0/baselines.json", "phase1/summary.json"):
        assert _json(m / f) == _json(one / f), f
    for f in sorted(one.glob("phase1/*/best.yaml")):
        assert (m / f.relative_to(one)).read_text() == f.read_text()
    runs = sorted(one.glob("phase2/*/*/seed*/metrics.json"))
    assert len(runs) == 12
    for f in runs:
        a, b = _json(f), _json(m / f.relative_to(one))
        assert {k: v for k, v in a.items() if k not in TIMING} == {k: v for k, v in b.items() if k not in TIMING}
    # the report: equal line for line except serving timings, training wall times and shard provenance
    rep_one, n_one = _report_without_timings((one / "ANALYSIS_REPORT.md").read_text())
    rep_m, n_m = _report_without_timings((m / "ANALYSIS_REPORT.md").read_text())
    assert rep_m == rep_one and n_m == n_one
    assert any("H1b" in line and "overall" in line.lower() for line in rep_m)
    shard_line = [x for x in (m / "ANALYSIS_REPORT.md").read_text().splitlines() if x.startswith("Merged from")]
    assert len(shard_line) == 1 and "`a` (sst2;" in shard_line[0] and "`b` (mrpc, rte;" in shard_line[0]
    assert _cli("report", m, "--check").exit_code == 0


def test_merged_dir_holds_small_artifacts_and_records_its_shards(merged, shards, glue_dir):
    m = merged
    cfg = load_config(TINY, [f"data.source={glue_dir}", f"output_dir={m}"])
    store.check_manifest(cfg)  # the merged dir is CONFIG's results dir (raises otherwise)
    man = _json(m / "manifest.json")
    assert man["config_hash"] == cfg.hash()
    assert [(s["dir"], s["tasks"]) for s in man["shards"]] == [("a", ["sst2"]), ("b", ["mrpc", "rte"])]
    for s in man["shards"]:
        shard = _json(shards / s["dir"] / "manifest.json")
        assert s["config_hash"] == shard["config_hash"] != cfg.hash() and s["code"] == shard["code"]
        assert s["phases_seconds"]["train"] is not None
    # no full fine-tuned weights, no representations; adapters, metrics and per-task drift state are there
    assert not list(m.glob("phase2/*/full/*/model")) and not list(m.glob("phase3/**/*.safetensors"))
    assert len(list(m.glob("phase2/*/lora/*/adapter/adapter_model.safetensors"))) == 6
    assert sorted(p.name for p in m.glob("phase4/drift/tasks/*.json")) == ["mrpc.json", "rte.json", "sst2.json"]
    for rd in m.glob("phase2/*/*/seed*"):
        assert store.is_complete(rd), rd
        rec = _json(rd / "MERGED.json")
        assert rec["shard"] in SHARDS and bool(rec["omitted"]) == (rd.parent.name == "full")
    adapter = _json(m / "phase2/rte/lora/seed42/adapter/adapter_config.json")
    assert adapter["base_model_name_or_path"] == str((m / "phase2/rte/lora/seed42/base_model").resolve())
    assert _json(m / "phase4/deployment/benchmark_results.json")["adapter_source"] == "phase-2 LoRA adapters"
    from lorastudy.tuning import is_done

    # the shards' Optuna studies were copied: tuning on the merged dir finds every study done (no retuning)
    assert all(is_done(cfg, t, m_) for t in cfg.tasks for m_ in cfg.methods)
    # the report's wall-time table: a column per shard (as recorded), and the merged dir's own serving pass
    table = (m / "ANALYSIS_REPORT.md").read_text().split("Wall time per phase", 1)[1].split("\n\n", 2)[1]
    assert table.splitlines()[0] == "| phase | a | b | this dir |"
    assert re.search(r"^\| tune \| [0-9.]+ \| [0-9.]+ \| – \|$", table, re.M), table
    assert re.search(r"^\| serve \| – \| – \| [0-9.]+ \|$", table, re.M), table


def test_export_keeps_what_the_report_reads_and_leaves_weights_out(merged, tmp_path):
    """`lorastudy export`: the committed-study form of a results dir (studies/): its report checks, no weights,
    adapters, representations or checkpoints; replaced when exported again; refused into a non-empty other dir or
    inside the results dir (exit 2)."""
    out = tmp_path / "export"
    src = Path(shutil.copytree(merged, tmp_path / "src"))
    (src / "phase4/deployment/partial").mkdir()  # an interrupted serving pass's batch sizes: unfinished work
    (src / "phase4/deployment/partial/b1.json").write_text("{}")
    r = _cli("export", src, "--out", out)
    assert r.exit_code == 0, r.output
    assert not (out / "phase4/deployment/partial").exists() and "left out" in r.output
    shutil.rmtree(src)
    r = _cli("report", out, "--check")
    assert r.exit_code == 0, r.output
    files = [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()]
    heavy = [f for f in files if re.search(r"/(adapter|model|base_model)/|\.safetensors$|\.ckpt", f)]
    assert not heavy, heavy
    assert len([f for f in files if f.startswith("phase2/") and f.endswith("/metrics.json")]) == 12
    rec = _json(out / "phase2/rte/lora/seed42/MERGED.json")
    assert any(k.startswith("adapter/") for k in rec["omitted"]) and any(k.startswith("base_model/")
                                                                         for k in rec["omitted"])
    assert any(k.startswith("model/") for k in _json(out / "phase2/rte/full/seed42/MERGED.json")["omitted"])
    assert (out / "phase4/deployment/benchmark_results.json").is_file()  # serving results are kept
    assert _json(out / "EXPORTED.json")["runs"] == 12
    assert _cli("export", merged, "--out", out).exit_code == 0  # an earlier export is replaced
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    r = _cli("export", merged, "--out", other)
    assert r.exit_code == 2 and "not empty" in r.output and (other / "notes.txt").is_file()
    r = _cli("export", merged, "--out", merged / "inside")
    assert r.exit_code == 2 and "inside" in r.output
    r = _cli("export", merged, "--out", other / "notes.txt")
    assert r.exit_code == 2 and "not a directory" in r.output
    # a results dir inside the earlier export is never deleted by replacing it
    inner = Path(shutil.copytree(merged, out / "inner"))
    r = _cli("export", inner, "--out", out)
    assert r.exit_code == 2 and "lies inside --out" in r.output and (inner / "manifest.json").is_file()
    shutil.rmtree(inner)
    # a damaged source is refused before anything is written: the earlier export stays whole
    damaged = Path(shutil.copytree(merged, tmp_path / "damaged"))
    (damaged / "phase2/rte/lora/seed42/metrics.json").unlink()
    r = _cli("export", damaged, "--out", out)
    assert r.exit_code == 2 and "phase2/rte/lora/seed42" in r.output
    assert _cli("report", out, "--check").exit_code == 0 and not list(tmp_path.glob(".*.partial"))




def _edit_yaml(path: Path, fn) -> None:
    doc = yaml.safe_load(path.read_text())
    fn(doc)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def test_merge_refuses_what_is_not_one_study(shards, glue_dir, tmp_path):
    a, b = shards / "a", shards / "b"

    def merge(*dirs, extra=()):
        return _cli("merge-shards", TINY, *dirs, "--out", tmp_path / "out", "--data-dir", glue_dir, *extra)

    rerun = _copy(a, tmp_path / "rerun")  # sst2 again, with other results
    state = rerun / "phase4/drift/tasks/sst2.json"
    state.write_text(state.read_text().replace('"whole_model_drift": 0.', '"whole_model_drift": 1.', 1))
    r = merge(a, b, rerun)
    assert r.exit_code == 2 and "'sst2' is in two shards" in r.output and str(rerun) in r.output
    assert "phase4/drift/tasks/sst2.json" in r.output
    r = merge(b)
    assert r.exit_code == 2 and "['sst2']" in r.output and "in no shard" in r.output and "--allow-partial" in r.output
    other = _copy(b, tmp_path / "other")  # another study: a drift setting differs
    _edit_yaml(other / "config.yaml", lambda d: d["drift"].update(n_resamples=400))
    r = merge(a, other)
    assert r.exit_code == 2 and str(other) in r.output and "drift.n_resamples" in r.output
    data = _copy(b, tmp_path / "data")  # other data for rte
    man = _json(data / "manifest.json")
    man["data"]["rte"]["files"]["train"]["sha256"] = "0" * 64
    (data / "manifest.json").write_text(json.dumps(man))
    r = merge(a, data)
    assert r.exit_code == 2 and str(data) in r.output and "data.rte" in r.output and "files" in r.output
    stale = _copy(b, tmp_path / "nostate")  # run before the drift phase (or by older code): no per-task state
    (stale / "phase4/drift/tasks/mrpc.json").unlink()
    r = merge(a, stale)
    assert r.exit_code == 2 and str(stale) in r.output and "mrpc" in r.output and "--only drift" in r.output
    partial = _copy(b, tmp_path / "partial")  # drift ran before a run of rte was complete: stale state
    shutil.rmtree(partial / "phase2/rte/lora/seed42")
    r = merge(a, partial)
    assert r.exit_code == 2 and str(partial) in r.output and "covers other runs" in r.output and "rte" in r.output
    lever = _copy(b, tmp_path / "lever")  # how runs were executed may differ between shards (not in the hash)
    _edit_yaml(lever / "config.yaml", lambda d: d["train"].update(fuse_max_runs=3, step_levers=["lora_fused"]))
    from lorastudy.merge import check_shards, load_shard

    owners = check_shards(load_config(TINY, [f"data.source={glue_dir}"]), [load_shard(a), load_shard(lever)])
    assert {t: sh.path for t, sh in owners.items()} == {"sst2": a, "mrpc": lever, "rte": lever}
    damaged = _copy(b, tmp_path / "damaged")  # a listed artifact other than full-FT weights went missing
    (damaged / "phase2/mrpc/lora/seed42/metrics.json").unlink()
    r = merge(a, damaged)
    assert r.exit_code == 2 and "mrpc/lora/seed42" in r.output and "missing or corrupted" in r.output
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_partial_merge_when_allowed_and_a_shard_given_twice(shards, glue_dir, tmp_path):
    out = tmp_path / "partial"
    r = _cli("merge-shards", TINY, shards / "b", "--out", out, "--data-dir", glue_dir, "--allow-partial")
    assert r.exit_code == 0, r.output
    assert "missing tasks (no shard): sst2" in r.output
    hyp = _json(out / "phase4/drift/hypothesis_test_results.json")
    assert set(hyp["H1b"]["per_task"]) == set(hyp["H1a"]["per_task"]) == {"mrpc", "rte"}
    assert _json(out / "phase4/drift/tasks/rte.json") == _json(shards / "b/phase4/drift/tasks/rte.json")
    # the report says which task is missing and what the pooled statistics cover (was: said nowhere)
    rep = (out / "ANALYSIS_REPORT.md").read_text()
    assert "**No drift results for sst2** (sst2 in no shard of this merge)" in rep
    assert "cover mrpc, rte only" in rep and "**Tasks of the config in no shard: sst2**" in rep
    assert _cli("report", out, "--check").exit_code == 0
    # merged again with only shard a, given twice (the same results: accepted, the first one's used): nothing of
    # the earlier merge's tasks is left to enter the new one
    twice = _copy(shards / "a", tmp_path / "twice")
    r = _cli("merge-shards", TINY, shards / "a", twice, "--out", out, "--data-dir", glue_dir, "--allow-partial")
    assert r.exit_code == 0, r.output
    assert set(_json(out / "phase4/drift/hypothesis_test_results.json")["H1b"]["per_task"]) == {"sst2"}
    assert sorted(p.name for p in (out / "phase2").iterdir() if p.is_dir()) == ["sst2"]
    assert [(s["dir"], s["tasks"], s["same_as_another_shard"]) for s in _json(out / "manifest.json")["shards"]] \
        == [("a", ["sst2"], []), ("twice", [], ["sst2"])]
    # a study's own results dir is never merged into
    r = _cli("merge-shards", TINY, shards / "a", shards / "b", "--out", shards / "b", "--data-dir", glue_dir)
    assert r.exit_code == 2 and "is the output dir" in r.output
    r = _cli("merge-shards", TINY, shards / "b", "--out", shards / "a", "--data-dir", glue_dir, "--allow-partial")
    assert r.exit_code == 2 and "not an earlier merge of shards" in r.output


def test_merge_refuses_a_shard_inside_the_earlier_merge_it_would_empty(shards, glue_dir, tmp_path):
    """Shards copied into the dir of an earlier merge and merged into it again: merging empties that dir first, so
    the shards were deleted before being read (and the merge died with a FileNotFoundError traceback). Refused,
    exit 2, nothing deleted."""
    out = tmp_path / "merged"
    r = _cli("merge-shards", TINY, shards / "a", shards / "b", "--out", out, "--data-dir", glue_dir)
    assert r.exit_code == 0, r.output
    a, b = _copy(shards / "a", out / "a"), _copy(shards / "b", out / "b")
    r = _cli("merge-shards", TINY, a, b, "--out", out, "--data-dir", glue_dir)
    assert r.exit_code == 2, r.output
    assert "lies inside the output dir" in r.output and str(a) in r.output
    assert (a / "phase4/drift/tasks/sst2.json").is_file() and (out / "manifest.json").is_file()


def test_serving_hint_after_a_merge_names_the_same_config_and_data(monkeypatch, tmp_path):
    """The printed serving command is the one to run next: without the merge's --data-dir (and --set) it computed
    another config hash (hub data) and was refused, exit 2, 'holds results of a different config'."""
    import lorastudy.merge

    monkeypatch.setattr(lorastudy.merge, "merge_shards",
                        lambda cfg, shards, **kw: {"out": str(kw["out"]), "tasks": {}, "missing": []})
    data = tmp_path / "my glue"
    data.mkdir()
    r = _cli("merge-shards", TINY, tmp_path, "--out", tmp_path / "m", "--data-dir", data,
             "--set", "drift.n_resamples=400")
    assert r.exit_code == 0, r.output
    hint = re.sub(r"\s+", " ", r.output).split("serving: `", 1)[1].split("`", 1)[0]
    assert hint == (f"lorastudy run {TINY} --only serve --set drift.n_resamples=400 --data-dir '{data}' "
                    f"--set output_dir={tmp_path / 'm'}")


def test_rehash_script_migrates_a_results_dir_written_with_the_old_hash(merged, glue_dir, tmp_path):
    """scripts/rehash_results.py: a dir whose records carry the old hash (execution keys included) is rewritten to
    the new one, shard records included; a second pass changes nothing; a dir of another config is refused."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("rehash", REPO / "scripts" / "rehash_results.py")
    rh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rh)
    old = Path(shutil.copytree(merged, tmp_path / "old"))
    cfg = load_config(TINY, [f"data.source={glue_dir}", f"output_dir={old}"])
    mapping = rh.hash_map(cfg, [["sst2"], ["mrpc", "rte"]])
    assert len(mapping) == 3 and all(a != b for a, b in mapping.items())
    for path in [*old.rglob("*.json"), *old.rglob("*.md")]:  # as written before the change ...
        text = path.read_text()
        for a, b in mapping.items():
            text = text.replace(b, a)
        path.write_text(text)
    units = sorted(m.parent for m in old.rglob(store.COMPLETE))
    for unit in units:  # ... with COMPLETE markers listing those contents
        marker = unit / store.COMPLETE
        doc = _json(marker)
        doc["files"] = store._inventory(unit)
        marker.write_text(json.dumps(doc))
    cards = [p for p in old.rglob("README.md") if any(a in p.read_text() for a in mapping)]
    assert cards and units and all(store.is_complete(u) for u in units)  # model cards carry the hash
    assert _json(old / "manifest.json")["config_hash"] == rh.legacy_hash(cfg) != cfg.hash()
    with pytest.raises(store.StoreError, match="rehash_results.py"):  # the refusal names the way out
        store.check_manifest(cfg)
    assert rh.main([str(old), "--data-dir", str(glue_dir)]) == 0
    assert all(store.is_complete(u) for u in units)  # markers refreshed: no unit looks damaged
    assert not any(a in p.read_text() for p in cards for a in mapping)
    man = _json(old / "manifest.json")
    assert man["config_hash"] == cfg.hash()
    assert sorted(s["config_hash"] for s in man["shards"]) == sorted(
        cfg.model_copy(update={"tasks": t}).hash() for t in (["sst2"], ["mrpc", "rte"]))
    assert not any(a in p.read_text() for p in old.rglob("*.json") for a in mapping)
    assert rh.migrate(old, str(glue_dir)) == []  # already current
    left = old / "phase0" / "sanity.json"  # a migration interrupted after the manifest: rerunning finishes it
    a, b = next(iter(mapping.items()))
    left.write_text(left.read_text().replace(b, a))
    assert rh.migrate(old, str(glue_dir)) == [left] and a not in left.read_text()
    card = cards[0]  # ... or stopped between rewriting a model card and refreshing its unit's marker
    unit = next(u for u in units if card.is_relative_to(u))
    marker = unit / store.COMPLETE
    doc = _json(marker)
    text = card.read_text()
    for a, b in mapping.items():
        text = text.replace(b, a)
    doc["files"][str(card.relative_to(unit))]["sha256"] = hashlib.sha256(text.encode()).hexdigest()
    doc["files"][str(card.relative_to(unit))]["size"] = len(text.encode())
    marker.write_text(json.dumps(doc))
    assert not store.is_complete(unit)
    assert rh.migrate(old, str(glue_dir)) == [marker] and store.is_complete(unit)
    other = Path(shutil.copytree(merged, tmp_path / "other"))
    _edit_yaml(other / "config.yaml", lambda d: d["drift"].update(n_resamples=400))
    assert rh.main([str(other), "--data-dir", str(glue_dir)]) == 2
    assert rh.main([str(tmp_path / "missing")]) == 2


def test_a_serving_result_is_current_only_for_the_adapters_there_are(merged, glue_dir, tmp_path):
    """serving.current_result: a result measured on fewer LoRA runs than the dir now holds (copied from elsewhere,
    or measured before some runs finished; benchmarks/gpu/serve_adapters.sh) is not current: `run --only serve`
    measures again instead of skipping."""
    from lorastudy.serving.benchmark import current_result
    from lorastudy.serving.build import complete_lora_runs

    def study_adapter_names(cfg):
        return [name for name, _, rd in complete_lora_runs(cfg) if (rd / "adapter").exists()]

    out = Path(shutil.copytree(merged, tmp_path / "m"))
    cfg = load_config(TINY, [f"data.source={glue_dir}", f"output_dir={out}"])
    res = out / "phase4" / "deployment" / "benchmark_results.json"
    doc = _json(res)
    assert doc["adapters"] == study_adapter_names(cfg) and current_result(cfg) is not None
    doc["adapters"] = doc["adapters"][:-1]
    res.write_text(json.dumps(doc))
    assert current_result(cfg) is None
    cut = load_config(TINY, [f"data.source={glue_dir}", f"output_dir={out}",
                             f"serve.max_adapters={len(doc['adapters'])}"])
    assert current_result(cut) is None  # measured with other serving settings
    doc["serve"]["max_adapters"] = len(doc["adapters"])  # as measured with that cap
    res.write_text(json.dumps(doc))
    assert current_result(cut) is not None  # what max_adapters asks for
    r = _cli("export", out, "--out", tmp_path / "exported")  # adapters left out: the result stays current
    assert r.exit_code == 0, r.output
    exp = load_config(TINY, [f"data.source={glue_dir}", f"output_dir={tmp_path / 'exported'}",
                             f"serve.max_adapters={len(doc['adapters'])}"])
    assert not study_adapter_names(exp) and current_result(exp) is not None
