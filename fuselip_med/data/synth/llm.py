"""LLM caption -> QA rewriting, as FuseLIP built CC3M-VQA (Llama-3.1-8B-Instruct, a structured system prompt,
sampled decoding; the model sees captions only), with a system prompt written for radiology captions.

Flow: captions are cut into chunks; chunk k belongs to process k mod P (``accelerate launch`` gives P processes,
one per GPU). A chunk is generated in batches with sampling seeded by (seed, chunk, attempt, batch), outputs are
parsed (``Q: ...`` / ``A: ...`` lines), malformed outputs are retried up to ``max_retries`` times, then pairs are
validated against the caption and de-duplicated. Each finished chunk is one JSON file written atomically under
``<out>.parts/``; a rerun skips finished chunks, so a killed run continues and ends with the same file, and P
processes write what one process writes. Process 0 joins the chunks into ``<out>`` and removes the parts.
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import shutil
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fuselip_med.errors import UserError
from fuselip_med.io import atomic_write_text
from fuselip_med.option_names import advise_option

from .common import (
    CaptionRow,
    QARecord,
    answer_in_caption,
    dedupe,
    normalize_text,
    write_jsonl_atomic,
)
from .rules import expand_abbreviations, find_findings, finding_terms

__all__ = ["DEFAULT_MODEL", "PROMPT_VERSION", "SYSTEM_PROMPT", "HFGenerator", "LLMConfig", "SynthError",
           "SynthReport", "build_messages", "parse_pairs", "synthesize_llm", "validate_pair"]

DEFAULT_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
PROMPT_VERSION = "radvqa-llm-v1"

SYSTEM_PROMPT = """\
You turn the caption of a radiology figure into question-answer pairs. The pairs train a model that looks at \
the image and the question and must find the answer, so every question has to be about what the image shows.
You see only the caption, never the image.

Rules:
1. The answer must be stated in the caption: copy it word for word from the caption.
2. Answers are short: one to five words (a modality, plane, body part, side, location, size or finding).
3. Ask only about what the image shows: imaging modality, plane, MRI sequence, body region, findings, their \
side (left, right, bilateral), location and size, and what arrows point to.
4. Never ask about something the caption negates ("no pneumothorax" means there is no pneumothorax to ask \
about) or only suspects ("possible fracture").
5. Keep left and right exactly as the caption says; spell out abbreviations only if the caption does.
6. No yes/no questions, no questions whose answer is in the question, nothing about the patient's history, \
age, sex, treatment, the article or the figure layout, and no questions that need the image beyond the caption.
7. Write at most {max_pairs} pairs, different from each other, each as two lines "Q: <question>" and \
"A: <answer>". Write nothing else."""

EXAMPLES: tuple[tuple[str, str], ...] = (
    ("Axial contrast-enhanced CT of the abdomen showing a 4 cm hypodense lesion in the right hepatic lobe "
     "(arrow). No ascites.",
     "Q: What imaging modality was used?\nA: CT\nQ: Where is the hypodense lesion?\nA: right hepatic lobe\n"
     "Q: How large is the lesion?\nA: 4 cm\nQ: What does the arrow point to?\nA: hypodense lesion"),
    ("Chest X-ray (PA view) demonstrating a left-sided pneumothorax without mediastinal shift.",
     "Q: Which projection is this chest X-ray?\nA: PA\nQ: Which side is the pneumothorax on?\nA: left\n"
     "Q: What abnormality does the X-ray show?\nA: pneumothorax"),
)

_Q_LINE = re.compile(r"^\s*(?:[-*\u2022]\s*|\d+[.)]\s*)?(?:Q|Question)\s*\d*\s*[:.)-]\s*(.*?)\s*$", re.I)
_A_LINE = re.compile(r"^\s*(?:[-*\u2022]\s*)?(?:A|Answer)\s*\d*\s*[:.)-]\s*(.*?)\s*$", re.I)
_YES_NO = {"yes", "no", "true", "false", "yes it is", "no it is not", "not seen", "none"}


class SynthError(UserError, ValueError):
    """A synthesis run that cannot start (bad model, mismatched resume state); one line naming what to do."""


@dataclass(frozen=True)
class LLMConfig:
    """Generation settings. Sampling follows the paper's "sampled decoding" (temperature, nucleus top-p).

    ``chunk_size``: captions per resumable unit (a multiple of ``batch_size`` keeps batches full).
    ``dtype``: ``auto`` = bf16 on a GPU that supports it, else float32; or ``bf16``/``fp16``/``fp32``.
    """

    model: str = DEFAULT_MODEL
    revision: str | None = None
    batch_size: int = 16
    chunk_size: int = 256
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    max_retries: int = 2
    max_pairs: int = 4
    max_answer_words: int = 6
    seed: int = 0
    dtype: str = "auto"

    def fingerprint(self) -> dict[str, Any]:
        """What must not change between a run and its resumption (batch size and dtype may)."""
        keep = ("model", "revision", "chunk_size", "max_new_tokens", "temperature", "top_p", "max_retries",
                "max_pairs", "max_answer_words", "seed")
        return {key: getattr(self, key) for key in keep} | {"prompt_version": PROMPT_VERSION}


@dataclass
class SynthReport:
    """What a run wrote: captions read, records kept, and per reason how many pairs or captions were dropped."""

    out: str
    n_captions: int
    n_records: int
    generator: str
    model: str | None
    prompt_version: str
    dropped: dict[str, int] = field(default_factory=dict)
    skipped_rows: dict[str, int] = field(default_factory=dict)
    attempts: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


# ----------------------------------------------------------------------------------------------- prompts


def build_messages(caption: str, max_pairs: int = 4) -> list[dict[str, str]]:
    """Chat messages for one caption: our system prompt, the worked examples as earlier turns, the caption."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT.format(max_pairs=max_pairs)}]
    for example, answer in EXAMPLES:
        messages += [{"role": "user", "content": f"Caption: {example}"}, {"role": "assistant", "content": answer}]
    messages.append({"role": "user", "content": f"Caption: {caption}"})
    return messages


