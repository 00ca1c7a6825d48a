"""``lmm-steer-client``: chat, feature search and inspect heatmaps from a shell."""

from __future__ import annotations

import argparse
import json
import sys

from .client import Client
from .errors import LmmSteerError
from .steering import Steering


def _clamp(text: str) -> tuple[int, float, str, int | None, int | None]:
    """``ID=VALUE[:MODE][@WHERE]`` or ``ID=VALUE:transfer:SOURCE[@WHERE]`` -> (id, value, mode, source, where)."""
    head, at, where = text.partition("@")
    fid, sep, rest = head.partition("=")
    value, _, mode = rest.partition(":")
    mode, _, source = mode.partition(":")
    try:
        if not sep or bool(source) != (mode == "transfer") or (at and not where):
            raise ValueError
        return int(fid), float(value), mode or "clamp", int(source) if source else None, int(where) if at else None
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad clamp {text!r}: expected ID=VALUE[:MODE][@WHERE] or "
                                         "ID=VALUE:transfer:SOURCE[@WHERE]") from None


def _concept(text: str) -> tuple[str, float]:
    """``TEXT[=STRENGTH]``; a concept may itself hold '=', so only a number after the last one
    counts as the strength."""
    head, sep, tail = text.rpartition("=")
    if sep:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return text, 1.0


NEVER_FIRED_EXIT = 3  # inspect: the feature never fired on the image; 1 is an error, 2 a usage error (argparse)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lmm-steer-client",
        description="Talk to an lmm-steer server from a shell: steered chat, the served model and presets, "
                    "generated scenes, feature search, and inspect heatmaps.")
    p.add_argument("--base-url", help="the server's URL (default: $LMM_STEER_BASE_URL, else http://127.0.0.1:8000)")
    p.add_argument("--api-key", help="bearer token for a server started with API keys (default: $LMM_STEER_API_KEY)")
    p.add_argument("--no-retry", action="store_true",
                   help="fail at the first 429, 502, 503 or 504 or dropped connection instead of retrying it "
                        "(by default each is retried up to 3 times, after the server's Retry-After)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", help="what to do")

    def command(parent, name: str, summary: str) -> argparse.ArgumentParser:
        # help= is the line in the parent's command list, description= heads the command's own --help
        return parent.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".")

    chat = command(sub, "chat", "ask the model a question, steered by clamps, concepts or a preset")
    chat.add_argument("question", help="the user message")
    chat.add_argument("--image", action="append", default=[], help="an image file to send with the question "
                      "(repeat for several; a multimodal server)")
    chat.add_argument("--clamp", action="append", default=[], type=_clamp, metavar="ID=VALUE[:MODE][@WHERE]",
                      help="edit one feature: MODE is clamp (default), add or scale, or transfer:SOURCE; "
                      "@WHERE gates the edit on feature WHERE firing (repeat for several)")
    chat.add_argument("--concept", action="append", default=[], type=_concept, metavar="TEXT[=STRENGTH]",
                      help="steer toward a concept named in words (the server picks features and values)")
    chat.add_argument("--scope", choices=("all", "prompt", "generated", "image"),
                      help="where the edits act (default: the server's: all positions, or for concepts the scope their "
                      "values were measured in); image: the image's tokens only")
    chat.add_argument("--preset", help="a steering preset the server loaded (`models` lists them); --clamp and "
                      "--concept apply on top")
    chat.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                      help="print the answer as it is generated (default) or all at once")
    chat.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate (default: 128)")
    chat.add_argument("--temperature", type=float, default=0.0,
                      help="sampling temperature (default: 0, greedy, so a steered answer is reproducible)")
    command(sub, "models", "the served model and its steering presets, one JSON line each")
    scene = command(sub, "scene", "get a synthetic scene from the server's generator: write its PNG, print its "
                                  "caption (--json: caption, objects, and questions with their answers)")
    scene.add_argument("--seed", type=int, help="generator seed (default: a random one, printed with --json)")
    scene.add_argument("--index", type=int, default=0, help="scene number within the seed (default: 0)")
    scene.add_argument("--out", required=True, help="where to write the scene's PNG")
    scene.add_argument("--json", action="store_true", help="print the whole scene as JSON instead of its caption")
    features = command(sub, "features", "look up the SAE's features").add_subparsers(
        dest="features_command", required=True, metavar="SUBCOMMAND", help="the lookup to make")
    search = command(features, "search", "features whose explanation or contexts match a text, one JSON line each")
    search.add_argument("text", help="words or a concept to search for, e.g. 'music'")
    search.add_argument("--limit", type=int, default=10, help="most features to list (default: 10)")
    inspect = command(sub, "inspect", "draw one feature's activations over an image as a heatmap PNG")
    inspect.add_argument("--image", required=True, help="the image file to inspect")
    inspect.add_argument("--feature", type=int, required=True, help="the SAE feature id to draw")
    inspect.add_argument("--prompt", default="Describe the image.",
                         help="the text sent with the image (default: 'Describe the image.')")
    inspect.add_argument("--out", required=True,
                         help="where to write the heatmap PNG; if the feature never fired on the image, the "
                         f"plain image is written there, a note goes to stderr and the exit code is "
                         f"{NEVER_FIRED_EXIT}")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with Client(args.base_url, args.api_key, retry=not args.no_retry) as client:
            if args.command == "chat":
                steering = Steering()
                for fid, value, mode, source, where in args.clamp:
                    getattr(steering, mode)(fid, value, *([source] if mode == "transfer" else []), where=where)
                for text, strength in args.concept:
                    steering.concept(text, strength)
                if args.scope:
                    steering.scope(args.scope)
                kw = {"prompt": args.question, "images": args.image,
                      "steering": steering if args.clamp or args.concept else None, "preset": args.preset,
                      "max_tokens": args.max_tokens, "temperature": args.temperature}
                if args.stream:
                    for delta in client.chat(stream=True, **kw):
                        print(delta, end="", flush=True)
                    print()
                else:
                    print(client.chat(**kw).text)
            elif args.command == "models":
                for card in client.models():
                    print(json.dumps(card))
            elif args.command == "scene":
                got = client.scene(args.seed, args.index)
                got.save(args.out)
                print(got.model_dump_json(exclude={"image"}) if args.json else got.caption)
            elif args.command == "features":
                for hit in client.features.search(args.text, args.limit):
                    print(json.dumps(hit.model_dump()))
            else:
                from .heatmap import render_heatmap

                result = client.inspect(prompt=args.prompt, images=[args.image], features=[args.feature],
                                        positions=False)
                if not result["images"]:
                    print("lmm-steer-client: the server returned no image grid", file=sys.stderr)
                    return 1
                grid = result["images"][0]["features"][str(args.feature)]
                # The heatmap of a silent feature is the plain image, which looks like a rendering
                # failure; the file is still written (a loop over features gets one file each), and
                # the note and exit code say why it is plain.
                render_heatmap(args.image, grid).save(args.out)
                print(args.out)
                peak = max((v for row in grid for v in row), default=0.0)
                if peak <= 0:
                    print(f"lmm-steer-client: feature {args.feature} never fired on this image (max activation "
                          f"{peak:g}); wrote the plain image to {args.out}", file=sys.stderr)
                    return NEVER_FIRED_EXIT
    except (LmmSteerError, ValueError) as e:
        print(f"lmm-steer-client: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
