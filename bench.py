"""bench.py: the numbers behind the paper's speed claims, on one GPU: LPO's sampling step against an
SPO-style pixel-reward step, an LPO update against a Diffusion-DPO step, an LRM training step, and
the peak memory of the two training stages, LPO and LRM; at the paper's per-GPU settings, on
full-size SD1.5 (512 px), SDXL and SD3-Medium (1024 px) with random weights (the FLOPs and bytes
of trained ones). One stage at a time, each with only what it holds on its GPU, through the
stages' own functions. Times: the median of --repeats after --warmup, CUDA-synchronised; memory:
max_memory_allocated / _reserved (on a CPU: the process's peak resident set so far). Phases:
  lpo_step       an LPO sampling step, K = 4: lpo.sample_tuples over a pass, per step, with its
                 split (_sample: CFG denoise + step; _score: the LRM's scores of the K children)
  pixel_step     the same with an SPO-style pixel reward in the LRM's place: per child an x0
                 prediction (a CFG pass), a VAE decode, a CLIP ViT-H/14 image tower at 224 px
  lpo_update     an LPO update on --batch_size pairs: lpo.pair_logprobs, lpo_loss, apply_update
  dpo_update     a Diffusion-DPO step on them: the whole denoiser against a frozen reference
  lpo_iteration  a sampling pass + an update at lpo.py's per-GPU batches: LPO's peak memory
  lrm_step       an LRM training step at the paper's per-GPU batch: lrm.train_step, apply_update

    python bench.py            # sd15 + sdxl + sd3 on one CUDA GPU
    python bench.py --tiny     # the tiny worlds on the CPU: their times mean nothing
    python bench.py --smoke    # full-size SD1.5 at 64 px on the CPU: the phases but the baselines
    python tools/memory.py     # the computed memory of every stage: which GPU it fits
Writes {out}/bench.json and {out}/bench.jsonl; --resume adds models. Deviations: random weights;
the tiny worlds' tokenizers, padded to the real 77 (T5: 256) tokens; the pixel path gets every
advantage (K children batched, a bf16 VAE, a fixed text embedding); random LRM pairs.
"""
import copy
import gc
import json
import os
import resource
import statistics
import time
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import diffusers
import torch
import torch.nn.functional as F
import transformers
from diffusers import (AutoencoderKL, DiffusionPipeline, SD3Transformer2DModel,
                       UNet2DConditionModel)
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,
                          CLIPVisionConfig, CLIPVisionModelWithProjection, T5Config,
                          T5EncoderModel)

import lpo
import lrm
import models
from lpo import FlowSchedule, lpo_loss, pair_logprobs, sample_tuples
from lrm_model import LatentRewardModel, take_rows
from distributed import apply_update, mixed_precision
from models import encode_for_cfg, guided_prediction, text_encoders, uncond_then_cond
from runs import command_line, fail, log_jsonl, parse_config, prepare_run_folder, write_text
from tiny.world import CAPTIONS


@dataclass
class Config:
    model: str = "sd15,sdxl,sd3"  # comma list of sd15 | sdxl | sd3 | tiny | tiny-xl | tiny-sd3
    tiny: bool = False  # the tiny worlds on the CPU: --model tiny,tiny-xl,tiny-sd3 --device cpu
    smoke: bool = False  # full-size SD1.5 at 64 px on the CPU, batches of 1-2 (minutes)
    device: str = "cuda"  # cuda | cuda:N | cpu
    out: str = "runs/bench"  # bench.json and bench.jsonl
    resume: bool = False  # keep the models already measured in {out}/bench.json
    threads: int = 0  # CPU intra-op threads in [0, inf), 0 = torch's default
    resolution: int = 0  # px in [0, inf), a multiple of 64; 0 = each preset's (512 / 1024 / 1024)
    num_children: int = 4  # K children per sampling step, in [2, inf) (paper: K = 4)
    batch_size: int = 1  # in [1, inf): prompts of lpo_step and pixel_step, pairs of the updates
    sample_batch_size: int = 0  # lpo_iteration: prompts a pass in [0, inf) (0: lpo.py's preset)
    train_batch_size: int = 0  # lpo_iteration: pairs an update in [0, inf) (0: lpo.py's preset)
    lrm_batch_size: int = 0  # pairs per LRM step in [0, inf) (0: the paper's per GPU, 16 / 4)
    warmup: int = 2  # untimed runs before the timed ones, in [0, inf)
    repeats: int = 5  # timed runs in [1, inf); the median is reported
    baselines: bool = True  # pixel_step and dpo_update: what LPO is compared with


