"""Build the embedded tiny world that every stage runs on without downloads.

    python tiny/make_world.py                 # full world into tiny/ (~47 min on 2 CPU cores)
    python tiny/make_world.py --quick --out /tmp/w   # seconds; untrained-ish, for the tests
    python tiny/make_world.py --sd3-only      # only sd3/ on the sd15/vae in --out (~8-13 min)
    python tiny/make_world.py --flux-only     # only flux/ on the sd3/vae in --out (~5-7 min)

Writes, all in Hugging Face formats, loaded by the stages through the same calls as the
real checkpoints:
    sd15/       StableDiffusionPipeline folder (CLIPTokenizer written here, a frozen random
                CLIPTextModel, AutoencoderKL and UNet2DConditionModel trained here, DDIMScheduler)
    sdxl/       StableDiffusionXLPipeline folder (two text encoders, text_time conditions)
    sd3/        StableDiffusion3Pipeline folder (two CLIP encoders with projection, a T5 encoder
                with a T5 tokenizer written here, the sd15 VAE with a measured shift and scale,
                an MMDiT trained here with the rectified-flow loss, FlowMatchEulerDiscreteScheduler)
    flux/       FluxPipeline folder (a CLIP encoder for the pooled vector, a T5 encoder, the sd3
                VAE, a FLUX.1-dev-shaped transformer with a guidance input trained here with the
                rectified-flow loss, FlowMatchEulerDiscreteScheduler with FLUX's dynamic shift)
    pickapic/   Pick-a-Pic v1 schema parquet dataset (train / validation_unique / test_unique),
                image pairs sampled from sd15/ and labelled by the judge in world.py
    world.json  what was built, the base model's caption-match rate, the times
Deterministic for a given machine and torch build (fixed seeds, fixed thread count).
"""

import argparse
import functools
import json
import math
import os
import shutil
import string
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tiny.world import CAPTIONS, RES, WORDS, human_labels, judge_scores, random_drawing, to_jpeg  # noqa: E402

MAX_LEN = 16  # tokenizer/text-encoder context (SD: 77; T5: 256 in SD3); every tiny caption fits
SD3_SHIFT = 3.0  # FlowMatchEulerDiscreteScheduler shift of SD3-Medium's scheduler config
SD3_CFG = 5.0  # the tiny SD3 base's guidance scale (SD3: 7.0; see make_sd3)
FLUX_GUIDANCE = 3.5  # the tiny FLUX samples at FluxPipeline's default guidance (FLUX.1-dev's)
FLUX_GUIDANCE_RANGE = (1.0, 5.0)  # the guidance input's training draw (see make_flux)


# ----------------------------------------------------------------------------- text side
def write_tokenizer(path, pad_token):
    """A real CLIPTokenizer whose BPE makes each caption word one token."""
    os.makedirs(path, exist_ok=True)
    chars = sorted({ch for w in WORDS for ch in w} | set("abcdefghijklmnopqrstuvwxyz"))
    vocab = ["<|startoftext|>", "<|endoftext|>", "!"] + chars + [c + "</w>" for c in chars]
    merges = []
    for w in WORDS:
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        while len(parts) > 1:  # merge left to right: r e -> re, re d</w> -> red</w>
            merges.append(f"{parts[0]} {parts[1]}")
            parts = [parts[0] + parts[1]] + parts[2:]
            if parts[0] not in vocab:
                vocab.append(parts[0])
    merges = list(dict.fromkeys(merges))
    with open(os.path.join(path, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f)
    with open(os.path.join(path, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(
        os.path.join(path, "vocab.json"),
        os.path.join(path, "merges.txt"),
        pad_token=pad_token,
        model_max_length=MAX_LEN,
    )
    tok.save_pretrained(path)
    return tok


def text_config(tok, **kw):
    return CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LEN,
        projection_dim=32,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **kw,
    )


def write_t5_tokenizer(path):
    """A real T5 tokenizer (SentencePiece-style Unigram, T5's <pad> 0, </s> 1, <unk> 2) in which
    each caption word is one piece; any other lowercase word falls back to letters."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w, -1.0) for w in WORDS]  # "\u2581red": T5's word-start marker
    pieces += [(c, -10.0) for c in "\u2581" + string.ascii_lowercase]  # letters cost more
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    metaspace = dict(replacement="\u2581", prepend_scheme="always", split=True)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(**metaspace)]
    )
    tokenizer.decoder = decoders.Metaspace(**metaspace)
    tokenizer.post_processor = processors.TemplateProcessing(  # T5 appends </s>, no BOS
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)]
    )
    tok = T5TokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_ids=0,  # T5's 100 <extra_id_*> sentinels are for span corruption, unused here
        model_max_length=MAX_LEN,
    )
    tok.save_pretrained(path)
    return T5TokenizerFast.from_pretrained(path)


def t5_config(tok):
    """T5-v1.1 (gated-GELU) encoder, SD3's text_encoder_3, at the tiny width 64."""
    return T5Config(
        vocab_size=len(tok),
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id,
    )


# ----------------------------------------------------------------------------- image side
def images_to_tensor(images):
    a = np.stack([np.asarray(im, dtype=np.float32) for im in images])  # (N, H, W, 3)
    return torch.from_numpy(a).permute(0, 3, 1, 2) / 127.5 - 1.0  # (N, 3, H, W) in [-1, 1]


def train_vae(images, steps, bs, seed):
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        sample_size=RES,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
    )
    x_all = images_to_tensor(images)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + np.cos(np.pi * s / steps))
    )  # cosine
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        x = x_all[torch.randint(len(x_all), (bs,), generator=g)]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        loss = F.mse_loss(rec, x) + 1e-3 * post.kl().mean() / post.mean[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"  vae step {step:4d}  loss {loss.item():.4f}", flush=True)
    vae.eval()
    with torch.no_grad():
        lat = torch.cat(
            [vae.encode(x_all[i : i + 512]).latent_dist.mean for i in range(0, len(x_all), 512)]
        )
    vae.register_to_config(
        scaling_factor=round(1.0 / lat.std().item(), 4)
    )  # measured, not SD's 0.18215
    return vae, lat * vae.config.scaling_factor


