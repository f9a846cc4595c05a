"""All tests: CPU only, no network, on the embedded tiny world (python -m pytest -q test_all.py)."""
import json
import math
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)
os.chdir(ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # the tiny networks' ops are too small to split across threads

import bench  # noqa: E402
import eval as ev  # noqa: E402
import lpo  # noqa: E402
import lrm as L  # noqa: E402
import lrm_model as M  # noqa: E402
import mpcf  # noqa: E402
import sample  # noqa: E402
from mpcf import STRATEGIES, get_config, main, mpcf_keep, pair_gaps  # noqa: E402
from tiny.world import (CAPTIONS, COLORS, SHAPES, draw, from_jpeg, human_labels,  # noqa: E402
                        judge_scores, to_jpeg)


# ============================================================================ tiny world
def test_tiny_world_loads_through_hub_code_paths():
    from datasets import load_dataset
    from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
    sd = DiffusionPipeline.from_pretrained("tiny/sd15")
    xl = DiffusionPipeline.from_pretrained("tiny/sdxl")
    assert isinstance(sd, StableDiffusionPipeline) and isinstance(xl, StableDiffusionXLPipeline)
    assert sd.unet.dtype == torch.float32 and xl.unet.config.addition_embed_type == "text_time"
    assert sd.vae.config.scaling_factor != 0.18215  # measured for this VAE
    # each caption word is one token of the world's own CLIP tokenizer
    ids = sd.tokenizer("a purple triangle").input_ids
    assert ids[0] == sd.tokenizer.bos_token_id and ids[-1] == sd.tokenizer.eos_token_id and len(ids) == 5
    ds = load_dataset("tiny/pickapic")
    cols = {"caption", "jpg_0", "jpg_1", "label_0", "label_1", "num_example_per_prompt", "has_label", "are_different"}
    assert set(ds) == {"train", "validation_unique", "test_unique"}
    assert cols <= set(ds["train"].column_names)
    row = ds["train"][0]
    assert from_jpeg(row["jpg_0"]).size == (32, 32)
    lab = np.array(ds["train"]["label_0"]) + np.array(ds["train"]["label_1"])
    has = np.array(ds["train"]["has_label"])
    assert np.allclose(lab[has], 1.0)  # labelled rows are distributions over the pair
    with open("tiny/world.json") as f:
        info = json.load(f)
    print("\nworld:", info)


def test_tiny_pipeline_generates_pictures_of_shapes():
    from diffusers import DiffusionPipeline
    sd = DiffusionPipeline.from_pretrained("tiny/sd15")
    sd.set_progress_bar_config(disable=True)
    g = [torch.Generator().manual_seed(i) for i in range(30)]
    caps = [CAPTIONS[i % 15] for i in range(30)]
    images = sd(caps, num_inference_steps=20, guidance_scale=5.0, generator=g).images
    assert images[0].size == (32, 32)
    match = judge_scores(images, caps)["match"].mean()
    with open("tiny/world.json") as f:
        info = json.load(f)
    if not info["quick"]:  # the shipped base: often, not always, right (room for LPO)
        assert 0.4 <= match <= 0.95, match


def test_judge_reads_shapes_and_prefers_alignment_then_looks():
    for c in COLORS:
        for s in SHAPES:
            img = draw(c, s, 16, 16, 16)
            scores = judge_scores([img] * 2, [f"a {c} {s}", "a green square" if c != "green" else "a red circle"])
            assert scores["match"].tolist() == [1.0, 0.0], (c, s)
            assert scores["vqa"][0] > 0.8 > 0.1 > scores["vqa"][1]
            assert scores["clip"][0] > scores["clip"][1] and scores["human"][0] > scores["human"][1]
    # looks: a mid-sized centred shape beats a tiny one in a corner, both matching
    good, poor = draw("red", "circle", 17, 16, 16), draw("red", "circle", 8, 6, 6)
    s = judge_scores([good, poor], ["a red circle"] * 2)
    assert s["aesthetic"][0] > s["aesthetic"][1] + 1.0 and s["human"][0] > s["human"][1]
    # alignment beats looks: a poor right picture beats a good wrong one
    wrong = draw("blue", "circle", 17, 16, 16)
    s = judge_scores([poor, wrong], ["a red circle"] * 2)
    assert s["human"][0] > s["human"][1]
    # an empty picture matches nothing; JPEG round trip keeps the reading
    blank = draw("red", "circle", 0, -10, -10)
    assert judge_scores([blank], ["a red circle"])["match"][0] == 0.0
    assert judge_scores([from_jpeg(to_jpeg(good))], ["a red circle"])["match"][0] == 1.0


def test_human_labels_ties_and_noise_rate():
    rng = np.random.default_rng(0)
    h0 = rng.normal(size=20_000)
    h1 = h0 + rng.choice([-1.0, 1.0, 0.01], size=h0.shape)
    l0, l1 = human_labels(h0, h1, rng)
    tie = np.abs(h0 - h1) < 0.05
    assert np.all(l0[tie] == 0.5) and np.allclose(l0 + l1, 1.0)
    agree = (l0[~tie] == 1.0) == (h0[~tie] > h1[~tie])
    assert abs((1 - agree.mean()) - 0.10) < 0.01  # 10% of decisive labels flipped


def test_make_world_script_runs_and_is_deterministic(tmp_path):
    from tiny import make_world
    rng = np.random.default_rng(0)
    imgs = [make_world.random_drawing(rng)[0] for _ in range(16)]
    a, _ = make_world.train_vae(imgs, steps=2, bs=4, seed=1)
    b, _ = make_world.train_vae(imgs, steps=2, bs=4, seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    out = tmp_path / "world"
    r = subprocess.run([sys.executable, "tiny/make_world.py", "--quick", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    from datasets import load_dataset
    from diffusers import DiffusionPipeline
    assert len(load_dataset(str(out / "pickapic"))["train"]) == 48
    DiffusionPipeline.from_pretrained(str(out / "sdxl"))


# ============================================================================ lrm.py: the Latent Reward Model
PROMPTS = ["a red circle", "a blue square", "a green triangle"]




def _run_args(out, *extra):
    return ["--model", "tiny", "--out", str(out), "--workers", "0", *map(str, extra)]


# ----------------------------------------------------------------------------- architecture
@pytest.mark.parametrize("model", ["tiny", "tiny-xl"])
def test_score_runs_down_and_mid_only_and_matches_stock_unet(model):
    torch.manual_seed(0)
    lrm = M.LatentRewardModel.from_base(model)
    unet = lrm.unet
    calls = []
    hooks = [m.register_forward_hook(lambda *a, n=n: calls.append(n))
             for n, m in [("up", b) for b in unet.up_blocks] + [("conv_out", unet.conv_out)]]
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([1, 501, 951])
    s = lrm.score(x, t, PROMPTS)
    assert s.shape == (3,) and torch.isfinite(s).all()
    assert calls == [], "up blocks / conv_out must never run in score()"
    for h in hooks:
        h.remove()
    # width: sum of the pooled channels, derived from the config
    widths = [c for c in unet.config.block_out_channels] + [unet.config.block_out_channels[-1]]
    assert lrm.visual_projection.in_features == sum(widths) == sum(M.feature_widths(unet.config))
    # oracle: the stock UNet2DConditionModel.forward, observed through hooks on its own blocks
    text = M.encode_prompt(list(lrm.text_encoders), lrm.tokenizers, PROMPTS, lrm.resolution)
    seen = []
    hooks = [b.register_forward_hook(lambda m, i, o: seen.append(o[1][len(m.resnets) - 1])) for b in unet.down_blocks]
    hooks.append(unet.mid_block.register_forward_hook(lambda m, i, o: seen.append(o)))
    with torch.no_grad():
        unet(x, t, text["encoder_hidden_states"], added_cond_kwargs=text["added_cond_kwargs"])
        ours = M.down_mid_features(unet, x, t, text["encoder_hidden_states"], text["added_cond_kwargs"])
    for h in hooks:
        h.remove()
    assert [f.shape[1] for f in ours] == widths
    for a, b in zip(ours, seen):
        torch.testing.assert_close(a, b.mean((2, 3)), rtol=1e-5, atol=1e-6)


SD15_UNET = dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8)
SDXL_UNET = dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)


@pytest.mark.parametrize("unet_kw,latent,width,proj", [(SD15_UNET, 64, 4800, 768), (SDXL_UNET, 128, 3520, 1280)])
def test_real_sd15_and_sdxl_widths_on_meta_device(unet_kw, latent, width, proj):
    xl = unet_kw is SDXL_UNET
    with torch.device("meta"):   # real configs, no weights, no memory
        unet = UNet2DConditionModel(**unet_kw)
        encs = [CLIPTextModel(CLIPTextConfig(hidden_size=768, num_hidden_layers=1, num_attention_heads=12))]
        if xl:
            encs.append(CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, projection_dim=1280,
                                                                   num_hidden_layers=1, num_attention_heads=20)))
        lrm = M.LatentRewardModel(unet, encs, [None] * len(encs), dict(base="x", g=7.5, resolution=8 * latent))
        x, ctx = torch.randn(1, 4, latent, latent), torch.randn(1, 77, 2048 if xl else 768)
        added = dict(text_embeds=torch.randn(1, 1280), time_ids=torch.randn(1, 6)) if xl else None
        feats = M.down_mid_features(unet, x, torch.tensor([1]), ctx, added)
    assert sum(f.shape[1] for f in feats) == width == lrm.config["feature_width"]
    assert tuple(lrm.visual_projection.weight.shape) == (proj, width)
    assert (lrm.text_projection is None) == xl
    # for_scoring() keeps what down_mid_features runs and frees the rest: over half of each real U-Net
    n = lambda: sum(p.numel() for p in unet.parameters())   # noqa: E731
    before = n()
    lrm.for_scoring()
    with torch.device("meta"):
        again = M.down_mid_features(unet, x, torch.tensor([1]), ctx, added)
    assert [f.shape for f in again] == [f.shape for f in feats] and n() < 0.52 * before


@pytest.mark.parametrize("model", ["tiny", "tiny-xl"])
def test_encode_text_encodes_each_distinct_prompt_once(model):
    lrm = M.LatentRewardModel.from_pretrained({"tiny": "tiny/lrm", "tiny-xl": "tiny/lrm-xl"}[model]).eval()
    prompts = ["a red circle", "a blue square", "a red circle", "a red circle", "a green triangle", "a blue square"]
    seen = []
    hooks = [e.register_forward_hook(lambda m, i, o: seen.append(len(i[0]))) for e in lrm.text_encoders]
    with torch.no_grad():
        got = lrm.encode_text(prompts)
        for h in hooks:
            h.remove()
        want = M.encode_prompt(list(lrm.text_encoders), lrm.tokenizers, prompts, lrm.resolution)   # one row each
    assert seen == [3] * len(lrm.text_encoders) + [1] * len(lrm.text_encoders)   # 3 distinct, then "" for VFE
    torch.testing.assert_close(got["cond"], want)


@pytest.mark.parametrize("model", ["tiny", "tiny-xl"])
def test_for_scoring_same_scores_less_memory_not_savable(model, tmp_path):
    lrm = M.LatentRewardModel.from_pretrained({"tiny": "tiny/lrm", "tiny-xl": "tiny/lrm-xl"}[model]).eval()
    x, t = torch.randn(4, 4, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 251, 751, 951])
    up = sum(p.numel() for m in (lrm.unet.up_blocks, lrm.unet.conv_norm_out, lrm.unet.conv_out) for p in m.parameters())
    total = sum(p.numel() for p in lrm.parameters())
    with torch.no_grad():
        want = lrm.score(x, t, PROMPTS + PROMPTS[:1])
        got = lrm.for_scoring().score(x, t, PROMPTS + PROMPTS[:1])
    torch.testing.assert_close(got, want)   # the same ops (fp32 reassociation aside)
    assert sum(p.numel() for p in lrm.parameters()) == total - up and up > 0
    assert not any(p.requires_grad for p in lrm.parameters()) and not lrm.training
    with pytest.raises(ValueError, match="for_scoring"):
        lrm.save_pretrained(str(tmp_path))
    assert not os.listdir(tmp_path)   # refused before writing anything


# ----------------------------------------------------------------------------- math against hand values
def test_vfe_hand_values():
    c, u = torch.tensor([2.0, -1.0]), torch.tensor([1.0, 1.0])
    assert torch.allclose(M.vfe(c, u, 7.5), torch.tensor([8.5, -14.0]))
    assert torch.allclose(M.vfe(c, u, 1.0), c)          # g = 1 disables VFE
    assert torch.allclose(M.vfe(c, u, 0.0), u)


