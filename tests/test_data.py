"""rptq_cli.data: calibration windows and evaluation token streams (GPTQ protocol), hub datasets faked."""

import hashlib
import json
import random

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from rptq_cli import data
from rptq_cli.data import calibration_windows, eval_tokens
from rptq_cli.errors import RptqError

PARAGRAPH = (
    "The river rose slowly through the night, and by morning the low fields were under water. "
    "Farmers moved their cattle to the hills while the old bridge groaned against the current. "
    "In the town, the baker kept his ovens burning, because bread matters most when roads are closed. "
    "Children watched from the church steps as boats carried letters, medicine and news between the houses. "
    "When the water finally fell, it left a fine grey silt that made the next harvest the best in years."
)


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A small byte-level BPE that, like OPT's, prepends ``</s>`` to every text."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator([PARAGRAPH], trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 0)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="</s>", eos_token="</s>", unk_token="</s>", pad_token="</s>"
    )


TOKENIZER = make_tokenizer()


def token_ids(text: str) -> torch.Tensor:
    return torch.tensor(TOKENIZER(text)["input_ids"])


def sentences(count: int, tag: str) -> list[str]:
    """``count`` distinct short texts built from the paragraph."""
    words = PARAGRAPH.split()
    return [f"{tag} {i}: " + " ".join(words[i % 40 : i % 40 + 6]) for i in range(count)]


def is_window_of(window: torch.Tensor, stream: torch.Tensor) -> bool:
    starts = range(len(stream) - len(window) + 1)
    return any(torch.equal(stream[start : start + len(window)], window) for start in starts)


# ----------------------------------------------------------------------------------------------------
# Fake hub


class FakeHub:
    """Stands in for ``datasets.load_dataset``: small in-memory splits, and a record of what was asked."""

    def __init__(self):
        self.calls = []
        self.splits = {
            (data.WIKITEXT2_TRAIN.path, "train"): {"text": sentences(60, "wiki-train") + [""]},
            (data.WIKITEXT2_TEST.path, "test"): {"text": sentences(20, "wiki-test")},
            (data.PTB_TRAIN.path, "train"): {"sentence": sentences(60, "ptb-train")},
            (data.PTB_VALIDATION.path, "validation"): {"sentence": sentences(20, "ptb-valid")},
            # c4: mostly documents too short for a window, a few long ones.
            (data.C4_TRAIN.path, "train"): {"text": sentences(30, "c4-short") + [PARAGRAPH, PARAGRAPH[::-1]]},
            (data.C4_VALIDATION.path, "validation"): {"text": sentences(30, "c4-valid-short") + [PARAGRAPH]},
        }

    def __call__(self, path, name=None, *, split, data_files=None, **kwargs):
        self.calls.append((path, name, split, data_files))
        return datasets.Dataset.from_dict(self.splits[(path, split)])


@pytest.fixture
def hub(monkeypatch) -> FakeHub:
    fake = FakeHub()
    monkeypatch.setattr(datasets, "load_dataset", fake)
    return fake


def gptq_document_windows(docs, count, seqlen, seed):
    """An independent rewrite of GPTQ's c4 loop (with ``>`` for its ``>=`` that crashes at equality)."""
    rng = random.Random(seed)
    windows = []
    for _ in range(count):
        while True:
            ids = token_ids(docs[rng.randint(0, len(docs) - 1)])
            if len(ids) > seqlen:
                break
        start = rng.randint(0, len(ids) - seqlen - 1)
        windows.append(ids[start : start + seqlen])
    return torch.stack(windows)


def gptq_stream_windows(stream, count, seqlen, seed):
    """GPTQ's wikitext2/ptb loop: random starts in [0, n - seqlen - 1]."""
    rng = random.Random(seed)
    starts = [rng.randint(0, len(stream) - seqlen - 1) for _ in range(count)]
    return torch.stack([stream[s : s + seqlen] for s in starts])


# ----------------------------------------------------------------------------------------------------
# Local files


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(PARAGRAPH * 3, encoding="utf-8")
    return path


def test_txt_windows_shape_provenance_and_draws(text_file):
    windows, provenance = calibration_windows(
        TOKENIZER, dataset=None, path=str(text_file), nsamples=5, seqlen=16, seed=3
    )

    assert windows.shape == (5, 16) and windows.dtype == torch.long
    assert provenance == {
        "source": f"file:{text_file.resolve()}",
        "sha256": hashlib.sha256((PARAGRAPH * 3).encode()).hexdigest(),
        "nsamples": 5,
        "seqlen": 16,
        "seed": 3,
    }
    assert torch.equal(windows, gptq_stream_windows(token_ids(PARAGRAPH * 3), 5, 16, seed=3))


