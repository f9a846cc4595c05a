"""Training of the Latent Reward Model (LRM, in lrm_model.py) on Pick-a-Pic preference pairs.

Paper: Zhang et al., "Diffusion Model as a Noise-Aware Latent Reward Model for Step-Level
Preference Optimization", arXiv 2502.01051v3, Sec. "Latent Reward Model" and its training details:
a Bradley-Terry loss on the LRM's scores of both images of a pair, noised to one shared t of the
base's 20-step sampling grid (SD1.5, SDXL: DDPM's t; SD3: 1000 sigma of its flow matching). The
validation accuracy is measured at --eval_timesteps (default: the grid's t nearest 0, 250, 500,
750 and 1000), the paper's noise awareness; best/ keeps the LRM best at the first of them.
    python lrm.py --model tiny                  # CPU: ~4 min of one core -> runs/lrm-tiny
    torchrun --nproc_per_node=2 lrm.py --model tiny --resume        # CPU (gloo): continue a run
    torchrun --nproc_per_node=8 lrm.py --model sd15 --keep runs/mpcf-sd15/keep.json
    torchrun --nproc_per_node=8 lrm.py --model sdxl --keep runs/mpcf-sd15/keep.json
    python lrm.py --model tiny-sd3              # CPU: ~2.5 min of one core -> runs/lrm-tiny-sd3
    torchrun --nproc_per_node=8 lrm.py --model sd3 --keep runs/mpcf-sd15/keep.json  # SD3-Medium
    torchrun --nproc_per_node=8 lrm.py --model ./my-sd15 --data /data/pickapic_v1  # paper settings
--out gets the final LRM (LatentRewardModel.from_pretrained reads it), best/, ckpt.pt and
metrics.jsonl (docs/reference.md: their contents, the --data layouts, what --resume keeps).
Reading order: Config, the math (pair_loss, learning_rate, add_noise), the data (Pairs),
train_step and pair_accuracy, then main: setup, the numbered loop, the final table.

Choices and deviations:
1. deviation: all_gather gathers per-image *scores*, not features: the Bradley-Terry loss couples
   only the two images of a pair, so it is the same loss and gradient for less traffic.
2. Each pair's randomness (t, VAE sample, noise) comes from (seed, epoch, row): on 1 process or 8,
   fresh or resumed, a pair sees the same noise (what lets the tests compare those runs).
3. deviation: no weight decay on 1-D parameters (biases, norms, logit_scale), as in CLIP training.
4. The learning rate is the official LRM config's (DeepSpeed WarmupDecayLR: log warm-up, then
   linear decay to 0). bf16 autocast on CUDA; micro-batches accumulate to the global batch.
5. Ties (0.5/0.5) train. Accuracy is reported on decisive pairs only, and as the official
   evaluation counts it (every pair, a tie scoring 0.5): the definition of the paper's 65.5-69.3%.
6. A pair with an undecodable image gets weight 0; more than 1% of them stops the run, decided on
   the totals at each epoch's end (the whole data) and at the last step.
7. deviation (tiny world only): lr 1e-3, weight decay 0.01, 400 steps x 32 pairs of MPCF's kept
   rows (tiny/pickapic/mpcf_keep.json, made by `python mpcf.py --model tiny`), one CPU thread.
8. SD3: the LRM reads the first --lrm_blocks MMDiT blocks (paper: 18 of SD3-Medium's 24), its
   text encoders stay frozen (paper) and ckpt.pt leaves them out; it trains on the grid's levels
   below sigma = 1 (pure noise: no signal). No SD3 recipe in the paper: the presets take SDXL's.
9. Several processes shard what trains with FSDP2 (--shard; the official code: DeepSpeed ZeRO-2),
   not ZeRO-1 (whole weights and gradients on every rank: 16.5 GB for SDXL); the parts never run
   stay on the CPU. Checkpoints hold whole tensors: a run resumes on any world size.
"""
import math
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import transformers
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm import tqdm

from data import check_decodable, decode_image, load_pairs
from lrm_model import LatentRewardModel, mmdit_blocks
from models import BASES, geometry, is_flow_matching, load_denoiser_config, resolve_model
from distributed import (NonFiniteUpdate, apply_update, barrier, close_distributed, gather_objects,
                         gather_training, local_numel, mixed_precision, scatter_training, shard,
                         setup_distributed, stop_non_finite, whole_state)