def test_pair_loss_hand_values_ties_and_weights():
    s0, s1 = torch.tensor([2.0, 0.0, 1.0, 1.0]), torch.tensor([0.0, 0.0, 3.0, 0.0])
    l0, l1 = torch.tensor([1.0, 0.5, 0.0, 0.5]), torch.tensor([0.0, 0.5, 1.0, 0.5])
    w = torch.tensor([1.0, 0.5, 0.25, 0.25])
    # per-pair NLL by hand: -log sigmoid(2); tie at equal scores log 2; -log sigmoid(2); tie at gap 1
    nll = [0.1269280110, 0.6931471806, 0.1269280110, 0.5 * (0.3132616875 + 1.3132616875)]
    expect = sum(wi * n for wi, n in zip([1.0, 0.5, 0.25, 0.25], nll)) / 2.0
    got = L.pair_loss(s0, s1, l0, l1, w)
    assert math.isclose(got.item(), expect, rel_tol=1e-6)
    assert math.isclose(L.pair_loss(s0, s1, l0, l1, 10 * w).item(), expect, rel_tol=1e-6)  # normalised
    # unequal weights matter: uniform weights give the plain mean instead
    assert math.isclose(L.pair_loss(s0, s1, l0, l1, torch.ones(4)).item(), sum(nll) / 4, rel_tol=1e-6)
    # gradient pushes the winner up: d loss / d s0[0] < 0
    s0g = s0.clone().requires_grad_()
    L.pair_loss(s0g, s1, l0, l1, w).backward()
    assert s0g.grad[0] < 0 and s0g.grad[1] == 0


# ----------------------------------------------------------------------------- save / load / bad input
def test_save_load_round_trip_and_latent_space_refusal(tmp_path):
    for model in ("tiny", "tiny-xl"):
        torch.manual_seed(1)
        lrm = M.LatentRewardModel.from_base(model)
        with torch.no_grad():
            lrm.logit_scale.fill_(3.0)
            for p in lrm.unet.down_blocks.parameters():
                p.add_(0.01 * torch.randn_like(p))
        x = torch.randn(3, 4, 8, 8)
        lrm.save_pretrained(tmp_path / model)
        back = M.LatentRewardModel.from_pretrained(str(tmp_path / model), base=model)
        with torch.no_grad():
            torch.testing.assert_close(back.score(x, 251, PROMPTS), lrm.score(x, 251, PROMPTS))
        assert back.config["base"] == M.MODELS[model] and back.g == 7.5
    # a base with another latent space (here: another VAE scaling factor) is refused unless forced
    other = tmp_path / "other_base"
    shutil.copytree(os.path.join(ROOT, "tiny/sd15"), other)
    vae_cfg = json.load(open(other / "vae/config.json"))
    vae_cfg["scaling_factor"] = 0.13025
    json.dump(vae_cfg, open(other / "vae/config.json", "w"))
    with pytest.raises(ValueError, match="latent space"):
        M.LatentRewardModel.from_pretrained(str(tmp_path / "tiny"), base=str(other))
    assert M.LatentRewardModel.from_pretrained(str(tmp_path / "tiny"), base=str(other), force=True) is not None


@pytest.mark.parametrize("model", ["tiny", "tiny-xl"])
def test_official_release_layout_loads_with_its_base(model, tmp_path):
    """The official LRM folder (Kwai-Kolors/LPO's save(): unet/, text_encoder*/ only when trained,
    state_dict.pt = the heads' state dicts + logit_scale as a tensor; no config, no tokenizers) scores
    like the same weights in our layout; a text encoder it lacks (frozen in training) is the base's."""
    src = {"tiny": "tiny/lrm", "tiny-xl": "tiny/lrm-xl"}[model]
    ours, off = M.LatentRewardModel.from_pretrained(src).eval(), tmp_path / "official"
    encs = list(ours.config["text_encoders"])
    for sub in ["unet"] + encs:
        shutil.copytree(os.path.join(src, sub), off / sub)
    heads = torch.load(os.path.join(src, "state_dict.pt"), weights_only=True)
    torch.save({**heads, "logit_scale": torch.tensor(heads["logit_scale"])}, off / "state_dict.pt")
    with pytest.raises(ValueError, match="needs base="):
        M.LatentRewardModel.from_pretrained(str(off))
    with pytest.raises(ValueError, match="heads do not fit"):   # an SD1.5 LRM over SDXL, or the reverse
        M.LatentRewardModel.from_pretrained(str(off), base={"tiny": "tiny-xl", "tiny-xl": "tiny"}[model])
    x, t = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 501, 951])
    got = M.LatentRewardModel.from_pretrained(str(off), base=model).eval()
    assert got.config["base"] == M.MODELS[model] and got.g == 7.5 and got.resolution == ours.resolution == 32
    with torch.no_grad():
        torch.testing.assert_close(got.score(x, t, PROMPTS), ours.score(x, t, PROMPTS))
    shutil.rmtree(off / encs[-1])                                   # as if that encoder had been frozen
    got = M.LatentRewardModel.from_pretrained(str(off), base=model)
    base = getattr(__import__("transformers"), ours.config["text_encoders"][encs[-1]]).from_pretrained(
        M.resolve_model(model), subfolder=encs[-1])
    for a, b, c in zip(got.text_encoders[-1].parameters(), base.parameters(), ours.text_encoders[-1].parameters()):
        assert torch.equal(a, b)
    assert not all(torch.equal(b, c) for b, c in zip(base.parameters(), ours.text_encoders[-1].parameters()))


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="no local folder .*nowhere"):
        M.resolve_model("/nowhere/model")
    import datasets
    ds = datasets.load_dataset(os.path.join(ROOT, "tiny/pickapic"), split="train").select(range(16))
    os.makedirs(tmp_path / "nolabel"), os.makedirs(tmp_path / "broken")
    ds.remove_columns("label_1").to_parquet(str(tmp_path / "nolabel" / "train-0.parquet"))
    with pytest.raises(ValueError, match="label_1.*nolabel|nolabel.*label_1"):
        L.load_pairs(str(tmp_path / "nolabel"), "train")
    # --keep: mpcf.py's row indices (JSON list or a table with an `index` column), then drop
    # unlabelled pairs and identical images
    flags = ds.map(lambda ex, i: {"has_label": i != 3, "are_different": i != 5}, with_indices=True)
    os.makedirs(tmp_path / "flags")
    flags.to_parquet(str(tmp_path / "flags" / "train-0.parquet"))
    json.dump([1, 3, 5, 7, 9], open(tmp_path / "keep.json", "w"))
    open(tmp_path / "keep.csv", "w").write("index,gap\n9,0.1\n7,0.2\n1,0.3\n")
    kept = L.load_pairs(str(tmp_path / "flags"), "train", str(tmp_path / "keep.json"))
    assert kept["caption"] == [flags[i]["caption"] for i in (1, 7, 9)]
    assert L.load_pairs(str(tmp_path / "flags"), "train", str(tmp_path / "keep.csv"))["jpg_0"] == kept["jpg_0"]
    assert len(L.load_pairs(str(tmp_path / "flags"), "train")) == 14
    # an undecodable image: the pair is kept with weight 0 and flagged
    broken = ds.map(lambda ex, i: {"jpg_0": b"not a jpeg" if i < 4 else ex["jpg_0"],
                                   "has_label": True, "are_different": True}, with_indices=True)
    item = L.Pairs(broken, 32, (4, 8, 8), [1, 51], 0)[(0, 0)]
    assert item["bad"] and item["weight"] == 0 and item["px"].shape == (2, 3, 32, 32)
    good = L.Pairs(broken, 32, (4, 8, 8), [1, 51], 0)[(0, 5)]
    assert not good["bad"] and good["weight"] > 0
    # ... and casts no vote in pair_accuracy: flipping the bad pairs' labels changes nothing
    lrm = M.LatentRewardModel.from_pretrained("tiny/lrm")
    flip = lambda w: broken.map(lambda ex, i: {"label_0": float(w) if i < 4 else ex["label_0"],   # noqa: E731
                                               "label_1": float(1 - w) if i < 4 else ex["label_1"]}, with_indices=True)
    assert L.pair_accuracy(lrm, flip(1), [1, 501]) == L.pair_accuracy(lrm, flip(0), [1, 501])
    # 4 of 16 pairs bad (> 1%): the run stops with a clear message
    for split in ("train", "validation_unique", "test_unique"):
        broken.to_parquet(str(tmp_path / "broken" / f"{split}-0.parquet"))
    data = str(tmp_path / "broken")
    with open(tmp_path / "broken" / "README.md", "w") as f:
        f.write("---\nconfigs:\n- config_name: default\n  data_files:\n" + "".join(
            f"  - split: {s}\n    path: {s}-*.parquet\n" for s in ("train", "validation_unique", "test_unique")) + "---\n")
    with pytest.raises(SystemExit, match="undecodable"):
        L.main(L.get_config(_run_args(tmp_path / "run", "--data", data, "--steps", 4, "--batch_size", 8)))


# ----------------------------------------------------------------------------- training
def _state(out):
    return torch.load(os.path.join(out, "train_state.pt"), map_location="cpu", weights_only=False)


def test_resume_equals_uninterrupted(tmp_path, monkeypatch):
    args = ("--steps", 4, "--batch_size", 8, "--save_every", 2, "--eval_every", 4, "--eval_max_pairs", 2,
            "--eval_timesteps", "1,951")
    L.main(L.get_config(_run_args(tmp_path / "a", *args)))
    real_log = L.log_jsonl

    def crash_at_step_3(path, rec):   # dies after step 3's update, before its (step 4) checkpoint
        real_log(path, rec)
        if rec.get("step") == 3 and "loss" in rec:
            raise KeyboardInterrupt
    monkeypatch.setattr(L, "log_jsonl", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        L.main(L.get_config(_run_args(tmp_path / "b", *args)))
    assert _state(tmp_path / "b")["step"] == 2
    monkeypatch.setattr(L, "log_jsonl", real_log)
    L.main(L.get_config(_run_args(tmp_path / "b", *args, "--resume", "true")))
    a, b = _state(tmp_path / "a"), _state(tmp_path / "b")
    assert a["step"] == b["step"] == 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    fresh = M.LatentRewardModel.from_base("tiny").state_dict()
    assert not torch.equal(a["model"]["visual_projection.weight"], fresh["visual_projection.weight"])  # it trained


def test_two_processes_equal_one_process_with_double_batch(tmp_path):
    common = ("--steps", 3, "--batch_size", 8, "--eval_every", 100, "--save_every", 100, "--eval_max_pairs", 2,
              "--eval_timesteps", 1, "--warmup", 1, "--lr", 1e-4)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                    "lrm.py", *_run_args(tmp_path / "two", *common)], cwd=ROOT, env=env, check=True, capture_output=True)
    L.main(L.get_config(_run_args(tmp_path / "one", *common)))   # in this process (one thread)
    two, one = _state(tmp_path / "two"), _state(tmp_path / "one")
    init = M.LatentRewardModel.from_base("tiny").state_dict()
    # Adam turns float noise in near-zero gradients (e.g. CLIP's k_proj bias) into updates up to ~lr,
    # so compare each tensor within a fraction of lr and the total difference against the total update
    diff = sum((two["model"][k] - v).abs().sum().item() for k, v in one["model"].items())
    moved = sum((v - init[k]).abs().sum().item() for k, v in one["model"].items())
    for k, v in one["model"].items():
        torch.testing.assert_close(two["model"][k], v, rtol=0, atol=3e-5, msg=k)
    assert moved > 1.0 and diff < 1e-3 * moved, (diff, moved)
    logs = [[json.loads(line) for line in open(tmp_path / d / "metrics.jsonl") if '"loss"' in line] for d in ("two", "one")]
    for r2, r1 in zip(*logs):   # global loss and pre-clip gradient norm: catches a gradient scaled by world size
        assert math.isclose(r2["loss"], r1["loss"], rel_tol=1e-5) and math.isclose(r2["grad_norm"], r1["grad_norm"], rel_tol=1e-4)


def test_noise_awareness_in_the_tiny_world(tmp_path):
    """An LRM trained on the tiny pairs beats chance clearly at t=1 and still at mid noise; the
    untrained LRM (the control) does not. (TINY_WORLD=DIR runs it on another built world.)"""
    world = os.environ.get("TINY_WORLD", os.path.join(ROOT, "tiny"))
    cfg = L.get_config(_run_args(tmp_path / "lrm", "--base", f"{world}/sd15", "--data", f"{world}/pickapic",
                                 "--batch_size", 16, "--steps", 120, "--warmup", 10, "--eval_every", 1000,
                                 "--eval_timesteps", "1,251,501,751,951"))
    L.transformers.utils.logging.disable_progress_bar()
    untrained = M.LatentRewardModel.from_base(cfg.base)
    ts = [int(t) for t in cfg.eval_timesteps.split(",")]
    pairs = [L.load_pairs(cfg.data, s) for s in ("validation_unique", "test_unique")]
    n = [sum(a != b for a, b in zip(p["label_0"], p["label_1"])) for p in pairs]
    mean = lambda table: {t: sum(n_i * table[i][t] for i, n_i in enumerate(n)) / sum(n) for t in ts}
    control = mean([L.pair_accuracy(untrained, p, ts[::2]) | {t: 0.0 for t in ts[1::2]} for p in pairs])
    table = L.main(cfg)
    acc = mean([table["validation_unique"], table["test_unique"]])
    print("\n t   | trained | untrained\n" + "\n".join(f"{t:4d} | {acc[t]:.3f}   | {control[t]:.3f}" for t in ts[::2]))
    assert acc[1] > 0.63 and acc[1] > control[1] + 0.08     # clearly above chance (~300 decisive pairs)
    assert acc[501] > 0.58 and acc[951] < acc[1]             # still above chance at mid noise, fading by t=951