def test_same_seed_same_windows_other_seed_other_windows(text_file):
    def draw(seed):
        return calibration_windows(TOKENIZER, dataset=None, path=str(text_file), nsamples=8, seqlen=16, seed=seed)[0]

    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))


def test_seeding_leaves_global_random_state_alone(text_file):
    random.seed(123)
    expected = random.random()
    random.seed(123)
    calibration_windows(TOKENIZER, dataset=None, path=str(text_file), nsamples=4, seqlen=16, seed=0)
    assert random.random() == expected


def test_jsonl_joins_text_fields_and_skips_blank_lines(tmp_path):
    texts = sentences(5, "doc")
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)) + "\n\n", encoding="utf-8")

    tokens = eval_tokens("wikitext", TOKENIZER, seqlen=16, data_path=str(path))

    assert torch.equal(tokens[0], token_ids("\n\n".join(texts)))


def test_parquet_joins_text_column(tmp_path):
    texts = sentences(5, "row")
    path = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"text": texts, "n": list(range(5))}), path)

    windows, provenance = calibration_windows(TOKENIZER, dataset=None, path=str(path), nsamples=3, seqlen=8, seed=0)

    assert torch.equal(windows, gptq_stream_windows(token_ids("\n\n".join(texts)), 3, 8, seed=0))
    assert provenance["sha256"] == hashlib.sha256("\n\n".join(texts).encode()).hexdigest()


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.jsonl", '{"text": "ok"}\n{"body": "no text"}\n', ':2 has no string "text" field'),
        ("bad.jsonl", '{"text": "ok"}\nnot json\n', ":2 is not valid JSON"),
        ("bad.txt", b"\xff\xfe\x00binary", "is not UTF-8 text"),
    ],
)
def test_malformed_files_raise(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(RptqError, match=message):
        eval_tokens("wikitext", TOKENIZER, seqlen=8, data_path=str(path))


def test_parquet_without_text_column_raises(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"body": ["a", "b"]}), path)
    with pytest.raises(RptqError, match='no "text" column'):
        calibration_windows(TOKENIZER, dataset=None, path=str(path), nsamples=1, seqlen=4, seed=0)


