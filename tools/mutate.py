"""Mutation testing of the stages' method functions: does a test fail when the method is wrong?

    python tools/mutate.py                      # every mutant; exit 1 if one survives
    python tools/mutate.py --only select_pairs  # the mutants of one function
    python tools/mutate.py --list               # the mutants, not run

Mutants come from the AST of each function in TARGETS (a few operators: + -, * /, comparisons,
numeric constants, .mean -> .sum, max <-> min, unary minus, torch.cat order, .sqrt(), [1:]) plus
HAND, bugs that the operators cannot make. The heavy imports (torch, diffusers, the stages,
test_all) happen once; each mutant runs in a fork: the function is recompiled from the mutated
source in its module's globals, put in place of every reference to the original (module and
class attributes, `from lpo import x` copies, test_all's), then pytest runs the tests of TARGETS
that pass unmutated (a first, unmutated run per function finds them), stopping at the first
failure. One line a mutant: KILLED (by the first failing test, a timeout or a crash), SURVIVED
(every test passed) or EQUIVALENT (not run: EQUIVALENT says why it cannot change behaviour).
Subprocesses (`python lpo.py`, torchrun) import the unmutated files, so tests that work through
them are not listed; forked ones (multiprocessing "fork") see the mutant.
"""
import argparse
import ast
import copy
import os
import shutil
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

# (module, function): the tests (pytest -k) that claim its behaviour, seconds each, no subprocess
LPO_MATH = "test_ddim_step_matches_diffusers or test_sigma_and_thresholds_reproduce_spec"
DDIM = f"{LPO_MATH} or test_make_schedule_is_the_ddim_schedulers_grid"
FLOW = ("test_flow_step_at_eta_0 or test_flow_step_at_eta_1 or test_flow_sigma_by_hand"
        " or test_step_logprob_of_flow_step or test_sd3_encoding_guidance_and_schedule")
LOGPROBS = "test_pair_logprobs_equal_two_denoiser_calls_mixed_at_the_guidance_scale"
SAMPLING = ("test_sampling_chain_equals_the_stock_pipelines_latents"
            " or test_trajectory_continues_from_a_uniformly_random_child"
            " or test_children_spread_as_the_step")
LOGGED = "test_every_logged_number_matches_an_independent_recomputation"
POOLED = "test_two_ranks_train_like_one_process_on_the_pooled_pairs"
WIN_RATE = ("test_win_rate_hand_made_cases or test_win_rate_interval or test_win_rate_refuses"
            " or test_quickstart_judge_is_eval_win_rate")
SCORE = ("test_score_is_vfe_on_the_mmdit_feature_by_hand or test_score_runs_down_and_mid_only"
         " or test_unet_score_is_vfe_on_the_mid_feature_by_hand"
         " or test_accuracy_both_ways or test_shipped_tiny_sd3_lrm_is_small_and_noise_aware")