# ============================================================================ mpcf.py: Multi-Preference Consistent Filtering
E = 1e-9
# (G_A, G_C, G_V, is_tie) -> kept under strategy 1, 2, 3; every bound hit exactly and nudged inside
RULE_TABLE = [
    ((0.0, 0.1, 0.1, False), (False, True, True)),
    ((E, 0.1, 0.1, False), (True, True, True)),
    ((-0.5, 0.1, 0.1, False), (False, False, True)),
    ((-0.5 + E, 0.1, 0.1, False), (False, True, True)),
    ((-1.0, 0.1, 0.1, False), (False, False, False)),
    ((-1.0 + E, 0.1, 0.1, False), (False, False, True)),
    ((1.0, 0.0, 0.1, False), (False, False, False)),     # CLIP gap must be > 0
    ((1.0, 0.1, 0.0, False), (False, False, False)),     # VQA gap must be > 0
    ((1.0, E, E, False), (True, True, True)),
    ((1.0, -E, 0.1, False), (False, False, False)),
    ((math.nan, 0.1, 0.1, False), (False, False, False)),
    ((0.2, 0.0, 0.0, True), (False, False, False)),      # ties: |G_A| < 0.2, |G_C| < 0.03, |G_V| < 0.07
    ((-0.2, 0.0, 0.0, True), (False, False, False)),
    ((0.2 - E, 0.03 - E, 0.07 - E, True), (True, True, True)),
    ((-0.2 + E, -0.03 + E, -0.07 + E, True), (True, True, True)),
    ((0.0, 0.03, 0.0, True), (False, False, False)),
    ((0.0, -0.03, 0.0, True), (False, False, False)),
    ((0.0, 0.0, 0.07, True), (False, False, False)),
    ((0.0, 0.0, -0.07, True), (False, False, False)),
    ((5.0, 0.1, 0.1, True), (False, False, False)),      # a clear winner is no tie
    ((0.0, 0.0, 0.0, True), (True, True, True)),
    ((0.0, math.nan, 0.0, True), (False, False, False)),
]


def test_rule_boundaries_strict_both_ways():
    assert STRATEGIES[2] == (-0.5, 0.0, 0.0, 0.2, 0.03, 0.07)  # SPEC section 2, strategy 2
    assert STRATEGIES[1][0] == 0.0 and STRATEGIES[3][0] == -1.0
    ga, gc, gv, tie = (torch.tensor([r[0][k] for r in RULE_TABLE], dtype=torch.float64) for k in range(4))
    for s in (1, 2, 3):
        want = [r[1][s - 1] for r in RULE_TABLE]
        assert mpcf_keep(ga, gc, gv, tie.bool(), strategy=s).tolist() == want, s
    # numpy in, custom bounds: loosen everything
    got = mpcf_keep(np.array([-1.5, 0.5]), np.array([-0.5, 0.5]), np.array([-0.5, 0.5]), np.array([False, True]),
                    bounds=(-2, -1, -1, 1, 1, 1))
    assert got.tolist() == [True, True]
    # gaps: winner minus loser; ties image 0 minus image 1
    g = pair_gaps(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 1.0, 5.0]),
                  torch.tensor([1.0, 0.0, 0.5]), torch.tensor([0.0, 1.0, 0.5]))
    assert g.tolist() == [-2.0, -1.0, -2.0]


def hand_dataset(path, n_bad=0):
    """10 Pick-a-Pic rows of drawn pictures; row 7 unlabelled, row 8 two identical images."""
    rows = []
    for i in range(10):
        a, b = draw("red", "circle", 17, 16, 16), draw("blue", "square", 10 + i, 12, 14)
        rows.append(dict(caption="a red circle", jpg_0=to_jpeg(a), jpg_1=to_jpeg(b if i != 8 else a),
                         label_0=[1.0, 0.0, 0.5][i % 3], label_1=[0.0, 1.0, 0.5][i % 3],
                         num_example_per_prompt=10, has_label=i != 7, are_different=i != 8))
    rows[7].update(label_0=0.0, label_1=0.0)
    for i in range(n_bad):
        rows[i]["jpg_1"] = b"not a jpeg"
    pd.DataFrame(rows).to_parquet(path)
    return rows


def test_kept_counts_on_hand_made_table(tmp_path, capsys):
    data = str(tmp_path / "pairs.parquet")
    hand_dataset(data)
    # precomputed gaps, row-aligned, no index column; row 9 unscored (NaN)
    gaps = pd.DataFrame({"aesthetic_gap": [0.1, -0.6, 0.1, -0.4, 1.0, 0.19, -0.9, 1.0, 0.0, math.nan],
                         "clip_gap": [0.01, 0.1, 0.02, 0.1, 0.1, -0.02, 0.1, 0.1, 0.0, 0.0],
                         "vqa_gap": [0.2, 0.2, 0.06, 0.1, -0.1, 0.0, 0.1, 0.1, 0.0, 0.0]})
    # rows: 0 win kept; 1 win dropped (G_A -0.6, kept by strategy 3); 2 tie kept; 3 win kept;
    # 4 win dropped (G_V < 0); 5 tie kept; 6 win dropped (G_A -0.9, kept by 3); 7 no label;
    # 8 identical; 9 unscored
    gaps.to_csv(tmp_path / "gaps.csv", index=False)
    out = str(tmp_path / "out")
    args = ["filter", "--data", data, "--gaps", str(tmp_path / "gaps.csv"), "--out", out]
    counts = main(get_config(args + ["--save-dataset", str(tmp_path / "kept")]))
    assert json.load(open(os.path.join(out, "keep.json"))) == [0, 2, 3, 5]
    assert counts == dict(win_lose=6, win_lose_kept=2, ties=2, ties_kept=2, no_label=1, identical=1, unscored=1)
    assert "kept 2 / 6 win-lose pairs, 2 / 2 ties" in capsys.readouterr().out
    from datasets import load_from_disk
    assert load_from_disk(str(tmp_path / "kept"))["label_0"] == [1.0, 0.5, 1.0, 0.5]
    assert main(get_config(args + ["--strategy", "3"]))["win_lose_kept"] == 4
    assert main(get_config(args + ["--strategy", "1"]))["win_lose_kept"] == 1
    assert main(get_config(args + ["--bounds=-9,-9,-9,0,0,0"]))["win_lose_kept"] == 5  # all but NaN
    # a gaps file of another length is refused; so is one whose index does not cover the split
    gaps.iloc[:9].to_csv(tmp_path / "short.csv", index=False)
    with pytest.raises(SystemExit, match="not row-aligned"):
        main(get_config(["filter", "--data", data, "--gaps", str(tmp_path / "short.csv"), "--out", out]))
    gaps.assign(index=np.arange(1, 11)).to_parquet(tmp_path / "shifted.parquet")
    with pytest.raises(SystemExit, match="not row-aligned"):
        main(get_config(["filter", "--data", data, "--gaps", str(tmp_path / "shifted.parquet"), "--out", out]))
    for bad in (["--strategy", "4"], ["--bounds", "1,2"], ["--model", "sd3"], ["--gaps", "/nope.csv"]):
        with pytest.raises(SystemExit):
            get_config(["filter", "--data", data] + bad)


def judge_gaps(ds):
    """Oracle: the tiny judge's three gaps, winner minus loser, computed row by row."""
    out = []
    for r in ds:
        try:
            im = [from_jpeg(r["jpg_0"]), from_jpeg(r["jpg_1"])]
        except Exception:
            out.append([math.nan] * 3)
            continue
        s = judge_scores(im, [r["caption"]] * 2)
        w, l_ = (1, 0) if r["label_1"] > r["label_0"] else (0, 1)
        out.append([s[k][w] - s[k][l_] for k in ("aesthetic", "clip", "vqa")])
    return np.array(out)


@pytest.fixture(scope="module")
def world_pairs(tmp_path_factory):
    """The first 160 tiny-world train rows with one unreadable image (row 3) and one unlabelled row (5)."""
    from datasets import load_dataset
    ds = load_dataset("tiny/pickapic", split="train")
    ds = ds.select(range(min(160, len(ds)))).to_pandas()
    ds.loc[3, "jpg_1"] = b"\xff\xd8 broken"
    ds.loc[5, ["has_label", "label_0", "label_1"]] = [False, 0.0, 0.0]
    path = str(tmp_path_factory.mktemp("w") / "train.parquet")
    ds.to_parquet(path)
    return path


def test_score_filter_round_trip_and_resume(world_pairs, tmp_path, monkeypatch):
    from datasets import load_dataset
    base = ["--model", "tiny", "--data", world_pairs, "--batch-size", "8"]
    ref = str(tmp_path / "ref")
    main(get_config(base + ["--out", ref]))
    df = pd.read_csv(os.path.join(ref, "gaps.csv"))
    ds = load_dataset("parquet", data_files=world_pairs, split="train")
    want = judge_gaps(ds)
    assert len(df) == len(ds) and df["index"].tolist() == list(range(len(ds)))
    ok = df["status"] == "ok"
    np.testing.assert_allclose(df.loc[ok, list(mpcf.GAP_COLS)].to_numpy(), want[ok.to_numpy()], rtol=0, atol=1e-12)
    assert df["status"][3] == "unreadable" and df["status"][5] == "no_label"
    jpg = ds[0]["jpg_0"]   # datasets' Image(decode=False) rows are {"bytes": ...}: the same picture
    assert mpcf.decode(jpg).size == (32, 32) and np.array_equal(np.array(mpcf.decode({"bytes": jpg, "path": None})), np.array(mpcf.decode(jpg)))
    tie = np.array(ds["label_0"]) == np.array(ds["label_1"])
    assert (df["different_flag"][ok] == (~tie[ok]).astype(int)).all()
    # filter read back from the files equals the rule applied by hand to the oracle gaps
    keep = json.load(open(os.path.join(ref, "keep.json")))
    hand = [i for i, (a, c, v) in enumerate(want) if ok[i] and ds[i]["are_different"] and (
        (abs(a) < 0.2 and abs(c) < 0.03 and abs(v) < 0.07) if tie[i] else (a > -0.5 and c > 0 and v > 0))]
    assert keep == hand and 0 < len(keep) < ok.sum()

    # interrupted run: the process dies in its 4th batch, and the last line is half written
    real, calls = mpcf.load_scorers, []

    class Killed(Exception):
        pass

    def dying(cfg, device):
        score = real(cfg, device)

        def wrapped(images, captions):
            calls.append(len(images))
            if len(calls) == 4 and not cfg.resume:
                raise Killed
            return score(images, captions)
        return wrapped
    monkeypatch.setattr(mpcf, "load_scorers", dying)
    out = str(tmp_path / "resumed")
    with pytest.raises(Killed):
        main(get_config(base + ["--out", out]))
    part = os.path.join(out, "gaps.part0.csv")
    assert len(open(part).read().splitlines()) == 1 + 3 * 8
    with open(part, "a") as f:
        f.write("60,1,0.12")  # killed mid-write
    with pytest.raises(SystemExit, match="--resume"):
        main(get_config(base + ["--out", out]))
    open(os.path.join(out, "gaps.part1.csv"), "w").close()   # a rank killed before its header reached the disk
    calls.clear()
    main(get_config(base + ["--out", out, "--resume"]))
    usable = np.array(ds["has_label"]) & np.array(ds["are_different"])
    assert sum(calls) == 2 * (usable.sum() - 3 * 8)  # only the rows not written yet
    assert open(os.path.join(out, "gaps.csv")).read() == open(os.path.join(ref, "gaps.csv")).read()
    assert open(os.path.join(out, "keep.json")).read() == open(os.path.join(ref, "keep.json")).read()

    # torchrun with two ranks shards the rows and merges to the same file
    monkeypatch.setattr(mpcf, "load_scorers", real)
    out2 = str(tmp_path / "ddp")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "mpcf.py", "score", *base, "--out", out2], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(os.listdir(out2)) == ["gaps.csv", "gaps.part0.csv", "gaps.part1.csv", "log.jsonl"]
    assert open(os.path.join(out2, "gaps.csv")).read() == open(os.path.join(ref, "gaps.csv")).read()


