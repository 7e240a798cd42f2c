"""The files in deploy/: every ckptd command line in them is one the CLI accepts, and each keeps what the
daemon needs from where it runs (the ranks' uid and PID namespace, a private socket directory, storage
that every node sees, a stop timeout longer than --grace).

The command lines are checked with ``ckptd.cli.build_parser()``, the parser ``ckptd`` itself uses, after
expanding the references each launcher would expand (systemd specifiers and ``$VAR``, the kubelet's
``$(VAR)``, shell variables) to dummy values. The Slurm script also runs, against stub ``srun``/``torchrun``
commands, with a real daemon. The container image is not built: there is no container runtime here.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import pytest
import yaml

from ckptd import protocol as proto
from ckptd.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
SYSTEMD_UNITS = sorted((DEPLOY / "systemd").glob("*.service"))
SBATCH = DEPLOY / "slurm" / "train.sbatch"
CONTAINERFILE = DEPLOY / "container" / "Containerfile"
SIDECAR = DEPLOY / "kubernetes" / "sidecar.yaml"
DAEMONSET = DEPLOY / "kubernetes" / "daemonset.yaml"
K8S_FILES = [SIDECAR, DAEMONSET]
DUMMY = "1"  # what a variable expands to: a value every ckptd flag takes (string, int or float)


class CommandRejected(AssertionError):
    """A ckptd command line in a deploy file that the CLI would refuse."""


# --------------------------------------------------------------------------------------------- checker


def check_ckptd_argv(argv: list[str], where: str) -> Any:
    """Parse the arguments after ``ckptd`` as ``ckptd`` would; fail with the parser's own message.

    A literal ``--endpoint`` is also checked the way the daemon checks it (an absolute IPC path that fits
    the socket address limit, or tcp://). Returns the parsed namespace.
    """
    err = io.StringIO()
    try:
        with redirect_stderr(err), redirect_stdout(io.StringIO()):
            args = build_parser().parse_args(argv)
    except SystemExit as e:
        why = err.getvalue().strip().splitlines()[-1:] or [f"argparse exited with {e.code}"]
        raise CommandRejected(f"{where}: `ckptd {shlex.join(argv)}` is refused by the ckptd CLI: {why[0]}") from None
    endpoint = getattr(args, "endpoint", None)
    if endpoint and endpoint.startswith(("ipc://", "tcp://")):
        try:
            proto.resolve_endpoint(endpoint)
        except proto.ProtocolError as e:
            raise CommandRejected(f"{where}: `ckptd {shlex.join(argv)}`: bad endpoint: {e}") from None
    return args


def ckptd_args(argv: list[str]) -> list[str] | None:
    """The arguments after the program when ``argv`` runs ckptd (``ckptd``, ``/path/ckptd``, ``python -m
    ckptd``); None for any other program."""
    if not argv:
        return None
    if os.path.basename(argv[0]) == "ckptd":
        return argv[1:]
    if os.path.basename(argv[0]).startswith("python") and argv[1:3] == ["-m", "ckptd"]:
        return argv[3:]
    return None


# ------------------------------------------------------------------------------------------ shell text

_OPERATOR_CHARS = ";&|<>()\n"


def shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a shell script as word lists (quotes removed, variables left as written).

    Full-line comments are dropped, backslash-newlines joined; commands are split at operators, and the
    string after ``bash -c`` / ``sh -c`` is read as a script of its own. Enough for the scripts here, not a
    shell parser.
    """
    text = "\n".join(line for line in script.splitlines() if not line.lstrip().startswith("#"))
    text = text.replace("\\\n", " ")
    text = re.sub(r"(?<=\s)\d+(?=[<>])", "", text)  # the fd number of a redirection such as 2>&1
    lexer = shlex.shlex(text, posix=True, punctuation_chars=_OPERATOR_CHARS)
    lexer.whitespace = " \t\r"
    lexer.commenters = ""
    lexer.whitespace_split = True
    commands: list[list[str]] = []
    current: list[str] = []
    for token in lexer:
        if token and all(c in _OPERATOR_CHARS for c in token):
            if current:
                commands.append(current)
            current = []
        else:
            current.append(token)
    if current:
        commands.append(current)
    nested: list[list[str]] = []
    for words in commands:
        for i, word in enumerate(words[:-1]):
            if word == "-c" and any(os.path.basename(w) in ("bash", "sh") for w in words[:i]):
                nested += shell_commands(words[i + 1])
    return commands + nested


_SHELL_KEYWORDS = {"!", "do", "then", "else", "elif", "exec", "time", "if", "while", "until", "{"}
_WRAPPERS = {"srun", "env", "nice", "ionice", "nohup", "setsid", "stdbuf"}


def command_argv(words: list[str]) -> list[str]:
    """The argv of the program a simple command runs: shell keywords, VAR=value assignments and wrappers
    (``srun --opt=value ...``, ``env``, ``nice``...) with their options left out."""
    i = 0
    while i < len(words):
        word = words[i]
        if word in _SHELL_KEYWORDS or re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", word):
            i += 1
        elif os.path.basename(word) in _WRAPPERS:
            i += 1
            while i < len(words) and words[i].startswith("-"):
                i += 1
        else:
            break
    return words[i:]


def expand_shell(word: str) -> str:
    """Every ${...}, $(...) and $NAME in ``word`` replaced by the dummy value (innermost first)."""
    for pattern in (r"\$\{[^{}]*\}", r"\$\([^()]*\)"):
        while re.search(pattern, word):
            word = re.sub(pattern, DUMMY, word)
    return re.sub(r"\$(?:[A-Za-z_][A-Za-z0-9_]*|[0-9@*#?$!-])", DUMMY, word)


def check_shell_script(script: str, where: str) -> list[Any]:
    """Every ckptd command in a shell script, parsed; returns the namespaces."""
    parsed = []
    for words in shell_commands(script):
        rest = ckptd_args(command_argv(words))
        if rest is not None:
            parsed.append(check_ckptd_argv([expand_shell(w) for w in rest], where))
    return parsed


# ----------------------------------------------------------------------------------------------- tests:
# the checker itself


def test_checker_accepts_a_good_serve_command_line():
    args = check_ckptd_argv(["serve", "--endpoint", "ipc:///run/ckptd/ckptd.sock", "--grace", "30"], "here")
    assert args.command == "serve" and args.grace == 30


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "--no-such-flag"],
        ["serve", "--nice", "ten"],
        ["serve", "--leader"],
        ["serve", "--help"],
        ["serve", "--endpoint", "ipc://relative/ckptd.sock"],
        ["serve", "--endpoint", "ipc:///" + "x" * 200 + "/ckptd.sock"],
        ["srv"],
    ],
)
def test_checker_rejects_a_bad_command_line(argv):
    with pytest.raises(CommandRejected, match=r"here: `ckptd .*`( is refused by the ckptd CLI|: bad endpoint)"):
        check_ckptd_argv(argv, "here")


