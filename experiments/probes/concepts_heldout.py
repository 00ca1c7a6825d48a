"""Probe for issue #41 part 3: does naming a colour or shape in ``steering.concepts`` make the scenes
model give it, on a held-out test split (seed 33, then 35, 36, 37 for conditioned rows; no calibration reads them)?

For each of the 15 values, ``{"steering": {"concepts": [{"text": value}]}}`` is resolved exactly as
the server resolves a chat request (``api.steering_request.resolve_steering`` over the search index
of the model's shipped catalogs, the effects file included, so the feature, value and scope are the
server's), and each question is then asked through the steering engine with that steering (greedy,
one conversation per question, as ``eval.fix.ask`` asks):

* rate: of the value's type's questions (colour or shape) whose unsteered answer is not the value,
  the share now answered with it;
* kept: of the other type's questions answered right unsteered, the share still right.

Also reported per value: the feature, value, scope and condition (``when``) the server chose, the
share of each kind's prompts its condition held on (the edit acted there), search's top hit for the
value and whether it is the feature with the best measured effect in the catalog (by
``effects.rank.rank_key``). Questions are the split's first ``--scenes`` scenes', in order; each
value takes its first ``--per-value`` eligible questions of each kind.

    lmm-steer scenes generate --out scenes-33 --n 100 --seed 33
    python experiments/probes/concepts_heldout.py scenes-33 --json concepts-heldout.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from lmm_steer.api.schemas import ChatCompletionRequest
from lmm_steer.api.steering_request import resolve_steering
from lmm_steer.concepts.semantic import index_or_none
from lmm_steer.effects.measure import OTHER, WORD_TYPE
from lmm_steer.effects.rank import measured_word, rank_key
from lmm_steer.engine import EngineConfig
from lmm_steer.eval.fix import ask
from lmm_steer.eval.tested import VALUE_KEYS
from lmm_steer.fit.codes import request
from lmm_steer.scenes.commands import scene_engine
from lmm_steer.scenes.evaluate import normalise, questions
from sae_weights import FeatureCatalog
from sae_weights.default import sources_for

MODEL = "builtin:scenes-llava-next"


def best_measured(catalog: FeatureCatalog) -> dict[str, tuple[int, tuple]]:
    """Per word, the feature whose measured effect steers to it best (``effects.rank.rank_key``;
    ties: the lower id)."""
    best: dict[str, tuple[int, tuple]] = {}
    for fid in catalog.ids():
        extras = catalog.get(fid).extras
        word = measured_word(extras)
        if word is not None:
            key = rank_key(extras["effect"], extras.get("steer"))  # a conditioned row by its conditioned point
            if word not in best or key > best[word][1]:
                best[word] = (fid, key)
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", help="the held-out split (scenes generate --seed 33)")
    p.add_argument("--scenes", type=int, default=14, help="the split's first N scenes")
    p.add_argument("--per-value", type=int, default=20, help="questions of each kind per value")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--effects", help="an effects file to merge instead of the shipped one (default: the model's shipped catalogs)")
    p.add_argument("--no-condition", action="store_true",
                   help="name each concept with condition false (its edit acts on every prompt), as a baseline")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    data = Path(args.data)
    paths = list(sources_for(MODEL).catalogs)
    if args.effects:
        paths = [p for p in paths if not Path(p).name.startswith("effects")] + [args.effects]
    catalog = FeatureCatalog.load_all(paths)
    index = index_or_none(catalog, paths)
    service = SimpleNamespace(concepts=index)
    engine = scene_engine(MODEL, None, None, None, EngineConfig(max_batch=16))
    items = questions(data, args.scenes, ("colour", "shape"))
    plain = [normalise(a) for a in ask(engine, data, items, [None] * len(items), max_tokens=args.max_tokens)]
    print(f"unsteered: {len(items)} questions, {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    best = best_measured(catalog)
    rows = []
    for key in VALUE_KEYS:
        word = key.split(":", 1)[1]
        kind = WORD_TYPE[word]
        body = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": word}],
                                                     "steering": {"concepts": [{"text": word,
                                                                                 "condition": not args.no_condition}]}})
        spec = resolve_steering(body, service).spec
        same = [i for i, q in enumerate(items) if q["type"] == kind and plain[i] != word][:args.per_value]
        other = [i for i, q in enumerate(items)
                 if q["type"] == OTHER[kind] and plain[i] == normalise(q["answer"])][:args.per_value]
        asked = same + other
        results = engine.generate([request(data, items[i], spec, args.max_tokens) for i in asked])
        said = [normalise(r.text) for r in results]
        acted = [not r.idle_features for r in results]
        turned = sum(s == word for s in said[:len(same)])
        kept = sum(s == normalise(items[i]["answer"]) for i, s in zip(other, said[len(same):], strict=True))
        top = index.search(word, 1)[0][0].feature
        row = {"value": key, "feature": [e.feature for e in spec.edits], "clamp": [e.value for e in spec.edits],
               "when": [e.when for e in spec.edits], "acted": round(sum(acted[:len(same)]) / len(same), 4)
               if same else None, "acted_other": round(sum(acted[len(same):]) / len(other), 4) if other else None,
               "scope": spec.effective_scope, "rate": round(turned / len(same), 4) if same else None, "n": len(same),
               "kept": round(kept / len(other), 4) if other else None, "n_other": len(other),
               "top_hit": top, "best_measured": best.get(word, (None,))[0],
               "top_is_best": top == best.get(word, (None,))[0],
               "said": dict(sorted({s: said[:len(same)].count(s) for s in set(said[:len(same)])}.items(),
                                   key=lambda kv: -kv[1]))}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    met = [r for r in rows if r["rate"] is not None and r["rate"] >= 0.8 and (r["kept"] or 0) >= 0.9]
    summary = {"values": len(rows), "met": len(met), "rate_mean": round(sum(r["rate"] for r in rows) / len(rows), 4),
               "kept_mean": round(sum(r["kept"] for r in rows) / len(rows), 4),
               "top_is_best": sum(r["top_is_best"] for r in rows), "questions": len(items),
               "seconds": round(time.perf_counter() - t0, 1), "threads": torch.get_num_threads(), "catalogs": paths}
    print("| value | feature | clamp | scope | when | acted: own / other type | rate (n) | other type kept (n) "
          "| top hit = best measured |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['value'].split(':')[1]} | {', '.join(map(str, r['feature']))} | "
              f"{', '.join(f'{v:g}' for v in r['clamp'])} | {r['scope']} | "
              f"{', '.join('-' if w is None else str(w) for w in r['when'])} | {r['acted']:.2f} / {r['acted_other']:.2f} | "
              f"{r['rate']:.2f} ({r['n']}) | {r['kept']:.2f} ({r['n_other']}) | {'yes' if r['top_is_best'] else 'no'} |")
    print(json.dumps(summary))
    if args.json:
        Path(args.json).write_text(json.dumps({"command": "python experiments/probes/concepts_heldout.py "
                                               + " ".join(sys.argv[1:]), "summary": summary, "rows": rows}, indent=1)
                                   + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
