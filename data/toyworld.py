"""
The toy world: a deterministic, offline corpus about a fictional world, a pure function of its seed (Python's
`random.Random`, stable across platforms and versions).

Everything in maml-gpt runs offline on this corpus (the first run, the tests, the classroom); it stands in for
web text in no claim. Next-token prediction has structure to learn and a floor well above zero; SMLMT episodes
are solvable from context, as every person, place and organisation keeps its attributes (a baker "bakes bread
at the bakery") across many paragraphs; and the generator emits word-level IOB2 NER tags (PER / ORG / LOC),
with a held-out pool of entity names for a "zero-shot" test set.

    python data/toyworld.py              # print a few paragraphs and tagged sentences
"""
import random

# ------------------------------------------------------------------------------------------------------------
# Vocabulary: attribute tables. Single-token English words (" baker", " rainy") are what SMLMT masks.

# profession -> (what they do, where, a tool they need)
JOBS = dict(
    baker=("bakes bread", "bakery", "oven"), doctor=("treats patients", "hospital", "stethoscope"),
    teacher=("teaches children", "school", "blackboard"), farmer=("grows wheat", "farm", "tractor"),
    fisherman=("catches fish", "harbor", "net"), pilot=("flies planes", "airport", "map"),
    nurse=("cares for patients", "clinic", "thermometer"), lawyer=("defends clients", "court", "contract"),
    painter=("paints portraits", "studio", "brush"), tailor=("sews coats", "shop", "needle"),
    miner=("digs for copper", "mine", "lamp"), sailor=("sails ships", "port", "compass"),
    judge=("hears cases", "court", "hammer"), writer=("writes novels", "library", "pen"),
    singer=("sings songs", "theatre", "microphone"), chef=("cooks meals", "kitchen", "knife"),
    banker=("lends money", "bank", "ledger"), soldier=("guards the border", "fort", "rifle"),
    engineer=("builds bridges", "workshop", "drill"), gardener=("plants flowers", "garden", "spade"),
    butcher=("cuts meat", "market", "cleaver"), driver=("drives buses", "depot", "wheel"),
    priest=("leads prayers", "temple", "candle"), potter=("shapes clay", "kiln", "wheel"),
    clerk=("files records", "office", "stamp"), hunter=("tracks deer", "forest", "bow"),
    carpenter=("makes chairs", "workshop", "saw"), librarian=("lends books", "library", "catalogue"),
    dentist=("fixes teeth", "clinic", "mirror"), merchant=("sells spices", "market", "scale"),
)
HOBBIES = dict(chess="plays chess", tennis="plays tennis", football="plays football",
               gardening="grows roses", fishing="goes fishing", hiking="climbs hills",
               music="plays the guitar", dancing="goes dancing", poetry="writes poems",
               cooking="bakes cakes", swimming="swims in the lake", cycling="rides a bicycle",
               painting="paints landscapes", reading="reads old books", singing="sings in a choir",
               running="runs along the river", knitting="knits scarves", photography="takes photographs",
               sailing="sails a small boat", astronomy="watches the stars", archery="shoots arrows",
               pottery="makes bowls", riding="rides horses", climbing="climbs rocks")
PETS = "cat dog parrot rabbit horse goat turtle hamster owl pony duck lizard donkey canary ferret pig".split()
FOODS = ("soup bread rice apples cheese noodles pie fish beans honey porridge potatoes pears sausages "
         "dumplings carrots mushrooms plums cabbage lentils pancakes olives walnuts figs oranges chicken "
         "lamb cherries tomatoes salad").split()
COLORS = "red blue green yellow purple orange black white brown grey pink gold".split()
CLIMATES = "rainy sunny snowy windy foggy humid dry cold warm stormy".split()
LANDMARKS = ("castle bridge lighthouse cathedral tower market harbor palace fountain theatre museum stadium "
             "monastery windmill gardens observatory").split()
INDUSTRIES = ("fishing mining farming shipping textiles timber tourism banking printing brewing pottery salt "
              "glass silk wool wine tea paper steel cheese").split()
