"""Rule-based radiology VQA: questions whose answers are certain from ROCOv2's manual concepts and from caption
patterns, with care for negation, uncertainty, laterality, abbreviations and lists.

Sources of certainty (every question has exactly one answer; anything ambiguous gives no question):
- manual concepts (ROCOv2 ``*_concepts_manual.csv``): the modality of every image (6 CUIs), and for X-rays the
  body region (7 CUIs) and projection (3 CUIs), shared data-formats "ROCOv2 - official release";
- the caption: the modality (when exactly one is named and no manual concept gives it), imaging plane, MRI
  sequence, and for each finding that is affirmed (not after "no", "without", "negative for", ... nor hedged
  by "possible", "suspected", ...): its side, location, size and what an arrow marks; the findings themselves.

Abbreviations are expanded before matching (``CXR`` -> chest X-ray, ``LLL`` -> left lower lobe, ``b/l`` ->
bilateral), so answers use the expanded words. Each question type has several phrasings; the one used for an
image is fixed by a CRC-32 of (id, type, finding), so reruns write the same file.
"""
from __future__ import annotations

import html
import re
import unicodedata
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ..adapters.rocov2 import ROCOV2_MODALITIES
from .common import CaptionRow, QARecord

__all__ = ["PROJECTION_ANSWERS", "REGION_ANSWERS", "RULES_VERSION", "TEMPLATES", "expand_abbreviations",
           "find_findings", "finding_terms", "is_english", "read_caption", "rules_qa", "synthesize_rules"]

RULES_VERSION = "rules-v2"  # v2: decimal commas, ranges, HTML entities, non-English captions skipped

# X-ray body region and projection (manual concepts) -> short answers; "Sagittal" on a radiograph is the
# lateral projection.
REGION_ANSWERS: dict[str, str] = {
    "C0817096": "chest", "C0023216": "lower extremity", "C1140618": "upper extremity", "C0030797": "pelvis",
    "C0037303": "skull", "C0037949": "spine", "C0000726": "abdomen",
}
PROJECTION_ANSWERS: dict[str, str] = {"C1996865": "PA", "C1999039": "AP", "C0205129": "lateral"}

TEMPLATES: dict[str, tuple[str, ...]] = {
    "modality": ("What imaging modality is this?", "Which imaging modality was used for this image?",
                 "What kind of imaging study is shown?", "What type of scan is this?"),
    "region": ("Which body region does this radiograph show?", "What part of the body is imaged in this X-ray?",
               "Which anatomical region is shown on this radiograph?"),
    "projection": ("In which projection was this radiograph taken?", "What is the projection of this X-ray?",
                   "Which view is this radiograph?"),
    "plane": ("In which plane was this image acquired?", "What is the imaging plane?",
              "Which anatomical plane does this image show?"),
    "sequence": ("Which MRI sequence is shown?", "What is the MR sequence of this image?",
                 "Which pulse sequence was used for this image?"),
    "abnormality": ("What abnormality is shown?", "What is the main finding in this image?",
                    "Which abnormality does the image show?"),
    "findings": ("What findings are shown?", "Which abnormalities are seen in this image?",
                 "What abnormalities does the image show?"),
    "side": ("On which side {be} the {f}?", "Which side {be} the {f} on?", "What is the laterality of the {f}?"),
    "location": ("Where {be} the {f}?", "Where {be} the {f} located?", "In which location {be} the {f} seen?"),
    "size": ("What is the size of the {f}?", "How large {be} the {f}?", "What does the {f} measure?"),
    "arrow": ("What does the arrow show?", "What is indicated by the arrow?", "What does the arrow point to?"),
}

# ------------------------------------------------------------------------------------------ abbreviations

_ABBREVIATIONS = {  # case-sensitive whole words
    "RUL": "right upper lobe", "RML": "right middle lobe", "RLL": "right lower lobe", "LUL": "left upper lobe",
    "LLL": "left lower lobe", "RUQ": "right upper quadrant", "LUQ": "left upper quadrant",
    "RLQ": "right lower quadrant", "LLQ": "left lower quadrant", "Rt": "right", "Lt": "left", "rt": "right",
    "lt": "left", "CXR": "chest X-ray", "AXR": "abdominal X-ray", "USG": "ultrasound", "US": "ultrasound",
    "SAH": "subarachnoid hemorrhage", "ICH": "intracranial hemorrhage", "SDH": "subdural hematoma",
    "EDH": "epidural hematoma", "PTX": "pneumothorax", "DWI": "diffusion-weighted imaging",
}
_ABBREVIATION_RE = re.compile(r"(?<![\w/-])(" + "|".join(map(re.escape, sorted(_ABBREVIATIONS, key=len,
                                                                                 reverse=True))) + r")\.?(?![\w/-])")
