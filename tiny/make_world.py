"""Build the embedded tiny world that every stage runs on without downloads.

    python tiny/make_world.py                 # full world into tiny/ (~10 min on 2 CPU cores)
    python tiny/make_world.py --quick --out /tmp/w   # seconds; untrained-ish, for the tests

Writes, all in Hugging Face formats, loaded by the stages through the same calls as the
real checkpoints:
    sd15/       StableDiffusionPipeline folder (CLIPTokenizer written here, a frozen random
                CLIPTextModel, AutoencoderKL and UNet2DConditionModel trained here, DDIMScheduler)
    sdxl/       StableDiffusionXLPipeline folder (two text encoders, text_time conditions)
    pickapic/   Pick-a-Pic v1 schema parquet dataset (train / validation_unique / test_unique),
                image pairs sampled from sd15/ and labelled by the judge in world.py
    world.json  what was built, the base model's caption-match rate, the times
Deterministic for a given machine and torch build (fixed seeds, fixed thread count).
"""

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tiny.world import CAPTIONS, RES, WORDS, human_labels, judge_scores, random_drawing, to_jpeg  # noqa: E402

MAX_LEN = 16  # tokenizer/text-encoder context (SD: 77); every tiny caption fits


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


def save_pipeline(pipe, path):
    shutil.rmtree(path, ignore_errors=True)
    pipe.save_pretrained(path)
    for name in (
        "unet",
        "vae",
    ):  # fp16 on disk; text encoders stay fp32 (transformers loads dtype as saved)
        getattr(pipe, name).half().save_pretrained(os.path.join(path, name))
        getattr(pipe, name).float()


@torch.no_grad()
def generate(pipe, captions, seed, cfg=5.0, bs=150):
    """PIL images, one per caption, DDIM 20 steps, the per-image seed = seed + index."""
    out = []
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
        ).images
    return out


def fp16_round_trip(*models):
    """The world is stored in fp16 (half the bytes; diffusers loads it back as fp32): round
    every weight now, so the numbers measured here are those of the saved models."""
    with torch.no_grad():
        for m in models:
            for p in m.parameters():
                p.copy_(p.half().float())


def caption_match(pipe, n=150, seed=10_000):
    caps = [CAPTIONS[i % len(CAPTIONS)] for i in range(n)]
    return judge_scores(generate(pipe, caps, seed), caps)["match"].mean()


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
    t0, info = time.time(), ({} if args.data_only else {"quick": q})
    out = args.out
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(0)
    drawn = [random_drawing(rng) for _ in range(512 if q else 20_000)]
    images, captions = [d[0] for d in drawn], [d[1] for d in drawn]

    if args.data_only:  # regenerate the preference data from the pipelines already in --out
        return make_data(
            StableDiffusionPipeline.from_pretrained(os.path.join(out, "sd15")), out, q, info, t0
        )
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
    path = os.path.join(out, "world.json")
    old = json.load(open(path)) if os.path.exists(path) else {}
    info = {
        **old,
        **info,
        ("seconds_data" if "vae_scaling_factor" not in info else "seconds"): round(
            time.time() - t0, 1
        ),
    }
    with open(path, "w") as f:
        json.dump(info, f, indent=2)
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    p.add_argument("--quick", action="store_true", help="a few steps of everything (tests)")
    p.add_argument("--unet-steps", type=int, default=800)
    p.add_argument(
        "--data-only", action="store_true", help="only regenerate pickapic/ from the sd15/ in --out"
    )
    main(p.parse_args())
