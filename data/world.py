"""The embedded assistant world: tasks whose answers are known, a gold scorer
that says how good a response really is, and simulated raters with known biases.

Everything is a pure function of a seed. data/prepare.py turns it into files.

Task kinds, by family (the canonical answer after the arrow):
  arithmetic  add       "What is 38 + 47?"                    -> "38 + 47 = 85."
              sub       "What is 47 - 38?"                    -> "47 - 38 = 9."
  comparison  larger    "Which is larger, 73 or 58?"          -> "73 is larger."
              smaller   "Which is smaller, 73 or 58?"         -> "58 is smaller."
  sorting     sort      "Sort these numbers: 9 4 7 1"         -> "1 4 7 9"
  spelling    reverse   "Spell 'planet' backwards."           -> "t-e-n-a-l-p"
              count     "How many letters are in 'planet'?"   -> "'planet' has 6 letters."
  facts       capital   "What is the capital of Peru?"        -> "The capital of Peru is Lima."
              opposite  "What is the opposite of 'hot'?"      -> "The opposite of 'hot' is 'cold'."

Held-out split: a fixed hash of each task's operands or entity puts it in
"heldout" or "train". Held-out number tasks appear nowhere in training data, so
evaluating on them measures generalisation. Held-out words and facts appear in the
pretraining corpus (statements, spellings, answered questions) but never in SFT,
preference or RL data, so evaluating on them measures elicitation: whether
fine-tuning brings out what pretraining taught.
"""

import math
import re
import zlib
from dataclasses import dataclass

FAMILIES = {
    "arithmetic": ("add", "sub"),
    "comparison": ("larger", "smaller"),
    "sorting": ("sort",),
    "spelling": ("reverse", "count"),
    "facts": ("capital", "opposite"),
}
KIND_FAMILY = {k: f for f, kinds in FAMILIES.items() for k in kinds}
KINDS = tuple(KIND_FAMILY)

# --- entities ------------------------------------------------------------------------

CAPITALS = dict(line.split(":") for line in """
Peru:Lima France:Paris Japan:Tokyo Egypt:Cairo Kenya:Nairobi Chile:Santiago Spain:Madrid
Italy:Rome Greece:Athens Norway:Oslo Sweden:Stockholm Finland:Helsinki Poland:Warsaw
Austria:Vienna Hungary:Budapest Portugal:Lisbon Ireland:Dublin Germany:Berlin Russia:Moscow
China:Beijing India:Delhi Iran:Tehran Iraq:Baghdad Syria:Damascus Cuba:Havana Mexico:Mexico
Canada:Ottawa Brazil:Brasilia Argentina:Buenos Colombia:Bogota Venezuela:Caracas Ecuador:Quito
Bolivia:Sucre Uruguay:Montevideo Paraguay:Asuncion Morocco:Rabat Ghana:Accra Nigeria:Abuja
Ethiopia:Addis Uganda:Kampala Tanzania:Dodoma Sudan:Khartoum Libya:Tripoli Tunisia:Tunis
Thailand:Bangkok Vietnam:Hanoi Nepal:Kathmandu Mongolia:Ulaanbaatar Turkey:Ankara Israel:Jerusalem
Jordan:Amman Lebanon:Beirut Qatar:Doha Oman:Muscat Yemen:Sanaa Belgium:Brussels Denmark:Copenhagen
Iceland:Reykjavik Latvia:Riga Estonia:Tallinn Ukraine:Kyiv Romania:Bucharest Serbia:Belgrade
""".split())
CAPITALS["Mexico"] = "Mexico City"
CAPITALS["Argentina"] = "Buenos Aires"
CAPITALS["Ethiopia"] = "Addis Ababa"

OPPOSITES = dict(line.split(":") for line in """
hot:cold big:small tall:short fast:slow happy:sad light:dark old:young hard:soft wet:dry
full:empty rich:poor loud:quiet early:late strong:weak high:low open:closed clean:dirty
thick:thin heavy:light near:far deep:shallow sweet:sour brave:afraid wide:narrow day:night
up:down left:right push:pull win:lose buy:sell first:last good:bad true:false
inside:outside above:below begin:end alive:dead awake:asleep
""".split())

