"""bench.py: LPO's latent step reward vs an SPO-style pixel step reward, the LPO and Diffusion-DPO
training steps, and LPO's peak GPU memory, on full-size SD1.5 (512 px) and SDXL (1024 px).

LPO is fast because its step reward reads noisy latents (paper: 10-28x less training time than
Diffusion-DPO, 2.5-3.5x less than SPO; an A100 step with K = 4: LPO 0.039 s, SPO 0.243 s). Random
weights cost the same FLOPs and bytes as trained ones, so this builds the published architectures,
bf16 on one GPU, downloads nothing, and times the project's own code (median of --repeats after
--warmup, CUDA-synchronised):
  1 LPO sampling step, K = 4: lpo.sample_tuples (CFG denoise, K children, LRM scores with VFE,
    pairs) over a 20-step pass, per step, with lpo.py's own sample / score split
  2 the same pass with an SPO-style pixel reward in the LRM's place: per child an x0 prediction
    (a CFG U-Net pass), a VAE decode and a CLIP ViT-H/14 image tower (PickScore's) at 224 px
  3 one LPO update on --batch pairs (policy + reference log-probs with CFG, lpo_loss, apply_update)
  4 one Diffusion-DPO step at the same batch: the full U-Net trained against a frozen reference
  5 peak memory of one LPO iteration (a sampling pass + an update) at lpo.py's per-GPU batches and
    memory settings, with only what lpo.py holds resident

    python bench.py                          # sd15 + sdxl on one CUDA GPU
    python bench.py --model sdxl --compile   # opt-in torch.compile of the repeated blocks
    python bench.py --model sdxl --lrm_dtype fp32 --grad_ckpt off --attn classic   # what each setting buys
    python bench.py --tiny                   # the tiny world on a CPU in seconds; its times mean nothing
    python bench.py --model sd15 --device cpu --resolution 128 --warmup 0 --repeats 1 --iter_batches 2,2  # CPU smoke run
Writes {out}/bench.json (table, GPU, versions, settings) and {out}/bench.jsonl (a row a phase).

Deviations: random weights; the tokenizers are the tiny world's, padded to the real 77 tokens. The
pixel path gets every advantage: K children batched through U-Net and VAE, the VAE in bf16 (real
SDXL upcasts it to fp32: slower), its text embedding cached. One process, one GPU (no torchrun); no
checkpoints: --resume keeps the models already in bench.json.
"""
import copy, gc, json, os, platform, statistics, sys, time
from dataclasses import asdict, dataclass, fields
from types import SimpleNamespace

import diffusers
import torch
import torch.nn.functional as F
import transformers
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor
from tqdm import tqdm
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer,
                          CLIPVisionConfig, CLIPVisionModelWithProjection)

import lpo
from lpo import add_lora, apply_update, cfg_eps, ddim_sigma, lpo_loss, pair_logprobs, pair_thresholds, sample_tuples
from lrm_model import LatentRewardModel, encode_prompt
from tiny.world import CAPTIONS

ROOT = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------- config
@dataclass
class Config:
    model: str = "sd15,sdxl"   # comma list of sd15 | sdxl | tiny | tiny-xl
    tiny: bool = False         # = --model tiny,tiny-xl --device cpu (1 warm-up, 3 repeats, iter_batches 4,4, 1 thread)
    device: str = "cuda"
    out: str = "runs/bench"
    resume: bool = False       # keep the models already measured in {out}/bench.json
    K: int = 4                 # children per step (paper: K = 4)
    batch: int = 1             # prompts per timed sampling pass, pairs per timed update (the paper's costs are per image)
    warmup: int = 2
    repeats: int = 5
    lrm_dtype: str = "fp16"    # fp16 (what lpo.py uses on a GPU) | bf16 | fp32
    grad_ckpt: str = "auto"    # auto (lpo.py's preset: on for SDXL) | on | off, for the policy U-Net
    attn: str = "sdpa"         # sdpa (torch scaled_dot_product_attention) | classic (matmul + softmax)
    compile: bool = False      # torch.compile each repeated transformer block (regional compilation)
    dpo: bool = True           # phase 4 (SDXL: a second, fp32 U-Net with its optimizer state)
    iter_batches: str = ""     # "S,T": sample / train batch of phase 5 ("" = lpo.py's per-GPU preset)
    resolution: int = 0        # px, 0 = lpo.py's preset (512 / 1024); smaller: a full-size smoke run on a CPU
    seed: int = 0


