"""A warm driver: one long-lived process on this machine, with its embedded Ray up and torch,
transformers and Ray imported, which runs the ``raytune-ft run`` and ``raytune-ft tune``
commands started here while it is up.

Part of a run's fixed cost is start-up and wrap-up that every run repeats: the command's
imports (torch, transformers, Ray), Ray's start and Ray's stop. ``raytune-ft warm start`` pays
them once; a command started afterwards sends its arguments and working directory over a Unix
socket, the warm driver runs it as ``raytune-ft`` would (same checks, outputs and exit code) and
streams its output back. Ctrl-C reaches the run as it would locally.

Each run's actors (Train's controller, its helper actors and workers) need processes of their
own: Ray starts an actor in a process that has run nothing before. So the warm driver has Ray
start as many idle processes as the last command used up, between commands, each importing what
a Train worker imports (``PRELOAD``); the next run's actors start in them instead of paying a
new process and its imports while the run waits.

The warm driver runs with the environment and Ray settings it was started with; a command with
``--address`` or ``RAY_ADDRESS`` set runs in its own process, as without a warm driver.
"""

from __future__ import annotations

import collections
import io
import json
import os
import queue
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from raytune_ft.errors import UserError

SOCKET_ENV = "RAYTUNE_FT_WARM_SOCKET"  # where the warm driver listens; default below
COMMANDS = ("run", "tune")  # the commands it takes over
START_TIMEOUT_S = 180
MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes, the last a NUL
BUSY_NOTE_S = 2  # a command not started within this is waiting for another one
PRELOAD = ("raytune_ft.train.loop", "ray.train.torch", "transformers.modeling_utils")  # what a Train worker imports
MAX_POOL = 8
POOL_KEEP_S = 7 * 24 * 3600  # idle processes of the pool stay as long as the driver does
POOL_FILL_S = 120  # filling the pool gives up after this (it stops with Ray, too)
POOL_REGISTER_S = 10
ACTORS_END_S = 3


def socket_path() -> Path:
    return Path(os.environ.get(SOCKET_ENV) or f"/tmp/raytune_ft-{os.getuid()}/warm.sock")


def connect() -> socket.socket | None:
    """A connection to the warm driver, or None when none listens (a stale socket is removed)."""
    path = socket_path()
    if not path.exists():
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
    except ConnectionRefusedError:  # its driver died without removing it
        conn.close()
        path.unlink(missing_ok=True)
        return None
    except OSError:
        conn.close()
        return None
    return conn


def send(conn: socket.socket, message: dict[str, Any]) -> None:
    conn.sendall((json.dumps(message) + "\n").encode())


def receive(conn: socket.socket) -> dict[str, Any]:
    """The first message on ``conn``, read byte by byte so that nothing after it is consumed."""
    line = b""
    while not line.endswith(b"\n"):
        byte = conn.recv(1)
        if not byte:
            return {}
        line += byte
    return json.loads(line)


def messages(conn: socket.socket):
    """The JSON lines that arrive on ``conn`` until it closes."""
    with conn.makefile("r", encoding="utf-8") as lines:
        for line in lines:
            yield json.loads(line)


# ---- the command's side ----

def takes_over(argv: list[str]) -> bool:
    """Whether the warm driver would run ``raytune-ft ARGV``: a run or a tune command on the
    embedded Ray (no --address, no RAY_ADDRESS), not a help request."""
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    return (command in COMMANDS and not os.environ.get("RAY_ADDRESS")
            and not any(arg in ("--help", "--address") or arg.startswith("--address=") for arg in argv))


def forward(argv: list[str]) -> int | None:
    """Run ``raytune-ft ARGV`` in the warm driver when one is up and takes it over; its exit
    code, or None to run it here."""
    if not takes_over(argv):
        return None
    conn = connect()
    if conn is None:
        return None
    with conn:
        send(conn, {"argv": argv, "cwd": os.getcwd()})
        if not select.select([conn], [], [], BUSY_NOTE_S)[0]:  # it answers as it starts the command
            print("[raytune-ft] waiting for the warm driver to finish its current command", file=sys.stderr, flush=True)
        interrupted = False
        incoming = messages(conn)
        while True:
            try:
                message = next(incoming, None)
            except KeyboardInterrupt:
                if interrupted:
                    return 130
                interrupted = True
                send(conn, {"interrupt": True})
                continue
            if message is None:
                print(f"error: the warm driver ended during the command (its log: {socket_path().with_suffix('.log')})", file=sys.stderr)
                return 1
            if "exit" in message:
                return message["exit"]
            if "started" in message:
                continue
            stream = sys.stdout if "stdout" in message else sys.stderr
            stream.write(message.get("stdout", message.get("stderr", "")))
            stream.flush()


