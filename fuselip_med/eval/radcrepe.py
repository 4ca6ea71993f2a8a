"""RadCrepe: radiology hard negatives made by rule from real captions, each a minimal edit that changes one fact
(SugarCrepe's idea, Hsieh et al. 2023, for radiology). The image must score its caption above the edited one.

Edit types (:data:`EDIT_TYPES`), each applied to the first place in the caption where it can be:

- ``laterality``: the first side named (``left``/``right``, also inside ``left-sided``, and the abbreviations
  ``LUL``/``RUL``, ``LLL``/``RLL``, ``LUQ``/``RUQ``, ``LLQ``/``RLQ``, ``Lt``/``Rt``) -> the other side, in every
  mention of that side; ``bilateral``, ``RML`` (no left twin), ``right angle`` and ``left`` as a verb ("was left
  untreated") are not sides and stay.
- ``negation``: the first negation cue is removed (``no``, ``no evidence/sign of``, ``without`` -> ``with``,
  ``negative for`` -> ``positive for``, ``absence of`` -> ``presence of``, ``not seen/visible/...`` -> ``seen``); its
  scope ends with the cue, so "No effusion, but a small nodule" keeps the nodule. A caption without a cue gets one:
  "showing a mass" -> "showing no mass", "with a mass" -> "without a mass".
- ``modality``: a caption naming exactly one modality (``caption_modality`` of the VQA synthesis rules) has it
  swapped, CT <-> MRI and X-ray <-> ultrasound, in every spelling (``CT``, ``computed tomography``, ``MR``, ``MRI``,
  ``magnetic resonance``, ``X-ray``, ``radiograph``, ``ultrasound``, ``sonography``, ``US``).
- ``body_region``: the first region word of :data:`REGION_PAIRS` -> its partner, in every mention.
- ``size_number``: the first measurement (``2.5 cm``, ``14 mm``, ``30 mL``) x 3 (as many decimals as written), else
  ``single``/``solitary`` -> ``multifocal``, ``multiple`` -> ``single``, ``two`` <-> ``three``, else ``small`` <->
  ``large``.

Letter case is kept (``Left`` -> ``Right``, ``CT`` -> ``MRI``). ``fuselip-med data radcrepe`` writes the set once in
SugarCrepe's layout (one ``<edit type>.json`` per edit, ``{"<id>": {"filename", "caption", "negative_caption"}}``),
so that every model is scored on the same items.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = ["EDIT_TYPES", "REGION_PAIRS", "edit_laterality", "edit_negation", "edit_modality", "edit_body_region",
           "edit_size_number", "make_edits", "write_radcrepe"]

EDIT_TYPES: tuple[str, ...] = ("laterality", "negation", "modality", "body_region", "size_number")


def _cased(template: str, word: str) -> str:
    """``word`` in the letter case of ``template`` (UPPER, Title or lower)."""
    if template.isupper() and len(template) > 1:
        return word.upper()
    if template[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


# ------------------------------------------------------------------------------------------------ laterality

_SIDE_ABBREVIATIONS = {"LUL": "RUL", "RUL": "LUL", "LLL": "RLL", "RLL": "LLL", "LUQ": "RUQ", "RUQ": "LUQ",
                       "LLQ": "RLQ", "RLQ": "LLQ", "Lt": "Rt", "Rt": "Lt"}
_SIDE_RE = re.compile(r"(?<![\w-])(?:(?P<word>left|right)(?!\w)(?!\s+angled?\b)|(?P<abbr>"
                      + "|".join(_SIDE_ABBREVIATIONS) + r")(?![\w-]))", re.I)
_LEFT_AS_VERB = re.compile(r"\b(?:was|were|been|is|are|be)\s+$", re.I)


def _side_of(match: re.Match) -> str | None:
    if match.group("word"):
        return match.group("word").lower()
    abbr = match.group("abbr")
    canonical = next((k for k in _SIDE_ABBREVIATIONS if k.lower() == abbr.lower()), None)
    if canonical is None or (abbr != canonical and abbr.lower() not in ("lt", "rt")):
        return None  # "lll" in lower case is not the abbreviation
    return "left" if canonical[0] == "L" else "right"


def edit_laterality(caption: str) -> str | None:
    """The caption with every mention of its first side swapped (module docstring); None when it names no side."""
    matches = [m for m in _SIDE_RE.finditer(caption)
               if _side_of(m) and not (m.group("word") and m.group("word").lower() == "left"
                                       and _LEFT_AS_VERB.search(caption[:m.start()]))]
    if not matches:
        return None
    side = _side_of(matches[0])
    out, last = [], 0
    for m in matches:
        if _side_of(m) != side:
            continue
        text = m.group(0)
        if m.group("word"):
            new = _cased(text, "right" if side == "left" else "left")
        else:
            canonical = next(k for k in _SIDE_ABBREVIATIONS if k.lower() == text.lower())
            new = _cased(text, _SIDE_ABBREVIATIONS[canonical].lower()) if len(text) == 2 else \
                _SIDE_ABBREVIATIONS[canonical]
        out += [caption[last:m.start()], new]
        last = m.end()
    return "".join(out) + caption[last:]


# -------------------------------------------------------------------------------------------------- negation

_REMOVE_NEGATION: tuple[tuple[re.Pattern, Callable[[re.Match], str]], ...] = (
    (re.compile(r"\bno (evidence|signs?) of\s+", re.I), lambda m: _cased(m.group(0), f"{m.group(1).lower()} of ")),
    (re.compile(r"\bnegative for\b", re.I), lambda m: _cased(m.group(0), "positive for")),
    (re.compile(r"\babsence of\b", re.I), lambda m: _cased(m.group(0), "presence of")),
    (re.compile(r"\bwithout\b", re.I), lambda m: _cased(m.group(0), "with")),
    (re.compile(r"\bnot (seen|visible|present|identified|detected|evident)\b", re.I), lambda m: m.group(1)),
    (re.compile(r"\bno\s+(?=[a-z])", re.I), lambda m: ""),
)
_ADD_NEGATION = (
    re.compile(r"\b(shows?|showing|reveals?|revealing|revealed|demonstrates?|demonstrating|demonstrated|depicts?|"
               r"depicting)\s+(?:an?|the)\s+", re.I),
    re.compile(r"\b(with)\s+", re.I),
)


def edit_negation(caption: str) -> str | None:
    """The caption with its first negation cue removed, or a cue added when it has none (module docstring)."""
    found = [(m.start(), pattern, fix) for pattern, fix in _REMOVE_NEGATION if (m := pattern.search(caption))]
    if found:
        start, pattern, fix = min(found, key=lambda f: f[0])
        m = pattern.search(caption, start)
        rest = caption[m.end():]
        if m.start() == 0 or caption[:m.start()].rstrip().endswith((".", ";", ":")):
            rest = rest[:1].upper() + rest[1:] if not fix(m) else rest  # "No effusion." -> "Effusion."
        return caption[:m.start()] + fix(m) + rest
    for pattern in _ADD_NEGATION:
        m = pattern.search(caption)
        if m:
            verb = m.group(1)
            new = f"{_cased(verb, 'without')} " if verb.lower() == "with" else f"{verb} no "
            return caption[:m.start()] + new + caption[m.end():]
    return None


# -------------------------------------------------------------------------------------------------- modality

_MODALITY_SWAPS: dict[str, tuple[tuple[re.Pattern, str], ...]] = {
    "CT": ((re.compile(r"\bcomputed tomography\b", re.I), "magnetic resonance imaging"),
           (re.compile(r"\bCT\b"), "MRI")),
    "MRI": ((re.compile(r"\bmagnetic resonance(?: imaging)?\b", re.I), "computed tomography"),
            (re.compile(r"\bMRI?\b"), "CT")),
    "X-ray": ((re.compile(r"\bx-?rays?\b", re.I), "ultrasound"), (re.compile(r"\bradiographs\b", re.I),
                                                                   "ultrasound images"),
              (re.compile(r"\bradiograph\b", re.I), "ultrasound image"),
              (re.compile(r"\bradiography\b", re.I), "ultrasonography"),
              (re.compile(r"\bradiographic\b", re.I), "sonographic")),
    "ultrasound": ((re.compile(r"\bultrasonography\b|\bsonography\b", re.I), "radiography"),
                   (re.compile(r"\bsonographic\b", re.I), "radiographic"),
                   (re.compile(r"\bultrasound\b", re.I), "X-ray"), (re.compile(r"\bUS\b"), "X-ray")),
}


def edit_modality(caption: str) -> str | None:
    """The caption with its one modality swapped (CT <-> MRI, X-ray <-> ultrasound); None when it names none,
    several, or another one."""
    from fuselip_med.data.synth.rules import caption_modality

    modality = caption_modality(caption)
    if modality not in _MODALITY_SWAPS:
        return None
    out = caption
    for pattern, new in _MODALITY_SWAPS[modality]:
        out = pattern.sub(lambda m, new=new: _sentence_cased(m, new), out)
    return out if out != caption else None


def _sentence_cased(match: re.Match, new: str) -> str:
    """``new`` as written (a modality's own spelling), with a capital first letter at the start of a sentence."""
    before = match.string[:match.start()].rstrip()
    return new[:1].upper() + new[1:] if not before or before.endswith((".", "!", "?", ":")) else new


# ----------------------------------------------------------------------------------------------- body region

REGION_PAIRS: tuple[tuple[str, str], ...] = (
    ("chest", "abdomen"), ("thoracic", "abdominal"), ("thorax", "pelvis"), ("brain", "lung"), ("liver", "kidney"),
    ("hepatic", "renal"), ("knee", "shoulder"), ("hand", "foot"), ("cervical", "lumbar"), ("femur", "humerus"))
_PARTNER = {**{a: b for a, b in REGION_PAIRS}, **{b: a for a, b in REGION_PAIRS}}
_REGION_RE = re.compile(r"\b(" + "|".join(_PARTNER) + r")\b", re.I)


def edit_body_region(caption: str) -> str | None:
    """The caption with every mention of its first region word replaced by that word's partner."""
    first = _REGION_RE.search(caption)
    if first is None:
        return None
    word = first.group(1).lower()
    return re.sub(rf"\b{word}\b", lambda m: _cased(m.group(0), _PARTNER[word]), caption, flags=re.I)


# ----------------------------------------------------------------------------------------------- size/number

_MEASURE_RE = re.compile(r"\b(\d+(?:\.(\d+))?)(\s*(?:mm|cm|ml|mL|cc)\b)")
_COUNT_SWAPS = (({"single": "multifocal", "solitary": "multifocal", "multiple": "single"}),
                ({"two": "three", "three": "two"}), ({"small": "large", "large": "small"}))


def edit_size_number(caption: str) -> str | None:
    """The caption with its first measurement x 3, else its first count or size word swapped; None without."""
    m = _MEASURE_RE.search(caption)
    if m:
        decimals = len(m.group(2) or "")
        value = f"{float(m.group(1)) * 3:.{decimals}f}"
        return caption[:m.start()] + value + m.group(3) + caption[m.end():]
    for swaps in _COUNT_SWAPS:
        found = re.search(r"\b(" + "|".join(swaps) + r")\b", caption, re.I)
        if found:
            new = _cased(found.group(0), swaps[found.group(1).lower()])
            return caption[:found.start()] + new + caption[found.end():]
    return None


_EDITS: dict[str, Callable[[str], str | None]] = {
    "laterality": edit_laterality, "negation": edit_negation, "modality": edit_modality,
    "body_region": edit_body_region, "size_number": edit_size_number}


def make_edits(caption: str) -> dict[str, str]:
    """{edit type: negative caption} for the edits that apply to ``caption`` and change it."""
    out = {}
    for kind, edit in _EDITS.items():
        negative = edit(caption)
        if negative is not None and negative.strip() != caption.strip():
            out[kind] = negative
    return out


def write_radcrepe(items: Iterable[tuple[str, object, str]], out: str | os.PathLike) -> dict[str, int]:
    """Write ``<out>/<edit type>.json`` (SugarCrepe's layout) from ``(id, image, caption)`` items; ``image`` is a
    path (written relative to ``out``) or encoded bytes (saved as ``<out>/images/<id>.png``). Returns {edit type:
    items written}. Files are written atomically; an existing set is replaced."""
    import io

    from fuselip_med.io import atomic_write_bytes, atomic_write_json

    folder = Path(out).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    sets: dict[str, dict[str, dict[str, str]]] = {kind: {} for kind in EDIT_TYPES}
    for item_id, image, caption in items:
        edits = make_edits(caption)
        if not edits:
            continue
        if isinstance(image, (str, os.PathLike)):
            filename = os.path.relpath(Path(image).resolve(), folder.resolve())
        else:
            from PIL import Image

            buffer = io.BytesIO()
            Image.open(io.BytesIO(bytes(image))).save(buffer, format="PNG")
            filename = f"images/{item_id}.png"
            atomic_write_bytes(folder / filename, buffer.getvalue())
        for kind, negative in edits.items():
            sets[kind][str(item_id)] = {"filename": filename, "caption": caption, "negative_caption": negative}
    for kind, entries in sets.items():
        atomic_write_json(folder / f"{kind}.json", entries)
    return {kind: len(entries) for kind, entries in sets.items()}
