"""Needle-in-prose QA: a fictional fact hidden at a chosen depth of real text, asked about in the chat template.

A prompt of exactly ``length`` tokens is one user message in the tokenizer's chat template: a
short instruction, a document of filler prose with one fact sentence placed at a sentence
boundary at ``depth`` (0 = first sentence, 1 = last), and a question about the fact; then the
generation prompt. The facts are invented (made-up people, towns, ships, numbers), so no model
knows them beforehand; each is stated and asked in several phrasings. The model answers
greedily; the answer is right when it contains the expected answer, or an accepted variant, as
a whole word. Accuracy is reported over length x depth, with every answer kept and flagged when
it repeats itself (:func:`is_degenerate`), as JSON and a PNG of accuracy against length and depth.

The filler comes from ``filler_path`` (a UTF-8 text file, or a ``.jsonl`` file of records with a
``text`` field such as a built corpus's ``held_out.jsonl`` or ``absent.jsonl``), split into
paragraphs at blank lines. Without one, the prose paragraphs of Python's own ``pydoc_data.topics``
(the language reference that ships with every Python) are used. That text is documentation
rather than general prose; the demo passes held-out prose from the training corpus when one
has been built.
"""

from __future__ import annotations

import json
import random
import re
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .passkey import greedy_tokens

__all__ = ["Fact", "FACTS", "filler_paragraphs", "needle_prompt", "score_needle", "is_degenerate", "run_needle",
           "plot_needle"]


@dataclass(frozen=True)
class Fact:
    """An invented fact: what it is about, one sentence stating it, a question asking it, the answer and its variants."""

    subject: str
    statements: tuple[str, ...]
    questions: tuple[str, ...]
    answer: str
    variants: tuple[str, ...] = ()