# ----------------------------------------------------------------------------- real scorers, tiny random weights
class LaionMLP(torch.nn.Module):
    """The LAION improved-aesthetic-predictor head as its repository defines it (no activations)."""
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(768, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))

    def forward(self, x):
        return self.layers(x)


@pytest.fixture(scope="module")
def tiny_real_scorers(tmp_path_factory):
    """Random tiny CLIP-L stand-in (projection 768), CLIP, BLIP-2-T5 and InstructBLIP-T5, saved
    to folders and read back by the same from_pretrained calls as the real checkpoints."""
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor,
                              CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer,
                              CLIPVisionConfig, CLIPVisionModelWithProjection, InstructBlipConfig,
                              InstructBlipForConditionalGeneration, InstructBlipProcessor, T5Config)
    d = tmp_path_factory.mktemp("scorers")
    tok = lambda: CLIPTokenizer.from_pretrained("tiny/sd15/tokenizer")  # noqa: E731
    t = tok()
    torch.manual_seed(0)
    vis = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
               patch_size=8)
    improc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPVisionModelWithProjection(CLIPVisionConfig(**vis, projection_dim=768)).save_pretrained(d / "aes")
    improc.save_pretrained(d / "aes")
    os.makedirs(d / "head")
    torch.save(LaionMLP().state_dict(), d / "head" / "sac+logos+ava1-l14-linearMSE.pth")
    txt = dict(vocab_size=len(t), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=16, bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id,
               pad_token_id=t.pad_token_id)
    CLIPModel(CLIPConfig(text_config=txt, vision_config=vis, projection_dim=16)).save_pretrained(d / "clip")
    CLIPProcessor(image_processor=improc, tokenizer=t).save_pretrained(d / "clip")
    bimg = BlipImageProcessor(size={"height": 32, "width": 32})
    for name in ("blip2", "instructblip"):
        proc = Blip2Processor(image_processor=bimg, tokenizer=tok(), num_query_tokens=4) if name == "blip2" else \
            InstructBlipProcessor(image_processor=bimg, tokenizer=tok(), qformer_tokenizer=tok(), num_query_tokens=4)
        v = len(proc.tokenizer)  # + the <image> token the processor added
        t5 = T5Config(vocab_size=v, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=4,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1).to_dict()
        qf = dict(vocab_size=v, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                  encoder_hidden_size=32)
        kw = dict(vision_config=vis, qformer_config=qf, text_config=t5, num_query_tokens=4,
                  image_token_index=proc.tokenizer.convert_tokens_to_ids("<image>"))
        model = Blip2ForConditionalGeneration(Blip2Config(**kw)) if name == "blip2" else \
            InstructBlipForConditionalGeneration(InstructBlipConfig(**kw))
        model.save_pretrained(d / name)
        proc.save_pretrained(d / name)
    return d


def oracle_pixels(images, mean, std):
    """CLIP preprocessing by hand for 32x32 inputs (resize and centre crop are the identity)."""
    x = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images]))  # (N, H, W, 3)
    return ((x - torch.tensor(mean)) / torch.tensor(std)).permute(0, 3, 1, 2)                     # (N, 3, H, W)


def scorer_flags(d, vqa):
    """--model sd15: the real-scorer preset, pointed at the tiny folders (same loading code)."""
    return ["--model", "sd15", "--aesthetic-clip", str(d / "aes"), "--aesthetic-mlp", str(d / "head"),
            "--clip-model", str(d / "clip"), "--vqa-model", str(d / vqa)]