def test_text_shorter_than_a_window_raises(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("The river rose.", encoding="utf-8")
    message = r"has \d+ tokens, fewer than the 65 that one window of 64 needs.*smaller --seqlen"
    with pytest.raises(RptqError, match=message):
        calibration_windows(TOKENIZER, dataset=None, path=str(path), nsamples=1, seqlen=64, seed=0)


def test_missing_file_raises(tmp_path):
    with pytest.raises(RptqError, match="does not exist"):
        calibration_windows(TOKENIZER, dataset=None, path=str(tmp_path / "nope.txt"), nsamples=1, seqlen=4, seed=0)
    with pytest.raises(RptqError, match="does not exist"):
        eval_tokens("ptb", TOKENIZER, seqlen=4, data_path=str(tmp_path / "nope.txt"))


@pytest.mark.parametrize("dataset, path", [("wikitext2", "x.txt"), (None, None)])
def test_exactly_one_source_required(dataset, path):
    with pytest.raises(RptqError, match="not both or neither: --calib-dataset NAME or --calib-path FILE"):
        calibration_windows(TOKENIZER, dataset=dataset, path=path, nsamples=1, seqlen=4, seed=0)


def test_unknown_names_raise(hub):
    with pytest.raises(RptqError, match="unknown calibration dataset 'pile'.*--calib-path FILE"):
        calibration_windows(TOKENIZER, dataset="pile", path=None, nsamples=1, seqlen=4, seed=0)
    with pytest.raises(RptqError, match="unknown evaluation task 'lambada'"):
        eval_tokens("lambada", TOKENIZER, seqlen=4)
    assert hub.calls == []


def test_c4_eval_from_long_file_draws_256_windows(text_file):
    tokens = eval_tokens("c4", TOKENIZER, seqlen=2, data_path=str(text_file))
    assert tokens.shape == (1, 256 * 2)
    assert torch.equal(tokens[0], gptq_stream_windows(token_ids(PARAGRAPH * 3), 256, 2, seed=0).reshape(-1))


def test_c4_eval_from_short_file_uses_whole_text(text_file):
    tokens = eval_tokens("c4", TOKENIZER, seqlen=64, data_path=str(text_file))
    assert torch.equal(tokens[0], token_ids(PARAGRAPH * 3))


# ----------------------------------------------------------------------------------------------------
# Hub datasets (faked)


@pytest.mark.parametrize(
    "dataset, split, field", [("wikitext2", data.WIKITEXT2_TRAIN, "text"), ("ptb", data.PTB_TRAIN, "sentence")]
)
def test_named_stream_datasets_follow_gptq(hub, dataset, split, field):
    windows, provenance = calibration_windows(TOKENIZER, dataset=dataset, path=None, nsamples=6, seqlen=12, seed=2)

    text = "\n\n".join(hub.splits[(split.path, "train")][field])
    assert torch.equal(windows, gptq_stream_windows(token_ids(text), 6, 12, seed=2))
    assert provenance["source"] == dataset and provenance["sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert hub.calls == [(split.path, split.name, "train", None)]


def test_c4_calibration_draws_long_documents_only(hub):
    windows, provenance = calibration_windows(TOKENIZER, dataset="c4", path=None, nsamples=10, seqlen=24, seed=5)

    docs = hub.splits[(data.C4_TRAIN.path, "train")]["text"]
    assert torch.equal(windows, gptq_document_windows(docs, 10, 24, seed=5))
    long_docs = [token_ids(doc) for doc in docs if len(token_ids(doc)) > 24]
    assert all(any(is_window_of(w, doc) for doc in long_docs) for w in windows)
    assert hub.calls == [(data.C4_TRAIN.path, None, "train", data.C4_TRAIN.data_files)]
    assert provenance["source"] == "c4"


def test_c4_corpus_without_long_documents_raises(hub, monkeypatch):
    monkeypatch.setattr(data, "MAX_CONSECUTIVE_SHORT_DOCUMENTS", 50)
    message = "50 random documents in a row are not longer than 4096 tokens; use a smaller --seqlen"
    with pytest.raises(RptqError, match=message):
        calibration_windows(TOKENIZER, dataset="c4", path=None, nsamples=1, seqlen=4096, seed=0)


@pytest.mark.parametrize("nsamples, parts", [(128, (43, 43, 42)), (7, (3, 2, 2)), (2, (1, 1, 0))])
def test_mix_gives_exactly_nsamples_real_windows(hub, nsamples, parts):
    windows, provenance = calibration_windows(TOKENIZER, dataset="mix", path=None, nsamples=nsamples, seqlen=8, seed=2)

    assert windows.shape == (nsamples, 8)
    assert (windows != 0).any(dim=1).all()  # no all-zero (padding) sample slips in
    wiki, ptb, c4 = torch.split(windows, parts)
    wiki_text = "\n\n".join(hub.splits[(data.WIKITEXT2_TRAIN.path, "train")]["text"])
    ptb_text = "\n\n".join(hub.splits[(data.PTB_TRAIN.path, "train")]["sentence"])
    assert torch.equal(wiki, gptq_stream_windows(token_ids(wiki_text), parts[0], 8, seed=2))
    assert torch.equal(ptb, gptq_stream_windows(token_ids(ptb_text), parts[1], 8, seed=2))
    if parts[2]:
        c4_docs = hub.splits[(data.C4_TRAIN.path, "train")]["text"]
        assert torch.equal(c4, gptq_document_windows(c4_docs, parts[2], 8, seed=2))
    assert provenance["source"] == "mix" and provenance["nsamples"] == nsamples


def test_eval_wikitext_and_ptb_join_rows(hub):
    wikitext = eval_tokens("wikitext", TOKENIZER, seqlen=16)
    ptb = eval_tokens("ptb", TOKENIZER, seqlen=16)

    assert torch.equal(wikitext[0], token_ids("\n\n".join(hub.splits[(data.WIKITEXT2_TEST.path, "test")]["text"])))
    assert torch.equal(ptb[0], token_ids("\n\n".join(hub.splits[(data.PTB_VALIDATION.path, "validation")]["sentence"])))
    assert [call[2] for call in hub.calls] == ["test", "validation"]


def test_eval_c4_is_256_seed0_windows_of_validation_documents(hub):
    tokens = eval_tokens("c4", TOKENIZER, seqlen=16)

    docs = hub.splits[(data.C4_VALIDATION.path, "validation")]["text"]
    assert tokens.shape == (1, 256 * 16)
    assert torch.equal(tokens[0], gptq_document_windows(docs, 256, 16, seed=0).reshape(-1))
    assert hub.calls == [(data.C4_VALIDATION.path, None, "validation", data.C4_VALIDATION.data_files)]


def test_hub_dataset_unavailable_offline_names_the_fix(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'Salesforce/wikitext' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    message = "could not load dataset Salesforce/wikitext.*OfflineModeIsEnabled.*--data-path FILE to evaluate"
    with pytest.raises(RptqError, match=message):
        eval_tokens("wikitext", TOKENIZER, seqlen=16)
