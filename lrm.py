"""Training of the Latent Reward Model (LRM, in lrm_model.py) on Pick-a-Pic pairs (SPEC.md section 1).

Paper: "Diffusion Model as a Noise-Aware Latent Reward Model for Step-Level Preference Optimization",
arXiv 2502.01051: Bradley-Terry on noisy latents of both images of a pair at one shared t.
    python lrm.py --model tiny                     # CPU, ~1 min on 2 cores -> runs/lrm-tiny
    torchrun --nproc_per_node=2 lrm.py --model tiny --resume true   # CPU (gloo), continues a run
    torchrun --nproc_per_node=8 lrm.py --model sd15 --keep kept.json         # rows kept by mpcf.py
    torchrun --nproc_per_node=8 lrm.py --model sdxl --data /data/pickapic_v1  # local parquet / arrow
--out gets the final LRM (unet/, text_encoder*/, tokenizer*/, state_dict.pt, lrm_config.json), best/
(best validation accuracy at t=1), train_state.pt (resume) and metrics.jsonl; load it with
LatentRewardModel.from_pretrained (lrm_model.py). Choices and deviations:
- deviation: all_gather gathers per-image *scores*, not features: the Bradley-Terry loss couples
  only the two images of a pair, so it is the same loss and gradient for less traffic.
- Each pair's randomness (t, VAE sample, noise) comes from (seed, epoch, row): on 1 process or 8,
  fresh or resumed, a pair sees the same noise (what lets the tests compare those runs).
- deviation: no weight decay on 1-D parameters (biases, norms, logit_scale), as in CLIP training.
- Ties (0.5/0.5) train; accuracy counts decisive pairs only.
- deviation (tiny world only): lr 1e-3, weight decay 0.01, 200 steps x 16 pairs, one CPU thread.
"""
import argparse, io, json, os, time, warnings
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.distributed as dist
import transformers
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler
from PIL import Image
from tqdm import tqdm

from lrm_model import ROOT, LatentRewardModel, resolve_model

COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1", "num_example_per_prompt", "has_label", "are_different")


# ----------------------------------------------------------------------------- config
@dataclass
class Config:
    model: str = "tiny"          # sd15 | sdxl | tiny | tiny-xl: the preset and the base
    base: str = ""               # base pipeline (hub id or folder) instead of --model's
    data: str = "yuvalkirstain/pickapic_v1"  # Pick-a-Pic schema: hub id, parquet or save_to_disk folder
    keep: str = ""               # mpcf.py output: JSON list of row indices, or parquet/CSV with `index`
    out: str = ""                # default runs/lrm-{model}
    steps: int = 4000            # paper: 4,000 steps at global batch 128 (SD1.5), 8,000 at 32 (SDXL)
    batch_size: int = 128        # global pairs per step
    lr: float = 1e-5             # paper: AdamW lr 1e-5, weight decay 0.3, grad clip 1.0, bf16
    weight_decay: float = 0.3
    warmup: int = 500            # paper: 500 (SD1.5) / 1000 (SDXL) steps, then linear decay to 0
    grad_clip: float = 1.0
    g: float = 7.5               # VFE scale, paper: 7.5 (1 disables VFE)
    eval_timesteps: str = "1,251,501,751,951"
    eval_every: int = 500
    eval_max_pairs: int = 0      # 0 = the whole split
    save_every: int = 500
    text_projection_init: str = ""  # SD1.5 official init: openai/clip-vit-large-patch14's projection
    grad_ckpt: bool = False
    workers: int = 4
    threads: int = 0             # CPU intra-op threads, 0 = torch's default
    seed: int = 0
    resume: bool = False

PRESETS = {"sd15": {}, "sdxl": dict(steps=8000, batch_size=32, warmup=1000, grad_ckpt=True),
           # tiny world (1,600 pairs, 1M-param U-Net): SD's lr 1e-5 would barely move it in 200 steps;
           # one thread, as two only spend the tiny ops' time synchronising
           "tiny": dict(data="tiny/pickapic", steps=200, batch_size=16, lr=1e-3, weight_decay=0.01, warmup=20,
                        eval_every=100, save_every=100, workers=0, threads=1)}
