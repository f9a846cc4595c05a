"""Prompts and Pick-a-Pic pairs: the one reader of each. open_split opens a split of any source the
stages take (a table file, a save_to_disk folder, parquet files named by split, a hub id);
load_prompts reads the captions lpo.py trains on and sample.py / eval.py sample; open_pairs and
load_pairs read the preference pairs of mpcf.py and lrm.py, decode_image their images. Bad input
raises ValueError naming the source (load_prompts: one `fail` line)."""
import glob
import io
import itertools
import json
import os
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from datasets import disable_progress_bars, load_dataset, load_from_disk
from PIL import Image

from runs import fail, first_line, warn

ROOT = os.path.dirname(os.path.abspath(__file__))
# a table file's extension -> the datasets builder that reads it
TABLES = {"csv": "csv", "tsv": "csv", "parquet": "parquet", "json": "json", "jsonl": "json",
          "arrow": "arrow"}
# a folder's parquet files of a split: those of the first of these patterns that matches
SPLIT_FILES = ("{}.parquet", "{}-*.parquet", "{}/*.parquet", "data/{}.parquet", "data/{}-*.parquet")
CAPTION_COLUMNS = ("caption", "prompt", "Prompt", "text")  # PartiPrompts: a .tsv with "Prompt"
PAIR_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1", "has_label", "are_different")
NUMBER = ("float", "int", "bool")
MAX_CAPTION = 2000  # characters: more than any text encoder here reads (T5: 256 tokens)
UNDECODABLE = 0.01  # the share of pairs with an undecodable image that stops lrm.py and mpcf.py
# dtypes a Pick-a-Pic column may hold (the others: any)
KINDS = dict(caption=("string", "large_string"), label_0=NUMBER, label_1=NUMBER,
             num_example_per_prompt=NUMBER)


def error_line(error):
    """An exception as `Type: its first line` (200 characters at most), for a load error."""
    return f"{type(error).__name__}: {first_line(error)[:200]}"


def local_path(path):
    """tiny/...: the embedded tiny world, found from any working folder."""
    return os.path.join(ROOT, path) if path.startswith("tiny/") else path


def open_split(data, split, **options):
    """One split of `data`: a table file (its only split), a save_to_disk folder, a folder of
    parquet files named by split (train.parquet, train-*.parquet, train/*.parquet, the same under
    data/) or what datasets.load_dataset reads with the split names (a hub id, another folder).
    `options` (streaming, columns) go to load_dataset."""
    disable_progress_bars()
    local = local_path(data)
    found = [sorted(glob.glob(os.path.join(local, name.format(split)))) for name in SPLIT_FILES]
    files = [local] if os.path.isfile(local) else next(filter(None, found), [])  # the first match
    extension = files[0].rsplit(".", 1)[-1].lower() if files else ""
    if files and extension not in TABLES:
        raise ValueError(f"{data}: unknown file type .{extension} (tables: {' '.join(TABLES)})")
    if extension == "tsv":
        options["delimiter"] = "\t"
    if os.path.isfile(os.path.join(local, "dataset_dict.json")):  # save_to_disk: a folder a split
        local = os.path.join(local, split)
    try:
        if os.path.isfile(os.path.join(local, "state.json")):  # save_to_disk's Dataset
            return load_from_disk(local)
        if files:
            return load_dataset(TABLES[extension], data_files=files, split="train", **options)
        return load_dataset(local, split=split, **options)
    except Exception as error:  # datasets says no more than that for parquet files without rows
        if extension == "parquet" and not sum(pq.read_metadata(path).num_rows for path in files):
            raise ValueError(f"dataset {data!r} split {split!r} has no rows") from None
        raise ValueError(f"dataset {data!r} has no readable split {split!r} "
                         f"({error_line(error)})") from None


# ----------------------------------------------------------------------------- prompts
def read_captions(source, split):
    """The caption cells of a prompt source: the lines of a .txt file, or the caption / prompt /
    Prompt / text column of a table file (.json: a list of strings, HPDv2's benchmark prompts, or
    of {"caption": ...}, the official 4k_training_prompts.json) or of a dataset split, streamed."""
    if source.lower().endswith(".txt"):
        with open(source) as text_file:
            return [line.strip() for line in text_file]
    rows = open_split(source, split, streaming=True)
    names = rows.column_names or list(next(iter(rows), {}))  # json, csv: known once a row is read
    column = next((name for name in CAPTION_COLUMNS if name in names), None)
    if column is None:
        raise ValueError(f"no `caption` column (nor prompt, Prompt, text) in {names}")
    if rows.info.builder_name == "parquet":
        # then it reads that column alone: with its images Pick-a-Pic v1 is ~190 GB
        rows = open_split(source, split, streaming=True, columns=[column])
    return (row[column] for row in rows.select_columns([column]))


def texts(cells, strip, cut):
    """The non-blank cells (a missing one is blank), stripped or as written, cut to MAX_CAPTION
    characters (counted in cut[0]); a number refused."""
    for cell in cells:
        if not isinstance(cell, (str, type(None))):
            raise ValueError(f"the prompts must be text, found {type(cell).__name__} {cell!r:.80}")
        if cell and cell.strip():
            cut[0] += len(cell) > MAX_CAPTION
            yield (cell.strip() if strip else cell)[:MAX_CAPTION]


