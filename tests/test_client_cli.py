"""``lmm-steer-client``'s help text and its inspect command on a silent feature, against an
HTTP-level test double (no server, no model)."""

import argparse
import json

import httpx
import pytest
from lmm_steer_client import Client, cli
from PIL import Image


def _parsers(parser, prefix=("lmm-steer-client",)):
    """(command words, parser) for the top-level parser and every subcommand under it."""
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*prefix, name))


def test_every_command_and_option_has_help(capsys):
    parsers = list(_parsers(cli.build_parser()))
    assert {" ".join(words) for words, _ in parsers} == {
        "lmm-steer-client", "lmm-steer-client chat", "lmm-steer-client models", "lmm-steer-client features",
        "lmm-steer-client features search", "lmm-steer-client inspect", "lmm-steer-client scene"}
    for words, parser in parsers:
        assert parser.description, f"{' '.join(words)} has no description"
        for action in parser._actions:
            assert action.help and action.help != argparse.SUPPRESS, f"{' '.join(words)}: {action.dest} has no help"
            if isinstance(action, argparse._SubParsersAction):  # each command's line in its parent's list
                assert [a.dest for a in action._choices_actions] == list(action.choices)
                assert all(a.help for a in action._choices_actions), f"{' '.join(words)}: a command has no help"
        with pytest.raises(SystemExit) as exit_info:
            cli.main([*words[1:], "--help"])
        assert exit_info.value.code == 0
        shown = " ".join(capsys.readouterr().out.split())  # argparse wraps lines at the terminal width
        assert parser.description in shown, shown


def _inspection(feature: int, grid: list[list[float]]) -> dict:
    return {"object": "inspection", "hookpoint": "blocks.1", "num_tokens": 12, "image_tokens": 6, "text_tokens": 6,
            "positions": None, "pooled": {"image": [], "text": []},
            "images": [{"index": 0, "rows": len(grid), "cols": len(grid[0]), "features": {str(feature): grid}}]}


@pytest.fixture
def inspect_cli(monkeypatch, tmp_path):
    """Run ``inspect`` with the CLI's client talking to a handler that answers with ``grid``;
    returns (exit code, stdout, stderr, output path, input image, request bodies)."""
    image = tmp_path / "photo.png"
    Image.new("RGB", (48, 32), (10, 120, 200)).save(image)

    def run(capsys, feature, grid):
        sent = []

        def handler(request):
            sent.append(json.loads(request.content))
            return httpx.Response(200, json=_inspection(feature, grid))

        monkeypatch.setattr(cli, "Client", lambda *a, **kw: Client(*a, transport=httpx.MockTransport(handler), **kw))
        out = tmp_path / f"heat-{feature}.png"
        code = cli.main(["--base-url", "http://test", "inspect", "--image", str(image), "--feature", str(feature),
                         "--out", str(out)])
        captured = capsys.readouterr()
        return code, captured.out, captured.err, out, image, sent

    return run


def test_inspect_on_a_silent_feature_writes_the_plain_image_and_says_so(inspect_cli, capsys):
    code, stdout, stderr, out, image, sent = inspect_cli(capsys, 7, [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert sent[0]["features"] == [7]
    assert code == cli.NEVER_FIRED_EXIT == 3
    assert "feature 7 never fired on this image (max activation 0)" in stderr
    assert stdout.strip() == str(out)
    # the file is written, and it is the image unchanged (no red overlay)
    assert Image.open(out).convert("RGB").tobytes() == Image.open(image).convert("RGB").tobytes()


def test_inspect_on_a_firing_feature_exits_zero_quietly(inspect_cli, capsys):
    code, stdout, stderr, out, image, _ = inspect_cli(capsys, 7, [[0.0, 2.5, 0.0], [0.0, 0.0, 1.0]])
    assert code == 0 and stderr == "" and stdout.strip() == str(out)
    assert Image.open(out).convert("RGB").tobytes() != Image.open(image).convert("RGB").tobytes()


def _answering(monkeypatch, answer: dict) -> list:
    """The CLI's client talks to a handler that records each request and answers ``answer``."""
    sent = []

    def handler(request):
        sent.append((request.url.path, json.loads(request.content)))
        return httpx.Response(200, json=answer)

    monkeypatch.setattr(cli, "Client", lambda *a, **kw: Client(*a, transport=httpx.MockTransport(handler), **kw))
    return sent


def test_scene_writes_the_png_and_prints_the_caption(monkeypatch, tmp_path, capsys):
    import base64
    import io

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (230, 210, 40)).save(buf, format="PNG")
    scene = {"object": "scene", "seed": 11, "index": 3, "width": 8, "height": 8, "caption": "A yellow square.",
             "image": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode(), "background": "white",
             "objects": [{"shape": "square", "colour": "yellow"}],
             "questions": [{"question": "What colour is the square?", "answer": "yellow"}]}
    sent = _answering(monkeypatch, scene)
    out = tmp_path / "scene.png"
    assert cli.main(["--base-url", "http://test", "scene", "--seed", "11", "--index", "3", "--out", str(out)]) == 0
    assert sent == [("/v1/scenes", {"seed": 11, "index": 3})]
    assert capsys.readouterr().out.strip() == "A yellow square."
    assert out.read_bytes() == buf.getvalue()
    assert cli.main(["--base-url", "http://test", "scene", "--out", str(out), "--json"]) == 0
    assert sent[-1] == ("/v1/scenes", {"index": 0})  # no seed: the server draws one, and --json says which
    printed = json.loads(capsys.readouterr().out)
    assert printed["seed"] == 11 and printed["questions"][0]["answer"] == "yellow" and "image" not in printed


def test_chat_scope_goes_with_the_clamps(monkeypatch, capsys):
    sent = _answering(monkeypatch, {"id": "c", "object": "chat.completion", "created": 0, "model": "m",
                                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "red"},
                                                 "finish_reason": "stop"}]})
    assert cli.main(["--base-url", "http://test", "chat", "--no-stream", "--clamp", "324=150", "--scope", "image",
                     "What colour?"]) == 0
    assert capsys.readouterr().out.strip() == "red"
    steering = sent[0][1]["steering"]
    assert steering["scope"] == "image" and steering["features"] == [{"id": 324, "value": 150.0, "mode": "clamp"}]