PRESETS["tiny-xl"] = PRESETS["tiny"]

def get_config(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in fields(Config):   # the CLI is the dataclass: --name value, booleans as true/false
        p.add_argument(f"--{f.name}", type=(lambda s: s.lower() in ("1", "true", "yes")) if f.type is bool else f.type)
    args = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    model = args.get("model", Config.model)
    if model not in PRESETS and "base" not in args:
        p.error(f"--model {model!r}: expected one of {list(PRESETS)} (or give --base PATH_OR_HUB_ID)")
    cfg = Config(**{**PRESETS.get(model, {}), **args})
    cfg.out = cfg.out or f"runs/lrm-{model}"
    return cfg


# ----------------------------------------------------------------------------- math
def pair_loss(s0, s1, label_0, label_1, weight):
    """Bradley-Terry NLL of [S0, S1] with soft labels (ties 0.5/0.5), weights normalised over the
    batch given (pass the *global* batch): sum(w / sum(w) * nll).  All (B,) -> scalar."""
    logp = torch.log_softmax(torch.stack([s0, s1], -1).float(), -1)    # (B, 2)
    nll = -(label_0 * logp[:, 0] + label_1 * logp[:, 1])                # (B,)
    return (weight / weight.sum().clamp_min(1e-12) * nll).sum()


# ----------------------------------------------------------------------------- data
def load_pairs(data, split, keep=""):
    """A Pick-a-Pic-schema split (hub id, parquet folder or save_to_disk folder), restricted to
    mpcf.py's kept rows, without unlabelled pairs or identical images. Images stay JPEG bytes."""
    import datasets
    local = os.path.join(ROOT, data) if data.startswith("tiny/") else data
    ds = datasets.load_from_disk(local)[split] if os.path.exists(os.path.join(local, "dataset_dict.json")) \
        else datasets.load_dataset(local if os.path.isdir(local) else data, split=split)
    missing = [c for c in COLUMNS if c not in ds.column_names]
    if missing:
        raise ValueError(f"dataset {data!r} split {split!r} has no column {missing[0]!r} (it has {ds.column_names})")
    if keep:   # row indices into the split as published
        import pandas as pd
        rows = json.load(open(keep)) if keep.endswith(".json") else \
            (pd.read_parquet(keep) if keep.endswith(".parquet") else pd.read_csv(keep))["index"].tolist()
        ds = ds.select(sorted(int(i) for i in rows))
    return ds.select([i for i, (h, d) in enumerate(zip(ds["has_label"], ds["are_different"])) if h and d])

class Pairs(torch.utils.data.Dataset):
    """(epoch, row) -> both images in [-1, 1] and the pair's own randomness, from a generator seeded
    by (seed, epoch, row). An undecodable image gives a blank pair of weight 0 (shapes must match)."""
    def __init__(self, ds, res, latent_shape, grid, seed):
        self.ds, self.res, self.shape, self.grid, self.seed = ds, res, latent_shape, grid, seed

    def __getitem__(self, key):
        (epoch, row), bad = key, False
        ex, gen = self.ds[row], torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 1_000_033 + row)
        try:
            ims = [x if isinstance(x, Image.Image) else Image.open(io.BytesIO(x["bytes"] if isinstance(x, dict) else x))
                   for x in (ex["jpg_0"], ex["jpg_1"])]
            px = torch.from_numpy(np.stack([np.array(im.convert("RGB").resize((self.res,) * 2, Image.BICUBIC)) for im in ims]))
        except Exception:
            px, bad = torch.zeros(2, self.res, self.res, 3, dtype=torch.uint8), True
        return dict(px=px.permute(0, 3, 1, 2).float() / 127.5 - 1, caption=ex["caption"], bad=bad,  # (2, 3, H, W)
                    label=torch.tensor([ex["label_0"], ex["label_1"]], dtype=torch.float32),
                    weight=torch.tensor(0.0 if bad else 1.0 / max(ex["num_example_per_prompt"], 1)),  # paper: 1/n
                    t=self.grid[torch.randint(len(self.grid), (), generator=gen)],      # one t for both images
                    eps=torch.randn(2, 2, *self.shape, generator=gen))                 # (image, VAE|noise, C, h, w)