def test_shell_reader_finds_ckptd_commands_inside_bash_c_and_drops_redirections():
    script = """#!/bin/bash
# ckptd serve --comment-only
srun --overlap bash -c 'for _ in $(seq 3); do ckptd status --endpoint "$EP" --timeout 1 2>/dev/null && exit 0; done'
echo "no ckptd answered here" >&2
ckptd serve \\
    --endpoint "$CKPTD_ENDPOINT" --nice 10 &
"""
    found = [ckptd_args(command_argv(w)) for w in shell_commands(script) if ckptd_args(command_argv(w)) is not None]
    assert found == [
        ["serve", "--endpoint", "$CKPTD_ENDPOINT", "--nice", "10"],
        ["status", "--endpoint", "$EP", "--timeout", "1"],
    ]
    assert len(check_shell_script(script, "here")) == 2
    with pytest.raises(CommandRejected, match="--grace-period"):
        check_shell_script(script.replace("--nice 10", "--grace-period 10"), "here")


# ------------------------------------------------------------------------------------------------ systemd


def read_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A unit file as {section: [(key, value), ...]}: keys may repeat, so not configparser."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    text = path.read_text().replace("\\\n", " ")
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None and "=" in line, f"{path.name}:{n}: not a key=value line in a section: {line!r}"
        key, value = line.split("=", 1)
        current.append((key.strip(), value.strip()))
    return sections


