"""Build the bundled controlled-sentiment prompts: openings of film reviews for a model to continue.

    python3 -m posttrain.bundled.sentiment [--out DIR]

writes ``sentiment_train.jsonl`` (600 rows, seed 0) and ``sentiment_heldout.jsonl`` (120 rows, seed 1) into
``DIR`` (default: this folder). It is the task of the DPO paper's first experiment (Rafailov et al. 2023,
Sec. 6.1: a review prefix continued by the policy, a sentiment classifier as the reward), with openings this
project writes itself instead of IMDb text. Each row is ``{"prompt", "genre", "tone"}``: the prompt is raw
text to continue (``data.chat_template: false``) and always stops mid-sentence; ``tone`` is the way the
opening leans (positive, negative, mixed or neutral, tilted to the last two so a starting model's sentiment
is moderate). Openings are filled into templates from word lists written for this file; the made-up
titles, people and plot details are split between train and held-out, and a held-out opening whose first 8
words start any training opening is redrawn. Every choice comes from ``random.Random(seed)``, so the files
are byte-identical on every run (``tests/test_sentiment_data.py`` checks the shipped files against a build).
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Sequence
from pathlib import Path

TRAIN_SEED, HELDOUT_SEED = 0, 1
N_TRAIN, N_HELDOUT = 600, 120
TRAIN_FILE, HELDOUT_FILE = "sentiment_train.jsonl", "sentiment_heldout.jsonl"
MIN_WORDS, MAX_WORDS = 6, 20
PREFIX_WORDS = 8  # a held-out opening must not share its first 8 words with a training opening
TONES = ("positive", "negative", "mixed", "neutral")
TONE_CYCLE = ("positive", "negative", "mixed", "neutral") * 2 + ("mixed", "neutral")  # 2 : 2 : 3 : 3


def _l(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(";"))


# genre label -> (the noun used in the text, plot details for train, plot details for held-out)
GENRES: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "horror": (
        "horror film",
        _l("a haunted lighthouse; a family in a farmhouse; a babysitter and a locked attic; a cursed wedding video"),
        _l("a ghost in a laundromat; campers who hear singing under the lake"),
    ),
    "romantic comedy": (
        "romantic comedy",
        _l("two rival bakers on one street; a wedding planner who hates weddings; pen pals who meet by accident"),
        _l("two strangers stuck on a night train; a matchmaker who cannot get a date"),
    ),
    "war film": (
        "war film",
        _l("a radio operator behind enemy lines; a field hospital in 1917; three brothers in one regiment"),
        _l("a mapmaker on the Eastern Front; a nurse smuggling letters home"),
    ),
    "documentary": (
        "documentary",
        _l("a family of beekeepers; the last typewriter repair shop in Ohio; a chess club in a prison"),
        _l("night-shift bus drivers; a town that builds its own violins"),
    ),
    "animated feature": (
        "animated feature",
        _l("a lost paper kite; a robot that collects odd socks; a fox learning to swim; a mouse who runs a bakery"),
        _l("a cloud afraid of heights; a teapot on a road trip"),
    ),
    "heist thriller": (
        "heist thriller",
        _l("a crew robbing an opera house; a safecracker with one last job; a theft during a chess tournament"),
        _l("twins who rob a casino barge; a forger who steals her own paintings"),
    ),
    "western": (
        "western",
        _l("a sheriff with a broken hand; a cattle drive through a drought; a widow defending her ranch"),
        _l("a blind gunsmith; two outlaws sharing one horse"),
    ),
    "science fiction": (
        "science-fiction film",
        _l("a colony ship that wakes too early; a linguist decoding a signal; a city that forgets every Tuesday"),
        _l("a greenhouse on the moon; a clone who runs a roadside diner"),
    ),
    "musical": (
        "musical",
        _l("a failing dance school; a choir of retired miners; a jazz club facing demolition"),
        _l("a ferry crew that sings its rounds; a piano tuner who cannot hear"),
    ),
    "period drama": (
        "period drama",
        _l("servants in a manor in 1890; a duchess who runs a newspaper; two sisters and a contested will"),
        _l("a glassblower in Venice; a governess who writes detective stories"),
    ),
    "coming-of-age": (
        "coming-of-age story",
        _l("a summer at a roadside motel; a girl who joins a boxing gym; three friends on a last school trip"),
        _l("twins who swap summer jobs; a teenager running a pirate radio station"),
    ),
    "courtroom drama": (
        "courtroom drama",
        _l("a juror who refuses to vote; a public defender's first murder case; a trial over a missing dog"),
        _l("a translator at a war-crimes trial; a lawyer defending her old teacher"),
    ),
    "sports drama": (
        "sports drama",
        _l("a women's rowing team; an aging goalkeeper; a bowling league in Detroit"),
        _l("a curling team from a tiny island; a jockey who is afraid of horses"),
    ),
    "mystery": (
        "mystery",
        _l("a missing bride; a poisoned cake at a village fete; a detective who cannot read"),
        _l("a murder on a ski lift; a crossword that predicts crimes"),
    ),
    "biopic": (
        "biopic",
        _l("a forgotten inventor; a chess prodigy from Riga; a cartoonist who lost his sight"),
        _l("the first woman to fly over the Andes; a composer who wrote only lullabies"),
    ),
    "disaster movie": (
        "disaster movie",
        _l("a dam that starts to crack; a skyscraper fire on New Year's Eve; a volcano under a ski resort"),
        _l("a bridge collapse at rush hour; a hailstorm over a stadium"),
    ),
    "family comedy": (
        "family comedy",
        _l("a road trip with a pet goat; a grandmother who joins a punk band; a dad hired as a mall Santa"),
        _l("a family running a campsite; a boy who trains the neighbour's cat"),
    ),
    "film noir": (
        "film noir",
        _l("a night clerk and a missing ledger; a saxophonist framed for murder; a private eye in a rainy port"),
        _l("a switchboard operator who overhears a plot; a taxi driver with the wrong passenger"),
    ),
}
TITLE_FIRST = (
    _l("Glass; Winter; Silver; Paper; Quiet; Iron; Velvet; Hollow; Amber; Salt; Copper; Northern; Little; Bitter"),
    _l("Crimson; Distant; Marble; Cobalt; Ashen; Lantern; Sunken"),
)
TITLE_SECOND = _l("Harbor; Orchard; Ledger; Tide; Country; Hours; Garden; Signal; Road; Season; Letters; Kingdom")
FIRST_NAMES = _l("Marta; Jonas; Priya; Tomas; Lena; Idris; Noor; Callum; Ines; Mateo; Greta; Yusuf; Hana; Felix; Rosa")
SURNAMES = (
    _l("Ostrowski; Okafor; Lindqvist; Moreau; Castellan; Adeyemi; Halvorsen; Brannigan; Sato; Petrakis; Whitlow"),
    _l("Varga; Nakamura; Delacroix; Mbeki; Thorne; Quintero"),
)
ADJECTIVES = _l(
    "two-hour; low-budget; slow-burning; long-awaited; modest; ambitious; black-and-white; small; sprawling; "
    "quiet; noisy; handsomely made; oddly structured; much-hyped; unassuming"
)
ELEMENTS = _l("cinematography; score; dialogue; editing; production design; sound design; screenplay; casting")
ROLES = _l(
    "a weary detective; a grieving widow; a small-town teacher; a retired soldier; an ambitious young lawyer; "
    "a disgraced chef; a runaway teenager; a lonely night watchman; an overworked nurse; a stubborn farmer"
)
PLACES = _l(
    "a fishing village; a crumbling hotel; a snowbound town; a border crossing; a suburban cul-de-sac; "
    "a river barge; a mountain observatory; a dying shopping mall; an island ferry port"
)

# Slots: {film} "this <adj> <genre> about <detail>", {named} "the <genre> <Title>", {title}, {genre} "<genre>",
# {a_genre} "a(n) <genre>", {person} a made-up name, {role}, {element}, {place}, {minutes}.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "positive": (
        "From its very first shot, {named} makes it clear that",
        "{person} has never been better than in {named}, where every scene",
        "I left {film} grinning, mostly because",
        "It is rare for {a_genre} to be this confident, and {title} earns it by",
        "{person} has made something special with {named}, a film that",
        "The {element} of {named} is so beautifully judged that",
        "Everything about {film} works, from the",
        "I have now seen {named} three times, and each time I notice",
        "As a critic I rarely say this, but {film} is",
    ),
    "negative": (
        "I wanted to like {film}, but",
        "{title} runs {minutes} minutes, and as {a_genre} it feels",
        "Somewhere in the middle of {named}, I realized that",
        "Not even {person} can rescue {named} from its",
        "The {element} of {film} is so clumsy that",
        "{person} seems to have forgotten that {a_genre} needs",
        "By the final act of {named}, I had stopped caring whether",
        "I checked my watch four times during {film}, and",
        "The trouble with {named} starts with the",
    ),
    "mixed": (
        "{title} has a terrific first half, but the second half of this {genre}",
        "{person} is wonderful as {role} in {named}, but the script around",
        "There is a great {genre} buried somewhere inside {title}, and",
        "I admired the {element} of {film} more than I",
        "For all its ambition, {named} never quite",
        "{person} clearly knows how to stage a scene, yet {named} still feels",
        "Parts of {film} are gorgeous, and parts of it are",
        "I am torn about {named}, because on one hand",
        "The ending of {named} is either brilliant or",
        "Critics will argue about {film} for years, since its",
    ),
    "neutral": (
        "{title} is {a_genre} set in {place}, and its story",
        "The plot of {named} follows {detail}, and the film",
        "Directed by {person}, {named} is the kind of picture that",
        "In {named}, {person} plays {role} who",
        "I saw {film} on a rainy Sunday afternoon, and",
        "At {minutes} minutes, {named} is",
        "My first thought when the credits of {named} began to roll was",
        "The opening scene of {film} takes place in",
        "Most of {named} is told from the point of view of",
        "Going into {named}, all I knew was that it was",
        "{person} wrote and directed {film}, which",
        "The {element} is the first thing you notice in {named}, and it",
    ),
}


def _article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _opening(rng: random.Random, tone: str, genre: str, part: int) -> str:
    """One opening of ``tone`` about a film of ``genre``; ``part`` 0 draws train details, 1 held-out ones."""
    noun, train_details, heldout_details = GENRES[genre]
    detail = rng.choice((train_details, heldout_details)[part])
    title = f"{rng.choice(TITLE_FIRST[part])} {rng.choice(TITLE_SECOND)}"
    slots = {
        "film": f"this {rng.choice(ADJECTIVES)} {noun} about {detail}",
        "named": f"the {noun} {title}",
        "title": title,
        "genre": noun,
        "a_genre": _article(noun),
        "detail": detail,
        "person": f"{rng.choice(FIRST_NAMES)} {rng.choice(SURNAMES[part])}",
        "role": rng.choice(ROLES),
        "element": rng.choice(ELEMENTS),
        "place": rng.choice(PLACES),
        "minutes": str(rng.randint(84, 178)),
    }
    text = rng.choice(TEMPLATES[tone]).format(**slots)
    return text[0].upper() + text[1:]


def prefix(text: str, n: int = PREFIX_WORDS) -> str:
    """The first ``n`` words of ``text`` (lower-cased), which train and held-out openings must not share."""
    return " ".join(text.lower().split()[:n])


def build_rows(n: int, seed: int, part: int, avoid_prefixes: frozenset[str] = frozenset()) -> list[dict[str, str]]:
    """``n`` unique openings, tones in TONE_CYCLE proportions and genres taking turns, in a seeded order."""
    rng = random.Random(seed)
    genres = sorted(GENRES)
    plan = [(TONE_CYCLE[i % len(TONE_CYCLE)], genres[i % len(genres)]) for i in range(n)]
    rng.shuffle(plan)
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    for tone, genre in plan:
        for _ in range(1000):
            text = _opening(rng, tone, genre, part)
            if MIN_WORDS <= len(text.split()) <= MAX_WORDS and text not in seen and prefix(text) not in avoid_prefixes:
                break
        else:
            raise RuntimeError(f"no new {tone} {genre} opening after 1000 draws")
        seen.add(text)
        rows.append({"prompt": text, "genre": genre, "tone": tone})
    return rows


def build_splits() -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    train = build_rows(N_TRAIN, TRAIN_SEED, 0)
    heldout = build_rows(N_HELDOUT, HELDOUT_SEED, 1, frozenset(prefix(r["prompt"]) for r in train))
    return train, heldout


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="output folder")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in zip((TRAIN_FILE, HELDOUT_FILE), build_splits(), strict=True):
        with (args.out / name).open("w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        counts = ", ".join(f"{t} {sum(r['tone'] == t for r in rows)}" for t in TONES)
        print(f"{args.out / name}: {len(rows)} rows ({counts})")


if __name__ == "__main__":
    main()