def steps_sampler(n, global_bs, rank, world, seed, start, steps):
    """Global batch k = rows perm_e[k*G:(k+1)*G] of epoch e's shuffle, each rank its contiguous share."""
    per_epoch, b = n // global_bs, global_bs // world
    for step in range(start, steps):
        epoch, k = divmod(step, per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        yield from ((epoch, int(r)) for r in perm[k * global_bs + rank * b:k * global_bs + (rank + 1) * b])

@torch.no_grad()
def encode_images(vae, px, eps):
    """latent_dist.sample() with the given noise, times vae.config.scaling_factor (not 0.18215)."""
    d = vae.encode(px.to(vae.device, vae.dtype)).latent_dist
    return (d.mean + d.std * eps.to(d.mean)) * vae.config.scaling_factor

def pair_latents(vae, batch, dev):
    """A collated batch of Pairs -> clean latents and the noise to add, both (2b, C, h, w), pairs adjacent."""
    eps = batch["eps"].flatten(0, 1).to(dev)                                  # (2b, VAE|noise, C, h, w)
    return encode_images(vae, batch["px"].flatten(0, 1), eps[:, 0]).to(dev), eps[:, 1]

@torch.no_grad()
def pair_accuracy(lrm, pairs, timesteps, vae=None, batch_size=32, seed=0, max_pairs=0):
    """{t: accuracy} on the decisive pairs of a split (from load_pairs), both images noised to t
    with fixed per-pair noise. Sharded over ranks when torch.distributed is initialised."""
    base = resolve_model(lrm.config["base"])
    vae, sched = vae or AutoencoderKL.from_pretrained(base, subfolder="vae"), DDPMScheduler.from_pretrained(base, subfolder="scheduler")
    dev, (rank, world) = lrm.logit_scale.device, (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    rows = [i for i, (a, b) in enumerate(zip(pairs["label_0"], pairs["label_1"])) if a != b][:max_pairs or None]
    f = lrm.resolution // 2 ** (len(vae.config.block_out_channels) - 1)
    data, hits = Pairs(pairs, lrm.resolution, (vae.config.latent_channels, f, f), [0], seed), torch.zeros(len(timesteps) + 1)
    was_training, amp = lrm.training, torch.autocast(dev.type, torch.bfloat16, enabled=dev.type == "cuda")
    lrm.eval()
    for i in range(rank * batch_size, len(rows), world * batch_size):
        batch = torch.utils.data.default_collate([data[(0, r)] for r in rows[i:i + batch_size]])
        lat, noise = pair_latents(vae, batch, dev)                                             # (2b, C, h, w)
        text = lrm.encode_text([c for c in batch["caption"] for _ in range(2)])
        win0 = batch["label"][:, 0] > batch["label"][:, 1]                                      # (b,)
        for j, t in enumerate(timesteps):
            tt = torch.full((len(lat),), t, dtype=torch.long, device=dev)
            with amp:
                s = lrm.score(sched.add_noise(lat, noise, tt), tt, text=text).cpu()            # (2b,)
            hits[j] += (((s[0::2] > s[1::2]) == win0) & ~batch["bad"]).sum()   # an undecodable pair: no vote
        hits[-1] += (~batch["bad"]).sum()
    lrm.train(was_training)
    if world > 1:
        dist.all_reduce(hits := hits.to(dev))
    return {t: (hits[j] / hits[-1].clamp_min(1)).item() for j, t in enumerate(timesteps)}


# ----------------------------------------------------------------------------- distributed + logging
warnings.filterwarnings("ignore", message="torch.distributed.nn.functional.all_gather is deprecated")

def setup_distributed():
    cuda, local = torch.cuda.is_available(), int(os.environ.get("LOCAL_RANK", 0))
    dev = torch.device(f"cuda:{local}" if cuda else "cpu")
    if "RANK" in os.environ:
        if cuda:
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if cuda else "gloo")
    return (dist.get_rank(), dist.get_world_size(), dev) if dist.is_initialized() else (0, 1, dev)

def gather(x):
    """Autograd-aware all_gather: the loss sees the global batch, gradients flow back to each rank."""
    return torch.cat(torch.distributed.nn.functional.all_gather(x)) if dist.is_initialized() else x

def average_gradients(params, world):
    """Each rank computed the same global loss, and all_gather's backward sums over ranks, so each
    holds world x its share of the gradient: the mean over ranks is the full-batch gradient."""
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])   # one collective, not one per tensor
    dist.all_reduce(flat)
    for g, new in zip(grads, flat.div_(world).split([g.numel() for g in grads])):
        g.copy_(new.view_as(g))

