"""Quantization-aware training on tiny random Llamas: schedule, data order, losses, bit-exact resume
(simulated and real SIGKILL), DDP / FSDP under torchrun vs one process, data-free cache, errors."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import tiny_llama, tiny_tokenizer
from lowbit import train as qat
from lowbit.cli.main import UsageError, main
from lowbit.errors import LowbitError
from lowbit.quant.surgery import QuantConfig, quantize_model, quantized_modules
from lowbit.store.folder import load_quantized, save_quantized
from lowbit.train import TrainConfig, distillation_loss, lr_multiplier, make_optimizer, param_groups, step_indices


@pytest.fixture(autouse=True)
def _private_cache_one_thread(tmp_path, monkeypatch):
    """A cache per test, and one thread: tiny models gain nothing from more, and lose a lot on a busy box."""
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cfg(model_dir, text_file, out, bits=2, **kw) -> TrainConfig:
    settings = dict(
        steps=8,
        model=str(model_dir),
        data=str(text_file),
        batch_size=4,
        seq_len=32,
        lr=1e-3,
        save_every=3,
        keep_checkpoint=True,
    )
    settings.update(kw)
    return TrainConfig(out=str(out), quant=QuantConfig(bits=bits), **settings)


def _checkpoint_model(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / qat.CHECKPOINT, weights_only=False)["model"]


def _losses(out: Path) -> list[float]:
    return [row["loss"] for row in qat.read_metrics(out / qat.METRICS)]


def _torchrun(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "lowbit.cli",
        "--threads",
        "1",
        *args,
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------------------ pieces


def test_lr_warmup_then_cosine_to_zero():
    steps, warmup = 20, 4
    mult = [lr_multiplier(s, warmup, steps) for s in range(steps + 1)]
    assert mult[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert mult[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(mult[4:]))
    assert mult[steps] == pytest.approx(0.0, abs=1e-12)


def test_lr_constant_schedule_holds_the_rate_after_warmup():
    steps, warmup = 20, 4
    mult = [lr_multiplier(s, warmup, steps, "constant") for s in range(steps + 1)]
    assert mult[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert mult[4:] == pytest.approx([1.0] * (steps - 3))


def test_schedule_is_validated_and_reaches_the_optimizer(tiny_model):
    with pytest.raises(LowbitError, match="schedule"):
        TrainConfig(out="o", quant=QuantConfig(bits=2), data="wiki-train", steps=4, schedule="linear")
    cfg = TrainConfig(out="o", quant=QuantConfig(bits=2), data="wiki-train", steps=4, warmup=1, lr=1e-3, schedule="constant")
    optimizer, scheduler = make_optimizer(tiny_model, cfg)
    rates = []
    for _ in range(4):
        optimizer.step()
        scheduler.step()
        rates.append(optimizer.param_groups[0]["lr"])
    assert rates == pytest.approx([1e-3] * 4)


def test_data_order_is_a_function_of_seed_and_step():
    n, batch = 10, 4
    first = [step_indices(7, s, batch, n) for s in range(5)]
    again = [step_indices(7, s, batch, n) for s in reversed(range(5))][::-1]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    flat = torch.cat(first)
    assert sorted(flat[:10].tolist()) == list(range(10))  # epoch 0 is a permutation
    assert sorted(flat[10:20].tolist()) == list(range(10))  # and so is epoch 1
    assert not torch.equal(flat[:10], flat[10:20])
    assert not torch.equal(step_indices(8, 0, batch, n), first[0])


def test_distillation_loss_kinds():
    torch.manual_seed(0)
    logits, ids = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    kl, _ = distillation_loss(logits, ids, logits.clone(), "kl")
    assert kl.item() == pytest.approx(0.0, abs=1e-6)
    teacher = torch.randn(2, 5, 11)
    kl, _ = distillation_loss(logits, ids, teacher, "kl")
    p = teacher.log_softmax(-1)
    expected = (p.exp() * (p - logits.log_softmax(-1))).sum(-1).mean()
    assert kl.item() == pytest.approx(expected.item(), rel=1e-5)
    ce, _ = distillation_loss(logits, ids, None, "ce")
    mix, parts = distillation_loss(logits, ids, teacher, "mix", kl_weight=0.25)
    assert mix.item() == pytest.approx(0.25 * kl.item() + 0.75 * ce.item(), rel=1e-5)
    assert set(parts) == {"kl", "ce"}


def test_scales_have_their_own_group_without_weight_decay(tiny_model):
    quantize_model(tiny_model, QuantConfig(bits=2))
    groups = {g["name"]: g for g in param_groups(tiny_model, lr=1e-4, scale_lr=1e-2, weight_decay=0.1)}
    n_alpha = sum(1 for n, _ in tiny_model.named_parameters() if n.endswith("quantizer.alpha"))
    assert len(groups["scales"]["params"]) == n_alpha > 0
    assert groups["scales"]["lr"] == 1e-2 and groups["scales"]["weight_decay"] == 0.0
    assert groups["weights"]["weight_decay"] == 0.1 and groups["vectors"]["weight_decay"] == 0.0
    n_total = sum(len(g["params"]) for g in groups.values())
    assert n_total == len(list(tiny_model.parameters()))


def test_default_learning_rates_follow_paretoq():
    assert TrainConfig(out="x", quant=QuantConfig(bits="ternary"), steps=1, data="t").lr == 2e-5
    assert TrainConfig(out="x", quant=QuantConfig(bits=4), steps=1, data="t").lr == 1e-5
    cfg = TrainConfig(out="x", quant={"bits": 2}, steps=1, data="t", lr=1e-3)
    assert cfg.scale_lr == 1e-3


# ------------------------------------------------------------------------------------ training


@pytest.mark.parametrize("bits", [1, 1.58, 2, 3, 4])
def test_loss_decreases_on_tiny_overfit_task(bits):
    tokenizer = tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tokenizer))
    ids = torch.arange(64).remainder(len(tokenizer)).repeat(8)  # one repeated 64-token pattern
    record = qat.train(
        model,
        QuantConfig(bits=bits),
        tokenizer,
        data=ids,
        steps=30,
        seq_len=32,
        seed=0,
        progress=False,
        loss="ce",
        lr=1e-2,
        batch_size=4,
    )
    assert record["final_loss"] < 0.5 * record["first_loss"]
    assert getattr(model, "lowbit_config", None) is not None


def test_in_memory_train_signature_used_by_the_sweep(sample_text_file):
    tokenizer = tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tokenizer))
    record = qat.train(
        model,
        QuantConfig(bits=2),
        tokenizer=tokenizer,
        data=str(sample_text_file),
        steps=3,
        seq_len=32,
        seed=0,
        progress=False,
        batch_size=2,
    )
    assert record["steps"] == 3 and len(record["metrics"]) == 3
    with pytest.raises(LowbitError, match="teacher"):  # already quantized: it cannot teach itself
        qat.train(
            model,
            QuantConfig(bits=2),
            tokenizer=tokenizer,
            data=str(sample_text_file),
            steps=1,
            seq_len=32,
            progress=False,
        )


def test_qat_method_gives_the_same_losses_as_train(sample_text_file):
    from lowbit.ptq.methods import make_method, method_class, method_names

    assert method_class("qat") is qat.QAT and "qat" in method_names("training")
    tokenizer = tiny_tokenizer()
    settings = {"batch_size": 2, "lr": 1e-3, "loss": "mix"}
    direct = tiny_llama(vocab_size=len(tokenizer))
    expected = qat.train(
        direct, QuantConfig(bits=2), tokenizer, str(sample_text_file), 3, 32, 1, progress=False, **settings
    )
    via = tiny_llama(vocab_size=len(tokenizer))
    method = make_method("qat", steps=3, data=str(sample_text_file), seq_len=32, seed=1, settings=settings, calib="x")
    record = method.apply(via, QuantConfig(bits=2), tokenizer=tokenizer, progress=False)
    assert (method.name, method.kind) == ("qat", "training")
    assert [r["loss"] for r in record["metrics"]] == [r["loss"] for r in expected["metrics"]]
    assert record["first_loss"] == expected["first_loss"] and record["final_loss"] == expected["final_loss"]
    assert record["steps"] == 3 and record["train_tokens"] == 3 * 2 * 32
    assert record["data"]["source"] == str(sample_text_file)
    a, b = direct.state_dict(), via.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_init_gptq_calibrates_like_lowbit_quantize(tiny_model_dir, sample_text_file):
    from lowbit.api import quantize
    from lowbit.ptq.methods import GPTQ

    teacher, tokenizer = qat.load_teacher(str(tiny_model_dir))
    cfg = _cfg(tiny_model_dir, sample_text_file, "unused", init="gptq", calib=str(sample_text_file), calib_seq_len=32)
    student = qat.build_student(teacher, tokenizer, cfg, progress=False)
    reference = qat.load_teacher(str(tiny_model_dir))[0]
    quantize(reference, QuantConfig(bits=2), method=GPTQ(calib=str(sample_text_file), seq_len=32), tokenizer=tokenizer)
    a, b = student.state_dict(), reference.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    longer = qat.build_student(
        teacher,
        tokenizer,
        _cfg(tiny_model_dir, sample_text_file, "unused", init="gptq", calib=str(sample_text_file), calib_seq_len=64),
        progress=False,
    )
    assert not all(torch.equal(a[k], v) for k, v in longer.state_dict().items())  # the window length is used


def test_run_writes_a_folder_that_evaluates_like_the_trained_model(tiny_model_dir, sample_text_file, tmp_path):
    out = tmp_path / "run"
    result = qat.run(_cfg(tiny_model_dir, sample_text_file, out, loss="mix"), progress=False)
    for name in (
        "lowbit.json",
        "model.safetensors",
        "config.json",
        "metrics.jsonl",
        "loss.png",
        "train_config.json",
        "train_result.json",
    ):
        assert (out / name).is_file(), name
    rows = qat.read_metrics(out / qat.METRICS)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert {"step", "loss", "lr", "tokens", "tokens_per_s", "elapsed", "kl", "ce"} <= set(rows[0])
    loaded, _, meta = load_quantized(out)
    assert meta["info"]["base_model"] == str(tiny_model_dir) and meta["info"]["method"] == "qat"
    ids = torch.randint(0, 100, (2, 32))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, result.model(input_ids=ids).logits)
    assert result.result["final_loss"] == rows[-1]["loss"]


class _Killed(Exception):
    pass


def test_resume_after_an_interruption_is_bit_exact(tiny_model_dir, sample_text_file, tmp_path, monkeypatch):
    unbroken = tmp_path / "unbroken"
    qat.run(_cfg(tiny_model_dir, sample_text_file, unbroken, grad_accum=2, warmup=2), progress=False)

    broken = tmp_path / "broken"
    save = qat.loop.save_checkpoint

    def save_then_die(path, *args, **kwargs):
        save(path, *args, **kwargs)
        if args[3] == 6:  # step
            raise _Killed

    monkeypatch.setattr(qat.loop, "save_checkpoint", save_then_die)
    with pytest.raises(_Killed):
        qat.run(_cfg(tiny_model_dir, sample_text_file, broken, grad_accum=2, warmup=2), progress=False)
    monkeypatch.setattr(qat.loop, "save_checkpoint", save)
    with pytest.raises(LowbitError, match="--resume"):
        qat.run(_cfg(tiny_model_dir, sample_text_file, broken, grad_accum=2, warmup=2), progress=False)
    result = qat.run(
        _cfg(tiny_model_dir, sample_text_file, broken, grad_accum=2, warmup=2), resume=True, progress=False
    )
    assert result.result["resumed_from_step"] == 6
    a, b = _checkpoint_model(unbroken), _checkpoint_model(broken)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(unbroken) == _losses(broken)
    # a finished run resumed again just reports its result
    again = qat.run(_cfg(tiny_model_dir, sample_text_file, broken, grad_accum=2, warmup=2), resume=True, progress=False)
    assert again.result["final_loss"] == result.result["final_loss"]


def test_resume_after_sigkill_is_bit_exact(tiny_model_dir, sample_text_file, tmp_path):
    args = [
        "train",
        "--model",
        str(tiny_model_dir),
        "--bits",
        "ternary",
        "--data",
        str(sample_text_file),
        "--steps",
        "60",
        "--batch-size",
        "4",
        "--seq-len",
        "64",
        "--lr",
        "1e-3",
        "--save-every",
        "2",
        "--keep-checkpoint",
        "--json",
    ]
    unbroken = tmp_path / "unbroken"
    assert main(["--threads", "1", *args, "--out", str(unbroken)]) == 0

    broken = tmp_path / "broken"
    cmd = [sys.executable, "-m", "lowbit.cli", "--threads", "1", *args, "--out", str(broken)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (broken / qat.CHECKPOINT).exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(broken / qat.CHECKPOINT, weights_only=False)["step"]
    assert killed_at < 60, "the run finished before it could be killed"
    assert main(["--threads", "1", *args, "--out", str(broken), "--resume"]) == 0
    a, b = _checkpoint_model(unbroken), _checkpoint_model(broken)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(unbroken) == _losses(broken)


@pytest.mark.slow
def test_ddp_and_fsdp_two_processes_match_one(tiny_model_dir, sample_text_file, tmp_path):
    single = tmp_path / "single"
    qat.run(_cfg(tiny_model_dir, sample_text_file, single, grad_accum=2), progress=False)
    common = [
        "train",
        "--model",
        str(tiny_model_dir),
        "--bits",
        "2",
        "--data",
        str(sample_text_file),
        "--steps",
        "8",
        "--batch-size",
        "4",
        "--seq-len",
        "32",
        "--lr",
        "1e-3",
        "--save-every",
        "3",
        "--grad-accum",
        "2",
        "--keep-checkpoint",
        "--json",
    ]
    for name, extra in (("ddp", []), ("fsdp", ["--fsdp"])):
        proc = _torchrun(*common, "--out", str(tmp_path / name), *extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert json.loads(proc.stdout)["world_size"] == 2
        a, b = _checkpoint_model(single), _checkpoint_model(tmp_path / name)
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)
        assert _losses(tmp_path / name) == pytest.approx(_losses(single), rel=1e-4)
        _, _, meta = load_quantized(tmp_path / name)  # the gathered (unsharded) model loads as one
        assert meta["info"]["method"] == "qat" and meta["quant_config"]["bits"] == 2


def test_data_free_tokens_are_cached_and_reused(tiny_model_dir, tmp_path, monkeypatch):
    first = qat.run(
        _cfg(tiny_model_dir, None, tmp_path / "a", data=None, data_free=256, steps=2, gen_batch=3), progress=False
    )
    assert first.result["data_cache_hit"] is False
    records = list((tmp_path / "cache" / "datafree").glob("*.json"))
    assert len(records) == 1
    record = json.loads(records[0].read_text())
    assert record["n_sequences"] == 8 and record["seq_len"] == 32 and record["first_token"] == "random"
    tokens = torch.load(records[0].with_suffix(".pt"))
    assert tokens.shape == (8, 32)
    assert len(set(tokens[:, 0].tolist())) > 1  # random first tokens

    second = qat.run(
        _cfg(tiny_model_dir, None, tmp_path / "b", data=None, data_free=256, steps=2, gen_batch=3), progress=False
    )
    assert second.result["data_cache_hit"] is True
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")

    monkeypatch.setattr(qat.data.shutil, "disk_usage", lambda _: type("U", (), {"free": 1024})())
    with pytest.raises(LowbitError, match="disk space"):
        qat.run(_cfg(tiny_model_dir, None, tmp_path / "c", data=None, data_free=512, steps=2), progress=False)


def test_init_from_a_quantized_folder(tiny_model_dir, sample_text_file, tmp_path):
    from lowbit.ptq.gptq import rtn

    model, tokenizer = qat.load_teacher(str(tiny_model_dir))
    rtn(model, QuantConfig(bits=2))
    save_quantized(model, tokenizer, tmp_path / "rtn2", info={"base_model": str(tiny_model_dir)})
    result = qat.run(
        _cfg(tiny_model_dir, sample_text_file, tmp_path / "run", init=str(tmp_path / "rtn2"), steps=2), progress=False
    )
    assert result.result["init"] == str(tmp_path / "rtn2")
    with pytest.raises(LowbitError, match="bits=2"):
        qat.run(
            _cfg(tiny_model_dir, sample_text_file, tmp_path / "r3", bits=3, init=str(tmp_path / "rtn2")), progress=False
        )
    with pytest.raises(LowbitError, match="full-precision model as teacher"):
        qat.run(_cfg(tmp_path / "rtn2", sample_text_file, tmp_path / "r4"), progress=False)


# ------------------------------------------------------------------------------------ errors and CLI


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"bits": 5}, "unsupported bit-width"),
        ({"data": None}, "training data"),
        ({"data_free": 1000}, "not both"),
        ({"loss": "mse"}, "unknown loss"),
        ({"warmup": 8}, "warmup"),
        ({"init": "nowhere"}, "--init"),
        ({"batch_size": 0}, "batch-size"),
    ],
)
def test_bad_configs_are_lowbit_errors(tiny_model_dir, sample_text_file, tmp_path, changes, message):
    with pytest.raises(LowbitError, match=message):
        _cfg(tiny_model_dir, sample_text_file, tmp_path / "x", **changes)


def test_bad_runs_are_lowbit_errors(tiny_model_dir, sample_text_file, tmp_path):
    with pytest.raises(LowbitError, match="only"):  # batch larger than the data
        qat.run(_cfg(tiny_model_dir, sample_text_file, tmp_path / "a", batch_size=4096), progress=False)
    with pytest.raises(LowbitError, match="--fsdp"):
        qat.run(_cfg(tiny_model_dir, sample_text_file, tmp_path / "b", fsdp=True), progress=False)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(LowbitError, match="not a lowbit training run"):
        qat.run(_cfg(tiny_model_dir, sample_text_file, busy), progress=False)
    qat.run(_cfg(tiny_model_dir, sample_text_file, tmp_path / "done", steps=2), progress=False)
    with pytest.raises(LowbitError, match="differ"):
        qat.run(
            _cfg(tiny_model_dir, sample_text_file, tmp_path / "done", steps=2, lr=1e-2), resume=True, progress=False
        )


def test_resume_with_another_quant_setting_is_refused(tiny_model_dir, sample_text_file, tmp_path):
    out = tmp_path / "run"
    qat.run(_cfg(tiny_model_dir, sample_text_file, out, steps=2), progress=False)
    changed = _cfg(tiny_model_dir, sample_text_file, out, steps=2)
    changed.quant = QuantConfig(bits=2, group_size=16)
    with pytest.raises(LowbitError, match=r"quant\.group_size: run has None, asked 16") as info:
        qat.run(changed, resume=True, progress=False)
    assert "\n" not in str(info.value)
    assert (
        qat.run(_cfg(tiny_model_dir, sample_text_file, out, steps=2, save_every=1), resume=True, progress=False).result[
            "steps"
        ]
        == 2
    )


def test_cli_flags_come_from_the_config_fields(tiny_model_dir, sample_text_file, tmp_path):
    from lowbit.cli.main import build_parser
    from lowbit.cli.train import config_from_args

    parser = build_parser()
    base = ["train", "--bits", "2", "--data", "wiki-train", "--steps", "5", "--out", str(tmp_path / "o")]
    cfg = config_from_args(parser.parse_args(base))
    defaults = TrainConfig(out=str(tmp_path / "o"), quant=QuantConfig(bits=2), steps=5, data="wiki-train")
    assert cfg == defaults
    flags = ["--lr", "1e-3", "--scale-lr", "0", "--batch-size", "1e1", "--seq-len", "64", "--data-tokens", "4096"]
    flags += ["--init", "gptq", "--calib", "news", "--calib-tokens", "2048", "--calib-seq-len", "128"]
    flags += ["--group-size", "32", "--exclude", "*.mlp.*", "--override", "*.q_proj=4:16", "--scale-search", "none"]
    flags += ["--fsdp", "--keep-checkpoint", "--loss", "mix", "--first-token", "bos", "--warmup", "2"]
    cfg = config_from_args(parser.parse_args(base + flags))
    assert (cfg.lr, cfg.scale_lr, cfg.batch_size, cfg.seq_len, cfg.data_tokens) == (1e-3, 0.0, 10, 64, 4096)
    assert (cfg.init, cfg.calib, cfg.calib_tokens, cfg.calib_seq_len) == ("gptq", "news", 2048, 128)
    assert cfg.fsdp and cfg.keep_checkpoint and (cfg.loss, cfg.first_token, cfg.warmup) == ("mix", "bos", 2)
    assert cfg.quant == QuantConfig(
        bits=2,
        group_size=32,
        exclude=["*.mlp.*"],
        overrides={"*.q_proj": {"bits": 4, "group_size": 16}},
        scale_search="none",
    )
    free = config_from_args(parser.parse_args([*base[:3], "--data-free", "1e4", *base[5:]]))
    assert free.data_free == 10000 and free.data is None
    for missing in ("--steps", "--out"):
        i = base.index(missing)
        with pytest.raises(UsageError, match=f"required: {missing}"):  # one error line, not the usage block
            parser.parse_args(base[:i] + base[i + 2 :])
    i = base.index("--bits")  # required unless --init is a quantized folder (whose settings are the default)
    with pytest.raises(LowbitError, match="--bits is required .* unless --init is a quantized folder"):
        config_from_args(parser.parse_args(base[:i] + base[i + 2 :]))


def test_cli_train_mixed_precision_like_quantize(tiny_model_dir, sample_text_file, tmp_path):
    out = tmp_path / "mixed"
    args = ["train", "--model", str(tiny_model_dir), "--bits", "2", "--data", str(sample_text_file)]
    args += ["--steps", "2", "--batch-size", "2", "--seq-len", "32", "--out", str(out), "--json"]
    args += ["--exclude", "*.mlp.down_proj", "--override", "*.self_attn.*=4"]
    assert main(args) == 0
    model, _, meta = load_quantized(out)
    assert meta["quant_config"]["exclude"] == ["*.mlp.down_proj"]
    bits = {name: m.quantizer.bits for name, m in quantized_modules(model)}
    assert bits and not any(name.endswith("down_proj") for name in bits)
    assert {b for n, b in bits.items() if ".self_attn." in n} == {4} and {
        b for n, b in bits.items() if ".mlp." in n
    } == {2}


def test_cli_train_then_eval(tiny_model_dir, sample_text_file, tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(
        [
            "train",
            "--model",
            str(tiny_model_dir),
            "--bits",
            "3",
            "--data",
            str(sample_text_file),
            "--steps",
            "3",
            "--batch-size",
            "2",
            "--seq-len",
            "32",
            "--out",
            str(out),
            "--eval-data",
            str(sample_text_file),
            "--eval-seq-len",
            "32",
            "--json",
        ]
    )
    assert code == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["quantizer"] == "lsq" and trained["train_tokens"] == 3 * 2 * 32
    code = main(["eval", "--model", str(out), "--data", str(sample_text_file), "--seq-len", "32", "--json"])
    assert code == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["reference"] == str(tiny_model_dir)
    assert evaluated["perplexity"] == trained["eval_perplexity"]
    assert evaluated["kl_to_reference"] == trained["eval_kl_to_reference"]
    assert (
        main(
            [
                "train",
                "--model",
                str(tiny_model_dir),
                "--bits",
                "5",
                "--data",
                "x",
                "--steps",
                "1",
                "--out",
                str(tmp_path / "bad"),
            ]
        )
        == 2
    )
    assert "unsupported bit-width" in capsys.readouterr().err


@pytest.mark.slow
def test_compiled_fake_quant_trains_and_saves_the_eager_model(tiny_model_dir, sample_text_file, tmp_path):
    result = qat.run(_cfg(tiny_model_dir, sample_text_file, tmp_path / "c", steps=3, compile=True), progress=False)
    assert all("forward" not in vars(m.quantizer) for _, m in quantized_modules(result.model))
    loaded, _, _ = load_quantized(tmp_path / "c")
    ids = torch.randint(0, 100, (2, 32))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, result.model(input_ids=ids).logits)


def test_train_params_scales_trains_only_step_sizes(tiny_model_dir, sample_text_file, tmp_path):
    import copy

    from lowbit.quant.surgery import quantize_model

    teacher, _ = qat.load_teacher(str(tiny_model_dir))
    start = quantize_model(copy.deepcopy(teacher), QuantConfig(bits=2)).state_dict()
    qat.run(_cfg(tiny_model_dir, sample_text_file, tmp_path / "run", train_params="scales", steps=3), progress=False)
    state = _checkpoint_model(tmp_path / "run")
    alphas = [k for k in state if k.endswith("quantizer.alpha")]
    assert alphas and any(not torch.equal(state[k], start[k]) for k in alphas)
    frozen = [k for k in state if k not in alphas and state[k].is_floating_point() and ".quantizer." not in k]
    assert frozen and all(torch.equal(state[k], start[k]) for k in frozen)
    with pytest.raises(LowbitError, match="train-params"):
        _cfg(tiny_model_dir, sample_text_file, tmp_path / "r2", train_params="weights")


def test_train_from_a_rotated_mixed_folder_without_bits_resumes_exactly(sample_text_file, tmp_path, monkeypatch):
    from conftest import tiny_llama, tiny_tokenizer
    from lowbit.cli.main import main

    tokenizer = tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tokenizer))
    model.model.norm.weight.data.uniform_(0.5, 1.5)  # so that the rotated head differs from the embedding
    tiny_model_dir = tmp_path / "base"
    model.save_pretrained(tiny_model_dir)
    tokenizer.save_pretrained(tiny_model_dir)
    folder = tmp_path / "rot"
    assert main(["quantize", "--model", str(tiny_model_dir), "--bits", "2", "--group-size", "32", "--rotate",
                 "--override", "*.mlp.down_proj=4:32", "--out", str(folder), "--json"]) == 0  # fmt: skip
    common = ["train", "--model", str(tiny_model_dir), "--init", str(folder), "--data", str(sample_text_file),
              "--steps", "6", "--batch-size", "4", "--seq-len", "32", "--save-every", "2", "--keep-checkpoint",
              "--train-params", "scales", "--lr", "1e-3", "--json"]  # fmt: skip
    assert main([*common, "--out", str(tmp_path / "unbroken")]) == 0
    saved = json.loads((tmp_path / "unbroken" / "lowbit.json").read_text())["quant_config"]
    assert saved["overrides"] == {"*.mlp.down_proj": {"bits": 4.0, "group_size": 32}} and saved["bits"] == 2.0

    save = qat.loop.save_checkpoint

    def save_then_die(path, *args, **kwargs):
        save(path, *args, **kwargs)
        if args[3] == 4:  # step
            raise _Killed

    monkeypatch.setattr(qat.loop, "save_checkpoint", save_then_die)
    assert main([*common, "--out", str(tmp_path / "broken")]) == 1  # the one-line internal error
    monkeypatch.setattr(qat.loop, "save_checkpoint", save)
    assert main([*common, "--out", str(tmp_path / "broken"), "--resume"]) == 0
    a, b = _checkpoint_model(tmp_path / "unbroken"), _checkpoint_model(tmp_path / "broken")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "model.norm.mix" in a  # the rotated tied head's final-norm mix is trained state, kept on resume


def test_eval_every_writes_a_held_out_curve_that_survives_a_kill(tiny_model_dir, sample_text_file, tmp_path, monkeypatch):
    from lowbit.eval.data import get_text, tokenize_windows
    from lowbit.eval.evaluation import evaluate
    from lowbit.eval.models import load_model

    kw = dict(eval_every=3, eval_text=str(sample_text_file), eval_every_tokens=256, warmup=2)
    unbroken = tmp_path / "unbroken"
    qat.run(_cfg(tiny_model_dir, sample_text_file, unbroken, **kw), progress=False)
    rows = [json.loads(line) for line in (unbroken / qat.loop.EVAL_CURVE).read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 3, 6, 8] and [r["tokens"] for r in rows] == [0, 3 * 128, 6 * 128, 8 * 128]
    assert all(r["eval_kl"] > 0 and r["eval_tokens"] > 0 for r in rows) and rows[0]["eval_kl"] != rows[-1]["eval_kl"]
    # the last score is the saved student's KL to the teacher on the same held-out windows (up to the
    # step sizes' fp16 rounding for storage)
    teacher, tok = load_model(str(tiny_model_dir))
    windows = tokenize_windows(tok, get_text(str(sample_text_file)), 32, max_tokens=256, bos=False)
    saved = load_quantized(unbroken)[0]
    assert evaluate(saved, windows, reference=teacher, progress=False)["kl_to_reference"] == pytest.approx(
        rows[-1]["eval_kl"], rel=1e-2
    )

    broken = tmp_path / "broken"
    save = qat.loop.save_checkpoint

    def save_then_die(path, *args, **kwargs):
        save(path, *args, **kwargs)
        if args[3] == 6:
            raise _Killed

    monkeypatch.setattr(qat.loop, "save_checkpoint", save_then_die)
    with pytest.raises(_Killed):
        qat.run(_cfg(tiny_model_dir, sample_text_file, broken, **kw), progress=False)
    monkeypatch.setattr(qat.loop, "save_checkpoint", save)
    qat.run(_cfg(tiny_model_dir, sample_text_file, broken, **kw), resume=True, progress=False)
    again = [json.loads(line) for line in (broken / qat.loop.EVAL_CURVE).read_text().splitlines()]
    assert [(r["step"], r["eval_kl"]) for r in again] == [(r["step"], r["eval_kl"]) for r in rows]
