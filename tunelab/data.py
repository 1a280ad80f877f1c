"""The data set registry (`<dataset_dir>/dataset_info.json`) and the loader that turns its files into
`Example`s — the one normalised row every template formats.

    from tunelab.data import load_examples
    examples, stats = load_examples(args.data)      # args.data: DataArguments (dataset, dataset_dir, ...)
    print(stats.summary())

The registry uses the April-2023 ChatGLM-Efficient-Tuning schema, plus three optional keys:

    "name": {"file_name": "dir/file.json",          # .json (list of objects, or JSON lines), .jsonl, .csv
             "file_sha1": "...",                    # checked; a mismatch only warns (as in 2023)
             "columns": {"prompt": "instruction", "query": "input", "response": "output",
                         "history": "history", "system": "system"},
             "formatting": "alpaca" | "sharegpt",   # sharegpt: "columns": {"messages": "conversations"}
             "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human",
                      "assistant_tag": "gpt", "system_tag": "system"},   # sharegpt only; auto-detected if absent
             "rows": [start, end] | [start, end, step]}  # only these rows of the file (a Python slice; null = open)

Behaviour kept from 2023: `max_samples` takes the first n rows of each data set before they are concatenated;
rows with no prompt text or no response are skipped (counted in DataStats). Identity placeholders
([NAME], <NAME>, <AUTHOR>, {{name}}, {{author}}) are filled from --identity_name / --identity_author.
`hf_hub_url` / `script_url` entries are refused: tunelab never downloads at run time.

Pure apart from reading files; imports nothing heavy.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.errors import TunelabError, closest

if TYPE_CHECKING:
    from tunelab.hparams import DataArguments

logger = logging.getLogger(__name__)

INFO_FILE = "dataset_info.json"
REPO_DIR = Path(__file__).resolve().parents[1]  # a relative --dataset_dir is also looked up here (checkout data/)
ENTRY_KEYS = ("file_name", "file_sha1", "columns", "formatting", "tags", "rows", "hf_hub_url", "script_url")
ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "history": "history",
                  "system": "system"}
SHAREGPT_COLUMNS = {"messages": "conversations", "system": "system"}
REQUIRED = {"alpaca": ("prompt", "response"), "sharegpt": ("messages",)}
TAG_KEYS = ("role_tag", "content_tag", "user_tag", "assistant_tag", "system_tag")


@dataclass(frozen=True)
class Example:
    """One training/eval row. `prompt` and `query` are the 2023 instruction and input; `history` holds the
    earlier (user, assistant) turns, oldest first; `system` is the row's own system prompt, if any."""

    prompt: str
    query: str
    response: str
    history: tuple[tuple[str, str], ...] = ()
    system: str | None = None


@dataclass
class SetCounts:
    loaded: int = 0          # rows read (after the "rows" range and max_samples)
    kept: int = 0            # rows that became Examples
    skipped_empty: int = 0   # rows without prompt text or without a response


@dataclass
class DataStats:
    """Per data set row counts, in the order the data sets were asked for."""

    sets: dict[str, SetCounts] = field(default_factory=dict)

    @property
    def kept(self) -> int:
        return sum(c.kept for c in self.sets.values())

    def summary(self) -> str:
        parts = [f"{name}: {c.loaded} loaded, {c.kept} kept, {c.skipped_empty} skipped (empty)"
                 for name, c in self.sets.items()]
        return "data sets: " + "; ".join(parts) + f" -> {self.kept} examples"

    def to_dict(self) -> dict[str, dict[str, int]]:
        return {name: vars(c).copy() for name, c in self.sets.items()}


# ---------------------------------------------------------------- registry

def resolve_dataset_dir(dataset_dir: str | Path) -> Path:
    """The folder holding dataset_info.json: `dataset_dir` itself, or for a relative path not found from the
    working directory, the same path inside the tunelab checkout (so the shipped `data/` works anywhere)."""
    path = Path(dataset_dir)
    candidates = [path] if path.is_absolute() else [path, REPO_DIR / path]
    for folder in candidates:
        if (folder / INFO_FILE).is_file():
            return folder
    looked = " and ".join(str((c / INFO_FILE).resolve()) for c in candidates)
    raise TunelabError(f"no {INFO_FILE} found (looked for {looked}); set --dataset_dir to the folder holding it")