TARGETS = {
    ("lpo", "alpha_bar"): DDIM,
    ("lpo", "ddim_sigma"): DDIM,
    ("lpo", "ddim_step"): f"{DDIM} or {LOGPROBS} or {SAMPLING}",
    ("lpo", "flow_sigma"): FLOW,
    ("lpo", "flow_step"): FLOW,
    ("lpo", "step_logprob"): f"test_step_logprob or {LOGPROBS}",
    ("lpo", "pair_thresholds"): f"{LPO_MATH} or test_flow_sigma_by_hand or test_make_schedule_is"
                                 " or test_one_step_thresholds",
    ("lpo", "select_pairs"): "test_select_pairs",
    ("lpo", "lpo_loss"): f"test_lpo_loss_by_hand or {LOGGED} or {POOLED}",
    ("lpo", "make_schedule"): f"{DDIM} or {FLOW} or {LOGPROBS} or {SAMPLING}",
    ("models", "guided_prediction"): f"{LOGPROBS} or {SAMPLING} or test_sd3_encoding_guidance",
    ("lpo", "pair_logprobs"): f"{LOGPROBS} or test_lpo_update_trains_the_lora or {LOGGED}",
    ("lpo", "sample_tuples"): f"{SAMPLING} or {LOGGED} or test_tiny_sd3_run_resumes_bitwise",
    ("lpo", "pool_tuples"): f"{POOLED} or {LOGGED} or test_one_step_thresholds_and_the_pooling",
    ("distributed", "apply_update"): f"test_apply_update or {POOLED} or {LOGGED}",
    ("lpo", "train_on_pairs"): f"test_lpo_grad_accum or {POOLED} or {LOGGED}",
    ("lrm_model", "down_mid_features"): "test_score_runs_down_and_mid_only"
                                        " or test_real_sd15_and_sdxl",
    ("lrm_model", "mmdit_features"): "test_mmdit_features_are or test_score_is_vfe_on_the_mmdit",
    ("lrm_model", "vfe"): "test_vfe_hand_values or test_score_is_vfe_on_the_mmdit",
    ("lrm_model", "lrm_score"): SCORE,
    ("lrm_model", "LatentRewardModel.score"): SCORE,
    ("lrm", "pair_loss"): "test_pair_loss_hand_values or test_micro_batches_give_the_full_batch"
                          " or test_pair_loss_of_zero_weights",
    ("lrm", "pair_credit"): "test_accuracy_both_ways",
    ("lrm", "pair_accuracy"): "test_accuracy_both_ways or test_shipped_tiny_sd3_lrm",
    ("lrm", "batch_accuracy"): "test_logged_acc_leaves_out"
                               " or test_logged_numbers_match_independent",
    ("lrm", "learning_rate"): "test_learning_rate_is_deepspeed or test_pair_loss_of_zero_weights",
    ("lrm", "add_noise"): "test_flow_noising_and_grid or test_logged_numbers_match_independent",
    ("lrm", "pair_latents"): "test_micro_batches_give_the_full_batch or test_vae_memory_is_bounded"
                             " or test_pair_latents_add_the_pairs_own_noise"
                             " or test_logged_numbers_match_independent",
    ("lrm", "train_step"): "test_micro_batches_give_the_full_batch"
                           " or test_logged_numbers_match_independent",
    ("mpcf", "mpcf_keep"): "test_rule_boundaries_strict or test_kept_counts_on_hand_made_table",
    ("eval", "win_rate"): WIN_RATE,
    ("tiny.world", "bootstrap_win_rate"): WIN_RATE,
}
# mutants the operators cannot make: (module, function, old snippet, new snippet), every
# occurrence of old in the function replaced; known plausible bugs first
HAND = [
    ("lpo", "pair_logprobs", "cfg.guidance_scale)", "1.0)"),  # no CFG in the loss
    ("lpo", "make_schedule", "from_config(\n        scheduler_config)",
     "from_config(scheduler_config, steps_offset=0)"),  # the DDIM grid shifted by one
    ("lpo", "select_pairs", "2 * torch.atanh(threshold)", "torch.atanh(threshold)"),
    ("lpo", "sample_tuples", "x = kids[rows, pick]", "x = kids[rows, win]"),  # go on from the best
    ("eval", "win_rate", "[2.5, 97.5]", "[5, 95]"),  # a 90% interval
    ("tiny.world", "bootstrap_win_rate", "[2.5, 97.5]", "[5, 95]"),
    ("lpo", "sample_tuples", 'max(t_prev, 0) if cfg.lrm_t == "child" else t', "t"),  # official t
    ("lpo", "sample_tuples", "if not sigma:", "if False:"),  # scoring SD3's deterministic last step
    ("lpo", "pair_logprobs", "denoiser.disable_adapters()", "pass"),  # reference = policy
    ("models", "guided_prediction", "uncond, conditional =", "conditional, uncond ="),
    ("lpo", "lpo_loss", "log_ratio_w.clamp(low, high) - log_ratio_l.clamp(low, high)",
     "log_ratio_w - log_ratio_l"),  # no ratio clip
    ("lpo", "pool_tuples", "order[rank * per_rank:(rank + 1) * per_rank]", "order[:per_rank]"),
    ("distributed", "apply_update", "flat /= world", "pass"),  # summed, not averaged, over ranks
    ("lrm_model", "down_mid_features", "residuals[len(block.resnets) - 1]", "residuals[-1]"),
    ("lrm_model", "mmdit_features", "blocks[:blocks]", "blocks[:blocks + 1]"),
    ("lrm_model", "LatentRewardModel.score", "vfe(last[batch:], last[:batch], self.g)",
     "vfe(last[:batch], last[batch:], self.g)"),  # VFE with cond and uncond swapped
    ("lrm_model", "LatentRewardModel.score", "feature[batch:]", "feature[:batch]"),
    ("lrm", "train_step", "repeat_interleave(2)", "repeat(2)"),  # the pair's two images, one t
    ("lrm", "pair_loss", "label_0 * logp[:, 0] + label_1 * logp[:, 1]",
     "label_0 * logp[:, 1] + label_1 * logp[:, 0]"),
    ("mpcf", "mpcf_keep", "tie, win)", "win, tie)"),
    ("eval", "win_rate", "groups = np.arange(len(wins))", "pass"),  # one group: a 0-width interval
]
# (function, mutation): why it cannot change what the function computes
TIE = ("scores of a pair's two images (independent noise, continuous outputs) tie with "
       "probability 0: only the tie convention changes")
