"""The Latent Reward Model (LRM): a diffusion model's own U-Net and text encoder(s) scoring *noisy
latents* against a prompt (SPEC.md section 1; arXiv 2502.01051). Training lives in lrm.py.
    lrm = LatentRewardModel.from_pretrained("runs/lrm-sd15", base="sd15")  # refuses another VAE; also
                                                    # reads the official release's folders (casiatao/LRM)
    s = lrm.score(latents, t, text=lrm.encode_text(prompts))  # latents x scaling_factor -> (B,)
Choices:
- The U-Net keeps its (frozen) up blocks so unet/ stays a stock diffusers folder; they never run.
  for_scoring() drops them from a frozen LRM (half of SDXL's U-Net: 1.32B parameters, 2.6 GB fp16).
- VFE's unconditional pass encodes "" on SDXL too (as the official LRM-XL), though SDXL's own CFG
  uses zeros.
"""
import json, os

import torch
import torch.nn.functional as F
import transformers
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel

ROOT = os.path.dirname(os.path.abspath(__file__))
MODELS = {"tiny": "tiny/sd15", "tiny-xl": "tiny/sdxl", "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
          "sdxl": "stabilityai/stable-diffusion-xl-base-1.0"}


# ----------------------------------------------------------------------------- math
def vfe(mid_cond, mid_uncond, g):
    """Visual Feature Enhancement: CFG on the pooled mid feature, V = V_u + g (V_c - V_u)."""
    return mid_uncond + g * (mid_cond - mid_uncond)

def lrm_score(v, t, logit_scale):
    """S(prompt, x_t, t) = exp(logit_scale) * cos(V, T), in fp32.  v, t: (B, D) -> (B,)"""
    return logit_scale.float().exp() * (F.normalize(v.float(), dim=-1) * F.normalize(t.float(), dim=-1)).sum(-1)

def feature_widths(unet_config):
    """Channels of the pooled features: the last output of each down stage, then the mid block."""
    ch = list(unet_config["block_out_channels"])
    return ch + ch[-1:]   # SD1.5 320+640+1280+1280 + mid 1280 = 4800; SDXL 320+640+1280 + 1280 = 3520


# ----------------------------------------------------------------------------- models
def resolve_model(name):
    """--model name, local folder or hub id -> what from_pretrained takes; says what it tried."""
    path = MODELS.get(name, name)
    local = os.path.join(ROOT, path) if path.startswith("tiny/") else path
    try:
        return local if os.path.isdir(local) else DiffusionPipeline.load_config(path) and path
    except Exception as e:
        raise ValueError(f"model {name!r}: no local folder {os.path.abspath(local)}, and hub id {path!r} failed "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:150]})") from None

def load_text_encoders(path, classes, fallback=None):
    """{"text_encoder": "CLIPTextModel", ...} -> encoders and their tokenizers from a folder or hub id;
    a subfolder that path lacks comes from fallback (the official LRM saves no tokenizers, and no
    text encoders when they were frozen)."""
    at = lambda sub: path if fallback is None or os.path.isdir(os.path.join(path, sub)) else fallback  # noqa: E731
    encs = [getattr(transformers, c).from_pretrained(at(n), subfolder=n) for n, c in classes.items()]
    toks = [n.replace("text_encoder", "tokenizer") for n in classes]
    return encs, [transformers.AutoTokenizer.from_pretrained(at(t), subfolder=t) for t in toks]

def base_config(base, unet_config, g=7.5, resolution=None):
    """lrm_config.json's fields that come from the base pipeline: text encoders, resolution, latent space."""
    path = resolve_model(base)
    index, vae = DiffusionPipeline.load_config(path), AutoencoderKL.load_config(path, subfolder="vae")
    classes = {n: index[n][1] for n in ("text_encoder", "text_encoder_2") if (index.get(n) or [None])[0]}
    return dict(base=MODELS.get(base, base), g=g, text_encoders=classes,
                resolution=resolution or unet_config["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1),
                latent_space=[vae["latent_channels"], vae["scaling_factor"], vae.get("shift_factor")])

def encode_prompt(text_encoders, tokenizers, prompts, resolution):
    """SD1.5: last hidden state, pooled EOS state. SDXL: concat of both penultimate states, pooled =
    text_encoder_2's projected text_embeds, added conditions with time_ids = (H, W, 0, 0, H, W)."""
    xl, states = len(text_encoders) > 1, []
    for enc, tok in zip(text_encoders, tokenizers):
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(enc.device)
        out = enc(ids, output_hidden_states=xl)
        states.append(out.hidden_states[-2] if xl else out.last_hidden_state)     # (B, L, D_i)
        pooled = getattr(out, "text_embeds", None) if xl else out.pooler_output   # (B, D_text), last encoder's
    added = None
    if xl:
        ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], device=pooled.device)
        added = dict(text_embeds=pooled, time_ids=ids.to(pooled.dtype).expand(len(prompts), 6))
    return {"encoder_hidden_states": torch.cat(states, -1), "added_cond_kwargs": added, "pooled": pooled}