# Diffusion-DPO's own recipe (SalesforceAIResearch/DiffusionDPO): 1 pair per GPU, beta 5000, mixed
# precision over fp32 weights, AdamW; for SDXL its train.py forces Adafactor + gradient checkpointing
DPO = {"sd15": dict(adafactor=False, ckpt=False), "sdxl": dict(adafactor=True, ckpt=True)}
DPO.update(tiny=DPO["sd15"], **{"tiny-xl": DPO["sdxl"]})
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
T, T_PREV = 501, 451           # the update's step: mid-grid (the costs do not depend on t)


def get_config(argv=None):
    import argparse
    p = argparse.ArgumentParser(prog="bench.py", description=__doc__.split("\n")[0])
    for f in fields(Config):   # bools: --tiny, --tiny true, --dpo false
        p.add_argument(f"--{f.name}", **(dict(type=lambda s: s.lower() in ("1", "true", "yes"), nargs="?", const=True)
                                         if f.type is bool else dict(type=f.type)))
    args = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    if args.get("tiny"):
        args = {"warmup": 1, "repeats": 3, "iter_batches": "4,4", **args, "model": "tiny,tiny-xl", "device": "cpu"}
        torch.set_num_threads(1)   # ops this small only spin a second thread (a busy 2-core box: 10x slower)
    cfg = Config(**args)
    ib = (cfg.iter_batches or "1,1").split(",")
    choices = dict(lrm_dtype=list(DTYPES), grad_ckpt=["auto", "on", "off"], attn=["sdpa", "classic"])
    errors = [f"--{k} {getattr(cfg, k)!r}: one of {v}" for k, v in choices.items() if getattr(cfg, k) not in v] + [
        msg for bad, msg in (
            (set(cfg.model.split(",")) - set(DPO), f"--model {cfg.model!r}: a comma list of {list(DPO)}"),
            (cfg.device.startswith("cuda") and not torch.cuda.is_available(),
             f"--device {cfg.device}: no CUDA GPU here; full-size networks need one (--tiny runs on a CPU)"),
            (min(cfg.K - 1, cfg.batch, cfg.repeats, cfg.warmup + 1) < 1, "need --K >= 2, --batch, --repeats >= 1"),
            (len(ib) != 2 or not all(x.isdigit() and int(x) > 0 for x in ib), "--iter_batches: S,T, two integers > 0"),
            (cfg.resolution % 64 or cfg.resolution < 0, f"--resolution {cfg.resolution}: a multiple of 64 (0: the preset)"))
        if bad]
    if errors:
        p.error(errors[0])   # one line, before anything heavy is loaded
    return cfg


# ----------------------------------------------------------------------------- math
def predict_x0(x_t, eps, alpha_bar_t):
    """DDIM (Song et al. 2021) Eq. (12), "predicted x0": (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)."""
    return (x_t - (1 - alpha_bar_t).sqrt() * eps) / alpha_bar_t.sqrt()


def diffusion_dpo_loss(err, ref_err, beta):
    """Diffusion-DPO (Wallace et al. 2023): -log sigmoid(-beta/2 ((e_w - e_l) - (e_ref_w - e_ref_l))),
    e = per-sample noise-prediction MSE, rows [winners; losers].  (2B,), (2B,) -> scalar"""
    (ew, el), (rw, rl) = err.chunk(2), ref_err.chunk(2)
    return -F.logsigmoid(-0.5 * beta * ((ew - el) - (rw - rl))).mean()


# ----------------------------------------------------------------------------- models: the only place SD1.5 and SDXL differ
# published configs: stable-diffusion-v1-5, stable-diffusion-xl-base-1.0, laion/CLIP-ViT-H-14 (image tower)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              hidden_act="quick_gelu", projection_dim=768)
CLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                 hidden_act="gelu", projection_dim=1280)
VIT_H = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
             patch_size=14, image_size=224, projection_dim=1024, hidden_act="gelu")
VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=512)
UNETS = {"sd15": dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                      cross_attention_dim=768, attention_head_dim=8),
         "sdxl": dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                      transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                      cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
                      projection_class_embeddings_input_dim=2816, use_linear_projection=True)}
TINY_VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                patch_size=8, image_size=32, projection_dim=32)


def full_size(name, device):
    """Random full-size networks, created directly on `device` (initialising 2.6B params on a CPU is slow)."""
    tok = CLIPTokenizer.from_pretrained(os.path.join(ROOT, "tiny/sd15/tokenizer"), model_max_length=77)
    ids = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.device(device):
        unet = UNet2DConditionModel(**UNETS[name])
        encoders = [CLIPTextModel(CLIPTextConfig(**CLIP_L, **ids))]
        encoders += [CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG, **ids))] if name == "sdxl" else []
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
    return SimpleNamespace(unet=unet, encoders=encoders, tokenizers=[tok] * len(encoders), scheduler=sched,
                           zero_uncond=name == "sdxl", vit_config=VIT_H,
                           vae_config=dict(VAE, scaling_factor=0.13025 if name == "sdxl" else 0.18215))


def tiny_world(name):
    """The same pieces read from the tiny world's pipeline folder, plus a tiny random image tower."""
    path = os.path.join(ROOT, "tiny/sdxl" if name == "tiny-xl" else "tiny/sd15")
    subs = ["text_encoder", "text_encoder_2"][:2 if name == "tiny-xl" else 1]
    return SimpleNamespace(
        unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet"),
        encoders=[c.from_pretrained(path, subfolder=s) for c, s in zip((CLIPTextModel, CLIPTextModelWithProjection), subs)],
        tokenizers=[CLIPTokenizer.from_pretrained(path, subfolder=s.replace("text_encoder", "tokenizer")) for s in subs],
        scheduler=DDIMScheduler.from_pretrained(path, subfolder="scheduler"), zero_uncond=name == "tiny-xl",
        vae_config=AutoencoderKL.load_config(path, subfolder="vae"), vit_config=TINY_VIT)