from runs import (command_line, fail, first_line, kill_point, log_jsonl, open_run, parse_config,
                  peek, restart_log, run_folder, warn, write_checkpoint, write_or_fail)

# what a resume may change: the schedule, and how the run executes (on as many processes as it
# likes: the checkpoint holds whole tensors, the global batches are the same rows)
MAY_CHANGE = ("lr", "max_train_steps", "warmup", "eval_every", "save_every", "micro_batch_size",
              "vae_batch_size", "workers", "threads", "dist_timeout", "grad_ckpt", "shard",
              "world_size")


# ----------------------------------------------------------------------------- config
@dataclass
class Config:
    """A run's settings: Config's defaults, then --model's preset (PRESETS), then the command line,
    one option per field (runs.build_parser; the comment after a field is its --help)."""
    model: str = "tiny"  # sd15 | sdxl | sd3 | sd35 | tiny | tiny-xl | tiny-sd3, or a pipeline / id
    base: str = ""  # base pipeline (hub id or folder) instead of --model's; then --data too
    data: str = "yuvalkirstain/pickapic_v1"  # pairs: hub id or folder (docs/reference.md)
    keep: str = ""  # rows kept by mpcf.py: JSON list of train rows, or parquet / CSV `index`
    out: str = ""  # run folder, default runs/lrm-{model}
    resume: bool = False  # continue the run in --out from its ckpt.pt
    max_train_steps: int = 4000  # optimizer steps in [1, inf); paper: 4,000 (SD1.5), 8,000 (SDXL)
    train_batch_size: int = 128  # global pairs per step in [1, inf); paper: 128 (SD1.5), 32 (SDXL)
    micro_batch_size: int = 0  # pairs per rank a pass, in [0, inf); 0 = all (tools/memory.py)
    lr: float = 1e-5  # peak AdamW learning rate in (0, inf); paper: 1e-5
    weight_decay: float = 0.3  # AdamW weight decay of matrices, in [0, inf); paper: 0.3
    warmup: int = 500  # log warm-up steps in [0, inf), then linear decay to 0; paper: 500 / 1000
    grad_clip: float = 1.0  # max global gradient norm, in (0, inf); paper: 1.0
    vfe_scale: float = 7.5  # VFE's g in [0, inf) on the mid (SD3: block N) feature; paper: 7.5
    lrm_blocks: int = 0  # SD3: MMDiT blocks the LRM runs, in [0, inf); 0 = round(0.75 x all)
    resolution: int = 0  # image side in px, in [0, inf); 0 = the base's (denoiser size x VAE's)
    eval_timesteps: str = ""  # validation t's (denoiser's unit); '' = grid's nearest 0..1000 by 250
    eval_every: int = 500  # steps in [1, inf) between validations (each then a checkpoint)
    eval_max_pairs: int = 0  # validation pairs used, in [0, inf); 0 = the whole split
    save_every: int = 500  # steps in [1, inf) between checkpoints (ckpt.pt)
    vae_batch_size: int = 8  # images per VAE call, in [1, inf) (its memory: ~2.4 GB each, SDXL)
    text_projection_init: str = ""  # SD1.5 official init: openai/clip-vit-large-patch14
    grad_ckpt: bool = False  # gradient checkpointing in the U-Net
    shard: bool = True  # several processes: FSDP2 shards the trained weights, grads and AdamW state
    workers: int = 4  # DataLoader processes decoding the JPEGs, in [0, inf)
    threads: int = 0  # CPU intra-op threads in [0, inf), 0 = torch's default
    dist_timeout: int = 180  # minutes in [1, inf) a collective may wait (SDXL checkpoints)
    seed: int = 0  # initial heads and every pair's noise, in [0, inf)


SDXL = dict(max_train_steps=8000, train_batch_size=32, warmup=1000, grad_ckpt=True,
            vae_batch_size=2)
# the tiny world's (1,600 pairs, 1M-parameter U-Net: SD's lr would barely move it; one thread,
# as two only spend the tiny ops' time synchronising): the shipped tiny/lrm's recipe
TINY = dict(data="tiny/pickapic", keep="tiny/pickapic/mpcf_keep.json", max_train_steps=400,
            train_batch_size=32, lr=1e-3, weight_decay=0.01, warmup=20, eval_every=100,
            save_every=100, workers=0, threads=1)
