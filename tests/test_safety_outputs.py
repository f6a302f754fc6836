"""What lowbit promises about its outputs, rule by rule (issue 14): ``--out`` never destroys what
lowbit did not write, a quantized folder is whole or refused, a folder that only looks like a
lowbit output is never loaded as something else, stale temporary folders are cleaned, a quantizer
never silently changes the bit-width, and the stored reference is checked before it is used."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import tiny_llama, tiny_tokenizer
from lowbit import api
from lowbit.cli.main import main
from lowbit.errors import LowbitError
from lowbit.ptq.gptq import rtn
from lowbit.quant.quantizers import make_quantizer
from lowbit.quant.surgery import QuantConfig
from lowbit.store import fsio
from lowbit.store.folder import META, META_HASH, load_quantized, open_folder, read_meta, save_quantized


def folder_digest(path: Path) -> dict[str, str]:
    """SHA-256 of every file under ``path`` (hidden ones included), by relative name."""
    return {p.relative_to(path).as_posix(): fsio.sha256_file(p) for p in sorted(path.rglob("*")) if p.is_file()}


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.fixture
def quantized(tiny_model_dir, tmp_path):
    """A 4-bit RTN folder of the tiny model, written through the public API."""
    out = tmp_path / "q"
    api.quantize_to_dir(str(tiny_model_dir), str(out), QuantConfig(bits=4), progress=False)
    return out


def _rewrite_meta(folder: Path, change) -> None:
    """Edit lowbit.json as a user would, optionally re-signing it (to reach the checks behind the hash)."""
    meta = json.loads((folder / META).read_text())
    change(meta)
    text = json.dumps(meta, indent=2).encode()
    (folder / META).write_bytes(text)
    (folder / META_HASH).write_text(f"{hashlib.sha256(text).hexdigest()}  {META}\n")


def _one_line(capsys, argv, *needles) -> str:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("lowbit: error:"), err
    for needle in needles:
        assert needle in err
    return err


# --- 1. --out never destroys anything lowbit did not write ------------------------------------------


def test_quantize_refuses_a_foreign_folder_even_with_overwrite(tiny_model_dir, tmp_path, capsys):
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "a.txt").write_text("x")
    _one_line(capsys, ["quantize", "--model", tiny_model_dir, "--bits", "4", "--out", keep], "did not write")
    with pytest.raises(LowbitError, match="did not write"):
        api.quantize_to_dir(str(tiny_model_dir), str(keep), QuantConfig(bits=4), progress=False, overwrite=True)
    assert folder_digest(keep) == {"a.txt": hashlib.sha256(b"x").hexdigest()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep", "tiny-llama"]


def test_quantize_refuses_out_overlapping_the_model(tiny_model_dir, tmp_path, capsys):
    before = folder_digest(tiny_model_dir)
    _one_line(capsys, ["quantize", "--model", tiny_model_dir, "--bits", "4", "--out", tiny_model_dir], "is the input")
    inside = tiny_model_dir / "q"
    _one_line(capsys, ["quantize", "--model", tiny_model_dir, "--bits", "4", "--out", inside], "is inside the input")
    with pytest.raises(LowbitError, match="contains the input"):
        api.quantize_to_dir(str(tiny_model_dir), str(tmp_path), QuantConfig(bits=4), progress=False, overwrite=True)
    assert folder_digest(tiny_model_dir) == before and not inside.exists()


def test_overwrite_replaces_only_a_previous_output_of_the_same_kind(quantized, tiny_model_dir, tmp_path):
    first = folder_digest(quantized)
    with pytest.raises(LowbitError, match="previous lowbit quantized model folder: pass --overwrite"):
        api.quantize_to_dir(str(tiny_model_dir), str(quantized), QuantConfig(bits=2), progress=False)
    assert folder_digest(quantized) == first
    api.quantize_to_dir(str(tiny_model_dir), str(quantized), QuantConfig(bits=2), progress=False, overwrite=True)
    assert read_meta(quantized)["quant_config"]["bits"] == 2
    (quantized / "notes.txt").write_text("mine")  # a file lowbit did not write makes it foreign
    with pytest.raises(LowbitError, match="did not write"):
        api.quantize_to_dir(str(tiny_model_dir), str(quantized), QuantConfig(bits=4), progress=False, overwrite=True)
    assert (quantized / "notes.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_unwritable_out_is_refused_before_any_work(tiny_model_dir, tmp_path, monkeypatch, capsys):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(api, "load", no_loading)
    with pytest.raises(LowbitError, match="system folder"):
        api.quantize_to_dir(str(tiny_model_dir), "/proc/lowbit-out", QuantConfig(bits=4), progress=False)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(LowbitError, match="is a file, not a folder"):
        api.quantize_to_dir(str(tiny_model_dir), str(blocker), QuantConfig(bits=4), progress=False)
    with pytest.raises(LowbitError, match="cannot be created: .* is a file"):
        api.quantize_to_dir(str(tiny_model_dir), str(blocker / "q"), QuantConfig(bits=4), progress=False)
    assert blocker.read_text() == "not a folder"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LowbitError, match="current folder"):
        api.quantize_to_dir(str(tiny_model_dir), ".", QuantConfig(bits=4), progress=False)


def test_the_write_probe_names_the_os_error(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(fsio.tempfile, "mkstemp", refuse)
    with pytest.raises(LowbitError, match="cannot be written \\(Permission denied in "):
        fsio.prepare_out(tmp_path / "q", fsio.OutputKind("thing", lambda p: True))


def test_export_replaces_only_its_own_gguf(quantized, tmp_path):
    pytest.importorskip("gguf")
    from lowbit.gguf import export_gguf

    foreign = tmp_path / "foreign.gguf"
    foreign.write_bytes(b"GGUF not lowbit")
    with pytest.raises(LowbitError, match="is a file lowbit did not write"):
        export_gguf(quantized, foreign, overwrite=True)
    assert foreign.read_bytes() == b"GGUF not lowbit"
    with pytest.raises(LowbitError, match="is inside the input"):
        export_gguf(quantized, quantized / "m.gguf")
    out = tmp_path / "m.gguf"
    export_gguf(quantized, out)
    first = fsio.sha256_file(out)
    with pytest.raises(LowbitError, match="previous lowbit GGUF file: pass --overwrite"):
        export_gguf(quantized, out)
    out.write_bytes(out.read_bytes())  # same bytes, new inode: replaced below
    export_gguf(quantized, out, overwrite=True)
    assert fsio.sha256_file(out) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign.gguf", "m.gguf", "q", "tiny-llama"]


def test_train_and_pareto_folders_refuse_foreign_content(tiny_model_dir, tmp_path):
    from lowbit.pareto.store import ResultStore
    from lowbit.train.checkpoint import prepare_out
    from lowbit.train.config import TrainConfig

    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "a.txt").write_text("x")
    cfg = TrainConfig(out=str(keep), model=str(tiny_model_dir), quant=QuantConfig(bits=2), steps=1, data="wiki-train")
    for resume in (False, True):
        with pytest.raises(LowbitError, match="did not write"):
            prepare_out(keep, cfg, resume)
    with pytest.raises(LowbitError, match="is inside the input"):
        prepare_out(tiny_model_dir / "run", cfg, False)
    with pytest.raises(LowbitError, match="did not write"), ResultStore(keep):
        pass
    with pytest.raises(LowbitError, match="is a file"), ResultStore(keep / "a.txt"):
        pass
    with pytest.raises(LowbitError, match="is the input"), ResultStore(tiny_model_dir, inputs=(str(tiny_model_dir),)):
        pass
    assert folder_digest(keep) == {"a.txt": hashlib.sha256(b"x").hexdigest()}
    store = tmp_path / "sweep"
    with ResultStore(store) as s:
        s.append({"key": "a"})
    (store / "report.html").write_text("<html>")
    with ResultStore(store) as s:  # an existing store is resumed, not refused or replaced
        assert list(s.read()) == ["a"]


# --- 2. the folder is whole or it is refused ----------------------------------------------------------


def test_manifest_lists_every_file_and_is_itself_hashed(quantized):
    meta = read_meta(quantized)
    on_disk = folder_digest(quantized)
    assert set(on_disk) == set(meta["files"]) | {META, META_HASH}
    for name, entry in meta["files"].items():
        assert entry == {"bytes": (quantized / name).stat().st_size, "sha256": on_disk[name]}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(meta["files"])
    assert (quantized / META_HASH).read_text() == f"{on_disk[META]}  {META}\n"  # sha256sum -c format
    assert all(oct((quantized / n).stat().st_mode & 0o777) == "0o644" for n in on_disk)


def test_edited_manifest_is_refused_in_one_line(quantized, capsys):
    meta_file = quantized / META
    meta_file.write_text(meta_file.read_text().replace('"bits": 4.0', '"bits": 2.0', 1))
    with pytest.raises(LowbitError, match="fails its SHA-256 check in lowbit.sha256: it was edited"):
        open_folder(quantized, verify=False)
    _one_line(capsys, ["eval", "--model", quantized, "--no-reference"], "edited")
    (quantized / META_HASH).unlink()
    with pytest.raises(LowbitError, match="no lowbit.sha256"):
        load_quantized(quantized)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda q: (q / "tokenizer.json").unlink(), "tokenizer.json is missing"),
        (lambda q: (q / "config.json").write_text("{}"), "truncated or corrupted"),
        (lambda q: (q / "tokenizer.json").write_bytes(bytes(reversed((q / "tokenizer.json").read_bytes()))), "SHA-256"),
    ],
    ids=["missing-file", "resized-config", "same-size-tokenizer"],
)
def test_every_listed_file_is_checked(quantized, damage, message):
    damage(quantized)
    with pytest.raises(LowbitError, match=message):
        api.load(str(quantized))


def test_signed_but_malformed_or_older_manifests_are_refused(quantized):
    _rewrite_meta(quantized, lambda m: m.update(format_version=1))
    with pytest.raises(LowbitError, match="format 1, without a whole-folder manifest\\): re-run lowbit quantize"):
        api.load(str(quantized))
    _rewrite_meta(quantized, lambda m: (m.update(format_version=2), m.pop("files")))
    with pytest.raises(LowbitError, match="lacks files"):
        api.load(str(quantized))
    (quantized / META).write_text("[1, 2]")
    (quantized / META_HASH).write_text(f"{fsio.sha256_file(quantized / META)}  {META}\n")
    with pytest.raises(LowbitError, match="not a lowbit quantized model folder"):
        api.load(str(quantized))


# --- 3. what only looks like a lowbit output is refused, a plain HF folder still loads ----------------


def test_folder_without_manifest_is_refused_not_loaded_as_full_precision(quantized, capsys):
    (quantized / META).unlink()
    (quantized / META_HASH).unlink()
    with pytest.raises(LowbitError, match="incomplete lowbit folder \\(no lowbit.json"):
        api.load(str(quantized))
    _one_line(capsys, ["info", quantized], "incomplete lowbit folder")


def test_temporary_folder_of_a_killed_save_is_refused(quantized, tmp_path):
    tmp = tmp_path / f".q.tmp-{dead_pid()}-abc123"
    shutil.copytree(quantized, tmp)
    with pytest.raises(LowbitError, match="temporary folder of an interrupted lowbit save"):
        api.load(str(tmp))


def test_plain_hugging_face_folder_loads_as_before(tiny_model_dir):
    model, tokenizer, meta = api.load(str(tiny_model_dir))
    assert meta is None and tokenizer is not None
    assert type(model).__name__ == "LlamaForCausalLM"


# --- 4. stale temporary siblings of dead writers are cleaned by the next run --------------------------


def test_next_run_cleans_stale_temp_folders(tiny_model_dir, tmp_path, monkeypatch):
    pid = dead_pid()
    stale = tmp_path / f".q.tmp-{pid}-xyz"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    alive = tmp_path / f".q.tmp-{os.getpid()}-live"  # a writer still running: left alone
    alive.mkdir()
    api.quantize_to_dir(str(tiny_model_dir), str(tmp_path / "q"), QuantConfig(bits=4), progress=False)
    assert not stale.exists() and alive.exists()
    alive.rmdir()
    monkeypatch.chdir(tmp_path / "q")
    (tmp_path / f".q.tmp-{pid}-dot").mkdir()
    with pytest.raises(LowbitError, match="current folder"):  # --out . is refused, its stale temp cleaned first
        api.quantize_to_dir(str(tiny_model_dir), ".", QuantConfig(bits=4), progress=False)
    assert fsio.remove_stale_tmp(".") == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_output_parked_by_a_killed_swap_is_restored(quantized, tmp_path):
    digest = folder_digest(quantized)
    parked = tmp_path / f".q.old-{dead_pid()}"
    quantized.rename(parked)  # killed between parking the old output and renaming the new one in
    (tmp_path / f".q.tmp-{dead_pid()}-new").mkdir()
    assert fsio.remove_stale_tmp(quantized) == 2
    assert folder_digest(quantized) == digest and not parked.exists()


def test_failed_rename_puts_the_previous_output_back(quantized, tiny_model, tmp_path, monkeypatch):
    digest = folder_digest(quantized)
    rename = os.rename

    def fail_into_place(src, dst):
        if Path(src).name.startswith(".q.tmp-"):
            raise OSError(28, "No space left on device")
        return rename(src, dst)

    monkeypatch.setattr(fsio.os, "rename", fail_into_place)
    rtn(tiny_model, QuantConfig(bits=2))
    with pytest.raises(OSError, match="No space left"):
        save_quantized(tiny_model, None, quantized, overwrite=True)
    assert folder_digest(quantized) == digest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q", "tiny-llama"]


# --- 5. a quantizer never silently changes the bit-width ---------------------------------------------


def test_binary_quantizer_refuses_other_bit_widths(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(LowbitError, match="binary quantizer is 1-bit, not 4"):
        make_quantizer(4, "binary")
    with pytest.raises(LowbitError, match="binary quantizer is 1-bit, not 8"):
        QuantConfig(bits=1, quantizer="binary", overrides={"model.layers.0.*": {"bits": 8}})
    assert make_quantizer(1, "binary").bits == 1.0
    out = tmp_path / "b4"
    argv = ["quantize", "--model", tiny_model_dir, "--bits", "4", "--quantizer", "binary", "--out", out]
    _one_line(capsys, argv, "1-bit, not 4")
    assert not out.exists()


# --- 6. the reference is a resolvable identity, checked before use -----------------------------------


def test_reference_is_stored_absolute_with_a_fingerprint(quantized, tiny_model_dir, tmp_path, monkeypatch):
    info = read_meta(quantized)["info"]
    assert info["base_model"] == str(tiny_model_dir.absolute())
    assert info["base_model_fingerprint"] == fsio.sampled_sha256([tiny_model_dir / "model.safetensors"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    spec, reference = api.resolve_reference(api.load(str(quantized))[2])
    fp = api.load(str(tiny_model_dir))[0]
    assert spec == str(tiny_model_dir.absolute())
    ref_state, fp_state = reference.state_dict(), fp.state_dict()
    assert ref_state.keys() == fp_state.keys() and all(torch.equal(ref_state[k], fp_state[k]) for k in fp_state)
    assert api.resolve_reference({"info": {}}) == (None, None)


def test_changed_or_missing_reference_is_refused(quantized, tiny_model_dir, tmp_path):
    meta = read_meta(quantized)
    other = tiny_llama(vocab_size=len(tiny_tokenizer()), seed=1)
    other.save_pretrained(tiny_model_dir)  # same path, other weights
    with pytest.raises(LowbitError, match="stored reference .* has changed .*: pass --reference MODEL"):
        api.resolve_reference(meta)
    tiny_model_dir.rename(tmp_path / "moved")
    with pytest.raises(LowbitError, match="stored reference .* is missing: pass --reference MODEL"):
        api.resolve_reference(meta)
    with pytest.raises(LowbitError, match="without a fingerprint"):
        api.resolve_reference({"info": {"base_model": "x"}})


def test_sampled_fingerprint_reads_whole_small_files_and_samples_large_ones(tmp_path):
    small, large = tmp_path / "small", tmp_path / "large"
    small.write_bytes(b"a" * 1000)
    large.write_bytes(bytes(range(256)) * 8192)  # 2 MiB: sampled
    assert fsio.sampled_sha256([small]) == hashlib.sha256(b"1000\n" + b"a" * 1000).hexdigest()
    before = fsio.sampled_sha256([large])
    data = bytearray(large.read_bytes())
    data[-1] ^= 1  # the last block is always sampled
    large.write_bytes(bytes(data))
    assert fsio.sampled_sha256([large]) != before