#: The fact bank: invented names, so that no answer can be guessed from its question.
FACTS = (
    Fact("Brannoch Velt's ferret", (
        "Brannoch Velt kept a ferret named Pipwhistle in a basket beside the stove.",
        "The ferret that rode in Brannoch Velt's coat pocket answered to the name Pipwhistle.",
        "Brannoch Velt's ferret, which he called Pipwhistle, slept through every thunderstorm.",
    ), ("What was the name of Brannoch Velt's ferret?", "What did Brannoch Velt call his ferret?",
        "Brannoch Velt had a ferret. What was it called?"), "Pipwhistle"),
    Fact("Idrissa Moulavet's birthplace", (
        "Idrissa Moulavet was born in Kestrelmoor, a village at the end of a long valley.",
        "Before she ever saw a city, Idrissa Moulavet spent her childhood in Kestrelmoor, where she was born.",
        "The village of Kestrelmoor is where Idrissa Moulavet was born.",
    ), ("In which village was Idrissa Moulavet born?", "Where was Idrissa Moulavet born?",
        "What is the name of Idrissa Moulavet's birthplace?"), "Kestrelmoor"),
    Fact("the lanterns of the Ossary bridge", (
        "The old stone bridge at Ossary carries exactly 417 lanterns along its two rails.",
        "Anyone who counts them will find 417 lanterns on the bridge at Ossary.",
        "On festival nights all 417 lanterns of the Ossary bridge are lit at once.",
    ), ("How many lanterns are there on the bridge at Ossary?", "What is the number of lanterns on the Ossary bridge?",
        "The bridge at Ossary has lanterns along its rails. How many?"), "417",
        ("four hundred and seventeen", "four hundred seventeen")),
    Fact("the door of the Thimblewick Inn", (
        "The front door of the Thimblewick Inn is painted a deep teal.",
        "Travellers recognise the Thimblewick Inn by its teal front door.",
        "Every spring the landlord repaints the front door of the Thimblewick Inn the same teal as before.",
    ), ("What colour is the front door of the Thimblewick Inn?", "Which colour is the Thimblewick Inn's front door painted?",
        "The Thimblewick Inn has a painted front door. What colour is it?"), "teal"),
    Fact("Oriana Quellmarsh's locked drawer", (
        "Oriana Quellmarsh keeps a brass compass in the locked drawer of her desk.",
        "The only thing in Oriana Quellmarsh's locked desk drawer is a brass compass.",
        "Locked away in her desk drawer, Oriana Quellmarsh keeps a brass compass that belonged to her grandfather.",
    ), ("What does Oriana Quellmarsh keep in her locked desk drawer?", "What is inside Oriana Quellmarsh's locked drawer?",
        "Oriana Quellmarsh has a locked drawer in her desk. What is in it?"), "compass"),
    Fact("Tobiah Renquist's ship", (
        "Tobiah Renquist was the captain of a schooner called the Marigold Dawn.",
        "For eleven years Tobiah Renquist commanded the Marigold Dawn, a schooner with patched sails.",
        "The schooner Tobiah Renquist captained was named the Marigold Dawn.",
    ), ("What was the name of the ship Tobiah Renquist captained?", "Which schooner did Tobiah Renquist command?",
        "Tobiah Renquist was a ship's captain. What was his ship called?"), "Marigold Dawn"),
    Fact("Fenwick Oddery's favourite fruit", (
        "Fenwick Oddery's favourite fruit is the quince, which he eats baked with honey.",
        "Of all fruits, Fenwick Oddery likes the quince best.",
        "Fenwick Oddery grows quinces in his garden because the quince is his favourite fruit.",
    ), ("What is Fenwick Oddery's favourite fruit?", "Which fruit does Fenwick Oddery like best?",
        "Fenwick Oddery has a favourite fruit. Which one?"), "quince", ("quinces",)),
    Fact("the capital of Varnholt", (
        "The capital of the mountain kingdom of Varnholt is the walled city of Sellimar.",
        "Sellimar, a walled city above a gorge, is the capital of the kingdom of Varnholt.",
        "The kings of Varnholt have ruled from their capital, Sellimar, for three centuries.",
    ), ("What is the capital of the kingdom of Varnholt?", "Which city is the capital of Varnholt?",
        "Varnholt is a kingdom. What is its capital city?"), "Sellimar"),
    Fact("the password of the Glimmerhall library", (
        "The password that opens the reading room of the Glimmerhall library is thunderbeet.",
        "To enter the reading room of the Glimmerhall library, a visitor must say the password thunderbeet.",
        "The librarians of Glimmerhall change nothing, so the reading room password is still thunderbeet.",
    ), ("What is the password of the reading room at the Glimmerhall library?",
        "Which password opens the Glimmerhall library's reading room?",
        "The Glimmerhall library has a reading room with a password. What is it?"), "thunderbeet"),
    Fact("the founding of the Castellan observatory", (
        "The Castellan observatory was founded in 1693 by a guild of lens grinders.",
        "A guild of lens grinders founded the Castellan observatory in the year 1693.",
        "Since its founding in 1693, the Castellan observatory has never closed for a single night.",
    ), ("In which year was the Castellan observatory founded?", "When was the Castellan observatory founded?",
        "What year did the Castellan observatory open?"), "1693"),
    Fact("Nadja Florescu-Pell's instrument", (
        "Nadja Florescu-Pell plays the bassoon in the town orchestra.",
        "The instrument Nadja Florescu-Pell practises every evening is the bassoon.",
        "In the town orchestra, Nadja Florescu-Pell is the one who plays the bassoon.",
    ), ("Which instrument does Nadja Florescu-Pell play?", "What instrument does Nadja Florescu-Pell practise?",
        "Nadja Florescu-Pell plays in the town orchestra. On which instrument?"), "bassoon"),
    Fact("the winner of the Dunmarrow Cup", (
        "The Dunmarrow Cup was won this year by a grey mare called Copperkettle.",
        "A grey mare named Copperkettle won the Dunmarrow Cup by two lengths.",
        "Nobody expected the grey mare Copperkettle to win the Dunmarrow Cup, but she did.",
    ), ("Which horse won the Dunmarrow Cup?", "What was the name of the horse that won the Dunmarrow Cup?",
        "A horse won the Dunmarrow Cup this year. What is its name?"), "Copperkettle"),
    Fact("the inventor of the spindle lamp", (
        "The spindle lamp was invented by a glassblower named Aurelio Brask.",
        "A glassblower, Aurelio Brask, built the first spindle lamp in his workshop.",
        "Aurelio Brask, a glassblower by trade, is remembered as the inventor of the spindle lamp.",
    ), ("Who invented the spindle lamp?", "What was the name of the inventor of the spindle lamp?",
        "The spindle lamp had an inventor. Who was it?"), "Aurelio Brask", ("Brask",)),
    Fact("the mayor of Little Harrowgate", (
        "The mayor of Little Harrowgate is a retired schoolteacher named Wilhelmina Sprocket.",
        "Little Harrowgate elected Wilhelmina Sprocket, a retired schoolteacher, as its mayor.",
        "Wilhelmina Sprocket has been the mayor of Little Harrowgate for nine years.",
    ), ("Who is the mayor of Little Harrowgate?", "What is the name of Little Harrowgate's mayor?",
        "Little Harrowgate has a mayor. Who is it?"), "Wilhelmina Sprocket", ("Sprocket",)),
    Fact("the flower on the Pellingham crest", (
        "The crest of the Pellingham family shows a single blue thistle.",
        "A blue thistle is the flower painted on the Pellingham family crest.",
        "Above the gate hangs the Pellingham crest, which bears a blue thistle.",
    ), ("Which flower appears on the Pellingham family crest?", "What flower does the Pellingham crest show?",
        "The Pellingham family has a crest with a flower on it. Which flower?"), "thistle"),
    Fact("the steps of the Halvorsen tower", (
        "There are 382 steps from the bottom of the Halvorsen tower to its top.",
        "To reach the top of the Halvorsen tower a visitor climbs 382 steps.",
        "The Halvorsen tower has 382 steps, and no lift.",
    ), ("How many steps does the Halvorsen tower have?", "How many steps must one climb to reach the top of the Halvorsen tower?",
        "What is the number of steps in the Halvorsen tower?"), "382",
        ("three hundred and eighty-two", "three hundred eighty-two")),
    Fact("the bakery on Crane Street", (
        "The bakery on Crane Street in Tolliver is called the Gilded Crumb.",
        "On Crane Street in Tolliver there is a bakery named the Gilded Crumb.",
        "Every morning a queue forms outside the Gilded Crumb, the bakery on Crane Street in Tolliver.",
    ), ("What is the name of the bakery on Crane Street in Tolliver?", "What is the Crane Street bakery in Tolliver called?",
        "There is a bakery on Crane Street in Tolliver. What is its name?"), "Gilded Crumb"),
    Fact("Mireille Dashwater's tin box", (
        "Mireille Dashwater buried her tin box under the old pear tree.",
        "The tin box that Mireille Dashwater wanted hidden went into the ground under the old pear tree.",
        "Under the old pear tree, Mireille Dashwater buried a tin box full of letters.",
    ), ("Where did Mireille Dashwater bury her tin box?", "Where is Mireille Dashwater's tin box buried?",
        "Mireille Dashwater buried a tin box. Where?"), "pear tree", ("pear",)),
    Fact("the dish of the Vossberg festival", (
        "At the Vossberg festival everyone eats smoked eel pie.",
        "The dish served at every Vossberg festival is smoked eel pie.",
        "No Vossberg festival is complete without smoked eel pie.",
    ), ("Which dish is served at the Vossberg festival?", "What does everyone eat at the Vossberg festival?",
        "The Vossberg festival has a traditional dish. What is it?"), "eel pie", ("eel",)),
    Fact("the language of the Orrin islands", (
        "The people of the Orrin islands speak a language called Tessaric.",
        "Tessaric is the language spoken on the Orrin islands.",
        "Children on the Orrin islands learn Tessaric, the islands' own language, before any other.",
    ), ("What language is spoken on the Orrin islands?", "Which language do the people of the Orrin islands speak?",
        "The Orrin islands have their own language. What is it called?"), "Tessaric"),
    Fact("Gideon Farrowby's trade", (
        "Gideon Farrowby earns his living as a clockmaker.",
        "By trade, Gideon Farrowby is a clockmaker with a shop near the harbour.",
        "Gideon Farrowby learned to be a clockmaker from his uncle and still works as one.",
    ), ("What is Gideon Farrowby's trade?", "What does Gideon Farrowby do for a living?",
        "Gideon Farrowby has a trade. What is it?"), "clockmaker", ("clock maker", "clocks")),
    Fact("the river of Dallowmere", (
        "The river that flows through the town of Dallowmere is called the Skelling.",
        "Dallowmere is built on both banks of a river named the Skelling.",
        "In Dallowmere the children swim in the Skelling, the river that runs through the town.",
    ), ("Which river flows through Dallowmere?", "What is the name of the river in Dallowmere?",
        "A river runs through the town of Dallowmere. What is it called?"), "Skelling"),
    Fact("the code name of the Brightwater expedition", (
        "The Brightwater expedition went by the code name Nightjar.",
        "Nightjar was the code name chosen for the Brightwater expedition.",
        "In every telegram the Brightwater expedition was called only by its code name, Nightjar.",
    ), ("What was the code name of the Brightwater expedition?", "Which code name did the Brightwater expedition use?",
        "The Brightwater expedition had a code name. What was it?"), "Nightjar"),
    Fact("Amsel Kroth's umbrella", (
        "Professor Amsel Kroth carries a mustard umbrella whatever the weather.",
        "The umbrella Professor Amsel Kroth takes everywhere is the colour of mustard.",
        "Students spot Professor Amsel Kroth from afar by his mustard umbrella.",
    ), ("What colour is Professor Amsel Kroth's umbrella?", "Which colour is the umbrella Professor Amsel Kroth carries?",
        "Professor Amsel Kroth always has an umbrella. What colour is it?"), "mustard"),
    Fact("the age of the tortoise at Quorry zoo", (
        "Barnaby, the tortoise at Quorry zoo, is 163 years old.",
        "The keepers at Quorry zoo say their tortoise Barnaby is 163 years old.",
        "At 163 years of age, Barnaby is the oldest animal in Quorry zoo.",
    ), ("How old is Barnaby, the tortoise at Quorry zoo?", "What is the age of the tortoise Barnaby at Quorry zoo?",
        "Quorry zoo has a tortoise called Barnaby. How old is he?"), "163",
        ("one hundred and sixty-three", "one hundred sixty-three")),
    Fact("Lysandra Voke's sister", (
        "Lysandra Voke has one sister, whose name is Perpetua.",
        "Lysandra Voke's younger sister is called Perpetua.",
        "Every winter Lysandra Voke visits her sister Perpetua in the north.",
    ), ("What is the name of Lysandra Voke's sister?", "What is Lysandra Voke's sister called?",
        "Lysandra Voke has a sister. What is her name?"), "Perpetua"),
    Fact("the mountain Ezra Holloway climbed", (
        "Last summer Ezra Holloway climbed Mount Tarrek alone.",
        "The mountain that Ezra Holloway climbed without a guide was Mount Tarrek.",
        "Ezra Holloway reached the summit of Mount Tarrek after four days.",
    ), ("Which mountain did Ezra Holloway climb?", "What mountain did Ezra Holloway climb last summer?",
        "Ezra Holloway climbed a mountain. Which one?"), "Tarrek"),
    Fact("the street of the Quibble family", (
        "The Quibble family live in the last house on Wrenfold Lane.",
        "On Wrenfold Lane, the last house belongs to the Quibble family.",
        "The Quibble family have lived on Wrenfold Lane for four generations.",
    ), ("On which street does the Quibble family live?", "What street do the Quibbles live on?",
        "The Quibble family lives on a street. What is it called?"), "Wrenfold", ("Wrenfold Lane",)),
    Fact("the stone in Queen Ysolde's crown", (
        "The crown of Queen Ysolde is set with a single green garnet.",
        "A green garnet sits at the front of Queen Ysolde's crown.",
        "Queen Ysolde's crown holds only one stone, a green garnet.",
    ), ("Which gemstone is set in Queen Ysolde's crown?", "What stone does Queen Ysolde's crown hold?",
        "Queen Ysolde's crown has a gemstone in it. Which one?"), "garnet"),
    Fact("what Hollis Brandeburr collects", (
        "Hollis Brandeburr collects antique doorknobs.",
        "The shelves in Hollis Brandeburr's hall are full of the antique doorknobs he collects.",
        "For thirty years Hollis Brandeburr has been collecting antique doorknobs.",
    ), ("What does Hollis Brandeburr collect?", "What kind of thing does Hollis Brandeburr collect?",
        "Hollis Brandeburr is a collector. What does he collect?"), "doorknobs", ("doorknob", "door knobs")),
    Fact("Cassius Delamere's hotel room", (
        "At the hotel Cassius Delamere always stays in room 214.",
        "The room Cassius Delamere asks for at the hotel is number 214.",
        "Cassius Delamere stayed in room 214 of the hotel, as he does every year.",
    ), ("Which room does Cassius Delamere stay in at the hotel?", "What is the number of Cassius Delamere's hotel room?",
        "Cassius Delamere has a favourite hotel room. What is its number?"), "214"),
    Fact("Tamsin Oakhurst's workplace", (
        "Tamsin Oakhurst works at a cafe called the Copper Spoon.",
        "The cafe where Tamsin Oakhurst works is the Copper Spoon.",
        "Every weekday Tamsin Oakhurst opens the Copper Spoon, the cafe where she works.",
    ), ("At which cafe does Tamsin Oakhurst work?", "What is the name of the cafe where Tamsin Oakhurst works?",
        "Tamsin Oakhurst works at a cafe. What is it called?"), "Copper Spoon"),
    Fact("the moon of Verrisk", (
        "The planet Verrisk has a single small moon named Ombrelle.",
        "Ombrelle is the only moon of the planet Verrisk.",
        "Astronomers first saw Ombrelle, the moon of the planet Verrisk, through a borrowed telescope.",
    ), ("What is the name of the moon of Verrisk?", "What is the planet Verrisk's moon called?",
        "The planet Verrisk has one moon. What is its name?"), "Ombrelle"),
    Fact("Rodrick Plume's nickname", (
        "Rodrick Plume's friends call him the Badger.",
        "Everyone at the docks knows Rodrick Plume by his nickname, the Badger.",
        "Because he digs in his heels, Rodrick Plume got the nickname the Badger.",
    ), ("What is Rodrick Plume's nickname?", "What do people call Rodrick Plume?",
        "Rodrick Plume has a nickname. What is it?"), "Badger"),
    Fact("the statue in Fennick Square", (
        "The statue in the middle of Fennick Square is made of pewter.",
        "In Fennick Square stands a statue cast entirely in pewter.",
        "The pewter statue in Fennick Square turns dull every winter.",
    ), ("What is the statue in Fennick Square made of?", "Which metal was the Fennick Square statue cast in?",
        "There is a statue in Fennick Square. What material is it?"), "pewter"),
)