TINY = dict(model="tiny,tiny-xl,tiny-sd3", device="cpu", warmup=1, repeats=3, threads=1,
            sample_batch_size=4, train_batch_size=4)
SMOKE = dict(model="sd15", device="cpu", resolution=64, warmup=0, repeats=1, threads=1,
             num_children=2, sample_batch_size=1, train_batch_size=1, lrm_batch_size=2,
             baselines=False)  # one thread (2 shared cores); LPO's and the LRM's code only
FOLDERS = {"sd15": "tiny/sd15", "sdxl": "tiny/sdxl", "sd3": "tiny/sd3", "tiny": "tiny/sd15",
           "tiny-xl": "tiny/sdxl", "tiny-sd3": "tiny/sd3"}
FULL_SIZE = ("sd15", "sdxl", "sd3")
T = 501  # the step the timed updates train at (the cost does not depend on t)
# the paper's global LRM batch (128 pairs SD1.5, 32 SDXL) over 8 GPUs; SD3: SDXL's
LRM_PAIRS_PER_GPU = {"sd15": 16, "sdxl": 4, "sd3": 4, "tiny": 4, "tiny-xl": 4, "tiny-sd3": 4}


def get_config(argv=None):
    argv = command_line(__file__, argv)
    defaults = asdict(Config())
    if "--tiny" in argv:
        defaults.update(TINY)
    if "--smoke" in argv:
        defaults.update(SMOKE)
    cfg = parse_config(Config, defaults, __doc__, argv)
    if not set(cfg.model.split(",")) <= set(FOLDERS):
        fail(f"--model {cfg.model!r}: a comma list of {', '.join(FOLDERS)}")
    if cfg.resolution % 64:
        fail(f"--resolution {cfg.resolution}: a multiple of 64 (0: each preset's)")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        fail(f"--device {cfg.device}: no CUDA GPU here; full-size networks need one (--tiny and "
             "--smoke run on a CPU, python tools/memory.py computes the memory table)")
    return cfg


# ----------------------------------------------------------------------------- networks
# stable-diffusion-v1-5, stable-diffusion-xl-base-1.0, stable-diffusion-3-medium-diffusers,
# laion/CLIP-ViT-H-14-laion2B-s32B-b79K (PickScore's image tower), google/t5-v1_1-xxl
TOKEN_IDS = dict(vocab_size=49408, bos_token_id=0, eos_token_id=1, pad_token_id=1)  # tiny world's
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768, **TOKEN_IDS)
CLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=20, hidden_act="gelu", projection_dim=1280, **TOKEN_IDS)
VIT_H = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
             num_attention_heads=16, patch_size=14, image_size=224, projection_dim=1024,
             hidden_act="gelu")
TINY_VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                patch_size=8, image_size=32, projection_dim=32)
VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, sample_size=512)
UNETS = {"sd15": dict(sample_size=64, cross_attention_dim=768),  # diffusers' defaults: SD1.5's
         "sdxl": dict(sample_size=128, block_out_channels=(320, 640, 1280),
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                        "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                      transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                      cross_attention_dim=2048, addition_embed_type="text_time",
                      addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
                      use_linear_projection=True)}
SCALING_FACTORS = {"sd15": 0.18215, "sdxl": 0.13025}
SD3_TRANSFORMER = dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                       pos_embed_max_size=192)  # SD3-Medium's; the rest: diffusers' defaults
SD3_VAE = dict(VAE, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
               sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609)
T5_XXL = T5Config(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                  feed_forward_proj="gated-gelu", vocab_size=32128, tie_word_embeddings=False)