def unit_value(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> str | None:
    values = [v for k, v in unit.get(section, []) if k == key]
    return values[-1] if values else None


def example_environment() -> dict[str, str]:
    """deploy/systemd/ckptd.env with its commented-out examples switched on."""
    env = {}
    for line in (DEPLOY / "systemd" / "ckptd.env").read_text().splitlines():
        m = re.fullmatch(r"#?([A-Z][A-Z0-9_]*)=(.*)", line.strip())
        if m:
            env[m[1]] = m[2]
    return env


def systemd_exec_argv(unit_path: Path, value: str, env: dict[str, str], instance: str = "alice") -> list[str]:
    """An Exec*= line as systemd runs it: prefixes dropped, specifiers and variables expanded."""
    value = value.lstrip("-@:+!")
    value = value.replace("%%", "\0").replace("%i", instance).replace("%I", instance)
    assert "%" not in value, f"{unit_path.name}: a specifier this test does not expand: {value}"
    value = value.replace("\0", "%")
    argv: list[str] = []
    for word in shlex.split(value):
        whole = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if whole:  # unbraced $VAR alone: split at whitespace, zero words when unset
            argv += env.get(whole[1], "").split()
        else:
            argv.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: env.get(m[1], ""), word))
    return argv


def systemd_ckptd_args(unit_path: Path, env: dict[str, str]) -> Any:
    unit = read_unit(unit_path)
    exec_start = unit_value(unit, "Service", "ExecStart")
    assert exec_start, f"{unit_path.name}: no ExecStart="
    argv = systemd_exec_argv(unit_path, exec_start, env)
    if argv and argv[0] == "/usr/bin/env":
        argv = argv[1:]
    rest = ckptd_args(argv[:1])
    assert rest is not None, f"{unit_path.name}: ExecStart does not run ckptd: {argv}"
    return check_ckptd_argv(argv[1:], f"{unit_path.name} ExecStart")


def test_there_are_systemd_units():
    assert {p.name for p in SYSTEMD_UNITS} >= {"ckptd.service"}


@pytest.mark.parametrize("unit_path", SYSTEMD_UNITS, ids=lambda p: p.name)
@pytest.mark.parametrize("env_name", ["no environment file", "the example environment file"])
def test_systemd_exec_start_is_a_serve_command_the_cli_accepts(unit_path, env_name):
    env = {} if env_name == "no environment file" else example_environment()
    args = systemd_ckptd_args(unit_path, env)
    assert args.command == "serve"
    if env:
        assert args.output_dir, "the example CKPTD_SERVE_ARGS should reach the command line"


def test_systemd_example_environment_sets_peer_host_and_ports_in_the_daemons_format():
    env = example_environment()
    assert set(env) >= {"CKPTD_PEER_HOST", "CKPTD_PEER_PORTS", "CKPTD_SERVE_ARGS"}
    lo, hi = (int(p) for p in re.fullmatch(r"(\d+)-(\d+)", env["CKPTD_PEER_PORTS"]).groups())
    assert 1024 <= lo <= hi <= 65535


@pytest.mark.parametrize("unit_path", SYSTEMD_UNITS, ids=lambda p: p.name)
def test_systemd_unit_gives_the_daemon_a_private_socket_dir_restarts_and_limits(unit_path):
    unit = read_unit(unit_path)
    service = dict(unit["Service"])
    assert service.get("User"), "the daemon must run as the training user: User= must be set"
    assert service.get("RuntimeDirectoryMode") == "0700"
    runtime_dir = "/run/" + service["RuntimeDirectory"].replace("%i", "alice")
    args = systemd_ckptd_args(unit_path, {})
    assert os.path.dirname(proto.ipc_path(args.endpoint)) == runtime_dir, "the socket must be in RuntimeDirectory"
    assert service.get("Restart") in ("on-failure", "always", "on-abnormal")
    assert service.get("RestartSec")
    assert any(k.startswith("Limit") for k in service), "no Limit*= line"
    assert service.get("KillSignal") == "SIGTERM"
    assert float(service["TimeoutStopSec"]) > args.grace, "TimeoutStopSec must exceed --grace, or SIGKILL cuts it"
    assert "Nice" not in service, "Nice= would add to --nice"
    assert "PrivateTmp" not in service and "PrivateUsers" not in service


def test_systemd_checker_fails_on_a_bad_flag(tmp_path):
    bad = tmp_path / "ckptd.service"
    bad.write_text((DEPLOY / "systemd" / "ckptd.service").read_text().replace("--grace 30", "--grace-period 30"))
    with pytest.raises(CommandRejected, match="--grace-period"):
        systemd_ckptd_args(bad, {})