# the paper gives no SD3 LRM recipe: SDXL's (the same 1024 px)
PRESETS = {"sd15": {}, "sdxl": SDXL, "sd3": SDXL, "sd35": SDXL, "tiny": TINY, "tiny-xl": TINY,
           "tiny-sd3": TINY}


def parse_timesteps(text, ddpm=False):
    """'1,251' -> [1, 251]; '8.93,1000' -> [8.93, 1000]: whole numbers as int (a DDPM t indexes
    its schedule), others float (SD3's 1000 sigma), in 0..1000 (ddpm: ints in 0..999); '' -> [].
    Raises a one-line ValueError."""
    try:
        numbers = [float(part) for part in text.split(",")] if text.strip() else []
        if all(t in range(1000) if ddpm else 0 <= t <= 1000 for t in numbers):
            return [int(t) if t.is_integer() else t for t in numbers]
    except ValueError:
        pass
    raise ValueError(f"--eval_timesteps {text!r}: comma-separated t's in 0..1000 (a DDPM model's: "
                     "integers in 0..999), e.g. 1,501,951")


def get_config(argv=None):
    """The Config of a command line: Config's defaults, then --model's preset, then the options.
    A preset's data was drawn for its own base, so another --base must name its --data; its --keep
    lists rows of its own data, so other --data drops it (with a note) unless --keep is given."""
    argv = command_line(__file__, argv)
    preset = PRESETS.get(peek(argv, "model", Config.model), {})
    cfg = parse_config(Config, {**asdict(Config()), **preset}, __doc__, argv)
    if cfg.model not in PRESETS and not os.path.isdir(cfg.model) and cfg.model.count("/") != 1:
        fail(f"--model {cfg.model!r}: expected one of {list(PRESETS)}, a pipeline folder, or a hub "
             "id like owner/name")
    if "data" in preset and cfg.base not in ("", cfg.model, BASES.get(cfg.model)) \
            and not peek(argv, "data", None):
        fail(f"--base {cfg.base}: pass --data too (the {cfg.model} preset's pairs were drawn "
             "for its own base)")
    if cfg.data != preset.get("data") and cfg.keep and not peek(argv, "keep", None):
        if os.environ.get("RANK", "0") == "0":
            warn(f"the preset's --keep {cfg.keep} lists rows of its own data, not of --data "
                 f"{cfg.data}: training on all of it")
        cfg.keep = ""
    cfg.out = cfg.out or run_folder("lrm", cfg.model)
    return cfg


# ----------------------------------------------------------------------------- math
def pair_loss(s0, s1, label_0, label_1, weight, total_weight=None):
    """Bradley-Terry NLL of [S0, S1] with soft labels (ties 0.5/0.5): sum(w / W * nll), W the
    weight of the *global* batch (default: weight.sum()). All (B,) -> scalar."""
    logp = torch.log_softmax(torch.stack([s0, s1], -1).float(), -1)  # (B, 2)
    nll = -(label_0 * logp[:, 0] + label_1 * logp[:, 1])  # (B,)
    total = weight.sum() if total_weight is None else total_weight
    return (weight / total.clamp_min(1e-12) * nll).sum()


def learning_rate(step, cfg):
    """DeepSpeed WarmupDecayLR (the official LRM config) with its default log warm-up, at
    optimizer step `step` (0-based; step 0 only fills Adam's moments): peak * ln(step + 1) /
    ln(W), W = max(warmup, 2), then linear decay to 0 at T = --max_train_steps."""
    warmup = max(cfg.warmup, 2)  # as DeepSpeed
    if step < warmup:
        return cfg.lr * math.log(step + 1) / math.log(warmup)
    return cfg.lr * max(0.0, (cfg.max_train_steps - step) / max(1, cfg.max_train_steps - warmup))


def pair_credit(s0, s1, label_0, label_1):
    """The official evaluation's score of each pair: label of the image scored higher (1 or 0
    on a decisive pair, 0.5 on a tie; 0 when the scores are equal). All (B,) -> (B,)."""
    return (s0 > s1).float() * label_0 + (s0 < s1).float() * label_1


