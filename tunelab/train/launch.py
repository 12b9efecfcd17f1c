"""Start N training processes through torchrun: `NPROC_PER_NODE=N tunelab train CFG` or `--nproc-per-node N`.

XTuner's convention, so its instructions carry over:

    NPROC_PER_NODE=8 tunelab train CFG                                   # one machine, 8 GPUs
    NPROC_PER_NODE=8 NNODES=2 NODE_RANK=0 ADDR=10.0.0.1 PORT=29500 tunelab train CFG   # on machine 0
    NPROC_PER_NODE=8 NNODES=2 NODE_RANK=1 ADDR=10.0.0.1 PORT=29500 tunelab train CFG   # on machine 1

The command-line flags --nproc-per-node, --nnodes, --node-rank, --master-addr, --master-port (torchrun's names)
win over the variables. `tunelab train` calls `maybe_relaunch` first: in the parent it runs torchrun as
`python -m tunelab.train.launch ... -m tunelab train <same arguments>` (`run_torchrun`: torchrun's own main, ended
by one line instead of its traceback when a process stops) and returns its exit code; inside the processes torchrun
starts (LOCAL_RANK is set) it returns None and training goes on.

A process that stops on an error (a TunelabError's message, or a crash's traceback) hands it to the launcher through
torchrun's per-process error file (`report_to_launcher`) instead of printing it, so an error every rank meets (a bad
data record) is printed once.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

from tunelab.errors import TunelabError

# Our flag -> (torchrun flag, environment variable of the XTuner convention)
LAUNCH_FLAGS = {
    "--nproc-per-node": ("--nproc-per-node", "NPROC_PER_NODE"),
    "--nnodes": ("--nnodes", "NNODES"),
    "--node-rank": ("--node-rank", "NODE_RANK"),
    "--master-addr": ("--master-addr", "ADDR"),
    "--master-port": ("--master-port", "PORT"),
}


def add_launch_arguments(parser) -> None:
    """The launch flags, for `tunelab train`'s parser (values default to the environment variables above)."""
    group = parser.add_argument_group("several GPUs / machines (torchrun)")
    group.add_argument("--nproc-per-node", "--nproc_per_node", default=None,
                       help="processes (GPUs) on this machine; default $NPROC_PER_NODE or 1")
    group.add_argument("--nnodes", default=None, help="machines; default $NNODES or 1")
    group.add_argument("--node-rank", "--node_rank", default=None, help="this machine's index; default $NODE_RANK or 0")
    group.add_argument("--master-addr", "--master_addr", default=None, help="address of machine 0; default $ADDR")
    group.add_argument("--master-port", "--master_port", default=None, help="a free port on machine 0; default $PORT")