_BILATERAL_RE = re.compile(r"(?<!\w)(?:b/l|B/L)(?!\w)")
_CHARS = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2010": "-", "\u2011": "-",
                        "\u2012": "-", "\u2013": "-", "\u2014": "-", "\u2212": "-", "\u00d7": "x", "\u00a0": " "})


def expand_abbreviations(caption: str) -> str:
    """The caption with unicode quotes/dashes made ASCII, ``×`` -> ``x`` and the radiology abbreviations above
    (and ``b/l``) spelled out; everything else is kept as written."""
    text = unicodedata.normalize("NFKC", caption).translate(_CHARS)
    text = _BILATERAL_RE.sub("bilateral", text)
    return _ABBREVIATION_RE.sub(lambda m: _ABBREVIATIONS[m.group(1)], text)


# ---------------------------------------------------------------------------------------------- modality

_MODALITY_PATTERNS = {
    "CT": re.compile(r"\b(?:CT|MDCT|HRCT|CECT|NCCT|CBCT)\b|computed tomograph", re.I),
    "MRI": re.compile(r"\b(?:MRI|MR)\b|magnetic resonance|\b(?:T1|T2)(?:\s*-?\s*weighted|W|WI)\b|\bFLAIR\b|"
                      r"diffusion-weighted", re.I),
    "X-ray": re.compile(r"radiograph|\bx-?rays?\b|plain film", re.I),
    "ultrasound": re.compile(r"ultraso[nu]|sonograph|echograph|echocardiogra|\bdoppler\b", re.I),
    "angiography": re.compile(r"angiogra|arteriogra|venogra|\bDSA\b", re.I),
    "PET": re.compile(r"\bPET\b|positron emission|\bFDG\b", re.I),
}


def caption_modality(text: str) -> str | None:
    """The one modality the (expanded) caption names, or None when it names none or several (PET/CT, CT
    angiography, a comparison with a prior CT ...)."""
    found = [name for name, pattern in _MODALITY_PATTERNS.items() if pattern.search(text)]
    return found[0] if len(found) == 1 else None


_PLANE_RE = re.compile(r"\b(axial|coronal|sagittal|transverse|oblique)\b", re.I)
_SEQUENCES = (
    ("T1-weighted", re.compile(r"\bT1(?:\s*-?\s*weighted|W|WI)\b|\bT1\s+(?:image|sequence|scan|MRI|MR)\b", re.I)),
    ("T2-weighted", re.compile(r"\bT2(?:\s*-?\s*weighted|W|WI)\b|\bT2\s+(?:image|sequence|scan|MRI|MR)\b", re.I)),
    ("FLAIR", re.compile(r"\bFLAIR\b|fluid-attenuated inversion recovery", re.I)),
    ("diffusion-weighted", re.compile(r"diffusion-weighted", re.I)),
    ("STIR", re.compile(r"\bSTIR\b", re.I)),
    ("susceptibility-weighted", re.compile(r"susceptibility-weighted|\bSWI\b", re.I)),
)

# ---------------------------------------------------------------------------------------------- findings

_FINDING_TERMS = (
    "pleural effusion", "pericardial effusion", "joint effusion", "effusion", "pneumothorax", "hydropneumothorax",
    "pneumoperitoneum", "pneumomediastinum", "pneumonia", "consolidation", "atelectasis", "nodule", "mass", "cyst",
    "fracture", "hemorrhage", "haemorrhage", "hematoma", "haematoma", "infarct", "infarction", "abscess",
    "aneurysm", "dissection", "stenosis", "occlusion", "thrombus", "thrombosis", "embolism", "embolus", "tumor",
    "tumour", "lesion", "metastasis", "calcification", "edema", "oedema", "cardiomegaly", "dislocation",
    "hydronephrosis", "ascites", "lymphadenopathy", "calculus", "gallstone", "stone", "opacity", "collapse",
    "herniation", "hernia", "perforation", "obstruction", "diverticulum", "polyp", "fistula", "hydrocephalus",
    "bronchiectasis", "emphysema", "splenomegaly", "hepatomegaly", "subarachnoid hemorrhage",
    "intracranial hemorrhage", "subdural hematoma", "epidural hematoma", "pulmonary embolism", "infiltrate",
    "hyperintensity", "hypointensity", "hypodensity", "hyperdensity", "wall thickening", "dilatation",
)


