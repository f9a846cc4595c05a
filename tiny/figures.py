"""The README's three pictures, regenerated from the tiny world (CPU, one core, about 5 minutes).

    pip install matplotlib && python tiny/figures.py
    python tiny/figures.py --out docs --lpo_run runs/figures-lpo   # the same, options spelled out

1. docs/tiny_base_vs_tuned.png: one sample of each of the 15 captions, base (top row) and
   LPO-tuned (bottom row) with the same seeds (10^6 + i), DDIM 20 steps, eta 0, CFG 5; a green
   frame where the tiny judge reads the caption's colour and shape, red where it does not.
2. docs/tiny_lrm_accuracy_vs_t.png: pair accuracy of the shipped tiny LRM (tiny/lrm) on
   validation_unique, both images noised to t, against t; decisive pairs and the official
   definition (a tie scores 0.5); an untrained LRM (the base U-Net, random heads) as control.
3. docs/tiny_lpo_training.png: an LPO run on the tiny world (lpo.py --model tiny, 10 rounds):
   per round the share of step groups that gave a pair and the implicit accuracy (log.jsonl),
   and the judge win-rate of tuned over base with its bootstrap 95% interval after each round.

The LPO run goes one round at a time (--max_rounds r --resume), and the LoRA of each round is
judged as lpo.py's --eval_samples judges it (150 held-out validation_unique captions, seed
10^6 + i, the run's own sampler: DDIM 20 steps, eta 1, CFG 5), the base images drawn only once.
The run folder keeps the win-rates in win_rate.json: a second call re-uses the run, a killed one
goes on from its last round.
"""
import argparse
import json
import os
import sys

import matplotlib.pyplot as plt
import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # `python tiny/figures.py` runs from anywhere

import lpo  # noqa: E402
import lrm  # noqa: E402
from lrm_model import LatentRewardModel  # noqa: E402
from tiny.world import CAPTIONS, judge_scores, judge_win_rate  # noqa: E402

BASE = os.path.join(ROOT, "tiny", "sd15")
ROUNDS = 10  # the tiny preset: 320 prompts, 32 a round, one epoch
EVAL_SAMPLES = 150
TIMESTEPS = list(range(1, 1000, 50))  # 1, 51, ..., 951
WIN_FILE = "win_rate.json"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "docs"), help="folder for the PNGs")
    default_run = os.path.join(ROOT, "runs", "figures-lpo")
    parser.add_argument("--lpo_run", default=default_run, help="LPO run folder (re-used)")
    return parser.parse_args(argv)


def load_pipeline(device):
    pipe = DiffusionPipeline.from_pretrained(BASE).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(pipe, captions, eta, guidance_scale=5.0, steps=20):
    """Caption i on the held-out seed 10^6 + i (as lpo.py's evaluation), 100 a call."""
    images = []
    for start in range(0, len(captions), 100):
        chunk = captions[start:start + 100]
        seeds = range(10**6 + start, 10**6 + start + len(chunk))
        generators = [torch.Generator(pipe.device).manual_seed(seed) for seed in seeds]
        output = pipe(chunk, num_inference_steps=steps, eta=eta, guidance_scale=guidance_scale,
                      generator=generators)
        images += output.images
    return images


def tuned_images(pipe, lora_dir, captions, eta):
    """The same seeds with the run's LoRA loaded; the pipeline is the base again afterwards."""
    pipe.load_lora_weights(lora_dir)
    images = generate(pipe, captions, eta)
    pipe.unload_lora_weights()
    return images


# ----------------------------------------------------------------------------- the LPO run
def read_json(path, empty):
    if not os.path.exists(path):
        return empty
    with open(path) as json_file:
        return json.load(json_file)


