import numpy as np
import pytest
import torch

from lorastudy import data as D
from lorastudy import modeling as M
from lorastudy import representations as RP
from lorastudy import similarity as S
from lorastudy.config import load_config
from tests.conftest import REPO

TEXTS = ["a b c", "a longer sentence with more bytes in it", "mid size text", "x", "another one here",
         "sixth example", "seven", "the eighth input"]


@pytest.fixture(scope="module")
def model_tok():
    cfg = load_config(None)
    m, tok = M.load_base(cfg.model, 2, seed=0)
    return m.eval(), tok


def test_layers_and_shapes(model_tok):
    m, tok = model_tok
    ids = [tok(t)["input_ids"] for t in TEXTS]
    reps = RP.extract(m, tok, ids, batch_size=3)
    L = m.config.num_hidden_layers + 2
    assert reps["layer_names"][0] == "embeddings" and reps["layer_names"][-1] == "final_norm"
    assert reps["last"].shape == (L, len(TEXTS), m.config.hidden_size) == reps["mean"].shape


def test_padding_side_and_batch_size_do_not_change_vectors(model_tok):
    m, tok = model_tok
    ids = [tok(t)["input_ids"] for t in TEXTS]
    a = RP.extract(m, tok, ids, padding_side="right", batch_size=8)
    b = RP.extract(m, tok, ids, padding_side="left", batch_size=3)
    c = RP.extract(m, tok, ids, padding_side="right", batch_size=1)
    for p in ("last", "mean"):
        np.testing.assert_allclose(a[p], b[p], atol=2e-5)
        np.testing.assert_allclose(a[p], c[p], atol=2e-5)


def test_last_token_is_what_the_classifier_reads(model_tok):
    m, tok = model_tok
    ids = [tok(t)["input_ids"] for t in TEXTS]
    reps = RP.extract(m, tok, ids)
    with torch.no_grad():
        logits = M.classifier_logits(m, D.collate(ids, tok.pad_token_id))
    np.testing.assert_allclose(reps["last"][-1] @ m.score.weight.detach().numpy().T, logits.numpy(), atol=1e-5)


def test_mean_pool_excludes_bos_and_pads():
    h = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    ids = torch.tensor([[1, 7, 8, 2], [2, 1, 9, 9]])  # bos=1 first real token in both rows
    last, mean = RP.pool(h, mask, ids, bos_id=1)
    assert last[:, 0].tolist() == [2.0, 7.0]
    assert mean[:, 0].tolist() == [1.5, 6.5]


def test_model_vs_itself_has_cka_one_at_every_layer(model_tok, tmp_path):
    m, tok = model_tok
    ids = [tok(t)["input_ids"] for t in TEXTS]
    a = RP.extract(m, tok, ids)
    RP.save(tmp_path / "r.safetensors", a, {"model": "tiny", "probe_hash": "h"})
    b, meta = RP.load(tmp_path / "r.safetensors")
    assert meta["probe_hash"] == "h" and meta["layer_names"] == a["layer_names"]
    for li in range(a["last"].shape[0]):
        assert S.linear_cka(a["last"][li], b["last"][li], debiased=True) == pytest.approx(1.0, abs=1e-6)


def test_extract_study_announces_the_rows_it_will_extract(tiny_cfg):
    """The progress bar gets a total (for its ETA) equal to the rows then extracted; finished files count zero."""
    cfg = load_config(REPO / "configs" / "tiny.yaml",
                      [f"data.source={tiny_cfg.data.source}", f"output_dir={tiny_cfg.output_dir}", "tasks=[rte]"])
    totals, rows = [], []
    res = RP.extract_study(cfg, progress=rows.append, log=lambda *_: None, set_total=totals.append)
    assert res["extracted"] == ["rte/base"] and len(res["missing_runs"]) == len(cfg.methods) * len(cfg.seeds)
    assert totals == [sum(rows)] and sum(rows) > 0  # no phase-2 run: the base model's probe rows only
    totals, rows = [], []
    res = RP.extract_study(cfg, progress=rows.append, log=lambda *_: None, set_total=totals.append)
    assert res["skipped_existing"] == ["rte/base"] and totals == [0] and rows == []
