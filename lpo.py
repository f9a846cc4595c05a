"""LPO: step-level Latent Preference Optimization of SD1.5 / SDXL with the LRM as the step reward.

Paper: Zhang et al., "Diffusion Model as a Noise-Aware Latent Reward Model for Step-Level Preference
Optimization" (arXiv 2502.01051), LPO; numbers from SPEC.md section 3. A round: each rank samples its
prompts with DDIM (eta 1, CFG 5), branching every step into K children that the frozen LRM scores in
the noisy latent space; (x_t, winner, loser) is kept when the score gap clears a noise-dependent
threshold, and the trajectory goes on from a random child. The ranks pool their tuples and train a
LoRA with a step-level DPO loss on clipped likelihood ratios (reference: the same U-Net, adapters off).

    python lpo.py --model tiny                        # CPU, minutes: tiny world, prints the judge win-rate
    python lpo.py --model tiny --negate-reward        # control: the LRM's scores negated
    torchrun --nproc_per_node=2 lpo.py --model tiny   # CPU, 2 processes (gloo); --resume continues a run
    torchrun --nproc_per_node=4 lpo.py --model sd15   # paper SD1.5 (LRM: `python lrm.py --model sd15`)
    torchrun --nproc_per_node=4 lpo.py --model sdxl   # paper SDXL  (LRM: `python lrm.py --model sdxl`)
    pipe.load_lora_weights("runs/lpo-sd15")           # use the result (diffusers LoRA format)

Deviations from the official code (Kwai-Kolors/LPO), each marked `# deviation:` at its line:
  1. the LRM scores children at their own noise level t_prev (official: the parent's t; --lrm-t parent);
  2. thresholds come from the sigma_t of the schedule actually run (official: a 20-step table);
  3. gradient clipping clips (official: a no-op on an already consumed iterator);
  4. the ratio clamp is taken on log r (same function; no inf * 0 = NaN in the backward);
  5. checkpoints are taken at round ends (a round's tuples are never saved);
  6. `tiny` presets: thresholds 0.1 -> 0.2, LoRA rank 8, lr 1e-3, 32 prompts a round (a tiny LRM's
     scores spread less: TINY_WORLD_NOTES.md). On CPU everything runs in fp32.
"""
import argparse, itertools, json, math, os, resource, time  # noqa: E401
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from lrm_model import LatentRewardModel, encode_prompt


# ----------------------------------------------------------------------------- config
@dataclass
class Config:
    model: str = "tiny"           # preset: sd15 | sdxl | tiny | tiny-xl, or a pipeline folder / hub id
    base: str = ""                # base pipeline ("" = the preset's)
    lrm: str = ""                 # LRM folder written by lrm.py ("" = the preset's)
    prompts: str = "yuvalkirstain/pickapic_v1"  # HF dataset (hub id / folder) with a `caption` column, or .txt
    num_prompts: int = 4000       # paper: 4,000 Pick-a-Pic v1 train prompts, 5 epochs
    unique_prompts: bool = True   # distinct captions (Pick-a-Pic rows repeat them); tiny: rows (15 captions)
    epochs: int = 5
    out: str = ""                 # "" = runs/lpo-{model}
    resolution: int = 512
    steps: int = 20               # paper: DDIM 20 steps, eta 1, CFG 5.0, K = 4 children a step
    eta: float = 1.0
    cfg: float = 5.0
    k: int = 4
    th_min: float = 0.35          # softmax-gap thresholds (paper: SD1.5 [0.35, 0.5], SDXL [0.45, 0.6])
    th_max: float = 0.5
    lrm_t: str = "child"          # noise level the LRM is told: child (t_prev) | parent (official)
    negate_reward: bool = False   # control: a reward pointing the wrong way must not help
    beta: float = 500.0           # paper: beta 500 (SPO: 10), ratio clip 0.1
    clip_eps: float = 0.1
    lora_rank: int = 4            # paper: rank 4, lr 5e-5 (SD1.5); 64, 1e-5 (SDXL); alpha = rank
    lr: float = 5e-5
    sample_batch: int = 5         # prompts per rank per round (paper: 5 SD1.5, 4 SDXL)
    train_batch: int = 10         # tuples per rank per forward (paper: 10 SD1.5, 4 SDXL)
    grad_accum: int = 1           # forwards per optimizer update
    max_rounds: int = 0           # stop after this many rounds (0: all epochs)
    grad_ckpt: bool = False       # gradient checkpointing (paper: on for SDXL)
    seed: int = 0
    ckpt_every: int = 50          # updates between checkpoints (taken at the next round end)
    resume: bool = False
    save_merged: bool = False     # also write the U-Net with the LoRA merged in ({out}/unet)
    eval_samples: int = 0         # > 0: judge win-rate vs base on held-out seeds (tiny world only)