def load_prompts(source, split="train", n=0, unique=True, seed=None, strip=False):
    """n captions of `source` (0: all): the first n rows (unique=False: lpo.py's tiny preset), the
    first n distinct ones (seed None: sample.py, in first-seen order) or a seeded uniform sample of
    n distinct ones kept in the order of the data (lpo.py: the official 4,000 training prompts).
    strip: without the spaces around each caption (lpo.py), else as written (sample.py's folders
    record them so)."""
    cut = [0]  # captions cut to MAX_CAPTION, said once
    try:
        captions = texts(read_captions(source, split), strip, cut)
        chosen = list(dict.fromkeys(captions) if unique else itertools.islice(captions, n or None))
        if unique and seed is not None:
            size = min(n, len(chosen))
            picks = np.random.default_rng(seed).choice(len(chosen), size, replace=False)
            chosen = [chosen[i] for i in sorted(picks)]  # in the order of the data
    except (OSError, ValueError) as error:
        fail(f"--prompts {source} (split {split}): cannot read prompts from it "
             f"({error_line(error)})")
    if not chosen:
        fail(f"--prompts {source} (split {split}): no prompts in it (every line or row is blank)")
    if cut[0]:
        warn(f"--prompts {source}: {cut[0]} captions longer than {MAX_CAPTION} characters, cut to "
             "it (the text encoders read fewer)")
    return chosen[:n or None]


# ----------------------------------------------------------------------------- Pick-a-Pic pairs
def open_pairs(data, split, columns=PAIR_COLUMNS):
    """A Pick-a-Pic-schema split with `columns`, holding what they must (captions text, labels
    numbers); images stay as stored. ValueError names what is missing or wrong."""
    pairs = open_split(data, split)
    for column in columns:
        if column not in pairs.features:
            raise ValueError(f"dataset {data!r} split {split!r} lacks the Pick-a-Pic column "
                             f"{column!r} (it has {pairs.column_names})")
        kind = getattr(pairs.features[column], "dtype", "")
        if not kind.startswith(KINDS.get(column, kind)):
            raise ValueError(f"dataset {data!r} split {split!r}: column {column!r} holds "
                             f"{pairs.features[column]}, not {' / '.join(KINDS[column])}")
    return pairs


def read_keep(keep, n_rows):
    """mpcf.py's kept rows, sorted: a JSON list of row indices, or a parquet / CSV table with an
    `index` column; rows of the split as published, so a row outside it is refused."""
    path = local_path(keep)
    try:
        if path.endswith(".json"):
            with open(path) as keep_file:
                rows = json.load(keep_file)
        else:
            read = pd.read_parquet if path.endswith(".parquet") else pd.read_csv
            rows = read(path)["index"].tolist()
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"--keep {keep}: not a list of row indices ({error!r})") from None
    wrong = ([row for row in rows if not isinstance(row, int) or not 0 <= row < n_rows]
             if isinstance(rows, list) else [rows])
    if wrong:
        raise ValueError(f"--keep {keep}: expected a list of the train split's row indices "
                         f"0..{n_rows - 1}, found {wrong[0]!r:.80} (of another dataset?)")
    return sorted(rows)


def pair_flags(pairs, data, split):
    """The one rule every stage judges a Pick-a-Pic split by, numpy (N,) flags: labelled
    (has_label, finite labels summing to > 0), different (two different images), usable
    (labelled, different, a caption), is_tie (label_0 == label_1). A split without a usable
    pair: ValueError with the counts."""
    table = pairs.with_format("numpy", columns=["label_0", "label_1", "has_label",
                                                "are_different"])[:]
    label_0, label_1 = (table[name].astype(float) for name in ("label_0", "label_1"))
    total = label_0 + label_1
    labelled = table["has_label"].astype(bool) & np.isfinite(total) & (total > 0)
    different = table["are_different"].astype(bool)
    captioned = np.array([bool(caption and caption.strip()) for caption in pairs["caption"]], bool)
    usable = labelled & different & captioned
    if not usable.any():
        raise ValueError(f"dataset {data!r} split {split!r}: no usable pair in its {len(pairs)} "
                         f"rows ({(~labelled).sum()} without labels or with non-finite ones, "
                         f"{(~different).sum()} of identical images, {(~captioned).sum()} with a "
                         "blank caption)")
    return SimpleNamespace(labelled=labelled, different=different, usable=usable,
                           is_tie=label_0 == label_1)


def load_pairs(data, split, keep=""):
    """lrm.py's pairs: a split restricted to mpcf.py's kept rows, then to its usable ones
    (pair_flags). Images stay JPEG bytes."""
    local = local_path(data)
    if os.path.isfile(local) or os.path.isfile(os.path.join(local, "state.json")):
        # a table file, a saved Dataset: their one split would be the held-out ones too
        raise ValueError(f"dataset {data!r} has no readable split {split!r}: it holds one, "
                         "lrm.py reads train, validation_unique and test_unique")
    pairs = open_pairs(data, split, PAIR_COLUMNS + ("num_example_per_prompt",))
    if keep:  # row indices into the split as published
        pairs = pairs.select(read_keep(keep, len(pairs)))
    return pairs.select(np.flatnonzero(pair_flags(pairs, data, split).usable))


def check_decodable(undecodable, seen, data):
    """The one rule on undecodable images, judged on totals: more than UNDECODABLE of the pairs
    seen stops the stage in one line."""
    if undecodable > UNDECODABLE * seen:
        fail(f"{data}: {undecodable} of {seen} pairs had an undecodable image (more than "
             f"{UNDECODABLE:.0%}): check the image columns")


def decode_image(cell):
    """A Pick-a-Pic image cell (bytes, {"bytes": ...} or PIL) -> RGB PIL, or None if broken."""
    if isinstance(cell, Image.Image):
        return cell.convert("RGB")
    if isinstance(cell, dict):
        cell = cell["bytes"]
    try:
        return Image.open(io.BytesIO(cell)).convert("RGB")
    except (OSError, ValueError, TypeError):  # a broken row must not stop a day-long run: count it
        return None