def train_unet(pipe, latents, captions, steps, bs, seed, log_every=200, eval_fn=None):
    """Ordinary eps-prediction denoising loss with 10% caption dropout (for CFG)."""
    torch.manual_seed(seed)
    unet, sched = pipe.unet, pipe.scheduler
    xl = isinstance(pipe, StableDiffusionXLPipeline)
    with torch.no_grad():  # every caption and the empty one, encoded once
        if xl:
            emb, _, pooled, _ = pipe.encode_prompt(CAPTIONS, do_classifier_free_guidance=False)
        else:
            emb, _ = pipe.encode_prompt(CAPTIONS, "cpu", 1, do_classifier_free_guidance=False)
            null, _ = pipe.encode_prompt([""], "cpu", 1, do_classifier_free_guidance=False)
    cap_idx = torch.tensor([CAPTIONS.index(c) for c in captions])
    acp = sched.alphas_cumprod
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=1e-2)
    lr = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))
    g = torch.Generator().manual_seed(seed)
    unet.train()
    for step in range(steps):
        i = torch.randint(len(latents), (bs,), generator=g)
        x0, c = latents[i], cap_idx[i]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, len(acp), (bs,), generator=g)
        a = acp[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        drop = (torch.rand(bs, generator=g) < 0.1).view(-1, 1, 1)
        if xl:  # SDXL's unconditional input is all zeros (force_zeros_for_empty_prompt)
            ctx = torch.where(drop, 0.0, emb[c])
            kw = dict(
                added_cond_kwargs=dict(
                    text_embeds=torch.where(drop[:, 0], 0.0, pooled[c]),
                    time_ids=torch.tensor([[RES, RES, 0, 0, RES, RES]] * bs).float(),
                )
            )
        else:
            ctx, kw = torch.where(drop, null, emb[c]), {}
        loss = F.mse_loss(unet(xt, t, ctx, **kw).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lr.step()
        if (step + 1) % log_every == 0 or step == steps - 1:
            msg = f"  unet step {step + 1:5d}  loss {loss.item():.4f}"
            if eval_fn is not None:
                unet.eval()
                msg += f"  caption match {eval_fn(pipe):.3f}"
                unet.train()
            print(msg, flush=True)
    unet.eval()


def shifted_sigma(u, shift):
    """SD3's timestep shift (FlowMatchEulerDiscreteScheduler): more time at high noise."""
    return shift * u / (1 + (shift - 1) * u)


def rectified_flow_sample(x0, noise, sigma):
    """x_s = (1 - s) x_0 + s e: the straight path from data (s = 0) to noise (s = 1)."""
    s = sigma.view(-1, 1, 1, 1)
    return (1 - s) * x0 + s * noise


def rectified_flow_target(x0, noise):
    """The velocity dx_s/ds = e - x_0, what the SD3 transformer predicts."""
    return noise - x0


def train_transformer(
    pipe, velocity, shift, latents, captions, steps, bs, seed, log_every=200, eval_fn=None
):
    """The rectified-flow loss of SD3 and FLUX: sigma logit-normal(0, 1) (the SD3 paper's
    rf/lognorm(0, 1)) then shifted as the pipeline samples (diffusers' SD3 training scripts draw
    sigmas from the shifted table). `velocity(model, x_s, sigma, caption_index, generator)` is
    the family's denoiser call (sd3_velocity, flux_velocity): its conditioning and units."""
    torch.manual_seed(seed)
    model = pipe.transformer
    cap_idx = torch.tensor([CAPTIONS.index(c) for c in captions])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    lr = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))
    g = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        i = torch.randint(len(latents), (bs,), generator=g)
        x0, c = latents[i], cap_idx[i]  # (B, 4, 8, 8), (B,)
        noise = torch.randn(x0.shape, generator=g)
        sigma = shifted_sigma(torch.sigmoid(torch.randn(bs, generator=g)), shift)  # (B,)
        xs = rectified_flow_sample(x0, noise, sigma)
        pred = velocity(model, xs, sigma, c, g)  # (B, 4, 8, 8)
        loss = F.mse_loss(pred, rectified_flow_target(x0, noise))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lr.step()
        if (step + 1) % log_every == 0 or step == steps - 1:
            msg = f"  transformer step {step + 1:5d}  loss {loss.item():.4f}"
            if eval_fn is not None:
                model.eval()
                msg += f"  caption match {eval_fn(pipe):.3f}"
                model.train()
            print(msg, flush=True)
    model.eval()