def take_rows(tree, idx):
    """Rows idx of every tensor in a (nested) dict of batch tensors; None stays None."""
    if isinstance(tree, dict):
        return {k: take_rows(v, idx) for k, v in tree.items()}
    return None if tree is None else tree[idx.to(tree.device)]

def down_mid_features(unet, x, t, ctx, added):
    """Pooled features of a stock UNet2DConditionModel in its forward() order, stopping at the mid
    block: time (+ SDXL text_time) embedding, conv_in, down blocks, mid block. Up blocks never run."""
    emb = unet.time_embedding(unet.get_time_embed(sample=x, timestep=t))       # (B, 4C)
    aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=ctx, added_cond_kwargs=added)
    emb = emb + aug if aug is not None else emb
    emb = unet.time_embed_act(emb) if unet.time_embed_act is not None else emb
    ctx = unet.process_encoder_hidden_states(encoder_hidden_states=ctx, added_cond_kwargs=added)
    xattn = lambda block: dict(encoder_hidden_states=ctx) if getattr(block, "has_cross_attention", False) else {}
    h, feats = unet.conv_in(x), []
    for block in unet.down_blocks:
        h, res = block(hidden_states=h, temb=emb, **xattn(block))
        feats.append(res[len(block.resnets) - 1].mean((2, 3)))   # last output before the downsampler, (B, C_i)
    return feats + [unet.mid_block(h, emb, **xattn(unet.mid_block)).mean((2, 3))]   # + (B, C_mid)