@pytest.mark.parametrize("unit_path", SYSTEMD_UNITS, ids=lambda p: p.name)
def test_systemd_analyze_verify_finds_no_error_in_the_unit(unit_path, tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    ckptd_bin = shutil.which("ckptd") or str(Path(sys.executable).with_name("ckptd"))
    if not os.access(ckptd_bin, os.X_OK):
        pytest.skip("no installed ckptd console script to point ExecStart at")
    # Same file name (a template stays a template), ExecStart pointed at a binary that exists here.
    copy = tmp_path / unit_path.name
    copy.write_text(unit_path.read_text().replace("/usr/bin/env ckptd", ckptd_bin))
    try:
        r = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"systemd-analyze verify cannot run here: {e}")
    output = (r.stdout + r.stderr).strip()
    # Unit-file errors are reported as "<file>:<line>: ..." (unknown keys, unparsable values), or name
    # the unit (a command that is not executable); anything else is about this machine, not the file.
    file_errors = [line for line in output.splitlines() if line.startswith(f"{copy}:") or unit_path.name in line]
    assert not file_errors, "systemd-analyze verify:\n" + "\n".join(file_errors)
    if r.returncode != 0:
        pytest.skip(f"systemd-analyze verify failed for reasons outside the unit file: {output}")


# -------------------------------------------------------------------------------------------------- Slurm


def sbatch_options() -> list[str]:
    return [line.split(None, 1)[1].strip() for line in SBATCH.read_text().splitlines() if line.startswith("#SBATCH ")]


def srun_steps() -> list[tuple[list[str], list[str]]]:
    """(srun options, command) of every srun in the script."""
    steps = []
    for words in shell_commands(SBATCH.read_text()):
        if words and words[0] == "srun":
            i = 1
            while i < len(words) and words[i].startswith("-"):
                i += 1
            steps.append((words[1:i], words[i:]))
    return steps


def test_slurm_script_passes_bash_n():
    r = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


def test_slurm_script_asks_for_nodes_and_one_task_per_node():
    options = sbatch_options()
    assert any(re.fullmatch(r"--nodes=\d+", o) for o in options)
    assert "--ntasks-per-node=1" in options


def test_slurm_every_ckptd_command_line_is_one_the_cli_accepts():
    parsed = check_shell_script(SBATCH.read_text(), SBATCH.name)
    assert {a.command for a in parsed} >= {"serve", "status"}


def test_slurm_checker_fails_on_a_bad_flag():
    with pytest.raises(CommandRejected, match="--writers"):
        check_shell_script(SBATCH.read_text().replace("--nice 10", "--writers 10"), SBATCH.name)


def test_slurm_starts_one_daemon_per_node_in_a_step_that_overlaps_training():
    daemon_steps = [(opts, cmd) for opts, cmd in srun_steps() if ckptd_args(cmd[:1]) is not None and cmd[1] == "serve"]
    assert len(daemon_steps) == 1, daemon_steps
    opts, _ = daemon_steps[0]
    assert "--ntasks-per-node=1" in opts
    assert "--overlap" in opts, "without --overlap the daemon step holds CPUs the training step then waits for"


def test_slurm_runs_torchrun_on_every_node_with_its_node_rank():
    programs = [command_argv(w) for w in shell_commands(SBATCH.read_text())]
    torchruns = [argv for argv in programs if argv and argv[0] == "torchrun"]
    assert len(torchruns) == 1
    words = torchruns[0]

    def value(flag):
        assert flag in words, f"torchrun has no {flag}"
        return words[words.index(flag) + 1]

    assert value("--nnodes") == "$SLURM_NNODES"
    assert value("--node-rank") == "$SLURM_NODEID"
    assert value("--rdzv-backend") == "c10d"
    train_steps = [opts for opts, cmd in srun_steps() if "torchrun" in " ".join(cmd)]
    assert len(train_steps) == 1 and "--ntasks-per-node=1" in train_steps[0]


