"""Embedded, offline datasets: ``builtin:tasks`` and ``builtin:world``.

* ``tasks`` — short verifiable instruction tasks (arithmetic, word puzzles) as
  prompt/response records with their ``answer``; splits ``train`` and ``eval``.
* ``world`` — the tasks plus a safety slice, with splits for every stage (SFT,
  preference pairs, unpaired, RL prompts, held-out eval, red team); see
  ``jaxalign.data.world``.

Every record is generated from a fixed seed with ``random.Random``, so the data are
identical on every machine. They ship as gzipped JSONL files in ``assets/<name>/``
together with the SentencePiece model ``assets/world.model`` trained on the world's
training text; ``python -m jaxalign.data.builtin`` regenerates all of them
deterministically (a test checks that the shipped files match).
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.resources
import io
import json
import random
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

from jaxalign.data.chat import TEMPLATES, text_runs
from jaxalign.data.records import Location, validate
from jaxalign.data.world import generate_world, unpaired_from_preference

SPLITS = ("train", "eval")

# Lowercase a-z only, 3-8 letters: keeps prompts short and letter tasks unambiguous.
WORDS: tuple[str, ...] = tuple(
    """
    able about above actor adult after again agent agree ahead alarm album alert alive
    allow alone along amber angle angry animal answer apple april arena argue arrow
    aside autumn avoid awake award badge baker balance banana basket beach beard became
    before begin behind belief bench berry better beyond bicycle bird black blade blank
    blanket blend bloom board boat bottle brain branch brave bread breeze brick bridge
    bright broad brother brown brush bucket budget build butter button cabin cable camel
    camera candle canvas carbon carpet carrot castle cattle cause cedar center chain chair
    chalk change cheese cherry chess chicken child choice circle city clever cliff clock
    cloud coast coffee collar color comet copper corner cotton couch country cousin crane
    crayon cream credit crowd crown cycle daisy dance danger debate decide desert design
    detail dinner doctor dollar donkey double dragon drawer dream dress drink driver eagle
    early earth easy echo effort eight elbow eleven empty energy engine enjoy enter equal
    error escape evening event exact extra fabric face factor family famous farmer father
    feather fence field figure final finger flame flavor flight floor flower focus forest
    fork frame fresh friend frost fruit funny garden garlic gentle giant ginger glass
    globe glove golden grape grass gravel green guitar hammer happy harbor harvest heart
    heavy hello helmet honey horse hotel hour house humble hunter island jacket jelly
    jewel journey juice jungle kettle kitchen kitten knee knife ladder lamp laptop laugh
    lemon letter level light lion little lizard lobster lucky lunch magnet mango marble
    market meadow melon metal middle mirror moment monkey morning mother motor mountain
    music napkin narrow nature needle never night noble noodle north number ocean office
    olive onion orange orbit oyster paddle paint panda paper parade parrot pasta peach
    peanut pencil pepper piano picnic pillow pilot planet plant pocket poem potato powder
    prince puzzle quiet rabbit radio rain random record river robot rocket roof rose
    rubber ruler saddle salad salmon sand school season second seven shadow shell silver
    simple sister small smile snake snow soccer spider spoon spring square stable star
    stone storm story sugar summer sunset sweet table tablet teacher temple tennis thunder
    ticket tiger timber today tomato tooth tower travel tree tribe truck tunnel turtle
    twelve uncle under unit valley velvet violin visit voice wagon walnut water wheel
    whisper window winter wizard wolf wonder yellow yogurt zebra
    """.split()
)

_LETTERS = "abcdefghijklmnopqrstuvwxyz"

# A task pool generator returns every (prompt, answer) candidate of one task; the rng
# is only for tasks that subsample an otherwise huge space.
PoolFn = Callable[[random.Random], list[tuple[str, str]]]


def _addition_pool(rng: random.Random) -> list[tuple[str, str]]:
    del rng
    return [(f"What is {a} + {b}?", str(a + b)) for a in range(100) for b in range(100)]


def _subtraction_pool(rng: random.Random) -> list[tuple[str, str]]:
    # a >= b keeps answers non-negative, so every answer is a plain digit string.
    del rng
    return [(f"What is {a} - {b}?", str(a - b)) for a in range(100) for b in range(a + 1)]


def _multiplication_pool(rng: random.Random) -> list[tuple[str, str]]:
    del rng
    return [(f"What is {a} * {b}?", str(a * b)) for a in range(13) for b in range(13)]


def _word_pool(template: str, fn: Callable[[str], str]) -> PoolFn:
    def pool(rng: random.Random) -> list[tuple[str, str]]:
        del rng
        return [(template.format(w), fn(w)) for w in WORDS]

    return pool


def _count_letter_pool(rng: random.Random) -> list[tuple[str, str]]:
    # Letters present in the word, plus two absent ones per word so that "0" is a
    # possible answer without dominating the task.
    out = []
    for w in WORDS:
        present = sorted(set(w))
        absent = rng.sample([c for c in _LETTERS if c not in w], 2)
        for c in present + absent:
            out.append((f"How many {c} in {w}?", str(w.count(c))))
    return out


def _word_length_pool(rng: random.Random) -> list[tuple[str, str]]:
    del rng
    return [(f"How many letters in: {w}?", str(len(w))) for w in WORDS]


def _larger_pool(rng: random.Random) -> list[tuple[str, str]]:
    del rng
    return [(f"Which is larger: {a} or {b}?", str(max(a, b)))
            for a in range(100) for b in range(100) if a != b]


def _next_number_pool(rng: random.Random) -> list[tuple[str, str]]:
    del rng
    return [(f"What comes after {a}?", str(a + 1)) for a in range(1000)]


TASKS: dict[str, PoolFn] = {
    "addition": _addition_pool,
    "subtraction": _subtraction_pool,
    "multiplication": _multiplication_pool,
    "reverse": _word_pool("Reverse the word: {}", lambda w: w[::-1]),
    "uppercase": _word_pool("Uppercase: {}", str.upper),
    "sort_letters": _word_pool("Sort the letters: {}", lambda w: "".join(sorted(w))),
    "count_letter": _count_letter_pool,
    "first_letter": _word_pool("First letter of: {}", lambda w: w[0]),
    "last_letter": _word_pool("Last letter of: {}", lambda w: w[-1]),
    "word_length": _word_length_pool,
    "larger": _larger_pool,
    "next_number": _next_number_pool,
}
# The tasks of the original "tasks" dataset (its records must not change).
CLASSIC_TASKS = tuple(TASKS)[:9]


@dataclasses.dataclass(frozen=True)
class BuiltinDataset:
    """A seeded mixture of tasks with a train and an eval split.

    Attributes:
      name: registry name (the ``<name>`` of ``builtin:<name>``).
      tasks: task names from ``TASKS``, mixed in equal proportions.
      train_size: number of train records.
      eval_size: number of eval records; eval prompts never occur in train.
      seed: the only source of randomness.
    """

    name: str
    tasks: tuple[str, ...]
    train_size: int
    eval_size: int
    seed: int


BUILTIN_DATASETS: dict[str, BuiltinDataset] = {
    "tasks": BuiltinDataset(
        name="tasks", tasks=CLASSIC_TASKS, train_size=20000, eval_size=512, seed=1234
    ),
}
# Dataset name -> its shipped splits, and splits derived from them at load time.
SHIPPED_SPLITS = {
    "tasks": ("train", "eval"),
    "world": ("train", "eval", "preference", "preference_eval", "rl", "redteam"),
}
DERIVED_SPLITS = {("world", "kto"): "preference", ("world", "kto_eval"): "preference_eval"}
TOKENIZER_ASSET = "world.model"
TOKENIZER_VOCAB_SIZE = 512


def _even_split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _task_rng(seed: int, task: str) -> random.Random:
    # One stream per task, so a task's records depend only on the seed, its name and its
    # quotas; keyed by a checksum because str hash() is salted per process.
    return random.Random(seed * 2**32 + zlib.crc32(task.encode()))


def _generate(spec: BuiltinDataset) -> dict[str, list[dict]]:
    train, evals = [], []
    train_quota = _even_split(spec.train_size, len(spec.tasks))
    eval_quota = _even_split(spec.eval_size, len(spec.tasks))
    for task, n_train, n_eval in zip(spec.tasks, train_quota, eval_quota, strict=True):
        rng = _task_rng(spec.seed, task)
        # Dedupe by prompt and sort, so the pool does not depend on construction order.
        pool = sorted(dict(TASKS[task](rng)).items())
        if len(pool) <= n_eval:
            raise ValueError(f"task {task!r} has only {len(pool)} prompts, eval wants {n_eval}")
        rng.shuffle(pool)
        held_out, rest = pool[:n_eval], pool[n_eval:]
        picked: list[tuple[str, str]] = []
        # Small pools (e.g. one prompt per word) are cycled in fresh shuffled passes, so
        # every prompt repeats about equally often instead of at random.
        while len(picked) < n_train:
            rng.shuffle(rest)
            picked.extend(rest[: n_train - len(picked)])
        for dst, items in ((train, picked), (evals, held_out)):
            dst.extend({"prompt": p, "response": a, "answer": a, "task": task} for p, a in items)
    mix = random.Random(spec.seed)
    mix.shuffle(train)
    mix.shuffle(evals)
    return {"train": train, "eval": evals}


def generate(name: str, **options) -> dict[str, list[dict]]:
    """Generates every shipped split of a builtin dataset from its seed.

    ``options`` go to the world's generator (e.g. ``rl_holdout=False``).
    """
    if name == "tasks":
        return _generate(BUILTIN_DATASETS["tasks"])
    if name == "world":
        return generate_world(TASKS, **options)
    raise ValueError(f"unknown builtin dataset {name!r}; available: {sorted(SHIPPED_SPLITS)}")


def available_splits(name: str) -> list[str]:
    """The split names ``load_builtin`` accepts for ``name``."""
    return [*SHIPPED_SPLITS[name], *(s for (n, s) in DERIVED_SPLITS if n == name)]


def _read_split(name: str, split: str) -> list[dict]:
    # importlib.resources works from an installed wheel or a zip, whatever the cwd.
    resource = importlib.resources.files("jaxalign.data").joinpath(
        "assets", name, f"{split}.jsonl.gz")
    with resource.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def load_builtin(name: str, split: str) -> list[dict]:
    """Returns the records of an embedded dataset split.

    Args:
      name: ``"tasks"`` or ``"world"``.
      split: one of ``available_splits(name)``, e.g. ``"train"`` or ``"eval"``.

    Returns:
      Fresh record dicts (see ``jaxalign.data.world`` for the world's fields).

    Raises:
      ValueError: for an unknown dataset name or split.
    """
    if name not in SHIPPED_SPLITS:
        raise ValueError(f"unknown builtin dataset {name!r}; available: {sorted(SHIPPED_SPLITS)}")
    if split not in available_splits(name):
        raise ValueError(f"unknown split {split!r} for builtin:{name}; available: "
                         f"{available_splits(name)}")
    if (name, split) in DERIVED_SPLITS:
        return unpaired_from_preference(_read_split(name, DERIVED_SPLITS[name, split]))
    return _read_split(name, split)


def write_jsonl_gz(path: Path, records: list[dict]) -> None:
    """Writes records as gzipped JSONL with a fixed header, so the bytes are reproducible."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as raw, gzip.GzipFile(
            filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz:
        for r in records:
            gz.write((json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n").encode())


def _tokenizer_corpus() -> Iterator[str]:
    # The corpus is the text runs the plain template encodes, exactly as the pipeline
    # will encode them (prompt side and completion side separately). It is the first
    # world's text (RL prompts drawn from the SFT pool): the same words and templates as
    # today's splits, and it keeps the shipped tokenizer -- and every checkpoint trained
    # with it -- valid when the splits' sampling changes.
    world = generate("world", rl_holdout=False)
    spec = TEMPLATES["plain"]
    for split, fmt in (("train", "sft"), ("preference", "preference"), ("rl", "prompt")):
        for i, record in enumerate(world[split]):
            normal = validate(record, fmt, Location(split, i))
            if fmt == "sft":
                yield from text_runs(spec, normal.messages)
            elif fmt == "preference":
                for reply in (normal.chosen, normal.rejected):
                    yield from text_runs(
                        spec, [*normal.prompt, {"role": "assistant", "content": reply}])
            else:
                yield from text_runs(spec, normal.prompt, add_generation_prompt=True)


def train_builtin_tokenizer(out_path: str, vocab_size: int = TOKENIZER_VOCAB_SIZE) -> str:
    """Trains the shipped SentencePiece BPE model on the world's training text.

    Training is single-threaded over an in-memory iterator, so the result is
    reproducible and no temporary files are written.

    Args:
      out_path: where to write the ``.model`` file (parent directories are created).
      vocab_size: total vocabulary size, including the 256 byte-fallback pieces.

    Returns:
      ``out_path``.
    """
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_tokenizer_corpus(),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        split_digits=True,
        byte_fallback=True,
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        # Exact round trips: no normalisation, no dummy "▁" prefix, spaces kept as-is.
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    path = Path(out_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.getvalue())
    return out_path


def assets_dir() -> Path:
    """Where the shipped data and tokenizer live in the source tree."""
    return Path(__file__).resolve().parent / "assets"


def regenerate(root: Path | None = None) -> list[Path]:
    """Writes every shipped split and the tokenizer under ``root`` (default: the assets)."""
    root = root or assets_dir()
    written = []
    for name, splits in SHIPPED_SPLITS.items():
        data = generate(name)
        for split in splits:
            write_jsonl_gz(root / name / f"{split}.jsonl.gz", data[split])
            written.append(root / name / f"{split}.jsonl.gz")
    written.append(Path(train_builtin_tokenizer(str(root / TOKENIZER_ASSET))))
    return written


if __name__ == "__main__":
    for path in regenerate():
        print(path)