class LatentRewardModel(torch.nn.Module):
    def __init__(self, unet, text_encoders, tokenizers, config):
        super().__init__()
        self.unet, self.text_encoders, self.tokenizers = unet, torch.nn.ModuleList(text_encoders), tokenizers
        xl, tc = len(text_encoders) > 1, text_encoders[-1].config
        dim = tc.projection_dim if xl else tc.hidden_size     # SDXL: 1280 text_embeds; SD1.5: 768 pooled EOS
        width = sum(feature_widths(unet.config))
        self.visual_projection = torch.nn.Linear(width, dim, bias=False)
        self.text_projection = None if xl else torch.nn.Linear(dim, dim, bias=False)
        for lin in filter(None, (self.visual_projection, self.text_projection)):
            torch.nn.init.normal_(lin.weight, std=0.02)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.6592))    # ln(1/0.07), as CLIP
        for m in filter(None, (unet.up_blocks, unet.conv_norm_out, unet.conv_out)):
            m.requires_grad_(False)                                      # never run: out of training
        self.config = {**config, "feature_width": width, "text_dim": dim}
        self.g, self.resolution, self.scoring_only = config["g"], config["resolution"], False

    def for_scoring(self):
        """Frozen and in eval mode, without the U-Net parts score() never runs (up blocks, output
        convs): the same scores in about half the memory, but no longer savable or trainable."""
        u, self.scoring_only = self.unet, True
        u.up_blocks, u.conv_norm_out, u.conv_act, u.conv_out = torch.nn.ModuleList(), None, None, None
        return self.requires_grad_(False).eval()

    @classmethod
    def from_base(cls, model_id_or_path, g=7.5, resolution=None, text_projection_init=None):
        path = resolve_model(model_id_or_path)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
        config = base_config(model_id_or_path, unet.config, g, resolution)
        lrm = cls(unet, *load_text_encoders(path, config["text_encoders"]), config)
        if text_projection_init and lrm.text_projection is not None:
            src = transformers.CLIPTextModelWithProjection.from_pretrained(text_projection_init)
            lrm.text_projection.weight.data.copy_(src.text_projection.weight)
        return lrm

    def save_pretrained(self, out_dir):
        """The official LRM layout (unet/, text_encoder*/, state_dict.pt), the tokenizers, and
        lrm_config.json written last: a folder with lrm_config.json is complete."""
        if self.scoring_only:
            raise ValueError("this LRM went through for_scoring() (no up blocks): save the full model instead")
        self.unet.save_pretrained(os.path.join(out_dir, "unet"))
        for name, enc, tok in zip(self.config["text_encoders"], self.text_encoders, self.tokenizers):
            enc.save_pretrained(os.path.join(out_dir, name))
            tok.save_pretrained(os.path.join(out_dir, name.replace("text_encoder", "tokenizer")))
        heads = {k: getattr(self, k).state_dict() for k in ("visual_projection", "text_projection") if getattr(self, k) is not None}
        torch.save({**heads, "logit_scale": self.logit_scale.detach().cpu()}, os.path.join(out_dir, "state_dict.pt"))
        with open(os.path.join(out_dir, "lrm_config.json"), "w") as f:
            json.dump({**self.config, "g": self.g}, f, indent=2)

    @classmethod
    def from_pretrained(cls, lrm_dir, base=None, force=False):
        """An LRM folder of lrm.py, or of the official release (unet/, text_encoder*/ if trained,
        state_dict.pt; no config or tokenizers: those come from `base`, g = 7.5 as in its code).
        With `base`, refuse an LRM of another latent space unless force."""
        official = not os.path.exists(os.path.join(lrm_dir, "lrm_config.json"))
        if official and (base is None or not os.path.exists(os.path.join(lrm_dir, "state_dict.pt"))):
            raise ValueError(f"{lrm_dir}: not an LRM folder (no lrm_config.json; the official layout, unet/ and "
                             "state_dict.pt, also needs base=)")
        config = base_config(base, UNet2DConditionModel.load_config(lrm_dir, subfolder="unet")) if official else \
            json.load(open(os.path.join(lrm_dir, "lrm_config.json")))
        if base is not None:   # (an official LRM's latent space is taken to be its base's: nothing to check)
            vae = AutoencoderKL.load_config(resolve_model(base), subfolder="vae")
            theirs = [vae["latent_channels"], vae["scaling_factor"], vae.get("shift_factor")]
            if theirs != config["latent_space"] and not force:
                raise ValueError(f"LRM {lrm_dir} was trained in the latent space of {config['base']} (latent channels, "
                                 f"scaling, shift = {config['latent_space']}) but base {base!r} has {theirs}: an LRM does"
                                 " not transfer across VAEs (the paper's SD1.5 LRM fails on SDXL). force=True loads it anyway.")
        unet = UNet2DConditionModel.from_pretrained(lrm_dir, subfolder="unet")
        fallback = resolve_model(config["base"]) if official else None
        lrm = cls(unet, *load_text_encoders(lrm_dir, config["text_encoders"], fallback), config)
        heads = torch.load(os.path.join(lrm_dir, "state_dict.pt"), map_location="cpu", weights_only=True)
        want = {k: getattr(lrm, k).weight.shape for k in ("visual_projection", "text_projection") if getattr(lrm, k) is not None}
        if want != {k: v["weight"].shape for k, v in heads.items() if k != "logit_scale"}:
            raise ValueError(f"{lrm_dir}: its state_dict.pt heads do not fit an LRM over {config['base']} (another model family?)")
        for k in want:
            getattr(lrm, k).load_state_dict(heads[k])
        lrm.logit_scale.data.fill_(float(heads["logit_scale"]))
        return lrm

    def encode_text(self, prompts):
        """Everything score() needs about the prompts (and "" for VFE): computed once, cacheable. Each
        distinct prompt is encoded once (callers repeat them: 2 images a pair, K children a parent)."""
        enc = lambda p: encode_prompt(list(self.text_encoders), self.tokenizers, p, self.resolution)  # noqa: E731
        pos = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
        inv = torch.tensor([pos[p] for p in prompts])                          # (B,) row of each prompt
        return {"cond": take_rows(enc(list(pos)), inv), "uncond": enc([""]) if self.g != 1 else None}

    def score(self, latents, timesteps, prompts=None, text=None):
        """latents (B, C, h, w) already times the VAE scaling factor, timesteps int or (B,) -> (B,)."""
        text = self.encode_text(prompts) if text is None else text
        b, (c, u) = latents.shape[0], (text["cond"], text["uncond"])
        t = torch.as_tensor(timesteps, device=latents.device).long().expand(b)                  # (B,)
        x, ctx, added = latents.to(self.unet.dtype), c["encoder_hidden_states"], c["added_cond_kwargs"]
        if u is not None:   # VFE: one batched pass, the B conditional rows first, then B with ""
            x, t, ctx = torch.cat([x, x]), torch.cat([t, t]), torch.cat([ctx, u["encoder_hidden_states"].expand(b, -1, -1)])
            if added is not None:
                added = {k: torch.cat([v, u["added_cond_kwargs"][k].expand(b, -1)]) for k, v in added.items()}
        feats = down_mid_features(self.unet, x, t, ctx, added)                                 # [(2B, C_i)]
        if u is not None:   # down-stage features from the conditional pass only, VFE on the mid one
            feats = [f[:b] for f in feats[:-1]] + [vfe(feats[-1][:b], feats[-1][b:], self.g)]
        v = self.visual_projection(torch.cat(feats, -1).to(self.visual_projection.weight.dtype))  # (B, D)
        tp = self.text_projection
        tf = c["pooled"] if tp is None else tp(c["pooled"].to(tp.weight.dtype))                 # (B, D)
        return lrm_score(v, tf, self.logit_scale)
