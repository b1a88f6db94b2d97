"""The explorer's web application (Flask, server-side Jinja2 templates, no JavaScript): read-only pages
over what :class:`muse_cli.explore.data.Explorer` reads.

URLs (stable, to be shared; docs/explore.md):

- ``/``: the data sets, their live sources and versions, links onward;
- ``/user?dataset=D&user=U&item=I&k=K``: the target item, then one column per live source with its top-K
  behaviours; without ``item`` the user's test impressions to pick from; without ``user`` example users;
- ``/sources?dataset=D[&items=I,J]``: each source's intrinsic metrics and nearest neighbours of a few items;
- ``/comparisons``, ``/comparison/N``: stored comparisons (``muse compare --list`` / ``--show N``);
- ``/run/N``: a ranker run and its options (``muse rank show N``);
- ``/image/D/I``: the image of item I of data set D (only that data set's own images).

A bad parameter renders the page's error box with the CLI's sentence (``error: ...``) and a 4xx status:
400 for a malformed value, 404 for an unknown data set, user, item, comparison or run. Milvus or the
database unreachable is a 503 with its sentence; anything else a 500 whose details go to the log, never
to the page.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from flask import Flask, Response, abort, render_template, request

from muse.errors import BackendUnavailable, ConfigurationError, DataError, MuseError, NotFoundError
from muse.settings import Settings, load_settings
from muse_cli.explore.data import (
    K_DEFAULT,
    K_MAX,
    MAX_SAMPLE_ITEMS,
    Explorer,
    parse_id_list,
    parse_int,
    parse_k,
)

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
#: Content-Security-Policy of every response: the pages load only this server's styles and images, run no
#: script, and cannot be framed.
CSP = ("default-src 'none'; img-src 'self'; style-src 'self'; base-uri 'none'; form-action 'self'; "
       "frame-ancestors 'none'")
IMAGE_TYPES = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF8", "image/gif"),
               (b"RIFF", "image/webp"))


def status_of(error: BaseException) -> int:
    """The HTTP status of an error: 404 for what does not exist, 400 for a bad value, 503 for an outage."""
    if isinstance(error, NotFoundError):
        return 404
    if isinstance(error, (ConfigurationError, DataError, ValueError)):
        return 400
    if isinstance(error, BackendUnavailable):
        return 503
    return 500


def create_app(settings: Settings | None = None, explorer: Explorer | None = None) -> Flask:
    """The Flask application over ``explorer`` (default: one over ``settings``, default the environment's)."""
    app = Flask("muse_cli.explore", template_folder=str(HERE / "templates"), static_folder=str(HERE / "static"))
    app.config["MAX_CONTENT_LENGTH"] = 1024  # read-only: no request carries a body
    ex = explorer or Explorer(settings or load_settings())
    app.extensions["muse_explorer"] = ex
    app.jinja_env.globals.update(K_DEFAULT=K_DEFAULT, K_MAX=K_MAX)
    app.jinja_env.filters["num"] = _num

    def page_error(e: BaseException) -> tuple[str, int]:
        status = status_of(e)
        if status == 500:
            from muse_cli.main import database_error_message

            message = database_error_message(e)
            if message is None:
                log.exception("explorer: %s %s failed", request.method, request.full_path)
                message = "the explorer failed on this page (the details are in its log)"
            else:
                status = 503
        else:
            message = str(e)
        return render_template("error.html", message=f"error: {message}", status=status), status

    @app.errorhandler(MuseError)
    def muse_error(e: MuseError) -> tuple[str, int]:
        return page_error(e)

    @app.errorhandler(404)
    def not_found(e: Any) -> tuple[str, int]:
        known = "/, /user, /sources, /comparisons, /comparison/N, /run/N"
        message = f"error: there is no page at {request.path}; the pages are {known}"
        return render_template("error.html", message=message, status=404), 404

    @app.errorhandler(405)
    def not_allowed(e: Any) -> tuple[str, int]:
        return render_template("error.html", message="error: the explorer is read-only (GET only)", status=405), 405

    @app.errorhandler(Exception)
    def any_error(e: Exception) -> tuple[str, int]:
        from werkzeug.exceptions import HTTPException

        if isinstance(e, HTTPException):
            return render_template("error.html", message=f"error: {e.description}", status=e.code), e.code or 500
        return page_error(e)

    @app.after_request
    def headers(resp: Response) -> Response:
        resp.headers["Content-Security-Policy"] = CSP
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["Referrer-Policy"] = "no-referrer"
        return resp

    @app.get("/")
    def index() -> str:
        return render_template("index.html", **ex.index())

    @app.get("/user")
    def user() -> str:
        args = request.args
        k = parse_k(args.get("k"))
        page = ex.user_page(args.get("dataset"), parse_int(args.get("user"), "user"),
                            parse_int(args.get("item"), "item"), k)
        return render_template("user.html", page=page)

    @app.get("/sources")
    def sources() -> str:
        items = parse_id_list(request.args.get("items"), "items", MAX_SAMPLE_ITEMS)
        return render_template("sources.html", page=ex.sources_page(request.args.get("dataset"), items))

    @app.get("/comparisons")
    def comparisons() -> str:
        return render_template("comparisons.html", comparisons=ex.comparisons())

    @app.get("/comparison/<raw_id>")
    def comparison(raw_id: str) -> str:
        number = parse_int(raw_id, "comparison id", lo=1)
        return render_template("comparison.html", c=ex.comparison(int(number or 0)))

    @app.get("/run/<raw_id>")
    def run(raw_id: str) -> str:
        number = parse_int(raw_id, "run id", lo=1)
        return render_template("run.html", **ex.run(int(number or 0)))

    @app.get("/image/<dataset>/<raw_item>")
    def image(dataset: str, raw_item: str) -> Response:
        # Only an item of a data set the explorer knows: a name outside the data sets' rules, another
        # folder, or anything but a decimal item id is a 404 (never a path opened on disk).
        try:
            item = parse_int(raw_item, "item")
            data = None if item is None else ex.view(dataset).image(item)
        except (NotFoundError, ConfigurationError, DataError):
            data = None
        if data is None:
            abort(404)
        mime = next((m for magic, m in IMAGE_TYPES if data.startswith(magic)), "application/octet-stream")
        resp = Response(data, mimetype=mime)
        resp.headers["Cache-Control"] = "private, max-age=3600"
        return resp

    return app


def _num(value: Any, digits: int = 4) -> str:
    """A metric for a table cell: ``-`` when absent, else ``digits`` decimals."""
    from jinja2 import Undefined

    if value is None or isinstance(value, Undefined):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def serve(host: str, port: int, settings: Settings | None = None, announce: Any = print) -> None:
    """Serve the explorer on ``host:port`` (threaded) until interrupted; ``port`` 0 picks a free one.
    ``announce`` gets the one line saying where."""
    from werkzeug.serving import make_server

    app = create_app(settings)
    server = make_server(host, port, app, threaded=True)
    try:
        shown = f"[{host}]" if ":" in host else host
        announce(f"muse explore: http://{shown}:{server.server_port}/ (read-only; Ctrl-C stops it)")
        server.serve_forever()
    finally:
        server.server_close()
        app.extensions["muse_explorer"].close()