def load_pipeline(name, device, dtype=torch.float32):
    """The tiny world's pipeline of `name`; sd15, sdxl, sd3: its family's, with random networks of
    the published architecture built on `device`, its tokenizers padded to 77 (T5: 256) tokens."""
    parts = {}
    with torch.device(device):
        if name in ("sd15", "sdxl"):
            parts = dict(text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L)),
                         vae=AutoencoderKL(**VAE, scaling_factor=SCALING_FACTORS[name]),
                         unet=UNet2DConditionModel(**UNETS[name]))
        if name == "sd3":
            parts = dict(text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L)),
                         vae=AutoencoderKL(**SD3_VAE), text_encoder_3=T5EncoderModel(T5_XXL),
                         transformer=SD3Transformer2DModel(**SD3_TRANSFORMER))
        if name in ("sdxl", "sd3"):
            parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG))
    pipe = DiffusionPipeline.from_pretrained(os.path.join(models.ROOT, FOLDERS[name]), **parts)
    for tokenizer in models.tokenizers(pipe) if parts else []:
        tokenizer.model_max_length = 256 if "T5" in type(tokenizer).__name__ else 77
    return pipe.to(device, dtype)


def denoiser(pipe):
    """SD1.5's or SDXL's U-Net, SD3's MMDiT."""
    return getattr(pipe, models.denoiser_name(pipe))


def default_resolution(pipe):
    """Denoiser sample size x the VAE's downsampling: SD1.5 512, SDXL and SD3 1024."""
    return denoiser(pipe).config.sample_size * pipe.vae_scale_factor


def latent_reward_model(pipe, resolution, copy_networks):
    """An LRM over the pipeline's denoiser and text encoders (or copies of them)."""
    networks = (denoiser(pipe), text_encoders(pipe))
    if copy_networks:
        networks = copy.deepcopy(networks)
    return LatentRewardModel(*networks, models.tokenizers(pipe), dict(resolution=resolution, g=7.5))


def preset(stage, name, **overrides):
    """A stage's own Config (lpo.py's, lrm.py's) at its preset for `name`, and the overrides set."""
    overrides = {key: value for key, value in overrides.items() if value}
    return stage.Config(**{**asdict(stage.Config()), **stage.PRESETS[name], **overrides})


def captions(count):
    return (CAPTIONS * count)[:count]


# ----------------------------------------------------------------------------- the stages
def load_lpo_stage(name, cfg, device):
    """lpo.py's resident set at its preset: the pipeline without its VAE, the policy denoiser +
    LoRA (the reference: adapters off) + AdamW, the frozen fp16 LRM (own copies), the schedule."""
    cuda = device.type == "cuda"
    settings = preset(lpo, name, num_children=cfg.num_children, resolution=cfg.resolution,
                      sample_batch_size=cfg.sample_batch_size,
                      train_batch_size=cfg.train_batch_size)
    pipe = load_pipeline(name, device, torch.bfloat16 if cuda else torch.float32)
    pipe.vae.to("cpu")  # lpo.py does not load it
    settings.resolution = settings.resolution or default_resolution(pipe)
    reward = latent_reward_model(pipe, settings.resolution, copy_networks=True).for_scoring()
    reward.to(device, torch.float16 if cuda else torch.float32)
    latent_size = settings.resolution // pipe.vae_scale_factor
    lora, optimizer, schedule = lpo.add_policy(denoiser(pipe), pipe.scheduler.config, settings,
                                               device, latent_size)
    return SimpleNamespace(pipe=pipe, denoiser=denoiser(pipe), settings=settings, lrm=reward,
                           lora=lora, optimizer=optimizer, schedule=schedule, device=device,
                           latent_size=latent_size)


@torch.no_grad()
def make_batch(stage, size, seed):
    """`size` prompts, their CFG conditioning, and random pairs: x_t at t, x_w and x_l at t - 50."""
    generator = torch.Generator(device=stage.device).manual_seed(seed)
    shape = (size, stage.denoiser.config.in_channels, stage.latent_size, stage.latent_size)
    batch = {key: torch.randn(shape, generator=generator, device=stage.device)
             for key in ("x_t", "x_w", "x_l")}
    t = torch.full((size,), T, device=stage.device)
    prompts = captions(size)
    return dict(batch, prompts=prompts, prompt_ids=torch.arange(size), generator=generator,
                cond=encode_for_cfg(stage.pipe, prompts, stage.settings.resolution), t=t,
                t_prev=t - 50)


