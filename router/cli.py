"""``python -m router route|info|serve|proxy``: route queries, inspect a bundle, serve HTTP.

    python -m router route "What is 17 * 23?" [--bundle models/router] [--max-budget 64]
    python -m router route - < queries.txt        # one query per line -> one JSON line each
    python -m router info models/router
    python -m router serve [--bundle ...] [--host 127.0.0.1] [--port 8080]
    python -m router proxy --upstream smollm2=http://127.0.0.1:8000/v1 [--bundle ...] [--port 8080]

The bundle defaults to ``$DR_BUNDLE``, else ``models/router``. Errors (a bad bundle, a bad
argument, a missing encoder dependency) print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

EXIT_USAGE = 2


def default_bundle() -> str:
    return os.environ.get("DR_BUNDLE") or "models/router"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m router", description="difficulty-router: route queries to "
                                "the compute tier they need")
    sub = p.add_subparsers(dest="command", required=True, metavar="{route,info,serve,proxy}")

    def bundle_opt(sp):
        sp.add_argument("--bundle", default=None, help="bundle folder (default: $DR_BUNDLE or models/router)")
        sp.add_argument("--encoder", default="auto", choices=("auto", "onnx", "sentence-transformers", "static", "model"),
                        help="auto: the static table for a static-embedding bundle, the model's own state for a "
                        "model:<name> bundle, else ONNX if the bundle ships it, else sentence-transformers")

    r = sub.add_parser("route", help="route one query, or one per stdin line with '-'")
    r.add_argument("text", help="the query, or '-' to read one query per line from stdin")
    bundle_opt(r)
    r.add_argument("--max-budget", type=int, default=None, help="only tiers with budget <= N tokens")
    r.add_argument("--max-samples", type=int, default=None, help="only tiers with <= N samples")
    r.add_argument("--max-cost", type=float, default=None, help="only tiers with predicted cost <= X")
    r.add_argument("--max-latency", type=float, default=None, help="only tiers with latency tokens <= X")
    r.add_argument("--max-latency-ms", type=float, default=None,
                   help="only tiers expected within X ms at the bundle's measured upstream speed")
    r.add_argument("--model", action="append", dest="models", default=None,
                   help="only tiers of this model (repeat for several)")

    i = sub.add_parser("info", help="print a bundle's tiers, policy, metrics and versions")
    i.add_argument("bundle_path", nargs="?", default=None, metavar="BUNDLE",
                   help="bundle folder (default: $DR_BUNDLE or models/router)")

    s = sub.add_parser("serve", help="serve /route, /route_batch, /health, /metrics over HTTP")
    bundle_opt(s)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: local only)")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413")

    x = sub.add_parser("proxy", help="an OpenAI-compatible endpoint that routes each request and executes it "
                       "on OpenAI-compatible upstreams (vllm serve, llama.cpp server)")
    bundle_opt(x)
    x.add_argument("--upstream", action="append", default=[], metavar="MODEL=URL", required=True,
                   help="the upstream of a bundle model, e.g. smollm2=http://127.0.0.1:8000/v1 (one per model)")
    x.add_argument("--upstream-model", action="append", default=[], metavar="MODEL=NAME",
                   help="the upstream's own name for MODEL (default: the one model its /v1/models lists)")
    x.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: local only)")
    x.add_argument("--port", type=int, default=8080)
    x.add_argument("--fallback-tier", default=None,
                   help="tier to answer with when the chosen tier's upstream fails (default: answer 502)")
    x.add_argument("--retries", type=int, default=2, help="more tries per upstream call on a passing failure")
    x.add_argument("--upstream-timeout", type=float, default=120.0,
                   help="seconds an upstream call may go without a byte before it fails")
    x.add_argument("--upstream-concurrency", type=int, default=64, help="upstream calls in flight per model")
    x.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    x.add_argument("--decision-log", default="logs/decisions.jsonl", help="JSONL decision log (rotated by size)")
    x.add_argument("--no-decision-log", action="store_true", help="write no decision log")
    x.add_argument("--log-text", action="store_true", help="also log the routed text and the answer")
    x.add_argument("--log-max-bytes", type=int, default=64 << 20, help="rotate the log beyond this size")
    x.add_argument("--log-keep", type=int, default=0, help="rotated log files to keep (0: all)")
    x.add_argument("--log-fsync", choices=("record", "none"), default="record",
                   help="record: fsync each record after its response is sent; none: leave it to the OS")
    x.add_argument("--explore", type=float, default=None, metavar="EPSILON",
                   help="exploration rate in [0, 1): that share of routed requests goes to another allowed tier, "
                   "drawn uniformly and seeded by the request id, with its propensity logged (default: the "
                   "bundle's policy.explore, 0 unless exported with one)")
    x.add_argument("--drift-report", default=None, metavar="FILE",
                   help="a `python -m pipelines drift` report (e.g. metrics/drift.json) to export as gauges on "
                   "/metrics; re-read when it changes")
    x.add_argument("--drain-seconds", type=float, default=30.0,
                   help="on SIGTERM/SIGINT, how long in-flight requests may take to finish")
    return p


def _load(path: str | None, encoder: str = "auto"):
    from router.runtime import Router

    return Router.load(path or default_bundle(), encoder=encoder)


def _print(obj) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def cmd_route(args) -> int:
    from router.caps import Caps
    from router.server import decision_dict

    # checked before the bundle loads: `--max-cost nan` is a usage error, not a slow one
    caps = Caps.from_mapping({"max_budget": args.max_budget, "max_samples": args.max_samples,
                              "max_cost": args.max_cost, "max_latency": args.max_latency,
                              "max_latency_ms": args.max_latency_ms, "models": args.models})
    router = _load(args.bundle, args.encoder)  # builds the encoder: a missing dependency fails here
    router.check_caps(caps)
    if args.text != "-":
        _print(decision_dict(router.route(args.text, caps=caps)))
        return 0
    # one line in, one JSON line out, as each line arrives (works behind a pipe that streams)
    for line in sys.stdin:
        _print(decision_dict(router.route(line.rstrip("\r\n"), caps=caps)))
    return 0


def cmd_info(args) -> int:
    _print(_load(args.bundle_path).info())
    return 0


def cmd_serve(args) -> int:
    import logging

    from router.server import serve

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    router = _load(args.bundle, args.encoder)  # builds the encoder: a missing dependency fails here
    serve(router, args.host, args.port, max_body=args.max_body_bytes)  # logs its address when ready
    return 0


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise ValueError(f"{flag} {item!r}: expected MODEL=VALUE")
        if name in out:
            raise ValueError(f"{flag}: model {name!r} given twice")
        out[name] = value
    return out


def cmd_proxy(args) -> int:
    import logging

    from router.proxy import ProxyConfig, serve_proxy

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = ProxyConfig(
        upstreams=_pairs(args.upstream, "--upstream"), upstream_models=_pairs(args.upstream_model, "--upstream-model"),
        fallback_tier=args.fallback_tier, retries=args.retries, upstream_timeout=args.upstream_timeout,
        upstream_concurrency=args.upstream_concurrency, max_body=args.max_body_bytes,
        decision_log=None if args.no_decision_log else args.decision_log, log_text=args.log_text,
        log_max_bytes=args.log_max_bytes, log_keep=args.log_keep, log_fsync=args.log_fsync,
        drain_seconds=args.drain_seconds, explore=args.explore, drift_report=args.drift_report)
    router = _load(args.bundle, args.encoder)
    serve_proxy(router, config, args.host, args.port)
    return 0


def main(argv=None) -> int:
    from router.bundle import BundleError

    args = _parser().parse_args(argv)  # bad arguments: argparse prints usage and exits 2
    try:
        return {"route": cmd_route, "info": cmd_info, "serve": cmd_serve, "proxy": cmd_proxy}[args.command](args)
    except BundleError as e:
        print(f"error: {e}", file=sys.stderr)
    except BrokenPipeError:  # `... | head`: the reader left, which is not an error
        # point stdout at /dev/null so the interpreter's final flush does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ImportError, ValueError, OSError) as e:
        # a missing optional dependency, an unusable model file, a port in use
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        return 130
    return EXIT_USAGE