TINY_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny")  # wherever we run from
TINY = dict(prompts=os.path.join(TINY_DIR, "pickapic"), resolution=32, th_min=0.1, th_max=0.2, lora_rank=8, lr=1e-3,
            sample_batch=32, train_batch=64, num_prompts=320, unique_prompts=False, epochs=1, eval_samples=300, ckpt_every=10)
PRESETS = {
    "sd15": dict(base="stable-diffusion-v1-5/stable-diffusion-v1-5", lrm="runs/lrm-sd15"),
    "sdxl": dict(base="stabilityai/stable-diffusion-xl-base-1.0", lrm="runs/lrm-sdxl", resolution=1024, th_min=0.45,
                 th_max=0.6, lora_rank=64, lr=1e-5, sample_batch=4, train_batch=4, grad_ckpt=True),
    "tiny": dict(TINY, base=os.path.join(TINY_DIR, "sd15"), lrm=os.path.join(TINY_DIR, "lrm")),
    "tiny-xl": dict(TINY, base=os.path.join(TINY_DIR, "sdxl"), lrm=os.path.join(TINY_DIR, "lrm-xl"), grad_ckpt=True),
}

def get_config(argv=None):
    """CLI generated from Config; defaults from the --model preset (other names: the SD1.5 or SDXL one)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model", default="tiny")
    model = pre.parse_known_args(argv)[0].model
    defaults = {**asdict(Config()), **(PRESETS.get(model) or PRESETS["sdxl" if "xl" in model.lower() else "sd15"]),
                "model": model, **({} if model in PRESETS else {"base": model})}
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(Config):
        d = defaults[f.name]
        kw = dict(action=argparse.BooleanOptionalAction) if isinstance(d, bool) else dict(type=type(d))
        p.add_argument("--" + f.name.replace("_", "-"), default=d, **kw)
    cfg = Config(**vars(p.parse_args(argv)))
    if cfg.lrm_t not in ("child", "parent") or cfg.k < 2 or not 0 <= cfg.th_min <= cfg.th_max < 1:
        p.error("need --lrm-t child|parent, --k >= 2, 0 <= --th-min <= --th-max < 1")
    cfg.out = cfg.out or os.path.join("runs", "lpo-" + os.path.basename(model.rstrip("/")))
    return cfg


# ----------------------------------------------------------------------------- math
# Notation (diffusers DDIMScheduler): a_t = alphas_cumprod[t] (alpha-bar), eps = noise prediction,
# x0 = predicted clean latent, sigma_t = std of the stochastic DDIM step; t_prev < 0 = end of the
# chain, where a = alphas_cumprod[0] (set_alpha_to_one=False, as in the SD1.5 and SDXL configs).
def _alpha_bar(acp, t):  # (B,) fp32
    return acp[torch.as_tensor(t, device=acp.device).reshape(-1).clamp(min=0)].float()

def ddim_sigma(t, t_prev, alphas_cumprod, eta):
    """DDIM (Song et al. 2021) Eq. (16): sigma_t(eta) = eta sqrt((1-a_prev)/(1-a_t)) sqrt(1-a_t/a_prev). (B,)"""
    a_t, a_prev = _alpha_bar(alphas_cumprod, t), _alpha_bar(alphas_cumprod, t_prev)
    return eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()

def ddim_step(eps, x_t, t, t_prev, alphas_cumprod, eta):
    """DDIM Eq. (12) as a Gaussian: x_{t_prev} ~ N(mean, std^2); any step count and spacing. fp32."""
    eps, x_t, shape = eps.float(), x_t.float(), (-1,) + (1,) * (x_t.ndim - 1)
    a_t, a_prev, std = (v.to(x_t.device).view(shape) for v in (  # (B, 1, 1, 1) each
        _alpha_bar(alphas_cumprod, t), _alpha_bar(alphas_cumprod, t_prev), ddim_sigma(t, t_prev, alphas_cumprod, eta)))
    x0 = (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()                           # predicted x_0, (B, C, H, W)
    return a_prev.sqrt() * x0 + (1 - a_prev - std ** 2).sqrt() * eps, std     # mean (B, C, H, W), std

def step_logprob(x_prev, mean, std):
    """log N(x_prev; mean, std^2), mean (not sum) over C x H x W (SPEC 3: beta's scale depends on it). (B,)"""
    x_prev, mean, std = x_prev.float(), mean.float(), torch.as_tensor(std, dtype=torch.float32, device=mean.device)
    lp = -(x_prev - mean) ** 2 / (2 * std ** 2) - std.log() - 0.5 * math.log(2 * math.pi)
    return lp.flatten(1).mean(1)

def pair_thresholds(stds, th_min, th_max):
    """LPO dynamic threshold: th_t = th_min + (sigma_t - sigma_min) / (sigma_max - sigma_min) (th_max - th_min)."""
    s = torch.as_tensor(stds, dtype=torch.float64).reshape(-1)
    # deviation: sigma_t of the schedule actually run (official: a hard-coded 20-step table)
    return th_min + (s - s.min()) / (s.max() - s.min()).clamp(min=1e-12) * (th_max - th_min)

def select_pairs(scores, threshold):
    """Winner = best, loser = worst of the K children (B, K); valid where softmax([s_w, s_l]) has
    p_w - p_l = tanh((s_w - s_l) / 2) > th, i.e. s_w - s_l > 2 atanh(th)."""
    (best, win), (worst, lose) = scores.max(1), scores.min(1)                 # (B,) each
    return win, lose, best - worst > 2 * torch.atanh(torch.as_tensor(threshold, dtype=scores.dtype, device=scores.device))

def lpo_loss(logp_w, logp_l, ref_w, ref_l, beta, clip_eps):
    """Step DPO (SPO; DPO Eq. (7)) with LPO's ratio clip: r = clamp(exp(logp - ref), 1 - eps, 1 + eps),
    L = -log sigmoid(beta (log r_w - log r_l)); a clamped ratio passes no gradient."""
    d_w, d_l = logp_w - ref_w, logp_l - ref_l                                 # unclipped log r, (B,)
    lo, hi = math.log1p(-clip_eps), math.log1p(clip_eps)
    # deviation: clamp log r (not r = exp(.)): same values, and exp overflow can't make 0 * inf = NaN
    loss = -F.logsigmoid(beta * (d_w.clamp(lo, hi) - d_l.clamp(lo, hi))).mean()
    d = torch.cat([d_w, d_l]).detach()
    return loss, dict(loss=loss.item(), acc=(d_w > d_l).float().mean().item(),  # implicit accuracy
                      clipfrac=((d < lo) | (d > hi)).float().mean().item())


# ----------------------------------------------------------------------------- models and data
def load_prompts(source, split, n, unique=True):
    """First n (distinct) captions of a .txt (one a line) or a HF dataset (hub id / folder) with `caption`."""
    keep = lambda c, seen=set(): c and not (unique and (c in seen or seen.add(c)))  # noqa: E731  non-empty, new
    try:  # streaming: only the rows read are fetched (Pick-a-Pic v1 with its images is ~100s of GB)
        from datasets import load_dataset
        rows = [{"caption": c} for c in open(source)] if source.endswith(".txt") else \
            load_dataset(source, split=split, streaming=True)
        caps = list(itertools.islice(filter(keep, (str(row["caption"]).strip() for row in rows)), n))
    except KeyError:
        raise SystemExit(f"lpo.py: error: prompt source {source} ({split}) has no `caption` column") from None
    except (OSError, ValueError) as e:  # no such file, dataset or split
        raise SystemExit(f"lpo.py: error: cannot read prompts from {source} ({split}): {str(e).splitlines()[0]}") from None
    if not caps:
        raise SystemExit(f"lpo.py: error: no prompts in {source} ({split})")
    return caps

def load_policy(cfg, device, dtype):
    """The base pipeline minus its VAE, a prompt encoder for CFG, the DDIM schedule and thresholds.
    With lrm_model.encode_prompt, the only place SD1.5 (one text encoder) and SDXL (two, zero uncond) differ."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline
    skip = {k: None for k in ("vae", "safety_checker", "feature_extractor", "image_encoder")
            if k in DiffusionPipeline.load_config(cfg.base)}
    pipe = DiffusionPipeline.from_pretrained(cfg.base, **skip).to(device)  # the VAE: only to evaluate
    if dtype != torch.float32:  # frozen weights in bf16 on GPU; the LoRA weights stay fp32
        pipe.to(dtype=dtype)
    if pipe.scheduler.config.prediction_type != "epsilon" or pipe.scheduler.config.get("set_alpha_to_one"):
        raise SystemExit("lpo.py: error: need an epsilon-prediction base with set_alpha_to_one=False (SD1.5, SDXL)")
    encs = [e.requires_grad_(False) for e in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if e]
    toks = [t for t in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if t]
    zero_uncond = pipe.config.get("force_zeros_for_empty_prompt", False)  # SDXL base: the CFG uncond is zeros
    null = encode_prompt(encs, toks, [""], cfg.resolution)
    def both(u, c):  # [uncond; cond] along the batch, for tensors and dicts of tensors
        return {k: both(u[k], c[k]) for k in c} if isinstance(c, dict) else torch.cat([u.expand_as(c), c])
    @torch.no_grad()
    def encode(prompts):
        """U-Net kwargs for the CFG batch [uncond; cond] (2B)."""
        c, u = encode_prompt(encs, toks, prompts, cfg.resolution), null
        if zero_uncond:  # zeros, but real size conditions (time_ids), as in the SDXL pipeline
            add = c["added_cond_kwargs"]
            u = dict(encoder_hidden_states=c["encoder_hidden_states"] * 0,
                     added_cond_kwargs=add and dict(add, text_embeds=add["text_embeds"] * 0))
        return {k: both(u[k], c[k]) for k in ("encoder_hidden_states", "added_cond_kwargs") if c[k] is not None}
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(cfg.steps)
    ts = sched.timesteps.long()                                               # SD, 20 steps: 951, 901, ..., 1
    ts_prev = torch.cat([ts[1:], torch.tensor([-1])])                         # -1: the end of the chain
    acp = sched.alphas_cumprod.to(device)
    ths = pair_thresholds(ddim_sigma(ts, ts_prev, acp, 1.0).cpu(), cfg.th_min, cfg.th_max)  # eta=1 sigma_t (SPEC 3)
    latent = cfg.resolution // 2 ** (len(AutoencoderKL.load_config(cfg.base, subfolder="vae")["block_out_channels"]) - 1)
    return pipe, encode, SimpleNamespace(acp=acp, ts=ts, ts_prev=ts_prev, ths=ths, latent=latent)

def add_lora(unet, cfg):
    """LoRA on the attention projections (paper: to_q, to_k, to_v, to_out.0; alpha = rank)."""
    from peft import LoraConfig
    torch.manual_seed(cfg.seed)  # the same LoRA init on every rank
    unet.requires_grad_(False).add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, init_lora_weights=
                                                      "gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:  # trainable weights in fp32 even where the frozen ones are bf16
        p.data = p.data.float()
    if cfg.grad_ckpt:
        unet.enable_gradient_checkpointing()
    return params

def save_lora(pipe, unet, out):
    """diffusers LoRA format, so that `pipe.load_lora_weights(out)` works; each file moved in atomically."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    type(pipe).save_lora_weights(out, unet_lora_layers=layers, weight_name="lora.tmp")
    os.replace(os.path.join(out, "lora.tmp"), os.path.join(out, "pytorch_lora_weights.safetensors"))

def cfg_eps(unet, x, t, cond, scale):
    """Classifier-free guidance (Ho & Salimans 2022): eps = eps_u + w (eps_c - eps_u)."""
    t = torch.as_tensor(t, device=x.device).reshape(-1).expand(len(x))
    e_u, e_c = unet(torch.cat([x, x]), torch.cat([t, t]), **cond).sample.float().chunk(2)  # (B, C, h, w) each
    return e_u + scale * (e_c - e_u)

@torch.no_grad()
def sample_tuples(unet, lrm, encode, prompts, idx, sch, cfg, gen, secs, amp):
    """LPO sampling (SPEC 3): DDIM eta 1 + CFG; every step K children of one parent, scored by the LRM; keep
    (x_t, x_w, x_l, t, t_prev, prompt index) where the pair clears th_t; go on from a random child (not the best)."""
    B, K, C, h, dev = len(prompts), cfg.k, unet.config.in_channels, sch.latent, sch.acp.device
    cond, text = encode(prompts), lrm.encode_text([p for p in prompts for _ in range(K)])  # LRM: its own tokenizer
    x, rows = torch.randn(B, C, h, h, generator=gen, device=dev), torch.arange(B, device=dev)  # (B, C, h, w)
    keep, scores = {k: [] for k in ("x_t", "x_w", "x_l", "t", "t_prev", "p")}, []
    for t, tp, th in zip(sch.ts.tolist(), sch.ts_prev.tolist(), sch.ths.tolist()):
        with timed(secs, "sample"), amp():
            mean, std = ddim_step(cfg_eps(unet, x, t, cond, cfg.cfg), x, t, tp, sch.acp, cfg.eta)
            kids = mean[:, None] + std[:, None] * torch.randn(B, K, C, h, h, generator=gen, device=dev)  # (B, K, C, h, w)
        with timed(secs, "score"):  # all B x K children, cond + uncond (VFE), in one LRM call
            # deviation: the children sit at noise level t_prev; the official code tells the LRM t
            t_lrm = torch.full((B * K,), max(tp, 0) if cfg.lrm_t == "child" else t, device=dev)
            s = lrm.score(kids.flatten(0, 1), t_lrm, text=text).float().view(B, K)  # (B, K)
            s = -s if cfg.negate_reward else s
            win, lose, ok = select_pairs(s, th)
        scores.append(s.flatten())
        for k, v in (("x_t", x), ("x_w", kids[rows, win]), ("x_l", kids[rows, lose]), ("p", idx.to(dev)),
                     ("t", torch.full((B,), t, device=dev)), ("t_prev", torch.full((B,), tp, device=dev))):
            keep[k].append(v[ok])
        x = kids[rows, torch.randint(K, (B,), generator=gen, device=dev)]   # (B, C, h, w)
    return {k: torch.cat(v) for k, v in keep.items()}, torch.cat(scores)

def pair_logprobs(unet, mb, cond, sch, cfg, amp):
    """log p of winner and loser (fp32) under the policy, then under the reference = the same U-Net
    with its adapters off (no second copy in memory); both with the CFG-combined eps (SPEC 3)."""
    args = (mb["x_t"], mb["t"], mb["t_prev"], sch.acp, cfg.eta)
    with amp():
        mean, std = ddim_step(cfg_eps(unet, mb["x_t"], mb["t"], cond, cfg.cfg), *args)
        with torch.no_grad():
            unet.disable_adapters()
            ref, _ = ddim_step(cfg_eps(unet, mb["x_t"], mb["t"], cond, cfg.cfg), *args)
            unet.enable_adapters()
    return [step_logprob(mb[k], m, std) for m in (mean, ref) for k in ("x_w", "x_l")]  # (B,) x 4


# ----------------------------------------------------------------------------- distributed, logging, evaluation
def setup_dist():
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    local = int(os.environ["LOCAL_RANK"])  # LOCAL_RANK, not rank % device_count: multi-node safe
    if cuda:  # (on CPU, torchrun already sets OMP_NUM_THREADS=1 per process)
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local}" if cuda else "cpu")