def load_dataset_info(dataset_dir: str | Path) -> dict[str, dict[str, Any]]:
    """The parsed registry of `dataset_dir` (errors name the file, and the line for malformed JSON)."""
    path = resolve_dataset_dir(dataset_dir) / INFO_FILE
    info = parse_json(read_text(path), path)
    if not isinstance(info, dict) or not all(isinstance(v, dict) for v in info.values()):
        raise TunelabError(f"{path}: must map each data set name to an object with a file_name")
    return info


def dataset_names(spec: str | None) -> list[str]:
    names = [n.strip() for n in (spec or "").split(",") if n.strip()]
    if not names:
        raise TunelabError("--dataset is required: a comma list of names from dataset_info.json")
    return names


def get_entry(info: dict[str, dict[str, Any]], name: str, dataset_dir: Path) -> dict[str, Any]:
    """The checked registry entry for `name` (unknown names/keys and hub entries fail with valid choices)."""
    if name not in info:
        raise TunelabError(f"unknown data set '{name}' in {dataset_dir / INFO_FILE}: {closest(name, sorted(info))}")
    entry = info[name]
    for key in entry:
        if key not in ENTRY_KEYS:
            raise TunelabError(f"data set '{name}': unknown key '{key}': {closest(key, ENTRY_KEYS)}")
    if "file_name" not in entry:
        remote = entry.get("hf_hub_url") or entry.get("script_url")
        what = f"'{remote}' (hf_hub_url/script_url)" if remote else "no file_name"
        raise TunelabError(f"data set '{name}' has {what}: tunelab never downloads at run time; put the file in "
                           f"{dataset_dir} and use file_name")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in REQUIRED:
        raise TunelabError(f"data set '{name}': formatting '{formatting}': {closest(formatting, list(REQUIRED))}")
    valid_columns = ALPACA_COLUMNS if formatting == "alpaca" else SHAREGPT_COLUMNS
    for role in entry.get("columns") or {}:
        if role not in valid_columns:
            raise TunelabError(f"data set '{name}': unknown column role '{role}' for {formatting}: "
                               f"{closest(role, list(valid_columns))}")
    for tag in entry.get("tags") or {}:
        if tag not in TAG_KEYS:
            raise TunelabError(f"data set '{name}': unknown tag '{tag}': {closest(tag, TAG_KEYS)}")
    span = entry.get("rows")
    if span is not None and not (isinstance(span, list) and len(span) in (2, 3)
                                 and all(v is None or isinstance(v, int) for v in span)
                                 and (len(span) == 2 or span[2] is None or span[2] > 0)):
        raise TunelabError(f"data set '{name}': rows must be [start, end] or [start, end, step] (integers or "
                           f"null; step > 0), got {span!r}")
    return entry


def data_file(entry: dict[str, Any], dataset_dir: Path, name: str) -> Path:
    path = dataset_dir / entry["file_name"]
    if not path.is_file():
        raise TunelabError(f"data set '{name}': file not found: {path}")
    return path


def check_sha1(path: Path, expected: str | None, name: str) -> None:
    """2023 behaviour: a checksum mismatch warns (line endings may differ by platform), it does not fail."""
    if not expected:
        return
    actual = hashlib.sha1(path.read_bytes()).hexdigest()
    if actual != expected:
        logger.warning("data set '%s': sha1 of %s is %s, dataset_info.json says %s", name, path, actual, expected)


# ---------------------------------------------------------------- files

def read_text(path: Path) -> str:
    """A file's text as UTF-8; a bad byte fails naming the file, its line and byte offset."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise TunelabError(f"{path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}): "
                           "save the file as UTF-8") from None


def parse_json(text: str, path: Path, line_offset: int = 0) -> Any:
    """json.loads(text); malformed JSON fails naming path:line (`line_offset`: lines before `text`)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        line = err.lineno + line_offset
        raise TunelabError(f"{path}:{line}: malformed JSON ({err.msg}, column {err.colno})") from None


