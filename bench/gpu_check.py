"""The GPU paths on a CUDA device, in one short run: the GSU kernels at serving size (one user's
100K-behaviour history in each storage dtype, and the training-time batched search) against an exact
float64 reference, and a ranker's training and evaluation on CUDA beside the same on the CPU.

Prints tables (``--json`` for a script). Needs only torch, numpy, pyarrow, pandas and tqdm, so it runs
on a bare accelerator machine from the source tree:

    python -m bench.gpu_check --out /tmp/gpu-check          # device: cuda (refuses to run without one)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _timed(fn: Any, repeats: int, device: torch.device) -> tuple[float, Any]:
    """Median wall time (ms) of ``fn()`` over ``repeats`` runs after two warm-ups, and its last result."""
    out = None
    for _ in range(2):
        out = fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times), out


def gsu_rows(device: torch.device, repeats: int) -> list[dict[str, Any]]:
    """Serving: one history of 100K behaviours, 1/64/512 targets, each storage dtype; training: a
    batch of 256 users x 1,000 behaviours. Recall@50 and score error against float64."""
    from retriever.kernels import gsu_topk, l2_normalise, quantise_int8

    rows: list[dict[str, Any]] = []
    g = torch.Generator().manual_seed(0)
    d, length, k = 128, 100_000, 50
    history = l2_normalise(torch.randn(length, d, generator=g))
    targets_all = l2_normalise(torch.randn(512, d, generator=g))
    exact = (targets_all.double() @ history.double().T).topk(k, dim=1)
    for dtype in ("float32", "bfloat16", "float16", "int8"):
        scale = None
        if dtype == "int8":
            q, scale = quantise_int8(history)
            hist = q.to(device)
            scale = scale.to(device)
        else:
            hist = history.to(getattr(torch, dtype)).to(device)
        for b in (1, 64, 512):
            tg = targets_all[:b].to(device)
            ms, top = _timed(lambda tg=tg, hist=hist, scale=scale: gsu_topk(
                tg, hist, k, normalised=True, history_scale=scale), repeats, device)
            idx = top.indices.cpu()
            recall = np.mean([len(set(idx[i].tolist()) & set(exact.indices[i].tolist())) / k for i in range(b)])
            err = float((top.scores.cpu().double() - exact.values[:b]).abs().max())
            rows.append({"what": "serving", "dtype": dtype, "targets": b, "history": length, "ms": round(ms, 3),
                         "recall@50": round(float(recall), 4), "max_score_err": err})
    n, length_t = 256, 1_000
    hist_b = l2_normalise(torch.randn(n, length_t, d, generator=g))
    tg_b = l2_normalise(torch.randn(n, d, generator=g))
    ref = torch.einsum("nd,nld->nl", tg_b.double(), hist_b.double()).topk(k, dim=1)
    hb, tb = hist_b.to(device), tg_b.to(device)
    ms, top = _timed(lambda: gsu_topk(tb, hb, k, normalised=True), repeats, device)
    same = float((top.indices.cpu().sort(dim=1).values == ref.indices.sort(dim=1).values).float().mean())
    rows.append({"what": "training batch", "dtype": "float32", "targets": n, "history": length_t, "ms": round(ms, 3),
                 "recall@50": round(same, 4),
                 "max_score_err": float((top.scores.cpu().double() - ref.values).abs().max())})
    return rows


def ranker_rows(device: torch.device, out: Path, users: int, steps: int) -> list[dict[str, Any]]:
    """MUSE (multimodal GSU, SA-TA + SimTier) trained ``steps`` steps and evaluated on the test split,
    on ``device`` and on the CPU, from the same raw-schema data (int8 SCL vectors memory-mapped)."""
    from dataclasses import dataclass

    from bench.taobao_mm_synth import SynthConfig, generate
    from muse.data.taobao_mm import import_taobao_mm
    from muse.settings import load_settings
    from ranker.data import iter_impression_batches, open_builder
    from ranker.evaluate import evaluate, train_item_counts
    from ranker.models import FeatureSpec, build_model, make_config
    from ranker.train import RankTrainConfig, train_steps

    raw = out / "raw"
    if not raw.exists():
        generate(raw, SynthConfig(n_users=users))
    settings = load_settings(env={}, data_dir=out / "data", device="cpu")
    ds = import_taobao_mm(settings, raw, name="gpu-check", register=False)
    shipped = ds.embeddings("scl-taobao")

    @dataclass(frozen=True)
    class Vectors:
        item_ids: np.ndarray
        vectors: np.ndarray
        present: np.ndarray
        scale: float | None

    vectors = Vectors(shipped.item_ids, shipped.vectors, np.ones(len(shipped.item_ids), bool), shipped.scale)
    rows = []
    for dev in (device, torch.device("cpu")):
        torch.manual_seed(0)
        config = make_config("muse")
        builder = open_builder(ds, "multimodal", config, vectors)
        model = build_model("muse", FeatureSpec(builder.space.vocab_sizes(), builder.space.user_fields), config).to(dev)
        cfg = RankTrainConfig(batch_size=256, seed=0)
        batches = iter_impression_batches(ds, "train", cfg.batch_size, shuffle=True, seed=0, limit=steps * cfg.batch_size)
        losses, n, seconds = train_steps(model, builder, batches, cfg)
        started = time.perf_counter()
        metrics = evaluate(model, builder, ds, "test", 1024, None, train_item_counts(ds, builder.space))
        rows.append({"device": str(dev), "steps": len(losses), "samples_per_s": round(n / max(seconds, 1e-9)),
                     "first_loss": round(losses[0], 4), "last_loss": round(float(np.mean(losses[-10:])), 4),
                     "test_gauc": round(metrics["overall"]["gauc"], 4), "test_auc": round(metrics["overall"]["auc"], 4),
                     "eval_s": round(time.perf_counter() - started, 2)})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/muse-gpu-check", help="folder for the generated data")
    p.add_argument("--device", default="cuda")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--users", type=int, default=2_000, help="users of the generated raw-schema data")
    p.add_argument("--steps", type=int, default=300, help="training steps of the ranker check")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device")
        return 2
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                              "torch": torch.__version__}
    report["gsu"] = gsu_rows(device, args.repeats)
    report["ranker"] = ranker_rows(device, Path(args.out), args.users, args.steps)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"device: {report['device']}, torch {report['torch']}")
    print(f"{'GSU':<16}{'dtype':<10}{'targets':>8}{'history':>9}{'ms':>10}{'recall@50':>11}{'max err':>10}")
    for r in report["gsu"]:
        print(f"{r['what']:<16}{r['dtype']:<10}{r['targets']:>8}{r['history']:>9}{r['ms']:>10.3f}"
              f"{r['recall@50']:>11.4f}{r['max_score_err']:>10.2e}")
    print(f"\n{'ranker':<8}{'steps':>6}{'samples/s':>11}{'first loss':>11}{'last loss':>10}{'GAUC':>8}{'AUC':>8}{'eval s':>8}")
    for r in report["ranker"]:
        print(f"{r['device']:<8}{r['steps']:>6}{r['samples_per_s']:>11}{r['first_loss']:>11}{r['last_loss']:>10}"
              f"{r['test_gauc']:>8}{r['test_auc']:>8}{r['eval_s']:>8}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