def all_gather_cat(x, world):
    """Concatenate the (N_r, ...) tensors of all ranks; counts first, as they differ (padded to the max)."""
    if world == 1:
        return x
    counts = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([len(x)], device=x.device))
    counts = [int(c) for c in counts]
    if max(counts) == 0:  # nobody has anything: every rank returns here, together
        return x
    out = [x.new_empty(max(counts), *x.shape[1:]) for _ in range(world)]
    dist.all_gather(out, torch.cat([x, x.new_zeros(max(counts) - len(x), *x.shape[1:])]))
    return torch.cat([o[:c] for o, c in zip(out, counts)])

def apply_update(params, opt, loss, world, max_norm=1.0):
    """Average gradients over ranks, stop on a non-finite loss/grad, clip (paper: 1.0), step."""
    flat = torch.cat([p.grad.flatten() for p in params] + [loss.detach().float().reshape(1)])
    if world > 1:
        dist.all_reduce(flat)  # every rank, same order; all ranks then see the same verdict below
    flat /= world
    if not torch.isfinite(flat).all():  # before the step: the last checkpoint stays the last good one
        raise SystemExit("lpo.py: error: non-finite loss or gradient; the last good checkpoint is intact "
                         "(lower --lr or --beta, or --resume from it)")
    for p, g in zip(params, flat[:-1].split([p.numel() for p in params])):
        p.grad.copy_(g.view_as(p))
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)  # deviation: a list, really clipped (official: no-op)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return norm.item()