EQUIVALENT = {
    ("pair_thresholds", "`(sigmas.max() - sigmas.min()).clamp(min=1e-12)` -> "
                        "`(sigmas.max() - sigmas.min()).clamp(min=2e-12)`"):
        "acts only when all sigmas lie within 2e-12 (one step): sigmas - min is 0, th_min either "
        "way",
    ("select_pairs", "`best - worst > 2 * torch.atanh(threshold)` -> "
                     "`best - worst >= 2 * torch.atanh(threshold)`"):
        "a gap exactly at the threshold has probability 0; K equal children (std 0, gap 0) are "
        "dropped by sample_tuples' std > 0 guard",
    ("lpo_loss", "`torch.cat([log_ratio_w, log_ratio_l])` -> "
                 "`torch.cat([log_ratio_l, log_ratio_w])`"):
        "ratios only feeds clipfrac, a mean over all 2B values: order-free",
    ("lpo_loss", "`(ratios < low) | (ratios > high)` -> `(ratios <= low) | (ratios > high)`"):
        "a log-ratio exactly at log(1 - eps) has probability 0; only the logged clipfrac reads it",
    ("lpo_loss", "`(ratios < low) | (ratios > high)` -> `(ratios < low) | (ratios >= high)`"):
        "a log-ratio exactly at log(1 + eps) has probability 0; only the logged clipfrac reads it",
    ("sample_tuples", "`mean[:, None] + std[:, None] * noise` -> "
                      "`mean[:, None] - std[:, None] * noise`"):
        "noise ~ N(0, I) is symmetric: the children have the same law (only seeded values change)",
    ("pool_tuples", "`seed * SEED_STRIDE + round_index` -> `seed * SEED_STRIDE - round_index`"):
        "still one seed shared by all ranks, a new one each round: the same method",
    ("pair_loss", "`total.clamp_min(1e-12)` -> `total.clamp_min(2e-12)`"):
        "a pair weighs 0 or 1/num_example_per_prompt: total < 2e-12 only when all weights are 0, "
        "and then weight / total is 0 either way",
    ("pair_accuracy", "`...e(vae, lrm.resolution), [0], seed)` -> "
                      "`...e(vae, lrm.resolution), [1], seed)`"):
        "pair_accuracy never reads the item's t (it noises at its own t's); a 1-entry grid draws "
        "the generator the same way",
    ("pair_accuracy", "`(s0 > s1) == (label_0 > label_1)` -> `(s0 >= s1) == (label_0 > label_1)`"):
        "the " + TIE,
    ("pair_accuracy", "`label_0 > label_1` -> `label_0 >= label_1`"):
        "right is masked by decisive (label_0 != label_1), where > and >= agree",
    ("batch_accuracy", "`(s0 > s1) == (label_0 > label_1)` -> `(s0 >= s1) == (label_0 > label_1)`"):
        "the " + TIE,
    ("batch_accuracy", "`label_0 > label_1` -> `label_0 >= label_1`"):
        "right is counted on decisive pairs only (labels differ), where > and >= agree",
    ("learning_rate", "`max(1, cfg.max_train_steps - warmup)` -> "
                      "`max(0, cfg.max_train_steps - warmup)`"):
        "the decay branch runs for warmup <= step < max_train_steps (lrm.main's loop), where "
        "max_train_steps - warmup >= 1",
    ("win_rate", "`np.isfinite(tuned + base)` -> `np.isfinite(tuned - base)`"):
        "both are non-finite exactly when a score is NaN or inf (short of overflow near 1e308)",
}

