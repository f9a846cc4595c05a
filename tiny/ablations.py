"""The paper's core claim and its ablations on the tiny world (arXiv 2502.01051v3, analysis: the
LRM's accuracy against t, the cost of a step reward, MPCF, VFE, the optimisation timesteps, beta;
table numbers as in the paper's NeurIPS 2025 version).

    python tiny/ablations.py --jobs 2      # 2 CPU cores: ~35 min -> docs/ablations.{json,md,png}
    python tiny/ablations.py               # one row at a time, one thread: ~65 min
    python tiny/ablations.py --seeds 0,1,2 # a third seed of every LPO row (~20 min with --jobs 2)
    python tiny/ablations.py --redo pixel-s0,pixel-s1      # run those rows again
    python tiny/ablations.py --quick       # a minute or two: every part, with short settings

Rows, most informative first (each one's result is written to the json the moment it is done, and
a rerun skips the rows found there: a killed run goes on where it stopped):
  curve      the core claim: pair accuracy against t on test_unique of (a) the shipped LRM on the
             noisy latents and (b) the SPO-style pixel reward, the tiny judge on the VAE-decoded
             x0-prediction of the base U-Net (CFG 5, the sampler's), from the same noisy latents;
             the cost of one scoring step of each (same batch, one CPU thread); the judge's scale
  <variant>-s<seed>   lpo.py --model tiny with one change (VARIANTS), --seeds 0,1: the judge's
             win-rate of tuned over base, 300 held-out samples, bootstrap 95% interval
  lrm-novfe, lrm-nompcf   the LRMs that the no-vfe and no-mpcf rows need (lrm.py --model tiny)
Run folders: runs/ablations/<row>. The pixel reward (JudgeReward) and the [750, 950] window are
plugged into lpo.py from here, in-process (lpo.load_lrm, lpo.make_schedule), not added to it.
The judge's human score is scaled by the factor that fits the human labels of the train pairs
best under the LRM's own Bradley-Terry loss (lrm.pair_loss), so that lpo.py's thresholds, which
are on softmax gaps of scores, mean for it what they mean for an LRM trained on those labels.
"""
import argparse
import json
import os
import shlex
import shutil
import statistics
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from functools import partial
from multiprocessing import get_context

import torch
from diffusers import DiffusionPipeline
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import default_collate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # `python tiny/ablations.py` runs from anywhere

import lpo  # noqa: E402
import lrm  # noqa: E402
from lrm_model import LatentRewardModel  # noqa: E402
from models import encode_for_cfg, guided_prediction, uncond_then_cond  # noqa: E402
from tiny.world import judge_scores  # noqa: E402

BASE = os.path.join(ROOT, "tiny", "sd15")
DATA = os.path.join(ROOT, "tiny", "pickapic")
SHIPPED_LRM = os.path.join(ROOT, "tiny", "lrm")
LEVELS = [1, 101, 251, 401, 501, 651, 751, 851, 951]  # of the 20-step DDIM grid
QUICK_LEVELS = [1, 501, 951]
GUIDANCE = 5.0  # the sampler's CFG (lpo.py): the x0-prediction a step reward would see
SEEDS = "0,1"  # --seeds: two a row (more: --seeds 0,1,2 adds rows to the json)
COLORS = ("black", "purple", "darkorange", "teal")  # of the seeds in the picture