@contextmanager
def timed(acc, key):
    t0 = time.perf_counter()
    yield
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    acc[key] = acc.get(key, 0.0) + time.perf_counter() - t0

def peak_mem_mb():  # GPU: peak allocated; CPU: peak RSS of this process
    cuda = torch.cuda.is_available()
    return torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

@torch.no_grad()
def evaluate(cfg, pipe, unet):
    """Judge win-rate of tuned vs base on held-out prompts and seeds: the same seeds, sampler, steps
    and CFG for both (the official script mixed CFGs), every image scored (SPEC 4)."""
    from diffusers import DiffusionPipeline
    from eval import win_rate
    from tiny.world import judge_scores
    pipe = DiffusionPipeline.from_pretrained(cfg.base, **{k: v for k, v in pipe.components.items() if k != "vae"})
    pipe.to(unet.device).set_progress_bar_config(disable=True)  # the same modules, plus the VAE
    caps = load_prompts(cfg.prompts, "validation_unique", cfg.eval_samples, unique=False)
    caps, judged = [caps[i % len(caps)] for i in range(cfg.eval_samples)], {}
    for name in ("base", "tuned"):
        (unet.enable_adapters if name == "tuned" else unet.disable_adapters)()
        gens = [torch.Generator(unet.device).manual_seed(10 ** 6 + i) for i in range(len(caps))]  # held-out seeds
        images = [im for i in range(0, len(caps), 100) for im in pipe(
            caps[i:i + 100], num_inference_steps=cfg.steps, guidance_scale=cfg.cfg, eta=cfg.eta, generator=gens[i:i + 100],
            height=cfg.resolution, width=cfg.resolution).images]
        judged[name] = judge_scores(images, caps)
    rate, lo, hi = win_rate(judged["tuned"]["human"], judged["base"]["human"])
    return dict(win_rate=rate, win_low=lo, win_high=hi, n=len(caps), match_base=float(judged["base"]["match"].mean()),
                match_tuned=float(judged["tuned"]["match"].mean()))