def batch_accuracy(scores, labels, weights):
    """Share of the decisive pairs whose winner scored higher, among pairs with both images
    decodable (weight > 0); None when there is no such pair (JSON null, not NaN).
    (G, 2), (G, 2), (G,) -> float or None."""
    s0, s1 = scores.T  # (G,)
    label_0, label_1 = labels.T
    decisive = (label_0 != label_1) & (weights > 0)
    if not decisive.any():
        return None
    return ((s0 > s1) == (label_0 > label_1))[decisive].sum().item() / decisive.sum().item()


def add_noise(noise_scheduler, latents, noise, timesteps):
    """x_t of clean latents at (B,) t's in the denoiser's unit: DDPM's sqrt(a_t) x_0 +
    sqrt(1 - a_t) e, or rectified flow's (1 - sigma) x_0 + sigma e with sigma = t / 1000 (SD3;
    diffusers: FlowMatchEulerDiscreteScheduler.scale_noise)."""
    if not is_flow_matching(noise_scheduler.config):
        return noise_scheduler.add_noise(latents, noise, timesteps)
    sigma = timesteps / noise_scheduler.config.num_train_timesteps  # (B,)
    sigma = sigma.to(latents.dtype).view(-1, 1, 1, 1)
    return (1 - sigma) * latents + sigma * noise


def noise_schedule(base):
    """The base's scheduler at its 20-step sampling schedule (paper: the 20-step DDIM grid), for
    add_noise (DDIM's is DDPM's), and its grid of training t's, those noise levels: DDPM (SD1.5,
    SDXL: t in {1, 51, ..., 951}), or flow matching (SD3: t = 1000 sigma, the levels below 1 of
    FlowMatchEulerDiscreteScheduler's 20 steps, those LPO's children take: at sigma = 1, x_t is
    pure noise and a pair no signal)."""
    config = DDPMScheduler.load_config(base, subfolder="scheduler")
    flow = is_flow_matching(config)
    scheduler = (FlowMatchEulerDiscreteScheduler if flow else DDIMScheduler).from_config(config)
    scheduler.set_timesteps(20)
    grid = sorted(scheduler.timesteps.tolist())
    return scheduler, grid[:-1] if flow else grid


def default_eval_timesteps(grid):
    """The grid's t nearest 0, 250, 500, 750 and 1000: low to high noise."""
    return list(dict.fromkeys(min(grid, key=lambda t: abs(t - target))
                              for target in (0, 250, 500, 750, 1000)))


# ----------------------------------------------------------------------------- data
@dataclass
class Pairs(Dataset):
    """(epoch, row) -> {px: both images (2, 3, H, W) in [-1, 1], caption, label (2,), weight (the
    paper's 1 / num_example_per_prompt), t (one for both images), eps (image, VAE sample | added
    noise, C, h, w)} with the pair's own randomness, from a generator seeded by (seed, epoch, row).
    An undecodable image gives a blank pair, bad and of weight 0 (shapes must match)."""
    pairs: object  # a split from load_pairs
    resolution: int
    latent_shape: tuple  # (C, h, w)
    timestep_grid: list
    seed: int

    def __getitem__(self, key):
        epoch, row = key
        example = self.pairs[row]
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 1_000_033 + row)
        images = [decode_image(example[column]) for column in ("jpg_0", "jpg_1")]
        bad = None in images
        if bad:  # a blank pair (black: the batch's shapes must match)
            images = [Image.new("RGB", (1, 1))] * 2
        side = (self.resolution, self.resolution)
        pixels = np.stack([np.array(image.resize(side, Image.BICUBIC)) for image in images])
        return dict(  # (t drawn before eps)
            px=torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1,  # (2, 3, H, W)
            caption=example["caption"],
            bad=bad,
            label=torch.tensor([example["label_0"], example["label_1"]], dtype=torch.float32),
            weight=torch.tensor(0.0 if bad else 1.0 / max(example["num_example_per_prompt"], 1)),
            t=self.timestep_grid[torch.randint(len(self.timestep_grid), (), generator=generator)],
            eps=torch.randn(2, 2, *self.latent_shape, generator=generator),
        )


