"""The baselines as the paper sets them up, on data in the raw Taobao-MM schema generated with a
known click model (``bench.taobao_mm_synth``): the click signal sits in long-term categories the
last 50 behaviours mostly miss. SIM-hard with the paper's ESU (SA-TA + SimTier over the multimodal
similarities of what it retrieved) must beat the ID-only strawman (``--esu ta``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.taobao_mm_synth import SynthConfig, generate
from muse.settings import Settings, load_settings


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread: None) -> None:
    """One intra-op thread for the whole module (the shared fixture in conftest)."""


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, dict]:
    from muse import db
    from muse.data.taobao_mm import import_taobao_mm

    root = tmp_path_factory.mktemp("synth")
    settings = load_settings(env={}, data_dir=root / "muse-data", device="cpu")
    db.upgrade(settings)
    info = generate(root / "raw", SynthConfig(n_users=200, n_items=3000, hist_old=150, seed=3))
    import_taobao_mm(settings, root / "raw", name="tb-synth")
    return settings, info


def test_generator_writes_the_raw_schema_and_the_oracle(synth, tmp_path: Path) -> None:
    from muse.data.format import Dataset

    settings, info = synth
    ds = Dataset.open(settings, "tb-synth")
    assert ds.meta["n_test_users_extending_train"] == 200 and ds.meta["n_test_user_aliases"] == 0
    assert ds.meta["embeddings"]["scl-taobao"]["dim"] == 32
    assert info["older_long_term_share"] > 0.8 and info["recent50_long_term_share"] < 0.15
    assert 0.65 < info["oracle"]["test"]["gauc"] < 0.85


def test_sim_hard_with_the_papers_esu_beats_the_id_only_esu(synth) -> None:
    from indexer.item_vectors import item_vectors
    from muse.data.taobao_mm import SCL_SOURCE
    from ranker.train import RankTrainConfig, train

    settings, info = synth
    cfg = RankTrainConfig(batch_size=100, seed=0)
    paper = train(settings, "sim-hard", "tb-synth", source=SCL_SOURCE, train_config=cfg, record=False,
                  vectors=item_vectors(settings, SCL_SOURCE, "tb-synth"))
    classic = train(settings, "sim-hard", "tb-synth", esu="ta", train_config=cfg, record=False)
    g_paper, g_ta = paper.metrics["overall"]["gauc"], classic.metrics["overall"]["gauc"]
    print(f"sim-hard GAUC paper ESU {g_paper:.4f}, --esu ta {g_ta:.4f}, oracle {info['oracle']['test']['gauc']:.4f}")
    assert g_paper > g_ta + 0.03, (g_paper, g_ta)
    assert g_paper < info["oracle"]["test"]["gauc"] + 0.02  # nobody beats the Bayes oracle by more than noise
