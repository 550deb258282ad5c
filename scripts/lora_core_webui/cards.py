"""The "Lora" tab of Extra Networks, for when the WebUI's built-in Lora extension is disabled.

Cards behave as users know them from the built-in: preview, description, search and sort, the metadata
button, the SD-version filter, and a click that writes ``<lora:NAME:WEIGHT>`` (plus the activation text)
into the prompt. User settings live in the built-in's ``stem.json`` sidecar, edited with the same fields.
A file that cannot be read still gets a card that says why; nothing here may break the tab.
"""
from __future__ import annotations

import datetime
import html
import json
import math
import os
import re
import urllib.parse
from typing import Any, Iterator

import gradio as gr

from modules import errors, extra_networks, hashes, shared, ui_extra_networks
from modules.ui_extra_networks import quote_js
from modules.ui_extra_networks_user_metadata import UserMetadataEditor

from lora_core.errors import LoraError, LoraFileError
from lora_core.library import LoraEntry, LoraLibrary
from lora_core.syntax import format_name as quote_lora_name, format_number

from . import state

# Our family ids -> the labels the built-in uses in its sidecar ("sd version") and options.
VERSION_LABELS = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL", "unknown": "Unknown"}
UNKNOWN = "Unknown"
# Read in the browser when the card is clicked, so a changed setting applies without a refresh.
DEFAULT_WEIGHT_JS = "opts.extra_networks_default_multiplier"


# ---------------------------------------------------------------------------------------------
# Plain helpers (no page state)
# ---------------------------------------------------------------------------------------------

def card_names(entries: list[LoraEntry]) -> dict[str, LoraEntry]:
    """A unique card name per entry: its file stem, or, for a stem used by several files, its path under the root
    without the suffix (``sub/name``); the root's folder name or the full path only when that is not unique."""
    stem_count: dict[str, int] = {}
    for entry in entries:
        stem_count[entry.name] = stem_count.get(entry.name, 0) + 1
    names: dict[str, LoraEntry] = {}
    for entry in entries:
        candidates = [entry.name] if stem_count[entry.name] == 1 else []
        candidates += [*_relative_stems(entry), str(entry.path.with_suffix(""))]
        name = next((c for c in candidates if c not in names), candidates[-1])
        names[name] = entry
    return names


def _relative_stems(entry: LoraEntry) -> list[str]:
    """The entry's path without suffix relative to its root, then relative to the root's parent."""
    path = os.path.abspath(entry.path.with_suffix(""))
    for root in state.lora_roots():
        root = os.path.abspath(root)
        if ui_extra_networks.path_is_parent(root, path):
            return [os.path.relpath(path, base).replace(os.sep, "/") for base in (root, os.path.dirname(root))]
    return []


def display_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """The header metadata with JSON-object values decoded (``ss_tag_frequency``...), as the built-in shows it."""
    shown: dict[str, Any] = {}
    for key, value in metadata.items():
        if isinstance(value, str) and value.startswith("{"):
            try:
                value = json.loads(value)
            except ValueError:
                pass  # not JSON after all: shown as the text it is
        shown[key] = value
    return shown


def preferred_weight(user_metadata: dict[str, Any]) -> float | None:
    """The sidecar's ``preferred weight`` if it is a usable non-zero number (0 is "not set", as in the built-in)."""
    try:
        weight = float(user_metadata.get("preferred weight") or 0)
    except (TypeError, ValueError):
        return None
    return weight if weight and math.isfinite(weight) else None