FESTIVALS = "lanterns flowers bread music kites boats masks candles apples horses".split()
MONTHS = "January February March April May June July August September October November December".split()
# organisation kind -> (noun, what it does, industry)
ORG_KINDS = {
    "Bank": ("bank", "lends money to farmers", "banking"),
    "Mining Company": ("company", "digs copper", "mining"),
    "Shipyard": ("shipyard", "builds ships", "shipping"),
    "Press": ("newspaper", "prints the daily news", "printing"),
    "Railways": ("railway", "runs trains", "transport"), "Foods": ("company", "sells tinned fish", "food"),
    "Brewery": ("brewery", "brews dark beer", "brewing"), "Mills": ("mill", "weaves wool", "textiles"),
    "Theatre": ("theatre", "stages old plays", "theatre"),
    "Orchestra": ("orchestra", "performs symphonies", "music"),
    "Hospital": ("hospital", "treats the sick", "health"),
    "University": ("university", "teaches students", "education"),
    "Football Club": ("club", "plays football", "sport"),
    "Museum": ("museum", "shows old paintings", "culture"), "Glassworks": ("factory", "blows glass", "glass"),
    "Trading House": ("company", "trades silk", "trade"),
}
RELATIONS = {"she": ("sister", "daughter"), "he": ("brother", "son")}

# Syllables for invented names: names are multi-token in GPT-2 BPE, so NER must use sub-word features.
_ON = "b d f g k l m n p r s t v z br dr kr st th sh tr gr h j w c fl pl".split()
_NU = "a e i o u ai ei ou ia y".split()
_CO = ["", "", "n", "r", "l", "s", "th", "m", "k", "nd", "rt", "x"]
_CITY_END = ["", "", "", "ford", "ville", "port", "burg", "haven", "mouth", "stead", "dale", "grad"]
_RIVER_END = ["", "", "a", "is", "en"]


def _name(rng, lo=2, hi=3):
    n = rng.randint(lo, hi)
    return "".join(rng.choice(_ON) + rng.choice(_NU) + rng.choice(_CO) for _ in range(n)).capitalize()


def _unique_names(rng, n, taken, make):
    out = []
    while len(out) < n:
        s = make(rng)
        if s not in taken and 3 <= len(s) <= 14:
            taken.add(s)
            out.append(s)
    return out


# ------------------------------------------------------------------------------------------------------------
# The world: people, places and organisations with consistent attributes and relations.

