"""Shared servers for when one machine is not enough: MLflow on PostgreSQL, Prefect.

The MLflow tracking server on PostgreSQL, the Prefect server, and a PostgreSQL cluster for
development: each is the engine's own server; this module starts it with safe defaults and stops
it with all its children (process_groups.py).

    python -m pipeline.servers postgres [--dir .servers/postgres] [--port 5432]   # init once, start
    python -m pipeline.servers postgres --stop
    python -m pipeline.servers mlflow [--backend-store-uri URI] [--artifacts DIR|s3://...] [--host H] [--port 5000]
    python -m pipeline.servers prefect [--host H] [--port 4200]

The MLflow and Prefect servers run in the foreground until Ctrl-C; they bind to 127.0.0.1
unless --host says otherwise. PostgreSQL runs in the background (pg_ctl) until --stop.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil

from cifar_pipeline.errors import PipelineError
from pipeline.process_groups import (
    LOOPBACK, ServerFailed, group_members, run_in_foreground, start_group, stop_group, tail_log, wait_for_http, wait_gone,
)

VENV_BIN = Path(sys.executable).parent
SERVERS_DIR = Path(".servers")  # git-ignored: the development cluster, server artifacts, Prefect's home
DB_USER = DB_NAME = "mlflow"
DEFAULT_BACKEND_STORE_URI = f"postgresql://{DB_USER}@{LOOPBACK}:5432/{DB_NAME}"
# A worker pool and the job runner leave processes behind on SIGTERM (STACK.md); one worker suffices.
MLFLOW_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
PREFECT_SERVER_ENV = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


# --- PostgreSQL -----------------------------------------------------------------------------------

def postgres_bin() -> Path:
    """The newest PostgreSQL server binaries: Debian's /usr/lib/postgresql/N/bin, else those on PATH."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    if found:
        return found[-1].parent
    if initdb := shutil.which("initdb"):
        return Path(initdb).parent
    raise PipelineError("PostgreSQL's initdb not found; install it (Debian: apt-get install postgresql)")


def as_server_user(command: list) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run `command` as the `postgres` user."""
    command = [str(c) for c in command]
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@dataclass(frozen=True)
class Postgres:
    """A cluster in `root` (data/, postgres.log, the unix socket), on host:port, trust auth for `mlflow`."""

    root: Path
    port: int = 5432
    host: str = LOOPBACK

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "postgres.log"

    @property
    def uri(self) -> str:
        return f"postgresql://{DB_USER}@{self.host}:{self.port}/{DB_NAME}"

    def pg(self, tool: str, *args, as_server: bool = True) -> subprocess.CompletedProcess:
        command = [postgres_bin() / tool, *args]
        out = subprocess.run(as_server_user(command) if as_server else [str(c) for c in command],
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise ServerFailed(f"{tool} failed ({out.returncode}): {(out.stderr or out.stdout).strip()}{tail_log(self.log)}")
        return out

    def init(self) -> None:
        """Create the cluster once: superuser `mlflow`, password-less (trust) on this host only."""
        if (self.data / "PG_VERSION").exists():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        self.pg("initdb", "-D", self.data, "-U", DB_USER, "--auth=trust", "-E", "UTF8", "--no-sync")

    def start(self, timeout_s: int = 60) -> str:
        """Start the server (in the background) and create database `mlflow`; returns its URI."""
        self.init()
        options = f"-p {self.port} -h {self.host} -k {self.root.resolve()}"
        self.pg("pg_ctl", "start", "-D", self.data, "-l", self.log, "-w", "-t", timeout_s, "-o", options)
        self.create_database()
        return self.uri

    def create_database(self) -> None:
        import psycopg

        # autocommit: CREATE DATABASE cannot run in a transaction
        with psycopg.connect(host=self.host, port=self.port, user=DB_USER, dbname="postgres", autocommit=True) as conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DB_NAME,)).fetchone() is None:
                conn.execute(f"CREATE DATABASE {DB_NAME}")

    @property
    def pid(self) -> int | None:
        """The running server's pid (pg_ctl starts it as a process group leader), else None."""
        pid_file = self.data / "postmaster.pid"
        return int(pid_file.read_text().split()[0]) if pid_file.exists() else None

    def stop(self, mode: str = "fast", timeout_s: float = 30) -> list[psutil.Process]:
        """pg_ctl stop (mode fast, or immediate for a throwaway cluster); returns the server's
        processes that had to be killed after that (see wait_gone)."""
        postmaster = self.pid
        if postmaster is None:
            return []
        members = group_members(postmaster)
        self.pg("pg_ctl", "stop", "-D", self.data, "-m", mode, "-w")
        return wait_gone(postmaster, members, timeout_s)


