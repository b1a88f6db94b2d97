"""The retrieval explorer (``muse explore``) on a real tiny world: a simworld with ``id`` and ``scl`` trained
for a few steps and backfilled into Milvus Lite, a stored comparison of two real ranker runs, and the Flask
application served over HTTP by werkzeug in this process.

The browser tests drive the system Chromium (Debian's ``chromium`` and ``chromium-driver``) with Selenium:
they skip, saying why, where no Chromium is installed, and fail when ``CI`` is set (``.ci/run`` installs it).
A screenshot of the /user page is saved as ``.ci-work/explore-user.png`` for people to look at.
"""

from __future__ import annotations

import functools
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.explore import build_world
from muse.settings import Settings, load_settings

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / ".ci-work"
SOURCES = ("id", "scl")
K = 20  # behaviours per column in the browser tests (the page's default is 50)


@dataclass
class World:
    settings: Settings
    dataset: str
    user: int  # a test user with several test impressions
    items: list[int]  # that user's test impression items, clicked first
    comparison: int
    runs: list[int]
    truth: dict[int, int]  # item -> interest key (the generator's ground truth)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None) -> World:
    import pyarrow.parquet as pq

    from indexer.item_vectors import item_vectors
    from muse.data.format import Dataset
    from ranker.compare import compare
    from ranker.train import RankTrainConfig

    settings = load_settings(env={}, data_dir=tmp_path_factory.mktemp("explore") / "muse-data", device="cpu")
    name = build_world(settings, SOURCES)
    res = compare(settings, name, models=["din", "muse"], sources=["scl"], seeds=[0],
                  train_config=RankTrainConfig(max_train=512, max_eval=512), write_files=False,
                  vectors_for=functools.partial(item_vectors, settings),
                  config={"command": "muse compare", "file": None, "options": {"models": "din,muse", "max_train": 512}})
    ds = Dataset.open(settings, name)
    by_user: dict[int, list[tuple[int, int]]] = {}
    for b in ds.iter_impressions(split="test"):
        for u, i, label in zip(b.column("user_id").to_pylist(), b.column("item_id").to_pylist(), b.column("label").to_pylist()):
            by_user.setdefault(u, []).append((-label, i))
    user = max(by_user, key=lambda u: (len({i for _, i in by_user[u]}), -u))
    items = list(dict.fromkeys(i for _, i in sorted(by_user[user], key=lambda t: t[0])))
    t = pq.read_table(ds.truth_path("items"), columns=["item_id", "key"])
    truth = dict(zip(t.column("item_id").to_pylist(), t.column("key").to_pylist()))
    return World(settings, name, user, items, res.comparison_id, sorted({r.run_id for r in res.rows}), truth)


@pytest.fixture(scope="module")
def server(world: World) -> Iterator[str]:
    """The explorer served over HTTP on a free port of 127.0.0.1 (a thread of this process)."""
    from werkzeug.serving import make_server

    from muse_cli.explore.app import create_app

    app = create_app(world.settings)
    srv = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_port}"
    finally:
        srv.shutdown()
        thread.join(10)
        app.extensions["muse_explorer"].close()


@pytest.fixture(scope="module")
def retrievers(world: World) -> Iterator[dict[str, Any]]:
    """The public retriever of each source, opened by the test itself: what the columns must equal."""
    from retriever.client import Retriever

    opened = {s: Retriever.from_settings(s, world.settings, dataset=world.dataset) for s in SOURCES}
    try:
        yield opened
    finally:
        for r in opened.values():
            r.close()


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=60) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _raw(base: str, path: str) -> tuple[int, bytes]:
    """GET ``path`` sent as is (no client-side normalisation of ``..`` or percent escapes)."""
    parsed = urllib.parse.urlparse(base)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=30)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _user_url(base: str, world: World, **params: Any) -> str:
    return f"{base}/user?" + urllib.parse.urlencode({"dataset": world.dataset, **params})


# --- without a browser ------------------------------------------------------------------------------


def test_simtier_bars_hold_the_cosines_the_kernel_counts() -> None:
    import torch

    from muse_cli.explore.data import simtier_bars
    from retriever.kernels import simtier_counts

    cosines = [-1.0, -0.95, -0.1, 0.0, 0.05, 0.1, 0.1001, 0.55, 0.99, 1.0]
    counts = simtier_counts(torch.tensor([cosines]), torch.ones(1, len(cosines), dtype=torch.bool))[0]
    bars = simtier_bars(counts.tolist())
    assert len(bars) == 22 and sum(b.count for b in bars) == len(cosines) and max(b.height for b in bars) == 1.0
    for cos in cosines:
        tier = int(simtier_counts(torch.tensor([[cos]]), torch.ones(1, 1, dtype=torch.bool))[0].argmax())
        assert bars[tier].low < cos <= bars[tier].high + 1e-6, (cos, bars[tier])


