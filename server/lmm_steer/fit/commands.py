"""``lmm-steer preset fit``: fit a steering preset on labelled examples (see the package docstring)."""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

from ..scenes.commands import add_scene_engine_arguments
from .search import CONDITIONS

FIT_TYPES = ("colour", "shape", "exist")
FIT_TABLE = 256  # edits a candidate may carry: the spotlight's are one per named value and asked feature


def add_fit_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="labelled examples to fit on: a `scenes generate` directory or a "
                                                 "LLaVA JSONL file (image, conversations, type, answer)")
    p.add_argument("--select", required=True, help="labelled examples to choose among candidates on (another split)")
    p.add_argument("--out", required=True, help="the preset file to write (JSON, servable with serve --presets)")
    p.add_argument("--name", default="fitted", help="the preset's name, served as <model>:<name>")
    p.add_argument("--types", default=",".join(FIT_TYPES), help="question types fitted and judged")
    p.add_argument("--limit", type=int, help="scenes (images) of --data at most")
    p.add_argument("--select-limit", type=int, help="scenes (images) of --select at most")
    p.add_argument("--probe-c", type=float, help="the probes' inverse L1 penalty (smaller: fewer features); default: "
                                                "the smallest of a path that keeps --top features")
    p.add_argument("--top", type=int, default=16, help="features per side kept from each probe")
    p.add_argument("--k", default="16", help="features per side tried (comma-separated)")
    p.add_argument("--modes", default="scale,add", help="scale: x strength where a feature fires (/ for suppressed); "
                                                        "add: strength x its typical activation everywhere in scope")
    p.add_argument("--strengths", default="2", help="strengths tried (comma-separated)")
    p.add_argument("--scopes", default="all", help="scopes tried (comma-separated: image, all, prompt, generated); "
                                                      "default all (on the scenes model, points on the image alone changed few answers)")
    p.add_argument("--conditions", default="none,type",
                   help="conditions tried (comma-separated): none (every prompt), type (a confusion's candidate acts "
                        "only on prompts of its question type, where a feature fires on those alone)")
    p.add_argument("--value-strengths", default="none",
                   help="factors tried for the values family: per question type, each value's best-measured feature "
                        "(the catalog's `sae effects` rows) scaled where it fires, on that type's prompts (comma-"
                        "separated; default none: no such family, as on the scenes model it fixed no more than it broke)")
    p.add_argument("--spotlight-strengths", default="2",
                   help="factors tried for the spotlight family: on a colour or shape question, the asked attribute's "
                        "localised features scaled where the named object's feature fires, each named value's edits "
                        "conditioned on its word in the question's text (comma-separated; none: no such family; "
                        "needs scenes with masks)")
    p.add_argument("--spotlight-images", type=int, default=100,
                   help="scenes of --data (the first) each value's localised feature is chosen on, for the spotlight")
    p.add_argument("--condition-images", type=int, default=40,
                   help="images of --data whose prompts the conditions by question type are read on")
    p.add_argument("--diffmean-strengths", default="1,2,4,8",
                   help="multiples of the difference-of-means direction tried for that control (comma-separated)")
    p.add_argument("--screen-images", type=int, default=40,
                   help="images of --select every point is screened on before the best are asked on all of it")
    p.add_argument("--confirm", type=int, default=3,
                   help="families whose best screened point is asked on all of --select (default 3)")
    p.add_argument("--fit-cache", metavar="PATH", help="keep the model's answers and SAE codes on --data in this "
                                                      "safetensors file and read them from it when they were computed "
                                                      "from the same model, SAE and questions (another grid then "
                                                      "skips that pass)")
    p.add_argument("--json", metavar="PATH", help="every trial on the selection split, the probes, the timings")
    add_scene_engine_arguments(p)


def command_line(args) -> str:
    """The command as it could be typed again (from the parsed options, whoever called it)."""
    words = ["lmm-steer", "preset", "fit"]
    for key, value in vars(args).items():
        if key not in ("func", "command", "preset_command") and value is not None:
            words += [f"--{key.replace('_', '-')}", str(value)]
    return shlex.join(words)