def _read_json_lines(text: str, path: Path) -> list[Any]:
    return [parse_json(line, path, number - 1) for number, line in enumerate(text.splitlines(), 1) if line.strip()]


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a .json (a list of objects, or JSON lines as HF datasets also accepts), .jsonl or .csv file."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        rows: Any = list(csv.DictReader(io.StringIO(read_text(path), newline="")))
    elif suffix == ".jsonl":
        rows = _read_json_lines(read_text(path), path)
    elif suffix == ".json":
        rows = _read_json(read_text(path), path)
    else:
        raise TunelabError(f"{path}: unsupported file type '{suffix}': use .json, .jsonl or .csv")
    if not isinstance(rows, list):
        raise TunelabError(f"{path}: expected a JSON list of objects, got {type(rows).__name__}")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise TunelabError(f"{path}: row {i} is {type(row).__name__}, expected an object")
    return rows


def _read_json(text: str, path: Path) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # one object per line in a .json file
            return _read_json_lines(text, path)
        return parse_json(text, path)  # raises the error with file and line


# ---------------------------------------------------------------- rows -> Examples

def _columns(entry: dict[str, Any], rows: list[dict[str, Any]], path: Path) -> dict[str, str]:
    """role -> file column. Roles not listed in "columns" take the default name and are used when present;
    listed ones (and the required prompt/response/messages) must exist; "" or null means "no such column"."""
    formatting = entry.get("formatting", "alpaca")
    configured = entry.get("columns") or {}
    present = set().union(*(row.keys() for row in rows)) if rows else set()
    columns = {}
    for role, default in (ALPACA_COLUMNS if formatting == "alpaca" else SHAREGPT_COLUMNS).items():
        col = configured.get(role, default)
        if not col:
            continue
        if col in present:
            columns[role] = col
        elif rows and (role in configured or role in REQUIRED[formatting]):
            keys = ", ".join(sorted(present))
            raise TunelabError(f"{path}: column '{col}' ({role}) is in no row; the rows' keys are: {keys}")
    return columns


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _history(value: Any, path: Path, index: int) -> tuple[tuple[str, str], ...]:
    if isinstance(value, str) and path.suffix.lower() == ".csv":  # CSV cells hold history as a JSON string
        try:
            value = json.loads(value) if value.strip() else []
        except json.JSONDecodeError as err:
            raise TunelabError(f"{path}: row {index}: the history cell is not JSON ({err.msg}): write it as "
                               '[["user", "assistant"], ...]') from None
    if not value:
        return ()
    if not isinstance(value, list) or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in value):
        raise TunelabError(f"{path}: row {index}: history must be a list of [user, assistant] pairs, got "
                           f"{type(value).__name__} {str(value)[:40]!r}")
    return tuple((_text(q), _text(r)) for q, r in value)


def alpaca_example(row: dict[str, Any], columns: dict[str, str], path: Path, index: int) -> Example:
    def get(role: str) -> Any:
        return row.get(columns[role]) if role in columns else None

    return Example(prompt=_text(get("prompt")), query=_text(get("query")), response=_text(get("response")),
                   history=_history(get("history"), path, index), system=_text(get("system")) or None)


def sharegpt_example(row: dict[str, Any], columns: dict[str, str], tags: dict[str, str], path: Path,
                     index: int) -> Example:
    """A list of {"from"/"role": ..., "value"/"content": ...} turns: optional system turn first, then
    user/assistant turns; the last assistant turn is the response, earlier pairs the history."""
    turns = row.get(columns["messages"]) or []
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise TunelabError(f"{path}: row {index}: '{columns['messages']}' must be a list of turn objects")
    system = _text(row.get(columns["system"])) if "system" in columns else ""
    roles = _roles(tags)
    texts: list[str] = []
    for t, turn in enumerate(turns):
        role = turn.get(tags.get("role_tag") or ("from" if "from" in turn else "role"))
        content = _text(turn.get(tags.get("content_tag") or ("value" if "value" in turn else "content")))
        if t == 0 and role in roles["system"]:
            system = system or content
            continue
        expected = "user" if len(texts) % 2 == 0 else "assistant"
        if role not in roles[expected]:
            raise TunelabError(f"{path}: row {index}: turn {t} has role '{role}', expected {expected} "
                               f"({' or '.join(sorted(roles[expected]))}); turns must alternate user/assistant")
        texts.append(content)
    if len(texts) % 2:  # ends with a user turn: no response, counted as empty
        texts.append("")
    pairs = [(texts[i], texts[i + 1]) for i in range(0, len(texts), 2)]
    last = pairs.pop() if pairs else ("", "")
    return Example(prompt=last[0], query="", response=last[1], history=tuple(pairs), system=system or None)