def test_templates_and_styles_are_package_data() -> None:
    """An installed copy (not only this checkout) has every template and stylesheet the pages load."""
    import fnmatch

    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["muse_cli"]
    files = [p.relative_to(ROOT / "muse_cli").as_posix()
             for p in (ROOT / "muse_cli" / "explore").rglob("*") if p.is_file() and p.suffix != ".py"
             and "__pycache__" not in p.parts]
    assert files and all(any(fnmatch.fnmatch(f, g) for g in globs) for f in files), (files, globs)
    assert any(f.endswith("user.html") for f in files) and any(f.endswith(".css") for f in files)


def test_bad_parameters_give_the_sentence_and_a_4xx(server: str, world: World) -> None:
    d, u, i = world.dataset, world.user, world.items[0]
    cases = [
        (f"/user?dataset=nope-{d}&user={u}", 404, f"error: dataset 'nope-{d}' not found"),
        (f"/user?dataset={d}&user=999999", 404, f"error: dataset '{d}' has no user 999999 (its user ids run 1.."),
        (f"/user?dataset={d}&user=abc", 400, "error: user must be an integer, got 'abc'"),
        (f"/user?dataset={d}&user=1.5", 400, "error: user must be an integer, got '1.5'"),
        (f"/user?dataset={d}&user=-3", 404, f"error: dataset '{d}' has no user -3"),  # int64 ids may be negative
        (f"/user?dataset={d}&user={'9' * 30}", 400, "error: user must be an integer, got"),
        (f"/user?dataset={d}&user={u}&item=99999999", 404, f"error: dataset '{d}' has no item 99999999"),
        (f"/user?dataset={d}&user={u}&item=x1", 400, "error: item must be an integer, got 'x1'"),
        (f"/user?dataset={d}&user={u}&item={i}&k=0", 400, "error: k must be an integer in 1..200, got 0"),
        (f"/user?dataset={d}&user={u}&item={i}&k=201", 400, "error: k must be an integer in 1..200, got 201"),
        (f"/user?dataset={d}&user={u}&item={i}&k=ten", 400, "error: k must be an integer in 1..200, got 'ten'"),
        (f"/user?dataset={d}&item={i}", 400, "error: user is required when item is given"),
        ("/user", 400, "error: dataset is required"),
        ("/user?dataset=..%2F..%2Fetc", 400, "error: dataset name '../../etc' is invalid"),
        ("/sources?dataset=" + d + "&items=1,two", 400, "error: items must be an integer, got 'two'"),
        ("/sources?dataset=" + d + "&items=" + ",".join(["1"] * 9), 400, "error: items lists 9 ids; at most 8"),
        ("/comparison/abc", 400, "error: comparison id must be an integer in 1.."),
        ("/comparison/987654", 404, "error: comparison 987654 does not exist"),
        ("/run/0", 400, "error: run id must be an integer in 1.."),
        ("/run/987654", 404, "error: ranker run 987654 does not exist"),
        ("/no/such/page", 404, "error: there is no page at /no/such/page"),
    ]
    import html

    for path, status, sentence in cases:
        got, body = _get(server + path)
        assert got == status, (path, got, body[-500:])
        assert sentence in html.unescape(body), (path, html.unescape(body)[-800:])
        assert "Traceback" not in body and 'class="error"' in body