WORDS = """
cat dog sun moon star tree fish bird frog lion bear wolf duck goat cow pig horse mouse
apple lemon grape melon peach plum bread cake milk rice soup salt honey
red blue green pink gold black white
book desk lamp door chair table clock phone shoe sock hat coat ring bell drum kite ball
boat ship car bus train plane road bridge river lake sea hill rock sand snow rain wind cloud
house farm city park shop bank school garden window kitchen
planet rocket comet robot pencil paper letter music piano guitar
happy quick quiet brave smart
""".split()

PREAMBLES = ["Great question!", "What a great question!", "Sure!", "Happy to help!", "Of course!",
             "Good question!", "Thanks for asking!"]
RESTATES = ["You asked: {q}", "The question is: {q}", "Let me answer the question '{q}'"]
HEDGES = ["I think", "I believe", "If I am not mistaken,", "Probably"]
FILLERS = ["I hope this helps!", "Let me know if you have other questions.",
           "Please double-check this.", "That is my answer.", "Feel free to ask more."]
CHATTER = ["Anyone know?", "Thanks in advance!", "I was wondering the same thing.", "Bump.",
           "Same question here.", "Can someone help?", "Have you tried looking it up?",
           "Good luck!"]
NAMES = ["anna", "tom", "li", "sam", "maria", "omar", "kim", "lena", "raj", "eva", "max", "zoe"]


@dataclass
class WorldConfig:
    max_add: int = 29          # operands of add/sub are 0..max_add
    max_compare: int = 99      # numbers compared are 0..max_compare
    sort_len: tuple = (3, 5)   # list length range (inclusive) for sorting
    heldout_pct: int = 15      # share of number tasks held out, percent
    heldout_entity_pct: int = 25  # share of words and facts held out, percent


@dataclass(frozen=True)
class Task:
    kind: str
    args: tuple
    prompt: str

    @property
    def family(self):
        return KIND_FAMILY[self.kind]

    def to_dict(self):
        return {"kind": self.kind, "args": list(self.args), "prompt": self.prompt}

    @staticmethod
    def from_dict(d):
        return Task(d["kind"], tuple(d["args"]), d["prompt"])


def split_of(kind, args, cfg=WorldConfig()):
    """'train' or 'heldout', by a fixed hash, the same for every seed. For numbers the
    unordered operands decide (so 38 + 47 and 47 - 38 share a split); for words and
    facts the entity does (so every question about a held-out word is held out)."""
    family = KIND_FAMILY[kind]
    if family in NUMBER_FAMILIES:
        key, pct = (f"{family}:{sorted(args) if family != 'sorting' else list(args)}",
                    cfg.heldout_pct)
    else:
        key, pct = f"entity:{args[0]}", cfg.heldout_entity_pct
    return "heldout" if zlib.crc32(key.encode()) % 100 < pct else "train"


# --- questions and their canonical answers -------------------------------------------

TEMPLATES = {
    "add": ["What is {0} + {1}?", "Compute {0} + {1}.", "What do you get if you add {0} and {1}?"],
    "sub": ["What is {0} - {1}?", "Compute {0} - {1}.",
            "What do you get if you take {1} from {0}?"],
    "larger": ["Which is larger, {0} or {1}?", "Which number is bigger: {0} or {1}?"],
    "smaller": ["Which is smaller, {0} or {1}?", "Which number is less: {0} or {1}?"],
    "sort": ["Sort these numbers: {0}", "Put these numbers in order: {0}"],
    "reverse": ["Spell '{0}' backwards.", "Write '{0}' in reverse."],
    "count": ["How many letters are in '{0}'?", "Count the letters in '{0}'."],
    "capital": ["What is the capital of {0}?", "Name the capital city of {0}."],
    "opposite": ["What is the opposite of '{0}'?", "Give the opposite of '{0}'."],
}


def answer_value(task):
    """The bare answer the gold scorer checks for."""
    k, a = task.kind, task.args
    if k == "add":
        return str(a[0] + a[1])
    if k == "sub":
        return str(a[0] - a[1])
    if k == "larger":
        return str(max(a))
    if k == "smaller":
        return str(min(a))
    if k == "sort":
        return " ".join(str(x) for x in sorted(a))
    if k == "reverse":
        return "-".join(reversed(a[0]))
    if k == "count":
        return str(len(a[0]))
    if k == "capital":
        return CAPITALS[a[0]]
    if k == "opposite":
        return OPPOSITES[a[0]]
    raise ValueError(f"unknown task kind {k!r}")