def _roles(tags: dict[str, str]) -> dict[str, set[str]]:
    defaults = {"user": {"human", "user"}, "assistant": {"gpt", "assistant"}, "system": {"system"}}
    return {kind: {tags[f"{kind}_tag"]} if tags.get(f"{kind}_tag") else names for kind, names in defaults.items()}


def fill_identity(ex: Example, name: str, author: str) -> Example:
    """Fill the identity placeholders of self_cognition (2023: [NAME] is the developer), its July-2023 version
    (<NAME>, <AUTHOR>) and LLaMA-Factory's identity.json ({{name}}, {{author}})."""
    marks = {"[NAME]": author, "<NAME>": name, "<AUTHOR>": author, "{{name}}": name, "{{author}}": author}

    def fill(text: str) -> str:
        for mark, value in marks.items():
            text = text.replace(mark, value)
        return text

    return Example(prompt=fill(ex.prompt), query=fill(ex.query), response=fill(ex.response),
                   history=tuple((fill(q), fill(r)) for q, r in ex.history),
                   system=fill(ex.system) if ex.system else ex.system)


def is_empty(ex: Example) -> bool:
    return not (ex.prompt.strip() or ex.query.strip()) or not ex.response.strip()


# ---------------------------------------------------------------- the loader

def load_set(name: str, entry: dict[str, Any], dataset_dir: Path,
             data_args: DataArguments) -> tuple[list[Example], SetCounts]:
    """One data set's Examples (first max_samples rows, empty ones skipped) and its counts."""
    path = data_file(entry, dataset_dir, name)
    check_sha1(path, entry.get("file_sha1"), name)
    rows = read_rows(path)
    columns = _columns(entry, rows, path)
    indexed = list(enumerate(rows))[slice(*(entry.get("rows") or (None, None)))]
    if data_args.max_samples is not None:
        indexed = indexed[:data_args.max_samples]
    examples, counts = [], SetCounts(loaded=len(indexed))
    tags = entry.get("tags") or {}
    for i, row in indexed:
        if entry.get("formatting", "alpaca") == "sharegpt":
            ex = sharegpt_example(row, columns, tags, path, i)
        else:
            ex = alpaca_example(row, columns, path, i)
        if is_empty(ex):
            counts.skipped_empty += 1
            continue
        examples.append(fill_identity(ex, data_args.identity_name, data_args.identity_author))
    counts.kept = len(examples)
    if not examples:
        why = ("it has no rows" if not rows else "no rows selected (see its rows range and --max_samples)"
               if not counts.loaded else f"all {counts.loaded} rows read have an empty prompt or response")
        raise TunelabError(f"data set '{name}' ({path}) gives no examples: {why}")
    return examples, counts


def load_examples(data_args: DataArguments) -> tuple[list[Example], DataStats]:
    """Every Example of `data_args.dataset` (a comma list), concatenated in the order given."""
    dataset_dir = resolve_dataset_dir(data_args.dataset_dir)
    info = load_dataset_info(dataset_dir)
    names = dataset_names(data_args.dataset)
    entries = {name: get_entry(info, name, dataset_dir) for name in names}  # all names checked before any file
    examples: list[Example] = []
    stats = DataStats()
    for name in names:
        found, counts = load_set(name, entries[name], dataset_dir, data_args)
        examples += found
        if name in stats.sets:  # a name given twice (upsampling) counts twice
            counts = SetCounts(*(a + b for a, b in zip(vars(stats.sets[name]).values(), vars(counts).values())))
        stats.sets[name] = counts
    return examples, stats
