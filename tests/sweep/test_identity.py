"""Every identity hash lives in `longctx.core.identity`, and its values never change by accident:
the values pinned here were computed by the code before the hashes moved there, so a results
directory written then still resumes without rerunning a cell (and reuses its adapters)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from longctx.core import identity
from longctx.sweep.group import Group, GroupPlan
from longctx.sweep.run import base_identity, group_adapter_key, parse_config, plan

CONFIG = {"methods": ["base", "lora"], "tasks": ["passkey"], "lengths": [128, 256], "train_steps": 2,
          "batch_size": 2, "num_samples": 2, "chunk_size": 64, "unchunked_methods": ["base"],
          "train_chunk_size": {"lora": [None, 32]}, "seeds": [0, 1]}
# (seed, method, task, chunk size, training chunk size) -> (cell ids by length, group tag)
PINNED = {
    (0, "base", "passkey", 64, None): (["7fefd4b4e9732399", "2a61d010e34ec601"],
                                       "base-passkey-chunk64-seed0-6df3e8df10"),
    (0, "lora", "passkey", 64, None): (["2562670f67bcf2fb", "5dc7d8f5f33f1717"],
                                       "lora-passkey-chunk64-seed0-a666c9bc2f"),
    (0, "lora", "passkey", 64, 32): (["f8006967b006ff6e", "9a8a1a78ab6cd4f4"],
                                     "lora-trainchunk32-passkey-chunk64-seed0-a182a7bee5"),
    (1, "base", "passkey", 64, None): (["f4d38076f25ec223", "9c1985ba0906a299"],
                                       "base-passkey-chunk64-seed1-2da15ed128"),
    (1, "lora", "passkey", 64, None): (["33e535570a50c2f1", "2f81f723c27ed0d4"],
                                       "lora-passkey-chunk64-seed1-284eee0adb"),
    (1, "lora", "passkey", 64, 32): (["d4d1244221109f5a", "b99a6a2a9745049f"],
                                     "lora-trainchunk32-passkey-chunk64-seed1-fe7270e92f"),
    (0, "base", "passkey", None, None): (["9383cd88480d07ac", "6e95074f73e1925e"],
                                         "base-passkey-unchunked-seed0-88801e8032"),
    (1, "base", "passkey", None, None): (["41221d7ea805dde0", "81caa6d32dfc2a30"],
                                         "base-passkey-unchunked-seed1-e3e236ca1b"),
}
JOB_KEYS = {"config", "method", "task", "seed", "chunk_size", "train_chunk_size", "cells", "limits", "train",
            "adapter", "out", "tasks_dir", "git_commit", "log"}


def test_cell_ids_and_group_tags_are_the_pinned_ones():
    plans = plan(parse_config(CONFIG), "fixed", Path("out"))
    found = {(p.group.seed, p.group.method, p.group.task, p.group.chunk_size, p.group.train_chunk_size):
             ([c["cell_id"] for c in p.cells], p.tag) for p in plans}
    assert found == PINNED
    assert list(found) == list(PINNED)  # the grid's order too (the order groups run in)
    assert all(p.log == str(Path("out") / "logs" / f"{p.tag}.log") for p in plans)


def test_adapter_keys_are_the_pinned_ones():
    cfg = parse_config(CONFIG)
    assert group_adapter_key(cfg, Group(0, "lora", "passkey", 64), "fixed") == "7bb7e5cf15ec7dc2"
    assert group_adapter_key(cfg, Group(1, "lora", "passkey", 64, 32), "fixed") == "7e486948ef51c7c4"
    (lora,) = [p for p in plan(cfg, "fixed", Path("out")) if p.group == Group(0, "lora", "passkey", 64)]
    assert lora.adapter == str(Path("out") / "adapters" / "lora-passkey-7bb7e5cf15ec7dc2" / "adapter")
    assert lora.train["out"] == str(Path(lora.adapter).parent)


def test_base_identity_of_files_is_the_pinned_one(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "model.safetensors").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "manifest.json").write_text("ignored")  # not part of the identity
    assert identity.base_identity("x", tmp_path) == base_identity(str(tmp_path)) == "37f5765038d21b49"
    assert identity.base_identity("some/model") == "name:some/model"
    assert identity.base_identity("m", tmp_path, gguf_sha256="ab" * 32) == "gguf:" + "ab" * 8
    assert identity.cell_identity({"a": 1, "b": [1, 2]}) == "8baa73198470c7bb"


@pytest.mark.parametrize("size, label", [(256, "chunk256"), (None, "unchunked")])
def test_one_spelling_of_the_chunk_size(size, label):
    assert identity.chunk_label(size) == Group(0, "base", "passkey", size).chunk_label == label
    assert f"-{label}-seed0-" in identity.group_tag("base", "passkey", 0, size, None, ["x"])


def test_the_job_file_keeps_its_keys_and_reads_back_as_written():
    (lora,) = [p for p in plan(parse_config(CONFIG), "fixed", Path("out")) if p.group.train_chunk_size == 32
               and p.group.seed == 0]
    values = json.loads(lora.to_json())
    assert set(values) == JOB_KEYS
    assert (values["method"], values["chunk_size"], values["train_chunk_size"]) == ("lora", 64, 32)
    assert values["limits"] == {"cell": None, "train": None} and values["train"]["chunk_size"] == 32
    assert GroupPlan.from_json(lora.to_json()) == lora
    assert lora.job_file == Path(lora.log).with_suffix(".job.json")
    assert lora.with_cells(lora.cells[1:]).cells == lora.cells[1:] and lora.with_cells([]).tag == lora.tag