class PixelReward:
    """SPO-style step reward with the LRM's interface, so that lpo.sample_tuples runs it unchanged:
    per child an x0 prediction, a VAE decode, a CLIP ViT-H/14 image tower (PickScore's), 224 px."""

    def __init__(self, stage):
        self.stage = stage
        self.vae = stage.pipe.vae.to(stage.device)
        vit = VIT_H if stage.denoiser.config.sample_size >= 64 else TINY_VIT
        with torch.device(stage.device):
            self.vit = CLIPVisionModelWithProjection(CLIPVisionConfig(**vit)).to(self.vae.dtype)
            self.text = torch.randn(1, vit["projection_dim"])  # (1, D)

    def encode_text(self, prompts):
        """Once a pass, as the LRM's: each prompt's conditioning (repeated K times) and uncond's."""
        cond = encode_for_cfg(self.stage.pipe, prompts, self.stage.settings.resolution)
        rows = torch.arange(len(prompts), 2 * len(prompts))  # [uncond; cond]: the cond rows
        return dict(cond=take_rows(cond, rows), uncond=take_rows(cond, torch.arange(1)))

    def reward(self, images):
        """100 cos(image, text) of the images, resized to the tower's input."""
        pixels = F.interpolate(images.float(), size=self.vit.config.image_size, mode="bicubic",
                               antialias=True)
        embeds = self.vit(pixel_values=pixels.to(self.vit.dtype)).image_embeds
        return 100 * F.cosine_similarity(embeds.float(), self.text, dim=-1)  # (n,)

    @torch.no_grad()
    def score(self, latents, t, text):
        """All B x K children in one batch: a CFG pass at each one's level t, the schedule's
        deterministic step to the chain's end (x0; DDIM: to a_0), the VAE decode, the reward."""
        schedule = self.stage.schedule
        cond = uncond_then_cond(text["uncond"], text["cond"])
        with mixed_precision(self.stage.device):
            prediction = guided_prediction(self.stage.denoiser, latents, t, cond,
                                           self.stage.settings.guidance_scale)  # eps, or v
            x0, _ = schedule.step(prediction, latents, t, schedule.prev_timesteps[-1].item(), 0)
            config = self.vae.config
            x0 = x0.to(self.vae.dtype) / config.scaling_factor + (config.shift_factor or 0)
            return self.reward(self.vae.decode(x0).sample)


def sampling_pass(stage, batch, reward):
    """lpo.py's whole sampling pass with this reward; returns lpo.py's own split of its seconds:
    "sample" (CFG denoise + the schedule's step) and "score" (the reward)."""
    text = reward.encode_text(batch["prompts"])
    return sample_tuples(stage.denoiser, reward, batch["cond"], text, batch["prompt_ids"],
                         stage.schedule, stage.settings, batch["generator"])[-1]  # the seconds


def lpo_update(stage, batch):
    """One update of lpo.py: lpo.pair_logprobs, lpo_loss, backward, lpo.apply_update."""
    logprobs = pair_logprobs(stage.denoiser, batch, batch["cond"], stage.schedule, stage.settings)
    loss, _ = lpo_loss(*logprobs, stage.settings.beta, stage.settings.clip_eps)
    loss.backward()
    apply_update(stage.lora, stage.optimizer, loss, 1)


def make_dpo(stage, name):
    """Diffusion-DPO (SalesforceAIResearch/DiffusionDPO) trains the whole denoiser (fp32 weights):
    AdamW; for SDXL (and SD3) its train.py forces Adafactor and gradient checkpointing."""
    with torch.device(stage.device):
        policy = type(stage.denoiser).from_config(stage.denoiser.config)
    if name in ("sd15", "tiny"):
        return policy, torch.optim.AdamW(policy.parameters(), lr=1e-8 * 2048, weight_decay=1e-2)
    policy.enable_gradient_checkpointing()
    return policy, transformers.Adafactor(policy.parameters(), lr=1e-8 * 2048, weight_decay=1e-2,
                                          scale_parameter=False, relative_step=False)


def diffusion_dpo_loss(err, ref_err, beta):
    """Diffusion-DPO (Wallace et al. 2023): -log sigmoid(-beta/2 ((e_w - e_l) - (e_ref_w -
    e_ref_l))), e = per-sample MSE of the prediction, rows [winners; losers]. (2B,) -> scalar"""
    err_w, err_l = err.chunk(2)
    ref_w, ref_l = ref_err.chunk(2)
    return -F.logsigmoid(-0.5 * beta * ((err_w - err_l) - (ref_w - ref_l))).mean()