def log_jsonl(path, rec):
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


# ----------------------------------------------------------------------------- main
def main(cfg):
    rank, world, dev = setup_distributed()
    if cfg.batch_size % world:
        raise ValueError(f"--batch_size {cfg.batch_size} is not divisible by the {world} processes")
    base = resolve_model(cfg.base or cfg.model)                       # clear errors before heavy loading
    train, val = load_pairs(cfg.data, "train", cfg.keep), load_pairs(cfg.data, "validation_unique")
    if len(train) < cfg.batch_size:
        raise ValueError(f"{cfg.data}: {len(train)} usable train pairs < --batch_size {cfg.batch_size}")
    os.makedirs(cfg.out, exist_ok=True)
    transformers.utils.logging.disable_progress_bar()
    threads0 = torch.get_num_threads()   # restored at the end: main() may run inside another program
    torch.set_num_threads(cfg.threads or threads0)
    torch.manual_seed(cfg.seed)                                       # the same fresh heads on every rank
    lrm = LatentRewardModel.from_base(cfg.base or cfg.model, g=cfg.g, text_projection_init=cfg.text_projection_init)
    lrm.to(dev).train()
    if cfg.grad_ckpt:
        lrm.unet.enable_gradient_checkpointing()
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae").to(dev).requires_grad_(False)  # fp32: SDXL's overflows in fp16
    noise_sched, ddim = (c.from_pretrained(base, subfolder="scheduler") for c in (DDPMScheduler, DDIMScheduler))
    ddim.set_timesteps(20)
    grid = sorted(ddim.timesteps.tolist())                             # paper: the 20-step grid 1, 51, ..., 951
    params = [p for p in lrm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
                             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=cfg.lr)
    warm, decay = max(cfg.warmup, 1), max(cfg.steps - cfg.warmup, 1)  # linear warmup, then linear decay to 0
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, max(0.0, (cfg.steps - s) / decay)))
    step, best, n_bad, n_seen, last_val = 0, -1.0, 0, 0, None
    state_path, log_path = os.path.join(cfg.out, "train_state.pt"), os.path.join(cfg.out, "metrics.jsonl")
    if cfg.resume and os.path.exists(state_path):
        st = torch.load(state_path, map_location="cpu", weights_only=False)
        lrm.load_state_dict(st["model"]), opt.load_state_dict(st["opt"]), sched.load_state_dict(st["sched"])
        step, best, n_bad, n_seen = st["step"], st["best"], st["n_bad"], st["n_seen"]
        torch.set_rng_state(st["rng"])
    f = lrm.resolution // 2 ** (len(vae.config.block_out_channels) - 1)
    data = Pairs(train, lrm.resolution, (vae.config.latent_channels, f, f), grid, cfg.seed)
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.batch_size // world, num_workers=cfg.workers,
                                         sampler=steps_sampler(len(train), cfg.batch_size, rank, world, cfg.seed, step, cfg.steps))
    amp = torch.autocast(dev.type, torch.bfloat16, enabled=dev.type == "cuda")   # paper: bf16
    ts = [int(t) for t in cfg.eval_timesteps.split(",")]
    evaluate = lambda pairs: pair_accuracy(lrm, pairs, ts, vae, max_pairs=cfg.eval_max_pairs, seed=cfg.seed)
    pbar, t0, step0 = tqdm(total=cfg.steps, initial=step, disable=rank != 0, desc="lrm"), time.time(), step
    for batch in loader:
        lat, noise = pair_latents(vae, batch, dev)                        # (2b, C, h, w), frozen VAE
        t = batch["t"].to(dev).repeat_interleave(2)                       # (2b,): one t for both images of a pair
        x_t = noise_sched.add_noise(lat, noise, t)                        # independent noise per image
        with amp:
            s = lrm.score(x_t, t, prompts=[c for c in batch["caption"] for _ in range(2)]).view(-1, 2)   # (b, 2)
        s, lab, w = gather(s), gather(batch["label"].to(dev)), gather(batch["weight"].to(dev))   # (G, 2), (G, 2), (G,)
        loss = pair_loss(s[:, 0], s[:, 1], lab[:, 0], lab[:, 1], w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:
            average_gradients(params, world)
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step(), sched.step()
        step, n_bad, n_seen = step + 1, n_bad + int((w == 0).sum()), n_seen + len(w)   # weight 0 = undecodable
        if n_bad > 0.01 * n_seen and n_seen >= min(100, len(train)):  # same gathered w on every rank: all stop
            raise SystemExit(f"{cfg.data}: {n_bad} of {n_seen} pairs had an undecodable image (more than 1%)")
        if rank == 0:
            dec = lab[:, 0] != lab[:, 1]
            rec = dict(step=step, loss=loss.item(), acc=((s[:, 0] > s[:, 1]) == (lab[:, 0] > lab[:, 1]))[dec].float().mean().item(),
                       lr=sched.get_last_lr()[0], grad_norm=gnorm.item(), logit_scale=lrm.logit_scale.item(),
                       pairs_per_s=(step - step0) * cfg.batch_size / (time.time() - t0), bad_pairs=n_bad)
            log_jsonl(log_path, rec)
            pbar.update(1), pbar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['acc']:.2f}")
        if step % cfg.eval_every == 0 or step == cfg.steps:
            acc = last_val = evaluate(val)
            if rank == 0:
                log_jsonl(log_path, {"step": step, **{f"val_acc@{t}": a for t, a in acc.items()}})
                tqdm.write(f"step {step} val acc " + " ".join(f"t={t}: {a:.3f}" for t, a in acc.items()))
                if acc[ts[0]] > best:                                     # paper: validation accuracy at t = 1
                    lrm.save_pretrained(os.path.join(cfg.out, "best"))
            best = max(best, acc[ts[0]])
        if step % cfg.save_every == 0 or step % cfg.eval_every == 0 or step == cfg.steps:
            if rank == 0:                                                 # temp file + rename: never half a checkpoint
                torch.save({"model": lrm.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "step": step,
                            "best": best, "n_bad": n_bad, "n_seen": n_seen, "rng": torch.get_rng_state(),
                            "cfg": asdict(cfg)}, state_path + ".tmp")
                os.replace(state_path + ".tmp", state_path)
            if world > 1:
                dist.barrier()                                            # every rank waits for the checkpoint
    pbar.close()

    if rank == 0:
        lrm.save_pretrained(cfg.out)
    table = {"validation_unique": last_val or evaluate(val), "test_unique": evaluate(load_pairs(cfg.data, "test_unique"))}
    if rank == 0:   # the accuracy-vs-t table: noise awareness at a glance
        log_jsonl(log_path, {"step": step, "final": table})
        print("\n   t | " + " | ".join(table) + "\n" + "\n".join(
            f"{t:4d} | " + " | ".join(f"{table[k][t]:.3f}".center(len(k)) for k in table) for t in ts))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    torch.set_num_threads(threads0)
    return table

if __name__ == "__main__":
    try:
        main(get_config())
    except (ValueError, FileNotFoundError) as e:   # bad input: one clear line, not a traceback
        raise SystemExit(f"lrm.py: error: {e}")