@torch.no_grad()
def test_real_scorer_code_paths_match_oracles(tiny_real_scorers, tmp_path):
    from transformers import (AutoModelForImageTextToText, AutoProcessor, CLIPModel, CLIPTokenizer,
                              CLIPVisionModelWithProjection)
    d = tiny_real_scorers
    images = [draw("red", "circle", 17, 16, 16), draw("blue", "square", 11, 10, 20),
              draw("green", "triangle", 20, 16, 16), draw("purple", "circle", 9, 24, 8)]
    caps = ["a red circle", "a blue square", "a red circle", "a yellow triangle on a big field"]  # padded
    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    px = oracle_pixels(images, mean, std)
    # aesthetic: unit-normalised CLIP image embedding through the LAION head (its own class, eval)
    head = LaionMLP().eval()
    head.load_state_dict(torch.load(d / "head" / "sac+logos+ava1-l14-linearMSE.pth", weights_only=True))
    emb = CLIPVisionModelWithProjection.from_pretrained(d / "aes")(pixel_values=px).image_embeds
    want_aes = head(emb / emb.norm(dim=-1, keepdim=True)).squeeze(-1)
    # CLIP score: cosine of the projected pooled states, no logit scale
    clip, tok = CLIPModel.from_pretrained(d / "clip"), CLIPTokenizer.from_pretrained(d / "clip")
    enc = tok(caps, padding=True, return_tensors="pt")
    t = clip.text_projection(clip.text_model(**enc).pooler_output)
    v = clip.visual_projection(clip.vision_model(pixel_values=px).pooler_output)
    want_clip = torch.nn.functional.cosine_similarity(v, t, dim=-1)
    # VQA: one image at a time, forward pass with the first decoder step teacher-forced, P(first token of "Yes")
    q = 'Question: Does this figure show "{}"? Please answer yes or no. Answer:'
    for name in ("blip2", "instructblip"):
        proc, vlm = AutoProcessor.from_pretrained(d / name), AutoModelForImageTextToText.from_pretrained(d / name)
        yes = proc.tokenizer.convert_tokens_to_ids(proc.tokenizer.tokenize("Yes")[0])
        want_vqa = []
        for im, c in zip(images, caps):
            # padding=True only to get the same (non-truncating) text kwargs: one row pads nothing
            inp = proc(images=[im], text=[q.format(c)], return_tensors="pt", padding=True)
            logits = vlm(**inp, decoder_input_ids=torch.zeros(1, 1, dtype=torch.long)).logits[:, -1]
            want_vqa.append(logits.softmax(-1)[0, yes])
        score = mpcf.load_scorers(get_config(["score", *scorer_flags(d, name)]), torch.device("cpu"))
        got = score(images, caps)
        np.testing.assert_allclose(got["aesthetic"], want_aes.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got["clip"], want_clip.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got["vqa"], torch.stack(want_vqa).numpy(), rtol=1e-4, atol=1e-7)
    assert np.ptp(got["clip"]) > 1e-3 and np.ptp(got["aesthetic"]) > 1e-4  # the inputs do differ
    # the head loads from the file itself too; a folder with two heads is ambiguous
    single = mpcf.load_aesthetic_mlp(str(d / "head" / "sac+logos+ava1-l14-linearMSE.pth"))
    x = torch.randn(3, 768)
    torch.testing.assert_close(single(x), head(x))
    os.makedirs(tmp_path / "two")
    for n in ("a.pth", "b.pth"):
        torch.save(LaionMLP().state_dict(), tmp_path / "two" / n)
    with pytest.raises(SystemExit, match="exactly one"):
        mpcf.load_aesthetic_mlp(str(tmp_path / "two"))

    # the score step with these scorers: gaps = winner minus loser, an unreadable pair counted
    data = str(tmp_path / "pairs.parquet")
    rows = hand_dataset(data, n_bad=1)
    out = str(tmp_path / "out")
    main(get_config(["all", "--data", data, "--out", out, "--batch-size", "3", *scorer_flags(d, "instructblip")]))
    df = pd.read_csv(os.path.join(out, "gaps.csv"))
    assert df["status"].tolist() == ["unreadable"] + ["ok"] * 6 + ["no_label", "identical", "ok"]
    for i in (1, 2, 9):  # `score` is the last set of the loop above: the same models
        s = score([from_jpeg(rows[i]["jpg_0"]), from_jpeg(rows[i]["jpg_1"])], [rows[i]["caption"]] * 2)
        w = 1 if rows[i]["label_1"] > rows[i]["label_0"] else 0
        want = [s[k][w] - s[k][1 - w] for k in ("aesthetic", "clip", "vqa")]
        np.testing.assert_allclose(df.loc[i, list(mpcf.GAP_COLS)].to_numpy(dtype=float), want, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- does filtering help an LRM?
def clean_held_out_pairs():
    """validation_unique + test_unique, each pair labelled by the judge's clean `human` score (no
    rater noise); pairs the judge calls a tie (|difference| < 0.05) and identical images left out.
    -> (images_0, images_1, captions, image 0 wins: bool (N,))"""
    from datasets import concatenate_datasets, load_dataset
    held = concatenate_datasets([load_dataset("tiny/pickapic", split=s) for s in ("validation_unique", "test_unique")])
    im0, im1, caps, win0 = [], [], [], []
    for r in held:
        a, b = from_jpeg(r["jpg_0"]), from_jpeg(r["jpg_1"])
        h = judge_scores([a, b], [r["caption"]] * 2)["human"]
        if r["are_different"] and abs(h[0] - h[1]) >= 0.05:
            im0.append(a), im1.append(b), caps.append(r["caption"]), win0.append(h[0] > h[1])
    return im0, im1, caps, torch.tensor(win0)


@torch.no_grad()
def judge_agreement(lrm, lat0, lat1, caps, win0):
    """Oracle accuracy: the LRM prefers the judge's winner, at t = 1 on noise-free VAE latents."""
    text = lrm.encode_text(caps)
    return ((lrm.score(lat0, 1, text=text) > lrm.score(lat1, 1, text=text)) == win0).float().mean().item()


def test_lrm_on_mpcf_pairs_agrees_with_the_judge_at_least_as_often(tmp_path):
    """Same init, seed, steps and noise; only the training pairs differ (MPCF strategy 2 or all)."""
    import lrm as L
    from diffusers import AutoencoderKL
    counts = main(get_config(["--model", "tiny", "--out", str(tmp_path / "mpcf")]))
    im0, im1, caps, win0 = clean_held_out_pairs()
    vae = AutoencoderKL.from_pretrained("tiny/sd15", subfolder="vae")
    with torch.no_grad():
        lat0, lat1 = ((vae.encode(oracle_pixels(ims, [0.5] * 3, [0.5] * 3)).latent_dist.mean  # [-1, 1] pixels
                       * vae.config.scaling_factor) for ims in (im0, im1))                   # (N, 4, 8, 8)
    torch.manual_seed(0)  # lrm.main seeds 0 before from_base: the control is both runs' starting point
    acc = {"untrained": judge_agreement(M.LatentRewardModel.from_base("tiny").eval(), lat0, lat1, caps, win0)}
    for name, extra in (("mpcf", ["--keep", str(tmp_path / "mpcf" / "keep.json")]), ("unfiltered", [])):
        out = str(tmp_path / name)
        L.main(L.get_config(["--model", "tiny", "--out", out, "--workers", "0", "--steps", "30", "--batch_size", "32", "--warmup", "10",
                             "--eval_every", "100000", "--save_every", "100000", "--eval_timesteps", "1",
                             "--eval_max_pairs", "4", *extra]))
        acc[name] = judge_agreement(M.LatentRewardModel.from_pretrained(out).eval(), lat0, lat1, caps, win0)
    print(f"\nMPCF strategy 2 kept {counts['win_lose_kept']}/{counts['win_lose']} win-lose + {counts['ties_kept']}/"
          f"{counts['ties']} ties; LRM (30 steps x 32 pairs) agreement with the clean judge on {len(caps)} held-out "
          "pairs at t=1: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    assert acc["mpcf"] > acc["untrained"] + 0.05 and acc["unfiltered"] > acc["untrained"] + 0.03  # both learned
    assert acc["mpcf"] >= acc["unfiltered"] - 0.03


# ============================================================================ lpo.py: Latent Preference Optimization
def run_lpo(*argv):
    return lpo.main(lpo.get_config(list(argv)))


def schedule(steps, spacing="leading"):
    from diffusers import DDIMScheduler
    s = DDIMScheduler.from_pretrained("tiny/sd15", subfolder="scheduler", timestep_spacing=spacing)
    s.set_timesteps(steps)
    return s


@pytest.fixture(scope="module")
def fresh_lrm(tmp_path_factory):
    """An untrained LRM on each tiny base: enough for the code paths (not for learning)."""
    from lrm_model import LatentRewardModel
    out = {}
    for name, base in (("sd", "tiny/sd15"), ("xl", "tiny/sdxl")):
        torch.manual_seed(0)
        out[name] = str(tmp_path_factory.mktemp(f"lrm-{name}"))
        LatentRewardModel.from_base(base).save_pretrained(out[name])
    return out


# ---- lpo.py: math
@pytest.mark.parametrize("steps,spacing", [(20, "leading"), (10, "leading"), (50, "trailing")])
def test_ddim_step_matches_diffusers(steps, spacing):
    """ddim_step's Gaussian + the same noise == DDIMScheduler.step(eta=1) at every step."""
    s = schedule(steps, spacing)
    ts = s.timesteps.tolist()
    g = torch.Generator().manual_seed(0)
    for i, t in enumerate(ts):
        x, eps, noise = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        ref = s.step(eps, t, x, eta=1.0, variance_noise=noise).prev_sample
        mean, std = lpo.ddim_step(eps, x, torch.full((3,), t), torch.full((3,), t_prev), s.alphas_cumprod, 1.0)
        torch.testing.assert_close(mean + std * noise, ref, rtol=1e-5, atol=1e-5)
        assert torch.allclose(std.flatten(), s._get_variance(t, t_prev).sqrt().float())


def test_sigma_and_thresholds_reproduce_spec():
    s = schedule(20)
    ts = s.timesteps
    ts_prev = torch.cat([ts[1:], torch.tensor([-1])])
    sig = lpo.ddim_sigma(ts, ts_prev, s.alphas_cumprod, 1.0).flatten()
    assert ts[0] == 951 and ts[-1] == 1
    # SPEC 3: sigma 0.6444 (t=951), 0.6241, 0.6029, ..., 0.1673 (t=101), 0.0406 (t=51), 0.0206 (t=1)
    for t, want in ((951, 0.6444), (901, 0.6241), (851, 0.6029), (101, 0.1673), (51, 0.0406), (1, 0.0206)):
        assert abs(sig[ts.tolist().index(t)].item() - want) < 1e-4, t
    th = lpo.pair_thresholds(sig, 0.35, 0.5)
    assert abs(th[0] - 0.5) < 1e-9 and abs(th[-1] - 0.35) < 1e-9 and (th.diff() < 0).all()
    assert abs(2 * math.atanh(th[0]) - 1.0986) < 1e-3 and abs(2 * math.atanh(th[-1]) - 0.7310) < 1e-3
    for steps in (10, 50):  # any schedule: endpoints at th_max / th_min, linear in sigma in between
        s = schedule(steps)
        tp = torch.cat([s.timesteps[1:], torch.tensor([-1])])
        sig = lpo.ddim_sigma(s.timesteps, tp, s.alphas_cumprod, 1.0).flatten().double()
        th = lpo.pair_thresholds(sig, 0.45, 0.6)
        assert len(th) == steps and abs(th.max() - 0.6) < 1e-9 and abs(th.min() - 0.45) < 1e-9
        torch.testing.assert_close(th, 0.45 + (sig - sig.min()) / (sig.max() - sig.min()) * 0.15)


def test_step_logprob_matches_torch_normal():
    g = torch.Generator().manual_seed(1)
    x, mean = torch.randn(5, 4, 8, 8, generator=g), torch.randn(5, 4, 8, 8, generator=g)
    std = torch.rand(5, 1, 1, 1, generator=g) + 0.05
    want = torch.distributions.Normal(mean, std).log_prob(x).mean((1, 2, 3))
    torch.testing.assert_close(lpo.step_logprob(x, mean, std), want)
    assert lpo.step_logprob(x.half(), mean.half(), std).dtype == torch.float32


def test_select_pairs_by_hand():
    scores = torch.tensor([[0.0, 2.0, 0.5, -1.0],    # gap 3.0
                           [0.1, 0.2, 0.3, 0.0],     # gap 0.3
                           [1.0, 1.0, 1.0, 1.0]])    # gap 0
    win, lose, ok = lpo.select_pairs(scores, 0.5)    # logit gap 2 atanh(0.5) = 1.0986
    assert win.tolist()[:2] == [1, 2] and lose.tolist()[:2] == [3, 3] and ok.tolist() == [True, False, False]
    _, _, ok = lpo.select_pairs(scores, torch.tensor(0.1))  # 2 atanh(0.1) = 0.2007
    assert ok.tolist() == [True, True, False]


def test_lpo_loss_by_hand_with_clamp():
    lw = torch.tensor([0.05, 0.30, 0.00], requires_grad=True)   # policy log-probs, winners
    ll = torch.tensor([0.00, 0.00, -0.50], requires_grad=True)  # losers
    rw, rl = torch.zeros(3), torch.zeros(3)                       # reference
    loss, st = lpo.lpo_loss(lw, ll, rw, rl, beta=10.0, clip_eps=0.1)
    # log r clamped to [log 0.9, log 1.1] = [-0.10536, 0.09531]
    m = [10 * 0.05, 10 * math.log(1.1), 10 * (0 - math.log(0.9))]
    want = sum(math.log1p(math.exp(-v)) for v in m) / 3
    assert abs(loss.item() - want) < 1e-6
    loss.backward()
    # pair 0 inside the band: dL/dlw = -beta sigmoid(-m) / 3; pair 1's winner and pair 2's loser are clamped
    assert abs(lw.grad[0].item() + 10 / (1 + math.exp(m[0])) / 3) < 1e-6
    assert lw.grad[1].item() == 0.0 and ll.grad[2].item() == 0.0
    assert ll.grad[1].item() != 0.0 and lw.grad[2].item() != 0.0
    assert st["acc"] == 1.0 and abs(st["clipfrac"] - 2 / 6) < 1e-6


def test_apply_update_clips_for_real_and_stops_on_nan():
    p = torch.nn.Parameter(torch.zeros(4))
    opt = torch.optim.SGD([p], lr=1.0)
    p.grad = torch.tensor([30.0, 40.0, 0.0, 0.0])   # norm 50
    norm = lpo.apply_update([p], opt, torch.tensor(1.0), 1, 1.0)
    assert abs(norm - 50.0) < 1e-4 and abs(p.detach().norm().item() - 1.0) < 1e-5  # the step was clipped to 1
    before = p.detach().clone()
    p.grad = torch.ones(4)
    with pytest.raises(SystemExit, match="non-finite"):
        lpo.apply_update([p], opt, torch.tensor(float("nan")), 1, 1.0)
    assert torch.equal(p.detach(), before)


# ---- lpo.py: models and data
def test_sdxl_encoding_uses_zero_uncond_and_real_time_ids():
    cfg = lpo.get_config(["--model", "tiny-xl"])
    pipe, encode, sch = lpo.load_policy(cfg, torch.device("cpu"), torch.float32)
    assert pipe.vae is None and sch.latent == 8
    kw = encode(["a red circle", "a blue square"])
    ctx, add = kw["encoder_hidden_states"], kw["added_cond_kwargs"]
    assert ctx.shape[0] == 4 and ctx[:2].abs().sum() == 0 and ctx[2:].abs().sum() > 0
    assert add["text_embeds"][:2].abs().sum() == 0 and add["time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]] * 4
    cfg = lpo.get_config(["--model", "tiny"])
    _, encode, _ = lpo.load_policy(cfg, torch.device("cpu"), torch.float32)
    kw = encode(["a red circle"])  # SD1.5: the uncond is the encoding of "" (not zeros)
    assert kw["encoder_hidden_states"][0].abs().sum() > 0 and "added_cond_kwargs" not in kw


def test_bad_inputs_fail_with_one_clear_line(tmp_path, fresh_lrm):
    def err(*argv):
        with pytest.raises(SystemExit) as e:
            run_lpo("--out", str(tmp_path / "o"), *argv)
        msg = str(e.value)
        assert msg.startswith("lpo.py: error:") and "\n" not in msg, msg
        return msg
    assert "no LRM" in err("--lrm", str(tmp_path / "missing"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert "no prompts" in err("--lrm", fresh_lrm["sd"], "--prompts", str(empty))
    from datasets import Dataset
    os.makedirs(tmp_path / "nocap")
    Dataset.from_dict({"text": ["a red circle"]}).to_parquet(str(tmp_path / "nocap" / "train.parquet"))
    assert "caption" in err("--lrm", fresh_lrm["sd"], "--prompts", str(tmp_path / "nocap"))
    # an LRM built on another latent space (SD's VAE scaling, not the tiny VAE's)
    other = tmp_path / "other_lrm"
    os.makedirs(other)
    c = json.load(open(os.path.join(fresh_lrm["sd"], "lrm_config.json")))
    c["latent_space"] = [4, 0.18215, None]
    json.dump(c, open(other / "lrm_config.json", "w"))
    assert "latent space" in err("--lrm", str(other))


# ---- lpo.py: the loop
SMALL = ["--max-rounds", "1", "--sample-batch", "4", "--num-prompts", "8", "--train-batch", "32", "--eval-samples", "0"]


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_resume_equals_uninterrupted_and_lora_loads(tmp_path, fresh_lrm):
    """Bitwise on CPU: 2 rounds in one go == 1 round, stop, --resume, 1 more round."""
    common = ["--model", "tiny", "--lrm", fresh_lrm["sd"], "--sample-batch", "4", "--num-prompts", "8",
              "--train-batch", "16", "--th-min", "0", "--th-max", "0", "--eval-samples", "0", "--ckpt-every", "1", "--steps", "10"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    ra = run_lpo(*common, "--out", a, "--max-rounds", "2")
    run_lpo(*common, "--out", b, "--max-rounds", "1")
    rb = run_lpo(*common, "--out", b, "--max-rounds", "2", "--resume")
    ca, cb = (torch.load(os.path.join(d, "ckpt.pt"), weights_only=False) for d in (a, b))
    assert ra["step"] == rb["step"] == ca["step"] > 1 and cb["next_round"] == 2
    assert torch.equal(ca["lora"], cb["lora"])
    assert [r["loss"] for r in read_log(a) if "round" in r] == [r["loss"] for r in read_log(b) if "round" in r]
    # the saved LoRA (diffusers format) loads into the tiny pipeline and changes its output
    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained("tiny/sd15")
    pipe.set_progress_bar_config(disable=True)
    gen = lambda: pipe(["a red circle"] * 2, num_inference_steps=5, output_type="np",  # noqa: E731
                       generator=torch.Generator().manual_seed(0)).images
    before = gen()
    pipe.load_lora_weights(b)
    after = gen()
    assert np.abs(after - before).max() > 1e-3


def test_nan_loss_stops_cleanly_and_keeps_the_last_good_checkpoint(tmp_path, fresh_lrm):
    common = ["--model", "tiny", "--lrm", fresh_lrm["sd"], "--out", str(tmp_path / "n"), *SMALL[2:], "--steps", "5",
              "--th-min", "0", "--th-max", "0", "--ckpt-every", "1"]
    run_lpo(*common, "--max-rounds", "1")
    good = torch.load(tmp_path / "n" / "ckpt.pt", weights_only=False)
    with pytest.raises(SystemExit, match="non-finite"):
        run_lpo(*common, "--max-rounds", "2", "--resume", "--beta", "nan")
    after = torch.load(tmp_path / "n" / "ckpt.pt", weights_only=False)
    assert after["next_round"] == good["next_round"] == 1 and torch.equal(after["lora"], good["lora"])


def test_sdxl_one_iteration(tmp_path, fresh_lrm):
    out = str(tmp_path / "xl")
    r = run_lpo("--model", "tiny-xl", "--lrm", fresh_lrm["xl"], "--out", out, *SMALL, "--th-min", "0", "--th-max", "0",
                "--save-merged")
    rows = read_log(out)
    assert r["step"] >= 1 and rows[0]["tuples"] > 0 and np.isfinite(rows[0]["loss"])
    assert os.path.exists(os.path.join(out, "pytorch_lora_weights.safetensors"))
    assert os.path.exists(os.path.join(out, "unet", "config.json"))  # merged U-Net


def spawn(cmd):
    """A CPU subprocess in its own process group (so that a hang can be killed whole), one thread."""
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))


def finish(p, timeout=240):
    """Wait for a spawned lpo.py; return its log rows."""
    try:
        _, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, 9)
        p.communicate()
        raise AssertionError(f"timed out: {p.args}")
    assert p.returncode == 0, err[-3000:]
    return read_log(p.args[p.args.index("--out") + 1])


def torchrun(out, lrm, *extra):
    return finish(spawn([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "lpo.py",
                         "--model", "tiny", "--lrm", lrm, "--out", out, *SMALL, "--steps", "10", *extra]), timeout=120)


def test_two_processes_end_with_identical_lora(tmp_path, fresh_lrm):
    rows = torchrun(str(tmp_path / "ddp"), fresh_lrm["sd"], "--th-min", "0", "--th-max", "0.05")
    fp = rows[-1]["final"]["lora_fingerprint"]
    assert rows[0]["tuples"] > 0 and rows[-1]["final"]["step"] >= 1
    assert len(fp) == 2 and fp[0] == fp[1]   # identical LoRA weights on both ranks
    # no pair clears the threshold: no training, no hang, a clean end
    rows = torchrun(str(tmp_path / "none"), fresh_lrm["sd"], "--th-min", "0.999999", "--th-max", "0.999999")
    assert rows[0]["tuples"] == 0 and rows[-1]["final"]["step"] == 0


# ---- lpo.py: it learns (tiny world)
def test_lpo_raises_judge_win_rate_and_negated_reward_does_not(tmp_path):
    """The README's main command, shortened to 5 rounds: LPO with the shipped tiny LRM beats the base on
    held-out seeds; the same run with the LRM's scores negated does not (the signal flows through the LRM).
    The two runs go in parallel, one thread each."""
    short = ["--model", "tiny", "--num-prompts", "160", "--eval-samples", "150"]
    runs = {name: spawn([sys.executable, "lpo.py", *short, "--out", str(tmp_path / name), *extra])
            for name, extra in (("lpo", []), ("ctl", ["--negate-reward"]))}
    try:
        res = {name: finish(p)[-1]["final"] for name, p in runs.items()}
    finally:  # never leave a run behind
        for p in runs.values():
            if p.poll() is None:
                os.killpg(p.pid, 9)
    r, c = res["lpo"], res["ctl"]
    print(f"\nLPO win-rate {r['win_rate']:.3f} [{r['win_low']:.3f}, {r['win_high']:.3f}], caption match "
          f"{r['match_base']:.3f} -> {r['match_tuned']:.3f}; negated control {c['win_rate']:.3f} "
          f"[{c['win_low']:.3f}, {c['win_high']:.3f}]")
    assert r["win_rate"] >= 0.6 and r["win_low"] > 0.5
    assert c["win_rate"] < 0.5
    rows = [x for x in read_log(str(tmp_path / "lpo")) if "round" in x]
    assert all(0 < x["kept_frac"] < 1 for x in rows) and rows[-1]["step"] > 0


# ============================================================================ sample.py and eval.py
N_PROMPTS, SEEDS = 3, 2   # 6 paired images: enough to exercise every path, cheap to sample


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("eval")


@pytest.fixture(scope="module")
def lora_dir(tmp):
    """A LoRA as lpo.py makes and saves one (peft adapter, lpo.save_lora), with non-zero B."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from lpo import save_lora
    pipe = StableDiffusionPipeline.from_pretrained("tiny/sd15")
    torch.manual_seed(0)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for n, p in pipe.unet.named_parameters():
            if "lora_B" in n:   # peft starts B at zero: an untrained LoRA changes nothing
                p.normal_(0, 0.3)
    out = str(tmp / "lora")
    os.makedirs(out)
    save_lora(pipe, pipe.unet, out)
    return out


@pytest.fixture(scope="module")
def lrm_dir(tmp):
    from lrm_model import LatentRewardModel
    torch.manual_seed(0)
    out = str(tmp / "lrm")
    LatentRewardModel.from_base("tiny").save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_clip(tmp):
    """A random CLIP (+ processor, + aesthetic MLP .pth) built from config and saved to disk, so the
    scorers go through the same from_pretrained / torch.load code as PickScore, CLIP-H and LAION's."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor
    tok = AutoTokenizer.from_pretrained("tiny/sd15/tokenizer")
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    config = CLIPConfig(text_config=dict(small, vocab_size=len(tok), max_position_embeddings=16,
                                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                         pad_token_id=tok.pad_token_id),
                        vision_config=dict(small, image_size=32, patch_size=8), projection_dim=16,
                        logit_scale_init_value=3.0)
    torch.manual_seed(0)
    path = str(tmp / "clip")
    CLIPModel(config).save_pretrained(path)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=tok).save_pretrained(path)
    dims = [16, 1024, 128, 64, 16, 1]   # LAION's MLP shape on a 16-d embedding
    sd = {}
    for i, k in enumerate((0, 2, 4, 6, 7)):
        sd[f"layers.{k}.weight"] = torch.randn(dims[i + 1], dims[i]) / dims[i] ** 0.5
        sd[f"layers.{k}.bias"] = torch.randn(dims[i + 1]) * 0.1
    torch.save(sd, str(tmp / "aesthetic.pth"))
    return path, str(tmp / "aesthetic.pth")


def eval_argv(out, lrm_dir, tiny_clip, *extra):
    clip, mlp = tiny_clip
    return ["--model", "tiny", "--num-prompts", str(N_PROMPTS), "--seeds-per-prompt", str(SEEDS), "--out", out,
            "--lrm", lrm_dir, "--scorers", "judge,lrm,pickscore,clip,aesthetic", "--pickscore", clip,
            "--pickscore-processor", clip, "--clip", clip, "--aesthetic-clip", clip, "--aesthetic-mlp", mlp, *extra]


@pytest.fixture(scope="module")
def round_trip(tmp, lora_dir, lrm_dir, tiny_clip):
    """eval.py in its main mode: sample base and base + LoRA (sample.py), score, report."""
    out = str(tmp / "rt")
    ev.main(sample.get_config(ev.EvalConfig, ev.PRESETS, ["--lora", lora_dir, *eval_argv(out, lrm_dir, tiny_clip)]))
    return out


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


# ----------------------------------------------------------------------------- math
def test_win_rate_hand_made_cases():
    assert ev.win_rate([1, 2, 3], [1, 2, 3]) == (0.5, 0.5, 0.5)          # all ties
    assert ev.win_rate([2, 3, 4], [1, 2, 3]) == (1.0, 1.0, 1.0)          # all wins
    assert ev.win_rate([0, 1, 2], [1, 2, 3]) == (0.0, 0.0, 0.0)          # all losses
    rate, low, high = ev.win_rate([2, 0, 5, 3], [1, 1, 5, 2])           # win, loss, tie, win
    assert rate == pytest.approx(2.5 / 4) and low <= rate <= high
    with pytest.raises(ValueError):
        ev.win_rate([1, 2], [1, 2, 3])                                  # never silently truncated


def test_win_rate_interval_matches_normal_approximation():
    rng = np.random.default_rng(0)
    n, p = 400, 0.7
    wins = rng.random(n) < p
    tuned, base = np.where(wins, 1.0, 0.0), np.full(n, 0.5)
    rate, low, high = ev.win_rate(tuned, base, n_boot=20_000, seed=1)
    half = 1.96 * np.sqrt(rate * (1 - rate) / n)                         # binomial oracle
    assert rate == wins.mean() and low < rate < high
    assert low == pytest.approx(rate - half, abs=0.01) and high == pytest.approx(rate + half, abs=0.01)
    # 40 prompts x 10 seeds where all seeds of a prompt agree: resampling prompts must widen the
    # interval ~sqrt(10)x; treating the 400 images as independent would claim false precision
    groups = np.repeat(np.arange(40), 10)
    by_prompt = np.repeat(rng.random(40) < p, 10)
    r1, l1, h1 = ev.win_rate(by_prompt * 1.0, base, seed=1)
    r2, l2, h2 = ev.win_rate(by_prompt * 1.0, base, seed=1, groups=groups)
    assert r1 == r2 and (h2 - l2) > 2.5 * (h1 - l1) and l2 <= r2 <= h2
    # one prompt, many seeds: the seeds are the only resampling unit left (not a zero-width interval)
    assert ev.win_rate(tuned, base, seed=1, groups=[7] * n) == (rate, low, high)


def test_non_finite_scores_are_refused_or_left_out_and_counted():
    from types import SimpleNamespace
    with pytest.raises(ValueError, match="finite"):
        ev.win_rate([1.0, float("nan")], [0.0, 0.0])        # NaN > x is False: it would count as a loss
    rows = [{"prompt": p, "s/base": 0.0, "s/tuned": t} for p, t in [("a", 1.0), ("b", float("nan")), ("c", -1.0), ("d", 2.0)]]
    got = ev.summarise(rows, SimpleNamespace(n_boot=200, seed=0))["s"]
    assert (got["n"], got["nonfinite"], got["win_rate"], got["tuned"]) == (3, 1, 2 / 3, pytest.approx(2 / 3))


def test_prompt_sources_give_unique_prompts_in_order(tmp):
    (tmp / "p.txt").write_text("a red circle\n\na blue square\na red circle\n")
    (tmp / "p.json").write_text('["a red circle", "a blue square", "a red circle"]')
    (tmp / "parti.tsv").write_text("Prompt\tCategory\na red circle\tA\na blue square\tB\na red circle\tA\n")
    for name in ("p.txt", "p.json", "parti.tsv"):
        assert sample.load_prompts(str(tmp / name)) == ["a red circle", "a blue square"]
    from datasets import load_dataset
    caps = load_dataset("tiny/pickapic", split="test_unique")["caption"]
    assert sample.load_prompts("tiny/pickapic", "test_unique", 3) == list(dict.fromkeys(caps))[:3]



def test_lpo_prompts_are_distinct_captions_except_in_the_tiny_preset(tmp):
    (tmp / "p.txt").write_text("a red circle\n\na blue square\na red circle\na green square\n")
    assert lpo.load_prompts(str(tmp / "p.txt"), "train", 2) == ["a red circle", "a blue square"]
    assert lpo.load_prompts(str(tmp / "p.txt"), "train", 3, unique=False) == ["a red circle", "a blue square", "a red circle"]
    assert lpo.get_config(["--model", "sd15"]).unique_prompts and not lpo.get_config(["--model", "tiny"]).unique_prompts
    from datasets import load_dataset   # the tiny world has 15 captions: its preset reads rows
    assert lpo.load_prompts("tiny/pickapic", "train", 320, unique=False) == load_dataset("tiny/pickapic", split="train")["caption"][:320]
    assert len(lpo.load_prompts("tiny/pickapic", "train", 320)) == 15


def test_hub_check_knows_dataset_repos(monkeypatch):
    """The default --prompts is a hub *dataset* (yuvalkirstain/pickapic_v1): asked as a model repo it
    is not found, which used to stop sample.py / eval.py before anything ran."""
    def fake_download(repo, repo_type="model", **kw):   # a hub holding that one dataset and nothing else
        if (repo, repo_type) != ("yuvalkirstain/pickapic_v1", "dataset"):
            raise FileNotFoundError(f"{repo_type} {repo}")
        return "/cache/pickapic_v1"
    monkeypatch.setattr(sample.huggingface_hub, "snapshot_download", fake_download)
    assert sample.findable("yuvalkirstain/pickapic_v1") and not sample.findable("nobody/nothing")


# ----------------------------------------------------------------------------- scorers
def test_clip_scorers_match_transformers_forward(tiny_clip):
    from transformers import CLIPModel, CLIPProcessor
    path, mlp_path = tiny_clip
    cfg = ev.EvalConfig(pickscore=path, pickscore_processor=path, clip=path, aesthetic_clip=path, aesthetic_mlp=mlp_path)
    cpu = torch.device("cpu")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(3)]
    prompts = ["a red circle", "a blue square", "a green green triangle"]
    got = {n: ev.load_scorer(n, cfg, cpu, torch.float32)(images, prompts)[n] for n in ("pickscore", "clip", "aesthetic")}
    # oracle: the model's own full forward (logits_per_image = exp(logit_scale) * cos) ...
    model, proc = CLIPModel.from_pretrained(path).eval(), CLIPProcessor.from_pretrained(path)
    with torch.no_grad():
        out = model(**proc(text=prompts, images=images, padding=True, return_tensors="pt"))
    logits = out.logits_per_image.diagonal().numpy()
    np.testing.assert_allclose(got["pickscore"], logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["clip"], logits / model.logit_scale.exp().item(), rtol=1e-5, atol=1e-6)
    # ... and the aesthetic MLP by hand: 5 affine maps, no activations, on the unit image embedding
    x = out.image_embeds.numpy().astype(np.float64)
    sd = torch.load(mlp_path)
    for k in (0, 2, 4, 6, 7):
        x = x @ sd[f"layers.{k}.weight"].numpy().T + sd[f"layers.{k}.bias"].numpy()
    np.testing.assert_allclose(got["aesthetic"], x[:, 0], rtol=1e-4, atol=1e-5)


def test_missing_scorer_weights_name_the_path(tiny_clip):
    cfg = ev.EvalConfig(pickscore="/nonexistent/PickScore_v1", aesthetic_clip=tiny_clip[0],
                        aesthetic_mlp="/nonexistent/sac+logos+ava1-l14-linearMSE.pth")
    for name, path in (("pickscore", cfg.pickscore), ("aesthetic", cfg.aesthetic_mlp)):
        with pytest.raises(SystemExit, match="scorer " + name + ".*" + path.replace("+", r"\+")):
            ev.load_scorer(name, cfg, torch.device("cpu"), torch.float32)


# ----------------------------------------------------------------------------- sample -> eval
def test_round_trip_pairs_images_and_reports_every_scorer(round_trip, lrm_dir):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    base, tuned = os.path.join(round_trip, "base"), os.path.join(round_trip, "tuned")
    rows = [json.loads(line) for line in open(os.path.join(base, "metadata.jsonl"))]
    assert [r["index"] for r in rows] == list(range(N_PROMPTS * SEEDS))
    assert [r["seed"] for r in rows] == [1_000_000 + i for i in range(N_PROMPTS * SEEDS)]
    assert len({r["prompt"] for r in rows}) == N_PROMPTS
    # seed per index, DDIM 20 steps, CFG 5: base image 3 re-made alone by plain diffusers
    pipe = StableDiffusionPipeline.from_pretrained("tiny/sd15", safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    r = rows[3]
    ref = pipe(r["prompt"], generator=torch.Generator().manual_seed(r["seed"]), num_inference_steps=20,
               guidance_scale=5.0, eta=0.0, height=32, width=32).images[0]
    assert np.abs(pixels(os.path.join(base, r["file_name"])) - np.asarray(ref, dtype=np.int16)).max() <= 2
    diff = [np.abs(pixels(os.path.join(base, r["file_name"])) - pixels(os.path.join(tuned, r["file_name"]))).mean()
            for r in rows]
    assert min(diff) > 0.5   # the LoRA was applied to the tuned model
    report = json.load(open(os.path.join(round_trip, "eval.json")))
    assert report["n"] == N_PROMPTS * SEEDS and report["settings"]["guidance"] == 5.0
    assert set(report["scores"]) == {"judge:human", "judge:match", "judge:aesthetic", "judge:clip", "judge:vqa",
                                     "lrm", "pickscore", "clip", "aesthetic"}
    scores = [json.loads(line) for line in open(os.path.join(round_trip, "scores.jsonl"))]
    assert len(scores) == N_PROMPTS * SEEDS
    for m, s in report["scores"].items():
        t, b = np.array([x[m + "/tuned"] for x in scores]), np.array([x[m + "/base"] for x in scores])
        assert s["tuned"] == pytest.approx(t.mean()) and s["base"] == pytest.approx(b.mean())
        assert s["win_rate"] == pytest.approx(((t > b) + 0.5 * (t == b)).mean())
        assert s["ci_low"] <= s["win_rate"] <= s["ci_high"]
    # the judge's numbers are the world's judge on the saved PNGs
    imgs = [Image.open(os.path.join(tuned, r["file_name"])) for r in rows]
    np.testing.assert_allclose([x["judge:human/tuned"] for x in scores], judge_scores(imgs, [r["prompt"] for r in rows])["human"])
    # the LRM column: the clean latent (diffusers' own VAE preprocessing) scored at t = 1
    from lrm_model import LatentRewardModel
    lrm = LatentRewardModel.from_pretrained(lrm_dir, base="tiny/sd15").eval()
    with torch.no_grad():
        lat = pipe.vae.encode(pipe.image_processor.preprocess(imgs)).latent_dist.mean * pipe.vae.config.scaling_factor
        want = lrm.score(lat, 1, prompts=[r["prompt"] for r in rows]).numpy()
    np.testing.assert_allclose([x["lrm/tuned"] for x in scores], want, rtol=1e-4, atol=1e-4)
    md = open(os.path.join(round_trip, "eval.md")).read()
    assert "| judge:human |" in md and "win-rate" in md
    assert Image.open(os.path.join(round_trip, "eval_grid.png")).size[0] > 2 * 96   # base | tuned, enlarged


def test_eval_of_folders_control_and_refusals(round_trip, lrm_dir, tiny_clip, tmp):
    base, tuned = os.path.join(round_trip, "base"), os.path.join(round_trip, "tuned")
    cfg = lambda *a: sample.get_config(ev.EvalConfig, ev.PRESETS, eval_argv(str(tmp / "ctl"), lrm_dir, tiny_clip, *a))
    # control: base against itself is a tie on every image under every scorer
    ev.main(cfg("--base-dir", base, "--tuned-dir", base, "--scorers", "judge,lrm", "--n-boot", "200"))
    for s in json.load(open(tmp / "ctl" / "eval.json"))["scores"].values():
        assert (s["win_rate"], s["ci_low"], s["ci_high"], s["ties"]) == (0.5, 0.5, 0.5, 1.0)
    # an image set with one pair missing is refused, not truncated
    short = str(tmp / "short")
    shutil.copytree(tuned, short)
    lines = open(os.path.join(short, "metadata.jsonl")).readlines()
    open(os.path.join(short, "metadata.jsonl"), "w").writelines(lines[:-1])
    with pytest.raises(SystemExit, match="mismatched image sets"):
        ev.main(cfg("--base-dir", base, "--tuned-dir", short, "--scorers", "judge"))
    # a tuned set sampled with another CFG is refused
    shutil.rmtree(short)
    shutil.copytree(tuned, short)
    info = json.load(open(os.path.join(short, "sampling.json")))
    json.dump(dict(info, guidance=7.5), open(os.path.join(short, "sampling.json"), "w"))
    with pytest.raises(SystemExit, match="guidance = 5.0 vs 7.5"):
        ev.main(cfg("--base-dir", base, "--tuned-dir", short, "--scorers", "judge"))
    with pytest.raises(SystemExit, match="unknown.*nope"):
        ev.main(cfg("--base-dir", base, "--tuned-dir", base, "--scorers", "judge,nope"))
    with pytest.raises(SystemExit, match="--lora /nonexistent/lora"):
        sample.main(sample.get_config(argv=["--model", "tiny", "--lora", "/nonexistent/lora"]))


def test_eval_orientation_on_known_better_images(tmp):
    """Tuned = centred pictures of the caption, base = pictures of another caption: the judge
    must call it ~1.0 for tuned, and ~0.0 with the folders swapped (no side mix-up)."""
    colors, rows = list(COLORS), []
    for name, right in (("good", True), ("bad", False)):
        d = tmp / name
        d.mkdir()
        for i in range(12):
            c, s = colors[i % 5], SHAPES[i % 3]
            cap = f"a {c} {s}"
            img = draw(c, s, 18, 16, 16) if right else draw(colors[(i + 2) % 5], SHAPES[(i + 1) % 3], 18, 16, 16)
            img.save(d / sample.file_name(i, 7 + i))
            rows.append(dict(file_name=sample.file_name(i, 7 + i), prompt=cap, seed=7 + i, index=i))
        (d / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[-12:]))
        (d / "sampling.json").write_text(json.dumps(dict(scheduler="DDIMScheduler", steps=20, guidance=5.0,
                                                         eta=0.0, resolution=32)))
    for tuned, base, want in (("good", "bad", 1.0), ("bad", "good", 0.0)):
        out = tmp / f"orient-{tuned}"
        ev.main(sample.get_config(ev.EvalConfig, ev.PRESETS, ["--model", "tiny", "--scorers", "judge", "--out", str(out),
                                                              "--base-dir", str(tmp / base), "--tuned-dir", str(tmp / tuned)]))
        s = json.load(open(out / "eval.json"))["scores"]["judge:human"]
        assert s["win_rate"] == want and s["n"] == 12


def test_two_process_sharded_sampling_and_scoring_each_index_once(round_trip, lora_dir, tmp):
    """torchrun eval.py, 2 ranks (gloo): sample.py's sharded sampling of both models, then sharded
    scoring gathered on rank 0; everything must match the 1-process round trip."""
    out = str(tmp / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "eval.py",
           "--model", "tiny", "--lora", lora_dir, "--scorers", "judge", "--num-prompts", str(N_PROMPTS),
           "--seeds-per-prompt", str(SEEDS), "--batch-size", "2", "--eval-batch-size", "2", "--out", out]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-3000:]
    n = N_PROMPTS * SEEDS
    logs = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))][:2]
    for log, side in zip(logs, ("base", "tuned")):   # both ranks worked, no index twice
        assert log["folder"] == side and log["per_rank"] == [n // 2, n // 2] and log["generated"] == n
        folder = os.path.join(out, side)
        names = sorted(f for f in os.listdir(folder) if f.endswith(".png"))
        rows = [json.loads(line) for line in open(os.path.join(folder, "metadata.jsonl"))]
        assert names == sorted(r["file_name"] for r in rows) and sorted(r["index"] for r in rows) == list(range(n))
        for r in rows:   # same image as the 1-process run: the seed belongs to the index, not the rank
            single = pixels(os.path.join(round_trip, side, r["file_name"]))
            assert np.abs(pixels(os.path.join(folder, r["file_name"])) - single).max() <= 2
    scores = [json.loads(line) for line in open(os.path.join(out, "scores.jsonl"))]
    ref = [json.loads(line) for line in open(os.path.join(round_trip, "scores.jsonl"))]
    assert [s["index"] for s in scores] == list(range(n))   # each pair scored once, by one rank
    np.testing.assert_allclose([s["judge:human/tuned"] for s in scores], [s["judge:human/tuned"] for s in ref], atol=0.05)


def test_resume_generates_only_missing_images(round_trip, tmp):
    out = str(tmp / "resume")
    shutil.copytree(os.path.join(round_trip, "base"), os.path.join(out, "base"))
    gone = sorted(f for f in os.listdir(os.path.join(out, "base")) if f.endswith(".png"))[1::3]
    before = {f: pixels(os.path.join(out, "base", f)) for f in gone}
    for f in gone:
        os.remove(os.path.join(out, "base", f))
    argv = ["--model", "tiny", "--num-prompts", str(N_PROMPTS), "--seeds-per-prompt", str(SEEDS), "--out", out]
    sample.main(sample.get_config(argv=argv + ["--resume"]))
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert log[-1]["generated"] == len(gone) and log[-1]["images"] == N_PROMPTS * SEEDS
    for f in gone:
        assert np.abs(pixels(os.path.join(out, "base", f)) - before[f]).max() <= 2
    with pytest.raises(SystemExit, match="--resume"):   # other settings: refuse to mix images
        sample.main(sample.get_config(argv=argv + ["--resume", "--guidance", "7.5"]))


# ============================================================================ bench.py: speed and memory (tiny mode)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny():
    """Both tiny worlds with what the phases need (K = 2 children), and a batch of 2 prompts."""
    cfg = bench.get_config(["--tiny", "--K", "2", "--iter_batches", ""])   # "": lpo.py's own per-GPU batches
    out = {}
    for name in ("tiny", "tiny-xl"):
        torch.manual_seed(0)
        m = bench.load_lpo_models(name, cfg, CPU)
        out[name] = (m, bench.make_batch(m, 2, seed=1), bench.PixelReward(m, cfg))
    return out


def test_full_size_networks_are_the_published_architectures():
    """Parameter counts of the real checkpoints (SD1.5 / SDXL U-Net, SD VAE, CLIP-L, OpenCLIP bigG text
    tower with projection, OpenCLIP ViT-H/14 image tower with projection), built on the meta device."""
    from diffusers import AutoencoderKL
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    from lrm_model import LatentRewardModel
    n = lambda mod: sum(p.numel() for p in mod.parameters())
    meta = torch.device("meta")
    sd, xl = bench.full_size("sd15", meta), bench.full_size("sdxl", meta)
    assert n(sd.unet) == 859_520_964 and n(xl.unet) == 2_567_463_684
    assert [n(e) for e in sd.encoders] == [123_060_480] and [n(e) for e in xl.encoders] == [123_060_480, 694_659_840]
    with meta:
        assert n(AutoencoderKL.from_config(sd.vae_config)) == 83_653_863
        assert n(CLIPVisionModelWithProjection(CLIPVisionConfig(**bench.VIT_H))) == 632_076_800
        widths = [LatentRewardModel(m.unet, m.encoders, m.tokenizers, dict(resolution=r, g=7.5)).visual_projection
                  for m, r in ((sd, 512), (xl, 1024))]
    assert [(w.in_features, w.out_features) for w in widths] == [(4800, 768), (3520, 1280)]  # SPEC section 1
    assert sd.vae_config["scaling_factor"] == 0.18215 and xl.vae_config["scaling_factor"] == 0.13025
    assert sd.tokenizers[0].model_max_length == 77 and not sd.zero_uncond and xl.zero_uncond


def test_cfg_condition_matches_diffusers_pipelines(tiny):
    """[uncond; cond] as StableDiffusion(XL)Pipeline.encode_prompt builds it (SDXL: zeros, real time_ids)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    prompts = ["a red circle", "a blue square"]
    m, _, px = tiny["tiny"]
    pipe = StableDiffusionPipeline(vae=px.vae, text_encoder=m.encoders[0], tokenizer=m.tokenizers[0], unet=m.unet,
                                   scheduler=m.scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    c, u = pipe.encode_prompt(prompts, CPU, 1, True)
    got = bench.cfg_condition(m, prompts)
    torch.testing.assert_close(got["encoder_hidden_states"], torch.cat([u, c]))
    m, _, px = tiny["tiny-xl"]
    pipe = StableDiffusionXLPipeline(vae=px.vae, text_encoder=m.encoders[0], text_encoder_2=m.encoders[1],
                                     tokenizer=m.tokenizers[0], tokenizer_2=m.tokenizers[1], unet=m.unet,
                                     scheduler=m.scheduler, force_zeros_for_empty_prompt=True)
    c, u, pc, pu = pipe.encode_prompt(prompts, device=CPU, do_classifier_free_guidance=True)
    got = bench.cfg_condition(m, prompts)
    assert u.abs().sum() == 0 and pu.abs().sum() == 0   # the oracle really is SDXL's zero uncond
    torch.testing.assert_close(got["encoder_hidden_states"], torch.cat([u, c]))
    torch.testing.assert_close(got["added_cond_kwargs"]["text_embeds"], torch.cat([pu, pc]))
    assert got["added_cond_kwargs"]["time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]] * 4


@pytest.mark.parametrize("name", ["tiny", "tiny-xl"])
def test_schedule_conditioning_and_pixel_reward_match_oracles(tiny, name):
    """The schedule and CFG conditioning equal lpo.load_policy's; the batched pixel reward equals a
    per-child oracle: two separate U-Net calls, guidance 5, DDIMScheduler.step's pred_original_sample,
    VAE decode, image reward. A mix-up of children, prompts or noise levels fails here."""
    m, b, px = tiny[name]
    lcfg = lpo.Config(**{**vars(m.lpo)})
    _, encode, sch = lpo.load_policy(lcfg, CPU, torch.float32)
    for k in ("ts", "ts_prev", "ths", "acp"):
        torch.testing.assert_close(getattr(m.sch, k), getattr(sch, k), check_dtype=False)
    assert m.sch.latent == sch.latent == 8
    want, got = encode(b.prompts), bench.cfg_condition(m, b.prompts)
    torch.testing.assert_close(got, want)

    prompts = [p for p in b.prompts for _ in range(m.lpo.k)]                       # child i <- prompt i // K
    kids = torch.randn(len(prompts), 4, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([451, 451, 1, 951])[:len(prompts)]                            # each child its own level
    got = px.score(kids, t, text=px.encode_text(prompts))
    sched = bench.DDIMScheduler.from_config(m.scheduler.config)
    sched.set_timesteps(20)
    for i, p in enumerate(prompts):
        c = bench.cfg_condition(m, [p])
        halves = [{k: (v.chunk(2)[j] if torch.is_tensor(v) else {a: w.chunk(2)[j] for a, w in v.items()})
                   for k, v in c.items()} for j in (0, 1)]
        with torch.no_grad():
            e_u, e_c = (m.unet(kids[i:i + 1], t[i], **h).sample for h in halves)
            x0 = sched.step(e_u + 5.0 * (e_c - e_u), int(t[i]), kids[i:i + 1]).pred_original_sample
            want = px.reward(px.vae.decode(x0 / px.vae.config.scaling_factor).sample, px.encode_text(prompts)["emb"][i:i + 1])
        torch.testing.assert_close(got[i:i + 1], want, atol=1e-4, rtol=1e-4)
    secs = bench.sampling_pass(m, b, m.lrm)                                        # lpo.sample_tuples, as run
    assert set(secs) == {"sample", "score"} and min(secs.values()) > 0


def test_classic_attention_setting_changes_kernels_not_results(tiny):
    """--attn classic puts matmul + softmax attention in every U-Net, VAE and image-tower layer; the
    outputs equal SDPA's, so the bench's settings trade speed, never what is computed."""
    import copy
    m, b, px = tiny["tiny-xl"]
    g = torch.Generator().manual_seed(3)
    x, t, img = torch.randn(4, 4, 8, 8, generator=g), torch.tensor([951, 451, 451, 1]), torch.rand(2, 3, 32, 32, generator=g)
    cond = bench.cfg_condition(m, b.prompts)                                          # 4 rows: [uncond; cond]
    run = lambda unet, vae, vit: (unet(x, t, **cond).sample, vae.decode(x).sample,   # noqa: E731
                                  vit(pixel_values=img).image_embeds)
    with torch.no_grad():
        want = run(m.unet, px.vae, px.vit)
        mods = [copy.deepcopy(mod) for mod in (m.unet, px.vae, px.vit)]
        bench.speedups(bench.get_config(["--tiny", "--attn", "classic"]), *mods)
        got = run(*mods)
    assert {type(p).__name__ for mod in mods[:2] for p in mod.attn_processors.values()} == {"AttnProcessor"}
    assert {type(p).__name__ for p in m.unet.attn_processors.values()} == {"AttnProcessor2_0"}   # SDPA: the default
    assert mods[2].config._attn_implementation == "eager" and px.vit.config._attn_implementation == "sdpa"
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, rtol=1e-4, atol=1e-5)


def test_predict_x0_and_dpo_loss_hand_values():
    sched = bench.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    x, e = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    sched.set_timesteps(20)
    want = sched.step(e, 451, x).pred_original_sample
    torch.testing.assert_close(bench.predict_x0(x, e, sched.alphas_cumprod[451]), want)
    # e_w = 0.1, e_l = 0.3 vs reference 0.2, 0.2, beta 10: -log sigmoid(-5 * (-0.2)) = log(1 + e^-1)
    err = torch.tensor([0.1, 0.3], requires_grad=True)
    loss = bench.diffusion_dpo_loss(err, torch.tensor([0.2, 0.2]), 10.0)
    assert abs(loss.item() - math.log1p(math.exp(-1))) < 1e-6
    loss.backward()
    assert err.grad[0] > 0 > err.grad[1]   # lowering the winner's error (raising the loser's) lowers the loss
    same = bench.diffusion_dpo_loss(torch.tensor([0.5, 0.1]), torch.tensor([0.5, 0.1]), 5000.0)
    assert abs(same.item() - math.log(2)) < 1e-6


def test_lpo_update_trains_the_lora_toward_the_winner_and_control(tiny):
    """Repeated bench updates on one pair raise log r_w - log r_l; with winner and loser swapped
    (control) it falls. Only LoRA weights move; the reference (LoRA off) stays the base."""
    from types import SimpleNamespace
    m, b, _ = tiny["tiny"]
    p = lpo.PRESETS["tiny"]   # the bench measures lpo.py's own settings, read from lpo.py
    assert (m.lpo.sample_batch, m.lpo.train_batch, m.lpo.lr, len(m.lora)) == \
        (p["sample_batch"], p["train_batch"], p["lr"], 2 * 4 * sum(n.endswith(".to_q") for n, _ in m.unet.named_modules()))
    base = {k: v.clone() for k, v in m.unet.state_dict().items() if "lora" not in k}
    lora0 = [p.detach().clone() for p in m.lora]

    def margin(bb):
        with torch.no_grad():
            mean, std = lpo.ddim_step(bench.cfg_eps(m.unet, bb.x_t, bench.T, bb.cond, 5.0), bb.x_t, bench.T,
                                        bench.T_PREV, m.sch.acp, 1.0)
            m.unet.disable_adapters()
            ref, _ = lpo.ddim_step(bench.cfg_eps(m.unet, bb.x_t, bench.T, bb.cond, 5.0), bb.x_t, bench.T,
                                     bench.T_PREV, m.sch.acp, 1.0)
            m.unet.enable_adapters()
        lp = [lpo.step_logprob(x, mu, std).mean().item() for mu in (mean, ref) for x in (bb.x_w, bb.x_l)]
        return (lp[0] - lp[2]) - (lp[1] - lp[3])

    # two children of the parent as winner and loser: small log-ratios, inside the clip band
    with torch.no_grad():
        mean, std = lpo.ddim_step(bench.cfg_eps(m.unet, b.x_t, bench.T, b.cond, 5.0), b.x_t, bench.T,
                                  bench.T_PREV, m.sch.acp, 1.0)
    kids = mean[:, None] + std[:, None] * torch.randn(b.B, 2, *b.x_t.shape[1:], generator=torch.Generator().manual_seed(3))
    fwd = SimpleNamespace(**{**vars(b), "x_w": kids[:, 0], "x_l": kids[:, 1]})
    rev = SimpleNamespace(**{**vars(b), "x_w": kids[:, 1], "x_l": kids[:, 0]})
    results = []
    for bb in (fwd, rev):
        for p, p0 in zip(m.lora, lora0):
            p.data.copy_(p0)
        m.opt.state.clear()
        for _ in range(2):
            bench.lpo_update(m, bb)
        results.append(margin(bb))
    assert results[0] > 0 and results[1] > 0   # each run learned its own labels: swapped labels, swapped preference
    assert any((p - p0).abs().max() > 0 for p, p0 in zip(m.lora, lora0))
    assert all(torch.equal(v, m.unet.state_dict()[k]) for k, v in base.items())


def test_dpo_update_trains_the_whole_unet_not_the_reference(tiny):
    m, b, _ = tiny["tiny-xl"]
    ref = {k: v.clone() for k, v in m.unet.state_dict().items()}
    policy, opt = bench.make_dpo(m, "tiny-xl")
    assert type(opt).__name__ == "Adafactor" and policy.is_gradient_checkpointing   # Diffusion-DPO's SDXL recipe
    before = [p.detach().clone() for p in policy.parameters()]
    bench.dpo_update(m, policy, opt, b)
    moved = [not torch.equal(p, p0) for p, p0 in zip(policy.parameters(), before)]
    assert sum(moved) / len(moved) > 0.9       # the full U-Net is trained, not an adapter
    assert all(torch.equal(v, m.unet.state_dict()[k]) for k, v in ref.items())
    assert type(bench.make_dpo(tiny["tiny"][0], "tiny")[1]).__name__ == "AdamW"


def test_timed_reports_the_median_after_warmup():
    calls = []
    sleeps = iter([0.5, 0.02, 0.4, 0.12])      # warm-up, then the timed runs

    def fn():
        calls.append(1)
        s = next(sleeps)
        time.sleep(s)
        return {"part": s / 2}                 # what the phase reports about itself: medians per key
    med, peak, split = bench.timed(fn, CPU, warmup=1, repeats=3)
    assert len(calls) == 4 and peak is None and split == {"part": 0.06}
    assert 0.115 < med < 0.17                  # median 0.12; the mean 0.18, or with the warm-up 0.26, fail


def test_bad_input_fails_in_one_line(monkeypatch, capsys):
    for argv, words in ((["--model", "sd21"], "--model"), (["--K", "1"], "--K"), (["--lrm_dtype", "fp8"], "fp8"),
                        (["--grad_ckpt", "maybe"], "--grad_ckpt"), (["--attn", "flash"], "--attn"),
                        (["--iter_batches", "4"], "--iter_batches"), (["--resolution", "100"], "--resolution")):
        with pytest.raises(SystemExit) as e:
            bench.get_config(argv + ["--device", "cpu"])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and words in err[-1] and err[-1].startswith("bench.py: error:"), err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        bench.get_config(["--model", "sdxl"])
    assert "--tiny" in capsys.readouterr().err


def test_tiny_run_writes_table_json_log_and_resumes(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "bench")
    argv = ["--model", "tiny-xl", "--device", "cpu", "--warmup", "0", "--repeats", "1", "--out", out]
    res = bench.main(bench.get_config(argv + ["--iter_batches", "2,3"]))   # the SDXL-shaped path; tiny: above
    printed = capsys.readouterr().out
    assert "ratio pixel / latent, per step" in printed and "tiny-xl 32px" in printed
    data = json.load(open(os.path.join(out, "bench.json")))
    assert set(data["results"]) == {"tiny-xl"} and data["table"] in printed
    env = data["environment"]
    assert env["torch"] == torch.__version__ and env["settings"]["K"] == 4 and env["device"].startswith("CPU")
    for name, r in data["results"].items():
        for k in ("lpo_step", "pixel_step", "x0_pred", "vae_decode", "image_reward", "lpo_update", "dpo_update",
                  "lpo_iteration", "lpo_step_sample", "lpo_step_score", "pixel_step_sample", "pixel_step_score"):
            assert r[k + "_s"] > 0 and r.get(k + "_peak_gb") is None and r.get(k + "_reserved_gb") is None, (name, k)   # CUDA only
        # lpo.py's own split of a step adds up to (a little less than) the whole step
        assert 0.5 < (r["lpo_step_sample_s"] + r["lpo_step_score_s"]) / r["lpo_step_s"] <= 1.0
        assert r["ratio_step"] == pytest.approx(r["pixel_step_s"] / r["lpo_step_s"])
        assert r["ratio_dpo"] == pytest.approx(r["dpo_update_s"] / r["lpo_update_s"])
        assert r["iteration_batches"] == "2x4 / 3" and "lpo_iteration_reserved_gb" in r
    rows = [json.loads(line) for line in open(os.path.join(out, "bench.jsonl"))]
    assert len(rows) == 8 and {r["phase"] for r in rows} >= {"lpo_step", "pixel_step", "dpo_update"}
    # --resume measures nothing already in bench.json
    monkeypatch.setattr(bench, "bench_model", lambda *a: pytest.fail("re-measured a model"))
    again = bench.main(bench.get_config(argv + ["--iter_batches", "2,3", "--resume"]))
    assert again == res
    with pytest.raises(SystemExit, match="other settings"):   # never one table of two configurations
        bench.main(bench.get_config(argv + ["--iter_batches", "2,3", "--attn", "classic", "--resume"]))