def parse_pairs(text: str) -> list[tuple[str, str]]:
    """(question, answer) pairs from ``Q: ...``/``A: ...`` lines (numbering, bullets and ``Question:`` /
    ``Answer:`` tolerated; other lines ignored). An answer without a question before it is ignored."""
    pairs, question = [], None
    for line in text.splitlines():
        q = _Q_LINE.match(line)
        if q:
            question = q.group(1)
            continue
        a = _A_LINE.match(line)
        if a and question is not None:
            pairs.append((question, a.group(1)))
            question = None
    return pairs


_FINDING_TERMS = frozenset(finding_terms())


def _negated_finding(answer: str, caption: str) -> bool:
    """True when the answer is a finding term the caption mentions only negated or hedged."""
    normal = normalize_text(answer)
    if normal not in _FINDING_TERMS:
        return False
    affirmed = {normalize_text(f.surface) for f in find_findings(expand_abbreviations(caption)).findings}
    return normal not in affirmed


def validate_pair(question: str, answer: str, caption: str, max_answer_words: int = 6) -> str | None:
    """None for a usable pair, else the reason it is dropped (the keys of ``SynthReport.dropped``)."""
    q, a = normalize_text(question), normalize_text(answer)
    if not q or not a:
        return "empty question or answer"
    if not question.rstrip().endswith("?"):
        return "not a question"
    if a in _YES_NO:
        return "yes/no answer"
    if len(a.split()) > max_answer_words:
        return "answer too long"
    if re.search(r"(?<!\w)" + re.escape(a) + r"(?!\w)", q):
        return "answer in question"
    if not answer_in_caption(answer, caption):
        return "answer not in caption"
    if _negated_finding(answer, caption):
        return "negated or hedged finding"
    return None


# --------------------------------------------------------------------------------------------- generation

Generate = Callable[[Sequence[list[dict[str, str]]], int], list[str]]