def split_launch_args(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """Pull the launch flags (either spelling, `--flag V` or `--flag=V`) out of argv: (values, the rest)."""
    spellings = {flag: flag for flag in LAUNCH_FLAGS}
    spellings.update({flag.replace("-", "_").replace("__", "--", 1): flag for flag in LAUNCH_FLAGS})
    values, rest, i = {}, [], 0
    while i < len(argv):
        arg = argv[i]
        name, eq, inline = arg.partition("=")
        if name in spellings:
            if eq:
                values[spellings[name]] = inline
            elif i + 1 < len(argv):
                values[spellings[name]] = argv[i + 1]
                i += 1
            else:
                raise TunelabError(f"{name} needs a value, e.g. {name} 2")
            i += 1
            continue
        rest.append(arg)
        i += 1
    return values, rest


def _int(value: str, what: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise TunelabError(f"{what} = {value!r}: expected a whole number.") from None
    if number < 0:
        raise TunelabError(f"{what} = {value!r}: must not be negative.")
    return number


def _launch_settings(argv: list[str], nproc_per_node: int | None, env) -> tuple[dict, list[str], int, int]:
    """(each launch flag's value, the other arguments, processes per machine, machines)."""
    flags, rest = split_launch_args(list(argv))
    if nproc_per_node is not None:
        flags.setdefault("--nproc-per-node", str(nproc_per_node))
    setting = {flag: flags.get(flag) or env.get(var) for flag, (_, var) in LAUNCH_FLAGS.items()}
    nproc = _int(setting["--nproc-per-node"] or "1", "NPROC_PER_NODE / --nproc-per-node")
    nnodes = _int(setting["--nnodes"] or "1", "NNODES / --nnodes")
    return setting, rest, nproc, nnodes


def launch_world_size(argv: list[str], nproc_per_node: int | None = None, env: dict | None = None) -> int:
    """How many processes `tunelab <argv>` will train with, over every machine, as `maybe_relaunch` starts them
    (asked before the launch; a worker of torchrun reads its WORLD_SIZE)."""
    _, _, nproc, nnodes = _launch_settings(argv, nproc_per_node, os.environ if env is None else env)
    return max(nproc, 1) * max(nnodes, 1)


def torchrun_command(argv: list[str], nproc_per_node: int | None = None, env: dict | None = None) -> list[str] | None:
    """The torchrun command that runs `tunelab <argv>` on every rank, or None when one process is asked for."""
    env = os.environ if env is None else env
    setting, rest, nproc, nnodes = _launch_settings(argv, nproc_per_node, env)
    if nproc <= 1 and nnodes <= 1:
        return None
    if nproc < 1:
        raise TunelabError("NPROC_PER_NODE / --nproc-per-node must be at least 1.")
    _check_gpu_count(nproc)
    node_rank = _int(setting["--node-rank"] or "0", "NODE_RANK / --node-rank")
    if node_rank >= nnodes:
        raise TunelabError(f"NODE_RANK={node_rank} but NNODES={nnodes}: ranks count from 0 to NNODES-1.")
    addr = setting["--master-addr"] or env.get("MASTER_ADDR")
    port = setting["--master-port"] or env.get("MASTER_PORT")
    if nnodes > 1 and not addr:
        raise TunelabError(f"NNODES={nnodes}: set ADDR (or --master-addr) to the address of the NODE_RANK=0 machine, "
                           "the same on every machine, and PORT to a free port there.")
    cmd = [sys.executable, "-m", "tunelab.train.launch", "--nproc-per-node", str(nproc)]  # torchrun: run_torchrun
    if nnodes == 1 and not addr and not port:
        cmd.append("--standalone")  # one machine: torchrun picks a free port itself
    else:
        cmd += ["--nnodes", str(nnodes), "--node-rank", str(node_rank),
                "--master-addr", addr or "127.0.0.1", "--master-port", str(_int(port or "29500", "PORT"))]
    if rest and rest[0] != "train":
        rest = ["train", *rest]
    return cmd + ["-m", "tunelab", *rest]


def _check_gpu_count(nproc: int) -> None:
    import torch

    if torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise TunelabError(f"NPROC_PER_NODE={nproc} but this machine has {torch.cuda.device_count()} GPUs: "
                           "start at most one process per GPU.")


def maybe_relaunch(argv: list[str] | None = None, nproc_per_node: int | str | None = None) -> int | None:
    """Re-run `tunelab <argv>` under torchrun when several processes are asked for; returns its exit code.

    argv: the arguments after `tunelab` (`["train", "cfg.py", "--nproc-per-node", "2", ...]`); None means
    sys.argv[1:]. nproc_per_node: the parsed --nproc-per-node, if the caller parsed it. Returns None (carry on
    in this process) for one process, or when already inside torchrun (LOCAL_RANK is set).
    """
    if "LOCAL_RANK" in os.environ:
        return None
    nproc = None if nproc_per_node is None else _int(str(nproc_per_node), "NPROC_PER_NODE / --nproc-per-node")
    cmd = torchrun_command(sys.argv[1:] if argv is None else argv, nproc)
    if cmd is None:
        return None
    print("launching: " + " ".join(cmd), file=sys.stderr, flush=True)
    try:
        return subprocess.run(cmd, check=False).returncode
    except KeyboardInterrupt:  # torchrun forwards the signal to its workers; wait for them to stop
        return 130


def report_to_launcher(message: str) -> bool:
    """Inside a process torchrun started: write `message` to torchrun's error file for this process (the launcher
    prints it, once for all the ranks that stopped on it) and return True. False where there is no such file (one
    process, or torchrun without a log folder): print it yourself."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if "LOCAL_RANK" not in os.environ or not path:
        return False
    # torchrun's own layout of the file (`errors.error_handler.ErrorHandler.record_exception`), so that torchrun
    # started by hand shows the message in its failure table; the key "tunelab" tells our launcher it is a message
    data = {"message": {"message": message, "extraInfo": {"timestamp": str(int(time.time()))}}, "tunelab": True}
    # whole or not at all: torchrun cannot parse a half-written file (a full disk), and its launcher would stop on it
    partial = f"{path}.partial"
    try:
        with open(partial, "w") as file:
            json.dump(data, file)
        os.replace(partial, path)
    except OSError:
        if os.path.exists(partial):
            os.unlink(partial)
        return False
    return True


def _reported_message(failure) -> str | None:
    """The message a stopped process handed over with `report_to_launcher`, or None."""
    data = failure.error_file_data
    if not isinstance(data, dict) or not data.get("tunelab") or not isinstance(data.get("message"), dict):
        return None
    return data["message"].get("message")


class _DropTorchrunFailureLogs(logging.Filter):
    """torchrun's own log lines about a stopped process ("failed (exitcode: 2) local_rank: 0 ... of binary ...",
    "no error file defined for parent ..."): `run_torchrun` says the same in one line of its own."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("failed (exitcode", "no error file defined for parent"))


def run_torchrun(args: list[str]) -> int:
    """torchrun (`torch.distributed.run`) with `args`, its exit code that of the first process that stopped.

    A process that stops on a TunelabError exits 2 with its message in its error file; torchrun itself would follow
    it with its ChildFailedError traceback and failure table, burying the message, and exit 1. The message once
    and one line instead."""
    import torch.distributed.run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    for name in ("torch.distributed.elastic.multiprocessing.api",
                 "torch.distributed.elastic.multiprocessing.errors.error_handler"):
        logging.getLogger(name).addFilter(_DropTorchrunFailureLogs())
    try:
        torchrun.main(args)
    except ChildFailedError as exc:
        return _report_failure(exc)
    return 0


def _report_failure(exc) -> int:
    """Print why the processes stopped (each rank's handed-over message once, then one line); the exit code.

    torchrun stops the other processes with SIGTERM once one has failed, and may list them among the failures
    (timestamps in whole seconds, so not always after the failure that caused it): a SIGTERM is the cause only where
    no process said why it stopped."""
    failures = sorted(exc.failures.items(), key=lambda item: (item[1].timestamp, item[0]))
    killed = [(r, f) for r, f in failures if f.exitcode < 0 and f.signal_name() != "SIGTERM"]
    reported = {r: message for r, f in sorted(failures) if (message := _reported_message(f))}
    if not killed and not reported:
        killed = [(r, f) for r, f in failures if f.exitcode < 0]
    if killed:  # the signal's name: SIGKILL (out of memory, most often) is not SIGABRT (a crash)
        rank, failure = killed[0]
        print(f"tunelab: rank {rank} was killed by {failure.signal_name()} (signal {-failure.exitcode}); the "
              "other processes were stopped.", file=sys.stderr)
        return 1
    if not reported:  # a process that could not hand over its message printed it itself
        rank, failure = failures[0]
        print(f"tunelab: rank {rank} stopped (exit code {failure.exitcode}); its message is above. The other "
              "processes were stopped.", file=sys.stderr)
        return failure.exitcode
    messages = list(dict.fromkeys(reported.values()))
    exit_code = _exit_code(failures, reported, messages)
    print(*messages, sep="\n", file=sys.stderr)
    ranks = ", ".join(str(r) for r in reported)
    print(f"tunelab: rank{'s' if len(reported) > 1 else ''} {ranks} stopped (exit code {exit_code}) on the "
          f"error{'s' if len(messages) > 1 else ''} above.", file=sys.stderr)
    return exit_code


def _exit_code(failures: list, reported: dict, messages: list[str]) -> int:
    """The exit code of ranks that handed over a message: the first such rank's own, where it exited by itself. A
    rank can hand its message over and be stopped by torchrun's SIGTERM (because another rank failed first) before
    it exits, and -15 is no exit code (the shell would see 241): then 2 for a setting or data error ('error: ...'),
    1 for a crash's traceback, as the rank itself would have exited."""
    exited = [f.exitcode for r, f in failures if r in reported and f.exitcode > 0]
    if exited:
        return exited[0]
    return 2 if all(message.startswith("error: ") for message in messages) else 1


if __name__ == "__main__":  # what maybe_relaunch runs: python -m tunelab.train.launch TORCHRUN_ARGS
    sys.exit(run_torchrun(sys.argv[1:]))