def fit_command(args) -> int:
    from ..engine import EngineConfig
    from ..eval.preset import tally
    from ..scenes.commands import scene_engine
    from ..scenes.evaluate import normalise
    from .answers import SplitAnswers
    from .cache import cache_key, load_pass, save_pass
    from .candidates import build, confusions, from_values, mean_active
    from .codes import answers_and_codes, image_answers_and_codes
    from .diffmean import choose_strength, direction
    from .examples import load_examples
    from .probe import ProbeUnavailable
    from .search import choose, screening_set

    def fail(message: str) -> int:
        print(f"lmm-steer: error: {message}", file=sys.stderr)
        return 2

    types = tuple(t for t in args.types.split(",") if t)
    try:
        grid = {"k": tuple(int(v) for v in args.k.split(",") if v),
                "mode": tuple(v for v in args.modes.split(",") if v),
                "strength": tuple(float(v) for v in args.strengths.split(",") if v),
                "scope": tuple(v for v in args.scopes.split(",") if v),
                "condition": tuple(v for v in args.conditions.split(",") if v)}
        diffmean_strengths = tuple(float(v) for v in args.diffmean_strengths.split(",") if v)
        value_strengths, spotlight_strengths = (() if text.strip().lower() == "none" else tuple(
            float(v) for v in text.split(",") if v) for text in (args.value_strengths, args.spotlight_strengths))
    except ValueError:
        return fail("--k, --strengths, --value-strengths, --spotlight-strengths and --diffmean-strengths take "
                    "comma-separated numbers")
    for flag, factors in (("value", value_strengths), ("spotlight", spotlight_strengths)):
        if any(v <= 0 for v in factors):
            return fail(f"--{flag}-strengths: {getattr(args, f'{flag}_strengths')!r}: every factor must be positive")
    if not diffmean_strengths:
        return fail("--diffmean-strengths: give at least one")
    if min(args.screen_images, args.confirm, args.spotlight_images) < 1:
        return fail("--screen-images, --confirm and --spotlight-images: at least 1")
    if set(grid["condition"]) - set(CONDITIONS) or args.condition_images < 1:
        return fail(f"--conditions: {args.conditions!r}: choose from {', '.join(CONDITIONS)}; --condition-images: "
                    "at least 1")
    if set(grid["mode"]) - {"scale", "add"} or set(grid["scope"]) - {"image", "all", "prompt", "generated"} \
            or not all(grid.values()) or min(grid["k"]) < 1 or min(grid["strength"]) <= 0:
        return fail("--k, --modes, --strengths, --scopes: see --help for what each takes")
    grid["value_strength"], grid["spotlight_strength"] = value_strengths, spotlight_strengths
    if not types or set(types) - set(FIT_TYPES + ("count",)):
        return fail(f"--types: {args.types!r}: choose from {', '.join(FIT_TYPES + ('count',))}")
    if Path(args.data).resolve() == Path(args.select).resolve():
        return fail("--data and --select are the same: fit on one split, choose on another")
    for flag in ("data", "select"):
        if not Path(getattr(args, flag)).exists():
            return fail(f"--{flag}: {getattr(args, flag)} does not exist")
    started = time.monotonic()
    root, items = load_examples(args.data, args.limit, types)
    select_root, select_items = load_examples(args.select, args.select_limit, types)
    if not items or not select_items:
        return fail("--data or --select holds no questions of the chosen types")
    engine = scene_engine(args.model, args.weights, args.sae, args.hookpoint, EngineConfig(max_batch=16, max_seq_len=512,
                                                                                      max_clamps=FIT_TABLE))

    def say(text: str) -> None:
        print(f"[{time.monotonic() - started:7.1f} s] {text}", file=sys.stderr, flush=True)

    key = cache_key(args.model, args.weights, args.sae, args.hookpoint, items)
    cached = load_pass(Path(args.fit_cache), key) if args.fit_cache else None
    if cached is not None:
        answers, codes = cached
        say(f"fit split: answers and codes read from {args.fit_cache}")
    else:
        fit_answers = SplitAnswers(engine, root)
        if fit_answers.fast is not None:
            answers, codes = image_answers_and_codes(fit_answers.fast, root, items)
        else:
            answers, codes = answers_and_codes(engine, root, items)
        if args.fit_cache:
            save_pass(Path(args.fit_cache), key, answers, codes)
    right = sum(normalise(a) == normalise(q["answer"]) for q, a in zip(items, answers, strict=True))
    say(f"fit split: {len(items)} questions, {right} answered right; SAE codes pooled over image and question")
    try:
        candidates = build(codes, items, answers, c=args.probe_c, top=args.top)
    except ProbeUnavailable as e:
        return fail(str(e))
    if value_strengths:
        from sae_weights import FeatureCatalog
        from sae_weights.default import sources_for

        catalog = FeatureCatalog.load_all(sources_for(args.model, args.sae, args.hookpoint).catalogs)
        candidates += from_values(catalog, types)  # the catalogs as `serve` merges them, effects included
    say("candidates: " + ", ".join(f"{c.family} ({len(c.up)} up, {len(c.down)} down)" for c in candidates))

    conditions = {}
    fast = SplitAnswers(engine, root).fast
    if "type" in grid["condition"] and fast is None:
        return fail(f"--conditions type: conditions are read block by block, on LLaVA-family models only; "
                    f"give --conditions none for {args.model}")
    if fast is not None and ("type" in grid["condition"] or spotlight_strengths):
        from ..effects.conditions import by_type, prompt_and_text_peaks

        # one pass over the sample's prompts serves both: the type conditions read on the whole
        # prompt, the spotlight's on the text
        sample = [items[i] for i in screening_set(items, args.condition_images)]
        peaks, text_peaks = prompt_and_text_peaks(fast, root, sample)
    if "type" in grid["condition"]:
        conditions = by_type(sample, peaks)
        say("conditions: " + ", ".join(f"{k} {c.feature} (fires on {c.recall:.0%} of its prompts, "
                                        f"{c.leak:.1%} of the others')" for k, c in conditions.items()))
    if spotlight_strengths and fast is not None:
        from . import spotlight

        lit = spotlight.candidate(fast, root, sample, text_peaks, args.spotlight_images)
        if lit is None:
            say("spotlight: no family (the fit split has no masks, or no named value has a condition on its text)")
        else:
            candidates.append(lit)
            say(f"spotlight: {len(lit.why['slots'])} named values with a condition on the question's text")

    def progress(t) -> None:
        say(f"{t.family} k={t.k} {t.mode} x{t.strength:g} {t.scope} when={t.when}: fixed {t.result['all']['fixed']}, "
            f"broken {t.result['all']['broken']} (screened)")

    select_answers = SplitAnswers(engine, select_root)
    chosen = choose(select_answers, select_items, candidates, mean_active(codes), grid=grid,
                    screen_images=args.screen_images, confirm=args.confirm, progress=progress,
                    conditions={k: c.feature for k, c in conditions.items() if c.usable})
    say(f"chosen: {chosen['chosen'].row() if chosen['chosen'] else None}")
    vector = direction(codes["residual"], [normalise(a) == normalise(q["answer"]) for q, a in zip(items, answers, strict=True)])
    control = choose_strength(select_answers, select_items, chosen["base"], vector, strengths=diffmean_strengths,
                              screen_images=args.screen_images, progress=progress)
    say(f"difference of means: x{control['strength']:g}, {control['selection']}")
    trial = chosen["chosen"]
    record = {
        "command": command_line(args),
        "date": datetime.date.today().isoformat(), "model": args.model, "data": str(args.data),
        "select": str(args.select), "types": list(types), "fit_questions": len(items), "fit_right": right,
        "select_questions": len(select_items), "minutes": round((time.monotonic() - started) / 60, 1),
        "fit_errors": [{"type": t, "truth": truth, "said": said, "n": n}
                       for t, truth, said, n in confusions(items, answers, minimum=1)[:12]],
        "select_base": {g: round(r["accuracy_before"], 4)
                        for g, r in tally(select_items, chosen["base"], chosen["base"]).items()},
        "candidates": [{"family": c.family, **c.why} for c in candidates],
        "conditions": {k: {**c.record(), "usable": c.usable} for k, c in conditions.items()},
        "steps": chosen["steps"],
        "diffmean": {**control, "block": engine.hookpoint, "norm": round(float(vector.norm()), 4),
                     "vector": [round(float(v), 5) for v in vector]},
    }
    if args.json:
        Path(args.json).write_text(json.dumps({**record, "screen_questions": chosen["screen_questions"],
                                               "screened": chosen["screened"], "trials": chosen["trials"]}, indent=1))
    if trial is None:
        why = ("no candidate fixed more than it broke within the per-type bound" if candidates else
               "the model's answers on --data are all right or all wrong: no probe can tell them apart")
        print(json.dumps({"chosen": None, "why": why, "screened": len(chosen["screened"])}))
        return 1
    best = trial.result["all"]
    condition = f", on prompts where feature {trial.when} fires" if trial.when is not None else ""
    description = (f"Fitted by `preset fit` on {len(items)} labelled {'/'.join(types)} questions of "
                   f"{Path(args.data).name}: {trial.family}, {len(trial.spec.edits)} edits ({trial.mode}, x"
                   f"{trial.strength:g}, scope {trial.scope}{condition}); on {len(select_items)} questions of "
                   f"{Path(args.select).name} it fixed {best['fixed']} and broke {best['broken']}.")
    steering = {"features": [e.record() for e in trial.spec.edits], "scope": trial.scope}
    preset = {"name": args.name, "description": description[:500], "steering": steering,
              "fit": {**record, "chosen": trial.row()}}
    Path(args.out).write_text(json.dumps(preset, indent=1) + "\n")
    print(json.dumps({"written": args.out, "chosen": trial.row(), "minutes": record["minutes"]}))
    return 0
