"""The prompt vocabulary: class names, synonyms, prompt templates and held-out paraphrases.

Every part of the system (renderer mask channels, training prompts, refusal of unknown prompts, the
node's prompt parsing) reads the same ``config/vocabulary.yaml`` through this module, so that a class
name means the same thing everywhere. The file's SHA-256 is stored with every shard set and model.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from fluorosam_common.prompts import normalize_prompt

# libyaml's safe loader reads the 2,000-line vocabulary in ~20 ms instead of ~215 (node start-up, every worker).
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
KINDS = ("anatomy", "group", "tool")


@dataclass(frozen=True)
class VocabClass:
    """One promptable class. ``label_ids``: TotalSegmentator id (anatomy), member ids (group), tool id (tool).

    ``hidden_by``: names of classes whose projection removes this class's pixels, for classes whose
    radiographic meaning differs from their 3-D projection (e.g. a lung field that ends at the diaphragm
    dome, where the organs under it start to overlap the lung).
    """

    name: str
    kind: str
    label_ids: tuple[int, ...]
    synonyms: tuple[str, ...]
    heldout: tuple[str, ...]
    hidden_by: tuple[str, ...] = ()


class Vocabulary:
    """The classes of ``config/vocabulary.yaml`` with phrase generation and exact-match lookup."""

    def __init__(self, classes: list[VocabClass], templates: list[str], heldout_templates: list[str],
                 oov_examples: list[str], sha256: str):
        self.classes = list(classes)
        self.names = [c.name for c in self.classes]
        self.templates = list(templates)
        self.heldout_templates = list(heldout_templates)
        self.oov_examples = list(oov_examples)
        self.sha256 = sha256
        self._by_name = {c.name: c for c in self.classes}
        if len(self._by_name) != len(self.classes):
            raise ValueError("vocabulary has duplicate class names")
        for c in self.classes:
            for other in c.hidden_by:
                hider = self._by_name.get(other)
                if hider is None or hider.kind == "tool" or hider.name == c.name:
                    raise ValueError(f"class {c.name!r}: hidden_by {other!r} is not another anatomy or group class")
        self._lookup: dict[str, str] = {}
        for c in self.classes:
            for phrase in (c.name, *c.synonyms):
                key = normalize_prompt(phrase)
                owner = self._lookup.setdefault(key, c.name)
                if owner != c.name:
                    raise ValueError(f"phrase {phrase!r} names both {owner!r} and {c.name!r}")
        self._template_patterns = [self._template_regex(t) for t in (*self.templates, *self.heldout_templates)]

    @classmethod
    def load(cls, path: str | Path | None = None) -> Vocabulary:
        """Read and validate a vocabulary YAML (default: the package's ``config/vocabulary.yaml``)."""
        if path is None:
            from fluorosam_common.paths import config_path

            path = config_path("vocabulary.yaml")
        raw = Path(path).read_bytes()
        doc = yaml.load(raw, Loader=_YAML_LOADER)
        if not isinstance(doc, dict) or "classes" not in doc:
            raise ValueError(f"{path}: not a vocabulary file (no 'classes')")
        templates = list(doc.get("templates") or ["{}"])
        heldout_templates = list(doc.get("heldout_templates") or [])
        for t in (*templates, *heldout_templates):
            if t.count("{}") != 1:
                raise ValueError(f"{path}: template {t!r} must contain exactly one '{{}}'")
        classes = []
        for entry in doc["classes"]:
            kind = entry.get("kind")
            if kind not in KINDS:
                raise ValueError(f"{path}: class {entry.get('name')!r} has kind {kind!r}, expected one of {KINDS}")
            ids = tuple(int(i) for i in entry.get("label_ids") or ())
            if not ids:
                raise ValueError(f"{path}: class {entry['name']!r} has no label_ids")
            classes.append(VocabClass(str(entry["name"]), kind, ids, tuple(entry.get("synonyms") or ()),
                                      tuple(entry.get("heldout") or ()), tuple(entry.get("hidden_by") or ())))
        return cls(classes, templates, heldout_templates, list(doc.get("oov_examples") or []),
                   hashlib.sha256(raw).hexdigest())

    def get(self, name: str) -> VocabClass:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"{name!r} is not a vocabulary class") from None

    @property
    def hiding_rules(self) -> dict[str, list[str]]:
        """Class name -> the classes that hide it, for every class with ``hidden_by`` (recorded in manifests)."""
        return {c.name: list(c.hidden_by) for c in self.classes if c.hidden_by}

    def training_phrases(self, name: str) -> list[str]:
        """Name and synonyms, each inside every training template; deduplicated after normalization."""
        c = self.get(name)
        return _unique(t.format(p) for p in (c.name, *c.synonyms) for t in self.templates)

    def heldout_phrases(self, name: str) -> list[str]:
        """Paraphrases never used in training: the class's held-out phrases and the held-out templates."""
        c = self.get(name)
        candidates = [*c.heldout, *(t.format(c.name) for t in self.heldout_templates)]
        training = {normalize_prompt(p) for p in self.training_phrases(name)}
        return [p for p in _unique(candidates) if normalize_prompt(p) not in training]

    def lookup(self, prompt: str) -> str | None:
        """Class name whose name or synonym equals the normalized prompt, also inside a known template."""
        key = normalize_prompt(prompt)
        if key in self._lookup:
            return self._lookup[key]
        for pattern in self._template_patterns:
            match = pattern.fullmatch(key)
            if match and match.group(1) in self._lookup:
                return self._lookup[match.group(1)]
        return None

    @staticmethod
    def _template_regex(template: str) -> re.Pattern:
        before, after = (normalize_prompt(part) for part in template.split("{}"))
        parts = [re.escape(before) + " " if before else "", "(.+)", " " + re.escape(after) if after else ""]
        return re.compile("".join(parts))


def _unique(phrases) -> list[str]:
    seen, out = set(), []
    for p in phrases:
        key = normalize_prompt(p)
        if key and key not in seen:
            seen.add(key)
            out.append(p)
    return out
