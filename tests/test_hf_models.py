"""Hugging Face ``transformers`` models through ModuleOracle, with and without the engine.

Small models built from their configs with random weights (never a hub download), float64,
so that the engine's values can be compared with full forwards of the perturbed points.
"""

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from zoopt.torch import ModuleOracle, ParamView, select_trainable  # noqa: E402
from zoopt.torch.engine import cast_for_loss  # noqa: E402

transformers.logging.set_verbosity_error()
STEP = 1e-3


def gpt2(use_cache=False, seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32, use_cache=use_cache
    )
    return transformers.GPT2LMHeadModel(config).double()


def bert(seed=0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32, num_labels=3,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config).double()


def lm_loss(out, ids):
    """Next-token prediction from the model's ModelOutput."""
    return F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def cls_loss(out, labels):
    return F.cross_entropy(out["logits"], labels)  # a ModelOutput is a dict too


def lm_batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (2, 8), generator=g)
    return ids, ids


def cls_batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 100, (3, 8), generator=g), torch.randint(0, 3, (3,), generator=g)


def full_forwards(oracle, x, coords, step=STEP):
    """Reference: each perturbed point loaded into the model, one plain forward each (with
    the oracle's dropout masks), the loss on the model's own output."""
    m, view = oracle.module, oracle.view
    out = []
    with torch.no_grad():
        for c in coords:
            p = x.clone()
            p[int(c)] += step
            with view.loaded(p), oracle._same_randomness():
                output = m(oracle.inputs)
                out.append(
                    float(oracle.loss_fn(*cast_for_loss(output, oracle.targets, torch.float64)))
                )
    return torch.tensor(out, dtype=torch.float64)


def coords_of(view, names, per_group=3, extra=12, seed=0):
    """A few coordinates of each named tensor, plus a random subset of all of them."""
    rng = np.random.default_rng(seed)
    picked = []
    for g in view.groups:
        if any(n in g.name for n in names):
            picked += list(rng.integers(g.start, g.stop, per_group))
    picked += list(rng.choice(view.dim, extra, replace=False))
    return np.unique(np.array(picked, dtype=np.int64))


def assert_exact(oracle, coords):
    x = oracle.view.flatten()
    oracle.base_value(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no silent fallback to full forwards
        got = torch.as_tensor(oracle.eval_coordinate_steps(x, coords, STEP))
    ref = full_forwards(oracle, x, coords)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=0)
    return got


# ----------------------------------------------------------------------------------------
# the output as the model returns it; integer token ids as inputs
@pytest.mark.parametrize("engine", [False, True])
def test_gpt2_lm_loss_through_module_oracle(engine):
    model = gpt2()
    ids, targets = lm_batch()
    oracle = ModuleOracle(model, lm_loss, ids, targets, engine=engine)
    assert oracle.inputs.dtype == torch.int64  # token ids are not cast to float
    x = oracle.view.flatten()
    fx = oracle.base_value(x)
    assert np.isfinite(fx) and abs(fx - np.log(100)) < 1.0
    values = np.asarray(oracle.eval_coordinate_steps(x, np.arange(4), STEP))
    assert values.shape == (4,) and np.isfinite(values).all()
    loss, grad = oracle.loss_and_grad(x, update_stats=False)
    assert grad.shape == (oracle.dim,) and np.isfinite(loss)


@pytest.mark.parametrize("engine", [False, True])
def test_bert_classifier_loss_through_module_oracle(engine):
    model = bert().eval()
    ids, labels = cls_batch()
    oracle = ModuleOracle(model, cls_loss, ids, labels, engine=engine)
    x = oracle.view.flatten()
    fx = oracle.base_value(x)
    assert abs(fx - np.log(3)) < 1.0
    assert np.isfinite(np.asarray(oracle.eval_coordinate_steps(x, [0, 5], STEP))).all()


def test_the_loss_sees_the_model_output_type_cast_to_float64():
    seen = []

    def loss(out, ids):
        seen.append(out)
        return lm_loss(out, ids)

    model = gpt2().float()
    ids, targets = lm_batch()
    for engine in (False, True):
        seen.clear()
        oracle = ModuleOracle(model.eval(), loss, ids, targets, engine=engine)
        oracle.base_value(oracle.view.flatten())
        out = seen[-1]
        assert type(out).__name__ == "CausalLMOutputWithCrossAttentions", engine
        assert out.logits.dtype == torch.float64  # the loss is reduced in float64


# ----------------------------------------------------------------------------------------
# exactness of the engine: its values equal full forwards of the perturbed points
def test_engine_is_exact_on_gpt2_in_training_mode_with_dropout():
    model = gpt2().train()
    oracle = ModuleOracle(model, lm_loss, *lm_batch())
    coords = coords_of(oracle.view, ["wte", "wpe", "attn.c_attn", "ln_1", "ln_f", "mlp.c_proj"])
    assert_exact(oracle, coords)
    text = oracle.explain()
    assert "the whole forward traced" in text
    rows = {r["name"]: r["path"] for r in oracle.engine.plan_rows()}
    assert rows["transformer.h.0.ln_1.weight"] == "fast"
    assert rows["transformer.h.0.attn.c_attn.weight"] == "batched"
    assert oracle.engine.stats["slow_path_queries"] == 0


def test_engine_is_exact_on_gpt2_with_a_cache_the_opaque_path():
    model = gpt2(use_cache=True).eval()  # the output holds a DynamicCache: not traceable
    oracle = ModuleOracle(model, lm_loss, *lm_batch())
    coords = coords_of(oracle.view, ["wte", "h.1.ln_2"], per_group=1, extra=2)
    assert_exact(oracle, coords)
    assert "slow" in oracle.explain()