def _plural(term: str) -> str:
    head, _, last = term.rpartition(" ")
    if last.endswith("sis"):
        last = last[:-3] + "ses"
    elif last.endswith("ax"):
        last = last[:-2] + "aces"
    elif last.endswith("us"):
        last = last[:-2] + "i"
    elif last.endswith("um"):
        last = last[:-2] + "a"
    elif last.endswith("y") and last[-2:-1] not in "aeiou":
        last = last[:-1] + "ies"
    elif last.endswith(("ss", "x")):
        last += "es"
    else:
        last += "s"
    return f"{head} {last}".strip()


_SINGULAR_OF = {term: term for term in _FINDING_TERMS} | {_plural(term): term for term in _FINDING_TERMS}
_TERMS_BY_HEAD: dict[str, list[tuple[str, ...]]] = {}  # last word -> the terms ending in it, longest first
for _term in sorted(_SINGULAR_OF, key=lambda t: -len(t.split())):
    _TERMS_BY_HEAD.setdefault(_term.rsplit(" ", 1)[-1], []).append(tuple(_term.split()))
_WORD_RE = re.compile(r"[A-Za-z]+")
_NOT_A_FINDING_AFTER = re.compile(r"[- ](?:effect|free|like)\b", re.I)  # "mass effect", "stone-free"



def finding_terms() -> list[str]:
    """Every finding term the rules know (singular and plural, lower case), longest first."""
    return sorted(_SINGULAR_OF, key=len, reverse=True)


def _finding_mentions(clause: str) -> list[tuple[int, int, str]]:
    """(start, end, lower-case term) of the finding terms in a clause, the longest term at each head word (a
    word-level lookup: one pass over the words instead of a 130-way regex alternation at every character)."""
    words = list(_WORD_RE.finditer(clause))
    lowered = [w.group(0).lower() for w in words]
    found = []
    for i, word in enumerate(lowered):
        for term in _TERMS_BY_HEAD.get(word, ()):
            first = i - len(term) + 1
            if first < 0 or tuple(lowered[first:i + 1]) != term:
                continue
            start, end = words[first].start(), words[i].end()
            if len(term) > 1 and clause[start:end].lower() != " ".join(term):
                continue  # the words are split by punctuation, not one term
            if not _NOT_A_FINDING_AFTER.match(clause, end):
                found.append((start, end, " ".join(term)))
            break
    return found


_CLAUSE_RE = re.compile(r"[.;:!?](?=\s|$)|\s(?:but|however|although|though|whereas|except)\b", re.I)
_TRIGGER_RE = re.compile(  # negation and hedge triggers (NegEx-style), one pattern
    r"\b(?:no|not|without|absence of|absent|negative for|free of|ruled out|rule out|excluded|exclude|resolved|"
    r"resolution of|neither|nor|no evidence of|no signs? of|disappearance of|never|possible|possibly|probable|"
    r"probably|likely|suspected|suspect|suspicious for|suspicion of|suspicious of|questionable|concerning for|"
    r"may|might|could|differential|versus|vs|history of|previous|prior|old|suggestive of|suggesting|"
    r"worrisome for|r/o|"
    r"presumed|presumably|query|equivocal|cannot be excluded|can not be excluded|"
    r"pas|sans|sin|ohne|keine?|senza|sem|n\u00e3o)\b|\?", re.I)  # the last: French/Spanish/German/Italian/Portuguese
_POST_NEGATION_RE = re.compile(
    r"^[^,;]{0,25}?\b(?:was|were|is|are|has been|have been)?\s*(?:excluded|absent|ruled out|resolved|not seen|"
    r"not identified|not visible|not present|not detected|cannot be excluded|can not be excluded|suspected)\b",
    re.I)
