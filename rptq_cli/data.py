"""Text data for calibration and evaluation: dataset names or local files -> token windows.

Follows the GPTQ data protocol that the official RPTQ code uses (``datautils.py`` of hahnyuan/RPTQ4LLM):
the same splits, the same joins, and the same random draws, so that a seed picks the same windows as the
official code does for the same tokenization. Randomness comes from a local ``random.Random(seed)``, which
draws exactly what the official ``random.seed(seed); random.randint(...)`` draws, without global state.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from rptq_cli.errors import RptqError, first_line


@dataclass(frozen=True)
class HubSplit:
    """Where one split of a Hugging Face dataset lives and which field holds its text."""

    path: str
    name: str | None
    split: str
    field: str
    data_files: dict[str, str] | None = None

    def describe(self) -> str:
        details = [self.name] if self.name else list((self.data_files or {}).values())
        return f"{self.path} ({', '.join(details + [self.split])})"


# Canonical hub ids: the short names of the official code ("wikitext", "ptb_text_only") are redirects, and
# its c4 config "allenai--c4" is rejected by recent `datasets`, so c4 is addressed by data file alone.
WIKITEXT2_TRAIN = HubSplit("Salesforce/wikitext", "wikitext-2-raw-v1", "train", "text")
WIKITEXT2_TEST = HubSplit("Salesforce/wikitext", "wikitext-2-raw-v1", "test", "text")
PTB_TRAIN = HubSplit("ptb-text-only/ptb_text_only", "penn_treebank", "train", "sentence")
PTB_VALIDATION = HubSplit("ptb-text-only/ptb_text_only", "penn_treebank", "validation", "sentence")
C4_TRAIN = HubSplit("allenai/c4", None, "train", "text", {"train": "en/c4-train.00000-of-01024.json.gz"})
C4_VALIDATION = HubSplit(
    "allenai/c4", None, "validation", "text", {"validation": "en/c4-validation.00000-of-00008.json.gz"}
)

CALIBRATION_DATASETS = ("wikitext2", "ptb", "c4", "mix")
# Calibration sets that are one long text (rows joined), as opposed to c4's separate documents.
STREAM_TRAIN_SPLITS = {"wikitext2": WIKITEXT2_TRAIN, "ptb": PTB_TRAIN}
EVAL_TASKS = ("wikitext", "ptb", "c4")
MIX_PARTS = ("wikitext2", "ptb", "c4")

# GPTQ's "old c4" evaluation: 256 windows from random validation documents, always drawn with seed 0.
C4_EVAL_WINDOWS = 256
C4_EVAL_SEED = 0
# A document search with this many short draws in a row is hopeless (seqlen too long for the corpus);
# with real c4 and seqlen 2048 a few percent of documents qualify, so this never fires there.
MAX_CONSECUTIVE_SHORT_DOCUMENTS = 10_000

# wikitext and ptb rows are joined as the official code joins them (for ptb train too: GPTQ's "ptb",
# not the later "ptb-new" that joins with " ").
ROW_SEPARATOR = "\n\n"


# ----------------------------------------------------------------------------------------------------
# Calibration


def calibration_windows(
    tokenizer, *, dataset: str | None, path: str | None, nsamples: int, seqlen: int, seed: int
) -> tuple[torch.LongTensor, dict]:
    """Draw ``nsamples`` random windows of ``seqlen`` tokens from a named dataset or a local file.

    Exactly one of ``dataset`` (a name in CALIBRATION_DATASETS) and ``path`` (a .txt, .jsonl or .parquet
    file; other suffixes are read as plain text) is given. Returns the windows, LongTensor
    [nsamples, seqlen], and their provenance: source, sha256 of the text used, nsamples, seqlen, seed.
    """
    if nsamples < 1 or seqlen < 1:
        raise RptqError(f"nsamples ({nsamples}) and seqlen ({seqlen}) must be positive; pass --nsamples N --seqlen L")
    if (dataset is None) == (path is None):
        raise RptqError(
            "give one calibration source, not both or neither: --calib-dataset NAME or --calib-path FILE"
        )
    if dataset is not None and dataset not in CALIBRATION_DATASETS:
        raise RptqError(
            f"unknown calibration dataset {dataset!r}; use one of {', '.join(CALIBRATION_DATASETS)} "
            "or pass --calib-path FILE"
        )

    if path is not None:
        text = read_text(path)
        source = f"file:{Path(path).resolve()}"
        windows = _random_windows(_tokenize(tokenizer, text), nsamples, seqlen, random.Random(seed), source)
        text_hash = _sha256(text)
    elif dataset == "mix":
        windows, text_hash = _mix_windows(tokenizer, nsamples, seqlen, seed)
        source = dataset
    else:
        windows, text_hash = _named_windows(dataset, tokenizer, nsamples, seqlen, seed)
        source = dataset

    provenance = {"source": source, "sha256": text_hash, "nsamples": nsamples, "seqlen": seqlen, "seed": seed}
    return windows, provenance


def _named_windows(dataset: str, tokenizer, nsamples: int, seqlen: int, seed: int) -> tuple[torch.Tensor, str]:
    """Windows and text hash from one named training split, drawn with its own ``Random(seed)``."""
    rng = random.Random(seed)
    if dataset == "c4":
        windows, used_docs = _document_windows(_hub_texts(C4_TRAIN), tokenizer, nsamples, seqlen, rng, dataset)
        return windows, _sha256(ROW_SEPARATOR.join(used_docs))
    text = ROW_SEPARATOR.join(_hub_texts(STREAM_TRAIN_SPLITS[dataset]))
    return _random_windows(_tokenize(tokenizer, text), nsamples, seqlen, rng, dataset), _sha256(text)


def _mix_windows(tokenizer, nsamples: int, seqlen: int, seed: int) -> tuple[torch.Tensor, str]:
    """``mix``: a third from each of wikitext2, ptb and c4, as the official code does.

    The official code takes ``nsamples // 3`` from each and leaves the remainder as all-zero samples
    (126 real + 2 zero with the default 128); here the first parts take one extra window each, so
    exactly ``nsamples`` real windows come out. Each part is drawn with ``seed``, as officially.
    """
    counts = [nsamples // len(MIX_PARTS) + (i < nsamples % len(MIX_PARTS)) for i in range(len(MIX_PARTS))]
    windows, hashes = [], []
    for part, count in zip(MIX_PARTS, counts):
        if count:
            part_windows, part_hash = _named_windows(part, tokenizer, count, seqlen, seed)
            windows.append(part_windows)
            hashes.append(f"{part}:{count}:{part_hash}")
    return torch.cat(windows), _sha256("\n".join(hashes))


# ----------------------------------------------------------------------------------------------------
# Evaluation


def eval_tokens(task: str, tokenizer, *, seqlen: int, data_path: str | None = None) -> torch.LongTensor:
    """The evaluation token stream of ``task`` (one of EVAL_TASKS) by the GPTQ protocol, LongTensor [1, N].

    wikitext: wikitext-2-raw-v1 test rows joined with "\\n\\n"; ptb: ptb_text_only validation sentences
    joined with "\\n\\n"; c4: 256 windows of ``seqlen`` from random validation documents longer than
    ``seqlen`` tokens (``Random(0)``), concatenated. With ``data_path`` the task's text is that file's text,
    tokenized once; for c4 the 256 windows are then drawn from it if it has that many tokens, else the whole
    text is used. The perplexity windows are cut from the result by the caller.
    """
    if task not in EVAL_TASKS:
        raise RptqError(f"unknown evaluation task {task!r}; use one of {', '.join(EVAL_TASKS)}")

    if data_path is not None:
        source = f"file:{Path(data_path).resolve()}"
        tokens = _tokenize(tokenizer, read_text(data_path))
        if task == "c4" and tokens.numel() > C4_EVAL_WINDOWS * seqlen:
            rng = random.Random(C4_EVAL_SEED)
            tokens = _random_windows(tokens, C4_EVAL_WINDOWS, seqlen, rng, source).reshape(-1)
        return tokens.unsqueeze(0)

    if task == "wikitext":
        tokens = _tokenize(tokenizer, ROW_SEPARATOR.join(_hub_texts(WIKITEXT2_TEST)))
    elif task == "ptb":
        tokens = _tokenize(tokenizer, ROW_SEPARATOR.join(_hub_texts(PTB_VALIDATION)))
    else:
        rng = random.Random(C4_EVAL_SEED)
        windows, _ = _document_windows(_hub_texts(C4_VALIDATION), tokenizer, C4_EVAL_WINDOWS, seqlen, rng, task)
        tokens = windows.reshape(-1)
    return tokens.unsqueeze(0)


# ----------------------------------------------------------------------------------------------------
# Window sampling


def _random_windows(tokens: torch.Tensor, count: int, seqlen: int, rng: random.Random, source: str) -> torch.Tensor:
    """``count`` windows of ``seqlen`` at random starts of a 1-D token stream, LongTensor [count, seqlen].

    The start range ``[0, n - seqlen - 1]`` is the official one (it never reaches the last token); keeping
    it keeps the draws identical to the official code's for the same seed.
    """
    n = tokens.numel()
    if n <= seqlen:
        raise RptqError(
            f"{source} has {n} tokens, fewer than the {seqlen + 1} that one window of {seqlen} needs; "
            "use a longer file or a smaller --seqlen"
        )
    starts = [rng.randint(0, n - seqlen - 1) for _ in range(count)]
    return torch.stack([tokens[start : start + seqlen] for start in starts])


def _document_windows(
    docs: Sequence[str], tokenizer, count: int, seqlen: int, rng: random.Random, source: str
) -> tuple[torch.Tensor, list[str]]:
    """GPTQ's c4 sampling: per window, draw random documents until one is long enough, then a random
    window of it. Returns the windows [count, seqlen] and the documents they came from.

    "Long enough" is more than ``seqlen`` tokens: the official ``>= seqlen`` crashes on a document of
    exactly ``seqlen`` tokens, so every run it completes draws the same windows as this.
    """
    windows, used_docs = [], []
    misses = 0
    while len(windows) < count:
        doc = docs[rng.randint(0, len(docs) - 1)]
        tokens = _tokenize(tokenizer, doc)
        if tokens.numel() > seqlen:
            start = rng.randint(0, tokens.numel() - seqlen - 1)
            windows.append(tokens[start : start + seqlen])
            used_docs.append(doc)
            misses = 0
            continue
        misses += 1
        if misses == MAX_CONSECUTIVE_SHORT_DOCUMENTS:
            raise RptqError(
                f"{source}: {misses} random documents in a row are not longer than {seqlen} tokens; "
                "use a smaller --seqlen or a local text file"
            )
    return torch.stack(windows), used_docs


def _tokenize(tokenizer, text: str) -> torch.Tensor:
    """The token ids of ``text`` as a 1-D LongTensor, with the tokenizer's default special tokens."""
    # verbose=False: whole corpora are far longer than model_max_length, on purpose (windows are cut later).
    ids = tokenizer(text, return_tensors="pt", verbose=False)["input_ids"]
    return ids[0].to(torch.long)