def sd3_velocity(pipe):
    """SD3's denoiser call for train_transformer: the captions and the empty one encoded once as
    the pipeline does, 10% caption dropout to the empty prompt (SD3's CFG uncond)."""
    with torch.no_grad():
        emb, _, pooled, _ = pipe.encode_prompt(
            CAPTIONS, None, None, do_classifier_free_guidance=False, max_sequence_length=MAX_LEN
        )  # (15, 2 * MAX_LEN, 64), (15, 64)
        null, _, null_pooled, _ = pipe.encode_prompt(
            [""], None, None, do_classifier_free_guidance=False, max_sequence_length=MAX_LEN
        )

    def velocity(model, xs, sigma, c, g):
        drop = torch.rand(len(c), generator=g) < 0.1
        cond = dict(
            encoder_hidden_states=torch.where(drop.view(-1, 1, 1), null, emb[c]),
            pooled_projections=torch.where(drop.view(-1, 1), null_pooled, pooled[c]),
        )
        return model(xs, timestep=sigma * 1000, **cond).sample  # the model's unit: sigma * 1000

    return velocity


def flux_velocity(pipe):
    """FLUX's denoiser call for train_transformer: T5 states and the CLIP pooled vector encoded
    once as the pipeline does, the latents packed 2x2 into tokens with their position ids (as
    FluxPipeline samples), timestep sigma itself (the model scales it by 1000), and a guidance
    input drawn from FLUX_GUIDANCE_RANGE. No caption dropout: FluxPipeline samples without CFG."""
    with torch.no_grad():
        emb, pooled, txt_ids = pipe.encode_prompt(CAPTIONS, None, max_sequence_length=MAX_LEN)
    side = RES // pipe.vae_scale_factor  # the latent's side, 8
    img_ids = pipe._prepare_latent_image_ids(1, side // 2, side // 2, "cpu", torch.float32)
    low, high = FLUX_GUIDANCE_RANGE

    def velocity(model, xs, sigma, c, g):
        b, channels = xs.shape[:2]
        guidance = low + (high - low) * torch.rand(b, generator=g)  # (B,)
        tokens = pipe._pack_latents(xs, b, channels, side, side)  # (B, 16, 4 * 4)
        cond = dict(encoder_hidden_states=emb[c], pooled_projections=pooled[c], txt_ids=txt_ids)
        pred = model(tokens, timestep=sigma, guidance=guidance, img_ids=img_ids, **cond).sample
        return pipe._unpack_latents(pred, RES, RES, pipe.vae_scale_factor)  # (B, 4, 8, 8)

    return velocity


def save_pipeline(pipe, path):
    shutil.rmtree(path, ignore_errors=True)
    pipe.save_pretrained(path)
    for name in ("unet", "transformer", "vae"):
        if name in pipe.components:  # fp16 on disk; text encoders stay fp32 (loaded as saved)
            pipe.components[name].half().save_pretrained(os.path.join(path, name))
            pipe.components[name].float()


@torch.no_grad()
def generate(pipe, captions, seed, cfg=5.0, bs=150):
    """PIL images, one per caption, 20 steps (DDIM eta 0 / flow Euler), the per-image seed =
    seed + index."""
    out = []
    # SD3 and FLUX: the T5 length every stage uses, the T5 tokenizer's model_max_length (FLUX
    # would pad T5 to 512 tokens, 496 of them pads that the transformer never saw)
    flow = isinstance(pipe, (StableDiffusion3Pipeline, FluxPipeline))
    kw = dict(max_sequence_length=MAX_LEN) if flow else {}
    for i in range(0, len(captions), bs):
        gens = [
            torch.Generator().manual_seed(seed + j) for j in range(i, min(i + bs, len(captions)))
        ]
        out += pipe(
            captions[i : i + bs],
            num_inference_steps=20,
            guidance_scale=cfg,
            generator=gens,
            height=RES,
            width=RES,
            **kw,
        ).images
    return out


def fp16_round_trip(*models):
    """The world is stored in fp16 (half the bytes; diffusers loads it back as fp32): round
    every weight and float buffer (SD3's fixed sin-cos position table is one) now, so the
    numbers measured here are those of the saved models."""
    with torch.no_grad():
        for m in models:
            for p in [*m.parameters(), *m.buffers()]:
                if p.is_floating_point():
                    p.copy_(p.half().float())


def caption_match(pipe, n=150, seed=10_000, cfg=5.0):
    caps = [CAPTIONS[i % len(CAPTIONS)] for i in range(n)]
    return judge_scores(generate(pipe, caps, seed, cfg=cfg), caps)["match"].mean()


# ----------------------------------------------------------------------------- SD3
def encode_means(vae, images):
    """The VAE's posterior means of the drawings, 512 at a time: (N, 4, 8, 8)."""
    x_all = images_to_tensor(images)
    with torch.no_grad():
        return torch.cat(
            [vae.encode(x_all[i : i + 512]).latent_dist.mean for i in range(0, len(x_all), 512)]
        )


def measure_latent_stats(vae, images):
    """SD3's VAE normalisation, latents = (z - shift) * scale: shift the mean and scale 1 / std
    of the encoded drawings (SD3's own VAE: 0.0609 and 1.5305). Returns the normalised latents."""
    z = encode_means(vae, images)  # (N, 4, 8, 8)
    shift = round(z.mean().item(), 4)
    vae.register_to_config(shift_factor=shift, scaling_factor=round(1 / z.std().item(), 4))
    return (z - shift) * vae.config.scaling_factor


def make_sd3(out, images, captions, quick, steps, info):
    """The SD3-architecture pipeline (MMDiT, three text encoders, flow matching) into out/sd3,
    on the VAE saved in out/sd15/vae, so it can be rebuilt alone (--sd3-only)."""
    t0 = time.time()
    vae = AutoencoderKL.from_pretrained(os.path.join(out, "sd15", "vae"))
    latents = measure_latent_stats(vae, images)
    tmp = os.path.join(out, "_tok_sd3")
    tok = write_tokenizer(os.path.join(tmp, "tokenizer"), pad_token="<|endoftext|>")
    tok2 = write_tokenizer(os.path.join(tmp, "tokenizer_2"), pad_token="!")  # as SD3's second
    tok3 = write_t5_tokenizer(os.path.join(tmp, "tokenizer_3"))
    shutil.rmtree(tmp)
    torch.manual_seed(7)
    te = CLIPTextModelWithProjection(text_config(tok)).eval()
    te2 = CLIPTextModelWithProjection(text_config(tok2)).eval()
    te3 = T5EncoderModel(t5_config(tok3)).eval()
    torch.manual_seed(8)
    transformer = SD3Transformer2DModel(
        sample_size=RES // 4,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=4,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=te3.config.d_model,  # CLIP states (32 + 32) padded to T5's width
        caption_projection_dim=64,  # = the inner width, heads x head dim
        pooled_projection_dim=2 * te.config.projection_dim,  # the two CLIP pooled, concatenated
        pos_embed_max_size=16,  # up to 16x16 patches: 128 px
    )
    sd3 = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=SD3_SHIFT),
        vae=vae,
        text_encoder=te,
        tokenizer=tok,
        text_encoder_2=te2,
        tokenizer_2=tok2,
        text_encoder_3=te3,
        tokenizer_3=tok3,
    )
    sd3.set_progress_bar_config(disable=True)
    eval_fn = functools.partial(caption_match, cfg=SD3_CFG)
    t_train = time.time()
    bs = 32 if quick else 128  # quick: seconds in the tests, not a model
    train_transformer(
        sd3,
        sd3_velocity(sd3),
        sd3.scheduler.config.shift,
        latents,
        captions,
        steps=steps,
        bs=bs,
        seed=9,
        eval_fn=None if quick else eval_fn,
    )
    fp16_round_trip(transformer)
    info["sd3_seconds_train"] = round(time.time() - t_train, 1)  # with the evaluations in it
    info["sd3_steps"] = steps
    info["sd3_scheduler_shift"] = SD3_SHIFT
    info["sd3_vae_shift_factor"] = vae.config.shift_factor
    info["sd3_vae_scaling_factor"] = vae.config.scaling_factor
    info["sd3_guidance_scale"] = SD3_CFG
    for cfg in (3.0, 5.0, 7.0) if not quick else ():  # the base's match against guidance
        info[f"sd3_caption_match_cfg{cfg:g}"] = round(caption_match(sd3, n=300, cfg=cfg), 4)
    match = caption_match(sd3, n=30 if quick else 300, cfg=SD3_CFG)
    info["sd3_caption_match"] = round(match, 4)
    print(f"  sd3 base caption match {info['sd3_caption_match']:.3f}", flush=True)
    save_pipeline(sd3, os.path.join(out, "sd3"))
    info["sd3_seconds"] = round(time.time() - t0, 1)