# words that end a negation's reach inside a clause ("no effusion, and a small nodule")
_SCOPE_BREAK_RE = re.compile(r",\s+(?:and\s+)?(?:an?|the)\b|\b(?:with|showing|shows|show|revealing|reveals|"
                             r"demonstrating|demonstrates|there is|there are|and an?|which|who|that)\b", re.I)
_NP_BREAK_RE = re.compile(r"[,;()]|\b(?:and|or|with|without|of|in|on|at|to|showing|shows|revealing|reveals|"
                          r"demonstrating|demonstrates|is|are|was|were|there|no|an?|the|from|by|for)\b", re.I)
_SIDE_RE = re.compile(r"\b(left|right|bilateral|bilaterally|both)\b", re.I)
# a size as written: decimal point or comma ("5,2 cm", as European captions write it), ranges ("2-3 cm", "2 to 3
# cm") and products ("3 x 4 cm", after "×"/"&times;" are read as "x"); never starting inside another number
_NUMBER = r"\d+(?:[.,]\d+)?"
_DIMENSIONS = rf"{_NUMBER}(?:\s*(?:-|to)\s*{_NUMBER})?(?:\s*x\s*{_NUMBER}(?:\s*(?:-|to)\s*{_NUMBER})?)*"
_SIZE_RE = re.compile(rf"(?<![\d.,])({_DIMENSIONS})\s*-?\s*(mm|cm)\b", re.I)
_POST_SIZE_RE = re.compile(r"^\s*(?:\(\s*|measuring\s+(?:about\s+|approximately\s+|up to\s+)?|of\s+)"
                           rf"({_DIMENSIONS})\s*(mm|cm)\b", re.I)
_LOCATION_RE = re.compile(
    r"^\s*(?:\([^)]*\)\s*)?(?:(?:is|are|was|were)\s+)?(?:(?:seen|located|noted|present|visible)\s+)?"
    r"(?:in|within|at|of|involving|along)\s+the\s+(?P<loc>[a-z][a-z' -]*?)"
    r"(?=\s*(?:[,;.()]|$)|\s+(?:with|and|or|showing|measuring|which|that|due|causing|from|after|on|at|in|"
    r"consistent|compatible|extending|is|are|was|were|as|by|for|to)\b)", re.I)
_BAD_LOCATION = {"image", "figure", "patient", "case", "setting", "context", "presence", "absence", "form", "level",
                 "same", "other", "process", "course", "time", "side", "size", "type", "region", "area", "site",
                 "scan", "study", "examination"}
_SIDES = {"left", "right", "bilateral", "both"}
_MORE_LOCATIONS_RE = re.compile(r"\s*(?:,|and|or|&)\s+(?:the\s+)?(?:left|right|bilateral|both|upper|lower|middle)\b",
                                re.I)
_ARROW_AFTER_RE = re.compile(r"\(\s*(?:[a-z]+\s+)?(arrows?|arrowheads?)\b[^)]*\)", re.I)
_ARROW_BEFORE_RE = re.compile(r"\b(arrows?|arrowheads?)\s+(?:indicates?|shows?|points?\s+to|marks?|denotes?|"
                              r"highlights?|demonstrates?|depicts?)\s+", re.I)


@dataclass
class Finding:
    """An affirmed finding mention: its canonical name (singular, lower case), the words as written, plural
    or not, and what the caption says about it (``None`` when unsaid)."""

    name: str
    surface: str
    plural: bool
    start: int
    end: int  # end of the mention with its location phrase
    side: str | None = None
    location: str | None = None
    size: str | None = None
    clause: int = 0


@dataclass
class _Facts:
    findings: list[Finding] = field(default_factory=list)
    arrows: list[str] = field(default_factory=list)


def _side_of(words: str) -> str | None:
    sides = {m.group(1).lower() for m in _SIDE_RE.finditer(words)}
    sides = {"bilateral" if s in ("bilaterally", "both") else s for s in sides}
    if "bilateral" in sides or sides == {"left", "right"}:
        return "bilateral"
    return sides.pop() if len(sides) == 1 else None