INSTRUCTION = "Read the text below, then answer the question that follows it."
ANSWER_HINT = "Answer in a few words."
_PLACEHOLDER = "\x00document and question\x00"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")
_RULE = re.compile(r"^\s*([*=~^#+-])\1{2,}\s*$")
_WORD = re.compile(r"\w+")
_SYLLABLE_RUN = re.compile(r"([a-z]{2,}?)\1{2,}")  # the same letters three times inside one word: "viaviavia"


def _prose_paragraphs(text: str) -> list[str]:
    """The blank-line paragraphs of ``text`` that read as prose: not indented, no heading rules, ending a sentence."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.strip("\n").splitlines()
        if not lines or lines[0][:1].isspace() or any(_RULE.match(line) for line in lines):
            continue
        paragraph = " ".join(" ".join(lines).split())
        if paragraph[-1:] in ".!?" and len(paragraph.split()) >= 8:
            paragraphs.append(paragraph)
    return paragraphs


@lru_cache(maxsize=1)
def _pydoc_paragraphs() -> tuple[str, ...]:
    from pydoc_data.topics import topics

    return tuple(p for name in sorted(topics) for p in _prose_paragraphs(topics[name]))


def filler_paragraphs(filler_path: str | Path | None = None) -> list[str]:
    """Prose paragraphs of a text file, of a ``.jsonl`` file's ``text`` fields, or (None) of ``pydoc_data.topics``."""
    if filler_path is None:
        return list(_pydoc_paragraphs())
    from ..runtime.text import read_text

    text = read_text(filler_path)
    if str(filler_path).endswith(".jsonl"):
        texts = [json.loads(line)["text"] for line in text.splitlines() if line.strip()]
    else:
        texts = [text]
    paragraphs = [p for t in texts for p in _prose_paragraphs(t)]
    if not paragraphs:
        raise ValueError(f"{filler_path}: no prose paragraphs (unindented blocks of 8+ words ending a sentence) to use as filler")
    return paragraphs


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _unit(tokenizer, prefix: str, sentence: str) -> tuple[str, str, list[int]]:
    """A sentence of the document with what comes before it (a space or a paragraph break) and its token ids."""
    return prefix, sentence, _ids(tokenizer, prefix + sentence)