STUBS = {
    # One node (node id 0): each step's command runs here, once.
    "srun": """#!/bin/bash
echo "srun $*" >>"$STUB_DIR/calls"
while [ $# -gt 0 ] && [ "${1#-}" != "$1" ]; do shift; done
export SLURM_NODEID=0 SLURM_PROCID=0 SLURM_LOCALID=0
exec "$@"
""",
    "scontrol": '#!/bin/bash\necho "scontrol $*" >>"$STUB_DIR/calls"\necho node1\n',
    "squeue": '#!/bin/bash\necho "$SLURM_JOB_ID.0 ckptd"\necho "$SLURM_JOB_ID.2 train"\n',
    # A trainer that exits once SIGTERM reached it through scancel.
    "scancel": '#!/bin/bash\necho "scancel $*" >>"$STUB_DIR/calls"\ntouch "$STUB_DIR/trainer-stopped"\n',
    "torchrun": """#!/bin/bash
printf '%s\\n' "$@" >"$STUB_DIR/torchrun-args"
for _ in $(seq 200); do [ -e "$STUB_DIR/trainer-stopped" ] && exit 0; sleep 0.05; done
exit 3
""",
    "ckptd": f'#!/bin/bash\nexec {shlex.quote(sys.executable)} -m ckptd "$@"\n',
}


def test_slurm_script_runs_daemon_trainer_preemption_and_stop_against_stubs(tmp_path):
    """The whole script on one simulated node: a real daemon starts and answers, torchrun gets its node
    rank, SIGUSR1 (the near time limit) becomes SIGTERM for the training step only, and at the end the
    daemon is stopped with SIGTERM through its lock file and exits cleanly."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in STUBS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    job_id = f"deploytest{os.getpid()}"
    endpoint = f"ipc:///tmp/ckptd-{os.getuid()}-{job_id}/ckptd.sock"  # the script's default
    lock = Path(proto.ipc_path(endpoint) + ".lock")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "CKPTD_"))}
    env.update(
        PATH=f"{bin_dir}:{env.get('PATH', '/usr/bin:/bin')}",
        STUB_DIR=str(tmp_path),
        SLURM_JOB_ID=job_id,
        SLURM_JOB_NAME="train",
        SLURM_NNODES="1",
        SLURM_JOB_NODELIST="node1",
        OUTPUT_DIR=str(tmp_path / "out"),
    )
    proc = subprocess.Popen(
        ["bash", str(SBATCH)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "torchrun-args").exists():
            assert proc.poll() is None, f"the script ended before torchrun ran:\n{proc.communicate()[1]}"
            assert time.monotonic() < deadline, "torchrun never started"
            time.sleep(0.02)
        assert lock.exists(), "torchrun started before the daemon was up"
        daemon_pid = int(lock.read_text())
        os.kill(proc.pid, signal.SIGUSR1)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the script's own session: its stubs and the daemon
            proc.wait()
        if lock.exists():
            try:
                os.kill(int(lock.read_text()), signal.SIGKILL)
            except (ValueError, ProcessLookupError):
                pass
        shutil.rmtree(os.path.dirname(proto.ipc_path(endpoint)), ignore_errors=True)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{out}\nstderr:\n{err}"
    calls = (tmp_path / "calls").read_text()
    assert f"scancel --signal=TERM {job_id}.2" in calls, calls  # the training step, not the daemons'
    args = (tmp_path / "torchrun-args").read_text().split("\n")
    assert args[args.index("--nnodes") + 1] == "1" and args[args.index("--node-rank") + 1] == "0"
    assert args[args.index("--rdzv-endpoint") + 1] == "node1:29500"
    assert not lock.exists(), "the daemon did not exit (its lock file is still there)"
    with pytest.raises(ProcessLookupError):
        os.kill(daemon_pid, 0)
    assert "exited with an error" not in err, err


# ------------------------------------------------------------------------------------------ Containerfile


def containerfile_instructions() -> list[tuple[str, str]]:
    lines = [line for line in CONTAINERFILE.read_text().splitlines() if not line.lstrip().startswith("#")]
    text = "\n".join(lines).replace("\\\n", " ")
    return [(m[1].upper(), m[2].strip()) for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", text, re.M)]


def containerfile_exec_form(instruction: str) -> list[str]:
    values = [v for k, v in containerfile_instructions() if k == instruction]
    assert values, f"Containerfile has no {instruction}"
    argv = json.loads(values[-1])  # the exec (JSON) form: no shell in between
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), f"{instruction} is not in exec form"
    return argv


def test_container_entrypoint_and_cmd_form_a_serve_command_the_cli_accepts():
    entrypoint, cmd = containerfile_exec_form("ENTRYPOINT"), containerfile_exec_form("CMD")
    assert entrypoint == ["ckptd"]
    args = check_ckptd_argv(cmd, "Containerfile ENTRYPOINT + CMD")
    assert args.command == "serve"


def test_container_checker_fails_on_a_bad_flag():
    with pytest.raises(CommandRejected, match="--endpiont"):
        check_ckptd_argv(["serve", "--endpiont", "ipc:///run/ckptd/ckptd.sock"], "Containerfile ENTRYPOINT + CMD")


def test_container_installs_cpu_torch_copies_the_packages_and_runs_as_a_non_root_user():
    instructions = containerfile_instructions()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    args = {m[1]: m[2].strip('"') for k, v in instructions if k == "ARG" for m in [re.match(r"(\w+)=?(.*)", v)]}
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    runs = [v for k, v in instructions if k == "RUN"]
    torch_run = next(i for i, r in enumerate(runs) if "$TORCH_INDEX_URL" in r)
    project_run = next(i for i, r in enumerate(runs) if re.search(r"pip install \.(\s|$)", r))
    assert torch_run < project_run, "torch must be installed before the project, or pip pulls the CUDA build"
    for _, value in (i for i in instructions if i[0] == "COPY"):
        for source in value.split()[:-1]:
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"
    copied = {value.split()[0] for k, value in instructions if k == "COPY"}
    assert {"ckptd", "client"} <= copied, "both import packages must be in the image"
    user = [v for k, v in instructions if k == "USER"][-1]
    uid = args.get(user.lstrip("$").strip("{}"), user) if user.startswith("$") else user
    assert uid.isdigit() and int(uid) != 0, f"USER {user} should be a numeric non-root uid (runAsNonRoot checks it)"
    socket_dir = os.path.dirname(proto.ipc_path(check_ckptd_argv(containerfile_exec_form("CMD"), "CMD").endpoint))
    assert re.search(rf"install -d -m 0700 .*{re.escape(socket_dir)}(\s|$)", " ".join(runs)), (
        f"the image should make {socket_dir} private to the daemon's user"
    )


# --------------------------------------------------------------------------------------------- Kubernetes


def k8s_documents(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    for d in docs:
        assert isinstance(d, dict) and "apiVersion" in d and "kind" in d, f"{path.name}: not a Kubernetes object"
    return docs


def pod_specs(docs: list[dict]) -> list[tuple[str, dict]]:
    specs = []
    for d in docs:
        name = f"{d['kind']}/{d['metadata']['name']}"
        if d["kind"] == "Pod":
            specs.append((name, d["spec"]))
        elif d["kind"] in ("Job", "DaemonSet", "Deployment", "StatefulSet", "ReplicaSet"):
            specs.append((name, d["spec"]["template"]["spec"]))
    return specs


def all_containers(spec: dict) -> list[dict]:
    return list(spec.get("initContainers", [])) + list(spec.get("containers", []))


def expand_kubelet(word: str, env_names: set[str], where: str) -> str:
    """What the kubelet passes for ``word``: $$ is a literal $, $(NAME) the variable's value."""

    def one(m: re.Match) -> str:
        if m[0] == "$$":
            return "$"
        if m[1] not in env_names:
            raise CommandRejected(f"{where}: $({m[1]}) is not in the container's env; the kubelet passes it literally")
        return DUMMY

    return re.sub(r"\$\$|\$\(([-._a-zA-Z][-._a-zA-Z0-9]*)\)", one, word)