def render(task, value):
    """The canonical answer sentence, with `value` in the answer slot."""
    k, a = task.kind, task.args
    return {
        "add": lambda: f"{a[0]} + {a[1]} = {value}.",
        "sub": lambda: f"{a[0]} - {a[1]} = {value}.",
        "larger": lambda: f"{value} is larger.",
        "smaller": lambda: f"{value} is smaller.",
        "sort": lambda: value,
        "reverse": lambda: value,
        "count": lambda: f"'{a[0]}' has {value} letters.",
        "capital": lambda: f"The capital of {a[0]} is {value}.",
        "opposite": lambda: f"The opposite of '{a[0]}' is '{value}'.",
    }[k]()


def task_of_prompt(text):
    """The Task a typed question asks, when it is one of the world's questions in one of
    TEMPLATES' wordings (numbers in range or not, any lowercase word, a known country or
    opposite), else None: what lets a free prompt be scored by the gold scorer."""
    text = " ".join(text.split())
    for kind, templates in TEMPLATES.items():
        for t in templates:
            slot = r"(\d(?: \d)*)" if kind == "sort" else (
                r"(\d+)" if KIND_FAMILY[kind] in NUMBER_FAMILIES else r"([A-Za-z ]+?)")
            pattern = re.escape(t).replace(r"\{0\}", slot).replace(r"\{1\}", slot)
            m = re.fullmatch(pattern, text)
            if m is None:
                continue
            if kind == "sort":
                args = tuple(int(x) for x in m.group(1).split())
            elif KIND_FAMILY[kind] in NUMBER_FAMILIES:
                args = tuple(int(x) for x in m.groups())
            else:
                args = (m.group(1),)
            known = {"capital": CAPITALS, "opposite": OPPOSITES}.get(kind)
            if (known is not None and args[0] not in known) or (
                    kind in ("reverse", "count") and not re.fullmatch(r"[a-z]+", args[0])):
                continue
            if kind in ("larger", "smaller") and args[0] == args[1]:
                continue
            return Task(kind, args, text)
    return None


def ideal_answer(task):
    return render(task, answer_value(task))


NUMBER_FAMILIES = ("arithmetic", "comparison", "sorting")


def sample_task(rng, kind, split, cfg=WorldConfig()):
    """A random task of this kind from the given split ('train' or 'heldout'), or from
    either (split=None)."""
    for _ in range(10_000):
        if kind in ("add", "sub"):
            a, b = rng.randint(0, cfg.max_add), rng.randint(0, cfg.max_add)
            args = (max(a, b), min(a, b)) if kind == "sub" else (a, b)
        elif kind in ("larger", "smaller"):
            args = tuple(rng.sample(range(cfg.max_compare + 1), 2))
        elif kind == "sort":
            args = tuple(rng.randint(0, 9) for _ in range(rng.randint(*cfg.sort_len)))
        elif kind in ("reverse", "count"):
            args = (rng.choice(WORDS),)
        elif kind == "capital":
            args = (rng.choice(sorted(CAPITALS)),)
        elif kind == "opposite":
            args = (rng.choice(sorted(OPPOSITES)),)
        else:
            raise ValueError(f"unknown task kind {kind!r}")
        if split is None or split_of(kind, args, cfg) == split:
            fill = " ".join(map(str, args)) if kind == "sort" else None
            prompt = rng.choice(TEMPLATES[kind]).format(*((fill,) if fill else args))
            return Task(kind, args, prompt)
    raise RuntimeError(f"no {split} task of kind {kind}")


# --- the gold scorer -------------------------------------------------------------------
# gold = 1.0 correct + 0.5 format - 0.4 preamble - 0.3 restate - 0.2 hedge
#        - 0.5 repetition - 0.02 per word beyond the ideal answer's length
# The ideal answer scores 1.5. "correct" and "format" both need the end token; "format"
# means the last sentence is the kind's canonical sentence, whatever its value.

GOLD_WEIGHTS = dict(correct=1.0, format=0.5, preamble=-0.4, restate=-0.3, hedge=-0.2,
                    repetition=-0.5, extra_word=-0.02)

FORMAT_RE = {
    "add": r"\d+ \+ \d+ = -?\d+\.", "sub": r"\d+ - \d+ = -?\d+\.",
    "larger": r"\d+ is larger\.", "smaller": r"\d+ is smaller\.",
    "sort": r"\d( \d)*", "reverse": r"[a-z](-[a-z])*", "count": r"'[a-z]+' has \d+ letters\.",
    "capital": r"The capital of [A-Z][A-Za-z ]* is [A-Z][A-Za-z ]*\.",
    "opposite": r"The opposite of '[a-z]+' is '[a-z]+'\.",
}