# name -> (what changes, lpo.py options, the LRM row it needs, the paper's figure, what the tiny
# world can and cannot say about full scale)
VARIANTS = {
    "full": ("the full recipe", [], None,
             "Tab. 2: LPO 21.69, base 20.56",
             "the reference; seed 0 is the README's quickstart. The intervals hold the "
             "evaluation's noise only: the spread over training seeds comes on top"),
    "pixel": ("judge on the x0-prediction (SPO)", [], None,
              "Tab. 2: SPO (a pixel step reward) 21.22",
              "the judge is the rater itself (the labels' source): a pixel reward no real model "
              "matches, reading a 32 px picture, so the tiny row favours the pixel path"),
    "no-threshold": ("no threshold", ["--th_min", "0", "--th_max", "0"], None,
                     "Tab. 10: constant 0.3 21.22, 0.5 21.57; dynamic [0.35, 0.5] 21.69",
                     "every step group gives a pair, near-ties the LRM cannot rank included: a "
                     "scale-free mechanism, but its size depends on the LRM's score spread "
                     "(tiny thresholds 0.1 -> 0.2)"),
    "greedy": ("continue from the best child", ["--continuation", "best"], None,
               "none (random child)",
               "greedy trajectories visit fewer bad states; 15 captions and 10 rounds cannot show "
               "what it costs in diversity on a real prompt set"),
    "t750": ("pairs from t in [750, 950] only", [], None,
             "Tab. 9: [750, 950] 21.54, [0, 950] 21.69",
             "the window keeps 5 of the 20 steps' pairs (kept column), so it also trains on ~3x "
             "fewer pairs, as the paper's run did; here the caption is read best at low noise "
             "(the curve), the steps the window drops"),
    "lrm-t-parent": ("LRM told the parent's t", ["--lrm_t", "parent"], None,
                     "none (Tab. 22: a fixed t = 0 gives 19.64)",
                     "a 50-step shift of the t the LRM is told, small for an LRM whose accuracy "
                     "is smooth in t, here as in the paper"),
    "beta50": ("beta 50", ["--beta", "50"], None, "Tab. 23: beta 20 21.53, 100 21.68, 500 21.69",
               "beta scales a log-ratio that is a mean over C x H x W (size-free), but the tiny "
               "lr is 20x the paper's, so the best beta need not transfer"),
    "beta5000": ("beta 5000", ["--beta", "5000"], None, "Tab. 23: beta 1000 21.39, 5000 20.95",
                 "as beta 50; a large beta saturates the loss on few pairs while the ratio clip "
                 "(0.1) bounds each move: the same mechanism at full scale"),
    "no-vfe": ("LRM without VFE (g = 1)", ["--lrm", "{runs}/lrm-novfe"], "lrm-novfe",
               "Tab. 8: g = 1 21.51, g = 7.5 21.69",
               "the tiny U-Net's mid feature is 64 wide and its prompts 15 short captions: "
               "what VFE amplifies (cond - uncond) is far simpler than SD1.5's, so this says "
               "little about VFE at full scale"),
    "no-mpcf": ("LRM trained on all pairs", ["--lrm", "{runs}/lrm-nompcf"],
                "lrm-nompcf", "Tab. 7: no MPCF 21.49, strategy 2 21.69",
                "acts through the LRM: less accurate, smaller score gaps, fewer pairs kept; the "
                "tiny labels are the judge's with 10% flipped and MPCF's scorers the judge's "
                "parts, a cleaner filter than at full scale"),
}
LRM_TRAININGS = {"lrm-novfe": ["--vfe_scale", "1"], "lrm-nompcf": ["--keep", ""]}


def plan(seeds):
    """Every row in the order it runs: name -> (kind, the row it needs or None)."""
    rows = {"curve": ("curve", None)}
    for seed in seeds:
        for variant, (*_, needs, _paper, _note) in VARIANTS.items():
            if needs and needs not in rows:
                rows[needs] = ("lrm", None)
            rows[f"{variant}-s{seed}"] = ("lpo", "curve" if variant == "pixel" else needs)
    return rows


# ----------------------------------------------------------------------------- the pixel reward
def predicted_x0(eps, x_t, t, alphas_cumprod):
    """DDPM's x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t): the clean latent the U-Net predicts."""
    a_t = lpo.per_sample(lpo.alpha_bar(alphas_cumprod, t), x_t)  # (B, 1, 1, 1)
    return (x_t.float() - (1 - a_t).sqrt() * eps) / a_t.sqrt()