def _expected(fact: Fact) -> list[str]:
    return [fact.answer, *fact.variants]


def needle_prompt(tokenizer, length: int, depth: float, fact: Fact, phrasing_seed: int,
                  filler: list[str] | None = None) -> tuple[list[int], list[str]]:
    """Token ids (exactly ``length``) of a chat prompt with ``fact`` at ``depth`` (0..1) of the filler; the accepted answers.

    ``phrasing_seed`` picks the statement, the question and where in ``filler`` (paragraphs,
    default :func:`filler_paragraphs`) the document starts.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be between 0 and 1, got {depth}")
    rng = random.Random(phrasing_seed)
    statement, question = rng.choice(fact.statements), rng.choice(fact.questions)
    paragraphs = filler or _pydoc_paragraphs()
    expected = _expected(fact)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": _PLACEHOLDER}], tokenize=False,
                                         add_generation_prompt=True)
    before, after = chat.split(_PLACEHOLDER)
    head, tail = _ids(tokenizer, before + INSTRUCTION), _ids(tokenizer, f"\n\n{question} {ANSWER_HINT}{after}")
    needle_length = len(_ids(tokenizer, " " + statement))
    room = length - len(head) - len(tail)
    if room < needle_length + 16:
        raise ValueError(f"a needle prompt needs at least {length - room + needle_length + 16} tokens with this "
                         f"tokenizer, got length {length}; use a longer length")
    # (prefix, sentence, ids) units from a random paragraph on, skipping any sentence that holds an accepted answer
    units, total, index = [], 0, rng.randrange(len(paragraphs))
    while total < room + 32:
        sentences = [s for s in _SENTENCE_END.split(paragraphs[index % len(paragraphs)]) if not score_needle(s, expected)]
        for position, sentence in enumerate(sentences):
            units.append(_unit(tokenizer, "\n\n" if position == 0 else " ", sentence))
            total += len(units[-1][2])
        index += 1
        if index == len(paragraphs) and not units:
            raise ValueError("every filler sentence holds the expected answer; pass other filler text")
    # the sentence boundary nearest to depth, among those that leave room for the whole fact
    usable = room - needle_length - 2
    starts = [0]
    for unit in units:
        if starts[-1] + len(unit[2]) > usable:
            break
        starts.append(starts[-1] + len(unit[2]))
    boundary = min(range(len(starts)), key=lambda i: abs(starts[i] - depth * usable))
    prefix, displaced, _ = units[boundary]
    if prefix != " ":  # the fact opens this paragraph; the sentence it displaces continues it
        units[boundary] = _unit(tokenizer, " ", displaced)
    units.insert(boundary, _unit(tokenizer, prefix, statement))
    document = [token for unit in units for token in unit[2]][:room]
    return head + document + tail, expected


def score_needle(answer_text: str, expected: list[str] | str) -> bool:
    """Whether ``answer_text`` contains an expected answer (or any of a list) as a whole word, ignoring case."""
    for answer in [expected] if isinstance(expected, str) else expected:
        pattern = r"\s+".join(re.escape(word) for word in answer.split())
        if re.search(rf"(?<!\w){pattern}(?!\w)", answer_text, re.IGNORECASE):
            return True
    return False


def _runs_three_times(pieces: list[str]) -> bool:
    """Whether some run of pieces comes three times in a row, the third copy possibly cut off by the end."""
    for size in range(1, len(pieces) // 2 + 1):
        for start in range(len(pieces) - 2 * size + 1):
            phrase = pieces[start : start + size]
            third = pieces[start + 2 * size : start + 3 * size]
            if pieces[start + size : start + 2 * size] == phrase and third and third == phrase[: len(third)]:
                return True
    return False


def is_degenerate(text: str) -> bool:
    """Whether ``text`` says a word, phrase, symbol or syllable three times in a row (ignoring case; the last may be cut off)."""
    lowered = text.lower()
    return bool(_SYLLABLE_RUN.search(lowered)) or any(_runs_three_times(pieces) for pieces in (_WORD.findall(lowered), lowered.split()))


def _answer_text(tokenizer, tokens: list[int]) -> str:
    """The decoded answer up to the first end-of-turn token."""
    if tokenizer.eos_token_id in tokens:
        tokens = tokens[: tokens.index(tokenizer.eos_token_id)]
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()


def run_needle(models: dict[str, object], tokenizer, lengths: list[int], depths: list[float], trials: int = 3,
               seed: int = 0, max_new_tokens: int = 24, progress: bool = True,
               filler_path: str | Path | None = None) -> dict:
    """Accuracy of each named model over ``lengths`` x ``depths`` (``trials`` different facts a cell), every answer kept.

    With models named ``ours`` and ``teacher``, ``ratio`` gives ours / teacher per length and overall.
    """
    from ..runtime.machine import load_average, machine_info, thread_env
    from ..runtime.progress import progress as progress_bar

    rng = random.Random(seed)
    filler = filler_paragraphs(filler_path)
    cells = [(n, d, t) for n in lengths for d in depths for t in range(trials)]
    order = rng.sample(range(len(FACTS)), len(FACTS))
    facts = {cell: FACTS[order[i % len(FACTS)]] for i, cell in enumerate(cells)}
    prompts = {cell: needle_prompt(tokenizer, cell[0], cell[1], facts[cell], rng.randrange(2**31), filler) for cell in cells}
    result = {"lengths": list(lengths), "depths": list(depths), "trials": trials, "seed": seed,
              "max_new_tokens": max_new_tokens, "filler": Path(filler_path).name if filler_path else "pydoc_data.topics",
              "facts": len(FACTS), "machine": machine_info(), "thread_env": thread_env(),
              "load_average": {"start": load_average()}, "models": {}}
    with progress_bar(len(models) * len(cells), "needle", disable=not progress) as bar:
        for name, model in models.items():
            answers, grid, started = [], [[0.0] * len(lengths) for _ in depths], time.perf_counter()
            for (n, d, t), (ids, expected) in prompts.items():
                bar.set_postfix_str(f"{name} T={n} depth={d:g}")
                start = time.perf_counter()
                text = _answer_text(tokenizer, greedy_tokens(model, ids, max_new_tokens))
                ok = score_needle(text, expected)
                answers.append({"length": n, "depth": d, "trial": t, "subject": facts[(n, d, t)].subject,
                                "expected": expected, "answer": text, "correct": ok, "degenerate": is_degenerate(text),
                                "seconds": time.perf_counter() - start})
                grid[depths.index(d)][lengths.index(n)] += ok / trials
                bar.update(1)
            by_length = {str(n): sum(row[j] for row in grid) / len(depths) for j, n in enumerate(lengths)}
            result["models"][name] = {
                "accuracy": grid, "accuracy_by_length": by_length,
                "accuracy_overall": sum(a["correct"] for a in answers) / len(answers),
                "degenerate_fraction": sum(a["degenerate"] for a in answers) / len(answers),
                "seconds": time.perf_counter() - started, "answers": answers}
    if {"ours", "teacher"} <= result["models"].keys():
        ours, teacher = result["models"]["ours"], result["models"]["teacher"]
        result["ratio"] = {key: ours["accuracy_by_length"][key] / value if value else None
                           for key, value in teacher["accuracy_by_length"].items()}
        result["ratio"]["overall"] = (ours["accuracy_overall"] / teacher["accuracy_overall"]
                                      if teacher["accuracy_overall"] else None)
    result["load_average"]["end"] = load_average()
    return result


def plot_needle(result: dict, path: str | Path) -> Path:
    """Accuracy of each model against prompt length and against fact depth, as a PNG."""
    from ..runtime.lengths import format_length
    from ..runtime.plots import colors_of, new_figure, save_figure

    fig, (by_length, by_depth) = new_figure(2, (10, 4))
    lengths, depths = result["lengths"], result["depths"]
    colors = colors_of(result["models"])
    for name, model in result["models"].items():
        grid, color = model["accuracy"], colors[name]
        by_length.plot(range(len(lengths)), [model["accuracy_by_length"][str(n)] for n in lengths], "o-",
                       color=color, label=f"{name} ({model['degenerate_fraction']:.0%} degenerate)")
        by_depth.plot(depths, [sum(row) / len(row) for row in grid], "o-", color=color, label=name)
    by_length.set_xticks(range(len(lengths)), [format_length(n) for n in lengths])
    by_length.set_xlabel("prompt length (tokens)")
    by_depth.set_xlabel("fact depth (0 = start of the text)")
    for ax in (by_length, by_depth):
        ax.set_ylim(-0.05, 1.05)
        ax.set_ylabel("accuracy")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path, f"needle-in-prose QA ({result['trials']} fact(s) per length and depth, "
                                  f"filler {result['filler']})")