SKIP_CALLS = {"print", "warn", "log_jsonl", "fail", "tqdm"}  # logging and formatting
DIM_METHODS = {"flatten", "mean", "sum", "max", "min", "chunk", "view", "reshape", "expand",
               "repeat", "repeat_interleave", "stack", "cat", "split", "normalize", "softmax",
               "log_softmax", "unsqueeze", "squeeze", "transpose", "permute", "amax", "argmax"}
COMPARE_FLIPS = {ast.Gt: [ast.GtE, ast.Lt], ast.Lt: [ast.LtE, ast.Gt], ast.GtE: [ast.Gt],
                 ast.LtE: [ast.Lt], ast.Eq: [ast.NotEq], ast.NotEq: [ast.Eq],
                 ast.Is: [ast.IsNot], ast.IsNot: [ast.Is]}
BINOP_SWAPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult}


@dataclass
class Mutant:
    module: str
    function: str  # "name" or "Class.name"
    what: str  # the mutation, "`old` -> `new`"
    new: str  # the function's mutated source, dedented


def find_function(module, function):
    """The dedented source of `function` ("name" or "Class.name"), decorators included."""
    source = open(os.path.join(ROOT, *module.split(".")) + ".py").read()
    body = ast.parse(source).body
    for part in function.split("."):
        node = next(n for n in body if getattr(n, "name", None) == part)
        body = node.body
    start = min([node.lineno] + [d.lineno for d in node.decorator_list])
    return textwrap.dedent("".join(source.splitlines(keepends=True)[start - 1:node.end_lineno]))


def change(old, new):
    """"`old` -> `new`", long texts cut to the part that differs and 25 characters around it."""
    old, new = ast.unparse(old), ast.unparse(new)
    if max(len(old), len(new)) > 70:
        same = next(i for i, (a, b) in enumerate(zip(old + "\0", new + "\1")) if a != b)
        tail = next(i for i, (a, b) in enumerate(zip(old[::-1] + "\0", new[::-1] + "\1")) if a != b)
        tail = min(tail, len(old) - same, len(new) - same)
        start = max(0, same - 25)
        cut = [("..." if start else "") + text[start:len(text) - max(0, tail - 25)] +
               ("..." if tail > 25 else "") for text in (old, new)]
        old, new = cut
    return f"`{old}` -> `{new}`"


def shape(node):
    return isinstance(node, ast.Tuple) and all(isinstance(e, (ast.Constant, ast.UnaryOp))
                                               for e in node.elts)


def skipped(node, parent):
    """Parts that only document, log or format, and tensor dimensions and shapes (a wrong one
    crashes: no test needed to see it)."""
    if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
        return True  # the docstring
    if isinstance(node, (ast.JoinedStr, ast.Raise, ast.arguments)):
        return True  # messages; the defaults of the arguments
    if isinstance(node, ast.Call):
        return getattr(node.func, "id", getattr(node.func, "attr", None)) in SKIP_CALLS
    if isinstance(node, ast.keyword):
        return node.arg in ("dim", "minlength")
    if isinstance(node, ast.BinOp) and any(shape(side) for side in (node.left, node.right)):
        return True
    if shape(node) and not isinstance(parent, ast.Subscript):
        return True
    return isinstance(parent, ast.Call) and isinstance(parent.func, ast.Attribute) and \
        parent.func.attr in DIM_METHODS and node in parent.args