def dpo_update(stage, policy, optimizer, batch):
    """One Diffusion-DPO step: the same t and noise for winner and loser, noised as lrm.py noises
    (DDPM, or SD3's flow); the target is the noise (SD3: the velocity, noise - x0)."""
    noise = batch["x_t"].repeat(2, 1, 1, 1)  # (2B, C, h, w)
    x0 = torch.cat([batch["x_w"], batch["x_l"]])
    t = batch["t"].repeat(2)
    x = lrm.add_noise(stage.pipe.scheduler, x0, noise, t)
    target = noise - x0 if isinstance(stage.schedule, FlowSchedule) else noise
    cond = take_rows(batch["cond"], torch.arange(len(t) // 2, len(t)).repeat(2))  # cond rows

    def errors(network):  # per-sample MSE of the prediction, (2B,)
        return (network(x, timestep=t, **cond).sample.float() - target).pow(2).mean((1, 2, 3))
    with mixed_precision(stage.device):
        err = errors(policy)
        with torch.no_grad():
            stage.denoiser.disable_adapters()  # the reference: the base
            ref_err = errors(stage.denoiser)
            stage.denoiser.enable_adapters()
    diffusion_dpo_loss(err, ref_err, 5000.0).backward()  # --beta_dpo 5000
    torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def load_lrm_stage(name, cfg, device):
    """lrm.py's resident set, as lrm.main builds it: the LRM (fp32, bf16 autocast, its preset's
    checkpointing), lrm.make_optimizer's AdamW, the frozen fp32 VAE, the base's noising."""
    settings = preset(lrm, name, resolution=cfg.resolution)
    pipe = load_pipeline(name, device)
    settings.resolution = settings.resolution or default_resolution(pipe)
    model = latent_reward_model(pipe, settings.resolution, copy_networks=False).train()
    if settings.grad_ckpt:
        model.denoiser.enable_gradient_checkpointing()
    trained, optimizer = lrm.make_optimizer(model, settings)
    return SimpleNamespace(lrm=model, vae=pipe.vae, trained=trained, optimizer=optimizer,
                           noise_scheduler=pipe.scheduler, settings=settings)


def make_pairs(stage, pairs, seed):
    """A batch as lrm.Pairs collates it: random images, image 0 preferred, the VAE's noise."""
    generator = torch.Generator().manual_seed(seed)
    size = stage.settings.resolution
    return dict(px=torch.rand(pairs, 2, 3, size, size, generator=generator) * 2 - 1,
                # (b, 2 images, VAE | noise, C, h, w)
                eps=torch.randn(pairs, 2, 2, *lrm.latent_shape(stage.vae, size),
                                generator=generator), caption=captions(pairs),
                label=torch.tensor([[1.0, 0.0]]).repeat(pairs, 1), weight=torch.ones(pairs),
                t=torch.full((pairs,), T))


def lrm_train_step(stage, batch, micro_batch):
    """One step of lrm.main: lrm.train_step (in micro-batches), apply_update (clip, AdamW)."""
    loss = lrm.train_step(stage.lrm, stage.vae, stage.noise_scheduler, batch, micro_batch,
                          stage.lrm.logit_scale.device, stage.settings.vae_batch_size)[0]
    apply_update(stage.trained, stage.optimizer, torch.tensor(loss), 1, stage.settings.grad_clip)


# ----------------------------------------------------------------------------- measuring, report
def measure(run, key, fn, per=1):
    """fn() after --warmup runs, then --repeats timed ones: the median seconds per `per` (a pass's
    steps) and of each part of them that fn returns; the peak memory: CUDA's allocated and
    reserved, or on a CPU the process's peak resident set so far. Into run.results and a log row."""
    cuda = run.device.type == "cuda"
    for _ in range(run.cfg.warmup):
        fn()
    if cuda:
        torch.cuda.synchronize(run.device)
        torch.cuda.reset_peak_memory_stats(run.device)
    splits = []
    for _ in range(run.cfg.repeats):
        start = time.perf_counter()
        split = fn() or {}  # a sampling pass returns its own split of its seconds
        if cuda:
            torch.cuda.synchronize(run.device)  # kernels are asynchronous: wait for them
        split["total"] = time.perf_counter() - start
        splits.append(split)
    row = {f"{key}_{part}_s" if part != "total" else f"{key}_s":
           statistics.median(s[part] for s in splits) / per for part in split}
    if cuda:
        row[key + "_peak_gb"] = torch.cuda.max_memory_allocated(run.device) / 1e9
        row[key + "_reserved_gb"] = torch.cuda.max_memory_reserved(run.device) / 1e9
    else:  # Linux: kB
        row[key + "_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    run.results.update(row)
    log_jsonl(os.path.join(run.cfg.out, "bench.jsonl"),
              dict(model=run.name, phase=key, time=time.time(), **row))


def free_memory():
    gc.collect()
    torch.cuda.empty_cache()  # a no-op without CUDA


def bench_lpo(run):
    """LPO's phases on lpo.py's resident set; lpo_iteration first, with nothing else resident."""
    results = run.results
    stage = load_lpo_stage(run.name, run.cfg, run.device)
    settings = stage.settings
    results["resolution"] = settings.resolution
    sample_batch = make_batch(stage, settings.sample_batch_size, seed=0)
    train_batch = make_batch(stage, settings.train_batch_size, seed=1)

    def iteration():
        sampling_pass(stage, sample_batch, stage.lrm)
        lpo_update(stage, train_batch)
    measure(run, "lpo_iteration", iteration)
    batch = make_batch(stage, run.cfg.batch_size, seed=2)
    steps = len(stage.schedule.timesteps)
    measure(run, "lpo_step", lambda: sampling_pass(stage, batch, stage.lrm), per=steps)
    measure(run, "lpo_update", lambda: lpo_update(stage, batch))
    if not run.cfg.baselines:
        return
    pixel = PixelReward(stage)
    measure(run, "pixel_step", lambda: sampling_pass(stage, batch, pixel), per=steps)
    results["ratio_step"] = results["pixel_step_s"] / results["lpo_step_s"]
    stage.lrm = stage.optimizer = pixel = None  # what Diffusion-DPO does not hold
    for network in [stage.pipe.vae] + text_encoders(stage.pipe):
        network.to("cpu")
    free_memory()
    policy, optimizer = make_dpo(stage, run.name)
    measure(run, "dpo_update", lambda: dpo_update(stage, policy, optimizer, batch))
    results["ratio_dpo"] = results["dpo_update_s"] / results["lpo_update_s"]


def bench_lrm(run):
    """lrm_step on lrm.py's resident set, in its preset's micro-batches (0: all the pairs)."""
    stage = load_lrm_stage(run.name, run.cfg, run.device)
    pairs = run.cfg.lrm_batch_size or LRM_PAIRS_PER_GPU[run.name]
    micro_batch = stage.settings.micro_batch_size or pairs
    run.results.update(lrm_pairs=pairs, lrm_micro_batch=micro_batch)
    batch = make_pairs(stage, pairs, seed=0)
    measure(run, "lrm_step", lambda: lrm_train_step(stage, batch, micro_batch))


def table(results, env):
    """Markdown: a column a model, a row a number of bench.json (bench.md says what each is)."""
    lines = ["{device}, torch {torch}, diffusers {diffusers}, {date}".format(**env), "",
             f"| phase | {' | '.join(results)} |", "|---" * (len(results) + 1) + "|"]
    for key in dict.fromkeys(key for row in results.values() for key in row):
        cells = [format(row[key], ".4g") if key in row else "n/a" for row in results.values()]
        lines.append(f"| {key} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main(cfg):
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    env = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
               date=time.strftime("%Y-%m-%d"), torch=torch.__version__,
               diffusers=diffusers.__version__, settings=asdict(cfg))
    prepare_run_folder(cfg.out, cfg.resume)  # refuses a run's folder without --resume
    path = os.path.join(cfg.out, "bench.json")
    results = {}
    if os.path.exists(path):  # --resume: one table, one setting
        with open(path) as json_file:
            report = json.load(json_file)
        old = report["environment"]
        if (old["device"], dict(old["settings"], model=cfg.model, resume=cfg.resume)) != (
                env["device"], env["settings"]):
            fail(f"--resume: {path} was measured on another device or with other settings; "
                 "pass another --out")
        results = report["results"]
    for model in cfg.model.split(","):
        if model not in results:
            run = SimpleNamespace(name=model, cfg=cfg, device=device, results={})
            torch.manual_seed(0)  # the random networks
            bench_lpo(run)
            free_memory()  # one stage at a time
            bench_lrm(run)
            results[model] = run.results
            write_text(path, json.dumps(dict(environment=env, results=results,
                                             table=table(results, env)), indent=2))
    print(table(results, env))
    return results


if __name__ == "__main__":
    main(get_config())