def steps_sampler(n, global_batch, rank, world, seed, start, steps):
    """(epoch, row) keys of steps start..steps-1: global batch k = rows perm_e[k*G:(k+1)*G] of
    epoch e's shuffle (seeded by seed + e), each rank its contiguous share: the same rows on 1
    process or 8, fresh or resumed."""
    share = global_batch // world
    for step in range(start, steps):
        epoch, k = divmod(step, n // global_batch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        for row in order[k * global_batch + rank * share:][:share].tolist():
            yield epoch, row


def latent_shape(vae, resolution):
    """(C, h, w) of the VAE's latents of resolution x resolution images."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return (vae.config.latent_channels, resolution // factor, resolution // factor)


@torch.no_grad()
def encode_images(vae, pixels, noise, vae_batch_size=8):
    """latent_dist.sample() with the given noise, as the pipeline scales it: (z - shift_factor) x
    scaling_factor (SD1.5 and SDXL have no shift, SD3 has), vae_batch_size images per VAE call:
    the VAE's memory does not grow with the batch."""
    latents = []
    for chunk, chunk_noise in zip(pixels.split(vae_batch_size), noise.split(vae_batch_size)):
        posterior = vae.encode(chunk.to(vae.device, vae.dtype)).latent_dist  # chunk: (c, 3, H, W)
        latents.append(posterior.mean + posterior.std * chunk_noise.to(posterior.mean))
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (torch.cat(latents) - shift) * vae.config.scaling_factor


def pair_latents(vae, batch, device, vae_batch_size=8):
    """A collated batch of Pairs -> clean latents and the noise to add, both (2b, C, h, w), pairs
    adjacent (the VAE sample drawn with the batch's own VAE noise, eps[:, :, 0])."""
    eps = batch["eps"].flatten(0, 1).to(device)  # (2b, VAE|noise, C, h, w)
    latents = encode_images(vae, batch["px"].flatten(0, 1), eps[:, 0], vae_batch_size)
    return latents.to(device), eps[:, 1]


# ----------------------------------------------------------------------------- training step
warnings.filterwarnings("ignore", message="torch.distributed.nn.functional.all_gather is deprec")


def gather(x):
    """Autograd-aware all_gather along dim 0 (x itself on one process): every rank computes the
    global loss, and the backward sums the gradients over the ranks (apply_update averages them)."""
    if not dist.is_initialized():
        return x
    return torch.cat(torch.distributed.nn.functional.all_gather(x))


def train_step(lrm, vae, noise_scheduler, batch, micro_batch_size, device, vae_batch_size=8):
    """Forward and backward of one global batch, micro_batch_size pairs per rank per pass
    (gradient accumulation); each pass's loss is normalised by the weight of the *whole* global
    batch, so the summed gradients are the full batch's. -> loss (float), and the gathered
    scores (G, 2), labels (G, 2), weights (G,) in the order of the micro-batches."""
    total_weight = gather(batch["weight"].to(device)).sum()
    loss = 0.0
    seen = []
    for start in range(0, len(batch["t"]), micro_batch_size):
        micro = {key: value[start:start + micro_batch_size] for key, value in batch.items()}
        latents, noise = pair_latents(vae, micro, device, vae_batch_size)  # (2m, C, h, w)
        t = micro["t"].to(device).repeat_interleave(2)  # (2m,): one t for both images of a pair
        noisy = add_noise(noise_scheduler, latents, noise, t)  # independent noise per image
        prompts = [caption for caption in micro["caption"] for _ in range(2)]
        with mixed_precision(device):
            scores = gather(lrm.score(noisy, t, prompts=prompts).view(-1, 2))  # (world * m, 2)
        labels, weights = [gather(micro[key].to(device)) for key in ("label", "weight")]
        # (unbind, not scores.T: that one's gradient would not be contiguous)
        part_loss = pair_loss(*scores.unbind(1), *labels.T, weights, total_weight)
        part_loss.backward()
        loss += part_loss.item()
        seen.append((scores.detach().float(), labels, weights))
    return loss, *[torch.cat(parts) for parts in zip(*seen)]


def make_optimizer(lrm, cfg):
    """AdamW, weight decay on the matrices only (deviation 3). -> (trained params, AdamW)"""
    params = [p for p in lrm.parameters() if p.requires_grad]
    matrices = {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay}
    vectors = {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}
    return params, torch.optim.AdamW([matrices, vectors], lr=cfg.lr)


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def pair_accuracy(lrm, pairs, timesteps, vae=None, batch_size=32, seed=0, max_pairs=0,
                  vae_batch_size=8):
    """Accuracy at each t on a split (from load_pairs), both images noised to t with fixed
    per-pair noise, two ways: {"decisive": {t: on decisive pairs}, "ties_half": {t: official, a
    tie scoring 0.5}}. Each rank counts its shard's decisive pairs ranked right, credit, decisive
    and decodable pairs at each t, summed over ranks. (An int t: DDPM's; a float one: SD3's.)"""
    base = resolve_model(lrm.config["base"])
    vae = vae or AutoencoderKL.from_pretrained(base, subfolder="vae")
    noise_scheduler = noise_schedule(base)[0]
    device = lrm.logit_scale.device
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    rows = range(len(pairs))[:max_pairs or None]
    data = Pairs(pairs, lrm.resolution, latent_shape(vae, lrm.resolution), [0], seed)
    timesteps = list(dict.fromkeys(timesteps))  # each t once: a repeated t would count twice
    sums = torch.zeros(4, len(timesteps), dtype=torch.float64)
    was_training = lrm.training
    lrm.eval()
    # every rank runs as many batches (sharded, each pass gathers weights from all): a rank out
    # of rows scores a stand-in that casts no vote
    for start in range(0, len(rows), world * batch_size):
        mine = rows[start + rank * batch_size:][:batch_size]
        batch = default_collate([data[(0, row)] for row in mine or rows[:1]])
        latents, noise = pair_latents(vae, batch, device, vae_batch_size)  # (2b, C, h, w)
        text = lrm.encode_text([caption for caption in batch["caption"] for _ in range(2)])
        label_0, label_1 = batch["label"].T  # (b,)
        good = ~batch["bad"] & bool(mine)  # an undecodable pair casts no vote
        decisive = (label_0 != label_1) & good
        for i, t in enumerate(timesteps):
            t_batch = torch.full((len(latents),), t, device=device)  # (2b,)
            noisy = add_noise(noise_scheduler, latents, noise, t_batch)
            with mixed_precision(device):
                s0, s1 = lrm.score(noisy, t_batch, text=text).float().cpu().view(-1, 2).T  # (b,)
            right = ((s0 > s1) == (label_0 > label_1)) & decisive  # (b,)
            credit = pair_credit(s0, s1, label_0, label_1) * good
            sums[:, i] += torch.stack([right.sum(), credit.sum(), decisive.sum(), good.sum()])
    lrm.train(was_training)
    sums = sum(gather_objects(sums))  # over ranks
    decisive, ties_half = (sums[:2] / sums[2:].clamp_min(1)).tolist()
    return {"decisive": dict(zip(timesteps, decisive)),
            "ties_half": dict(zip(timesteps, ties_half))}


def by_label(tree):
    """A (nested) table keyed by t, keyed by t's label: 251 -> "251", 266.3297119 -> "266.33"."""
    if not isinstance(tree, dict):
        return tree
    return {f"{key:g}" if isinstance(key, (int, float)) else key: by_label(value)
            for key, value in tree.items()}


# ----------------------------------------------------------------------------- run files
def publish_lrm(lrm, folder, staging, name, state=None):
    """Save an LRM to staging (a *.tmp folder), then move it into folder, lrm_config.json last: a
    kill leaves a complete LRM, or a folder without lrm_config.json that the resume writes again."""
    kill_point(f"before {name}")
    lrm.save_pretrained(staging, state)  # (prepare_run_folder drops a killed publish's *.tmp)
    os.makedirs(folder, exist_ok=True)
    Path(folder, "lrm_config.json").unlink(missing_ok=True)  # incomplete until the new one lands
    for entry in sorted(os.listdir(staging), key=lambda entry: (entry == "lrm_config.json", entry)):
        target = os.path.join(folder, entry)
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(os.path.join(staging, entry), target)
        kill_point(f"mid {name}")
    os.rmdir(staging)
    kill_point(f"after {name}")


def main(cfg):
    """Setup: each bad input refused in one line before any weight is read, then the LRM, AdamW,
    the resumed state and the data. The loop's numbered parts, one global batch a step. Then the
    table of both held-out splits, logged and printed; -> that table."""
    rank, world, device = setup_distributed(cfg.dist_timeout)
    master = rank == 0
    per_rank = cfg.train_batch_size // world
    checkpoint, changes, _ = open_run(cfg, world, MAY_CHANGE)
    if checkpoint and checkpoint["step"] > cfg.max_train_steps:
        fail(f"--resume: {cfg.out} is at step {checkpoint['step']}, past --max_train_steps "
             f"{cfg.max_train_steps}: pass --max_train_steps >= {checkpoint['step']}, or another "
             "--out")
    try:
        base = resolve_model(cfg.base or cfg.model)
        resolution = geometry(base, cfg.resolution)[0]
        mmdit_blocks(*load_denoiser_config(base), cfg.lrm_blocks)
        noise_scheduler, grid = noise_schedule(base)
        ddpm = not is_flow_matching(noise_scheduler.config)  # a DDPM t indexes its levels
        timesteps = parse_timesteps(cfg.eval_timesteps, ddpm) or default_eval_timesteps(grid)
        train = load_pairs(cfg.data, "train", cfg.keep)
        val = load_pairs(cfg.data, "validation_unique")
        test = load_pairs(cfg.data, "test_unique")
    except (ValueError, OSError) as error:
        fail(first_line(error))
    if (len(train) < cfg.train_batch_size or cfg.train_batch_size % world
            or per_rank % (cfg.micro_batch_size or per_rank)):
        fail(f"--train_batch_size {cfg.train_batch_size}: at most the {len(train)} usable train "
             f"pairs, split evenly over {world} process(es), each share into micro-batches of "
             f"--micro_batch_size {cfg.micro_batch_size} (0: all)")
    try:
        if cfg.text_projection_init:
            transformers.AutoConfig.from_pretrained(cfg.text_projection_init)
    except (ValueError, OSError) as error:
        fail(f"--text_projection_init {cfg.text_projection_init}: {first_line(error)} (a CLIP "
             "model folder or hub id, or '' for a random init)")

    transformers.utils.logging.disable_progress_bar()
    threads_before = torch.get_num_threads()  # restored at the end: main() may run in a program
    torch.set_num_threads(cfg.threads or threads_before)
    torch.manual_seed(cfg.seed)  # the heads' init: the same on every rank
    try:
        lrm = LatentRewardModel.from_base(cfg.base or cfg.model, g=cfg.vfe_scale,
                                          resolution=resolution, lrm_blocks=cfg.lrm_blocks,
                                          text_projection_init=cfg.text_projection_init)
        vae = AutoencoderKL.from_pretrained(base, subfolder="vae")  # fp32: SDXL's overflows in fp16
    except (ValueError, OSError) as error:
        fail(f"cannot load the LRM and its VAE from {base}: {first_line(error)}")
    lrm.to(device).train()
    for part in lrm.unused_parts():  # never run: held off the GPU (SDXL's up blocks: 1.32B)
        part.to("cpu")
    if device.type == "cuda" and not lrm.text_trained:  # SD3's frozen text encoders: bf16
        lrm.text_encoders.to(torch.bfloat16)
    vae.to(device).requires_grad_(False)
    if cfg.grad_ckpt:
        lrm.denoiser.enable_gradient_checkpointing()
    if cfg.shard:  # each rank holds 1 / world of what trains (see the module docstring)
        shard(lrm.shard_units(), world, device)
    params, optimizer = make_optimizer(lrm, cfg)
    if checkpoint:  # saved whole at any world size: each rank takes its shards
        scatter_training(lrm, optimizer, checkpoint)
    step, (best, n_bad, n_seen) = ((checkpoint["step"], checkpoint["counters"]) if checkpoint
                                   else (0, (-1.0, 0, 0)))
    del checkpoint  # restored: not kept while training (SDXL's is ~30 GB)
    log_path = os.path.join(cfg.out, "metrics.jsonl")
    micro_batch = cfg.micro_batch_size or per_rank
    if master:
        restart_log(log_path, step + 1, step, changes, key="step")
        # trained state: fp32 weights, gradients and AdamW's two moments
        print(f"{world} process(es){', sharded' if cfg.shard and world > 1 else ''}, {per_rank} "
              f"pairs each a step, micro-batches of {micro_batch}, trained state "
              f"{16 * local_numel(params) / 2**20:.1f} MiB a process")
    loader = DataLoader(Pairs(train, resolution, latent_shape(vae, resolution), grid, cfg.seed),
                        per_rank, num_workers=cfg.workers, sampler=steps_sampler(
                            len(train), cfg.train_batch_size, rank, world, cfg.seed, step,
                            cfg.max_train_steps))
    accuracy = partial(pair_accuracy, lrm, timesteps=timesteps, vae=vae, seed=cfg.seed,
                       max_pairs=cfg.eval_max_pairs, vae_batch_size=cfg.vae_batch_size)
    first_step = step
    start = time.perf_counter()

    def publish(name, folder, staging):  # in the run folder (''); a collective: whole_state
        folder, staging = os.path.join(cfg.out, folder), os.path.join(cfg.out, staging)
        state = whole_state(lrm)
        if master:  # rank 0 writes
            write_or_fail(folder, publish_lrm, lrm, folder, staging, name, state)
    for batch in tqdm(loader, "lrm", cfg.max_train_steps, initial=step, disable=not master):
        # 1. one optimizer step on the global batch (micro-batches accumulate in train_step)
        lr = learning_rate(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, scores, labels, weights = train_step(lrm, vae, noise_scheduler, batch, micro_batch,
                                                   device, cfg.vae_batch_size)
        try:  # all ranks: the averaged gradient, clipped; grad_norm before the clip
            grad_norm = apply_update(params, optimizer, torch.tensor(loss), world, cfg.grad_clip)
        except NonFiniteUpdate as error:
            stop_non_finite(cfg.out, str(error), f"step {step + 1}")
        step += 1
        kill_point(f"step {step}")
        n_bad += int((weights == 0).sum())  # weight 0 = an undecodable image
        n_seen += len(weights)
        last_step = step == cfg.max_train_steps
        if step % (len(train) // cfg.train_batch_size) == 0 or last_step:  # the whole data seen
            check_decodable(n_bad, n_seen, cfg.data)

        # 2. log (rank 0); pairs_per_s over this run's wall time, validations and checkpoints in
        if master:
            log_jsonl(log_path, dict(
                step=step, loss=loss, acc=batch_accuracy(scores, labels, weights), lr=lr,
                grad_norm=grad_norm, logit_scale=lrm.logit_scale.item(),
                pairs_per_s=(step - first_step) * cfg.train_batch_size / (
                    time.perf_counter() - start), bad_pairs=n_bad))

        # 3. validate (each rank its shard); best/ when the accuracy at the first t beats it
        # (paper: validation accuracy at t = 1), and the final LRM at the last step
        validate = step % cfg.eval_every == 0 or last_step
        if validate:
            val_acc = accuracy(val)
            if master:
                row = {"step": step} | {f"{name}@{t:g}": acc for way, name in (
                    ("decisive", "val_acc"), ("ties_half", "val_acc_ties_half"))
                    for t, acc in val_acc[way].items()}
                log_jsonl(log_path, row)
                tqdm.write(f"validation: {row}")
            at_first_t = val_acc["decisive"][timesteps[0]]
            if at_first_t > best:
                best = at_first_t
                publish("best/", "best", "best.tmp")
        if last_step:
            publish("final LRM", "", "final.tmp")

        # 4. checkpoint, written last: one that exists means best/ and the final LRM are on disk
        if validate or step % cfg.save_every == 0:
            training = gather_training(lrm, optimizer)  # whole tensors (a collective)
            if master:
                write_checkpoint(cfg.out, optimizer, step, training=training, world_size=world,
                                 counters=(best, n_bad, n_seen), config=asdict(cfg))
        barrier()  # every rank waits for the checkpoint

    if first_step == cfg.max_train_steps:  # a finished run resumed (no step ran): its final LRM
        publish("final LRM", "", "final.tmp")
        val_acc = accuracy(val)
    kill_point("final table")
    table = {"validation_unique": val_acc, "test_unique": accuracy(test)}
    if master:
        log_jsonl(log_path, {"step": step, "final": by_label(table)})
        print("\naccuracy at t: decisive pairs / official (every pair, a tie scoring 0.5)")
        for t in timesteps:
            print(f"{t:>8g}:", *[f"{split} {acc['decisive'][t]:.3f} / {acc['ties_half'][t]:.3f}"
                                 for split, acc in table.items()])
        print(f"pairs skipped for an undecodable image: {n_bad} of {n_seen}\nLRM -> {cfg.out}")
    close_distributed()
    torch.set_num_threads(threads_before)
    return table


if __name__ == "__main__":
    main(get_config())