def operator_mutations(node, parent):
    """The replacements of one node by the operators of the module docstring."""
    out = []
    if isinstance(node, ast.BinOp) and type(node.op) in BINOP_SWAPS:
        out.append(ast.BinOp(node.left, BINOP_SWAPS[type(node.op)](), node.right))
    if isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            for flip in COMPARE_FLIPS.get(type(op), []):
                ops = list(node.ops)
                ops[i] = flip()
                out.append(ast.Compare(node.left, ops, node.comparators))
    if isinstance(node, ast.Constant) and type(node.value) in (int, float) and \
            not isinstance(parent, ast.Slice):
        value = node.value
        changed = [value + 1, 0] if isinstance(value, int) else [value * 2, 0.0]
        if isinstance(value, int) and isinstance(parent, (ast.Subscript, ast.Tuple)):
            changed = [1 - value if value in (0, 1) else value - 1]  # an index: the one before
        out += [ast.Constant(v) for v in dict.fromkeys(changed) if v != value]
    if isinstance(node, ast.Attribute) and node.attr == "mean" and isinstance(parent, ast.Call):
        out.append(ast.Attribute(node.value, "sum", node.ctx))
    if isinstance(node, ast.Name) and node.id in ("max", "min"):
        out.append(ast.Name({"max": "min", "min": "max"}[node.id], node.ctx))
    if isinstance(node, ast.Attribute) and node.attr in ("max", "min") and \
            isinstance(parent, ast.Call):
        out.append(ast.Attribute(node.value, {"max": "min", "min": "max"}[node.attr], node.ctx))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        out.append(node.operand)
    if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "cat" and node.args \
            and isinstance(node.args[0], ast.List) and len(node.args[0].elts) >= 2:
        elts = node.args[0].elts
        out.append(ast.Call(node.func, [ast.List(elts[1::-1] + elts[2:], ast.Load())] +
                            node.args[1:], node.keywords))
    if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "sqrt":
        out.append(node.args[0] if node.args else node.func.value)  # np.sqrt(x), x.sqrt()
    if isinstance(node, ast.Slice) and node.upper is None and node.step is None and \
            isinstance(node.lower, ast.Constant) and node.lower.value == 1:
        out.append(ast.Slice(None, ast.UnaryOp(ast.USub(), ast.Constant(1)), None))
    return out


class Walk(ast.NodeTransformer):
    """Numbers the nodes in pre-order (skipped() parts left out) into self.seen = [(number, node,
    ancestors)]; with a target, puts operator_mutations(node)[k] in place of node number target."""

    def __init__(self, target=-1, k=0):
        self.target, self.k, self.seen, self.ancestors = target, k, [], [(-1, None)]

    def visit(self, node):
        parent = self.ancestors[-1][1]
        if skipped(node, parent):
            return node
        number = len(self.seen)
        self.seen.append((number, node, list(self.ancestors)))
        if number == self.target:
            return operator_mutations(node, parent)[self.k]
        self.ancestors.append((number, node))
        node = self.generic_visit(node)
        self.ancestors.pop()
        return node


def context(node, ancestors):
    """The number of the node that shows a mutation of node (None: node itself): the smallest
    expression or simple statement around it of 16 characters or more."""
    shown = None
    for number, around in reversed(ancestors[1:]):
        wide = len(ast.unparse(node)) >= 16 and not isinstance(node, ast.Attribute)
        if wide or isinstance(around, ast.stmt) and hasattr(around, "body"):
            break
        node, shown = around, number
    return shown


def auto_mutants(module, function):
    source = find_function(module, function)
    tree = ast.parse(source)
    plain = ast.unparse(tree)
    walk = Walk()
    walk.visit(copy.deepcopy(tree))
    mutants, seen = [], {}
    for number, node, ancestors in walk.seen:
        for k in range(len(operator_mutations(node, ancestors[-1][1]))):
            mutated = Walk(number, k)
            new_tree = mutated.visit(copy.deepcopy(tree))
            if ast.unparse(new_tree) == plain:
                continue
            shown = context(node, ancestors)
            old = walk.seen[shown][1] if shown is not None else node
            new = mutated.seen[shown][1] if shown is not None else \
                operator_mutations(node, ancestors[-1][1])[k]
            what = change(old, new)
            seen[what] = seen.get(what, 0) + 1
            what += f" (#{seen[what]})" if seen[what] > 1 else ""
            mutants.append(Mutant(module, function, what, ast.unparse(new_tree)))
    return mutants


