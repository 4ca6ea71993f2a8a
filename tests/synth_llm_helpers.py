"""A tiny randomly initialised Llama with a byte-level BPE tokenizer and a chat template (built locally, nothing
downloaded), a logits processor that makes it write scripted outputs, and a runnable entry point for the
SIGKILL-resume and 2-process tests (``python tests/synth_llm_helpers.py MODEL_DIR OUT [--delay S]``)."""
from __future__ import annotations

import argparse
import collections
import time
from pathlib import Path

import torch
from transformers import LogitsProcessor

from fuselip_med.data.synth.common import CaptionRow
from fuselip_med.data.synth.llm import EXAMPLES, SYSTEM_PROMPT, LLMConfig, synthesize_llm

CHAT_TEMPLATE = ("{% for m in messages %}<|start|>{{ m['role'] }}\n{{ m['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|start|>assistant\n{% endif %}")

CAPTIONS = [
    "Axial CT of the chest showing a 5 mm nodule in the right upper lobe.",
    "Chest X-ray with a left pleural effusion; no pneumothorax.",
    "MRI of the knee.",
    "Ultrasound of the liver showing a 3 cm cyst.",
    "Non-contrast CT of the head showing an acute hemorrhage.",
    "Coronal MRI of the pelvis showing a fibroid.",
    "PA chest radiograph showing cardiomegaly.",
    "Angiogram showing a stenosis of the renal artery.",
]
# caption -> outputs of the first, second, ... attempt (the last one repeats)
SCRIPT = {
    CAPTIONS[0]: ["Q: What imaging modality is this?\nA: CT\nQ: Where is the nodule?\nA: right upper lobe\n"
                  "Q: Where is the nodule?\nA: right upper lobe\nQ: Is there a nodule?\nA: yes"],
    CAPTIONS[1]: ["I am sorry, I cannot see the image.",
                  "1. Q: Which side is the effusion on?\nA: left\n2. Q: What is absent?\nA: pneumothorax"],
    CAPTIONS[2]: ["The knee."],
    CAPTIONS[3]: ["Question: What is the size of the cyst?\nAnswer: 3 cm\nQ: Which organ?\nA: kidney\n"
                  "Q: What does this show?\nA: ultrasound of the liver showing a 3 cm cyst\n"
                  "Q: Which modality shows the cyst?\nA: Ultrasound"],
    CAPTIONS[4]: ["Q: What does the CT show?\nA: acute hemorrhage\nQ: Where is the hemorrhage in the head?\nA: head"],
    CAPTIONS[5]: ["Q: In which plane is the image?\nA: coronal\nQ: What does the MRI show?\nA: fibroid"],
    CAPTIONS[6]: ["Q: Which projection is this?\nA: PA\nQ: What is the finding\nA: cardiomegaly"],
    CAPTIONS[7]: ["Q: Which artery is narrowed?\nA: the renal artery"],
}
# what the run must write: (caption index, question, answer), and the drop counts
EXPECTED = [
    (0, "What imaging modality is this?", "CT"), (0, "Where is the nodule?", "right upper lobe"),
    (1, "Which side is the effusion on?", "left"),
    (3, "What is the size of the cyst?", "3 cm"), (3, "Which modality shows the cyst?", "Ultrasound"),
    (4, "What does the CT show?", "acute hemorrhage"),
    (5, "In which plane is the image?", "coronal"), (5, "What does the MRI show?", "fibroid"),
    (6, "Which projection is this?", "PA"),
    (7, "Which artery is narrowed?", "the renal artery"),
]
EXPECTED_DROPPED = {
    "duplicate": 1, "yes/no answer": 1, "retried malformed output": 3, "negated or hedged finding": 1,
    "malformed output (caption dropped)": 1, "answer not in caption": 1, "answer too long": 1,
    "answer in question": 1, "not a question": 1,
}
CONFIG = dict(batch_size=2, chunk_size=2, max_new_tokens=96, max_retries=2, max_pairs=4, seed=0)


def build_tiny_llm(directory: Path) -> Path:
    """Save a byte-level BPE tokenizer (trained on the prompt and captions) with a chat template, and a
    randomly initialised 2-layer LlamaForCausalLM, to ``directory``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    corpus = [SYSTEM_PROMPT, *CAPTIONS, *(text for pair in EXAMPLES for text in pair),
              *(text for outputs in SCRIPT.values() for text in outputs)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=3000, special_tokens=["<|start|>", "<|end|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|start|>", eos_token="<|end|>",
                                   pad_token="<|pad|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                         pad_token_id=fast.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


class ScriptedOutput(LogitsProcessor):
    """Forces each row to write ``script[caption][attempt]`` then EOS: the caption is read back from the decoded
    prompt, the attempt is how often this process has seen that caption. ``delay`` seconds of sleep per
    generate call make a run slow enough to be killed midway; a batch holding ``crash_on`` raises
    KeyboardInterrupt (a run stopped in the middle)."""

    def __init__(self, tokenizer, script: dict[str, list[str]], delay: float = 0.0, crash_on: str | None = None):
        self.tokenizer = tokenizer
        self.script = script
        self.delay = delay
        self.crash_on = crash_on
        self.seen: collections.Counter[str] = collections.Counter()
        self._previous: torch.Tensor | None = None
        self._targets: list[list[int]] = []
        self._start = 0

    def _new_call(self, input_ids: torch.Tensor) -> bool:
        p = self._previous
        return (p is None or p.shape[0] != input_ids.shape[0] or p.shape[1] + 1 != input_ids.shape[1]
                or not torch.equal(p, input_ids[:, :-1]))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._new_call(input_ids):
            time.sleep(self.delay)
            self._start = input_ids.shape[1]
            self._targets = []
            for row in input_ids:
                prompt = self.tokenizer.decode(row, skip_special_tokens=True)
                caption = prompt.rpartition("Caption: ")[2].removesuffix("assistant\n")
                if caption == self.crash_on:
                    raise KeyboardInterrupt
                outputs = self.script[caption]
                text = outputs[min(self.seen[caption], len(outputs) - 1)]
                self.seen[caption] += 1
                self._targets.append(self.tokenizer.encode(text, add_special_tokens=False))
        self._previous = input_ids.clone()
        step = input_ids.shape[1] - self._start
        forced = torch.full_like(scores, float("-inf"))
        for row, target in enumerate(self._targets):
            forced[row, target[step] if step < len(target) else self.tokenizer.eos_token_id] = 0.0
        return forced


def rows() -> list[CaptionRow]:
    return [CaptionRow(f"img{i}", f"/data/img{i}.png", caption) for i, caption in enumerate(CAPTIONS)]


def run(model_dir: Path, out: Path, delay: float = 0.0):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = LLMConfig(model=str(model_dir), **CONFIG)
    return synthesize_llm(rows(), out, config, logits_processor=[ScriptedOutput(tokenizer, SCRIPT, delay)])


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    run(args.model_dir, args.out, args.delay)