def logged_rounds(run):
    """The round rows of the run's log.jsonl (resume and final rows left out)."""
    path = os.path.join(run, "log.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as log_file:
        rows = [json.loads(line) for line in log_file if line.strip()]
    return [row for row in rows if "round" in row]


def run_lpo(run, pipe):
    """Train the tiny LPO run round by round and judge each round's LoRA against the base.
    Returns [{round, win_rate, win_low, win_high, n, match_base, match_tuned}], rounds 1..10."""
    win_path = os.path.join(run, WIN_FILE)
    wins = read_json(win_path, [])
    if len(logged_rounds(run)) > len(wins) + 1:
        sys.exit(f"figures.py: error: {run} holds an LPO run without {WIN_FILE}: pass another "
                 "--lpo_run (the win-rate after each round is only measured as the run goes)")
    config = lpo.get_config(["--model", "tiny"])
    captions = lpo.load_prompts(config.prompts, "validation_unique", EVAL_SAMPLES, unique=False,
                                strip=True)
    captions = [captions[i % len(captions)] for i in range(EVAL_SAMPLES)]
    images_base = None
    for round_number in range(len(wins) + 1, ROUNDS + 1):
        # --eval_samples 0: the judging is done here, the base images drawn only once
        argv = ["--model", "tiny", "--out", run, "--max_rounds", str(round_number),
                "--eval_samples", "0"]
        if os.path.isdir(run) and os.listdir(run):
            argv.append("--resume")
        lpo.main(lpo.get_config(argv))
        if images_base is None:
            images_base = generate(pipe, captions, config.eta)
        images_tuned = tuned_images(pipe, run, captions, config.eta)
        judged = judge_win_rate(images_tuned, images_base, captions)
        wins.append(dict(round=round_number, **judged))
        print(f"figures.py: after round {round_number}: {judged}", flush=True)
        with open(win_path, "w") as json_file:
            json.dump(wins, json_file, indent=1)
    return wins


# ----------------------------------------------------------------------------- figures
def framed(ax, image, matched):
    """One picture, upscaled 2x (nearest), in a green (judge: match) or red frame."""
    big = image.resize((64, 64), Image.NEAREST)
    ax.imshow(big, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_color("tab:green" if matched else "tab:red")
        spine.set_linewidth(3)


def plot_grid(pipe, run, path):
    """Base and tuned sample of each caption, same seeds, DDIM 20 eta 0 CFG 5. Returns the
    judge's figures: caption matches of each row, and tuned wins (higher human score)."""
    rows = {"base": generate(pipe, CAPTIONS, eta=0.0)}
    rows["LPO"] = tuned_images(pipe, run, CAPTIONS, eta=0.0)
    scores = {name: judge_scores(images, CAPTIONS) for name, images in rows.items()}
    wins = int((scores["LPO"]["human"] > scores["base"]["human"]).sum())
    labels = {name: f"{name}\nmatch {int(scores[name]['match'].sum())}/15" for name in rows}
    # wins: the judge's human score (caption first, looks second) of tuned above base
    labels["LPO"] += f"\nwins {wins}/15"
    fig, axes = plt.subplots(2, len(CAPTIONS), figsize=(12, 2.4))
    for row, (name, images) in enumerate(rows.items()):
        match = scores[name]["match"]  # (15,) 1.0 where the judge reads the caption
        for column in range(len(CAPTIONS)):
            framed(axes[row, column], images[column], match[column])
        axes[row, 0].set_ylabel(labels[name], fontsize=8)
    for column, caption in enumerate(CAPTIONS):
        axes[0, column].set_title(caption[2:].replace(" ", "\n"), fontsize=7)
    fig.subplots_adjust(left=0.065, right=0.995, top=0.8, bottom=0.02, wspace=0.1, hspace=0.08)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return labels


def lrm_accuracies():
    """{name: pair_accuracy(...)} of the shipped tiny LRM and of an untrained one."""
    pairs = lrm.load_pairs(os.path.join(ROOT, "tiny", "pickapic"), "validation_unique")
    vae = AutoencoderKL.from_pretrained(BASE, subfolder="vae")
    shipped = LatentRewardModel.from_pretrained(os.path.join(ROOT, "tiny", "lrm"), base=BASE)
    # the control: the base U-Net as LRM with its projection heads at their random init
    torch.manual_seed(0)
    untrained = LatentRewardModel.from_base(BASE)
    models = {"tiny LRM (tiny/lrm)": shipped, "untrained LRM (base U-Net, random heads)": untrained}
    accuracies = {name: lrm.pair_accuracy(model, pairs, TIMESTEPS, vae)
                  for name, model in models.items()}
    return accuracies, len(pairs)


def plot_lrm_accuracy(path):
    accuracies, n_pairs = lrm_accuracies()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for (name, accuracy), color in zip(accuracies.items(), ("tab:blue", "tab:gray")):
        decisive = list(accuracy["decisive"].values())
        ties_half = list(accuracy["ties_half"].values())
        ax.plot(TIMESTEPS, decisive, "o-", color=color, ms=3, label=f"{name}, decisive pairs")
        label = f"{name}, every pair (a tie scores 0.5)"
        ax.plot(TIMESTEPS, ties_half, "s--", color=color, ms=3, label=label)
    ax.axhline(0.5, color="black", lw=0.8, ls=":", label="chance")
    ax.set_xlabel("t (both images noised to t)")
    ax.set_ylabel("pair accuracy")
    ax.set_title(f"tiny LRM, validation_unique ({n_pairs} pairs)", fontsize=10)
    ax.set_ylim(0.4, 0.9)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return accuracies


def plot_training(run, wins, path):
    rows = logged_rounds(run)
    rounds = [row["round"] + 1 for row in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    left.plot(rounds, [row["kept_frac"] for row in rows], "o-", label="kept fraction")
    left.plot(rounds, [row["acc"] for row in rows], "s-", label="implicit accuracy")
    left.set_xlabel("round")
    left.set_xticks(rounds)
    left.set_ylim(0, 1)
    left.set_title("LPO rounds (log.jsonl)", fontsize=10)
    left.legend(fontsize=8)
    # round 0 is the base itself: a win-rate of 0.5 by definition
    rate = np.array([0.5] + [win["win_rate"] for win in wins])
    low = np.array([0.5] + [win["win_low"] for win in wins])
    high = np.array([0.5] + [win["win_high"] for win in wins])
    interval = np.stack([rate - low, high - rate])  # (2, rounds + 1)
    right.errorbar(range(len(rate)), rate, yerr=interval, fmt="o-", capsize=3, color="tab:green")
    right.axhline(0.5, color="black", lw=0.8, ls=":")
    right.set_xlabel("round (0: the base)")
    right.set_xticks(range(len(rate)))
    right.set_ylabel("judge win-rate, tuned vs base")
    title = f"judge win-rate with 95% interval ({wins[0]['n']} seeds)"
    right.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(args):
    os.makedirs(args.out, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = load_pipeline(device)
    wins = run_lpo(args.lpo_run, pipe)
    plot_training(args.lpo_run, wins, os.path.join(args.out, "tiny_lpo_training.png"))
    match = plot_grid(pipe, args.lpo_run, os.path.join(args.out, "tiny_base_vs_tuned.png"))
    accuracies = plot_lrm_accuracy(os.path.join(args.out, "tiny_lrm_accuracy_vs_t.png"))
    print(f"figures.py: grid (15 captions, eta 0): {match}")
    for name, accuracy in accuracies.items():
        shown = " ".join(f"t={t}: {value:.3f}" for t, value in accuracy["decisive"].items())
        print(f"figures.py: {name}, decisive pairs: {shown}")
    for win in wins:
        print(f"figures.py: round {win['round']}: {win}")
    print(f"figures.py: PNGs in {args.out}")


if __name__ == "__main__":
    main(parse_args())