def _text(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""


def prompt_js(name: str, user_metadata: dict[str, Any]) -> str:
    """The JS expression the card's click inserts into the prompt."""
    weight = preferred_weight(user_metadata)
    weight_js = format_number(weight) if weight is not None else DEFAULT_WEIGHT_JS
    try:
        quoted = quote_lora_name(name)
    except ValueError:  # a file stem with '>' or a control character: no prompt can name it, the card inserts nothing
        return quote_js("")
    prompt = f"{quote_js(f'<lora:{quoted}:')} + {weight_js} + {quote_js('>')}"
    activation = _text(user_metadata.get("activation text"))
    if activation:
        prompt += " + " + quote_js(" " + activation)
    return prompt


def negative_prompt_js(user_metadata: dict[str, Any]) -> str:
    negative = _text(user_metadata.get("negative text"))
    return quote_js(f"({negative}:1)" if negative else "")


def model_version_label(model) -> str | None:
    """The loaded model's family as the built-in labels it, or None for a family it has no label for."""
    for attribute, label in (("is_sdxl", "SDXL"), ("is_sd2", "SD2"), ("is_sd1", "SD1")):
        if getattr(model, attribute, False):
            return label
    return None


def hidden_for_model(version: str, model_version: str | None) -> bool:
    """The built-in's rule: other families are hidden; unknown ones only for the families the user picked."""
    if model_version is None:
        return False
    if version == UNKNOWN:
        return model_version in (state.option("lora_hide_unknown_for_versions", []) or [])
    return version != model_version


def training_tags(metadata: dict[str, Any]) -> list[tuple[str, int]]:
    """Tags of the training captions (``ss_tag_frequency``), most frequent first.

    Datasets captioned in sentences rather than comma tags are counted by word (words of 3+ letters)."""
    frequency = metadata.get("ss_tag_frequency")
    counts: dict[str, int] = {}
    if isinstance(frequency, dict):
        for dataset in frequency.values():
            if not isinstance(dataset, dict):
                continue
            for tag, count in dataset.items():
                try:
                    counts[str(tag).strip()] = counts.get(str(tag).strip(), 0) + int(count)
                except (TypeError, ValueError):
                    continue
    if counts and sum(map(len, counts)) / len(counts) >= 16:  # long "tags" are sentences
        words: dict[str, int] = {}
        for sentence, count in counts.items():
            for word in re.findall(r"[-_\w']{3,}", sentence):
                words[word] = words.get(word, 0) + count
        counts = words
    return sorted(counts.items(), key=lambda pair: pair[1], reverse=True)


# ---------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------

class ExtraNetworksPageLoraCore(ui_extra_networks.ExtraNetworksPage):
    def __init__(self):
        super().__init__("Lora")
        self._by_name: dict[str, LoraEntry] = {}

    @property
    def library(self) -> LoraLibrary:
        return state.runtime().library

    def refresh(self):
        self.library.refresh()

    def allowed_directories_for_previews(self):
        return state.lora_roots()

    def create_user_metadata_editor(self, ui, tabname):
        return LoraCoreUserMetadataEditor(ui, tabname, self)

    # -- listing ---------------------------------------------------------------------------------

    def list_items(self) -> Iterator[dict]:
        try:
            self._by_name = card_names(self.library.entries)
        except Exception:  # the other tabs must still render; the console says why this one is empty
            errors.report("[lora-core] listing the LoRA files", exc_info=True)
            return
        for index, name in enumerate(list(self._by_name)):
            item = self.create_item(name, index)
            if item is not None:
                yield item

    def entry_named(self, name: str) -> LoraEntry | None:
        entry = self._by_name.get(name)
        if entry is None or not entry.path.exists():  # a card asked for after a refresh, or a file just added
            self._by_name = card_names(self.library.entries)
            entry = self._by_name.get(name)
        return entry

    def create_item(self, name, index=None, enable_filter=True):
        entry = self.entry_named(name)
        if entry is None:  # only the WebUI's single-card refresh asks for a name that is not listed
            return self._plain_item(name, "", index, "Not in the LoRA folders any more: refresh the page", name)
        try:
            item = self._item(name, entry, index)
            if enable_filter and self._filtered_out(item):
                return None
            return item
        except Exception as e:  # whatever went wrong, the card still shows, and says so
            errors.report(f"[lora-core] building the card for {entry.path}", exc_info=True)
            return self._plain_item(name, os.path.abspath(entry.path), index, f"Card error: {type(e).__name__}: {e}",
                                    entry.name)

    def _item(self, name: str, entry: LoraEntry, index) -> dict:
        filename = os.path.abspath(entry.path)
        path = os.path.splitext(filename)[0]
        notices: list[str] = []
        try:
            metadata = display_metadata(entry.metadata)
        except LoraFileError as e:
            metadata = {}
            notices.append(f"Unusable: {e}")
        full_hash = self._known_hash(entry)
        search_terms = [self.search_terms_from_path(filename)]
        if entry.alias != entry.name:
            search_terms.append(entry.alias)
        if full_hash:
            search_terms.append(full_hash)
        item = {
            "name": name,
            "filename": filename,
            "shorthash": full_hash[:12],
            "preview": self.find_preview(path) or self._cover_image_url(name, metadata),
            "file_description": self.find_description(path) or "",
            "search_terms": [html.escape(term) for term in search_terms if term],  # the page inserts them raw
            "local_preview": f"{path}.{shared.opts.samples_format}",
            "metadata": metadata,
            "sort_keys": {"default": index, **self.get_sort_keys(filename)},
            "sd_version": VERSION_LABELS.get(entry.sd_version, UNKNOWN),
            "detected_sd_version": VERSION_LABELS.get(entry.sd_version, UNKNOWN),
            "notices": notices,
        }
        prompt_name = self._prompt_name(entry)
        if not notices:
            self._check_reachable(prompt_name, entry, notices)
        item["prompt_name"] = prompt_name
        self.read_user_metadata(item)
        return item

    def _plain_item(self, name: str, filename: str, index, notice: str, prompt_name: str) -> dict:
        """A card with no file data, only the notice, built without anything that could fail again."""
        return {
            "name": name,
            "filename": filename,
            "shorthash": "",
            "preview": None,
            "file_description": "",
            "search_terms": [html.escape(self.search_terms_from_path(filename))] if filename else [],
            "local_preview": f"{os.path.splitext(filename)[0]}.{shared.opts.samples_format}" if filename else "",
            "metadata": {},
            "sort_keys": {"default": index, "name": os.path.basename(filename).lower(), "path": filename.lower()},
            "sd_version": UNKNOWN,
            "detected_sd_version": UNKNOWN,
            "notices": [notice],
            "prompt_name": prompt_name,
            "user_metadata": {},
            "description": notice,
            "prompt": prompt_js(prompt_name, {}),
            "negative_prompt": quote_js(""),
        }

    def _prompt_name(self, entry: LoraEntry) -> str:
        if state.option("lora_preferred_name", "Alias from file") == "Filename":
            return entry.name
        return self.library.prompt_name(entry)

    def _check_reachable(self, prompt_name: str, entry: LoraEntry, notices: list[str]) -> None:
        """A card whose name leads elsewhere (two files with one stem) says so instead of silently failing."""
        try:
            found = self.library.resolve(prompt_name)
        except LoraError as e:
            notices.append(f"Cannot be used by name: {e}")
            return
        if found is not entry:
            notices.append(f"'{prompt_name}' names {found.path}, not this file: rename one of them")

    def _known_hash(self, entry: LoraEntry) -> str:
        """The hash if it is known without reading the file: metadata, computed earlier, or the WebUI's cache."""
        try:
            if entry.hash_is_known:
                return entry.hash
        except LoraFileError:
            return ""
        title = f"lora/{entry.name}"
        return hashes.sha256_from_cache(str(entry.path), title, use_addnet_hash=_is_safetensors(entry)) or ""

    def compute_hash(self, entry: LoraEntry) -> str:
        """The hash, computed if needed (stored in the WebUI's hash cache, as the built-in does)."""
        known = self._known_hash(entry)
        if known:
            return known
        return hashes.sha256(str(entry.path), f"lora/{entry.name}", use_addnet_hash=_is_safetensors(entry)) or ""

    def _cover_image_url(self, name: str, metadata: dict) -> str | None:
        """The first cover image embedded in the file (``ssmd_cover_images``), served by the WebUI's endpoint."""
        covers = metadata.get("ssmd_cover_images")
        if not isinstance(covers, str):
            return None
        try:
            if not any(json.loads(covers)):
                return None
        except (ValueError, TypeError):
            return None
        return f"./sd_extra_networks/cover-images?page={self.extra_networks_tabname}&item={urllib.parse.quote(name)}"

    # -- user metadata, description, prompt --------------------------------------------------------

    def read_user_metadata(self, item, use_cache=True):
        """The ``stem.json`` sidecar, then what depends on it: description, prompt, negative prompt, SD version."""
        lister = self.lister if use_cache else None
        user_metadata = extra_networks.get_user_metadata(item.get("filename") or None, lister=lister)
        if not isinstance(user_metadata, dict):
            errors.report(f"[lora-core] ignoring user metadata of {item.get('filename')}: not a JSON object")
            user_metadata = {}
        item["user_metadata"] = user_metadata
        description = user_metadata.get("description")
        if not isinstance(description, str) or not description:
            description = item.get("file_description", "")
        item["description"] = "\n".join([*item.get("notices", []), description]).strip()
        item["prompt"] = prompt_js(item.get("prompt_name") or item["name"], user_metadata)
        item["negative_prompt"] = negative_prompt_js(user_metadata)
        chosen = user_metadata.get("sd version")
        if chosen in VERSION_LABELS.values():
            item["sd_version"] = chosen
        else:
            item["sd_version"] = item.get("detected_sd_version", UNKNOWN)

    def _filtered_out(self, item: dict) -> bool:
        if state.option("lora_show_all", False):
            return False
        model = shared.sd_model
        if not model:
            return False
        return hidden_for_model(item["sd_version"], model_version_label(model))


def _is_safetensors(entry: LoraEntry) -> bool:
    return entry.path.suffix.lower() == ".safetensors"


# ---------------------------------------------------------------------------------------------
# The editor of the user metadata
# ---------------------------------------------------------------------------------------------

class LoraCoreUserMetadataEditor(UserMetadataEditor):
    """Edits the sidecar with the built-in's fields: description, SD version, activation text, preferred weight,
    negative text, notes; shows the training tags (click one to add it to the activation text)."""

    page: ExtraNetworksPageLoraCore

    def __init__(self, ui, tabname, page):
        super().__init__(ui, tabname, page)
        self.select_sd_version = None
        self.taginfo = None
        self.edit_activation_text = None
        self.slider_preferred_weight = None
        self.edit_negative_text = None

    def get_user_metadata(self, name):
        """The item's sidecar; a new one starts from the description file (never from the card's notices)."""
        item = self.page.items.get(name) or {}
        user_metadata = item.get("user_metadata")
        if not user_metadata:
            user_metadata = {"description": item.get("file_description", "")}
            item["user_metadata"] = user_metadata
        return user_metadata

    def save_lora_user_metadata(self, name, description, sd_version, activation_text, weight, negative_text, notes):
        user_metadata = self.get_user_metadata(name)
        user_metadata.update({
            "description": description,
            "sd version": sd_version,
            "activation text": activation_text,
            "preferred weight": weight,
            "negative text": negative_text,
            "notes": notes,
        })
        self.write_user_metadata(name, user_metadata)

    def get_metadata_table(self, name):
        item = self.page.items.get(name) or {}
        entry = self.page.entry_named(name)
        if entry is not None and not item.get("shorthash"):
            try:
                item["shorthash"] = self.page.compute_hash(entry)[:12]
            except (OSError, LoraFileError) as e:
                errors.report(f"[lora-core] hashing {entry.path}: {e}")
        table = super().get_metadata_table(name)
        metadata = item.get("metadata") or {}
        if entry is not None and entry.alias != entry.name:
            table.append(("Alias:", html.escape(entry.alias)))
        table.append(("Detected version:", item.get("detected_sd_version", UNKNOWN)))
        for key, label in (("ss_sd_model_name", "Model:"), ("ss_clip_skip", "Clip skip:"),
                           ("ss_network_module", "Kohya module:"), ("ss_network_dim", "Dim:"),
                           ("ss_network_alpha", "Alpha:")):
            value = metadata.get(key)
            if value is not None and str(value) != "None":
                table.append((label, html.escape(str(value))))
        trained = _training_date(metadata.get("ss_training_started_at"))
        if trained:
            table.append(("Date trained:", trained))
        images = _dataset_size(metadata.get("ss_dataset_dirs"))
        if images:
            table.append(("Dataset size:", images))
        for notice in item.get("notices", []):
            table.append(("Problem:", html.escape(notice)))
        return table

    def put_values_into_components(self, name):
        values = super().put_values_into_components(name)
        item = self.page.items.get(name) or {}
        user_metadata = self.get_user_metadata(name)
        tags = training_tags(item.get("metadata") or {})
        return [
            *values,
            item.get("sd_version", UNKNOWN),
            gr.HighlightedText.update(value=[(tag, str(count)) for tag, count in tags[:24]], visible=bool(tags)),
            _text(user_metadata.get("activation text")),
            preferred_weight(user_metadata) or 0.0,
            _text(user_metadata.get("negative text")),
        ]

    def create_extra_default_items_in_left_column(self):
        self.select_sd_version = gr.Dropdown(list(VERSION_LABELS.values()), value=UNKNOWN,
                                             label="Stable Diffusion version", interactive=True)

    def create_editor(self):
        self.create_default_editor_elems()
        self.taginfo = gr.HighlightedText(label="Training dataset tags")
        self.edit_activation_text = gr.Text(label="Activation text", info="Will be added to prompt along with Lora")
        self.slider_preferred_weight = gr.Slider(label="Preferred weight", info="Set to 0 to disable",
                                                 minimum=0.0, maximum=2.0, step=0.01)
        self.edit_negative_text = gr.Text(label="Negative prompt", info="Will be added to negative prompts")
        self.edit_notes = gr.TextArea(label="Notes", lines=4)
        self.taginfo.select(fn=toggle_tag, inputs=[self.edit_activation_text], outputs=[self.edit_activation_text],
                            show_progress=False)
        self.create_default_buttons()

        shown = [self.edit_name, self.edit_description, self.html_filedata, self.html_preview, self.edit_notes,
                 self.select_sd_version, self.taginfo, self.edit_activation_text, self.slider_preferred_weight,
                 self.edit_negative_text]
        self.button_edit \
            .click(fn=self.put_values_into_components, inputs=[self.edit_name_input], outputs=shown) \
            .then(fn=lambda: gr.update(visible=True), inputs=[], outputs=[self.box])
        edited = [self.edit_description, self.select_sd_version, self.edit_activation_text,
                  self.slider_preferred_weight, self.edit_negative_text, self.edit_notes]
        self.setup_save_handler(self.button_save, self.save_lora_user_metadata, edited)


def toggle_tag(activation_text: str, evt: gr.SelectData) -> str:
    """Clicking a training tag adds it to the activation text, or removes it when it is there already."""
    tag = evt.value[0] if isinstance(evt.value, (list, tuple)) else str(evt.value)
    words = [word for word in re.split(r"\s*,\s*", activation_text or "") if word.strip()]
    if tag in words:
        return ", ".join(word for word in words if word != tag)
    return ", ".join([*words, tag])


def _training_date(started_at: Any) -> str:
    try:
        moment = datetime.datetime.fromtimestamp(float(started_at), tz=datetime.timezone.utc)
    except (TypeError, ValueError, OverflowError, OSError):
        return ""
    return moment.strftime("%Y-%m-%d %H:%M")


def _dataset_size(dataset_dirs: Any) -> int:
    if not isinstance(dataset_dirs, dict):
        return 0
    total = 0
    for params in dataset_dirs.values():
        try:
            total += int(params.get("img_count", 0))
        except (AttributeError, TypeError, ValueError):
            continue
    return total