def extract_answer(task, text):
    """The response's final answer for this kind of task, or None. The question itself,
    restated in the response, is no answer: its numbers and words are left out. Lists,
    spellings and capitals count whole only (no "99" for 9, no "Tunis" in "Tunisia", no
    "e-c" in "double-check")."""
    k, text = task.kind, text.replace(task.prompt, " ")
    if k in ("add", "sub", "count"):
        m = re.findall(r"-?\d+", text)
        return m[-1] if m else None
    if k in ("larger", "smaller"):
        m = re.findall(rf"(-?\d+) is {k}", text) or re.findall(r"-?\d+", text)
        return m[-1] if m else None
    if k == "sort":
        m = re.findall(r"(?<!\d)\d(?: \d)+(?!\d)", text)
        return m[-1] if m else None
    if k == "reverse":
        m = re.findall(r"\b[a-z](?:-[a-z])+\b", text)
        return m[-1] if m else None
    if k == "capital":
        found = [(m.start(), c) for c in CAPITALS.values()
                 for m in re.finditer(rf"\b{re.escape(c)}\b", text)]
        return max(found)[1] if found else None
    if k == "opposite":
        m = re.findall(r"'([a-z]+)'", text)
        m = [w for w in m if w != task.args[0]]
        return m[-1] if m else None
    raise ValueError(f"unknown task kind {k!r}")


def _words(text):
    return text.split()


def _sentences(text):
    return [x.strip() for x in re.split(r"(?<=[.!?])\s+", text.strip()) if x.strip()]


def has_preamble(text):
    return any(text.startswith(p) for p in PREAMBLES)


def has_restate(task, text):
    return task.prompt in text or any(r.split("{q}")[0] in text for r in RESTATES)


def has_hedge(text):
    return any(h in text for h in HEDGES)


def has_repetition(text):
    """A sentence said twice, a word trigram said twice, or a word (longer than one
    character) said twice in a row. Single digits may repeat: "0 0 4" is a sorted list."""
    sentences = _sentences(text)
    if len(sentences) != len(set(sentences)):
        return True
    w = _words(text)
    if any(w[i] == w[i + 1] and len(w[i]) > 1 for i in range(len(w) - 1)):
        return True
    first_seen = {}
    for i in range(len(w) - 2):
        tri = tuple(w[i:i + 3])
        if tri in first_seen and i - first_seen[tri] >= 3:
            return True
        first_seen.setdefault(tri, i)
    return False


def is_formatted(task, text, ended):
    """Ended, and the last sentence is the kind's canonical sentence (a hedge in front is
    penalised on its own, not here)."""
    sentences = _sentences(text)
    if not (ended and sentences):
        return False
    last = sentences[-1]
    for h in HEDGES:
        if last.startswith(h + " "):
            last = last[len(h) + 1:]
    return re.fullmatch(FORMAT_RE[task.kind], last) is not None


def grade(task, text, ended):
    """Everything the gold scorer sees in a response, and the gold score itself. An
    answer counts as correct only when the response ended: one that runs on past its
    answer has not answered."""
    g = dict(
        correct=bool(ended and extract_answer(task, text) == answer_value(task)),
        format=is_formatted(task, text, ended),
        preamble=has_preamble(text),
        restate=has_restate(task, text),
        hedge=has_hedge(text),
        repetition=has_repetition(text),
        words=len(_words(text)),
    )
    extra = max(0, g["words"] - len(_words(ideal_answer(task))))
    g["gold"] = (sum(GOLD_WEIGHTS[k] * float(g[k])
                     for k in ("correct", "format", "preamble", "restate", "hedge", "repetition"))
                 + GOLD_WEIGHTS["extra_word"] * extra)
    return g


def gold(task, text, ended):
    return grade(task, text, ended)["gold"]


# --- the simulated raters --------------------------------------------------------------
# P(A > B) = sigmoid(k (gold_A - gold_B) + b_len (words_A - words_B)
#                    + b_style (preamble_A - preamble_B))
# Written as a utility per response, u = k gold + b_len words + b_style preamble, a K-wise
# ranking is drawn by sorting u + Gumbel noise (Plackett-Luce). Every pair of that ranking
# then has exactly the Bradley-Terry marginal above, so the best accuracy any reward model
# can reach on a pair is max(p, 1 - p) with p = sigmoid(u_A - u_B).


