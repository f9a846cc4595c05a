"""What every stage's run needs, written once: the command line made from the stage's Config
dataclass, torchrun, one-line errors, the run folder (rerun refusal, resume), atomic writes,
checkpoints and what a resume may change, log rows, timings, the collectives the stages share, and
the kill points the resume tests use. Plain functions: a stage imports the ones it uses."""
import argparse
import atexit
import glob
import hashlib
import inspect
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import sys
import urllib.parse
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError

try:
    import fcntl  # the run folder's lock (POSIX; elsewhere runs go unlocked)
except ImportError:
    fcntl = None

PROG = os.path.basename(sys.argv[0])  # the stage's file name, set by command_line
RUN_FOLDER = ""  # this run's folder, set by prepare_run_folder


# ----------------------------------------------------------------------------- messages
def fail(message):
    """Bad input or a refused state: one line, `<script>: error: ...`, exit status 1."""
    release_run_folders()
    raise SystemExit(f"{PROG}: error: {message}")


def warn(message):
    print(f"{PROG}: warning: {message}", file=sys.stderr, flush=True)


def inform(message):
    """A line of news from the stage, `<script>: ...`."""
    print(f"{PROG}: {message}", flush=True)


def first_line(error):
    """An exception's message cut to its first line (hub errors run over several)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ----------------------------------------------------------------------------- command line
def command_line(stage_file, argv=None):
    """The stage's options (sys.argv[1:] by default) in snake_case; errors name the stage."""
    global PROG
    PROG = os.path.basename(stage_file)
    if argv is None:  # a command, not a call from Python: Ctrl-C and SIGTERM end in one line
        signal.signal(signal.SIGINT, stop_on_signal)
        signal.signal(signal.SIGTERM, stop_on_signal)
        argv = sys.argv[1:]
    argv = snake_case_options(argv)
    # a hub --model is probed before its family's preset is looked up (the rest: check_ranges)
    offline_unless_hub_answers({"model": peek(argv, "model", "")})
    return argv


def stop_on_signal(number, frame):
    """Ctrl-C or SIGTERM (what schedulers send): one line, what is on disk and how to continue."""
    if os.environ.get("RANK", "0") == "0":
        processes = os.environ.get("LOCAL_WORLD_SIZE")
        launcher = ["torchrun", f"--nproc_per_node={processes}"] if processes else ["python"]
        again = [*launcher, *sys.argv] + ([] if "--resume" in sys.argv else ["--resume"])
        kept = f"{RUN_FOLDER} keeps every file written whole" if RUN_FOLDER else "nothing written"
        line = (f"{PROG}: stopped by {signal.Signals(number).name}: {kept}; continue with: "
                f"{shlex.join(again)}")
        atexit.register(print, line, file=sys.stderr, flush=True)  # after progress bars close
    release_run_folders()
    raise SystemExit(128 + number)


def snake_case_options(argv):
    """--lora-rank 8, --lora-rank=8 and --no-grad-ckpt read as --lora_rank and --no-grad_ckpt."""
    return [re.sub(r"^--(no-)?([^=]*)",
                   lambda match: "--" + (match[1] or "") + match[2].replace("-", "_"), arg)
            for arg in argv]


