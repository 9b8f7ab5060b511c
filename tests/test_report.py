"""The generated report: recorded provenance, `report --check` on both files, honest verdicts, readable figures
rendered in a real browser, `run_summary.json` timings across resume passes, CLI help and config errors.

One small study (the tiny preset on RTE only, shortened) is run once for the module (~40 s of CPU)."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import yaml
from typer.testing import CliRunner

from lorastudy import store
from lorastudy.cli import app
from lorastudy.config import config_differences, load_config
from lorastudy.report import build, figures
from tests.conftest import REPO

TINY = str(REPO / "configs" / "tiny.yaml")
SMALL = ["tasks=[rte]", "search.n_trials=1", "search.max_steps=2", "train.max_steps=6", "sanity.max_steps=10",
         "serve.batch_sizes=[2]", "serve.requests=2", "serve.warmup=1"]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _sets(*extra):
    return [a for s in [*SMALL, *extra] for a in ("--set", s)]


@pytest.fixture(scope="module")
def study(tmp_path_factory, glue_dir):
    out = tmp_path_factory.mktemp("report") / "results"
    r = _cli("run", TINY, "--data-dir", glue_dir, *_sets(f"output_dir={out}"))
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture
def copy(study, tmp_path):
    """A private copy of the study (tests that edit artifacts)."""
    dst = tmp_path / "copy"
    shutil.copytree(study, dst)
    return dst


def _section(text: str, title: str) -> str:
    return text.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


# -- provenance and --check ----------------------------------------------------------------------------------------
def test_report_uses_the_recorded_config_and_check_passes_as_documented(copy, glue_dir):
    """`run` was given --data-dir; `report` without it (the README's form) must neither rewrite the report with
    another data source nor fail its check, and the report shows no machine path."""
    md = copy / build.REPORT
    written = md.read_text()
    r = _cli("report", TINY, *_sets(f"output_dir={copy}"))
    assert r.exit_code == 0, r.output
    assert md.read_text() == written
    assert "recorded" in r.output and "data.source" in r.output  # the ignored difference is named
    r = _cli("report", TINY, "--check", *_sets(f"output_dir={copy}"))
    assert r.exit_code == 0, r.output
    assert _cli("report", copy, "--check").exit_code == 0  # the results directory itself
    for text in (written, md.with_suffix(".html").read_text()):
        for path in (str(copy), str(glue_dir), str(glue_dir.resolve()), "../shared"):
            assert path not in text


def test_wall_times_devices_and_the_prior_implementation_comparison(study):
    """How to reproduce: the device runs trained on and the wall time of every phase before the report (from
    run_summary.json, written after each phase); the comparison with the study plan's prior claims per task."""
    text = (study / build.REPORT).read_text()
    assert "Trained on: cpu (static)." in text or "Trained on: cpu (eager)." in text, _section(text, "How to reproduce")
    table = text.split("Wall time per phase", 1)[1].split("\n\n", 2)[1]
    assert [ln.split(" | ")[0] for ln in table.splitlines()[2:]] == \
        ["| sanity", "| baselines", "| tune", "| train", "| extract", "| drift", "| serve"], table
    summary = json.loads((study / "run_summary.json").read_text())["phases"]
    assert f"| tune | {summary['tune']['seconds']:.1f} |" in table
    sec = _section(text, "Comparison with the study plan's prior implementation")
    assert re.search(r"^\| rte \| 0\.1% \| -?[0-9.]+% \[", sec, re.M), sec  # (the module's study is RTE only)


def test_the_runs_step_levers_are_named(copy):
    """A run trained with step levers (not in the config hash) shows them beside its device and step path."""
    mt = copy / "phase2" / "rte" / "lora" / "seed42" / "metrics.json"
    doc = json.loads(mt.read_text())
    doc["step_levers"] = ["fused_kernels"]
    mt.chmod(0o644)
    mt.write_text(json.dumps(doc))
    (mt.parent / store.COMPLETE).unlink()  # (an edited artifact: keep the unit readable, not "damaged")
    (mt.parent / store.COMPLETE).write_text("ok")
    r = _cli("report", copy)
    assert r.exit_code == 0, r.output
    text = (copy / build.REPORT).read_text()
    assert f"({doc['step_mode']}, levers fused_kernels)" in text, _section(text, "How to reproduce")


STUDY = REPO / "studies" / "smollm2"


def test_committed_study_checks_and_the_readme_findings_match_it():
    """studies/smollm2 (the reference study, committed): `report --check` passes on it with this code, and README's
    Findings section is what scripts/readme_findings.py makes of its report. After a change to the report's
    template: `lorastudy report studies/smollm2`, then `python scripts/readme_findings.py`."""
    r = _cli("report", STUDY, "--check")
    assert r.exit_code == 0, r.output
    p = subprocess.run([sys.executable, "scripts/readme_findings.py", "--check"], cwd=REPO, capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stderr
    assert not (STUDY / store.LOCK).exists()  # checking leaves nothing in the committed dir


def test_the_seed_level_test_is_described_per_task():
    """The seed-level test's resolution depends on each task's seed counts (the committed study's SST-2 has one
    LoRA run fewer: 10 relabelings against MRPC's and RTE's 20); the report gave the first task's numbers for all."""
    drift = json.loads((STUDY / "phase4" / "drift" / "drift_analysis_results.json").read_text())
    text = (STUDY / build.REPORT).read_text()
    counts = {t: d["comparison"]["seed_level_test"]["n_permutations"] for t, d in drift["tasks"].items()}
    assert len(set(counts.values())) > 1  # (what makes this study the case)
    for t, n in counts.items():
        assert f"{t}: {n} relabelings" in text


def test_a_task_with_failed_runs_and_none_collapsed_says_so():
    """The committed study's SST-2 has one failed run and none collapsed: the summary read "0 of 6 runs collapsed
    and 1 failed"."""
    text = (STUDY / build.REPORT).read_text()
    assert "**sst2: 1 of 6 runs failed** (lora/seed2024)" in text and "0 of 6 runs collapsed" not in text


def test_check_passes_where_the_results_move(copy, tmp_path):
    moved = tmp_path / "elsewhere" / "study"
    shutil.move(copy, moved)
    r = _cli("report", moved, "--check")
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("suffix", [".md", ".html"])
def test_check_fails_on_a_hand_edit_to_either_file(copy, suffix):
    path = (copy / build.REPORT).with_suffix(suffix)
    text = path.read_text()
    m = re.search(r"(0\.\d{3}) ± ", text)
    path.write_text(text[: m.start(1)] + ("0.999" if m.group(1) != "0.999" else "0.998") + text[m.end(1):])
    r = _cli("report", copy, "--check")
    assert r.exit_code == 1 and "disagree" in r.output and path.name in r.output, r.output


def test_operator_notes_are_shown_verbatim_labelled_and_checked(copy):
    """NOTES.md (what no artifact records, e.g. a benchmark that shared its host) appears as written, quoted, in its
    own section right after the summary, labelled as hand-written; editing it after the report fails `--check`;
    without it there is no such section and the header reads as before."""
    title = "Operator's notes (written by hand, not generated)"
    text = (copy / build.REPORT).read_text()
    assert title not in text
    assert text.splitlines()[3].startswith("`lorastudy report CONFIG --check`")  # (its own line, notes or not)
    notes = "- The serving phase shared its host with another benchmark: eager rows are slower.\n\n| a |\n|---|\n"
    (copy / build.NOTES).write_text("\ufeff\n" + notes + "\n\n")  # (a byte-order mark and blank lines around)
    assert _cli("report", copy).exit_code == 0
    text = (copy / build.REPORT).read_text()
    assert text.index("## Executive summary") < text.index(f"## {title}") < text.index("## Data")
    assert "\n".join(f"> {ln}".rstrip() for ln in notes.strip().splitlines()) in _section(text, title)
    assert "the operator's notes from `NOTES.md`, in theirs." in text.splitlines()[2]
    assert text.splitlines()[3].startswith("`lorastudy report CONFIG --check`")
    assert _cli("report", copy, "--check").exit_code == 0
    (copy / build.NOTES).write_text(notes.replace("slower", "faster"))
    r = _cli("report", copy, "--check")
    assert r.exit_code == 1 and "faster" in r.output, r.output


def test_operator_notes_cannot_reshape_the_report(copy):
    """Notes are quoted: a heading in them is not a section of the report, an unclosed code fence or HTML comment
    does not swallow what follows, a script tag is text; a figure path in them outside the results dir is not
    embedded in the HTML."""
    (copy / build.NOTES).write_text("## Executive summary\n\n```\nunclosed fence\n<!-- unclosed comment\n"
                                    "<script>alert(1)</script> a < b\n![x](../../etc/x.png) [y](javascript:alert(1))\n")
    outside = copy.parent / "x.png"
    shutil.copy(next(copy.glob("phase4/*/*.png")), outside)
    (copy / build.NOTES).write_text((copy / build.NOTES).read_text().replace("../../etc/x.png", "../x.png"))
    assert _cli("report", copy).exit_code == 0
    text = (copy / build.REPORT).read_text()
    assert text.count("\n## Executive summary") == 1 and "> ## Executive summary" in text
    assert "> <script>alert(1)</script> a < b" in text and "> <!-- unclosed comment" in text  # (as written)
    html = (copy / build.REPORT).with_suffix(".html").read_text()
    assert "<script>" not in html and "&lt;script&gt;" in html and "javascript:" not in html
    for h in ("Data", "RQ1 — representation drift", "How to reproduce"):  # nothing swallowed after the notes
        assert f"<h2>{h}</h2>" in html, h
    assert 'src="../x.png"' in html  # (left as a link, not read into the page)
    assert _cli("report", copy, "--check").exit_code == 0


@pytest.mark.parametrize("case", ["directory", "too large", "not UTF-8", "dangling link"])
def test_bad_operator_notes_are_a_user_error_naming_the_file(copy, case):
    p = copy / build.NOTES
    if case == "directory":
        p.mkdir()
    elif case == "too large":
        p.write_text("x" * (build.NOTES_MAX_BYTES + 1))
    elif case == "not UTF-8":
        p.write_bytes(b"\xff\xfe notes")
    else:
        p.symlink_to(copy / "missing.md")
    r = _cli("report", copy)
    assert r.exit_code == 2 and build.NOTES in r.output, r.output
    assert "Traceback" not in r.output


def test_check_fails_cleanly_when_a_report_file_is_missing(tmp_path):
    """`report --check` before `report` (or with one of the two files deleted) is a failed check, exit 1 with the
    missing file named, not a ReportCheckError traceback."""
    from lorastudy.config import dump_yaml

    (tmp_path / "config.yaml").write_text(dump_yaml(load_config(TINY)))
    r = _cli("report", tmp_path, "--check")
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.output
    assert "report check failed" in r.output and str(tmp_path / build.REPORT) in r.output
    assert "Traceback" not in r.output


def test_data_identity_from_the_manifest(copy):
    """With the data identity recorded in manifest.json (lorastudy.data.data_identity), the report shows each
    file's checksum and name, never its directory."""
    man = json.loads((copy / "manifest.json").read_text())
    sha = "ab12cd34ef56" + "0" * 52
    man["data"] = {"rte": {"source": "local parquet", "rows": {"train": 64, "validation": 32, "test": 48},
                           "files": {"/some/machine/glue/rte/train.parquet": sha}}}
    (copy / "manifest.json").write_text(json.dumps(man))
    text = build.render(build.recorded_config(copy))
    data = _section(text, "Data")
    assert "`train.parquet` ab12cd34ef56" in data and "local parquet" in data and "train 64" in data
    assert "/some/machine" not in text
    # absent: said so, with the split sizes the runs recorded
    del man["data"]
    (copy / "manifest.json").write_text(json.dumps(man))
    data = _section(build.render(build.recorded_config(copy)), "Data")
    assert "did not record" in data and "test 48" in data


# -- verdicts ------------------------------------------------------------------------------------------------------
def test_smoke_run_banner_and_no_recommendations(study):
    text = (study / build.REPORT).read_text()
    summary = _section(text, "Executive summary")
    assert summary.lstrip().startswith("> **Smoke-size run")
    assert "1 tuning trial(s)" in summary and "smoke-run outcome" in summary
    assert _section(text, "Practical recommendations").strip().startswith("None: this is a smoke-size run")


def _protocol_size(monkeypatch):
    """Render as if the config were protocol-size (the evidence rules under test are the others)."""
    from lorastudy.report import evidence

    monkeypatch.setattr(evidence, "protocol_shortfalls", lambda cfg: [])


def _rewrite_metrics(f: Path, **changes) -> None:
    """Edit a finished run's metrics.json and re-list it in the unit's COMPLETE marker (as a finished run with
    these metrics would have it; otherwise the report rightly refuses the unit as damaged)."""
    m = json.loads(f.read_text())
    m.update(changes)
    f.write_text(json.dumps(m))
    marker = f.parent / store.COMPLETE
    (marker).write_text(json.dumps({**json.loads(marker.read_text()), "files": store._inventory(f.parent)}))


def _set_collapsed(out: Path, collapsed: bool) -> None:
    for f in out.glob("phase2/rte/*/seed*/metrics.json"):
        _rewrite_metrics(f, collapsed=collapsed)


def _html_items(md_section: str) -> int:
    import markdown

    return markdown.markdown(md_section).count("<li>")


def test_collapsed_task_is_named_and_no_recommendation_rests_on_it(copy, monkeypatch):
    _protocol_size(monkeypatch)
    _rewrite_metrics(copy / "phase2/rte/lora/seed42/metrics.json", collapsed=True)
    text = build.render(build.recorded_config(copy))
    summary = _section(text, "Executive summary")
    assert "Smoke-size" not in summary
    assert re.search(r"\*\*rte: \d of 4 runs collapsed\*\*", summary) and "lora/seed42" in summary
    for line in summary.splitlines():
        if line.startswith(("- **H1a (rte)", "- **H1b (rte)", "- **H1b (overall)")):
            assert "**no verdict**" in line and "rule outcome" in line, line
    rec = _section(text, "Practical recommendations")
    assert "- rte: no recommendation" in rec
    # every recommendation is its own bullet (they used to run together into one)
    assert _html_items(rec) == rec.count("\n- ") + rec.startswith("- ") == 2  # rte, serving


def _drift_artifacts(out: Path):
    """The drift phase's two JSON artifacts of ``out``, for tests that rewrite them: paths and parsed contents."""
    hyp_path = out / "phase4/drift/hypothesis_test_results.json"
    drift_path = out / "phase4/drift/drift_analysis_results.json"
    return hyp_path, drift_path, json.loads(hyp_path.read_text()), json.loads(drift_path.read_text())


def test_drift_within_noise_and_pooling_disagreement_are_said(copy, monkeypatch):
    _protocol_size(monkeypatch)
    _set_collapsed(copy, False)
    hyp_path, drift_path, hyp, drift = _drift_artifacts(copy)
    d = hyp["H1b"]["per_task"]["rte"]
    # as the rule writes them: within the floor (what this tiny study measures) and not
    d["noise"]["full"]["within_floor"] = True
    d["decision"] = "not supported (within seed noise)"
    drift["secondary"]["rte"]["drift_reduction"]["estimate"] = -abs(d["estimate"])
    hyp_path.write_text(json.dumps(hyp))
    drift_path.write_text(json.dumps(drift))
    text = build.render(build.recorded_config(copy))
    h1b = next(x for x in _section(text, "Executive summary").splitlines() if x.startswith("- **H1b (rte)"))
    assert "indistinguishable from seed noise" in h1b and "mean pooling disagrees in sign" in h1b
    assert "seeds held fixed" in h1b and "per-seed drift full FT" in h1b
    assert "(≤ floor)" in _section(text, "RQ1 — representation drift")
    assert "- rte: no recommendation on drift" in _section(text, "Practical recommendations")
    # above the floor, supported: a recommendation, with the pooling caveat
    d["noise"]["full"]["within_floor"] = False
    d["decision"] = "supported"
    hyp_path.write_text(json.dumps(hyp))
    rec = _section(build.render(build.recorded_config(copy)), "Practical recommendations")
    assert "- rte: LoRA keeps representations measurably closer" in rec and "mean pooling disagrees" in rec


def test_mean_pooling_on_the_other_side_of_the_bound_is_said_and_softens_the_advice(copy, monkeypatch):
    """The committed study's RTE: last-token reduction 15% [11.5, 18.4] (contradicted against the 20% bound), mean
    pooling 55% [35, 75]: same sign, so the sign check said nothing, and the advice read "do not choose it"."""
    _protocol_size(monkeypatch)
    _set_collapsed(copy, False)
    hyp_path, drift_path, hyp, drift = _drift_artifacts(copy)
    d = hyp["H1b"]["per_task"]["rte"]
    d["noise"]["full"]["within_floor"] = False
    d.update(decision="contradicted", estimate=0.15, ci95=[0.115, 0.184])
    drift["secondary"]["rte"]["drift_reduction"].update(estimate=0.548, ci95=[0.351, 0.745])
    hyp_path.write_text(json.dumps(hyp))
    drift_path.write_text(json.dumps(drift))
    text = build.render(build.recorded_config(copy))
    h1b = next(x for x in _section(text, "Executive summary").splitlines() if x.startswith("- **H1b (rte)"))
    assert "mean pooling lies on the other side of the 20% bound** (54.8%, 95% CI 35.1% to 74.5%)" in h1b
    rec = _section(text, "Practical recommendations")
    assert "do not choose LoRA for that on this evidence, and do not rule it out" in rec
    assert "on the other side of the 20% bound" in _section(text, "RQ1 — representation drift")
    # both poolings below the bound: the plain advice
    drift["secondary"]["rte"]["drift_reduction"].update(estimate=0.05, ci95=[0.01, 0.09])
    drift_path.write_text(json.dumps(drift))
    rec = _section(build.render(build.recorded_config(copy)), "Practical recommendations")
    assert "do not choose it for that." in rec and "do not rule it out" not in rec


# -- figures -------------------------------------------------------------------------------------------------------
@pytest.fixture
def drawn(study, tmp_path, monkeypatch):
    """Draw the drift figures under Optuna's global ggplot style (what `run` leaves behind after tuning), with a
    negative reduction for the annotation; keep the figures for inspection."""
    results = json.loads((study / "phase4/drift/drift_analysis_results.json").read_text())
    hyp = json.loads((study / "phase4/drift/hypothesis_test_results.json").read_text())
    small = json.loads(json.dumps(results["tasks"]["rte"]))  # a second panel, 100x smaller: its own scale
    for prof in small["profiles"].values():
        prof["drift"]["mean"] = [v / 100 for v in prof["drift"]["mean"]]
        prof["drift"]["std"] = [v / 100 for v in prof["drift"]["std"]]
        prof["whole_model_drift"] = {k: (v / 100 if k != "per_seed" else [x / 100 for x in v])
                                     for k, v in prof["whole_model_drift"].items()}
    for fl in small["noise_floor"].values():
        fl["drift_mean"] = [v / 100 for v in fl["drift_mean"]]
        fl["whole_model_drift"] /= 100
    results["tasks"]["mrpc"] = small
    hyp["H1b"]["per_task"]["mrpc"] = hyp["H1b"]["per_task"]["rte"] | {"estimate": -1.18}
    kept = {}
    real_save = figures.save

    def save(fig, path):
        fig.canvas.draw()
        r = fig.canvas.get_renderer()
        fig.extents = (fig._suptitle.get_window_extent(r) if fig._suptitle else None,
                       [ax.title.get_window_extent(r) for ax in fig.axes if ax.get_title()])
        kept[Path(path).name] = fig
        return real_save(fig, path)

    monkeypatch.setattr(figures, "save", save)
    with plt.style.context("ggplot"):
        figures.drift_figures(results, hyp, tmp_path, withheld={"rte": ["lora/seed2024 failed"]})
    return kept, small


def test_serving_figures_without_a_merged_reference(tmp_path):
    """serve.engines without `merged` (e.g. [batched]) has no overhead rows: the figures are still drawn (a
    ZeroDivisionError here failed the serving phase before it wrote its result)."""
    recs = [{"engine": "batched", "n_adapters": 2, "batch_size": b, "seq_len": 8, "cuda_graph": False,
             "latency_ms": {"p50": 1.0 * b, "p95": 1.5 * b, "mean": 1.1 * b}, "peak_memory_bytes": None,
             "weights_bytes": None} for b in (1, 2)]
    files = figures.serving_figures({"records": recs, "device": "cpu", "dtype": "float32"}, {"rows": []}, tmp_path)
    assert {Path(f).name for f in files} >= {"overhead_vs_adapters.png", "latency_vs_batch.png", "memory.png"}


def test_figures_use_their_own_style(drawn):
    kept, _ = drawn
    for name, fig in kept.items():
        for ax in fig.axes:
            if ax.get_label() == "<colorbar>":
                continue
            assert ax.get_facecolor()[:3] == (1.0, 1.0, 1.0), name
            assert not any(g.get_visible() for g in ax.get_xgridlines() + ax.get_ygridlines()), name


def test_figure_text_labels_and_layout(drawn):
    kept, small = drawn
    texts = [t.get_text() for f in kept.values() for t in f.findobj(lambda o: hasattr(o, "get_text"))]
    assert not any("−-" in t or "--" in t for t in texts)
    assert any("reduction −118%" in t for t in texts)
    # a task whose decision the report withholds (a failed run) says so on its panel, as the report does
    titles = [ax.get_title() for ax in kept["lora_vs_full"].axes]
    rte = next(t for t in titles if t.startswith("rte"))
    assert "H1b: no verdict (lora/seed2024 failed)\nrule outcome: " in rte
    assert "*" not in rte and "n.s." not in rte  # no significance mark on a withheld decision
    assert not any("no verdict" in t for t in titles if not t.startswith("rte"))
    # every panel of the cosine figure has a y label
    assert all(ax.get_ylabel() for ax in kept["cka_vs_cosine"].axes)
    # the small task's curves and bars fill their own panel (no axis shared with a 100x larger task)
    for name in ("drift_profiles", "lora_vs_full"):
        ax = kept[name].axes[1]
        top = max(small["profiles"]["full"]["drift"]["mean"]) if name == "drift_profiles" else \
            small["profiles"]["full"]["whole_model_drift"]["mean"]
        assert top > 0.3 * ax.get_ylim()[1], name
    # suptitles sit above the panel titles
    for name in ("drift_profiles", "cka_vs_cosine", "lora_vs_full"):
        sup, titles = kept[name].extents
        assert titles and not any(sup.overlaps(t) for t in titles), name


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return shutil.which(name)
    return None


IMG_PROBE = """<script>
window.addEventListener("load", () => {
  document.body.setAttribute("data-images", JSON.stringify(
    Array.from(document.images).map(i => ({alt: i.alt, width: i.naturalWidth, height: i.naturalHeight}))));
});
</script></body>"""


def _browser_images(html: Path, tmp_path: Path) -> list[dict]:
    """Load a copy of the HTML report (plus a small probe script) in headless Chromium; every <img>'s natural
    size after the page has loaded (0 = the image did not load)."""
    page = tmp_path / "probe.html"
    page.write_text(html.read_text().replace("</body>", IMG_PROBE))
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    r = subprocess.run([_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=10000",
                        "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "HOME": str(tmp_path)})
    m = re.search(r'data-images="([^"]*)"', r.stdout)
    assert m, f"no probe result from chromium (rc {r.returncode}): {r.stderr[-2000:]}"
    import html as H

    return json.loads(H.unescape(m.group(1)))


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (.ci/run installs it: apt-get install "
                                                "chromium); the browser rendering test needs it")
def test_every_figure_loads_in_a_browser(study, tmp_path):
    md = (study / build.REPORT).read_text()
    expected = re.findall(r"!\[([^\]]+)\]\(([^)]+\.png)\)", md)
    assert len(expected) == 7  # 4 drift + 3 serving figures
    imgs = _browser_images(study / "ANALYSIS_REPORT.html", tmp_path)
    assert [i["alt"] for i in imgs] == [alt for alt, _ in expected]
    assert all(i["width"] > 0 and i["height"] > 0 for i in imgs), imgs
    # the check can fail: a figure whose data does not decode does not load
    broken = tmp_path / "broken.html"
    text = (study / "ANALYSIS_REPORT.html").read_text()
    broken.write_text(text.replace("data:image/png;base64,iVBOR", "data:image/png;base64,AAAAA", 1))
    sub = tmp_path / "b"
    sub.mkdir()
    widths = [i["width"] for i in _browser_images(broken, sub)]
    assert widths[0] == 0 and all(w > 0 for w in widths[1:])


# -- run_summary across passes, CLI help, config errors -------------------------------------------------------------
def test_resume_pass_keeps_the_timings_of_the_pass_that_did_the_work(copy, glue_dir):
    first = json.loads((copy / "run_summary.json").read_text())["phases"]
    r = _cli("run", TINY, "--data-dir", glue_dir, *_sets(f"output_dir={copy}"))
    assert r.exit_code == 0, r.output
    again = json.loads((copy / "run_summary.json").read_text())["phases"]
    for ph in ("sanity", "baselines", "tune", "train", "extract", "serve"):
        assert again[ph]["seconds"] == first[ph]["seconds"] and again[ph]["skipped_this_pass"], ph
    assert "skipped_this_pass" not in again["drift"]  # recomputed every pass: its own time
    # a pass of one phase keeps the others' records
    r = _cli("run", TINY, "--data-dir", glue_dir, "--only", "report", *_sets(f"output_dir={copy}"))
    assert r.exit_code == 0, r.output
    assert json.loads((copy / "run_summary.json").read_text())["phases"]["train"] == again["train"]


def test_phase_options_list_the_phases():
    from lorastudy.pipeline import PHASES

    out = re.sub(r"[\s│]+", " ", _cli("run", "--help").output)
    assert " | ".join(PHASES) in out


def test_unknown_task_error_names_it_without_dumping_the_config():
    r = _cli("config", "show", TINY, "--set", "tasks=[nope]")
    assert r.exit_code == 2 and "unknown task(s) ['nope']" in r.output
    assert "output_dir" not in r.output and len(r.output) < 400, r.output


def test_config_comments_name_files_that_exist():
    for cfg in (REPO / "configs").glob("*.yaml"):
        for name in re.findall(r"#.*?([\w./-]+\.(?:md|yaml|py))\b", cfg.read_text()):
            assert (REPO / name).is_file() or (cfg.parent / name).is_file(), f"{cfg.name} names {name}"


def test_recorded_config_round_trips(study):
    rec = build.recorded_config(study)
    assert rec.hash() == json.loads((study / "manifest.json").read_text())["config_hash"]
    assert rec.out == study
    assert config_differences(load_config(TINY, [*SMALL, f"output_dir={study}"]), rec) == [
        f"data.source: given 'hub', recorded {yaml.safe_load((study / 'config.yaml').read_text())['data']['source']!r}"]