def load_lpo_models(name, cfg, dev):
    """What lpo.py holds on the GPU: policy U-Net + LoRA (reference = adapters off) + AdamW, the text
    encoders, and the frozen LRM (its own U-Net and text encoders) in half precision; its schedule."""
    m = full_size(name, dev) if name in UNETS else tiny_world(name)
    m.lpo = lpo.Config(**{**asdict(lpo.Config()), **lpo.PRESETS[name], "k": cfg.K})   # lpo.py's own preset
    m.lpo.resolution = cfg.resolution or m.lpo.resolution
    if cfg.iter_batches:
        m.lpo.sample_batch, m.lpo.train_batch = map(int, cfg.iter_batches.split(","))
    m.lpo.grad_ckpt = m.lpo.grad_ckpt if cfg.grad_ckpt == "auto" else cfg.grad_ckpt == "on"
    m.dev, m.res, m.dtype = dev, m.lpo.resolution, torch.bfloat16 if dev.type == "cuda" else torch.float32
    m.lrm_dtype = DTYPES[cfg.lrm_dtype] if dev.type == "cuda" else torch.float32
    m.amp = lambda: torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
    encoders = [e.to(dev, m.dtype).requires_grad_(False) for e in m.encoders]
    m.lrm = LatentRewardModel(copy.deepcopy(m.unet), copy.deepcopy(encoders), m.tokenizers, dict(resolution=m.res, g=7.5))
    m.lrm.for_scoring().to(dev, m.lrm_dtype)                     # as lpo.py: no up blocks, half precision
    m.lora = add_lora(m.unet.to(dev, m.dtype), m.lpo)            # lpo.py's LoRA: to_q/k/v/out.0, fp32 weights
    m.opt = torch.optim.AdamW(m.lora, lr=m.lpo.lr, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)  # as lpo.main
    # the DDIM schedule as lpo.load_policy builds it: 20 steps, t_prev = -1 at the end, thresholds from sigma_t
    m.scheduler.set_timesteps(m.lpo.steps)
    ts = m.scheduler.timesteps.long()
    ts_prev, acp = torch.cat([ts[1:], torch.tensor([-1])]), m.scheduler.alphas_cumprod.to(dev)
    ths = pair_thresholds(ddim_sigma(ts, ts_prev, acp, 1.0).flatten().cpu(), m.lpo.th_min, m.lpo.th_max)
    m.sch = SimpleNamespace(acp=acp, ts=ts, ts_prev=ts_prev, ths=ths,
                            latent=m.res // 2 ** (len(m.vae_config["block_out_channels"]) - 1))
    speedups(cfg, m.unet, m.lrm.unet)
    return m


def speedups(cfg, *modules):
    for mod in modules:
        if cfg.attn == "classic":   # diffusers: baddbmm + softmax; transformers: eager matmul + softmax
            mod.set_attn_processor(AttnProcessor()) if hasattr(mod, "set_attn_processor") else \
                mod.set_attn_implementation("eager")
        for sub in mod.modules() if cfg.compile else []:
            if type(sub).__name__ in ("BasicTransformerBlock", "CLIPEncoderLayer"):
                sub.compile()       # each repeated block compiled once: short compile, most of the gain


def cfg_condition(m, prompts):
    """U-Net kwargs of the CFG batch [uncond; cond], as lpo.load_policy's `encode` (SDXL: zero uncond,
    force_zeros_for_empty_prompt, with real time_ids)."""
    c = encode_prompt(m.encoders, m.tokenizers, prompts, m.res)
    u = encode_prompt(m.encoders, m.tokenizers, [""] * len(prompts), m.res)
    zero = lambda k, v: torch.zeros_like(v) if m.zero_uncond and k != "time_ids" else v
    out = dict(encoder_hidden_states=torch.cat([zero("", u["encoder_hidden_states"]), c["encoder_hidden_states"]]))
    if c["added_cond_kwargs"] is not None:
        out["added_cond_kwargs"] = {k: torch.cat([zero(k, u["added_cond_kwargs"][k]), v])
                                    for k, v in c["added_cond_kwargs"].items()}
    return out


class PixelReward:
    """SPO-style step reward with the LRM's interface, so lpo.sample_tuples runs it unchanged: per
    child an x0 prediction (one more CFG pass of the policy), a VAE decode, and a CLIP ViT-H/14-size
    image tower (PickScore's) scoring 100 * cos(image, text) at 224 px."""

    def __init__(self, m, cfg):
        with torch.device(m.dev):
            self.vae = AutoencoderKL.from_config(m.vae_config).to(m.dtype).requires_grad_(False)
            self.vit = CLIPVisionModelWithProjection(CLIPVisionConfig(**m.vit_config)).to(m.dtype).requires_grad_(False)
        self.m, self.mean, self.std = m, torch.tensor([0.4815, 0.4578, 0.4082]), torch.tensor([0.2686, 0.2613, 0.2758])
        speedups(cfg, self.vae, self.vit)

    def encode_text(self, prompts):   # cached once per pass, like the LRM's: policy conditioning + text embedding
        g = torch.Generator().manual_seed(len(prompts))
        return dict(cond=cfg_condition(self.m, prompts),
                    emb=F.normalize(torch.randn(len(prompts), self.vit.config.projection_dim, generator=g), dim=-1).to(self.m.dev))

    def x0(self, x, t, cond):         # x0 of each child at its own noise level t (lpo.py's lrm_t "child")
        a_t = self.m.sch.acp[t].float().view(-1, 1, 1, 1)
        return predict_x0(x, cfg_eps(self.m.unet, x, t, cond, self.m.lpo.cfg), a_t)

    def decode(self, x0):
        return self.vae.decode(x0.to(self.m.dtype) / self.vae.config.scaling_factor).sample  # (n, 3, H, W) in [-1, 1]

    def reward(self, img, emb):
        img = F.interpolate((img.float() + 1) / 2, size=self.vit.config.image_size, mode="bicubic", antialias=True)
        img = (img - self.mean.to(img.device).view(1, 3, 1, 1)) / self.std.to(img.device).view(1, 3, 1, 1)
        return 100 * F.cosine_similarity(self.vit(pixel_values=img.to(self.m.dtype)).image_embeds.float(), emb, dim=-1)

    @torch.no_grad()
    def score(self, latents, timesteps, text):
        with self.m.amp():   # all B x K children in one batch through U-Net, VAE and image tower
            return self.reward(self.decode(self.x0(latents, timesteps, text["cond"])), text["emb"])   # (n,)


@torch.no_grad()
def make_batch(m, B, seed):
    """B prompts (distinct tokens in every tokenizer), their cached CFG conditioning, random latents."""
    g = torch.Generator(device=m.dev).manual_seed(seed)
    prompts = [CAPTIONS[i % len(CAPTIONS)] for i in range(B)]
    lat = lambda: torch.randn(B, 4, m.sch.latent, m.sch.latent, generator=g, device=m.dev)
    pair = cfg_condition(m, prompts + prompts)                          # Diffusion-DPO: conditional rows only
    return SimpleNamespace(B=B, g=g, prompts=prompts, idx=torch.arange(B), cond=cfg_condition(m, prompts),
                           cond_pair={k: v.chunk(2)[1] if torch.is_tensor(v) else {a: x.chunk(2)[1] for a, x in v.items()}
                                      for k, v in pair.items()},
                           x_t=lat(), x_w=lat(), x_l=lat())   # x_w, x_l: children for LPO, clean images for DPO


# ----------------------------------------------------------------------------- the timed phases
def sampling_pass(m, b, reward):
    """lpo.py's whole sampling pass (20 steps x K children) with this reward; returns lpo.py's own
    split of its seconds: "sample" (CFG denoise + DDIM) and "score" (the reward)."""
    secs = {}
    sample_tuples(m.unet, reward, lambda p: cfg_condition(m, p), b.prompts, b.idx, m.sch, m.lpo, b.g, secs, m.amp)
    return secs


def lpo_update(m, b):
    """One update of lpo.py's training loop: lpo.pair_logprobs (winner and loser under the policy and
    the reference = LoRA off, CFG), lpo_loss, backward, lpo.apply_update (clip 1.0 + AdamW)."""
    mb = dict(x_t=b.x_t, x_w=b.x_w, x_l=b.x_l, t=torch.full((b.B,), T, device=m.dev),
              t_prev=torch.full((b.B,), T_PREV, device=m.dev))
    loss, _ = lpo_loss(*pair_logprobs(m.unet, mb, b.cond, m.sch, m.lpo, m.amp), m.lpo.beta, m.lpo.clip_eps)
    loss.backward()
    apply_update(m.lora, m.opt, loss, 1)


def make_dpo(m, name):
    """Diffusion-DPO trains the whole U-Net (fp32 weights, bf16 autocast); the bf16 base is its reference."""
    with torch.device(m.dev):
        policy = UNet2DConditionModel.from_config(m.unet.config)
    if DPO[name]["ckpt"]:
        policy.enable_gradient_checkpointing()
    lr = 1e-8 * 2048   # its launchers: --learning_rate 1e-8 --scale_lr, 2048 pairs a step
    return policy, (transformers.Adafactor(policy.parameters(), lr=lr, weight_decay=1e-2, clip_threshold=1.0,
                                           scale_parameter=False, relative_step=False) if DPO[name]["adafactor"]
                    else torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=1e-2))