class HFGenerator:
    """A ``transformers`` causal LM with its chat template: ``generator(batch_of_messages, seed) -> texts``.

    ``model``: hub id or local directory (never ``trust_remote_code``). Batches are left-padded; sampling uses
    ``torch.manual_seed(seed)`` so a batch's output depends only on its prompts and seed. ``logits_processor``:
    extra ``transformers`` logits processors (e.g. to constrain the output). Raises ``SynthError`` when the
    model or tokenizer cannot be loaded or the tokenizer has no chat template.
    """

    def __init__(self, config: LLMConfig, device: Any = None, logits_processor: Sequence[Any] = ()):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.config = config
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(config.model, revision=config.revision,
                                                           trust_remote_code=False)
        except (OSError, ValueError) as error:
            model = advise_option("model", config.model)
            raise SynthError(f"cannot load the tokenizer of {model}: {error}".splitlines()[0]) from None
        if not getattr(self.tokenizer, "chat_template", None):
            raise SynthError(f"{advise_option('model', config.model)} has no chat template: use an "
                             f"instruction-tuned model (e.g. {DEFAULT_MODEL}).")
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        import transformers
        from packaging.version import Version

        # transformers 4.56 renamed torch_dtype to dtype (the old name warns)
        dtype_key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
        try:
            self.model = AutoModelForCausalLM.from_pretrained(
                config.model, revision=config.revision, trust_remote_code=False, **{dtype_key: self._dtype()})
        except (OSError, ValueError) as error:
            raise SynthError(f"cannot load {advise_option('model', config.model)}: {error}".splitlines()[0]) from None
        self.model.to(self.device).eval()
        self.logits_processor = list(logits_processor)

    def _dtype(self):
        import torch

        wanted = self.config.dtype
        if wanted == "auto":
            bf16 = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
            return torch.bfloat16 if bf16 else torch.float32
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[wanted]

    def __call__(self, batch: Sequence[list[dict[str, str]]], seed: int) -> list[str]:
        import torch
        from transformers import LogitsProcessorList

        prompts = [self.tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in batch]
        inputs = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        torch.manual_seed(seed)
        with torch.inference_mode():
            out = self.model.generate(
                **inputs, do_sample=True, temperature=self.config.temperature, top_p=self.config.top_p,
                max_new_tokens=self.config.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
                logits_processor=LogitsProcessorList(self.logits_processor))
        return self.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def _seed(*parts: int) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


def generate_chunk(rows: Sequence[CaptionRow], generate: Generate, config: LLMConfig, chunk: int
                   ) -> tuple[list[QARecord], collections.Counter, int]:
    """Records of one chunk, the drop counts per reason, and the number of generation attempts (captions)."""
    dropped: collections.Counter[str] = collections.Counter()
    pairs: dict[int, list[tuple[str, str]]] = {}
    pending = list(range(len(rows)))
    attempts = 0
    for attempt in range(config.max_retries + 1):
        failed = []
        for number, start in enumerate(range(0, len(pending), config.batch_size)):
            batch = pending[start:start + config.batch_size]
            texts = generate([build_messages(rows[i].caption, config.max_pairs) for i in batch],
                             _seed(config.seed, chunk, attempt, number))
            attempts += len(batch)
            for i, text in zip(batch, texts):
                found = parse_pairs(text)
                if found:
                    pairs[i] = found
                else:
                    failed.append(i)
        if attempt < config.max_retries and failed:
            dropped["retried malformed output"] += len(failed)
        pending = failed
        if not pending:
            break
    dropped["malformed output (caption dropped)"] += len(pending)
    records = []
    for i in sorted(pairs):
        row = rows[i]
        found = pairs[i]
        if len(found) > config.max_pairs:
            dropped["over max_pairs"] += len(found) - config.max_pairs
            found = found[:config.max_pairs]
        for question, answer in found:
            reason = validate_pair(question, answer, row.caption, config.max_answer_words)
            if reason:
                dropped[reason] += 1
                continue
            records.append(QARecord(row.id, row.image, row.caption, question.strip(), answer.strip(), "llm", "llm",
                                    config.model, PROMPT_VERSION))
    records, duplicates = dedupe(records)
    if duplicates:
        dropped["duplicate"] += duplicates
    return records, dropped, attempts


# ------------------------------------------------------------------------------------------- the whole run


def _fingerprint(rows: Sequence[CaptionRow], config: LLMConfig) -> dict[str, Any]:
    digest = hashlib.sha256()
    for row in rows:
        digest.update(f"{row.id}\0{row.caption}\0".encode())
    return {"inputs": digest.hexdigest(), "n_captions": len(rows), **config.fingerprint()}


def _chunk_file(parts: Path, chunk: int) -> Path:
    return parts / f"chunk-{chunk:06d}.json"