def image_entrypoint(image: str) -> list[str] | None:
    """The entrypoint of the images built from deploy/container/Containerfile (named .../ckptd:TAG)."""
    return containerfile_exec_form("ENTRYPOINT") if image.rsplit("/", 1)[-1].split(":")[0] == "ckptd" else None


def check_k8s_argv(argv: list[str], env_names: set[str], where: str) -> list[Any]:
    argv = [expand_kubelet(w, env_names, where) for w in argv]
    rest = ckptd_args(argv[:1])
    if rest is not None:
        return [check_ckptd_argv(argv[1:], where)]
    if len(argv) >= 3 and os.path.basename(argv[0]) in ("sh", "bash") and argv[1] == "-c":
        return check_shell_script(argv[2], where)
    return []


def container_commands(pod: str, c: dict) -> list[tuple[str, list[str]]]:
    """(where, argv) of the container's process and of its exec probes."""
    where = f"{pod} container {c['name']}"
    command = c.get("command") or image_entrypoint(c["image"]) or []
    found = [(where, list(command) + list(c.get("args", [])))]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        if "exec" in c.get(probe, {}):
            found.append((f"{where} {probe}", list(c[probe]["exec"]["command"])))
    return found


def serve_args(c: dict) -> Any | None:
    env_names = {e["name"] for e in c.get("env", [])}
    for where, argv in container_commands("pod", c)[:1]:
        for args in check_k8s_argv(argv, env_names, where):
            if args.command == "serve":
                return args
    return None