_TIMES_RE = re.compile(r"\s*x\s*")
_AS_ASCII = str.maketrans({"\u00d7": "x", "\u2013": "-", "\u2014": "-", "\u2212": "-", "\u00a0": " "})
_WORD_RE = re.compile(r"[^\W\d_]{2,}")


def read_caption(caption: str) -> str:
    """A caption as the rules read it: HTML entities decoded (``3&times;4`` -> ``3×4``), then the times sign,
    dashes and no-break spaces as ASCII (``3x4``, ``2-3``)."""
    return html.unescape(caption).translate(_AS_ASCII)


def is_english(caption: str) -> bool:
    """False when ``caption`` is confidently in another language (langdetect, seeded, p >= 0.9, over its words
    that are not all capitals). Captions of fewer than four such words are too short to tell and count as
    English; their negations in French, Spanish, German, Italian and Portuguese are still honoured."""
    words = [w for w in _WORD_RE.findall(caption) if not w.isupper()]  # CT, MRI, T2 say nothing of the language
    if len(words) < 4:
        return True
    from langdetect import DetectorFactory, LangDetectException, detect_langs

    DetectorFactory.seed = 0  # langdetect samples n-grams at random: the seed makes reruns agree
    try:
        best = detect_langs(" ".join(words))[0]
    except LangDetectException:
        return True
    return best.lang == "en" or best.prob < 0.9


def _size(number: str, unit: str) -> str:
    return _TIMES_RE.sub(" x ", number) + " " + unit.lower()


def _size_before(before: str, prefix_length: int) -> re.Match | None:
    """The size written in the noun phrase just before a mention (its last ``prefix_length`` characters), read
    whole even where its "5,2", "2 to 3" would break the phrase: the last size of ``before`` ending in it."""
    last = None
    for last in _SIZE_RE.finditer(before):
        pass
    return last if last is not None and last.end() > len(before) - prefix_length else None


def _clauses(text: str) -> list[tuple[int, str]]:
    out, start = [], 0
    for m in _CLAUSE_RE.finditer(text):
        out.append((start, text[start:m.start()]))
        start = m.end()
    out.append((start, text[start:]))
    return out


def _affirmed(clause: str, start: int, end: int, triggers: list[int]) -> bool:
    """False when the mention at clause[start:end] is negated or hedged (a trigger ending at one of ``triggers``
    before it in its clause, with no scope break between; or a post-trigger such as "was excluded" after it)."""
    for trigger_end in triggers:
        if trigger_end > start:
            break
        between = clause[trigger_end:start]
        if not _SCOPE_BREAK_RE.search(between) and len(between.split()) <= 8:
            return False
    after = clause[end:]
    return not (_POST_NEGATION_RE.search(after) or after.lstrip().startswith("?"))


def find_findings(text: str) -> _Facts:
    """Affirmed findings of an (expanded) caption, in order, with side, location and size, and what arrows mark."""
    facts = _Facts()
    for number, (offset, clause) in enumerate(_clauses(text)):
        mentions = []
        found = _finding_mentions(clause)
        triggers = [m.end() for m in _TRIGGER_RE.finditer(clause)] if found else []
        for m_start, m_end, surface in found:
            if not _affirmed(clause, m_start, m_end, triggers):
                continue
            name = _SINGULAR_OF[surface]
            prefix = _NP_BREAK_RE.split(clause[:m_start])[-1]
            after = clause[m_end:]
            loc_match = _LOCATION_RE.match(after)
            location = None
            end = m_end
            if loc_match:
                words = loc_match.group("loc").lower().split()
                listed = _MORE_LOCATIONS_RE.match(after, loc_match.end())  # "in the right and left lobes"
                if (0 < len(words) <= 5 and not listed and not _BAD_LOCATION.intersection(words)
                        and not _SIDES.issuperset(words)):
                    location = " ".join(words)
                    end = m_end + loc_match.end()
            size_match = (_size_before(clause[:m_start], len(prefix)) or _POST_SIZE_RE.match(clause[end:])
                          or _POST_SIZE_RE.match(after))
            side = _side_of(prefix) or (_side_of(location) if location else None)
            mentions.append(Finding(name, surface, surface != name, offset + m_start, offset + end, side, location,
                                    _size(*size_match.groups()) if size_match else None, number))
        facts.findings += mentions
        facts.arrows += _arrow_answers(clause, offset, mentions)
    return facts


