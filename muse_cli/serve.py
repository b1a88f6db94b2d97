"""``muse serve``: the GSU retrieval service (gRPC, health, Prometheus metrics) for one source."""

from __future__ import annotations

import argparse
import signal
import threading


def _bytes(raw: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    s = raw.strip().lower().rstrip("b").rstrip("i")
    try:
        if s and s[-1] in units:
            return int(float(s[:-1]) * units[s[-1]])
        return int(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--cache-bytes must be a size such as 4G or 512M, got {raw!r}") from e


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the GSU retrieval service (gRPC) for one embedding source")
    p.add_argument("--dataset", required=True, help="dataset whose collections are served (its items are preloaded)")
    p.add_argument("--source", required=True, help="embedding source, e.g. scl")
    p.add_argument("--version", type=int, default=None, help="pin a source version (default: follow the live one)")
    p.add_argument("--port", type=int, default=50051, help="gRPC port (default 50051; 0 picks a free one)")
    p.add_argument("--host", default="0.0.0.0", help="address to bind (default all)")
    p.add_argument("--metrics-port", type=int, default=9108, help="Prometheus HTTP port (default 9108; -1: none)")
    p.add_argument("--cache-bytes", type=_bytes, default=None, help="history cache capacity, e.g. 4G (default 4G)")
    p.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16", "int8"), default=None,
        help="storage dtype of the item table (default float32)",
    )
    p.add_argument("--ready-file", help="write 'host:port metrics_port' here once serving (for scripts)")
    p.add_argument(
        "--no-warm-up", dest="warm_up", action="store_false",
        help="report SERVING without first running the kernels on every RPC thread (for measuring a cold start)",
    )
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from retriever.service import serve

    server = serve(
        args.source,
        dataset=args.dataset,
        version=args.version,
        port=args.port,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port,
        cache_bytes=args.cache_bytes,
        host=args.host,
        storage_dtype=args.dtype,
        warm_up=args.warm_up,
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"GSU server for {args.dataset}/{args.source} v{server.retriever.version} on {server.address}, "
          f"metrics on port {server.metrics_port}; SERVING after {server.ready_s:.1f} s of start-up", flush=True)
    load = server.retriever.view().table_load
    if load is not None:
        source = {"file": f"from {load.folder}", "milvus": f"from Milvus, written to {load.folder}",
                  "milvus-memory": "from Milvus (could not write the table file)",
                  "on-demand": f"empty: items are read from Milvus when first needed ({load.note})"}[load.how]
        print(f"item table: {load.rows} rows {source} in {load.seconds:.1f} s", flush=True)
    if args.ready_file:
        with open(args.ready_file + ".tmp", "w") as fh:
            fh.write(f"{server.port} {server.metrics_port}\n")
        import os

        os.replace(args.ready_file + ".tmp", args.ready_file)
    stop.wait()
    server.stop()
    return 0