# ----------------------------------------------------------------------------- FLUX
def flux_shift(pipe):
    """FLUX's resolution-dependent shift: mu linear in the image's token count (FluxPipeline's
    calculate_shift; FLUX.1's 256 tokens -> 0.5, 4096 -> 1.15), applied by the scheduler as the
    exponential time shift exp(mu) / (exp(mu) + 1 / sigma - 1), which is shifted_sigma with
    shift exp(mu). Returns (mu, exp(mu)) at the tiny world's RES px."""
    tokens = (RES // pipe.vae_scale_factor // 2) ** 2  # 2x2 latent patches: 16 at 32 px
    c = pipe.scheduler.config
    mu = calculate_shift(
        tokens, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift
    )
    return mu, math.exp(mu)


def make_flux(out, images, captions, quick, steps, info):
    """The FLUX.1-dev-architecture pipeline (double- and single-stream blocks, RoPE, a guidance
    input; a CLIP pooled vector and T5 states; flow matching) into out/flux, on the VAE saved in
    out/sd3/vae (its measured shift and scale), so it can be rebuilt alone (--flux-only).

    Guidance (deviation): FLUX.1-dev is guidance-distilled, it regresses a CFG teacher's
    velocity at a guidance value g given as an input. There is no teacher here: the guidance
    input is drawn uniformly from FLUX_GUIDANCE_RANGE and the target is the plain conditional
    velocity for every g (a teacher at guidance 1), so the model learns to (nearly) ignore g
    (world.json: the caption match at g = 1, 3.5, 5); it samples at FluxPipeline's default 3.5
    without CFG (true_cfg_scale 1), one forward a step. Sampling passes max_sequence_length =
    tokenizer_2's 16: FluxPipeline's default 512 pads T5 with 496 states never seen in training
    (150 samples: caption match 0.00 against 0.66, and ~30x slower).
    Shift: FLUX.1's scheduler settings, extrapolated by calculate_shift below its 256 tokens to
    the tiny world's 16 (mu 0.459, shift 1.58, near FLUX.1's 1.65 at 256); the training sigmas
    are drawn with that shift."""
    t0 = time.time()
    vae = AutoencoderKL.from_pretrained(os.path.join(out, "sd3", "vae"))
    latents = (encode_means(vae, images) - vae.config.shift_factor) * vae.config.scaling_factor
    tmp = os.path.join(out, "_tok_flux")
    tok = write_tokenizer(os.path.join(tmp, "tokenizer"), pad_token="<|endoftext|>")
    tok2 = write_t5_tokenizer(os.path.join(tmp, "tokenizer_2"))
    shutil.rmtree(tmp)
    torch.manual_seed(11)
    te = CLIPTextModel(text_config(tok)).eval()
    te2 = T5EncoderModel(t5_config(tok2)).eval()
    torch.manual_seed(12)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * vae.config.latent_channels,  # 2x2 latent patches packed in one token
        num_layers=2,  # double-stream blocks (FLUX.1: 19)
        num_single_layers=2,  # single-stream blocks (FLUX.1: 38)
        attention_head_dim=16,
        num_attention_heads=4,  # inner width 64, as the tiny SD3's
        joint_attention_dim=te2.config.d_model,
        pooled_projection_dim=te.config.hidden_size,  # CLIPTextModel's pooled output
        guidance_embeds=True,  # FLUX.1-dev (schnell: False)
        axes_dims_rope=(4, 6, 6),  # FLUX.1's (16, 56, 56) of 128 scaled to 16, each axis even
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )  # FLUX.1's
    flux = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=te,
        tokenizer=tok,
        text_encoder_2=te2,
        tokenizer_2=tok2,
        transformer=transformer,
    )
    flux.set_progress_bar_config(disable=True)
    mu, shift = flux_shift(flux)
    eval_fn = functools.partial(caption_match, cfg=FLUX_GUIDANCE)
    t_train = time.time()
    train_transformer(
        flux,
        flux_velocity(flux),
        shift,
        latents,
        captions,
        steps=steps,
        bs=32 if quick else 128,  # quick: seconds in the tests, not a model
        seed=13,
        eval_fn=None if quick else eval_fn,
    )
    fp16_round_trip(transformer)
    info["flux_seconds_train"] = round(time.time() - t_train, 1)  # with the evaluations in it
    info["flux_steps"] = steps
    info["flux_image_seq_len"] = (RES // flux.vae_scale_factor // 2) ** 2
    info["flux_mu"] = round(mu, 4)
    info["flux_shift"] = round(shift, 4)
    info["flux_guidance_scale"] = FLUX_GUIDANCE
    low, high = FLUX_GUIDANCE_RANGE
    target = "plain rectified-flow target (no CFG teacher)"
    info["flux_guidance_train"] = f"uniform [{low:g}, {high:g}], {target}"
    for guidance in (1.0, 5.0) if not quick else ():  # the guidance input does (almost) nothing
        match = caption_match(flux, n=300, cfg=guidance)
        info[f"flux_caption_match_guidance{guidance:g}"] = round(match, 4)
    match = caption_match(flux, n=30 if quick else 300, cfg=FLUX_GUIDANCE)
    info["flux_caption_match"] = round(match, 4)
    print(f"  flux base caption match {info['flux_caption_match']:.3f}", flush=True)
    save_pipeline(flux, os.path.join(out, "flux"))
    info["flux_seconds"] = round(time.time() - t0, 1)


# ----------------------------------------------------------------------------- preference data
def make_split(pipe, n_pairs, seed):
    """Pick-a-Pic v1 schema rows, labelled by the judge. Like Pick-a-Pic, the images come from
    several "models": half the pairs are sampled from the tiny base at a random CFG, half are
    drawings by an "artist" who draws the caption's colour and shape only half the time. The
    drawn pairs carry the text-alignment signal without looks to go with it (an LRM trained on
    base samples alone learns "clean and centred", which correlates with matching in base
    samples, and nothing about colour or shape). A few rows are unlabelled or identical."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, len(CAPTIONS) + 1) ** 0.7  # uneven prompt frequencies
    caps = list(rng.choice(CAPTIONS, size=n_pairs, p=weights / weights.sum()))
    cfgs = rng.choice([1.5, 3.0, 5.0, 7.5, 0.0, 0.0, 0.0, 0.0], size=n_pairs)  # 0: drawn
    img0, img1 = [None] * n_pairs, [None] * n_pairs
    for cfg in np.unique(cfgs):
        idx = np.where(cfgs == cfg)[0]
        sub = [caps[i] for i in idx]
        if cfg == 0.0:

            def art(c):
                return random_drawing(
                    rng, c if rng.random() < 0.5 else CAPTIONS[rng.integers(len(CAPTIONS))]
                )[0]

            a, b = [art(c) for c in sub], [art(c) for c in sub]
        else:
            a = generate(pipe, sub, seed * 7919 + int(cfg * 1000), cfg=float(cfg))
            b = generate(pipe, sub, seed * 7919 + int(cfg * 1000) + 500_000, cfg=float(cfg))
        for k, i in enumerate(idx):
            img0[i], img1[i] = a[k], b[k]
    same = rng.random(n_pairs) < 0.01
    img1 = [im0 if s else im1 for im0, im1, s in zip(img0, img1, same)]
    h0, h1 = judge_scores(img0, caps)["human"], judge_scores(img1, caps)["human"]
    label_0, label_1 = human_labels(h0, h1, rng)
    label_0[same], label_1[same] = 0.5, 0.5
    has_label = rng.random(n_pairs) >= 0.02
    label_0[~has_label], label_1[~has_label] = 0.0, 0.0
    counts = {c: caps.count(c) for c in set(caps)}
    return Dataset.from_dict(
        {
            "caption": caps,
            "jpg_0": [to_jpeg(im) for im in img0],
            "jpg_1": [to_jpeg(im) for im in img1],
            "label_0": label_0.tolist(),
            "label_1": label_1.tolist(),
            "num_example_per_prompt": [counts[c] for c in caps],
            "has_label": has_label.tolist(),
            "are_different": (~same).tolist(),
        }
    )


# No YAML `configs:` block on purpose: with one, `datasets` caches a local folder under a hash of
# its file patterns only, so a regenerated world would load stale rows from the cache. Without
# it, the splits come from the file names (data/{split}-00000-of-00001.parquet) and the cache
# key includes the files' mtimes.
DATASET_CARD = """# tiny Pick-a-Pic

Pick-a-Pic v1 schema (`caption, jpg_0, jpg_1, label_0, label_1, num_example_per_prompt,
has_label, are_different`). Pairs sampled from the tiny SD pipeline at CFG 1.5-7.5, labelled
by the judge in `tiny/world.py` (ties 0.5/0.5, 10% of decisive labels flipped).
Half the pairs are drawings (an "artist" who follows the caption half the time).
Unlike the real `*_unique` splits, the held-out splits repeat the 15 captions with new seeds.
Generated by `tiny/make_world.py`.
"""


# ----------------------------------------------------------------------------- main
def main(args):
    torch.set_num_threads(1)  # one thread: the same numbers on any machine, and no OMP thrashing
    q = args.quick
    one_part = args.data_only or args.sd3_only or args.flux_only
    t0, info = time.time(), ({} if one_part else {"quick": q})
    out = args.out
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(0)
    drawn = [random_drawing(rng) for _ in range(512 if q else 20_000)]
    images, captions = [d[0] for d in drawn], [d[1] for d in drawn]

    if args.data_only:  # regenerate the preference data from the pipelines already in --out
        return make_data(
            StableDiffusionPipeline.from_pretrained(os.path.join(out, "sd15")), out, q, info, t0
        )
    if args.sd3_only:  # rebuild sd3/ alone, on the same drawings and the saved sd15 VAE
        print("== SD3-architecture transformer", flush=True)
        make_sd3(out, images, captions, q, 10 if q else args.sd3_steps, info)
        return update_world_json(out, info)
    if args.flux_only:  # rebuild flux/ alone, on the same drawings and the saved sd3 VAE
        print("== FLUX-architecture transformer", flush=True)
        make_flux(out, images, captions, q, 10 if q else args.flux_steps, info)
        return update_world_json(out, info)
    print("== VAE", flush=True)
    vae, latents = train_vae(images, steps=20 if q else 800, bs=64, seed=1)
    fp16_round_trip(vae)
    info["vae_scaling_factor"] = vae.config.scaling_factor

    print("== text encoders and tokenizers", flush=True)
    tmp = os.path.join(out, "_tok")
    tok = write_tokenizer(os.path.join(tmp, "tokenizer"), pad_token="<|endoftext|>")
    tok2 = write_tokenizer(os.path.join(tmp, "tokenizer_2"), pad_token="!")  # as SDXL's second
    torch.manual_seed(2)
    te = CLIPTextModel(text_config(tok)).eval()
    te_xl = CLIPTextModel(text_config(tok)).eval()
    te2_xl = CLIPTextModelWithProjection(text_config(tok2)).eval()
    shutil.rmtree(tmp)
    sched = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
    )
    unet_kw = dict(
        sample_size=RES // 4,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        norm_num_groups=16,
    )

    print("== SD1.5-architecture U-Net", flush=True)
    torch.manual_seed(3)
    unet = UNet2DConditionModel(
        **unet_kw,
        cross_attention_dim=32,
        attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D",) * 2,
        up_block_types=("CrossAttnUpBlock2D",) * 2,
    )
    sd = StableDiffusionPipeline(
        vae=vae,
        text_encoder=te,
        tokenizer=tok,
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    sd.set_progress_bar_config(disable=True)
    # ~800 steps leaves a base that matches its caption ~80% of the time: room for LPO
    # (a base trained to convergence matches ~98% and there is nothing left to prefer).
    train_unet(
        sd,
        latents,
        captions,
        steps=10 if q else args.unet_steps,
        bs=128,
        seed=4,
        eval_fn=None if q else caption_match,
    )
    fp16_round_trip(unet)
    info["sd15_caption_match"] = caption_match(sd, n=30 if q else 300)
    print(f"  sd15 base caption match {info['sd15_caption_match']:.3f}", flush=True)
    save_pipeline(sd, os.path.join(out, "sd15"))

    print("== SDXL-architecture U-Net", flush=True)
    torch.manual_seed(5)
    unet_xl = UNet2DConditionModel(
        **unet_kw,
        cross_attention_dim=64,
        attention_head_dim=(2, 4),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 32,
    )
    xl = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=te_xl,
        text_encoder_2=te2_xl,
        tokenizer=tok,
        tokenizer_2=tok2,
        unet=unet_xl,
        scheduler=sched,
        force_zeros_for_empty_prompt=True,
    )
    xl.set_progress_bar_config(disable=True)
    train_unet(xl, latents, captions, steps=10 if q else args.unet_steps, bs=128, seed=6)
    fp16_round_trip(unet_xl)
    info["sdxl_caption_match"] = caption_match(xl, n=30 if q else 300)
    print(f"  sdxl base caption match {info['sdxl_caption_match']:.3f}", flush=True)
    save_pipeline(xl, os.path.join(out, "sdxl"))

    print("== SD3-architecture transformer", flush=True)
    make_sd3(out, images, captions, q, 10 if q else args.sd3_steps, info)

    print("== FLUX-architecture transformer", flush=True)
    make_flux(out, images, captions, q, 10 if q else args.flux_steps, info)

    make_data(sd, out, q, info, t0)


def make_data(sd, out, quick, info, t0):
    print("== preference pairs", flush=True)
    sd.set_progress_bar_config(disable=True)
    data = os.path.join(out, "pickapic")
    shutil.rmtree(data, ignore_errors=True)
    os.makedirs(os.path.join(data, "data"))
    sizes = (
        {"train": 48, "validation_unique": 16, "test_unique": 16}
        if quick
        else {"train": 1600, "validation_unique": 200, "test_unique": 200}
    )
    for i, (split, n) in enumerate(sizes.items()):
        ds = make_split(sd, n, seed=100 + i)
        ds.to_parquet(os.path.join(data, "data", f"{split}-00000-of-00001.parquet"))
        info[f"pairs_{split}"] = n
    with open(os.path.join(data, "README.md"), "w") as f:
        f.write(DATASET_CARD)
    seconds = "seconds_data" if "vae_scaling_factor" not in info else "seconds"
    update_world_json(out, {**info, seconds: round(time.time() - t0, 1)})


def update_world_json(out, info):
    """world.json keeps the keys of earlier builds that this run did not remake."""
    path = os.path.join(out, "world.json")
    old = json.load(open(path)) if os.path.exists(path) else {}
    info = {**old, **info}
    with open(path, "w") as f:
        json.dump(info, f, indent=2)
    print(json.dumps(info, indent=2))


def get_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    p.add_argument("--quick", action="store_true", help="a few steps of everything (tests)")
    p.add_argument("--unet-steps", type=int, default=800)
    p.add_argument(
        "--data-only", action="store_true", help="only regenerate pickapic/ from the sd15/ in --out"
    )
    p.add_argument(
        "--sd3-steps", type=int, default=1600, help="MMDiT steps (1600: caption match ~0.73)"
    )
    p.add_argument(
        "--sd3-only", action="store_true", help="only rebuild sd3/ on the sd15/vae in --out"
    )
    p.add_argument(
        "--flux-steps",
        type=int,
        default=1100,
        help="FLUX transformer steps (1100: caption match ~0.7 without CFG)",
    )
    p.add_argument(
        "--flux-only", action="store_true", help="only rebuild flux/ on the sd3/vae in --out"
    )
    return p.parse_args(argv)


if __name__ == "__main__":
    main(get_args())