def _arrow_answers(clause: str, offset: int, mentions: list[Finding]) -> list[str]:
    answers = []
    for m in _ARROW_AFTER_RE.finditer(clause):
        before = [f for f in mentions if f.end <= offset + m.start()]
        if before and not (m.group(1).lower().endswith("s") and len(before) > 1):
            answers.append(before[-1].surface)
    for m in _ARROW_BEFORE_RE.finditer(clause):
        after = [f for f in mentions if f.start >= offset + m.end()]
        if after:
            answers.append(after[0].surface)
    return answers


# --------------------------------------------------------------------------------------------- questions


def _pick(key: str, qtype: str, **fields: str) -> str:
    templates = TEMPLATES[qtype]
    return templates[zlib.crc32(f"{key}|{qtype}|{fields.get('f', '')}".encode()) % len(templates)].format(**fields)


def _one(values: Iterable[str | None]) -> str | None:
    """The single distinct non-empty value, else None."""
    found = {v for v in values if v}
    return found.pop() if len(found) == 1 else None


def _agreed(values: Iterable[str | None]) -> str | None:
    """The value every mention states (all non-empty and equal), else None."""
    values = list(values)
    return values[0] if values and all(values) and len(set(values)) == 1 else None


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def rules_qa(caption: str, concepts: Sequence[str] = (), key: str = "") -> list[tuple[str, str, str]]:
    """(question type, question, answer) triples for one caption and its manual concepts (CUIs), in a fixed order:
    modality, region, projection, plane, sequence, abnormality/findings, then per finding side, location, size,
    and the arrow. ``key`` (the row's ID) picks the phrasing. A caption not in English (``is_english``) gives none."""
    return _rules_qa(caption, concepts, key) if is_english(read_caption(caption)) else []


def _rules_qa(caption: str, concepts: Sequence[str], key: str) -> list[tuple[str, str, str]]:
    text = expand_abbreviations(read_caption(caption))
    out: list[tuple[str, str, str]] = []

    def add(qtype: str, answer: str | None, **fields: str) -> None:
        if answer:
            out.append((qtype, _pick(key, qtype, **fields), answer))

    concept_modality = _one(ROCOV2_MODALITIES.get(c) for c in concepts)
    modality = concept_modality or caption_modality(text)
    add("modality", modality)
    add("region", _one(REGION_ANSWERS.get(c) for c in concepts))
    add("projection", _one(PROJECTION_ANSWERS.get(c) for c in concepts))
    if modality not in ("X-ray", "angiography"):
        add("plane", _one(m.group(1).lower() for m in _PLANE_RE.finditer(text)))
    if modality in (None, "MRI"):
        add("sequence", _one(name for name, pattern in _SEQUENCES if pattern.search(text)))
    facts = find_findings(text)
    by_name: dict[str, list[Finding]] = {}
    for finding in facts.findings:
        by_name.setdefault(finding.name, []).append(finding)
    surfaces = [_one(f.surface for f in group) or group[0].name for group in by_name.values()]
    if len(surfaces) == 1:
        add("abnormality", surfaces[0])
    elif surfaces:
        add("findings", _join(surfaces))
    for surface, group in zip(surfaces, by_name.values()):
        fields = {"f": surface, "be": "are" if group[0].plural else "is"}
        add("side", _agreed(f.side for f in group), **fields)
        add("location", _agreed(f.location for f in group), **fields)
        add("size", _agreed(f.size for f in group), **fields)
    add("arrow", _one(facts.arrows))
    return out


def synthesize_rules(rows: Iterable[CaptionRow], not_english: list[str] | None = None) -> list[QARecord]:
    """QA records for every caption row (rows without a certain question give none); the IDs of captions not in
    English (``is_english``), which give none, are appended to ``not_english`` when given."""
    records = []
    for row in rows:
        if not is_english(read_caption(row.caption)):
            if not_english is not None:
                not_english.append(row.id)
            continue
        for qtype, question, answer in _rules_qa(row.caption, row.concepts, row.id):
            records.append(QARecord(row.id, row.image, row.caption, question, answer, qtype, "rules", None,
                                    RULES_VERSION))
    return records
