"""Write the independent task files in examples/tasks/ (JSONL, the format of ``--task PATH.jsonl``).

They check circuits the way a user would with prompts of their own: IOI and greater-than with names,
templates, places, objects, events and centuries that neither of the built-in tasks' prompt sets
uses. IOI lines give a ``wrong`` token (metric: logit(answer) - logit(wrong)); greater-than lines do
not (metric: log p(answer), the answer being the next decade's digit). Deterministic: rerunning
rewrites the same files.

    python tools/make_task_files.py
"""

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "examples" / "tasks"

NAMES = ["Bob", "Joe", "Dan", "Ann", "Bill", "Jim", "Kim", "Ron", "Ray", "Ted", "Bruce", "Dave", "Ian", "Matt",
         "Nick", "Will", "Jake", "Sean", "Walter", "Victor", "Martin", "Simon", "Carol", "Diane", "Ellen", "Joan",
         "Judy", "Nancy", "Wendy", "Oscar", "Felix", "Jason", "Owen", "Scott", "Eva", "Maria"]
PLACES = ["shop", "lake", "river", "bridge", "garage", "castle", "forest", "village", "stadium"]
OBJECTS = ["umbrella", "bottle", "phone", "ticket", "camera", "pencil", "basket", "jacket", "blanket"]
IOI_TEMPLATES = [  # {a} first name, {b} second name, {s} the repeated one
    "Late at night {a} and {b} sat by the {place}, and {s} passed the {object} to",
    "{a} and {b} spent the day at the {place}. In the evening {s} gave the {object} to",
    "After a long walk to the {place}, {a} and {b} rested, and {s} handed the {object} to",
    "It was cold at the {place}, so {a} and {b} went inside, where {s} lent the {object} to",
    "The {place} was busy. {a} and {b} found a table, and {s} gave the {object} to",
    "Neither {a} nor {b} liked the {place}, but {s} still brought the {object} to",
]
EVENTS = ["tournament", "exhibition", "renovation", "negotiation", "conference", "trial", "season", "survey"]
GT_TEMPLATES = [
    "The {event} ran from the year {start} to the year {century}",
    "Records show the {event} started in the year {start} and ended in the year {century}",
]
CENTURIES = (10, 20)


def ioi_lines(n: int, rng: random.Random):
    for i in range(n):
        template = IOI_TEMPLATES[i % len(IOI_TEMPLATES)]
        io, s, other = rng.sample(NAMES, 3)
        first, second = (s, io) if i % 2 else (io, s)  # BABA on odd lines, ABBA on even ones
        fill = dict(place=rng.choice(PLACES), object=rng.choice(OBJECTS), a=first, b=second)
        yield {"prompt": template.format(s=s, **fill), "answer": " " + io, "wrong": " " + s,
               "negative": template.format(s=other, **fill), "negative_answer": " " + io}


def greater_than_lines(n: int, rng: random.Random):
    for i in range(n):
        template, event = GT_TEMPLATES[i % len(GT_TEMPLATES)], rng.choice(EVENTS)
        century, tens = rng.choice(CENTURIES), rng.randint(2, 8)
        start = century * 100 + tens * 10 + rng.randint(0, 9)
        yield {"prompt": template.format(event=event, start=start, century=century), "answer": str(tens + 1),
               "negative": template.format(event=event, start=f"{century}01", century=century),
               "negative_answer": "1"}


def write(folder: Path, name: str, lines) -> None:
    path = folder / name
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    print(path)


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    write(OUT, "ioi-independent.jsonl", ioi_lines(64, random.Random(0)))
    write(OUT, "greater-than-independent.jsonl", greater_than_lines(64, random.Random(0)))
