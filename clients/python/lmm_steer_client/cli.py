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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="lmm-steer-client")
    p.add_argument("--base-url")
    p.add_argument("--api-key")
    sub = p.add_subparsers(dest="command", required=True)
    chat = sub.add_parser("chat")
    chat.add_argument("question")
    chat.add_argument("--image", action="append", default=[])
    chat.add_argument("--clamp", action="append", default=[], type=_clamp, metavar="ID=VALUE[:MODE][@WHERE]")
    chat.add_argument("--concept", action="append", default=[], type=_concept, metavar="TEXT[=STRENGTH]",
                      help="steer toward a concept named in words (the server picks features and values)")
    chat.add_argument("--preset", help="a steering preset the server loaded (`models` lists them); --clamp and "
                      "--concept apply on top")
    chat.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True)
    chat.add_argument("--max-tokens", type=int, default=128)
    chat.add_argument("--temperature", type=float, default=0.0)
    sub.add_parser("models", help="the served model and its steering presets, one JSON line each")
    features = sub.add_parser("features").add_subparsers(dest="features_command", required=True)
    search = features.add_parser("search")
    search.add_argument("text")
    search.add_argument("--limit", type=int, default=10)
    inspect = sub.add_parser("inspect")
    inspect.add_argument("--image", required=True)
    inspect.add_argument("--feature", type=int, required=True)
    inspect.add_argument("--prompt", default="Describe the image.")
    inspect.add_argument("--out", required=True)
    args = p.parse_args(argv)
    try:
        with Client(args.base_url, args.api_key) as client:
            if args.command == "chat":
                steering = Steering()
                for fid, value, mode, source, where in args.clamp:
                    getattr(steering, mode)(fid, value, *([source] if mode == "transfer" else []), where=where)
                for text, strength in args.concept:
                    steering.concept(text, strength)
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
                render_heatmap(args.image, result["images"][0]["features"][str(args.feature)]).save(args.out)
                print(args.out)
    except (LmmSteerError, ValueError) as e:
        print(f"lmm-steer-client: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