def build_world(seed=1337, n_people=600, n_cities=80, n_countries=12, n_orgs=150, exclude=()):
    """A world is a dict of lists of dicts. `exclude` is a set of names to avoid (the held-out NER world)."""
    rng, taken = random.Random(seed), set(exclude)
    countries = _unique_names(rng, n_countries, taken,
                              lambda r: _name(r, 2, 3) + r.choice(["", "", "ia", "land"]))
    rivers = _unique_names(rng, n_cities // 2, taken, lambda r: _name(r, 1, 2) + r.choice(_RIVER_END))
    cities, capitals = [], {}
    for name in _unique_names(rng, n_cities, taken, lambda r: _name(r, 1, 2) + r.choice(_CITY_END)):
        cities.append(dict(name=name, country=rng.choice(countries), river=rng.choice(rivers),
                           climate=rng.choice(CLIMATES), landmark=rng.choice(LANDMARKS),
                           industry=rng.choice(INDUSTRIES), food=rng.choice(FOODS),
                           festival=rng.choice(FESTIVALS), month=rng.choice(MONTHS),
                           pop=rng.randrange(2, 900) * 1000, built=rng.randint(1100, 1900)))
        capitals.setdefault(cities[-1]["country"], name)  # the first city drawn in a country is its capital
    firsts = _unique_names(rng, n_people // 3, taken, lambda r: _name(r, 2, 2))
    lasts = _unique_names(rng, n_people // 2, taken, lambda r: _name(r, 2, 3))
    people, full_names = [], set()
    while len(people) < n_people:
        full = f"{rng.choice(firsts)} {rng.choice(lasts)}"
        if full in full_names:
            continue
        full_names.add(full)
        job = rng.choice(list(JOBS))
        people.append(dict(name=full, first=full.split()[0], pron=rng.choice(["she", "he"]), job=job,
                           city=rng.randrange(n_cities), born=rng.randint(1900, 2005),
                           hobby=rng.choice(list(HOBBIES)), pet=rng.choice(PETS), food=rng.choice(FOODS),
                           hated=rng.choice(FOODS), color=rng.choice(COLORS), month=rng.choice(MONTHS)))
    orgs = []
    for name in _unique_names(rng, n_orgs, taken, lambda r: _name(r, 2, 2)):
        kind, city = rng.choice(list(ORG_KINDS)), rng.randrange(n_cities)
        full = f"University of {cities[city]['name']}" if kind == "University" and rng.random() < 0.5 \
            else f"{name} {kind}"
        orgs.append(dict(name=full, kind=kind, city=city, founded=rng.randint(1800, 2010),
                         founder=rng.randrange(n_people), size=rng.randrange(20, 5000)))
    for i, p in enumerate(people):  # relations: employer, friend, sibling (indices into the lists above)
        p["org"] = rng.randrange(n_orgs)
        p["friend"] = rng.choice([j for j in range(n_people) if j != i][:50] + [rng.randrange(n_people)])
        p["sib"] = rng.randrange(n_people)
    return dict(people=people, cities=cities, orgs=orgs, countries=countries, capitals=capitals)


# ------------------------------------------------------------------------------------------------------------
# Sentence frames. "{x}" slots are filled from a dict; entity slots (see ENTITY_SLOTS) carry an NER type.
# Each frame is written once, in lower-level words; punctuation is a separate word (like UD tokenisation).

PERSON_FRAMES = """\
{name} is a {job} who lives in {city} .
{name} works as a {job} at {org} .
{Pron} {job_act} at the {job_place} every day .
Every morning , {first} {job_act} .
As a {job} , {first} spends most days at the {job_place} .
{first} is a {job} , so {pron} {job_act} .
The {job} {name} {job_act} in {city} .
Without a {tool} , {first} cannot work as a {job} .
{first} bought a new {tool} for the {job_place} .
{first} keeps a {tool} at the {job_place} .
{name} , a {job} from {city} , {job_act} .
Many people in {city} know {first} the {job} .
At {org} , {first} is known as a careful {job} .
{first} was born in {city} in {born} .
In {born} , {name} was born in {city} , {country} .
{name} grew up in {city} , a {climate} city in {country} .
{first} has lived in {country} for {n} years .
{first} lives near the {landmark} of {city} .
{Poss} favourite colour is {color} .
{first} likes to wear {color} clothes .
{first} painted the door of {poss} house {color} .
{first} keeps a {pet} at home .
{first} has a {color} {pet} .
Every evening , {first} feeds {poss} {pet} .
{first} walks {poss} {pet} along the {river} .
On weekends , {first} enjoys {hobby} .
{first} {hobby_act} on weekends .
{Pron} loves {hobby} more than anything .
When {first} is not at the {job_place} , {pron} {hobby_act} .
{first} and {friend_first} share a love of {hobby} .
For dinner , {first} usually eats {food} .
{first} cooks {food} for {poss} friends .
{Poss} favourite food is {food} , but {pron} hates {hated} .
{first} never eats {hated} .
{first} buys {food} at the market in {city} .
{name} is a close friend of {friend} .
{first} and {friend_first} often meet in {city} .
{friend} once said that {first} is the best {job} in {city} .
{first} writes letters to {friend} every {month} .
{name} joined {org} in {year} .
Since {year} , {first} has worked for {org} .
{first} earns a good living at {org} in {org_city} .
{first} moved from {city2} to {city} in {year} .
Last year , {first} travelled to {city2} with {friend_first} .
In {month} , {first} always visits {city2} .
{name} is {age} years old .
{first} is the {rel} of {sib} .
{sib} , the {rel} of {first} , is a {sib_job} .
{first} and {poss} {rel2} {sib_first} live in {city} .
{first} asked {friend_first} to help at the {job_place} .
{first} dreams of leaving the {job_place} to take up {hobby} .
{first} says that {city} is too {climate} in {month} .
{name} voted for a new {landmark} in {city} .
{first} reads the news from {press} every morning .
{first} once met {founder} , who founded {org} .
{first} saved money to buy a {pet} .
{Pron} is a {job} , like {poss} {rel2} {sib_first} .
{first} and {friend_first} went to the festival of {festival} in {city} .
{name} is the only {job} in {poss} street .
{first} is proud to be a {job} .
"""
ORG_FRAMES = """\
{org} is a {kind_noun} based in {city} .
{org} was founded in {founded} by {founder} .
{founder} founded {org} in {city} in {founded} .
{org} {org_act} .
{org} employs {size} people in {city} .
Many people in {city} work for {org} .
The offices of {org} are near the {landmark} in {city} .
{org} is one of the oldest institutions in {country} .
In {year} , {org} opened a new office in {city2} .
{emp} works at {org} as a {emp_job} .
{emp} , a {emp_job} , joined {org} in {year} .
The {kind_noun} {org} {org_act} in {city} .
{org} is known in {country} because it {org_act} .
{founder} , a {founder_job} , started {org} in {founded} .
After {founded} , {org} grew quickly in {city} .
{org} moved from {city2} to {city} in {year} .
{org} and {org2} are rivals in {city} .
{org} bought {org2} in {year} .
A famous {emp_job} named {emp} worked at {org} .
Every {month} , {org} gives money to the festival of {festival} .
{org} makes most of its money from {industry} .
The workers of {org} went on strike in {year} .
"""
CITY_FRAMES = """\
{city} is a {climate} city in {country} .
{city} lies on the {river} .
The {river} flows through {city} .
About {pop} people live in {city} .
{city} is famous for its {landmark} .
The {landmark} of {city} was built in {built} .
The main industry of {city} is {industry} .
In {city} , the weather is {climate} most of the year .
{city} is the capital of {country} .
The people of {city} like to eat {food} .
{org} has its headquarters in {city} .
{city} is {dist} kilometres from {city2} .
Every {month} , {city} holds a festival of {festival} .
Tourists visit {city} to see the {landmark} .
Most families in {city} work in {industry} .
{city} and {city2} are both in {country} .
The {river} often floods {city} in {month} .
{name} is the mayor of {city} .
A {climate} wind blows over {city} in {month} .
Boats carry {industry} goods from {city} down the {river} .
The old {landmark} in {city} is {color} .
Children in {city} learn about {festival} at school .
"""
PREFIXES = [""] * 12 + ["In {year} , ", "According to {name2} , ", "Some say that ", "It is well known that ",
            "People in {country} say that ", "Everyone knows that ", "As far as {first2} knows , "]
FRAMES = {kind: [f.split() for f in text.strip().splitlines()]
          for kind, text in (("person", PERSON_FRAMES), ("org", ORG_FRAMES), ("city", CITY_FRAMES))}

# slot -> NER type; every other slot is plain words (tag O).
ENTITY_SLOTS = {"name": "PER", "first": "PER", "friend": "PER", "friend_first": "PER", "sib": "PER",
                "sib_first": "PER", "founder": "PER", "emp": "PER", "name2": "PER", "first2": "PER",
                "city": "LOC", "city2": "LOC", "org_city": "LOC", "country": "LOC", "river": "LOC",
                "org": "ORG", "org2": "ORG", "press": "ORG"}


def _slots(world, rng, kind, i):
    """All slot values for a paragraph about entity i of `kind` (the same values for every sentence in it)."""
    P, C, O = world["people"], world["cities"], world["orgs"]
    other_p, other_c, other_o = rng.choice(P), rng.choice(C), rng.choice(O)
    if kind == "person":
        p, city, org = P[i], C[P[i]["city"]], O[P[i]["org"]]
    elif kind == "org":
        p, city, org = P[O[i]["founder"]], C[O[i]["city"]], O[i]
    else:  # {name}: the city's mayor, someone who lives there
        city = C[i]
        p = rng.choice([q for q in P[:200] if q["city"] == i] or P)
        org = rng.choice([o for o in O if o["city"] == i] or O)
    sib, friend, emp, founder = P[p["sib"]], P[p["friend"]], rng.choice(P), P[org["founder"]]
    press = rng.choice([o for o in O if o["kind"] == "Press"] or O)
    poss = "her" if p["pron"] == "she" else "his"
    s = {k: str(p[k]) for k in "name first pron job hobby pet food hated color month born".split()}
    s |= {k: str(city[k]) for k in "country river climate landmark industry festival built".split()}
    s["job_act"], s["job_place"], s["tool"] = JOBS[p["job"]]
    s["kind_noun"], s["org_act"] = ORG_KINDS[org["kind"]][:2]
    return s | dict(
        Pron=p["pron"].capitalize(), poss=poss, Poss=poss.capitalize(), hobby_act=HOBBIES[p["hobby"]],
        age=str(2024 - p["born"]), city=city["name"], pop=f"{city['pop']:,}", city2=other_c["name"],
        org=org["name"], org_city=C[org["city"]]["name"], org2=other_o["name"], size=f"{org['size']:,}",
        founded=str(org["founded"]), founder=founder["name"], founder_job=founder["job"], press=press["name"],
        emp=emp["name"], emp_job=emp["job"], friend=friend["name"], friend_first=friend["first"],
        sib=sib["name"], sib_first=sib["first"], sib_job=sib["job"], rel=RELATIONS[p["pron"]][0],
        rel2=RELATIONS[sib["pron"]][0], name2=other_p["name"], first2=other_p["first"],
        year=str(rng.randint(1950, 2023)), n=str(rng.randint(2, 40)), dist=str(rng.randint(5, 600)))


def _render(frame, slots, rng, use_prefix=True):
    """Fill one frame -> list of (word, tag). Entity words get B-/I- tags; everything else is O."""
    words = []
    prefix = rng.choice(PREFIXES).split() if use_prefix else []
    for tok in prefix + frame:
        if tok.startswith("{") and tok.endswith("}"):
            typ = ENTITY_SLOTS.get(tok[1:-1])
            words += [(w, "O" if typ is None else ("B-" if k == 0 else "I-") + typ)
                      for k, w in enumerate(slots[tok[1:-1]].split())]
        else:
            words.append((tok, "O"))
    k = len(prefix)  # "Some say that the baker ...": the frame's first word, if each prefix slot is one word
    if prefix and words[k][1] == "O" and words[k][0] != "I" and words[k][0] not in MONTHS:
        words[k] = (words[k][0][0].lower() + words[k][0][1:], "O")
    for j in range(len(words) - 1):  # a / an agreement
        if words[j][0] in ("a", "A") and words[j + 1][0][0].lower() in "aeiou":
            words[j] = (words[j][0] + "n", words[j][1])
    return words


def paragraph(world, rng):
    """A short paragraph (3-6 sentences) about one entity: list of sentences, each a list of (word, tag)."""
    kind, pool = rng.choices([("person", "people"), ("org", "orgs"), ("city", "cities")], [6, 2, 2])[0]
    slots = _slots(world, rng, kind, rng.randrange(len(world[pool])))
    frames = [f for f in FRAMES[kind] if not (kind == "city" and "capital" in f
                                               and world["capitals"][slots["country"]] != slots["city"])]
    return [_render(f, slots, rng, use_prefix=k > 0)
            for k, f in enumerate(rng.sample(frames, rng.randint(3, 6)))]


def documents(seed=1337, n_docs=1000):
    """Yield `n_docs` paragraphs of plain text (one document each)."""
    world, rng = build_world(seed), random.Random(seed + 1)
    for _ in range(n_docs):
        text = " ".join(w for sent in paragraph(world, rng) for w, _ in sent)
        yield text.replace(" ,", ",").replace(" .", ".")  # fluent text: no space before punctuation


def ner_sentences(seed=1337, n=1000, heldout=False):
    """`n` tagged sentences [(words, tags)]. heldout=True draws them from a second world whose names (people,
    places, organisations) never occur in the training world: the toy "zero-shot" test set."""
    world = build_world(seed)
    if heldout:
        taken = {e["name"] for e in world["people"] + world["cities"]} | set(world["countries"])
        taken |= {w for e in world["people"] + world["orgs"] for w in e["name"].split()}
        world = build_world(seed + 7919, exclude=taken)
    rng = random.Random(seed + (2 if heldout else 3))
    out = []
    while len(out) < n:
        out += [([w for w, _ in sent], [t for _, t in sent]) for sent in paragraph(world, rng)]
    return out[:n]


if __name__ == "__main__":
    for doc in documents(n_docs=3):
        print(doc, "\n")
    for ws, ts in ner_sentences(n=3):
        print(" ".join(f"{w}/{t}" for w, t in zip(ws, ts)))