def env_value(c: dict, name: str) -> str | None:
    return next((e.get("value") for e in c.get("env", []) if e["name"] == name), None)


def run_as_user(spec: dict, c: dict) -> int | None:
    return c.get("securityContext", {}).get("runAsUser", spec.get("securityContext", {}).get("runAsUser"))


def mount_for(c: dict, path: str) -> dict | None:
    """The container's volume mount that holds ``path`` (the deepest one)."""
    mounts = [
        m
        for m in c.get("volumeMounts", [])
        if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")
    ]
    return max(mounts, key=lambda m: len(m["mountPath"]), default=None)


def volume(spec: dict, name: str) -> dict:
    return next(v for v in spec.get("volumes", []) if v["name"] == name)


def daemon_and_trainers(path: Path) -> tuple[dict, dict, list[tuple[dict, dict]]]:
    """(the serve pod spec, its serve container, [(pod spec, trainer container)]) of one file; a trainer
    is a container whose env names CKPTD_ENDPOINT."""
    daemons, trainers = [], []
    for _, spec in pod_specs(k8s_documents(path)):
        for c in all_containers(spec):
            if serve_args(c) is not None:
                daemons.append((spec, c))
        trainers += [(spec, c) for c in spec.get("containers", []) if env_value(c, "CKPTD_ENDPOINT")]
    assert len(daemons) == 1, f"{path.name}: expected one container running ckptd serve, found {len(daemons)}"
    assert trainers, f"{path.name}: no trainer container (one with CKPTD_ENDPOINT in its env)"
    return daemons[0][0], daemons[0][1], trainers


def check_k8s_file(path: Path) -> list[Any]:
    """Every ckptd command line of every container and exec probe in the file, parsed."""
    checked = []
    for pod, spec in pod_specs(k8s_documents(path)):
        for c in all_containers(spec):
            env_names = {e["name"] for e in c.get("env", [])}
            for where, argv in container_commands(pod, c):
                checked += check_k8s_argv(argv, env_names, f"{path.name}: {where}")
    return checked


@pytest.mark.parametrize("path", K8S_FILES, ids=lambda p: p.name)
def test_kubernetes_every_document_parses_and_every_ckptd_command_line_is_accepted(path):
    commands = {a.command for a in check_k8s_file(path)}
    assert "serve" in commands, f"{path.name}: no container runs ckptd serve"
    assert "status" in commands, f"{path.name}: nothing checks that the daemon answers"


@pytest.mark.parametrize("path", K8S_FILES, ids=lambda p: p.name)
def test_kubernetes_checker_fails_on_a_bad_flag_and_an_undefined_variable(path, tmp_path):
    bad = tmp_path / path.name
    bad.write_text(path.read_text().replace("- --peer-ports", "- --peer-port-range", 1))
    with pytest.raises(CommandRejected, match="--peer-port-range"):
        check_k8s_file(bad)
    bad.write_text(path.read_text().replace("$(POD_IP)", "$(POD_ADDRESS)", 1))
    with pytest.raises(CommandRejected, match=r"\$\(POD_ADDRESS\) is not in the container's env"):
        check_k8s_file(bad)