# --- MLflow and Prefect servers -------------------------------------------------------------------

def mlflow_server_command(backend_store_uri: str, artifacts: str, host: str = LOOPBACK, port: int = 5000) -> list[str]:
    """`mlflow server` with the runs and the registry in `backend_store_uri`, and artifacts proxied
    by the server to `artifacts` (a directory, or s3://, gs://...): clients need only its URL."""
    if "://" not in artifacts:
        artifacts = str(Path(artifacts).resolve())
    return [str(VENV_BIN / "mlflow"), "server", "--backend-store-uri", backend_store_uri,
            "--artifacts-destination", artifacts, "--host", host, "--port", str(port), "--workers", "1"]


def prefect_server_command(host: str = LOOPBACK, port: int = 4200) -> list[str]:
    return [str(VENV_BIN / "prefect"), "server", "start", "--host", host, "--port", str(port)]


def prefect_server_env(home: Path, ui: bool = True) -> dict[str, str]:
    return {**PREFECT_SERVER_ENV, "PREFECT_HOME": str(Path(home).resolve()), "PREFECT_SERVER_UI_ENABLED": str(ui).lower()}


def start_mlflow_server(backend_store_uri: str, artifacts: str, port: int, log: Path, timeout_s: float = 120) -> subprocess.Popen:
    """Start `mlflow server` on 127.0.0.1:`port` and wait until it answers /health."""
    proc = start_group(mlflow_server_command(backend_store_uri, artifacts, LOOPBACK, port), log, MLFLOW_SERVER_ENV)
    _wait_or_stop(f"http://{LOOPBACK}:{port}/health", proc, timeout_s, log)
    return proc


def start_prefect_server(home: Path, port: int, log: Path, timeout_s: float = 120) -> subprocess.Popen:
    """Start `prefect server start` (no UI) on 127.0.0.1:`port` and wait until /api/health answers."""
    proc = start_group(prefect_server_command(LOOPBACK, port), log, prefect_server_env(home, ui=False))
    _wait_or_stop(f"http://{LOOPBACK}:{port}/api/health", proc, timeout_s, log)
    return proc


def _wait_or_stop(url: str, proc: subprocess.Popen, timeout_s: float, log: Path) -> None:
    try:
        wait_for_http(url, proc, timeout_s, log)
    except BaseException:
        stop_group(proc)
        raise


# --- command line ---------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.servers", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    sub = parser.add_subparsers(dest="server", required=True)
    pg = sub.add_parser("postgres", help="a development PostgreSQL cluster for the MLflow server (background)")
    pg.add_argument("--dir", type=Path, default=SERVERS_DIR / "postgres")
    pg.add_argument("--port", type=int, default=5432)
    pg.add_argument("--stop", action="store_true", help="stop it")
    ml = sub.add_parser("mlflow", help="the MLflow tracking server on PostgreSQL (foreground)")
    ml.add_argument("--backend-store-uri", default=os.environ.get("MLFLOW_BACKEND_STORE_URI", DEFAULT_BACKEND_STORE_URI),
                    help=f"runs and registry (default: $MLFLOW_BACKEND_STORE_URI or {DEFAULT_BACKEND_STORE_URI})")
    ml.add_argument("--artifacts", default=str(SERVERS_DIR / "mlflow-artifacts"),
                    help="where the server stores artifacts: a directory or s3://, gs://... (default: %(default)s)")
    ml.add_argument("--host", default=LOOPBACK)
    ml.add_argument("--port", type=int, default=5000)
    pf = sub.add_parser("prefect", help="the Prefect server, API and UI (foreground)")
    pf.add_argument("--host", default=LOOPBACK)
    pf.add_argument("--port", type=int, default=4200)
    pf.add_argument("--home", type=Path, default=SERVERS_DIR / "prefect", help="its database and settings (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        if args.server == "postgres":
            cluster = Postgres(args.dir, args.port)
            if args.stop:
                cluster.stop()
                print(f"stopped PostgreSQL in {args.dir}")
            else:
                print(f"PostgreSQL running (log {cluster.log}); MLflow backend store: {cluster.start()}")
            return 0
        if args.server == "mlflow":
            return run_in_foreground(mlflow_server_command(args.backend_store_uri, args.artifacts, args.host, args.port), MLFLOW_SERVER_ENV)
        return run_in_foreground(prefect_server_command(args.host, args.port), prefect_server_env(args.home))
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