def dpo_update(m, policy, opt, b):
    """One Diffusion-DPO step: the same t and noise for winner and loser; policy vs reference MSE."""
    t = torch.randint(0, 1000, (b.B,), generator=b.g, device=m.dev).repeat(2)              # (2B,)
    noise = torch.randn(b.x_w.shape, generator=b.g, device=m.dev).repeat(2, 1, 1, 1)        # (2B, C, h, w)
    x = m.scheduler.add_noise(torch.cat([b.x_w, b.x_l]), noise, t)
    m.unet.disable_adapters()                                                               # the reference = base
    with m.amp():
        err = (policy(x, t, **b.cond_pair).sample.float() - noise).pow(2).mean((1, 2, 3))  # (2B,)
        with torch.no_grad():
            ref = (m.unet(x, t, **b.cond_pair).sample.float() - noise).pow(2).mean((1, 2, 3))
    m.unet.enable_adapters()
    diffusion_dpo_loss(err, ref, 5000.0).backward()                                         # --beta_dpo 5000
    torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------- timing and logging
def timed(fn, dev, warmup, repeats):
    """fn() `warmup` times, then `repeats` timed runs: median seconds, peak GPU memory (GB = 1e9 bytes)
    of the timed runs, and the per-key medians of what fn returns (a dict of seconds, or None)."""
    cuda = dev.type == "cuda"
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize(dev) if cuda else None
    torch.cuda.reset_peak_memory_stats(dev) if cuda else None
    secs, parts = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        parts.append(out if isinstance(out, dict) else {})
        torch.cuda.synchronize(dev) if cuda else None   # kernels are asynchronous: wait for them
        secs.append(time.perf_counter() - t0)
    split = {k: statistics.median(p[k] for p in parts) for k in parts[0]}
    return statistics.median(secs), torch.cuda.max_memory_allocated(dev) / 1e9 if cuda else None, split