def peek(argv, name, default):
    """The value of one option before the whole command line is parsed (--model picks presets)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument(f"--{name}", default=default)
    return getattr(parser.parse_known_args(argv)[0], name)


INTERVAL = re.compile(r"\bin ([\[(])(\S+), (\S+?)([\])])")  # "in [1, inf)" in a field's comment


def option_helps(config_class):
    """{field: its trailing comment}: the --help line, and the range (`in [0, 1)`) it declares."""
    # a subclass's comments come after its base's (eval.py's Config: sample.py's)
    source = "".join(map(inspect.getsource, config_class.__mro__[-2::-1]))
    return dict(re.findall(r"^[ \t]+(\w+): [^#\n]*#[ \t]*(.*)", source, re.MULTILINE))


def build_parser(config_class, defaults, doc):
    """One option per Config field (defaults: {field: default}); its trailing comment is the
    --help line, with the default."""
    helps = option_helps(config_class)
    parser = argparse.ArgumentParser(
        prog=PROG, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in defaults.items():
        kind = (dict(action=argparse.BooleanOptionalAction) if isinstance(default, bool)
                else dict(type=type(default)))
        parser.add_argument(f"--{name}", default=default, **kind,
                            help=f"{helps.get(name, '')} (default: {default!r})")
    return parser


def check_ranges(cfg):
    """Every number option finite and in the interval its Config comment declares (`in (0, 1]`)."""
    helps = option_helps(type(cfg))
    options = asdict(cfg)
    for name, value in options.items():
        if type(value) not in (int, float):  # (bool is not a number option)
            continue
        match = INTERVAL.search(helps.get(name, ""))
        opening, low, high, closing = match.groups() if match else ("(", "-inf", "inf", ")")
        above = value >= float(low) if opening == "[" else value > float(low)
        below = value <= float(high) if closing == "]" else value < float(high)
        if not (math.isfinite(value) and above and below):
            fail(f"--{name} {value}: need a finite number in {opening}{low}, {high}{closing}")
    offline_unless_hub_answers(options)


def offline_unless_hub_answers(options, seconds=5):
    """Without network a hub call retries for minutes: where options ({name: value}) name a hub id
    (owner/name[/file]; not an output, a local path, tiny/ or runs/) and the hub does not answer
    in seconds, say so once and work offline from the local cache (what it lacks fails at once)."""
    import huggingface_hub.constants as hub
    hub_ids = [value for name, value in options.items() if name not in ("out", "save_dataset")
               and isinstance(value, str) and not value.startswith(("tiny/", "runs/"))
               and not os.path.exists(value) and re.fullmatch(r"[\w.-]+/[\w.-]+(/.*)?", value)]
    if hub.HF_HUB_OFFLINE or not hub_ids:
        return
    url = urllib.parse.urlparse(hub.ENDPOINT)
    try:
        port = url.port or (443 if url.scheme == "https" else 80)
        socket.create_connection((url.hostname, port), timeout=seconds).close()
    except OSError as error:
        warn(f"the hub {hub.ENDPOINT} is unreachable ({error.strerror or error}): working offline "
             "from the local cache; pass local folders for what it lacks")
        os.environ["HF_HUB_OFFLINE"] = "1"  # (subprocesses, DataLoader workers)
        hub.HF_HUB_OFFLINE = True
        if "datasets" in sys.modules:  # it keeps a copy of the flag of its own
            sys.modules["datasets"].config.HF_HUB_OFFLINE = True


def run_folder(stage, model):
    """The default run folder of a stage for a model (a name, folder or hub id): runs/lpo-sd15."""
    return os.path.join("runs", f"{stage}-{os.path.basename(model.rstrip('/'))}")


def parse_config(config_class, defaults, doc, argv):
    """The Config of a command line, over the given defaults, its ranges checked."""
    cfg = config_class(**vars(build_parser(config_class, defaults, doc).parse_args(argv)))
    check_ranges(cfg)
    return cfg


# ----------------------------------------------------------------------------- run folder, writes
MARKER = "run.json"  # in each run folder: the stage whose run it holds; locked while one runs
KIN = {"sample.py", "eval.py"}  # stages that continue each other's folders (eval.py samples too)
HELD = {}  # run folder -> this process's open, locked marker


def folder_stage(out):
    """The stage whose run `out` holds, from its marker; None without a readable one."""
    try:
        with open(os.path.join(out, MARKER)) as marker:
            return json.load(marker)["stage"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def prepare_run_folder(out, resume, claim=True):
    """Refuse a used folder unless resuming, and under --resume one of another stage's run or of
    none; rank 0 claims it (locked, marked; claim=False: a run's sub-folder), drops killed *.tmp."""
    global RUN_FOLDER
    holds = os.path.isdir(out) and set(os.listdir(out)) - {MARKER}  # a marker alone: no run yet
    if holds and not resume:
        fail(f"{out} already holds a run: continue it with --resume, or pass another --out")
    stage = folder_stage(out)
    if holds and claim and stage != PROG and not {stage, PROG} <= KIN:
        what = f"a {stage} run" if stage else "no run of this project"
        fail(f"--resume: {out} holds {what}, not a {PROG} one: pass another --out")
    if claim:
        RUN_FOLDER = out
    if dist.is_initialized():  # every rank has looked before rank 0 writes anything
        dist.barrier()
        if dist.get_rank() > 0:
            return
    try:
        os.makedirs(out, exist_ok=True)
        if claim:
            lock_run_folder(out)
        for leftover in glob.glob(os.path.join(out, "*.tmp")):
            (shutil.rmtree if os.path.isdir(leftover) else os.remove)(leftover)
    except OSError as error:
        fail(f"cannot write to {out} ({error.strerror}): pass another --out")


def lock_run_folder(out):
    """Lock out's marker (flock: freed when the process ends, killed or not), write the stage."""
    path = os.path.abspath(os.path.join(out, MARKER))
    if path in HELD:  # claimed already by this process (main() run again from Python)
        return
    marker = open(path, "a+")
    try:
        if fcntl:
            fcntl.flock(marker, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        marker.close()
        fail(f"{out} is in use: another run writes there now (it holds {MARKER}'s lock): wait "
             "for it to end, or pass another --out")
    except OSError as error:  # a file system without locks (some NFS or Lustre mounts)
        warn(f"{out} cannot be locked ({error.strerror}): a second run into it is not refused")
    marker.truncate(0)
    print(json.dumps({"stage": PROG}), file=marker, flush=True)
    HELD[path] = marker


def release_run_folders():
    """Let go of the run folders this process holds (its run's end, or failure)."""
    for marker in HELD.values():
        marker.close()
    HELD.clear()


def kill_point(name):
    """Test hook: where LPO_KILL_AT names this point, send LPO_KILL_SIGNAL (SIGKILL) to itself."""
    if os.environ.get("LPO_KILL_AT") == name:
        os.kill(os.getpid(), getattr(signal, os.environ.get("LPO_KILL_SIGNAL", "SIGKILL")))


def write_or_fail(path, write, *args, **kwargs):
    """The guard of every write: write(*args, **kwargs), which writes path; a full disk or a
    read-only folder ends the run in one line naming the file (torch.save, safetensors too)."""
    try:
        write(*args, **kwargs)
    except (OSError, RuntimeError, SafetensorError) as error:
        reason = getattr(error, "strerror", None) or first_line(error)[:120]
        fail(f"cannot write {path} ({reason}): free some space or make the folder writable, "
             "then continue the run with --resume")


def atomic_write(path, write):
    """write(path.tmp), then rename: a file that exists at path is always complete."""
    write(path + ".tmp")
    kill_point("mid " + os.path.basename(path))
    os.replace(path + ".tmp", path)


def atomic_torch_save(obj, path):
    atomic_write(path, partial(torch.save, obj))


def write_text(path, text):
    """atomic_write of a text file, guarded."""
    write_or_fail(path, atomic_write, path, lambda temporary: Path(temporary).write_text(text))


def write_safetensors(tensors, path):
    """What diffusers writes, through open(): safetensors' save_file makes the file mode 0600."""
    from safetensors.torch import save
    with open(path, "wb") as weight_file:
        weight_file.write(save(tensors, metadata={"format": "pt"}))


def load_checkpoint(path):
    """torch.load, memory-mapped (an SDXL LRM's is ~30 GB), or one line if it is damaged or holds
    non-finite values."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as error:
        fail(f"{path} is damaged ({type(error).__name__}): delete it to restart the run, "
             "or pass another --out")
    broken = non_finite(checkpoint)
    if broken:
        fail(f"{path} holds non-finite values ({broken}): delete it to restart the run, or pass "
             "another --out")
    return checkpoint


def non_finite(tree, name="checkpoint"):
    """The name of the first tensor with a NaN or inf in a (nested) dict or list, or None."""
    if isinstance(tree, (list, tuple)):
        tree = dict(enumerate(tree))
    if isinstance(tree, dict):
        found = (non_finite(value, f"{name}[{key!r}]") for key, value in tree.items())
        return next(filter(None, found), None)
    if isinstance(tree, torch.Tensor) and tree.is_floating_point() and not tree.isfinite().all():
        return name


# ----------------------------------------------------------------------------- resume
def settings_changes(saved, now, may_change):
    """A resume's settings against its checkpoint's ({name: value} each): the refused differences
    ("name old -> new", outside may_change) and the applied changes ({name: [old, new]}). Where a
    run is (out) and whether it goes on (resume) are never a changed setting."""
    refused = [f"{name} {saved.get(name)!r} -> {value!r}" for name, value in now.items()
               if name not in (*may_change, "out", "resume") and saved.get(name) != value]
    applied = {name: [saved.get(name), now[name]] for name in may_change
               if saved.get(name) != now[name]}
    return refused, applied


def inputs_sha1(inputs):
    """A fingerprint of a run's inputs, a JSON list (its order too: it decides what steps read)."""
    return hashlib.sha1(json.dumps(inputs).encode()).hexdigest()


def open_run(cfg, world, may_change, read_inputs=list, source=""):
    """A run's refusals, in an order that leaves a refused run's folder as it was: a used folder
    without --resume; then {out}/ckpt.pt saved with other settings than may_change, every
    difference in one line; then inputs (read_inputs(), from `source`) other than its
    "prompts_sha1" (the same source can name a file or dataset changed since). -> (checkpoint, the
    changes it applies, inputs); (None, None, inputs): nothing to resume"""
    if not cfg.resume:
        prepare_run_folder(cfg.out, resume=False)
    path = os.path.join(cfg.out, "ckpt.pt")
    checkpoint = changes = None
    if cfg.resume and os.path.exists(path):
        checkpoint = load_checkpoint(path)
        saved = dict(checkpoint["config"], world_size=checkpoint.get("world_size"))
        refused, changes = settings_changes(saved, dict(asdict(cfg), world_size=world), may_change)
        if refused:
            fail(f"--resume of {cfg.out} with other settings than its checkpoint's ("
                 f"{'; '.join(refused)}): resume with the saved ones, or pass another --out")
    inputs = read_inputs()
    sha1 = checkpoint and checkpoint.get("prompts_sha1")
    if sha1 and sha1 != inputs_sha1(inputs):
        fail(f"--resume of {cfg.out}: {source} now gives other prompts than the run was trained "
             f"on ({len(inputs)} now): restore them, or pass another --out")
    if cfg.resume:  # after every refusal: a refused --resume leaves the run folder as it was
        prepare_run_folder(cfg.out, resume=True)
    return checkpoint, changes, inputs


def trained(optimizer):
    """The parameters an optimizer updates, group by group."""
    return [param for group in optimizer.param_groups for param in group["params"]]


def restore_training(checkpoint, optimizer, lr):
    """write_checkpoint's parameters and optimizer state back, at this run's lr (the saved state
    would bring the old one back). -> (step, next round); (0, 0) without a checkpoint"""
    if not checkpoint:
        return 0, 0
    params = trained(optimizer)  # (a copy: the loaded vector may be a memory-mapped file's)
    torch.nn.utils.vector_to_parameters(checkpoint["lora"].to(params[0].device, copy=True), params)
    optimizer.load_state_dict(checkpoint["optimizer"])
    for group in optimizer.param_groups:
        group["lr"] = lr
    return checkpoint["step"], checkpoint["next_round"]


def write_checkpoint(out, optimizer, step, next_round=None, training=None, **more):
    """{out}/ckpt.pt, whole or not at all (kill points before / after ckpt): the optimizer's
    parameters as one vector ("lora") and its state (or `training`, the two as the caller gathered
    them), the updates done, the next round, `more`."""
    kill_point("before ckpt")
    training = training or dict(lora=torch.nn.utils.parameters_to_vector(trained(optimizer)).cpu(),
                                optimizer=optimizer.state_dict())
    state = dict(training, step=step, next_round=next_round, **more)
    path = os.path.join(out, "ckpt.pt")
    write_or_fail(path, atomic_torch_save, state, path)
    kill_point("after ckpt")


# ----------------------------------------------------------------------------- logs, timings
def append_row(path, row):
    with open(path, "a") as log_file:
        log_file.write(json.dumps(row) + "\n")


def log_jsonl(path, row):
    """One row more in a JSON-lines log, or one line saying why it cannot be written."""
    write_or_fail(path, append_row, path, row)


def truncate_log(path, last, key="step"):
    """On resume: keep the log rows up to the checkpoint, row[key] <= last (the rest run again;
    so does a last line that a kill cut short of its newline)."""
    if not os.path.exists(path):
        return
    with open(path) as log_file:
        rows = [json.loads(line) for line in log_file if line.endswith("\n")]
    write_text(path, "".join(json.dumps(row) + "\n" for row in rows
                             if row.get(key, 0) <= last and "final" not in row))


def restart_log(path, start, step, changes, key="round"):
    """Rank 0 as a run starts at `start` (its key, e.g. round): the log rows past the checkpoint
    go (they run again); a resume (changes not None) adds a row and a line saying what changed."""
    if changes:
        inform(f"resuming at {key} {start} with {changes}")
    write_or_fail(path, truncate_log, path, start - 1, key=key)
    if changes is not None:
        log_jsonl(path, {"resume": {f"next_{key}": start, "changed": changes}, "step": step})
