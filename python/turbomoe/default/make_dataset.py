"""Writes the bundled instruction dataset, instructions.jsonl.

Run: python -m turbomoe.default.make_dataset

The dataset is committed; this script is how it was made, so every answer is either computed
(arithmetic, conversions, word manipulation, calendar) or taken from a small hand-checked table
(capitals, antonyms, definitions). A fixed seed makes the output byte-identical on every run, and a
test checks that the committed file still matches it.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

SEED = 20260501
OUTPUT = Path(__file__).with_name("instructions.jsonl")

Message = dict[str, str]
Example = list[Message]
Maker = Callable[[random.Random], tuple[str, str]]

WORDS = (
    "apple banana cherry garden window planet river mountain pencil rabbit orange yellow "
    "silver castle dragon forest guitar island jacket kitten lemon marble number ocean "
    "pepper rocket summer tiger violet water winter zebra bridge candle doctor engine "
    "flower hammer letter mirror pocket shadow spider ticket button circle"
).split()

# Country -> capital; only countries whose capital is uncontroversial.
CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Japan": "Tokyo",
    "China": "Beijing",
    "India": "New Delhi",
    "Canada": "Ottawa",
    "Australia": "Canberra",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Russia": "Moscow",
    "Mexico": "Mexico City",
    "Argentina": "Buenos Aires",
    "Peru": "Lima",
    "Chile": "Santiago",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Denmark": "Copenhagen",
    "Poland": "Warsaw",
    "Greece": "Athens",
    "Ireland": "Dublin",
    "Austria": "Vienna",
    "Hungary": "Budapest",
    "Turkey": "Ankara",
    "Thailand": "Bangkok",
    "Vietnam": "Hanoi",
    "South Korea": "Seoul",
    "Nigeria": "Abuja",
    "Ghana": "Accra",
    "Morocco": "Rabat",
    "Cuba": "Havana",
    "Belgium": "Brussels",
    "New Zealand": "Wellington",
    "Philippines": "Manila",
    "Pakistan": "Islamabad",
    "Iran": "Tehran",
    "Iraq": "Baghdad",
    "Saudi Arabia": "Riyadh",
    "Ethiopia": "Addis Ababa",
    "Ukraine": "Kyiv",
    "Romania": "Bucharest",
    "Bulgaria": "Sofia",
    "Serbia": "Belgrade",
    "Croatia": "Zagreb",
    "Iceland": "Reykjavik",
    "Colombia": "Bogota",
    "Venezuela": "Caracas",
}

ANTONYMS = {
    "hot": "cold",
    "big": "small",
    "up": "down",
    "fast": "slow",
    "happy": "sad",
    "open": "closed",
    "early": "late",
    "full": "empty",
    "wet": "dry",
    "strong": "weak",
    "rich": "poor",
    "push": "pull",
    "win": "lose",
    "above": "below",
    "first": "last",
    "high": "low",
    "thick": "thin",
    "loud": "quiet",
    "true": "false",
    "left": "right",
    "inside": "outside",
    "before": "after",
    "buy": "sell",
    "always": "never",
    "day": "night",
    "north": "south",
    "east": "west",
    "question": "answer",
    "young": "old",
    "wide": "narrow",
}

DEFINITIONS = {
    "a noun": "A noun is a word that names a person, place, thing, or idea.",
    "a verb": "A verb is a word that describes an action or a state, such as run or be.",
    "an adjective": "An adjective is a word that describes a noun, such as red or tall.",
    "a prime number": "A prime number is a whole number greater than 1 whose only divisors are "
    "1 and itself.",
    "an even number": "An even number is a whole number that can be divided by 2 with no "
    "remainder.",
    "an odd number": "An odd number is a whole number that leaves a remainder of 1 when divided "
    "by 2.",
    "a triangle": "A triangle is a flat shape with three straight sides and three angles.",
    "a square": "A square is a flat shape with four equal sides and four right angles.",
    "a circle": "A circle is a flat shape whose points are all the same distance from its centre.",
    "a planet": "A planet is a large body that orbits a star, such as Earth orbiting the Sun.",
    "a mammal": "A mammal is a warm-blooded animal with hair that feeds its young with milk.",
    "photosynthesis": "Photosynthesis is how plants use sunlight, water and carbon dioxide to make "
    "sugar and release oxygen.",
    "evaporation": "Evaporation is when a liquid turns into a gas, like water drying in the sun.",
    "gravity": "Gravity is the force that pulls objects toward each other, such as toward Earth.",
    "a synonym": "A synonym is a word with the same or nearly the same meaning as another word.",
    "an antonym": "An antonym is a word with the opposite meaning of another word.",
    "a fraction": "A fraction is a number that represents part of a whole, such as 1/2.",
    "a sentence": "A sentence is a group of words that expresses a complete thought.",
    "a vowel": "A vowel is a letter such as a, e, i, o or u that stands for an open speech sound.",
    "an island": "An island is a piece of land surrounded by water.",
    "a continent": "A continent is one of Earth's seven large land masses, such as Africa or Asia.",
    "a thermometer": "A thermometer is a tool that measures temperature.",
    "an atom": "An atom is the smallest unit of a chemical element that keeps its properties.",
    "a volcano": "A volcano is an opening in Earth's crust through which molten rock escapes.",
    "a habitat": "A habitat is the natural home of an animal or plant.",
    "a perimeter": "A perimeter is the total distance around the edge of a shape.",
}

# (name, singular unit, plural unit, target plural unit, factor): value * factor is exact.
CONVERSIONS = (
    ("kilometers to meters", "kilometer", "kilometers", "meters", 1000),
    ("meters to centimeters", "meter", "meters", "centimeters", 100),
    ("centimeters to millimeters", "centimeter", "centimeters", "millimeters", 10),
    ("kilograms to grams", "kilogram", "kilograms", "grams", 1000),
    ("liters to milliliters", "liter", "liters", "milliliters", 1000),
    ("hours to minutes", "hour", "hours", "minutes", 60),
    ("minutes to seconds", "minute", "minutes", "seconds", 60),
    ("days to hours", "day", "days", "hours", 24),
    ("weeks to days", "week", "weeks", "days", 7),
    ("feet to inches", "foot", "feet", "inches", 12),
    ("yards to feet", "yard", "yards", "feet", 3),
)

DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = (
    ("January", 31),
    ("February", 0),  # 28, or 29 in a leap year: answered in words
    ("March", 31),
    ("April", 30),
    ("May", 31),
    ("June", 30),
    ("July", 31),
    ("August", 31),
    ("September", 30),
    ("October", 31),
    ("November", 30),
    ("December", 31),
)
VOWELS = "aeiou"


def _addition(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    question = rng.choice(("What is {a} + {b}?", "Add {a} and {b}.", "Compute {a} plus {b}."))
    return question.format(a=a, b=b), f"{a} + {b} = {a + b}."


def _subtraction(rng: random.Random) -> tuple[str, str]:
    a, b = sorted((rng.randint(2, 99), rng.randint(2, 99)), reverse=True)
    question = rng.choice(
        ("What is {a} - {b}?", "Subtract {b} from {a}.", "Compute {a} minus {b}.")
    )
    return question.format(a=a, b=b), f"{a} - {b} = {a - b}."


def _multiplication(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    question = rng.choice(("What is {a} * {b}?", "Multiply {a} by {b}.", "What is {a} times {b}?"))
    return question.format(a=a, b=b), f"{a} * {b} = {a * b}."


def _division(rng: random.Random) -> tuple[str, str]:
    b, q = rng.randint(2, 12), rng.randint(2, 12)
    a = b * q
    question = rng.choice(("What is {a} / {b}?", "Divide {a} by {b}."))
    return question.format(a=a, b=b), f"{a} / {b} = {q}."


def _conversion(rng: random.Random) -> tuple[str, str]:
    _, singular, plural, target, factor = rng.choice(CONVERSIONS)
    value = rng.randint(1, 12)
    unit = singular if value == 1 else plural
    question = rng.choice(
        ("How many {target} are in {v} {unit}?", "Convert {v} {unit} to {target}.")
    ).format(target=target, v=value, unit=unit)
    return question, f"{value} {unit} is {value * factor} {target}."


def _reverse(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    return f"Reverse the word '{word}'.", f"'{word}' reversed is '{word[::-1]}'."


def _uppercase(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    return f"Write '{word}' in capital letters.", word.upper()


def _length(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    return f"How many letters are in the word '{word}'?", f"'{word}' has {len(word)} letters."


def _first_last(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    if rng.random() < 0.5:
        return f"What is the first letter of '{word}'?", f"The first letter is '{word[0]}'."
    return f"What is the last letter of '{word}'?", f"The last letter is '{word[-1]}'."


def _vowels(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    count = sum(ch in VOWELS for ch in word)
    noun = "vowel" if count == 1 else "vowels"
    return (
        f"How many vowels (a, e, i, o, u) are in '{word}'?",
        f"'{word}' has {count} {noun}.",
    )


def _spell(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    return f"Spell '{word}' with dashes between the letters.", "-".join(word)


def _sort_words(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, 3)
    return (
        "Sort these words alphabetically: " + ", ".join(words) + ".",
        ", ".join(sorted(words)),
    )


def _capital(rng: random.Random) -> tuple[str, str]:
    country = rng.choice(sorted(CAPITALS))
    question = rng.choice(
        ("What is the capital of {c}?", "Name the capital city of {c}.", "{c}'s capital is?")
    )
    return question.format(c=country), f"The capital of {country} is {CAPITALS[country]}."


def _antonym(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(sorted(ANTONYMS))
    question = rng.choice(("What is the opposite of '{w}'?", "Give an antonym of '{w}'."))
    return question.format(w=word), f"The opposite of '{word}' is '{ANTONYMS[word]}'."


def _definition(rng: random.Random) -> tuple[str, str]:
    term = rng.choice(sorted(DEFINITIONS))
    question = rng.choice(("What is {t}?", "Define {t}.", "Explain what {t} is in one sentence."))
    return question.format(t=term), DEFINITIONS[term]


def _calendar(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(3)
    if kind == 0:
        i = rng.randrange(7)
        return f"What day comes after {DAYS[i]}?", f"{DAYS[(i + 1) % 7]} comes after {DAYS[i]}."
    if kind == 1:
        i = rng.randrange(12)
        after = MONTHS[(i + 1) % 12][0]
        return f"Which month comes after {MONTHS[i][0]}?", f"{after} comes after {MONTHS[i][0]}."
    name, days = rng.choice(MONTHS)
    if days == 0:
        return f"How many days are in {name}?", f"{name} has 28 days, or 29 in a leap year."
    return f"How many days are in {name}?", f"{name} has {days} days."


def _numbers(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(4)
    if kind == 0:
        n = rng.randint(1, 999)
        parity = "even" if n % 2 == 0 else "odd"
        return f"Is {n} even or odd?", f"{n} is {parity}."
    if kind == 1:
        a, b = rng.sample(range(1, 1000), 2)
        return f"Which is larger, {a} or {b}?", f"{max(a, b)} is larger."
    if kind == 2:
        n = rng.randint(1, 998)
        return f"What number comes after {n}?", f"{n + 1} comes after {n}."
    values = rng.sample(range(1, 100), 4)
    return (
        "Sort from smallest to largest: " + ", ".join(map(str, values)) + ".",
        ", ".join(map(str, sorted(values))),
    )


# (maker, how many single-turn examples it contributes)
MAKERS: tuple[tuple[Maker, int], ...] = (
    (_addition, 40),
    (_subtraction, 30),
    (_multiplication, 30),
    (_division, 20),
    (_conversion, 50),
    (_reverse, 20),
    (_uppercase, 15),
    (_length, 15),
    (_first_last, 15),
    (_vowels, 15),
    (_spell, 15),
    (_sort_words, 15),
    (_capital, 45),
    (_antonym, 25),
    (_definition, 25),
    (_calendar, 30),
    (_numbers, 40),
)
SYSTEM_PROMPT = "You are a helpful assistant. Answer briefly and correctly."


def build_examples(seed: int = SEED) -> list[Example]:
    """Every example, shuffled; a few carry a system prompt and a few are two-turn chats."""
    rng = random.Random(seed)
    examples: list[Example] = []
    seen: set[str] = set()
    for maker, count in MAKERS:
        made = 0
        # Duplicates would only repeat a row; skip them so each row teaches something new.
        for _ in range(count * 20):
            if made == count:
                break
            question, answer = maker(rng)
            if question in seen:
                continue
            seen.add(question)
            examples.append(
                [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            )
            made += 1
    rng.shuffle(examples)
    # Two-turn chats (the loss must cover both assistant turns) and system prompts (never
    # supervised) exercise the chat template the same way real data does.
    for i in range(0, 40, 2):
        examples[i] = examples[i] + examples.pop(i + 1)
    for i in range(40, len(examples), 9):
        examples[i] = [{"role": "system", "content": SYSTEM_PROMPT}, *examples[i]]
    return examples


def render(examples: list[Example]) -> str:
    return "".join(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m in examples)


def main() -> None:
    OUTPUT.write_text(render(build_examples()), encoding="utf-8")
    print(f"wrote {OUTPUT}")


if __name__ == "__main__":
    main()