# ----------------------------------------------------------------------------- main
def main(cfg):
    rank, world, device = setup_dist()
    master = rank == 0
    if not os.path.isdir(cfg.lrm):  # bad input: one clear line each, before any heavy loading
        raise SystemExit(f"lpo.py: error: no LRM at {cfg.lrm} (train one: python lrm.py --model {cfg.model}, or --lrm DIR)")
    prompts = load_prompts(cfg.prompts, "train", cfg.num_prompts, cfg.unique_prompts)
    try:  # reads lrm_config.json first: refuses an LRM of another latent space before loading weights
        lrm = LatentRewardModel.from_pretrained(cfg.lrm, base=cfg.base)
    except ValueError as e:
        raise SystemExit(f"lpo.py: error: {e}") from None
    gpu = device.type == "cuda"  # GPU: frozen weights bf16 + autocast (paper), LRM fp16; CPU: fp32
    lrm.for_scoring().to(device, torch.float16 if gpu else torch.float32)  # frozen, no up blocks, half on GPU
    pipe, encode, sch = load_policy(cfg, device, torch.bfloat16 if gpu else torch.float32)
    unet, B, params = pipe.unet, cfg.sample_batch, add_lora(pipe.unet, cfg)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)  # paper, constant lr
    amp = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu)  # noqa: E731

    per_epoch = math.ceil(len(prompts) / (B * world))  # rounds per epoch
    total = cfg.epochs * per_epoch if cfg.max_rounds <= 0 else min(cfg.max_rounds, cfg.epochs * per_epoch)
    ckpt, step, start = os.path.join(cfg.out, "ckpt.pt"), 0, 0
    if cfg.resume and os.path.exists(ckpt):
        ck = torch.load(ckpt, map_location="cpu", weights_only=False)
        torch.nn.utils.vector_to_parameters(ck["lora"].to(device), params)
        opt.load_state_dict(ck["opt"])
        step, start = ck["step"], ck["next_round"]
    os.makedirs(cfg.out, exist_ok=True)
    log = open(os.path.join(cfg.out, "log.jsonl"), "a") if master else None
    bar, saved = tqdm(range(start, total), initial=start, total=total, disable=not master, desc="lpo"), step
    for rnd in bar:
        (epoch, r), secs = divmod(rnd, per_epoch), {}  # secs: wall time per phase
        # this rank's prompts: a per-epoch shuffle shared by all ranks, wrapped to fill the last round;
        # every round reseeds from (seed, rank, round), so the round counter is the whole RNG state
        order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(cfg.seed + epoch))
        idx = order[(torch.arange(B) + (r * world + rank) * B) % len(prompts)]
        gen = torch.Generator(device).manual_seed((cfg.seed * world + rank) * 1_000_003 + rnd)
        keep, sc = sample_tuples(unet, lrm, encode, [prompts[i] for i in idx], idx, sch, cfg, gen, secs, amp)
        bucket = torch.bincount((keep["t"] * 4 // 1000).clamp(0, 3), minlength=4).double()  # t: [0, 250) ... [750, 1000)
        sc = sc.double()  # fp64 sums: no cancellation in the variance
        agg = torch.cat([bucket, sc.new_tensor([B * len(sch.ts), len(sc), sc.sum(), sc.square().sum()])])
        if world > 1:
            dist.all_reduce(agg)

        # pool the tuples of all ranks: counts, gather, one permutation from a shared seed, equal slices
        pooled = {k: all_gather_cat(v, world) for k, v in keep.items()}  # "p" indexes the shared prompt list
        n = len(pooled["t"])
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + rnd))
        per = n // world  # the same number of tuples, hence of collectives, on every rank
        mine = {k: v[perm[rank * per:(rank + 1) * per].to(device)] for k, v in pooled.items()}

        tstats, chunks = [], range(0, per, cfg.train_batch)
        with timed(secs, "train"):
            for j, c0 in enumerate(chunks):
                mb = {k: v[c0:c0 + cfg.train_batch] for k, v in mine.items()}
                logps = pair_logprobs(unet, mb, encode([prompts[i] for i in mb["p"].tolist()]), sch, cfg, amp)
                loss, st = lpo_loss(*logps, cfg.beta, cfg.clip_eps)
                (loss / cfg.grad_accum).backward()
                if (j + 1) % cfg.grad_accum == 0 or j == len(chunks) - 1:
                    st["grad_norm"], step = apply_update(params, opt, loss, world), step + 1
                    tstats.append(st)

        # log on rank 0; checkpoint atomically (rank 0 writes, every rank waits)
        groups, ssum, ssq, sn = agg[4:].tolist()
        tmean = {k: float(np.mean([s[k] for s in tstats])) if tstats else None for k in ("loss", "acc", "clipfrac", "grad_norm")}
        row = dict(round=rnd, epoch=epoch, step=step, tuples=n, kept_frac=n / groups, valid_per_bucket=agg[:4].tolist(),
                   lrm_mean=ssum / sn, lrm_std=math.sqrt(max(ssq / sn - (ssum / sn) ** 2, 0.0)), lr=cfg.lr, **tmean,
                   **{f"sec_{k}": round(v, 3) for k, v in secs.items()}, peak_mem_mb=round(peak_mem_mb(), 1))
        if master:
            print(json.dumps(row), file=log, flush=True)
            bar.set_postfix(loss=tmean["loss"], acc=tmean["acc"], kept=f"{n / groups:.2f}")
        if step // cfg.ckpt_every > saved // cfg.ckpt_every or r == per_epoch - 1 or rnd == total - 1:
            if master:
                torch.save(dict(lora=torch.nn.utils.parameters_to_vector(params).cpu(), opt=opt.state_dict(), step=step,
                                next_round=rnd + 1, config=asdict(cfg)), ckpt + ".tmp")  # next_round: the RNG state too
                os.replace(ckpt + ".tmp", ckpt)
                save_lora(pipe, unet, cfg.out)
            saved = step
            if world > 1:
                dist.barrier()  # nobody reads a checkpoint that is still being written
    bar.close()

    v = torch.nn.utils.parameters_to_vector(params).double()
    fingerprint = all_gather_cat(torch.stack([v.sum(), v.square().sum()])[None], world)  # (world, 2): equal rows
    result = dict(step=step, out=cfg.out, lora_fingerprint=fingerprint.tolist())
    if master and cfg.eval_samples > 0:  # rank 0 only, no collectives inside
        with amp():
            result.update(evaluate(cfg, pipe, unet))
        print("judge win-rate tuned vs base: {win_rate:.3f} [95% CI {win_low:.3f}, {win_high:.3f}] over {n} held-out "
              "samples; caption match {match_base:.3f} -> {match_tuned:.3f}".format(**result), flush=True)
    if master and cfg.save_merged:  # a plain diffusers U-Net folder with the LoRA folded in
        unet.fuse_lora(), unet.unload_lora()
        unet.save_pretrained(os.path.join(cfg.out, "unet"))
    if master:
        log.write(json.dumps(dict(final=result)) + "\n")
        log.close()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main(get_config())