def hand_mutants(module, function):
    out = []
    for hand_module, hand_function, old, new in HAND:
        if (hand_module, hand_function) != (module, function):
            continue
        source = find_function(module, function)
        if old not in source:
            sys.exit(f"mutate.py: HAND: `{old}` is not in {module}.{function} any more")
        out.append(Mutant(module, function, f"`{old}` -> `{new}` (hand)", source.replace(old, new)))
    return out


# ----------------------------------------------------------------------------- running
class Recorder:
    """A pytest plugin: the outcome of each test that ran, {node id: "passed" | "failed" | ...}."""

    def __init__(self):
        self.outcomes = {}

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or report.outcome != "passed":
            self.outcomes.setdefault(report.nodeid, report.outcome)


def install(mutant):
    """Compile the mutant in its module's globals; put it in place of the original in every
    module of the repository (module attributes and class attributes)."""
    import importlib
    module = importlib.import_module(mutant.module)
    owner, name = module, mutant.function
    if "." in name:
        owner_name, name = name.split(".")
        owner = getattr(module, owner_name)
    original = vars(owner)[name]
    space = {}
    exec(compile(mutant.new, module.__file__, "exec"), vars(module), space)
    for loaded in list(sys.modules.values()):
        if not (getattr(loaded, "__file__", None) or "").startswith(ROOT + os.sep):
            continue
        for holder in [loaded] + [v for v in vars(loaded).values() if isinstance(v, type)]:
            for key, value in list(vars(holder).items()):
                if value is original:
                    setattr(holder, key, space[name])