# ----------------------------------------------------------------------------------------------------
# Reading text


def read_text(path: str) -> str:
    """The text of a local file: .jsonl (a "text" field per line, joined with "\\n\\n"), .parquet (a "text"
    column, joined the same way), anything else read whole as UTF-8 text (.txt, .raw, ...)."""
    file = Path(path)
    if not file.is_file():
        raise RptqError(f"data file {path} does not exist; give an existing .txt, .jsonl or .parquet file")
    readers: dict[str, Callable[[Path], Iterable[str]]] = {".jsonl": _jsonl_texts, ".parquet": _parquet_texts}
    reader = readers.get(file.suffix.lower())
    try:
        return ROW_SEPARATOR.join(reader(file)) if reader else file.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise RptqError(
            f"data file {path} is not UTF-8 text ({error.reason}); pass a .txt, .jsonl or .parquet file"
        ) from None


def _jsonl_texts(file: Path) -> list[str]:
    texts = []
    with file.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise RptqError(
                    f"{file}:{number} is not valid JSON ({error.msg}); write one JSON object per line"
                ) from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise RptqError(f'{file}:{number} has no string "text" field; write {{"text": "..."}} per line')
            texts.append(record["text"])
    return texts


def _parquet_texts(file: Path) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:  # pyarrow's errors at the boundary: a damaged or foreign file is the user's to fix
        schema = pq.read_schema(file)
        if "text" not in schema.names:
            raise RptqError(f'{file} has no "text" column (columns: {", ".join(schema.names)}); '
                            'add one holding the text')
        column_type = schema.field("text").type
        if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
            raise RptqError(f'{file}: the "text" column holds {column_type}, not strings; store the text as strings')
        column = pq.read_table(file, columns=["text"]).column("text")
    except (pa.ArrowException, OSError) as error:
        raise RptqError(f"cannot read parquet file {file} ({first_line(error)}); it is corrupted or not a parquet "
                        "file") from None
    return [text for text in column.to_pylist() if text is not None]


def _hub_texts(split: HubSplit) -> Sequence[str]:
    """The text field of every row of a hub dataset split (from the local cache when offline)."""
    import datasets

    try:
        rows = datasets.load_dataset(split.path, split.name, split=split.split, data_files=split.data_files)
    except Exception as error:  # the hub raises many types (offline, not found, gated); all mean the same here
        raise RptqError(
            f"could not load dataset {split.describe()} ({first_line(error)}); connect to the Hugging Face hub once "
            "to cache it, or give the text as a local file (--calib-path FILE to calibrate, --data-path FILE to "
            "evaluate)"
        ) from None
    return rows[split.field]


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