def test_pages_answer_and_are_read_only(server: str, world: World) -> None:
    status, body = _get(server + "/")
    assert status == 200 and world.dataset in body and "id v1" in body and "scl v1" in body
    status, body = _get(_user_url(server, world, user=world.user, item=world.items[0]))
    assert status == 200 and body.count('class="source"') == 2
    req = urllib.request.Request(server + "/", data=b"x=1", method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 405
    with urllib.request.urlopen(server + "/", timeout=30) as resp:
        assert "default-src 'none'" in resp.headers["Content-Security-Policy"]


def test_image_route_serves_only_the_datasets_own_images(server: str, world: World) -> None:
    from muse.data.format import Dataset

    item = world.items[0]
    status, data = _raw(server, f"/image/{world.dataset}/{item}")
    assert status == 200 and data == Dataset.open(world.settings, world.dataset).load_images([item])[item]
    assert data.startswith(b"\x89PNG")
    data_dir = world.settings.data_dir
    secrets = [p.read_bytes()[:64] for p in (data_dir / "muse.sqlite", data_dir / "datasets" / world.dataset / "meta.json")]
    attempts = [
        "/image/../muse.sqlite",
        "/image/..%2Fmuse.sqlite/1",
        f"/image/{world.dataset}/..%2Fmeta.json",
        f"/image/{world.dataset}/%2e%2e%2f%2e%2e%2fmuse.sqlite",
        f"/image/{world.dataset}/../../muse.sqlite",
        "/image/%2e%2e/1",
        "/image/..%5c..%5cmuse.sqlite/1",
        "/image/muse.sqlite/1",  # a file of the data folder used as a data set name
        "/image/datasets/1",
        f"/image//{data_dir}/muse.sqlite",
        f"/image/{world.dataset}/{item}%00.png",
        f"/image/{world.dataset}/-{item}",
        f"/image/{world.dataset}/987654321",  # not an item of the data set
        "/static/..%2F..%2F..%2Fmuse.sqlite",
        "/static/../../muse.sqlite",
    ]
    for path in attempts:
        status, body = _raw(server, path)
        assert status == 404, (path, status, body[:200])
        assert not any(s in body for s in secrets), path


def test_muse_explore_command_serves_on_localhost(world: World) -> None:
    env = {**os.environ, "MUSE_DATA_DIR": str(world.settings.data_dir), "MUSE_DEVICE": "cpu"}
    for var in ("MUSE_DATABASE_URL", "MUSE_MILVUS_URI", "MUSE_CONFIG"):
        env.pop(var, None)
    bad = subprocess.run([sys.executable, "-m", "muse_cli", "explore", "--port", "70000"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "error: --port 70000 must be in 0..65535" in bad.stderr, bad.stderr
    proc = subprocess.Popen([sys.executable, "-m", "muse_cli", "explore", "--port", "0"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("muse explore: http://127.0.0.1:"), line + (proc.stderr.read() if proc.poll() else "")
        base = line.split()[2].rstrip("/")
        status, body = _get(base + "/")
        assert status == 200 and world.dataset in body
        status, body = _get(f"{base}/user?dataset={world.dataset}&user=abc")
        assert status == 400 and "user must be an integer" in body
    finally:
        proc.terminate()
        proc.wait(30)


# --- in a real browser ------------------------------------------------------------------------------


def _require_chromium() -> tuple[str, str]:
    binary = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = shutil.which("chromedriver")
    try:
        import selenium  # noqa: F401
    except ImportError:
        driver = None
    if binary and driver:
        return binary, driver
    msg = ("no Chromium for the browser tests (install Debian's chromium and chromium-driver, and the "
           "`selenium` test extra)")
    if os.environ.get("CI"):
        pytest.fail(f"{msg}; CI is set: the browser tests must run")
    pytest.skip(msg)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium (the machine's own, no download) with a fresh profile and the network log on."""
    binary, driver_path = _require_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="muse-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1500,1400", f"--user-data-dir={profile}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _status(driver: Any, url: str) -> int | None:
    """The HTTP status of the last document the browser loaded from ``url`` (from its network log)."""
    status = None
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg.get("method") == "Network.responseReceived" and msg["params"].get("type") == "Document":
            if msg["params"]["response"]["url"] == url:
                status = msg["params"]["response"]["status"]
    return status


def _columns(driver: Any) -> dict[str, dict[str, Any]]:
    """What the page shows per source: item ids, positions, cosines, marks and precision (from the DOM)."""
    return driver.execute_script("""
        const out = {};
        for (const col of document.querySelectorAll('section.source')) {
            const hits = [...col.querySelectorAll('li.hit')];
            out[col.dataset.source] = {
                version: col.dataset.version, precision: col.dataset.precision,
                items: hits.map(h => Number(h.dataset.item)), positions: hits.map(h => Number(h.dataset.position)),
                scores: hits.map(h => Number(h.dataset.score)), shared: hits.map(h => h.dataset.shared),
                marks: hits.map(h => h.querySelector('.mark') !== null),
                error: (col.querySelector('.error') || {}).textContent || null};
        }
        return out;""")


def _broken_images(driver: Any) -> list[str]:
    return driver.execute_script(
        "return [...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src);")


def _check_columns(driver: Any, world: World, retrievers: dict[str, Any], item: int) -> dict[str, Any]:
    shown = _columns(driver)
    assert sorted(shown) == sorted(SOURCES), shown.keys()
    for source, col in shown.items():
        assert col["error"] is None, col["error"]
        want = retrievers[source].search(world.user, [item], k=K)
        assert col["version"] == str(want.version)
        assert col["items"] == want[0].behaviour_item_ids.tolist(), source
        assert col["positions"] == want[0].positions.tolist(), source
        np.testing.assert_allclose(col["scores"], want[0].scores, atol=1e-5)
        shared = [world.truth[i] == world.truth[item] for i in col["items"]]
        assert col["shared"] == [str(int(s)) for s in shared] and col["marks"] == shared, source
        assert float(col["precision"]) == pytest.approx(sum(shared) / len(shared), abs=1e-4)
    return shown


def test_user_page_in_the_browser(browser: Any, server: str, world: World, retrievers: dict[str, Any]) -> None:
    item = world.items[0]
    url = _user_url(server, world, user=world.user, item=item, k=K)
    browser.get_log("performance")  # drop what earlier pages logged
    browser.get(url)
    assert _status(browser, url) == 200
    assert browser.title.startswith(f"user {world.user} · {world.dataset}")
    target = browser.find_element("css selector", "section.target")
    assert target.get_attribute("data-item") == str(item)
    assert "interest (ground truth)" in target.text
    _check_columns(browser, world, retrievers, item)
    images = browser.execute_script("return document.images.length")
    assert images >= 1 + len(SOURCES) * K  # the target, every column's thumbnails, the impressions to pick
    assert _broken_images(browser) == []
    assert len(browser.find_elements("css selector", "figure.simtier svg rect")) == len(SOURCES) * 22
    SCREENSHOTS.mkdir(exist_ok=True)
    shot = SCREENSHOTS / "explore-user.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000


def test_choosing_another_target_changes_the_columns(browser: Any, server: str, world: World,
                                                     retrievers: dict[str, Any]) -> None:
    first = world.items[0]
    browser.get(_user_url(server, world, user=world.user, item=first, k=K))
    before = _columns(browser)
    others = [int(a.get_attribute("data-item")) for a in browser.find_elements("css selector", "a.pick")]
    different = [i for i in others if i != first and
                 retrievers["scl"].search(world.user, [i], k=K)[0].behaviour_item_ids.tolist() != before["scl"]["items"]]
    assert different, f"no other test impression of user {world.user} retrieves differently from item {first}"
    browser.find_element("css selector", f'a.pick[data-item="{different[0]}"]').click()
    deadline = time.monotonic() + 30
    while browser.find_element("css selector", "section.target").get_attribute("data-item") != str(different[0]):
        assert time.monotonic() < deadline, "the target did not change"
        time.sleep(0.05)
    after = _check_columns(browser, world, retrievers, different[0])
    assert after["scl"]["items"] != before["scl"]["items"]
    assert f"item={different[0]}" in browser.current_url and _broken_images(browser) == []


def test_bad_user_in_the_browser_shows_the_sentence_and_a_4xx(browser: Any, server: str, world: World) -> None:
    for user, status, sentence in ((999999, 404, f"error: dataset '{world.dataset}' has no user 999999"),
                                   ("12ab", 400, "error: user must be an integer, got '12ab'")):
        url = _user_url(server, world, user=user, item=world.items[0])
        browser.get_log("performance")
        browser.get(url)
        assert _status(browser, url) == status
        shown = browser.find_element("css selector", "p.error").text
        assert shown.startswith(sentence), shown
        assert "Traceback" not in browser.page_source


def test_index_sources_comparison_and_run_pages_in_the_browser(browser: Any, server: str, world: World) -> None:
    browser.get(server + "/")
    row = browser.find_element("css selector", f'tr[data-dataset="{world.dataset}"]')
    assert "id v1" in row.text and "scl v1" in row.text
    row.find_element("link text", "sources").click()
    assert browser.find_element("tag name", "h1").text == f"Sources of {world.dataset}"
    assert {r.get_attribute("data-source") for r in browser.find_elements("css selector", "table.metrics tr[data-source]")} == set(SOURCES)
    cells = browser.find_elements("css selector", "td.nn")
    assert cells and all(len(c.find_elements("css selector", ".nb")) == 6 for c in cells)
    assert _broken_images(browser) == []
    browser.save_screenshot(str(SCREENSHOTS / "explore-sources.png"))

    browser.get(server + "/comparisons")
    browser.find_element("link text", str(world.comparison)).click()
    assert browser.find_element("tag name", "h1").text.startswith(f"Comparison {world.comparison}")
    assert len(browser.find_elements("css selector", "svg.gauc rect")) == 2
    table = browser.find_element("css selector", "table.cells").text
    assert "din (ta+simtier)" in table and "muse (sa-ta+simtier)" in table
    assert 'models = "din,muse"' in browser.find_element("tag name", "pre").text
    browser.find_element("css selector", f'a.run[href="/run/{world.runs[0]}"]').click()
    assert browser.find_element("tag name", "h1").text == f"Ranker run {world.runs[0]}"
    assert "max_train = 512" in browser.page_source
