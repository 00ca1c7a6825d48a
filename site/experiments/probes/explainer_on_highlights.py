"""How an explainer endpoint answers `sae highlights` examples of a split it was not trained on:
accuracy by kind (an object, a group, the background, unable), and how often it declines.

    python experiments/probes/explainer_on_highlights.py SPLIT URL MODEL [LIMIT]
"""

import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

from PIL import Image

from lmm_steer.explain.explainer import Explainer, ExplainerConfig, clean


def main(split: str, url: str, model: str, limit: int = 200) -> None:
    rows = [json.loads(line) for line in (Path(split) / "highlights.jsonl").read_text().splitlines()][:limit]
    explainer = Explainer(ExplainerConfig(url, model))
    right, total, said = defaultdict(int), Counter(), Counter()
    for row in rows:
        with Image.open(Path(split) / row["image"]) as im:
            # per-image mode on one image: the question `sae explain --mode per-image` asks, its answer cleaned
            answer = explainer.explain_images([im.convert("RGB")], per_image=True) or "unable"
        expected = clean(row["answer"]) or "unable"
        kind = row["kind"] if expected != "unable" else "minimal (unable)"
        total[kind] += 1
        right[kind] += answer.lower() == expected.lower()
        said["unable" if answer == "unable" else "background" if "background" in answer.lower() else "object(s)"] += 1
    for kind in sorted(total):
        print(f"{kind:18s} {right[kind]:4d} / {total[kind]:4d} = {right[kind] / total[kind]:.2f}")
    print(f"{'all':18s} {sum(right.values()):4d} / {sum(total.values()):4d} = {sum(right.values()) / sum(total.values()):.2f}")
    print("answers:", dict(said))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], *(int(a) for a in sys.argv[4:5]))