def start() -> str:
    """Start the warm driver in the background; returns what to tell the user."""
    status = ping()
    if status:
        return f"a warm driver is already up (pid {status['pid']}, {status['commands']} commands run)"
    path = socket_path()
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise UserError(SOCKET_ENV, f"{path} is longer than a Unix socket's path may be ({MAX_SOCKET_PATH} bytes); give a shorter one")
    path.parent.mkdir(parents=True, exist_ok=True)
    log = path.with_suffix(".log")
    with open(log, "ab") as out:
        process = subprocess.Popen([sys.executable, "-m", "raytune_ft.cli", "warm", "serve"], stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                   start_new_session=True)  # Ctrl-C in this terminal is not the driver's
    deadline = time.monotonic() + START_TIMEOUT_S
    while (status := ping()) is None:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise UserError("warm start", f"the warm driver did not come up; its log: {log}")
        time.sleep(0.2)
    return (f"warm driver up (pid {status['pid']}, Ray with {status['cpus']:g} CPUs): `raytune-ft run` and `tune` here "
            f"run in it; `raytune-ft warm stop` ends it")


def ping() -> dict[str, Any] | None:
    conn = connect()
    if conn is None:
        return None
    with conn:
        send(conn, {"ping": True})
        return receive(conn) or None


def stop() -> str:
    conn = connect()
    if conn is None:
        return "no warm driver is up"
    with conn:
        send(conn, {"stop": True})
        receive(conn)  # it answers once its Ray has stopped
    return "warm driver stopped"


# ---- the warm driver's side ----

class Forwarded(io.TextIOBase):
    """A stream whose writes go to the connected command as ``{name: text}`` messages. Ray's
    log thread prints the workers' lines while the main thread prints its own: one lock."""

    def __init__(self, conn: socket.socket, name: str, lock: threading.Lock):
        self._conn, self._name, self._lock = conn, name, lock

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with self._lock:
            try:
                send(self._conn, {self._name: text})
            except OSError:  # the command went away; the run goes on to its end
                pass
        return len(text)


def run_command(command: Callable[[], int], conn: socket.socket, request: dict[str, Any]) -> None:
    """Run one forwarded command with its output and Ctrl-C connected to the command's terminal."""
    lock, running = threading.Lock(), threading.Event()
    main_thread = threading.main_thread().ident

    def listen() -> None:  # an interrupt, or the command gone: Ctrl-C for the run
        for message in messages(conn):
            if message.get("interrupt") and running.is_set():
                signal.pthread_kill(main_thread, signal.SIGINT)
        if running.is_set():
            signal.pthread_kill(main_thread, signal.SIGINT)

    streams, cwd = (sys.stdout, sys.stderr), os.getcwd()
    sys.stdout, sys.stderr = Forwarded(conn, "stdout", lock), Forwarded(conn, "stderr", lock)
    running.set()
    threading.Thread(target=listen, daemon=True, name="warm-command").start()
    code = 1
    try:
        os.chdir(request["cwd"])
        sys.argv = ["raytune-ft", *request["argv"]]
        code = command()
    except KeyboardInterrupt:  # arrived outside the command's own handling
        code = 130
    finally:
        running.clear()
        sys.stdout, sys.stderr = streams
        os.chdir(cwd)
        with lock:
            try:
                send(conn, {"exit": code})
            except OSError:
                pass


def start_warm_ray() -> None:
    """Start the warm driver's Ray; the processes of its pool import PRELOAD (raytune_ft.worker_setup)."""
    from raytune_ft.train.ray_start import start_embedded_ray
    from raytune_ft.worker_setup import POOL_FILLING, POOL_PRELOAD

    os.environ.update({POOL_PRELOAD: ",".join(PRELOAD), POOL_FILLING: str(filling_flag())})  # Ray's processes inherit them
    start_embedded_ray(max(os.cpu_count() or 1, 4))


def filling_flag() -> Path:
    """The file that exists while the warm driver fills its pool: a process that Ray starts
    meanwhile is one of the pool's and imports PRELOAD."""
    return socket_path().with_suffix(".filling")


