"""Deterministic lease documents of a given page count, and questions about them, for the document benchmarks.

Each document is built from ``samples/lease.txt``'s twelve sections with its own parties, address, dates,
sums and clauses (seeded by its number), so no two documents share a page. Every line is short enough
never to wrap, so a document of ``n`` lines renders to ``ceil(n / lines_per_page)`` pages with Glyph's
render settings; ``lines_per_page`` is measured once by rendering. A document is sized to end half way
down its last page (a one-page lease is its fixed ~52 lines), so a line more or less never changes its
page count.
"""

from __future__ import annotations

import functools
import random
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

LEASE = Path(__file__).resolve().parents[1] / "samples" / "lease.txt"
#: Longest line: at Glyph's settings (A4 at 72 dpi, 9 pt DejaVu Sans, 10 pt margins) ~110 fit one line.
LINE_CHARS = 86

_LANDLORDS = ["Harbour Estates", "Northgate Property", "Riverside Holdings", "Castle Lane Investments",
              "Meridian Land", "Old Mill Estates", "Beacon Property Trust", "Westfield Realty"]
_TENANTS = ["Acme Research", "Blue Finch Analytics", "Copper Kettle Foods", "Delta Optics", "Evergreen Legal",
            "Foxglove Design", "Granite Software", "Heron Logistics", "Ivory Tower Press", "Juniper Health"]
_STREETS = ["Long Lane", "Market Street", "Mill Road", "Station Approach", "Church Walk", "Bridge Street",
            "Kings Parade", "Queens Row", "Canal Side", "High Street"]
_CITIES = ["Oxford", "Leeds", "Bristol", "York", "Norwich", "Bath", "Exeter", "Durham", "Lincoln", "Chester"]
_FLOORS = ["ground", "first", "second", "third", "fourth", "fifth"]
_USES = ["offices", "a research laboratory", "a design studio", "a training centre", "a clinic", "a showroom"]
_TOPICS = ["parties", "premises", "term", "rent", "rent review", "deposit", "use", "repairs", "break clause",
           "insurance", "assignment", "notices"]
_VERBS = ["applies to", "binds", "covers", "extends to", "is read together with", "governs"]
_SCOPES = ["every part of the premises", "the parking spaces", "the shared stairs and lifts", "the rear yard",
           "any person claiming through the Tenant", "every year of the term", "the plant room",
           "the fixtures listed in schedule {n}", "any licence granted under clause {c}"]
_LIMITS = ["within {d} days", "after {d} days' written notice", "by the {o} day of each quarter",
           "at a cost of no more than {a} euro", "up to {a} euro a year", "once in any {d}-month period"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]


@dataclass(frozen=True)
class Document:
    """A lease: its number, text, the pages it is sized for, and the facts its questions ask about."""

    seed: int
    pages: int
    text: str
    facts: dict[str, str] = field(default_factory=dict)


@functools.cache
def lines_per_page() -> int:
    """Lines of a document that fit one page at the render worker's settings, found by rendering."""
    from glyphq.celeryconfig import settings
    from glyphq.worker.pages import render_config
    from glyphq.worker.render import render_pages

    config = render_config(settings, {})
    line = "4.12 Further to clause 4, the Tenant pays 1,250 euro within 14 days of each quarter day."

    def pages(n: int) -> int:
        return len(render_pages("\n".join(line for _ in range(n)), config))

    low, high = 1, 400  # one page holds ``low`` lines, not ``high``
    if pages(high) == 1:
        raise RuntimeError("400 lines fit one page: the render settings are not Glyph's")
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if pages(middle) == 1 else (low, middle)
    return low


def _money(rng: random.Random, low: int, high: int, step: int) -> int:
    return rng.randrange(low, high, step)


