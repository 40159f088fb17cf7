"""`python -m resnet_lightning.dashboard <sweep dir | storage URL | journal file>`:
optuna-dashboard over a sweep's study, on this machine only unless told otherwise.

    python -m resnet_lightning.dashboard outputs/multirun/<date>_optuna
    python -m resnet_lightning.dashboard sqlite:///outputs/optuna.db --port 8081

Bad input prints one `error: ...` line and exits with status 2.
"""

from __future__ import annotations

import argparse
import errno
import sys

from resnet_lightning.errors import UsageError
from resnet_lightning.tools.study import locate_study, open_storage


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m resnet_lightning.dashboard",
        description="optuna-dashboard over the Optuna study of a sweep.",
    )
    parser.add_argument(
        "location",
        help="a sweep directory (its optimization_results.yaml's storage, else its "
        "optuna_journal.log), a storage URL (sqlite:///outputs/optuna.db) or a journal file",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)"
    )
    parser.add_argument("--port", type=int, default=8080)
    return parser


def serve(location: str, host: str, port: int) -> None:
    try:
        from optuna_dashboard import run_server
    except ImportError as err:
        raise UsageError(f"{err}; install it with: pip install -e '.[sweep]'") from err
    if not 0 < port < 65536:
        raise UsageError(f"--port {port} is not a TCP port; pass one from 1 to 65535")
    study = locate_study(location)
    storage = open_storage(study.storage)
    names = ", ".join(s.study_name for s in storage.get_all_studies()) or "none yet"
    print(f"Study storage: {study.storage} (studies: {names})", flush=True)
    print(f"optuna-dashboard at http://{host}:{port}/dashboard/ (Ctrl-C stops it)", flush=True)
    try:
        run_server(storage, host=host, port=port)
    except OSError as err:
        if err.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
            message = f"cannot listen on {host}:{port} ({err.strerror}); pass another --port"
            raise UsageError(message) from err
        raise


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        serve(args.location, args.host, args.port)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0