ROWS = [("1 LPO step, K=4 [s]", "lpo_step_s"), ("    denoise: CFG U-Net + DDIM [s]", "lpo_step_sample_s"),
        ("    LRM scores of the K children [s]", "lpo_step_score_s"), ("2 pixel step, K=4 [s]", "pixel_step_s"),
        ("    denoise: CFG U-Net + DDIM [s]", "pixel_step_sample_s"),
        ("    pixel reward of the K children [s]", "pixel_step_score_s"),
        ("      x0 prediction (CFG U-Net) [s]", "x0_pred_s"), ("      VAE decode [s]", "vae_decode_s"),
        ("      ViT-H image reward [s]", "image_reward_s"), ("  ratio pixel / latent, per step", "ratio_step"),
        ("3 LPO update [s]", "lpo_update_s"), ("  ratio pixel / latent, per step + update", "ratio_iteration"),
        ("4 Diffusion-DPO step, full U-Net [s]", "dpo_update_s"), ("  ratio DPO step / LPO update", "ratio_dpo"),
        ("  peak memory of the DPO step [GB]", "dpo_update_peak_gb"),
        ("5 LPO iteration peak memory [GB]", "lpo_iteration_peak_gb"),
        ("    reserved by the allocator [GB]", "lpo_iteration_reserved_gb"),
        ("    at sample batch x K / train batch", "iteration_batches"), ("    one sampling pass + one update [s]", "lpo_iteration_s")]


def table(results, env):
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)
    s = env["settings"]
    head = [f"{env['device']} | torch {env['torch']} | diffusers {env['diffusers']} | {env['date']} | median of "
            f"{s['repeats']} after {s['warmup']} | batch {s['batch']} | LRM {s['lrm_dtype']} | attn {s['attn']} | "
            f"grad_ckpt {s['grad_ckpt']} | compile {s['compile']}",
            "phase".ljust(44) + "".join(f"{n} {r['resolution']}px".rjust(16) for n, r in results.items())]
    return "\n".join(head + [lab.ljust(44) + "".join(fmt(r.get(k)).rjust(16) for r in results.values()) for lab, k in ROWS])


def write_atomic(path, obj):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)   # a crash never leaves a half-written bench.json