class Pool:
    """Idle processes for the next run's actors, in the shape of the last command's: as many for
    each runtime env as its actors had (Train gives its controller and its workers their own).
    Ray starts them in the background while no command runs, and while fewer than MAX_POOL that
    have run nothing wait (each holds torch and transformers, ~0.3 GB). The raylet starts one per
    core at a time and drops the rest of a request: they are asked for a core's worth at a time."""

    def __init__(self) -> None:
        self.shape: collections.Counter[str] = collections.Counter()  # runtime env -> the last command's actors
        self.stock: collections.Counter[str] = collections.Counter()  # runtime env -> idle processes started for it
        self.commanding = threading.Event()  # set while a command runs
        self.last = (0, 0)  # the last command's actors that started in the pool, its actors
        self.filling = False  # from a command's end until its processes are asked for and registered
        self._lock = threading.Lock()  # one filler at a time; guards shape and stock

    def ready(self) -> set[int]:
        """The idle processes that have run nothing yet (none while Ray is down)."""
        import ray

        from raytune_ft import ray_compat

        try:
            return ray_compat.unused_worker_pids() if ray.is_initialized() else set()
        except Exception:  # Ray stopping between the check and the call (a failed run, `warm stop`)
            return set()

    def refill(self, since_ms: int, ready: set[int]) -> None:
        """After a command that started at ``since_ms`` (Unix time, ms) with the pool ``ready``.
        A failed run stops Ray to flush its workers' lines: it starts again here, not in the next
        command, with an empty pool."""
        import ray

        if not ray.is_initialized():
            start_warm_ray()
            with self._lock:
                self.shape, self.stock, self.last = collections.Counter(), collections.Counter(), (0, 0)
            return
        self.filling = True
        threading.Thread(target=self._fill, args=(since_ms, ready), daemon=True, name="warm-pool").start()

    def _fill(self, since_ms: int, ready: set[int]) -> None:
        from raytune_ft import ray_compat

        try:
            time.sleep(ACTORS_END_S)  # Train's placement-group cleaner ends a moment after its run
            actors = ray_compat.ended_actors(since_ms)
            with self._lock:
                self.last = (sum(pid in ready for pid, _ in actors), len(actors))
                self.stock = +(self.stock - collections.Counter(runtime_env for pid, runtime_env in actors if pid in ready))
                if actors:
                    self.shape = collections.Counter(runtime_env for _, runtime_env in actors)
                self._fill_while_idle()
        except Exception as error:  # Ray stopping meanwhile (`warm stop`): the pool goes with it
            print(f"[raytune-ft] the warm driver's pool stopped filling: {error}", file=sys.stderr, flush=True)
        finally:
            self.filling = False

    def _fill_while_idle(self) -> None:
        """Start what the shape lacks, a core's worth at a time, until nothing is missing, a
        command starts, the pool is full or POOL_FILL_S have passed."""
        import ray

        from raytune_ft import ray_compat

        deadline, cores = time.monotonic() + POOL_FILL_S, os.cpu_count() or 1
        filling_flag().touch()  # removed as the next command starts (serve), once these have looked
        while ray.is_initialized() and not self.commanding.is_set() and time.monotonic() < deadline:
            waiting = len(ray_compat.unused_worker_pids())
            while sum(self.stock.values()) > waiting:  # some went elsewhere (Ray Data's tasks take idle processes too)
                self.stock[self.stock.most_common(1)[0][0]] -= 1
            missing = +(self.shape - self.stock)
            if not missing:
                return
            runtime_env, count = missing.most_common(1)[0]
            asked = min(count, cores, MAX_POOL - waiting)
            if asked <= 0:  # full
                return
            ray_compat.prestart_worker_processes(asked, runtime_env, POOL_KEEP_S)
            self.stock[runtime_env] += asked
            # Until they register (about a second, before their imports), the count misses them.
            registered_by = time.monotonic() + POOL_REGISTER_S
            while len(ray_compat.unused_worker_pids()) < waiting + asked and time.monotonic() < registered_by:
                time.sleep(0.5)


def serve(command: Callable[[], int]) -> None:
    """The warm driver: start Ray and import what runs need, then take commands one at a time
    and run each with ``command`` (the command line's: it reads sys.argv, returns the exit code)."""
    import ray

    import raytune_ft.train.runner  # noqa: F401  what a run imports

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill` stops Ray and removes the socket too
    start_warm_ray()
    path = socket_path()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path.unlink(missing_ok=True)
    listener.bind(str(path))
    listener.listen(16)
    pending: queue.Queue = queue.Queue()
    done = {"commands": 0, "running": None}
    pool = Pool()

    def answer() -> None:  # pings at once, even during a command; commands and stop in turn
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:  # the listener closed: the driver is stopping
                return
            conn.settimeout(5)  # a client that connects and says nothing does not hold the others up
            try:
                request = receive(conn)
            except OSError:
                conn.close()
                continue
            conn.settimeout(None)
            if request.get("ping"):
                with conn:
                    cpus = ray.cluster_resources().get("CPU", 0) if ray.is_initialized() else 0
                    send(conn, {"pid": os.getpid(), "cpus": cpus, "commands": done["commands"], "running": done["running"],
                                "ready": len(pool.ready()), "filling": pool.filling, "pooled": pool.last})
            elif "argv" in request or request.get("stop"):
                pending.put((conn, request))
            else:
                conn.close()

    threading.Thread(target=answer, daemon=True, name="warm-answer").start()
    stopping = None
    try:
        while stopping is None:
            try:
                conn, request = pending.get(timeout=1)  # woken each second, so SIGTERM's handler runs
            except queue.Empty:
                continue
            if request.get("stop"):
                stopping = conn  # answered once Ray has stopped
                break
            filling_flag().unlink(missing_ok=True)  # processes Ray starts for this command are not the pool's
            started_ms, ready = int(time.time() * 1000), pool.ready()
            with conn:
                send(conn, {"started": True})
                done["running"] = " ".join(request["argv"])
                pool.commanding.set()
                try:
                    run_command(command, conn, request)
                except KeyboardInterrupt:  # the command went away just as its run ended
                    pass
                done["commands"], done["running"] = done["commands"] + 1, None
                pool.commanding.clear()
                pool.refill(started_ms, ready)
    finally:
        path.unlink(missing_ok=True)
        filling_flag().unlink(missing_ok=True)
        listener.close()
        ray.shutdown()
        if stopping is not None:
            with stopping:
                send(stopping, {"stopped": True})