def document(seed: int, pages: int, per_page: int | None = None) -> Document:
    """Lease number ``seed``, sized to render to ``pages`` pages (``per_page``: ``lines_per_page()``)."""
    per_page = per_page or lines_per_page()
    rng = random.Random(f"lease-{seed}")
    landlord = f"{rng.choice(_LANDLORDS)} {seed} Ltd"
    tenant = f"{rng.choice(_TENANTS)} {seed} Ltd"
    address = f"{rng.randint(1, 240)} {rng.choice(_STREETS)}, {rng.choice(_CITIES)}"
    start_year = rng.randint(2024, 2030)
    years = rng.randint(3, 15)
    month = rng.choice(_MONTHS)
    rent = _money(rng, 12_000, 240_000, 600)
    deposit = rent // rng.choice([2, 3, 4, 6])
    facts = {
        "landlord": landlord, "tenant": tenant, "address": address, "floor": rng.choice(_FLOORS),
        "start": f"1 {month} {start_year}", "end": f"{rng.randint(28, 30)} {month} {start_year + years}",
        "rent": f"{rent:,}", "instalment": f"{rent // 12:,}", "deposit": f"{deposit:,}",
        "review": f"1 {month} {start_year + rng.randint(1, max(1, years - 1))}", "use": rng.choice(_USES),
        "break": f"1 {month} {start_year + rng.randint(1, years)}", "notice": str(rng.randint(2, 12)),
        "spaces": str(rng.randint(0, 12)), "number": f"L-{seed:04d}-{rng.randint(100, 999)}",
    }
    main = {
        "parties": f"This lease {facts['number']} is made on {facts['start']} between {landlord} (the Landlord) "
                   f"and {tenant} (the Tenant).",
        "premises": f"The Landlord lets to the Tenant the {facts['floor']} floor of {address}, together with "
                    f"{facts['spaces']} parking spaces in the rear yard.",
        "term": f"The term begins on {facts['start']} and ends on {facts['end']}, unless ended earlier under "
                "clause 9.",
        "rent": f"The rent is {facts['rent']} euro a year, paid in equal monthly instalments of "
                f"{facts['instalment']} euro in advance on the first day of each month.",
        "rent review": f"On {facts['review']} the rent is reviewed to the open market rent, but it will never fall "
                       "below the rent payable before the review.",
        "deposit": f"The Tenant pays a deposit of {facts['deposit']} euro, held by the Landlord in a separate "
                   "account and returned within 30 days after the end of the term.",
        "use": f"The premises may be used as {facts['use']} and for no other purpose without the Landlord's "
               "written consent.",
        "repairs": "The Tenant keeps the interior in good repair. The Landlord keeps the structure, the roof and "
                   "the exterior in good repair.",
        "break clause": f"The Tenant may end this lease on {facts['break']} by giving the Landlord at least "
                        f"{facts['notice']} months' written notice, if the rent is paid up to date.",
        "insurance": "The Landlord insures the building against fire, flood and the usual risks, and the Tenant "
                     "repays a fair share of the premium as service charge.",
        "assignment": "The Tenant may not assign or sublet the premises without the Landlord's consent, which "
                      "may not be unreasonably withheld.",
        "notices": f"Notices must be in writing and delivered by hand or by recorded post to {address}.",
    }
    head = [f"LEASE OF OFFICE PREMISES {facts['number']}", ""]
    sections = []
    for number, topic in enumerate(_TOPICS, start=1):
        lines = [f"{number}. {topic.upper()}", *textwrap.wrap(main[topic], LINE_CHARS), ""]
        sections.append(lines)
    tail = [f"Signed for the Landlord: {landlord}.", f"Signed for the Tenant: {tenant}."]
    fixed = len(head) + sum(len(lines) for lines in sections) + len(tail)
    if fixed > pages * per_page - 2:
        raise ValueError(f"a lease takes at least {fixed} lines; {pages} page(s) of {per_page} lines is too few")
    clauses = max(0, (pages - 1) * per_page + per_page // 2 - fixed)
    for i in range(clauses):
        number = i % len(_TOPICS) + 1
        lines = sections[number - 1]
        k = i // len(_TOPICS) + 1
        scope = rng.choice(_SCOPES).format(n=rng.randint(1, 9), c=rng.randint(1, 12))
        limit = rng.choice(_LIMITS).format(d=rng.randint(5, 90), a=f"{rng.randrange(100, 20_000, 50):,}",
                                           o=rng.choice(["first", "tenth", "last"]))
        clause = f"{number}.{k} Clause {number} {rng.choice(_VERBS)} {scope}"
        clause = f"{clause}, {limit}." if len(clause) + len(limit) + 3 <= LINE_CHARS else f"{clause}."
        lines.insert(len(lines) - 1, clause)
    text = "\n".join([*head, *(line for lines in sections for line in lines), *tail])
    return Document(seed=seed, pages=pages, text=text, facts=facts)


_QUESTIONS = [
    "What is the yearly rent under lease {number}?",
    "When does the lease of {address} end?",
    "Who is the landlord of {address}?",
    "How much is the deposit that {tenant} pays?",
    "By when must {tenant} give notice to end the lease on {break}?",
    "What may the premises at {address} be used for?",
    "How many parking spaces come with the {floor} floor of {address}?",
    "On what date is the rent of {tenant} reviewed?",
    "What is the monthly instalment under lease {number}?",
    "Which floor of {address} does {tenant} rent?",
    "When does the term of lease {number} begin?",
    "Who keeps the roof of {address} in good repair?",
]


def questions(doc: Document, count: int, offset: int = 0) -> list[str]:
    """``count`` different questions about ``doc``: its facts first, then what its clauses say."""
    out = []
    for i in range(offset, offset + count):
        if i < len(_QUESTIONS):
            out.append(_QUESTIONS[i].format(**doc.facts))
        else:
            number, k = i % len(_TOPICS) + 1, i // len(_TOPICS)
            out.append(f"What does clause {number}.{k} of lease {doc.facts['number']} say?")
    return out


def spread(count: int, low: int, high: int) -> list[int]:
    """``count`` page counts spread evenly from ``low`` to ``high``."""
    if count == 1:
        return [high]
    return [round(low + (high - low) * i / (count - 1)) for i in range(count)]
