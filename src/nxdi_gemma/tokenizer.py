"""Text <-> token ids with the checkpoint's `tokenizer.json` (the `tokenizers` library; no transformers)."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import InputError


class TextTokenizer:
    def __init__(self, model_dir: str | Path):
        from tokenizers import Tokenizer

        root = Path(model_dir)
        path = root / "tokenizer.json"
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as err:  # the tokenizers library raises bare Exception for unreadable files
            raise InputError(f"{path}: not a tokenizer the `tokenizers` library can read ({err}); re-download it, "
                             "or delete it and give token-id prompts") from None
        settings_path = root / "tokenizer_config.json"
        try:
            settings = json.loads(settings_path.read_text()) if settings_path.is_file() else {}
        except json.JSONDecodeError as err:
            raise InputError(f"{settings_path}: not valid JSON ({err}); fix or re-download the file") from None
        if not isinstance(settings, dict):
            raise InputError(f"{settings_path}: expected a JSON object; fix or re-download the file")
        bos = settings.get("bos_token")
        bos = bos.get("content") if isinstance(bos, dict) else bos
        self.bos_id = self.tokenizer.token_to_id(bos) if bos and settings.get("add_bos_token", False) else None

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text).ids
        if self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]  # tokenizer_config asks for BOS but tokenizer.json's post-processor lacks it
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def load_tokenizer(model_dir: str | Path) -> TextTokenizer | None:
    """The checkpoint's tokenizer, or None when it ships no tokenizer.json."""
    return TextTokenizer(model_dir) if (Path(model_dir) / "tokenizer.json").is_file() else None


def prompts_to_ids(prompts: list, tokenizer: TextTokenizer | None, source: str) -> list[list[int]]:
    """Each prompt is a string (needs a tokenizer) or a list of token ids."""
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if tokenizer is None:
                raise InputError(
                    f"{source}: prompt {i} is text but the checkpoint has no tokenizer.json; give token-id lists"
                )
            out.append(tokenizer.encode(p))
        elif isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            out.append(list(p))
        else:
            raise InputError(f"{source}: prompt {i} must be a string or a list of token ids, got {p!r:.60}")
        if not out[-1]:
            raise InputError(f"{source}: prompt {i} is empty; give at least one token")
    return out
