"""What every stage's run needs, written once: the command line made from the stage's Config
dataclass, torchrun, one-line errors, the run folder (rerun refusal, resume), atomic writes,
checkpoints, log rows, the collectives the stages share, and the kill points the resume tests use.
Plain functions: a stage imports the ones it uses."""
import argparse
import datetime
import inspect
import json
import os
import re
import shutil
import signal
import sys
from dataclasses import fields

import torch
import torch.distributed as dist

PROG = os.path.basename(sys.argv[0])  # the stage's file name, set by command_line


# ----------------------------------------------------------------------------- messages
def fail(message):
    """Bad input or a refused state: one line, `<script>: error: ...`, exit status 1."""
    raise SystemExit(f"{PROG}: error: {message}")


def warn(message):
    print(f"{PROG}: warning: {message}", file=sys.stderr, flush=True)


def first_line(error):
    """An exception's message cut to its first line (hub errors run over several)."""
    text = str(error).strip()
    if not text:
        return type(error).__name__
    return text.splitlines()[0]


# ----------------------------------------------------------------------------- command line
def command_line(stage_file, argv=None):
    """The stage's options (sys.argv[1:] by default) in snake_case; errors name the stage."""
    global PROG
    PROG = os.path.basename(stage_file)
    return snake_case_options(sys.argv[1:] if argv is None else argv)


def snake_case_options(argv):
    """--lora-rank 8, --lora-rank=8 and --no-grad-ckpt read as --lora_rank and --no-grad_ckpt."""
    fixed = []
    for arg in argv:
        if arg.startswith("--"):
            name, sep, value = arg[2:].partition("=")
            prefix = "no-" if name.startswith("no-") else ""
            arg = "--" + prefix + name[len(prefix):].replace("-", "_") + sep + value
        fixed.append(arg)
    return fixed


def peek(argv, name, default):
    """The value of one option before the whole command line is parsed (--model picks presets)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument(f"--{name}", default=default)
    return getattr(parser.parse_known_args(argv)[0], name)


def build_parser(config_class, defaults, doc):
    """One option per Config field; its trailing comment is the --help line, with the default."""
    helps = {}
    for line in inspect.getsource(config_class).splitlines():
        match = re.match(r"\s+(\w+): [^#]*#\s*(.*)", line)
        if match:
            helps[match[1]] = match[2]
    parser = argparse.ArgumentParser(
        prog=PROG, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for field in fields(config_class):
        default = defaults[field.name]
        help_line = f"{helps.get(field.name, '')} (default: {default!r})"
        if isinstance(default, bool):
            action = argparse.BooleanOptionalAction
            parser.add_argument(f"--{field.name}", default=default, action=action, help=help_line)
        else:
            kind = type(default)
            parser.add_argument(f"--{field.name}", default=default, type=kind, help=help_line)
    return parser


def parse_config(config_class, defaults, doc, argv):
    """The Config of a command line, over the given defaults."""
    parser = build_parser(config_class, defaults, doc)
    return config_class(**vars(parser.parse_args(argv)))


# ----------------------------------------------------------------------------- torchrun
def setup_distributed(timeout_minutes):
    """torchrun sets RANK and LOCAL_RANK; a plain `python` run is rank 0 of 1."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if "RANK" in os.environ and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(device)
        # explicit: NCCL's default (10 min) is shorter than a rank-0 save of an SDXL checkpoint
        timeout = datetime.timedelta(minutes=timeout_minutes)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, device


def barrier():
    """Every rank calls it, in the same order."""
    if dist.is_initialized():
        dist.barrier()


def gather_objects(obj):
    """Every rank's obj, in rank order (a collective: call it on every rank)."""
    if not dist.is_initialized():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


# ----------------------------------------------------------------------------- run folder, writes
def prepare_run_folder(out, resume):
    """Refuse to write over a run unless resuming; create the folder; drop killed writes' *.tmp."""
    if not resume and os.path.isdir(out) and os.listdir(out):
        fail(f"{out} already holds a run: continue it with --resume, or pass another --out")
    barrier()  # every rank has looked before rank 0 writes anything
    if dist.is_initialized() and dist.get_rank() > 0:
        return
    try:
        os.makedirs(out, exist_ok=True)
        for name in os.listdir(out):
            if name.endswith(".tmp"):
                leftover = os.path.join(out, name)
                if os.path.isdir(leftover):
                    shutil.rmtree(leftover)
                else:
                    os.remove(leftover)
        with open(os.path.join(out, ".write-test.tmp"), "w"):
            pass
        os.remove(os.path.join(out, ".write-test.tmp"))
    except OSError as error:
        fail(f"cannot write to {out} ({error.strerror}): pass another --out")


def kill_point(name):
    """Test hook: SIGKILL this process where LPO_KILL_AT names this point (the resume tests)."""
    if os.environ.get("LPO_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def write_or_fail(path, write, *args, **kwargs):
    """Run write(*args, **kwargs), which writes path; a full disk or a read-only folder ends the
    run in one line naming the file (torch.save reports a failed write as a RuntimeError)."""
    try:
        write(*args, **kwargs)
    except (OSError, RuntimeError) as error:
        reason = getattr(error, "strerror", None) or str(error).splitlines()[0][:120]
        fail(f"cannot write {path} ({reason}): free some space or make the folder writable, "
             "then continue the run with --resume")


def atomic_torch_save(obj, path):
    """torch.save to path.tmp, then rename: a file that exists at path is always complete."""
    torch.save(obj, path + ".tmp")
    kill_point("mid " + os.path.basename(path))
    os.replace(path + ".tmp", path)


def write_text(path, text, kill_name=None):
    """Write path.tmp, then rename: a file that exists at path is always complete."""
    with open(path + ".tmp", "w") as file:
        file.write(text)
    kill_point("mid " + (kill_name or os.path.basename(path)))
    os.replace(path + ".tmp", path)


def write_safetensors(tensors, path):
    """What diffusers writes, through open(): safetensors' save_file makes the file mode 0600."""
    from safetensors.torch import save
    with open(path, "wb") as weight_file:
        weight_file.write(save(tensors, metadata={"format": "pt"}))


def load_checkpoint(path):
    """torch.load, or one line naming the file and the way out when it is damaged."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        fail(f"{path} is damaged ({type(error).__name__}): delete it to restart the run, "
             "or pass another --out")


# ----------------------------------------------------------------------------- logs
def log_jsonl(path, row):
    with open(path, "a") as log_file:
        log_file.write(json.dumps(row) + "\n")


def truncate_log(path, last, key="step"):
    """On resume: keep the log rows up to the checkpoint, row[key] <= last (the rest run again)."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as log_file:
        for line in log_file:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            if row.get(key, 0) <= last and "final" not in row:
                kept.append(row)
    with open(path + ".tmp", "w") as log_file:
        log_file.writelines(json.dumps(row) + "\n" for row in kept)
    os.replace(path + ".tmp", path)
