"""A comparison's files: a Markdown table, a JSON and a chart kept under the comparison's id (a second
comparison of the same dataset never overwrites the first), the chart with a colour per source and a
legend naming them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colors

from ranker.compare import NO_SOURCE_COLOUR, render_table, source_colours, write_comparison


def _result(comparison_id: int, gaucs: list[float]) -> dict:
    def cell(model: str, source: str | None, g: float, under: list[str] | None = None) -> dict:
        spread = {"mean": g, "std": 0.01, "n": 2, "values": [g - 0.01, g + 0.01]}
        return {"model": model, "esu": "sa-ta+simtier", "source": source, "runs": [1, 2], "seeds": [0, 1],
                "reused": 0, "undertrained": under or [],
                "metrics": {k: spread for k in ("gauc", "auc", "logloss", "gauc_long_tail", "gauc_long_history")}}

    return {"id": comparison_id, "spec": {"dataset": "d", "seeds": [0, 1], "train": {"batch_size": None},
                                          "schedule": {"batch_size": 100, "steps_per_epoch": 100}},
            "cells": [cell("din", None, gaucs[0]), cell("muse", "scl", gaucs[1]),
                      cell("muse", "id", gaucs[2], ["undertrained: test logloss 0.7 is no better than 0.6"])],
            "intrinsic": {"scl": {"version": 2, "eval": None}}}


def _has_colour(pixels: np.ndarray, name: str) -> bool:
    rgb = np.asarray(colors.to_rgb(name))
    return bool((np.abs(pixels[..., :3] - rgb).max(axis=-1) < 0.02).sum() > 200)


def test_files_under_the_id_a_markdown_table_and_a_colour_per_source(tmp_path: Path) -> None:
    import matplotlib.image

    first = write_comparison(_result(1, [0.6, 0.7, 0.65]), tmp_path, extra=["best: muse on scl"])
    second = write_comparison(_result(2, [0.55, 0.5, 0.52]), tmp_path)
    assert [p.name for p in first] == ["comparison-1.md", "comparison-1.json", "comparison-1.png"]
    assert [p.name for p in second] == ["comparison-2.md", "comparison-2.json", "comparison-2.png"]
    assert first[2].read_bytes() != second[2].read_bytes()  # the first chart is still the first's

    md = first[0].read_text().splitlines()
    assert md[0] == "# Comparison 1: d" and md[-1] == "- best: muse on scl"
    header = md.index("| model (ESU) | source | GAUC | AUC | logloss | GAUC long-tail | GAUC long-history | runs | note |")
    assert md[header + 1] == "|---|---|---|---|---|---|---|---|---|"
    assert md[header + 2].startswith("| din (sa-ta+simtier) | - | 0.6000 ± 0.0100 |")
    assert md[header + 4].endswith("| 1 of 2 runs undertrained (test logloss 0.7 is no better than 0.6) |")
    assert "batch 100 (100 steps per epoch)" in render_table(_result(1, [0.6, 0.7, 0.65]))

    palette = source_colours(_result(1, [0.6, 0.7, 0.65])["cells"])
    assert palette[None] == NO_SOURCE_COLOUR and len(set(palette.values())) == 3
    pixels = matplotlib.image.imread(first[2])
    for name in palette.values():  # every source's colour is on the chart (bars and legend)
        assert _has_colour(pixels, name), name