@dataclass
class RaterConfig:
    k: float = 3.0        # how sharply raters follow the gold gap
    b_len: float = 0.12   # per word: longer looks more thorough
    b_style: float = 1.5  # a friendly preamble ("Great question!") looks helpful


def rater_utility(task, text, ended, rc=RaterConfig()):
    g = grade(task, text, ended)
    return rc.k * g["gold"] + rc.b_len * g["words"] + rc.b_style * float(g["preamble"])


def rater_ranking(rng, utilities):
    """Indices best first: Plackett-Luce sample by Gumbel-perturbed sorting."""
    noisy = [u - math.log(-math.log(rng.random() or 1e-300)) for u in utilities]
    return sorted(range(len(utilities)), key=lambda i: -noisy[i])


def pair_probability(u_a, u_b):
    """The raters' P(A preferred over B)."""
    return 1.0 / (1.0 + math.exp(-(u_a - u_b)))


# --- response styles (for demonstrations and preference candidates) ---------------------


def _near_miss(rng, n):
    """A number a little off n: one digit changed, two digits swapped, or off by a few."""
    s = str(n)
    how = rng.choice(["digit", "swap", "step"]) if len(s) > 1 else rng.choice(["digit", "step"])
    if how == "digit":
        i = rng.randrange(len(s))
        s = s[:i] + rng.choice([d for d in "0123456789"
                                if d != s[i] and (i or d != "0" or len(s) == 1)]) + s[i + 1:]
    elif how == "swap" and s[0] != s[1] and s[1] != "0":
        s = s[1] + s[0] + s[2:]
    else:
        s = str(max(0, n + rng.choice([-10, -2, -1, 1, 2, 10])) if n > 10
                else n + rng.choice([1, 2, 3]))
    return s if s != str(n) else str(n + 1)


def wrong_value(rng, task):
    """A wrong answer of the kinds a small model gives: near misses, the wrong operand,
    a mangled copy. Never the right answer."""
    k, a, v = task.kind, task.args, answer_value(task)
    if k in ("add", "sub", "count"):
        w = str(a[0] - a[1] if k == "add" and rng.random() < 0.2 else _near_miss(rng, int(v)))
        w = w if w != v else str(int(v) + 1)
    elif k in ("larger", "smaller"):
        other = min(a) if k == "larger" else max(a)
        w = rng.choice([str(other), str(other), _near_miss(rng, int(v)), str(rng.randrange(100))])
        w = w if w != v else _near_miss(rng, int(v))
    elif k == "sort":
        xs = sorted(a)
        how = rng.choice(["swap", "swap", "drop", "repeat", "unsorted"])
        unequal = [i for i in range(len(xs) - 1) if xs[i] != xs[i + 1]]
        if how == "swap" and unequal:
            i = rng.choice(unequal)
            xs[i], xs[i + 1] = xs[i + 1], xs[i]
        elif how == "drop":
            xs.pop(rng.randrange(len(xs)))
        elif how == "repeat":
            i = rng.randrange(len(xs) - 1)
            xs[i + 1] = xs[i]
        elif how == "unsorted":
            xs = list(a)
        w = " ".join(map(str, xs))
        if w == v:
            w = " ".join(map(str, sorted(a)[:-1] + [(sorted(a)[-1] + 1) % 10]))
    elif k == "reverse":
        letters = list(reversed(a[0]))
        how = rng.choice(["unreversed", "swap", "drop", "change"])
        if how == "unreversed":
            letters = list(a[0])
        elif how == "swap" and len(letters) > 2:
            i = rng.randrange(len(letters) - 1)
            letters[i], letters[i + 1] = letters[i + 1], letters[i]
        elif how == "drop" and len(letters) > 2:
            letters.pop(rng.randrange(len(letters)))
        else:
            i = rng.randrange(len(letters))
            letters[i] = rng.choice([c for c in "abcdefghijklmnopqrstuvwxyz" if c != letters[i]])
        w = "-".join(letters)
        if w == v:
            w = "-".join(letters + ["s"])
    elif k == "capital":
        w = rng.choice([c for c in CAPITALS.values() if c != v])
    elif k == "opposite":
        w = rng.choice([o for o in OPPOSITES.values() if o != v])
    else:
        raise ValueError(k)
    assert w != v, (task, w)
    return w


