"""The whole-history searches run in row chunks (``ranker.layers.rows``) for speed: the result must be
the one of the whole batch at once, whatever the chunk size, and equal the plain formulation."""

from __future__ import annotations

import pytest
import torch

import ranker.layers.rows as rows_mod
from muse.settings import Settings, load_settings
from ranker.layers.attention import MASK_LOGIT
from ranker.layers.rows import chunked, row_chunks
from retriever.kernels import gsu_topk


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread: None) -> None:
    """One intra-op thread for the whole module (the shared fixture in conftest)."""


def test_row_chunks_cover_every_row_once() -> None:
    assert [(s.start, s.stop) for s in row_chunks(10, 100, budget=300)] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert [(s.start, s.stop) for s in row_chunks(3, 10**9, budget=1)] == [(0, 1), (1, 2), (2, 3)]
    assert [(s.start, s.stop) for s in row_chunks(0, 100)] == [(0, 0)]  # an empty batch: one empty chunk
    assert [(s.start, s.stop) for s in row_chunks(10, 100, budget=300, device=torch.device("meta"))] == [(0, 10)]
    assert len(list(row_chunks(10, 100, budget=300, device=torch.device("cpu")))) == 4
    x = torch.arange(12.0).view(6, 2)
    top = chunked(6, 8, lambda r: gsu_topk(x[r], x[r].unsqueeze(1).expand(-1, 3, -1), 2), budget=16)
    whole = gsu_topk(x, x.unsqueeze(1).expand(-1, 3, -1), 2)
    assert type(top) is type(whole) and all(torch.equal(a, b) for a, b in zip(top, whole, strict=True))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, str]:
    from bench.ranker import make_dataset
    from muse import db

    settings = load_settings(env={}, data_dir=tmp_path_factory.mktemp("chunks") / "muse-data", device="cpu")
    db.upgrade(settings)
    return settings, make_dataset(settings, n_users=40, n_items=600, history=120, n_impressions=400, dim=8)


def _batch(world, name: str, **overrides):
    from bench.ranker import SOURCE
    from indexer.item_vectors import item_vectors
    from muse.data.format import Dataset
    from ranker.data import iter_impression_batches, open_builder
    from ranker.models import FeatureSpec, build_model, make_config, model_class

    settings, dataset = world
    ds = Dataset.open(settings, dataset)
    config = make_config(name, k=16, recent_len=10, tower=(16, 8), **overrides)
    builder = open_builder(ds, model_class(name).retrieval, config, item_vectors(settings, SOURCE, ds))
    raw = next(iter_impression_batches(ds, "train", 48, shuffle=True))
    hist_lens = raw["hist_len"].copy()
    hist_lens[::3] = 7  # short histories too: fewer valid behaviours than K
    torch.manual_seed(0)
    model = build_model(name, FeatureSpec(builder.space.vocab_sizes(), builder.space.user_fields), config).eval()
    return builder, model, raw, hist_lens


def _with_budget(monkeypatch: pytest.MonkeyPatch, budget: int, fn):
    monkeypatch.setattr(rows_mod, "CHUNK_BYTES", budget)
    return fn()


@pytest.mark.parametrize("name", ["sim-soft", "twin", "muse"])
def test_chunked_search_equals_the_whole_batch(world, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    builder, model, raw, hist_lens = _batch(world, name)

    def run():
        batch = builder.build(raw["user_id"], raw["item_id"], hist_lens)
        with torch.no_grad():
            target = model.embeddings.seq(batch["target"][:, :2])
            got = model.retrieve(batch, target)
        return batch, got

    (b1, one_row), (b2, whole) = (_with_budget(monkeypatch, 1, run), _with_budget(monkeypatch, 1 << 40, run))
    for key in b1:
        assert torch.equal(b1[key], b2[key]), key  # the pipeline's GSU and cosines
    assert torch.equal(one_row.mask, whole.mask)
    assert torch.equal(one_row.ids[one_row.mask], whole.ids[whole.mask])
    assert torch.equal(one_row.sim[one_row.sim_mask], whole.sim[whole.sim_mask])
    assert (~one_row.mask).any() and one_row.mask.any()  # the short histories left empty slots


def test_sim_soft_and_twin_search_as_written_in_the_paper(world) -> None:
    """The chunked searches return what the plain whole-batch formulation returns: SIM-soft the top K
    by cosine of the (item, category) embeddings, TWIN the top K of its ESU attention's logits."""
    for name in ("sim-soft", "twin"):
        builder, model, raw, hist_lens = _batch(world, name)
        batch = builder.build(raw["user_id"], raw["item_id"], hist_lens)
        ids, mask = batch["history"], batch["history_mask"]
        with torch.no_grad():
            target = model.embeddings.seq(batch["target"][:, :2])
            got = model.retrieve(batch, target)
            hist = model.embeddings.seq(ids)
            if name == "sim-soft":
                ref = gsu_topk(target, hist, 16, valid=mask)
                ref_idx, ref_ok = ref.indices, ref.valid
            else:
                logits = model.long_attention.logits(target, hist).masked_fill(~mask, MASK_LOGIT)
                ref_idx = logits.topk(16, dim=1).indices
                ref_ok = torch.gather(mask, 1, ref_idx)
        assert torch.equal(got.mask, ref_ok), name
        ref_ids = torch.gather(ids, 1, ref_idx.unsqueeze(-1).expand(-1, -1, 2))
        assert torch.equal(got.ids[got.mask], ref_ids[ref_ok]), name