@pytest.mark.parametrize("path", K8S_FILES, ids=lambda p: p.name)
def test_kubernetes_trainer_reaches_the_daemon_as_the_same_user_with_output_dir_on_shared_storage(path):
    daemon_spec, daemon, trainers = daemon_and_trainers(path)
    args = serve_args(daemon)
    socket = proto.ipc_path(args.endpoint)
    assert socket, "ranks reach the daemon over an IPC socket"
    uid = run_as_user(daemon_spec, daemon)
    assert isinstance(uid, int) and uid != 0, "the daemon should run as the (non-root) training uid"
    assert args.peer_host == DUMMY, "--peer-host should come from the downward API ($(POD_IP))"
    assert daemon_spec.get("terminationGracePeriodSeconds", 30) > args.grace
    daemon_claims = {
        volume(daemon_spec, m["name"])["persistentVolumeClaim"]["claimName"]: m["mountPath"]
        for m in daemon.get("volumeMounts", [])
        if "persistentVolumeClaim" in volume(daemon_spec, m["name"])
    }
    claims = {d["metadata"]["name"]: d for d in k8s_documents(path) if d["kind"] == "PersistentVolumeClaim"}
    for spec, trainer in trainers:
        assert env_value(trainer, "CKPTD_ENDPOINT") == args.endpoint
        assert env_value(trainer, "CKPTD_PEER_HOST") == "$(POD_IP)"
        assert run_as_user(spec, trainer) == uid, "the daemon opens only slabs of its own user"
        assert mount_for(trainer, socket) is not None, f"the trainer does not mount the socket dir of {socket}"
        trainer_args = trainer.get("args", [])
        output_dir = trainer_args[trainer_args.index("--output-dir") + 1]
        m = mount_for(trainer, output_dir)
        claim = volume(spec, m["name"]).get("persistentVolumeClaim", {}).get("claimName")
        assert claim in claims, f"{output_dir} should be on a PersistentVolumeClaim of this file"
        assert "ReadWriteMany" in claims[claim]["spec"]["accessModes"], "every node must see the output dir"
        assert daemon_claims.get(claim) == m["mountPath"], "the daemon must see the output dir at the same path"
    for d in args.output_dir:
        assert mount_for(daemon, d) is not None, f"--output-dir {d} is not on a volume of the daemon"


def test_sidecar_shares_pid_namespace_memory_backed_shm_and_socket_dir_with_the_trainer():
    spec, daemon, trainers = daemon_and_trainers(SIDECAR)
    assert len(trainers) == 1 and trainers[0][0] is spec, "the sidecar and the trainer are in one pod"
    trainer = trainers[0][1]
    assert spec.get("shareProcessNamespace") is True
    socket = proto.ipc_path(serve_args(daemon).endpoint)
    for c in (daemon, trainer):
        for path in ("/dev/shm", socket):
            m = mount_for(c, path)
            assert m is not None, f"container {c['name']} does not mount {path}"
            empty_dir = volume(spec, m["name"]).get("emptyDir")
            assert empty_dir is not None and empty_dir.get("medium") == "Memory", f"{path}: not a memory emptyDir"
        assert mount_for(c, socket)["name"] == mount_for(daemon, socket)["name"]
    # An emptyDir is root-owned 0777, which the daemon refuses for a socket directory: the socket goes in a
    # subdirectory the daemon creates 0700.
    assert os.path.dirname(socket) != mount_for(daemon, socket)["mountPath"]
    for c in (daemon, trainer):
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], "the same (empty) capability set in both"
    sidecar = next(c for c in spec.get("initContainers", []) if c is daemon)
    assert sidecar.get("restartPolicy") == "Always", "a native sidecar starts before and stops after the trainer"
    assert "startupProbe" in sidecar, "the trainer should start only once the daemon answers"


def test_daemonset_and_its_training_pods_share_the_host_pid_namespace_and_socket_dir():
    spec, daemon, trainers = daemon_and_trainers(DAEMONSET)
    socket = proto.ipc_path(serve_args(daemon).endpoint)
    uid = run_as_user(spec, daemon)
    host_path = volume(spec, mount_for(daemon, socket)["name"])["hostPath"]
    assert spec.get("hostPID") is True
    assert host_path["type"] in ("Directory", "DirectoryOrCreate")
    assert os.path.dirname(socket) == host_path["path"] == mount_for(daemon, socket)["mountPath"]
    if host_path["type"] == "DirectoryOrCreate":
        # The kubelet creates it root-owned 0755; something must hand it to the daemon's uid, mode 0700.
        setup = " ".join(" ".join(c.get("command", [])) for c in spec.get("initContainers", []))
        assert "chmod 0700" in setup and f"chown {uid}:" in setup, "nothing makes the socket dir the daemon's"
    for train_spec, trainer in trainers:
        assert train_spec.get("hostPID") is True, "training pods need hostPID too"
        train_volume = volume(train_spec, mount_for(trainer, socket)["name"])
        assert train_volume.get("hostPath", {}).get("path") == host_path["path"]
        assert train_volume["hostPath"].get("type") == "Directory"
        assert train_spec.get("nodeSelector") == spec.get("nodeSelector"), "training pods must land on daemon nodes"
