"""The README's tour runs as written against the default server (exactly `lmm-steer serve`, on a
free port): every block marked ``<!-- readme-example -->``, shell or Python, in order, in one
folder, and each output it shows as ``# -> ...`` is what the command or program prints."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from servers import Server

README = Path(__file__).resolve().parent.parent / "README.md"
SHOWN = "# -> "


def examples() -> list[tuple[str, str]]:
    """(language, code) of each marked block, in README order."""
    return re.findall(r"<!-- readme-example -->\n```(bash|python)\n(.*?)```", README.read_text(), re.S)


def shell_steps(code: str) -> list[tuple[str, list[str]]]:
    """Each command of a shell block with the output lines shown under it."""
    steps = []
    for line in re.sub(r"\\\n\s*", " ", code).splitlines():
        if line.startswith(SHOWN):
            steps[-1][1].append(line[len(SHOWN):])
        elif line.strip() and not line.startswith("#"):
            steps.append((line, []))
    return steps


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.stop()


def test_the_readme_has_its_tour():
    kinds = [lang for lang, _ in examples()]
    assert kinds.count("bash") >= 1 and kinds.count("python") >= 2
    assert all(SHOWN in code for _, code in examples()), "every example shows what it prints"
    first = re.search(r"## Set up.*?```bash\n(.*?)\n```", README.read_text(), re.S).group(1)
    assert first.endswith("lmm-steer serve --port 8000")  # the server the tour talks to


def test_the_default_server_serves_the_scenes_model_with_its_presets(server):
    ids = [m["id"] for m in server.get("/v1/models").json()["data"]]
    assert ids == ["builtin:scenes-llava-next", "builtin:scenes-llava-next:circle-not-hexagon",
                   "builtin:scenes-llava-next:circle-not-hexagon-gated", "builtin:scenes-llava-next:fitted"]


def test_the_readme_examples_print_what_they_show(server, tmp_path):
    env = {**os.environ, "LMM_STEER_BASE_URL": server.url, "HF_HUB_OFFLINE": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    here = f"127.0.0.1:{server.port}"
    checked = 0
    for lang, code in examples():
        code = code.replace("localhost:8000", here)
        if lang == "bash":
            for command, shown in shell_steps(code):
                run = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True,
                                     text=True, timeout=300)
                assert run.returncode == 0, f"{command}\n{run.stderr}"
                if shown:
                    assert run.stdout.strip().splitlines() == shown, command
                    checked += 1
        else:
            run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                                 timeout=300)
            assert run.returncode == 0, f"{code}\n{run.stderr}"
            shown = [line.strip()[len(SHOWN):] for line in code.splitlines() if line.strip().startswith(SHOWN)]
            assert run.stdout.strip().splitlines() == shown, code
            checked += 1
    assert checked >= 6
    assert (tmp_path / "scene.png").stat().st_size > 0 and (tmp_path / "yellow.png").stat().st_size > 0
