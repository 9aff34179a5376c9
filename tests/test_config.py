from pathlib import Path

import pytest

from train.config import Config, load_config, parse_overrides, replace
from train.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["tiny", "proxy-1gpu", "k2.5"])
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / f"{name}.toml")
    assert isinstance(cfg, Config)


def test_k25_has_the_published_dimensions():
    m = load_config(CONFIGS / "k2.5.toml").model
    assert (m.num_layers, m.hidden_size, m.num_heads, m.n_routed_experts) == (61, 7168, 64, 384)
    assert (m.q_lora_rank, m.kv_lora_rank, m.qk_nope_head_dim, m.qk_rope_head_dim) == (1536, 512, 128, 64)
    p = load_config(CONFIGS / "k2.5.toml").parallel
    assert (p.pp, p.ep) == (16, 16) and p.virtual_stages > 1


def test_overrides_apply_with_types():
    cfg = load_config(CONFIGS / "tiny.toml", ["--model.hidden_size=64", "--train.dtype", "bfloat16",
                                              "--optim.betas=[0.8, 0.9]", "--data.manifest=s3://bkt/m"])
    assert cfg.model.hidden_size == 64 and cfg.train.dtype == "bfloat16"
    assert cfg.optim.betas == (0.8, 0.9) and cfg.data.manifest == "s3://bkt/m"


@pytest.mark.parametrize("args, field, fragment", [
    (["--model.hiden_size=3"], "model.hiden_size", "unknown key"),
    (["--modle.hidden_size=3"], "modle", "unknown section"),
    (["--model.hidden_size=-4"], "model.hidden_size", "must be > 0"),
    (["--model.hidden_size=abc"], "model.hidden_size", "must be an integer"),
    (["--vision.num_heads=5"], "vision.num_heads", "must divide vision.hidden_size=64"),
    (["--parallel.ep=3", "--parallel.dp=3"], "parallel.ep", "must divide model.n_routed_experts=8"),
    (["--model.num_experts_per_tok=9"], "model.num_experts_per_tok", "must be <="),
    (["--train.dtype=float16"], "train.dtype", "choose one of"),
    (["--parallel.pp=4", "--parallel.virtual_stages=2"], "model.num_layers", "every pipeline chunk"),
    (["--data.global_batch_size=7"], "data.global_batch_size", "must be divisible"),
])
def test_bad_values_name_the_field(args, field, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS / "tiny.toml", args)
    assert field in str(e.value) and fragment in str(e.value)


def test_unknown_key_in_file_is_an_error(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("[model]\nhidden_size = 64\nnum_expert = 4\n")
    with pytest.raises(ConfigError, match=r"unknown key model\.num_expert"):
        load_config(f)


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    f = tmp_path / "broken.toml"
    f.write_text("[model\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(f)


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="--section.field=value"):
        parse_overrides(["hidden_size=3"])
    with pytest.raises(ConfigError, match="has no value"):
        parse_overrides(["--model.hidden_size"])


def test_replace_validates():
    cfg = load_config(CONFIGS / "tiny.toml")
    assert replace(cfg, model={"num_layers": 6}).model.num_layers == 6
    with pytest.raises(ConfigError, match="model.num_layers"):
        replace(cfg, model={"num_layers": 0})


@pytest.mark.parametrize("args, field, fragment", [
    # 8 groups of 1 expert: HF deepseek_v3 scores a group by its 2 best experts (topk(2) fails)
    (["--model.n_group=8", "--model.topk_group=4"], "model.n_group", "each group needs >= 2"),
    # 1 kept group of 2 experts cannot supply 4 experts per token
    (["--model.n_group=4", "--model.topk_group=1", "--model.num_experts_per_tok=4"],
     "model.num_experts_per_tok", "= 1 * 2 = 2"),
])
def test_grouped_routing_is_validated(args, field, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS / "tiny.toml", args)
    assert field in str(e.value) and fragment in str(e.value)


def test_valid_grouped_routing_loads_and_routes_inside_the_kept_groups():
    """A layout at the limit (k = kept groups x group size) is accepted, and the router then picks
    only experts of the groups HF's rule keeps."""
    import torch

    from train.model.moe import Router

    cfg = load_config(CONFIGS / "tiny.toml", ["--model.n_group=4", "--model.topk_group=2",
                                              "--model.num_experts_per_tok=4"])
    torch.manual_seed(0)
    router = Router(cfg.model)
    torch.nn.init.normal_(router.weight)
    x = torch.randn(64, cfg.model.hidden_size)
    idx = router(x)[1]
    scores = torch.sigmoid(x @ router.weight.T).view(64, 4, 2)
    kept = scores.topk(2, dim=-1).values.sum(-1).topk(2, dim=-1).indices
    assert all(set((i // 2).tolist()) <= set(k.tolist()) for i, k in zip(idx, kept))


def test_seq_len_beyond_max_position_embeddings_is_refused():
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS / "tiny.toml", ["--data.seq_len=512", "--model.max_position_embeddings=256"])
    assert "data.seq_len=512" in str(e.value) and "model.max_position_embeddings=256" in str(e.value)
    assert load_config(CONFIGS / "tiny.toml", ["--data.seq_len=256",
                                               "--model.max_position_embeddings=256"]).data.seq_len == 256
    # K2.5's YaRN context (factor 64 x 4096 original = max_position_embeddings 262144) admits 256K
    k25 = load_config(CONFIGS / "k2.5.toml", ["--data.seq_len=262144"])
    assert k25.model.rope_factor * k25.model.rope_original_max_position_embeddings == 262144


@pytest.mark.parametrize("args, field", [(["--store.read_timeout=0"], "store.read_timeout"),
                                         (["--store.retry_time=-1"], "store.retry_time"),
                                         (["--store.max_attempts=0"], "store.max_attempts")])
def test_store_settings_are_validated(args, field):
    with pytest.raises(ConfigError, match=field):
        load_config(CONFIGS / "tiny.toml", args)
    opts = load_config(CONFIGS / "tiny.toml", ["--store.read_timeout=2.5"]).store.store_opts()
    assert opts["read_timeout"] == 2.5 and opts["retry_time"] > 0