def test_engine_is_exact_on_bert():
    model = bert().eval()
    oracle = ModuleOracle(model, cls_loss, *cls_batch())
    coords = coords_of(
        oracle.view, ["word_embeddings", "self.query", "self.value", "LayerNorm", "classifier"]
    )
    assert_exact(oracle, coords)
    rows = {r["name"]: r["path"] for r in oracle.engine.plan_rows()}
    assert rows["bert.encoder.layer.0.attention.self.query.weight"] == "fast"
    assert rows["bert.encoder.layer.1.output.LayerNorm.bias"] == "fast"


# ----------------------------------------------------------------------------------------
# which parameters are trained: exactly those with requires_grad (peft adapters)
def test_lora_on_gpt2_trains_the_adapters_only_and_exactly():
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], lora_dropout=0.0,
                             fan_in_fan_out=True)  # fmt: skip
    model = peft.get_peft_model(gpt2(), config).eval()
    oracle = ModuleOracle(model, lm_loss, *lm_batch())
    lora = [n for n, p in model.named_parameters() if p.requires_grad]
    assert lora and all("lora_" in n for n in lora)
    assert [g.name for g in oracle.view.groups] == lora
    assert oracle.dim == sum(p.numel() for p in model.parameters() if p.requires_grad)
    b = next(g for g in oracle.view.groups if "lora_B" in g.name)
    coords = np.unique(np.r_[coords_of(oracle.view, ["lora_A", "lora_B"], extra=4), b.start])
    values = assert_exact(oracle, coords)
    fx = oracle.engine.base_loss
    assert float(values[list(coords).index(b.start)]) != fx  # a query changes the loss


def test_lora_on_bert_query_value():
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=2, target_modules=["query", "value"], lora_dropout=0.0)
    model = peft.get_peft_model(bert(), config).eval()
    oracle = ModuleOracle(model, cls_loss, *cls_batch())
    names = [g.name for g in oracle.view.groups]
    assert all("lora_" in n or "classifier" in n for n in names)  # peft keeps the head
    assert sum("lora_" in n for n in names) == 8  # A and B, query and value, 2 layers
    assert_exact(oracle, coords_of(oracle.view, ["lora_B"], per_group=2, extra=3))


def test_prefix_tuning_on_gpt2():
    peft = pytest.importorskip("peft")
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    model = peft.get_peft_model(gpt2(use_cache=True), config).eval()
    oracle = ModuleOracle(model, lm_loss, *lm_batch())
    names = [g.name for g in oracle.view.groups]
    assert names and all("prompt_encoder" in n for n in names)
    x = oracle.view.flatten()
    fx = oracle.base_value(x)
    values = np.asarray(oracle.eval_coordinate_steps(x, [0, oracle.dim - 1], 1e-2))
    assert np.isfinite(values).all() and (values != fx).any()


def test_select_trainable_by_regex():
    model = gpt2()
    names = select_trainable(model, r"\.ln_\d\.|ln_f")
    assert names and all("ln_" in n for n in names)
    view = ParamView(model)
    assert [g.name for g in view.groups] == names
    with pytest.raises(ValueError, match=r"'lora_' matches none of the .* parameters"):
        select_trainable(model, "lora_")
    with pytest.raises(ValueError, match="invalid trainable pattern"):
        select_trainable(model, "(")


# ----------------------------------------------------------------------------------------
# bad input: clear errors naming the tensor
def test_no_trainable_parameters():
    model = gpt2().requires_grad_(False)
    with pytest.raises(ValueError, match="GPT2LMHeadModel has no trainable parameters"):
        ModuleOracle(model, lm_loss)


def test_non_float_trainable_parameter():
    model = nn.Sequential(nn.Linear(2, 2))
    model.register_parameter("phase", nn.Parameter(torch.zeros(2, dtype=torch.complex64)))
    with pytest.raises(TypeError, match="trainable parameter phase has dtype torch.complex64"):
        ModuleOracle(model, F.mse_loss)


def test_meta_device_parameter():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2, device="meta"))
    with pytest.raises(ValueError, match="trainable parameter 1.weight is on the meta device"):
        ModuleOracle(model, F.mse_loss)


def test_mixed_dtypes_name_the_tensors():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2).double())
    with pytest.raises(ValueError, match=r"0\.weight is torch.float32, 1\.weight is torch.float64"):
        ModuleOracle(model, F.mse_loss)


class _Drifting(nn.Module):
    """A forward that writes to its own parameter (e.g. a careless running estimate)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 1)
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        with torch.no_grad():
            self.scale.mul_(1.01)
        return self.lin(x) * self.scale


def test_a_forward_that_changes_its_parameters():
    oracle = ModuleOracle(_Drifting(), F.mse_loss, torch.randn(4, 3), torch.randn(4, 1))
    with pytest.raises(Exception, match="changed the trainable parameter scale"):
        oracle.base_value(oracle.view.flatten())


def test_dict_inputs_are_refused_with_a_hint():
    oracle = ModuleOracle(gpt2(), lm_loss)
    ids, _ = lm_batch()
    with pytest.raises(TypeError, match="wrap the model"):
        oracle.set_batch({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ids)


def test_a_wrapped_model_with_an_attention_mask_is_exact():
    class WithMask(nn.Module):
        """One tensor in: the padding token 0 is masked out."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, ids):
            return self.model(input_ids=ids, attention_mask=(ids != 0).long())

    ids, targets = lm_batch()
    ids[0, -2:] = 0
    oracle = ModuleOracle(WithMask(gpt2().eval()), lm_loss, ids, targets)
    assert_exact(oracle, coords_of(oracle.view, ["wte", "ln_f"], per_group=2, extra=4))