# ----------------------------------------------------------------------------- main
def bench_model(name, cfg, dev, log):
    torch.manual_seed(cfg.seed)
    m = load_lpo_models(name, cfg, dev)
    r = dict(resolution=m.res, iteration_batches=f"{m.lpo.sample_batch}x{cfg.K} / {m.lpo.train_batch}")
    bar = tqdm(total=8 if cfg.dpo else 7, desc=name, disable=not sys.stderr.isatty())

    def measure(key, fn, warmup=cfg.warmup, repeats=cfg.repeats, per=1):
        secs, r[key + "_peak_gb"], split = timed(fn, dev, warmup, repeats)   # peak allocated by tensors
        r[key + "_reserved_gb"] = torch.cuda.max_memory_reserved(dev) / 1e9 if dev.type == "cuda" else None  # + cache
        r[key + "_s"] = secs / per
        r.update({f"{key}_{k}_s": v / per for k, v in split.items()})
        log(dict(model=name, phase=key, **{k: v for k, v in r.items() if k.startswith(key)}))
        bar.update()

    # 5 first, with only what lpo.py holds resident, at its per-GPU batches: one warm-up, one measure
    bs, bt = make_batch(m, m.lpo.sample_batch, cfg.seed), make_batch(m, m.lpo.train_batch, cfg.seed + 1)
    measure("lpo_iteration", lambda: [sampling_pass(m, bs, m.lrm), lpo_update(m, bt)], 1, 1)
    # 1-3 at --batch: whole 20-step sampling passes, reported per step
    pixel = PixelReward(m, cfg)
    b = make_batch(m, cfg.batch, cfg.seed + 2)
    measure("lpo_step", lambda: sampling_pass(m, b, m.lrm), per=len(m.sch.ts))
    measure("pixel_step", lambda: sampling_pass(m, b, pixel), per=len(m.sch.ts))
    kids = torch.randn(cfg.batch * cfg.K, 4, m.sch.latent, m.sch.latent, generator=b.g, device=dev)
    text = pixel.encode_text([p for p in b.prompts for _ in range(cfg.K)])
    with torch.no_grad(), m.amp():   # the pixel reward's parts, on the K children of --batch prompts
        x0 = pixel.x0(kids, T_PREV, text["cond"])
        img = pixel.decode(x0)
        measure("x0_pred", lambda: pixel.x0(kids, T_PREV, text["cond"]))
        measure("vae_decode", lambda: pixel.decode(x0))
        measure("image_reward", lambda: pixel.reward(img, text["emb"]))
    measure("lpo_update", lambda: lpo_update(m, b))
    r["ratio_step"] = r["pixel_step_s"] / r["lpo_step_s"]
    r["ratio_iteration"] = (r["pixel_step_s"] + r["lpo_update_s"]) / (r["lpo_step_s"] + r["lpo_update_s"])
    if cfg.dpo:   # 4: first free what Diffusion-DPO does not hold: it needs a second, fp32 U-Net
        del m.lrm, m.encoders, m.opt, pixel, kids, x0, img, text
        gc.collect()
        torch.cuda.empty_cache() if dev.type == "cuda" else None
        policy, opt = make_dpo(m, name)
        measure("dpo_update", lambda: dpo_update(m, policy, opt, b))
        r["ratio_dpo"] = r["dpo_update_s"] / r["lpo_update_s"]
    bar.close()
    return r


def main(cfg):
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.exit("bench.py: error: it measures one GPU; run it with python, not torchrun")
    dev = torch.device(cfg.device)
    if dev.type == "cuda":   # "cuda" -> "cuda:N": set_device and the memory counters want an index
        dev = torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    os.makedirs(cfg.out, exist_ok=True)
    path = os.path.join(cfg.out, "bench.json")
    env = dict(device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU {platform.machine()}",
               date=time.strftime("%Y-%m-%d"), torch=torch.__version__, diffusers=diffusers.__version__,
               transformers=transformers.__version__, cuda=torch.version.cuda, settings=asdict(cfg))
    old = json.load(open(path)) if cfg.resume and os.path.exists(path) else {}
    same = lambda e: (e["device"], {k: v for k, v in e["settings"].items() if k not in ("model", "resume")})  # noqa: E731
    if old and same(old["environment"]) != same(env):   # one table, one GPU and one set of settings
        sys.exit(f"bench.py: error: --resume: {path} was measured on another device or with other settings; use another --out")
    results = {k: v for k, v in old.get("results", {}).items() if k in cfg.model.split(",")}
    with open(os.path.join(cfg.out, "bench.jsonl"), "a") as f:
        log = lambda row: (f.write(json.dumps(dict(time=time.time(), device=env["device"], **row)) + "\n"), f.flush())
        for name in cfg.model.split(","):
            if name not in results:
                results[name] = bench_model(name, cfg, dev, log)
                gc.collect()
                torch.cuda.empty_cache() if dev.type == "cuda" else None
                write_atomic(path, dict(environment=env, results=results, table=table(results, env)))
    print(table(results, env))
    if dev.type == "cpu":
        print("(CPU: times and ratios here say nothing about a GPU; memory is only measured on CUDA)")
    return results


if __name__ == "__main__":
    main(get_config())