def _check_manifest(parts: Path, fingerprint: dict[str, Any]) -> None:
    manifest = parts / "manifest.json"
    if manifest.is_file():
        before = json.loads(manifest.read_text())
        changed = sorted(k for k in fingerprint if before.get(k) != fingerprint[k])
        if changed:
            raise SynthError(f"{parts} holds an unfinished run with other settings ({', '.join(changed)} differ): "
                             f"rerun with the same input and options, or delete {parts} to start over.")


def process_state(timeout_min: float | None = None):
    """Accelerate's process state; ``cpu=True`` without CUDA lets ``accelerate launch --multi_gpu`` (torchrun) run
    several gloo processes on a CPU machine (Accelerate's own ``--cpu`` launcher needs MPI for that).

    The first call creates the process group, with ``timeout_min`` minutes for a collective (None: the training
    default, ``train.dist_timeout_min``'s 60): processes that finish their chunks early wait at the closing
    barrier for the others' last chunk, longer than NCCL's 10-minute default for a large model. Later calls
    return the same state (their ``timeout_min`` is not used)."""
    from datetime import timedelta

    import torch
    from accelerate import PartialState

    from fuselip_med.recipes import TrainSection

    minutes = TrainSection.model_fields["dist_timeout_min"].default if timeout_min is None else timeout_min
    return PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(minutes=minutes))


def synthesize_llm(rows: Sequence[CaptionRow], out: str | os.PathLike, config: LLMConfig, *,
                   generate: Generate | None = None, logits_processor: Sequence[Any] = (),
                   skipped_rows: dict[str, int] | None = None,
                   on_chunk: Callable[[int, int], None] | None = None) -> SynthReport | None:
    """Generate, validate and write QA records for ``rows`` to ``out`` (JSONL), resumably, on every process of
    the current Accelerate launch. Returns the report on process 0 (None on the others).

    ``generate`` replaces the ``HFGenerator`` (same call signature); ``logits_processor`` is handed to it.
    ``on_chunk(done, total)`` is called after each chunk this process finishes. Raises ``SynthError`` for a
    resume with different settings or a model that cannot be loaded.
    """
    state = process_state()
    out = Path(out)
    parts = out.with_name(out.name + ".parts")
    fingerprint = _fingerprint(rows, config)
    if state.is_main_process:
        _check_manifest(parts, fingerprint)
        parts.mkdir(parents=True, exist_ok=True)
        atomic_write_text(parts / "manifest.json", json.dumps(fingerprint, indent=2, sort_keys=True))
    state.wait_for_everyone()
    n_chunks = (len(rows) + config.chunk_size - 1) // config.chunk_size
    mine = [k for k in range(n_chunks) if k % state.num_processes == state.process_index]
    todo = [k for k in mine if not _chunk_file(parts, k).is_file()]
    if todo and generate is None:
        generate = HFGenerator(config, device=state.device, logits_processor=logits_processor)
    for done, chunk in enumerate(todo, start=1):
        records, dropped, attempts = generate_chunk(rows[chunk * config.chunk_size:(chunk + 1) * config.chunk_size],
                                                    generate, config, chunk)
        payload = {"records": [json.loads(r.to_json()) for r in records], "dropped": dict(dropped),
                   "attempts": attempts}
        atomic_write_text(_chunk_file(parts, chunk), json.dumps(payload, ensure_ascii=False))
        if on_chunk is not None:
            on_chunk(done, len(todo))
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    return _join(parts, out, n_chunks, len(rows), config, skipped_rows or {})


def _join(parts: Path, out: Path, n_chunks: int, n_captions: int, config: LLMConfig,
          skipped_rows: dict[str, int]) -> SynthReport:
    records: list[QARecord] = []
    dropped: collections.Counter[str] = collections.Counter()
    attempts = 0
    for chunk in range(n_chunks):
        payload = json.loads(_chunk_file(parts, chunk).read_text(encoding="utf-8"))
        records += [QARecord(**record) for record in payload["records"]]
        dropped.update(payload["dropped"])
        attempts += payload["attempts"]
    write_jsonl_atomic(out, records)
    report = SynthReport(str(out), n_captions, len(records), "llm", config.model, PROMPT_VERSION,
                         dict(sorted(dropped.items())), dict(skipped_rows), attempts)
    shutil.rmtree(parts)
    return report
