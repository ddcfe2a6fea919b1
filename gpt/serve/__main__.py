"""python -m gpt.serve --out_dir=DIR [--init_from=HF_DIR] [--host=127.0.0.1] [--port=8000] [--max_batch=8] ...

Loads the parameters once, compiles the prefill buckets and the largest decode chunk (logged; smaller ones compile
in the background when first wanted), and serves the API of
gpt/serve/api.py with uvicorn until Ctrl-C."""

from __future__ import annotations

import sys

from gpt.config import ServeArgs, help_text, parse_args, validate_serve
from gpt.exits import guarded, quiet_orbax

USAGE = "usage: python -m gpt.serve [--out_dir=DIR | --init_from=HF_DIR] [--host=H] [--port=P] [--key=value ...]"


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(help_text(ServeArgs(), USAGE))
        return 0

    def serve() -> int:
        import uvicorn

        from gpt.serve.api import create_app
        from gpt.serve.served import Served
        from gpt.sharding import initialize_distributed

        args = parse_args(ServeArgs(), argv, allow_preset=False)
        validate_serve(args.serve)
        quiet_orbax()
        initialize_distributed(args.mesh)
        log = lambda text: print(text, file=sys.stderr, flush=True)
        served = Served(args.serve, args.mesh, log)
        log(f"serving {served.source} as {served.name!r}: compiling ...")
        engine = served.engine
        log(f"compiled the prefill buckets and the decode chunk for {engine.max_batch} rows over {engine.length} "
            f"cache slots in {engine.warm_up():.1f}s (the smaller shapes compile in the background when wanted)")
        engine.start()
        served.watch()
        s = args.serve
        log(f"listening on http://{s.host}:{s.port} (max_batch {s.max_batch}, reload every {s.reload_interval}s)")
        try:
            uvicorn.run(create_app(served), host=s.host, port=s.port, log_level="warning")
        finally:
            served.close()
        return 0

    return guarded(serve)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