def decoded_images(vae, latents):
    """Latents as the pipeline's -> uint8 (H, W, 3) arrays, converted as the pipeline does."""
    pixels = vae.decode(latents / vae.config.scaling_factor).sample  # (B, 3, H, W) in [-1, 1]
    pixels = ((pixels / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return list(pixels.permute(0, 2, 3, 1).numpy())


class JudgeReward:
    """SPO's pixel step reward with the LRM's interface (encode_text, score), so that lpo.py runs it
    unchanged: per child the frozen base U-Net's CFG x0-prediction at the child's t (a separate
    copy: no LoRA), the VAE decode, the judge's human score times `scale`."""
    text_trained = True  # load_pipeline: no frozen text encoders to share with the pipeline

    def __init__(self, scale, device="cpu"):
        self.pipe = DiffusionPipeline.from_pretrained(BASE).to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.scale = scale
        self.alphas_cumprod = self.pipe.scheduler.alphas_cumprod.to(device)

    def encode_text(self, prompts):
        """The CFG conditioning of each prompt, and which distinct caption it is."""
        distinct = list(dict.fromkeys(prompts))
        both = encode_for_cfg(self.pipe, prompts, 0)["encoder_hidden_states"]  # (2B, L, D)
        index = torch.tensor([distinct.index(prompt) for prompt in prompts])  # (B,)
        cond = dict(encoder_hidden_states=both[len(prompts):], index=index)
        return dict(cond=cond, uncond=both[:1], captions=distinct)

    def x0(self, latents, t, text):
        """The base's CFG x0-predictions of latents (B, C, h, w) at t (a number or (B,))."""
        context = uncond_then_cond(text["uncond"], text["cond"]["encoder_hidden_states"])
        t = torch.as_tensor(t, device=latents.device).reshape(-1).expand(len(latents))  # (B,)
        eps = guided_prediction(self.pipe.unet, latents, t, dict(encoder_hidden_states=context),
                                GUIDANCE)
        return predicted_x0(eps, latents, t, self.alphas_cumprod)

    @torch.no_grad()
    def score(self, latents, timesteps, prompts=None, text=None):
        """scale x the judge's human score of each latent's decoded x0-prediction. (B,)"""
        text = self.encode_text(prompts) if text is None else text
        captions = [text["captions"][i] for i in text["cond"]["index"].tolist()]
        human = judge_scores(decoded_images(self.pipe.vae, self.x0(latents, timesteps, text)),
                             captions)["human"]
        return self.scale * torch.from_numpy(human).float()


def fit_scale(pairs):
    """The factor c for which softmax([c h_0, c h_1]) of the judge's human scores h of the clean
    images fits the pairs' labels best under lrm.pair_loss (the LRM's loss, weights 1 / examples
    per prompt): a grid over 10^-2..10^2. -> (c, its loss)"""
    images = [lrm.decode_image(cell) for column in ("jpg_0", "jpg_1") for cell in pairs[column]]
    captions = list(pairs["caption"]) * 2
    human = torch.from_numpy(judge_scores(images, captions)["human"]).view(2, -1)  # (2, N)
    labels = [torch.tensor(pairs[column], dtype=torch.float64) for column in ("label_0", "label_1")]
    weight = 1 / torch.tensor(pairs["num_example_per_prompt"], dtype=torch.float64).clamp(min=1)
    grid = torch.logspace(-2, 2, 801, dtype=torch.float64)
    losses = torch.stack([lrm.pair_loss(c * human[0], c * human[1], *labels, weight)
                          for c in grid])
    best = losses.argmin()
    return grid[best].item(), losses[best].item()


# ----------------------------------------------------------------------------- row: the curve
def credit(scores, labels):
    """Decisive pairs ranked right (equal scores: half) and their number. (2b,), (b, 2) -> 2 x ()"""
    s0, s1 = scores.float().view(-1, 2).T  # (b,) each
    label_0, label_1 = labels.T
    right = ((s0 > s1) == (label_0 > label_1)).double().where(s0 != s1, 0.5)  # (b,)
    decisive = label_0 != label_1
    return right[decisive].sum(), decisive.sum()


def seconds_per_image(function, repeats, batch):
    """Median wall time of function() over `repeats` calls, per image of a batch of `batch`."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times) / batch


@torch.no_grad()
def step_reward_cost(shipped, reward, noisy, t, texts, captions, repeats):
    """One scoring step of each reward on the same batch, per image: the LRM's score (VFE: the
    conditional and unconditional passes) vs x0-prediction + VAE decode + judge (the text encoded
    beforehand for both, as lpo.py caches it per prompt)."""
    lrm_text, pixel_text = texts
    x0 = reward.x0(noisy, t, pixel_text)
    images = decoded_images(reward.pipe.vae, x0)
    parts = dict(lrm=partial(shipped.score, noisy, t, text=lrm_text),
                 x0_prediction=partial(reward.x0, noisy, t, pixel_text),
                 vae_decode=partial(decoded_images, reward.pipe.vae, x0),
                 judge=partial(judge_scores, images, captions))
    per_image = {name: seconds_per_image(part, repeats, len(noisy)) for name, part in parts.items()}
    pixel = per_image["x0_prediction"] + per_image["vae_decode"] + per_image["judge"]
    return dict(seconds_per_image=per_image, pixel_over_lrm=pixel / per_image["lrm"],
                batch=len(noisy), t=t, repeats=repeats, threads=torch.get_num_threads())


@torch.no_grad()
def curve_row(args, runs):
    """The core claim on test_unique: accuracy against t of the LRM and of the pixel reward on the
    same noisy latents (lrm.pair_accuracy's: its Pairs, noise and batches, seed 0), the judge on the
    clean images and on the VAE-decoded clean latents, the step cost, and the judge's scale."""
    levels = QUICK_LEVELS if args.quick else LEVELS
    train = lrm.load_pairs(DATA, "train")
    scale, scale_loss = fit_scale(train.select(range(400)) if args.quick else train)
    reward = JudgeReward(scale)
    shipped = LatentRewardModel.from_pretrained(SHIPPED_LRM, base=BASE).for_scoring()
    vae = reward.pipe.vae
    noise_scheduler = lrm.noise_schedule(BASE)[0]
    pairs = lrm.load_pairs(DATA, "test_unique")
    rows = range(len(pairs))[:args.max_pairs or None]
    data = lrm.Pairs(pairs, shipped.resolution, lrm.latent_shape(vae, shipped.resolution), [0], 0)
    sums = {}  # name -> (2,) right, decisive
    cost = None
    for start in range(0, len(rows), 32):  # lrm.pair_accuracy's batches
        batch = default_collate([data[(0, row)] for row in rows[start:start + 32]])
        latents, noise = lrm.pair_latents(vae, batch, "cpu")  # (2b, C, h, w), pairs adjacent
        captions = [caption for caption in batch["caption"] for _ in range(2)]
        texts = shipped.encode_text(captions), reward.encode_text(captions)
        clean = ((batch["px"].flatten(0, 1) + 1) * 127.5).round().to(torch.uint8)  # (2b, 3, H, W)
        judged = {"judge, clean images": list(clean.permute(0, 2, 3, 1).numpy()),
                  "judge, VAE-decoded clean latents": decoded_images(vae, latents)}
        scores = {name: torch.from_numpy(judge_scores(images, captions)["human"])
                  for name, images in judged.items()}
        for t in levels:
            t_batch = torch.full((len(latents),), t)  # (2b,)
            noisy = lrm.add_noise(noise_scheduler, latents, noise, t_batch)
            scores[f"lrm@{t}"] = shipped.score(noisy, t_batch, text=texts[0])
            scores[f"pixel@{t}"] = reward.score(noisy, t_batch, text=texts[1])
            if cost is None and t == levels[len(levels) // 2]:  # the first batch, mid noise
                cost = step_reward_cost(shipped, reward, noisy, t, texts, captions,
                                        1 if args.quick else 5)
        for name, score in scores.items():
            sums[name] = sums.get(name, 0) + torch.stack(credit(score, batch["label"]))
    accuracy = {name: (right / decisive).item() for name, (right, decisive) in sums.items()}
    return dict(levels=levels, pairs=len(rows), decisive=int(next(iter(sums.values()))[1]),
                lrm={t: accuracy[f"lrm@{t}"] for t in levels},
                pixel={t: accuracy[f"pixel@{t}"] for t in levels},
                clean={name: accuracy[name] for name in judged}, cost=cost,
                judge_scale=scale, judge_scale_loss=scale_loss)


# ----------------------------------------------------------------------------- rows: LRM, LPO
def lrm_row(name, args, runs):
    """Train one ablated LRM with lrm.py (the tiny preset: 400 steps of 32 pairs) ->
    its accuracy table on validation_unique and test_unique."""
    out = os.path.join(runs, name)
    quick = ["--max_train_steps", "10", "--eval_every", "10", "--save_every", "10",
             "--eval_max_pairs", "32"] if args.quick else []
    table = lrm.main(lrm.get_config(["--model", "tiny", "--out", out, *LRM_TRAININGS[name],
                                     *quick]))
    return dict(out=os.path.relpath(out, ROOT), options=LRM_TRAININGS[name],
                accuracy=lrm.by_label(table))


def with_window(make_schedule):
    """make_schedule whose thresholds keep no pair below t = 750 (1: an infinite score gap), the
    paper's optimisation timesteps [750, 950] ablation."""
    def windowed(*args, **kwargs):
        schedule = make_schedule(*args, **kwargs)
        low = schedule.timesteps < 750
        schedule.thresholds = schedule.thresholds.masked_fill(low, 1.0)
        return schedule
    return windowed


def judge_loader(scale):
    """lpo.load_lrm's stand-in: the pixel reward, whatever LRM folder lpo.py names."""
    def load(*args, **kwargs):
        return JudgeReward(scale)
    return load


def lpo_row(name, args, runs, needed):
    """One lpo.py --model tiny run -> its judge win-rate and what its log.jsonl says of it."""
    variant, seed = name.rsplit("-s", 1)
    options = [option.format(runs=runs) for option in VARIANTS[variant][1]]
    out = os.path.join(runs, name)
    quick = ["--max_rounds", "1", "--eval_samples", "20"] if args.quick else []
    argv = ["--model", "tiny", "--out", out, "--seed", seed, *options, *quick]
    saved = lpo.load_lrm, lpo.make_schedule
    if variant == "pixel":
        lpo.load_lrm = judge_loader(needed["judge_scale"])
    if variant == "t750":
        lpo.make_schedule = with_window(lpo.make_schedule)
    start = time.perf_counter()
    try:
        result = lpo.main(lpo.get_config(argv))
    finally:
        lpo.load_lrm, lpo.make_schedule = saved
    with open(os.path.join(out, "log.jsonl")) as log:
        rounds = [row for row in map(json.loads, log) if "round" in row]
    figures = {key: result[key] for key in ("win_rate", "win_low", "win_high", "n", "match_base",
                                            "match_tuned", "step")}
    return dict(figures, command=("python lpo.py " + " ".join(argv)).replace(ROOT + os.sep, ""),
                seconds=round(time.perf_counter() - start, 1),
                pairs=sum(row["tuples"] for row in rounds),
                kept_frac=statistics.mean(row["kept_frac"] for row in rounds),
                reward_gap=statistics.mean(row["lrm_gap"] for row in rounds),
                sec_score=round(sum(row["sec_score"] for row in rounds), 1),
                sec_sample=round(sum(row["sec_sample"] for row in rounds), 1))


def run_row(name, kind, args, runs, needed):
    """One row, from a clean run folder (a killed row's leftovers go). -> its result"""
    torch.set_num_threads(1)  # as lpo.py's and lrm.py's tiny presets
    shutil.rmtree(os.path.join(runs, name), ignore_errors=True)
    try:
        if kind == "curve":
            return curve_row(args, runs)
        if kind == "lrm":
            return lrm_row(name, args, runs)
        return lpo_row(name, args, runs, needed)
    except SystemExit as error:  # a stage's one-line refusal: told, not a worker's exit
        raise RuntimeError(f"row {name}: {error}") from None


# ----------------------------------------------------------------------------- table, picture
def interval(row):
    return f"{row['win_rate']:.3f} [{row['win_low']:.3f}, {row['win_high']:.3f}]"


def verdict(variant, results, seeds):
    """Against the full recipe, seed by seed: a difference counts where the 95% intervals are
    disjoint; else the direction of the point estimates."""
    pairs = [(results[f"{variant}-s{seed}"], results[f"full-s{seed}"]) for seed in seeds
             if f"{variant}-s{seed}" in results and f"full-s{seed}" in results]
    if not pairs:
        return "not run yet"
    below = sum(row["win_high"] < full["win_low"] for row, full in pairs)
    above = sum(row["win_low"] > full["win_high"] for row, full in pairs)
    lower = sum(row["win_rate"] < full["win_rate"] for row, full in pairs)
    count = len(pairs)
    if below == count or above == count:
        return f"{'below' if below else 'above'} full in {count}/{count} seeds (intervals disjoint)"
    if below or above:
        return (f"disjoint from full in {below + above}/{count} seeds ({below} below, {above} "
                f"above), overlapping otherwise")
    return f"no difference shown (intervals overlap; point estimate lower in {lower}/{count})"


def mean_over_seeds(variant, results, seeds):
    """The mean win-rate over the seeds run, and its difference to the full recipe's mean over
    the same seeds."""
    both = [seed for seed in seeds
            if f"{variant}-s{seed}" in results and f"full-s{seed}" in results]
    if not both:
        return "-"
    rate, full = (statistics.mean(results[f"{name}-s{seed}"]["win_rate"] for seed in both)
                  for name in (variant, "full"))
    return f"{rate:.3f}" if variant == "full" else f"{rate:.3f} ({rate - full:+.3f})"


def markdown(results, seeds):
    """The tables of the json's results (the LPO rows of `seeds`), in markdown."""
    lines = []
    curve = results.get("curve")
    if curve:
        lines += ["Core claim: pair accuracy on test_unique (decisive pairs, "
                  f"{curve['decisive']} of {curve['pairs']}) against t, the same noisy latents",
                  "", "| t | " + " | ".join(str(t) for t in curve["levels"]) + " |",
                  "|---|" + "---|" * len(curve["levels"])]
        for name, key in (("LRM (tiny/lrm), noisy latent", "lrm"),
                          ("judge on the base's x0-prediction", "pixel")):
            values = " | ".join(f"{curve[key][str(t)]:.3f}" for t in curve["levels"])
            lines.append(f"| {name} | {values} |")
        clean = ", ".join(f"{name} {value:.3f}" for name, value in curve["clean"].items())
        cost = curve["cost"]
        parts = ", ".join(f"{name} {value * 1e3:.2f} ms" for name, value in
                          cost["seconds_per_image"].items())
        lines += ["", f"Reference: {clean}. Paper: LRM-1.5 65.5% at t=0, 67.2% at t=200 "
                  "(val+test; Tab. 18); the pixel reward fails at high noise.",
                  f"Cost per image (batch {cost['batch']}, t={cost['t']}, {cost['threads']} CPU "
                  f"thread, median of {cost['repeats']}): {parts}; pixel / LRM = "
                  f"{cost['pixel_over_lrm']:.1f}x (paper Tab. 5, A100: (0.019 + 0.031 + 0.006) "
                  f"/ 0.005 = 11.2x). Judge scale for the pixel reward: "
                  f"{curve['judge_scale']:.3g}.", ""]
    lines += ["| row | lpo.py change | " + " | ".join(f"seed {seed}" for seed in seeds) +
              " | mean (- full) | kept | vs full | paper: SD1.5 PickScore (Tab.) "
              "| tiny vs full scale |",
              "|---|---|" + "---|" * len(seeds) + "---|---|---|---|---|"]
    for variant, (what, options, _needs, paper, note) in VARIANTS.items():
        runs = [results.get(f"{variant}-s{seed}") for seed in seeds]
        cells = [interval(row) if row else "-" for row in runs]
        kept = [f"{row['kept_frac']:.2f}" for row in runs if row]
        shown = " ".join(options).replace("{runs}", "runs/ablations") or "-"
        lines.append(f"| {variant}: {what} | `{shown}` | " + " | ".join(cells) +
                     f" | {mean_over_seeds(variant, results, seeds)} | {' / '.join(kept) or '-'} | "
                     f"{'-' if variant == 'full' else verdict(variant, results, seeds)} | "
                     f"{paper} | {note} |")
    lines.append("")
    for name in LRM_TRAININGS:
        if name in results:
            test = results[name]["accuracy"]["test_unique"]["decisive"]
            shown = ", ".join(f"t={t} {value:.3f}" for t, value in test.items())
            lines.append(f"- {name} (`lrm.py --model tiny {shlex.join(LRM_TRAININGS[name])}`), "
                         f"test_unique decisive pairs: {shown}")
            shipped = {t: curve["lrm"][t] for t in test if curve and t in curve["lrm"]}
            if shipped:
                shown = ", ".join(f"t={t} {value:.3f}" for t, value in shipped.items())
                lines.append(f"  (the shipped tiny/lrm, the same pairs and noise: {shown})")
    return "\n".join(lines) + "\n"


def picture(results, path, seeds):
    """Left: accuracy against t (LRM, pixel reward, the clean judge); right: each row's win-rate
    with its 95% interval, one mark a seed. PIL only (matplotlib is not a requirement)."""
    image = Image.new("RGB", (1200, 440), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=13)
    left = (50, 40, 450, 350)  # the panel's box: left, top, right, bottom

    def left_xy(t, accuracy):  # t in [0, 1000], accuracy in [0.4, 1.0]
        return (left[0] + t / 1000 * (left[2] - left[0]),
                left[3] - (accuracy - 0.4) / 0.6 * (left[3] - left[1]))
    draw.text((left[0], 12), "pair accuracy vs t (test_unique, the same noisy latents)", "black",
              font)
    for tick in (0.5, 0.6, 0.7, 0.8, 0.9):
        draw.line([left_xy(0, tick), left_xy(1000, tick)], "#dddddd")
        draw.text((left[0] - 30, left_xy(0, tick)[1] - 7), f"{tick:.1f}", "black", font)
    for t in (0, 250, 500, 750, 1000):
        draw.text((left_xy(t, 0.4)[0] - 10, left[3] + 4), str(t), "black", font)
    draw.text((left[2] - 10, left[3] + 20), "t", "black", font)
    draw.line([left_xy(0, 0.5), left_xy(1000, 0.5)], "gray", 2)  # chance
    curve = results.get("curve")
    lines = [("LRM (tiny/lrm) on the noisy latent", "blue", "lrm"),
             ("judge on the base's x0-prediction (SPO-style)", "red", "pixel"),
             ("judge on the clean images", "green", None), ("chance", "gray", None)]
    if curve:
        clean = curve["clean"]["judge, clean images"]
        draw.line([left_xy(0, clean), left_xy(1000, clean)], "green", 2)
        for _, color, key in lines[:2]:
            points = [left_xy(t, curve[key][str(t)]) for t in curve["levels"]]
            draw.line(points, color, 3)
            for x, y in points:
                draw.ellipse([x - 4, y - 4, x + 4, y + 4], color)
    for i, (label, color, _) in enumerate(lines):
        y = left[3] + 30 + 14 * i
        draw.line([(left[0], y), (left[0] + 30, y)], color, 3)
        draw.text((left[0] + 36, y - 7), label, "black", font)
    draw.rectangle(left, outline="black")
    right = (820, 40, 1180, 350)
    step = (right[3] - right[1]) / len(VARIANTS)

    def right_x(rate):  # win-rate in [0.4, 1]
        return right[0] + (rate - 0.4) / 0.6 * (right[2] - right[0])
    marks = ", ".join(f"{seed} {color}" for seed, color in zip(seeds, COLORS))
    draw.text((520, 12), f"judge win-rate of tuned over base, 95% interval (seeds: {marks}; "
              "blue: full's mean)", "black", font)
    for rate in (0.5, 0.6, 0.7, 0.8, 0.9):  # 0.5: no better than the base
        draw.line([(right_x(rate), right[1]), (right_x(rate), right[3])],
                  "gray" if rate == 0.5 else "#dddddd", 2 if rate == 0.5 else 1)
        draw.text((right_x(rate) - 10, right[3] + 4), f"{rate:.1f}", "black", font)
    full = [results[f"full-s{seed}"]["win_rate"] for seed in seeds if f"full-s{seed}" in results]
    if full:  # the full recipe's mean over the seeds
        x = right_x(statistics.mean(full))
        draw.line([(x, right[1]), (x, right[3])], "lightskyblue", 2)
    for index, (variant, (what, *_)) in enumerate(VARIANTS.items()):
        middle = right[1] + (index + 0.5) * step
        draw.text((520, middle - 7), f"{variant}: {what}"[:42], "black", font)
        for seed, color in zip(seeds, COLORS):
            row = results.get(f"{variant}-s{seed}")
            if row:
                y = middle + (seeds.index(seed) - (len(seeds) - 1) / 2) * 7
                draw.line([(right_x(row["win_low"]), y), (right_x(row["win_high"]), y)], color, 2)
                x = right_x(row["win_rate"])
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], color)
    draw.rectangle(right, outline="black")
    image.save(path)


# ----------------------------------------------------------------------------- main
def read_results(path):
    if not os.path.exists(path):
        return {}
    with open(path) as results_file:
        return json.load(results_file)["rows"]


def record(path, results, name, result, args):
    """A row's result into the json, replaced whole (a kill leaves the last complete one).
    -> the results as the json holds them (keys as strings), which markdown() and picture() read"""
    results = dict(results, **{name: result})
    seeds = ",".join(str(seed) for seed in args.seeds)
    body = dict(command=f"python tiny/ablations.py --jobs 2 --seeds {seeds}"
                + (" --quick" if args.quick else ""), quick=args.quick, rows=results)
    with open(path + ".tmp", "w") as results_file:
        json.dump(body, results_file, indent=1)
    os.replace(path + ".tmp", path)
    print(f"ablations.py: {name} done: {result}", flush=True)
    return json.loads(json.dumps(results))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short settings (the test's)")
    parser.add_argument("--docs", default="", help="folder of ablations.{json,md,png} "
                        "(default docs/; --quick: runs/ablations-quick/)")
    parser.add_argument("--runs", default="", help="folder of the rows' run folders (default "
                        "runs/ablations, {docs}/runs with --docs; --quick: runs/ablations-quick)")
    parser.add_argument("--rows", default="", help="comma list: only these rows (and what they "
                        "need); default all")
    parser.add_argument("--redo", default="", help="comma list of rows to run again")
    parser.add_argument("--jobs", type=int, default=1, help="rows at a time (processes)")
    parser.add_argument("--seeds", default=SEEDS, help="comma list of the LPO rows' seeds")
    parser.add_argument("--max_pairs", type=int, default=0, help="curve: test pairs used "
                        "(0: all; --quick: 64)")
    args = parser.parse_args(argv)
    default = os.path.join(ROOT, "runs", "ablations-quick" if args.quick else "ablations")
    # another --docs is another set of rows: its run folders are its own (a row's folder is
    # emptied before it runs)
    args.runs = args.runs or (os.path.join(args.docs, "runs") if args.docs else default)
    args.docs = args.docs or (default if args.quick else os.path.join(ROOT, "docs"))
    args.max_pairs = args.max_pairs or (64 if args.quick else 0)
    args.seeds = [int(seed) for seed in args.seeds.split(",")]
    return args


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.docs, exist_ok=True)
    os.makedirs(args.runs, exist_ok=True)
    path = os.path.join(args.docs, "ablations.json")
    results = read_results(path)
    rows = plan(args.seeds)
    unknown = {name for name in (args.rows + "," + args.redo).split(",") if name} - set(rows)
    if unknown:
        sys.exit(f"ablations.py: error: unknown rows {sorted(unknown)}; rows: {list(rows)}")
    for name in filter(None, args.redo.split(",")):
        results.pop(name, None)
    wanted = [name for name in rows if not args.rows or name in args.rows.split(",")]
    wanted += [rows[name][1] for name in wanted if rows[name][1]]  # what they need
    todo = [name for name in rows if name in wanted and name not in results]
    print(f"ablations.py: {len(todo)} rows to run ({', '.join(todo) or 'none'}); "
          f"{len(results)} done in {path}", flush=True)
    pool = ProcessPoolExecutor(args.jobs, get_context("spawn")) if args.jobs > 1 else None
    running = {}  # future -> row
    while todo or running:
        ready = [name for name in todo if rows[name][1] in (None, *results)]
        started = ready[:max(0, args.jobs - len(running))]
        if not started and not running:  # (a row whose need failed: never ready)
            sys.exit(f"ablations.py: error: rows {todo} wait for rows that did not run")
        for name in started:
            todo.remove(name)
            kind, needs = rows[name]
            job = (name, kind, args, args.runs, results.get(needs))
            if pool is None:
                results = record(path, results, name, run_row(*job), args)
            else:
                running[pool.submit(run_row, *job)] = name
        if running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                name = running.pop(future)
                results = record(path, results, name, future.result(), args)
    if pool is not None:
        pool.shutdown()
    # the table and the picture: every seed the json holds LPO rows of
    lpo_rows = [name.rsplit("-s", 1) for name in results if name.rsplit("-s", 1)[0] in VARIANTS]
    seeds = sorted({*args.seeds, *(int(seed) for _, seed in lpo_rows)})
    table = markdown(results, seeds)
    with open(os.path.join(args.docs, "ablations.md"), "w") as table_file:
        table_file.write(table)
    picture(results, os.path.join(args.docs, "ablations.png"), seeds)
    print(table, flush=True)
    return results


if __name__ == "__main__":
    main()