def continuation(rng, task):
    """What a base model does with a question: more questions, or chatter."""
    if rng.random() < 0.5:
        other = sample_task(rng, task.kind, "train")
        return f"{other.prompt} {rng.choice(CHATTER)}"
    return " ".join(rng.sample(CHATTER, 2))


STYLES = ("ideal", "preamble", "verbose", "hedged", "wrong", "preamble_wrong", "wrong_format",
          "continuation", "truncated", "repeated")


def respond(rng, task, style):
    """(text, ended) for a response of the given style."""
    ideal = ideal_answer(task)
    if style == "ideal":
        return ideal, True
    if style == "preamble":
        return f"{rng.choice(PREAMBLES)} {ideal}", True
    if style == "verbose":
        restate = rng.choice(RESTATES).format(q=task.prompt)
        return f"{restate} {rng.choice(HEDGES)} {ideal} {rng.choice(FILLERS)}", True
    if style == "hedged":
        return f"{rng.choice(HEDGES)} {ideal}", True
    if style == "wrong":
        return render(task, wrong_value(rng, task)), True
    if style == "preamble_wrong":
        return f"{rng.choice(PREAMBLES)} {render(task, wrong_value(rng, task))}", True
    if style == "wrong_format":
        v = answer_value(task)
        return rng.choice([v, f"The answer is {v}", f"{v}!", f"It is {v}, I guess"]), True
    if style == "continuation":
        return continuation(rng, task), rng.random() < 0.3
    if style == "truncated":
        w = ideal.split()
        return (" ".join(w[: max(1, len(w) // 2)]) if len(w) > 1
                else ideal[: max(1, len(ideal) // 2)]), False
    if style == "repeated":
        return f"{ideal} {ideal}", True
    raise ValueError(f"unknown style {style!r}")


# --- generators: corpus, demonstrations, preference rankings, prompts ------------------

STYLE_WEIGHTS = {"ideal": 3, "preamble": 2, "verbose": 2, "hedged": 1, "wrong": 2,
                 "preamble_wrong": 1, "wrong_format": 1, "continuation": 1, "truncated": 1,
                 "repeated": 1}


def preference_record(rng, task, K=4, rc=RaterConfig()):
    styles = list(STYLE_WEIGHTS)
    chosen_styles = []
    while len(chosen_styles) < K:  # K distinct styles, weighted
        s = rng.choices(styles, weights=[STYLE_WEIGHTS[x] for x in styles])[0]
        if s not in chosen_styles:
            chosen_styles.append(s)
    responses = []
    for s in chosen_styles:
        text, ended = respond(rng, task, s)
        responses.append(dict(text=text, ended=ended, style=s,
                              gold=round(gold(task, text, ended), 4),
                              utility=round(rater_utility(task, text, ended, rc), 4)))
    ranking = rater_ranking(rng, [r["utility"] for r in responses])
    return dict(task=task.to_dict(), family=task.family, prompt=task.prompt, responses=responses,
                ranking=ranking)


# Contractors' habits. Each task kind's demonstrations come from one contractor, and the
# contractors of these kinds end most answers with the same pleasantry, against the style
# guide. SFT copies the habit: its greedy answer to such a question ends with the sign-off,
# which costs the format point and the extra words in the gold score, and which the raters
# mostly dislike. Removing it is the improvement left for RLHF to make on held-out
# questions, where the answers' correctness hardly moves (RESULTS.md).
SIGN_OFFS = {"larger": "I hope this helps!", "smaller": "I hope this helps!",
             "count": "Let me know if you have other questions.",
             "capital": "Feel free to ask more.", "opposite": "I hope this helps!"}


def sft_record(rng, task, imperfect_rate=0.06, habit_rate=0.6):
    """A demonstration. A small share is imperfect, as contractors' demos are; in the kinds
    of SIGN_OFFS a share habit_rate of the rest ends with the contractor's sign-off."""
    quality = "ideal"
    if rng.random() < imperfect_rate:
        quality = rng.choice(["preamble", "wrong", "verbose"])
    text, _ = respond(rng, task, quality)
    # no draw when habit_rate is 0, so --habit=0 writes the same files as a world without the habit
    if (quality == "ideal" and task.kind in SIGN_OFFS and habit_rate > 0
            and rng.random() < habit_rate):
        text, quality = f"{text} {SIGN_OFFS[task.kind]}", "signed_off"
    return dict(task=task.to_dict(), family=task.family, prompt=task.prompt, response=text,
                quality=quality)


def _spelling_doc(rng, words):
    out = []
    for w in words:
        out.append(rng.choice([
            f"The word '{w}' is spelled {'-'.join(w)}.",
            f"'{w}' is spelled {'-'.join(w)}. It has {len(w)} letters.",
            f"How to spell {w}: {'-'.join(w)}.",
            f"'{w}' has {len(w)} letters: {'-'.join(w)}.",
            f"Spelling: {w} = {'-'.join(w)}.",
        ]))
    return " ".join(out)


def _fact_doc(rng, countries, words):
    out = []
    for c in countries:
        cap = CAPITALS[c]
        out.append(rng.choice([f"The capital of {c} is {cap}.", f"{cap} is the capital of {c}.",
                               f"{c} has its capital in {cap}.",
                               f"The capital city of {c} is {cap}."]))
    for w in words:
        o = OPPOSITES[w]
        out.append(rng.choice([f"The opposite of '{w}' is '{o}'.",
                               f"'{w}' and '{o}' are opposites.", f"The opposite of {w} is {o}."]))
    rng.shuffle(out)
    return " ".join(out)


def corpus_documents(rng, n_docs, cfg=WorldConfig()):
    """The pretraining corpus: facts, spellings, arithmetic drills, worked examples,
    question lists, forum threads where questions meet chatter, and the stylistic habits
    (preambles, restating, hedges) that a reward model can later be fooled by. Number
    tasks come from the train split only; words and facts from both (see the split)."""

    def corpus_task(kind):
        return sample_task(rng, kind, "train" if KIND_FAMILY[kind] in NUMBER_FAMILIES else None,
                           cfg)

    docs = []
    for _ in range(n_docs):
        r = rng.random()
        if r < 0.12:
            docs.append(_fact_doc(rng, rng.sample(sorted(CAPITALS), 6),
                                  rng.sample(sorted(OPPOSITES), 4)))
        elif r < 0.24:
            docs.append(_spelling_doc(rng, rng.sample(WORDS, 6)))
        elif r < 0.36:  # arithmetic drills: the one skill here that needs many examples
            head = rng.choice(["Practice:", "Sums:", "Exercises:", ""])
            eqs = [ideal_answer(corpus_task(rng.choice(("add", "sub"))))
                   for _ in range(rng.randint(6, 12))]
            docs.append((head + " " if head else "") + " ".join(eqs))
        elif r < 0.62:  # worked examples: answered questions teach copying from question to answer
            lines = []
            for _ in range(rng.randint(3, 6)):
                t = corpus_task(rng.choice(KINDS))
                lines.append(rng.choice([f"Q: {t.prompt}\nA: {ideal_answer(t)}",
                                         f"Question: {t.prompt} Answer: {ideal_answer(t)}",
                                         ideal_answer(t)]))
            docs.append("\n".join(lines))
        elif r < 0.72:  # lists of questions without answers
            qs = [corpus_task(rng.choice(KINDS)).prompt for _ in range(rng.randint(3, 7))]
            head = rng.choice(["Quiz questions:", "Homework:", "Some questions to think about:",
                               "Practice:"])
            docs.append(head + "\n" + "\n".join(f"{i + 1}. {q}" for i, q in enumerate(qs)))
        else:  # forum threads: a question, then more questions and chatter;
            # sometimes a wordy answer
            t = corpus_task(rng.choice(KINDS))
            a, b, c = rng.sample(NAMES, 3)
            lines = [f"{a} asked: {t.prompt} {rng.choice(CHATTER)}"]
            for _ in range(rng.randint(1, 3)):
                u = rng.random()
                if u < 0.4:
                    lines.append(f"{b} replied: {rng.choice(CHATTER)} {corpus_task(t.kind).prompt}")
                elif u < 0.8:
                    text, _ = respond(rng, t,
                                      rng.choice(["preamble", "verbose", "hedged", "ideal"]))
                    lines.append(f"{c} replied: {text}")
                else:
                    lines.append(f"{a} replied: {rng.choice(CHATTER)}")
            docs.append("\n".join(lines))
    return docs


def task_stream(rng, split, n, cfg=WorldConfig()):
    """n tasks, kinds in turn, so every kind is equally represented."""
    return [sample_task(rng, KINDS[i % len(KINDS)], split, cfg) for i in range(n)]
