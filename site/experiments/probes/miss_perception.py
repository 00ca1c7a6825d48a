"""Does the model see the objects it says are not there? For each existence error ("Is there a
yellow hexagon?" answered "no" though there is one) and each undercount ("How many squares?"
answered "one" of two) in an `eval fix` result, ask the model about the missed objects one at a
time, as the scenes' own questions do: the colour of the asked shape where that shape is the only
one of its kind in the scene, the shape of the asked colour's object where that colour is the only
one, and "Is there a <colour> <shape>?" for each counted object. If it answers those right, its
error is in the question that combines them (binding or counting), not in what it sees on the
image's tokens, which is all an edit at the SAE's block can touch there.

    python experiments/probes/miss_perception.py SPLIT FIX_JSON
"""
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

from lmm_steer.eval.fix import _words, ask
from lmm_steer.scenes.commands import scene_engine
from lmm_steer.scenes.evaluate import normalise

data, fix = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
coco = json.loads((data / "annotations.json").read_text())
cats = {c["id"]: c["name"] for c in coco["categories"]}
files = {im["id"]: im["file_name"] for im in coco["images"]}
objects = defaultdict(list)
for a in coco["annotations"]:
    objects[files[a["image_id"]]].append((a["attributes"]["colour"], cats[a["category_id"]]))
TAIL = " Answer in a word or a short phrase."

probes = []  # (kind of error, case index, probe kind, question, answer)
for i, case in enumerate(fix["cases"]):
    said, truth = normalise(case["got"]), normalise(case["answer"])
    named = dict(k.split(":", 1)[::-1] for k in _words(case["question"]))  # value -> attribute
    here = objects[case["image"]]
    if case["type"] == "exist" and truth == "yes" and said == "no":
        colour = next(v for v, k in named.items() if k == "colour")
        shape = next(v for v, k in named.items() if k == "shape")
        if sum(s == shape for _, s in here) == 1:
            probes.append(("exist", i, "colour of the shape", f"What colour is the {shape}?{TAIL}", colour))
        if sum(c == colour for c, _ in here) == 1:
            probes.append(("exist", i, "shape of the colour", f"What shape is the {colour} object?{TAIL}", shape))
    elif case["type"] == "count" and said.isalpha() and truth != said:
        counted = [(c, s) for c, s in here if all(named[v] == "colour" and c == v or named[v] == "shape" and s == v
                                                  for v in named)]
        combos = Counter(counted)
        for c, s in sorted(set(counted)):
            if combos[c, s] == 1:
                probes.append(("count", i, "each counted object", f"Is there a {c} {s}?{TAIL}", "yes"))

engine = scene_engine("builtin:scenes-llava-next", None, None, None)
items = [{"image": fix["cases"][i]["image"], "question": q, "answer": a, "type": "probe"} for _, i, _, q, a in probes]
answers = ask(engine, data, items, [None] * len(items), max_tokens=4)
table = defaultdict(lambda: [0, 0])
per_case = defaultdict(list)
for (kind, i, probe, _, want), got in zip(probes, answers, strict=True):
    right = normalise(got) == want
    table[kind, probe][0] += right
    table[kind, probe][1] += 1
    per_case[kind, i].append(right)
print("| errors | probe | answered right |\n|---|---|---|")
for (kind, probe), (right, n) in sorted(table.items()):
    print(f"| {kind} | {probe} | {right} of {n} |")
for kind in ("exist", "count"):
    cases = [v for (k, _), v in per_case.items() if k == kind]
    print(f"{kind}: {len(cases)} errors probed; every probe right on {sum(all(v) for v in cases)}, "
          f"none right on {sum(not any(v) for v in cases)}")