def start(mutant, tests, scratch):
    """Fork a child that installs the mutant (None: none) and runs pytest on the node ids `tests`
    (or, a string, collects the ids of that -k expression); its outcomes go to scratch."""
    import json
    os.makedirs(scratch, exist_ok=True)
    sys.stdout.flush()
    pid = os.fork()
    if pid:
        return pid
    os.setsid()  # its own process group: a timeout kills what it started too
    log = os.open(os.path.join(scratch, "log.txt"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(log, 1)
    os.dup2(log, 2)
    code = 3
    try:
        import pytest
        if mutant is not None:
            install(mutant)
        recorder = Recorder()
        select = ["test_all.py", "-k", tests] if isinstance(tests, str) else ["-x", *tests]
        args = ["-q", "-p", "no:cacheprovider", "-W", "ignore", "--basetemp",
                os.path.join(scratch, "tmp"), *select]
        code = int(pytest.main(args, plugins=[recorder]))
        json.dump(recorder.outcomes, open(os.path.join(scratch, "outcomes.json"), "w"))
    except BaseException:
        import traceback
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def finish(pid, began, timeout, scratch, wait=True):
    """A child's end: (pytest's exit code, None = timed out, -N = signal N; its outcomes), or
    None while it runs (wait=False)."""
    import json
    import signal
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.time() - began > timeout:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None, {}
        if not wait:
            return None
        time.sleep(0.05)
    code = os.waitstatus_to_exitcode(status)
    path = os.path.join(scratch, "outcomes.json")
    return code, json.load(open(path)) if os.path.exists(path) else {}


def verdict(code, outcomes):
    """KILLED / SURVIVED / ERROR of a mutant's run, and what said so."""
    failed = [name.split("::")[-1] for name, outcome in outcomes.items() if outcome == "failed"]
    if code is None:
        return "KILLED", "timeout"
    if code < 0:
        return "KILLED", f"signal {-code}"
    if code == 1 and failed:
        return "KILLED", f"by {failed[0]}"
    if code == 0:
        return "SURVIVED", f"{len(outcomes)} tests passed"
    return "ERROR", f"pytest exit code {code}"


def tests_of(targets, timeout, scratch):
    """{-k expression: node ids that pass unmutated}; prints what each function is tested by and
    the tests left out because they fail (or are skipped) without a mutant."""
    ids = {}
    for number, expression in enumerate(dict.fromkeys(targets.values())):
        folder = os.path.join(scratch, f"baseline-{number}")
        began = time.time()  # the unmutated run: never cut short by a --timeout for mutants
        code, outcomes = finish(start(None, expression, folder), began, max(timeout, 600), folder)
        ids[expression] = [name for name, outcome in outcomes.items() if outcome == "passed"]
        left_out = sorted(name.split("::")[-1] for name in outcomes if name not in
                          ids[expression])
        names = sorted({name.split("::")[-1].split("[")[0] for name in ids[expression]})
        for (_, function), same in targets.items():
            if same == expression:
                print(f"# {function}: {len(ids[expression])} tests: {', '.join(names) or 'NONE'}"
                      + (f"; left out, not passing unmutated: {', '.join(left_out)}" if left_out
                         else ""))
    return ids


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", help="the mutants of one function (name or Class.name)")
    parser.add_argument("--list", action="store_true", help="list the mutants, run nothing")
    parser.add_argument("--jobs", type=int, default=1, help="mutants run at once")
    parser.add_argument("--timeout", type=float, default=300, help="seconds a mutant may run")
    args = parser.parse_args()
    targets = {key: tests for key, tests in TARGETS.items() if args.only in
               (None, key[1], key[1].split(".")[-1], ".".join(key))}
    if not targets:
        sys.exit(f"mutate.py: no function {args.only} in TARGETS")
    mutants, sources = [], set()
    for module, function in targets:  # a mutant once (HAND's name first)
        for mutant in hand_mutants(module, function) + auto_mutants(module, function):
            if ast.unparse(ast.parse(mutant.new)) not in sources:
                sources.add(ast.unparse(ast.parse(mutant.new)))
                mutants.append(mutant)
    stale = set(EQUIVALENT) - {(m.function, m.what) for m in mutants}
    if args.only is None and stale:
        print(f"# EQUIVALENT names mutants that are made no more: {sorted(stale)}")
    if args.list:
        for mutant in mutants:
            reason = EQUIVALENT.get((mutant.function, mutant.what))
            print(f"{mutant.function:<24} {mutant.what}" + (f"  EQUIVALENT: {reason}" if reason
                                                            else ""))
        print(f"{len(mutants)} mutants")
        return 0
    import_once()
    scratch = tempfile.mkdtemp(prefix="mutate-")
    counts = dict(KILLED=0, SURVIVED=0, EQUIVALENT=0, ERROR=0)
    try:
        ids = tests_of(targets, args.timeout, scratch)
        pending = list(enumerate(mutants))
        running = {}
        while pending or running:
            while pending and len(running) < args.jobs:
                number, mutant = pending.pop(0)
                reason = EQUIVALENT.get((mutant.function, mutant.what))
                tests = ids[targets[mutant.module, mutant.function]]
                if reason or not tests:
                    status = "EQUIVALENT" if reason else "ERROR"
                    counts[status] += 1
                    print(f"{status:<10} {mutant.function:<24} {mutant.what}    0.0s  "
                          f"{reason or 'no passing test to run'}", flush=True)
                    continue
                folder = os.path.join(scratch, str(number))
                running[start(mutant, tests, folder)] = (mutant, time.time(), folder)
            for pid in list(running):
                mutant, began, folder = running[pid]
                end = finish(pid, began, args.timeout, folder, wait=False)
                if end is None:
                    continue
                status, detail = verdict(*end)
                counts[status] += 1
                del running[pid]
                shutil.rmtree(folder, ignore_errors=True)
                print(f"{status:<10} {mutant.function:<24} {mutant.what}  "
                      f"{time.time() - began:5.1f}s  {detail}", flush=True)
            time.sleep(0.05)
    finally:
        for pid in running if "running" in locals() else ():  # interrupted: stop what runs
            os.killpg(pid, 9)
            os.waitpid(pid, 0)
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"{len(mutants)} mutants: {counts['KILLED']} killed, {counts['SURVIVED']} survived, "
          f"{counts['EQUIVALENT']} equivalent" + (f", {counts['ERROR']} errors" if counts["ERROR"]
                                                   else ""))
    return 1 if counts["SURVIVED"] or counts["ERROR"] else 0


def import_once():
    """The heavy imports, once, before any fork: torch (one thread), the stages, test_all."""
    sys.path.insert(0, ROOT)
    os.chdir(ROOT)
    import torch
    torch.set_num_threads(1)
    import test_all  # noqa: F401  (imports bench, eval, lpo, lrm, lrm_model, mpcf, sample, tiny)
    import tiny.world  # noqa: F401


if __name__ == "__main__":
    sys.exit(main())
