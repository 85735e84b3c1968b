import pytest

from mohge_jax.config import ConfigError, load_config, parse_overrides


def test_overrides_and_defaults(tmp_path):
  cfg = load_config("configs/tiny.yaml", ["model.top_k=2", "train.lr=1e-3",
                                          "model.group_widths=[8, 16, 32, 64]"])
  assert cfg.model.top_k == 2 and cfg.train.lr == 1e-3
  assert cfg.model.group_widths == (8, 16, 32, 64)
  assert cfg.group_aux_start == cfg.train.steps // 2
  assert load_config("configs/tiny.yaml", ["loss.group_aux_start_step=7"]).group_aux_start == 7
  assert parse_overrides(["a.b=1", "a.c=x"]) == {"a": {"b": 1, "c": "x"}}


@pytest.mark.parametrize("override,message", [
    ("model.top_k=9", "model.top_k=9: must be <= top_k_groups"),
    ("model.top_k_groups=5", "model.top_k_groups=5"),
    ("model.group_widths=[64,64,128,160]", "strictly increasing"),
    ("model.tok_k=3", "unknown key.*'model.tok_k'.*valid keys of model:.*top_k"),
    ("modle.top_k=3", "unknown key.*'modle'"),
    ("model.top_k=three", "model.top_k: expected an integer"),
    ("model.d_model=1.5", "model.d_model: expected an integer"),
    ("model.group_widths=64", "model.group_widths: expected a list"),
    ("model.combine_weights=max", "model.combine_weights='max': must be one of"),
    ("model.ffn=switch", "model.ffn='switch'"),
    ("train.seq_len=512", "train.seq_len=512 exceeds model.max_seq_len"),
    ("model.attention=gqa", "model.attention"),
    ("train.batch_size=10", "divisible by train.grad_accum"),
    ("train.lr=0", "train.lr"),
    ("model.doc_attention_mask=1", "expected true or false"),
    ("loss.aux_tokens=7", r"loss.aux_tokens=7 must divide .* = 2048"),
    ("loss.aux_tokens=-1", "loss.aux_tokens=-1: must be >= 0"),
    ("model.dsa_topk_method=heap", "model.dsa_topk_method='heap': must be one of"),
])
def test_validation_errors_name_the_field(override, message):
  extra = ["train.grad_accum=4"] if "batch_size" in override else []
  with pytest.raises(ConfigError, match=message):
    load_config("configs/tiny.yaml", [override] + extra)


def test_fused_top_k_needs_a_power_of_two_index_dim():
  """The fused top-k's GPU kernels take index dims that are powers of two >= 16: refused by
  name at load time, not inside a trace on the GPU."""
  base = ["model.attention=mla", "model.sparse_attention=dsa", "model.dsa_topk_method=fused"]
  with pytest.raises(ConfigError, match=r"dsa_topk_method=fused with model.dsa_index_dim=48"):
    load_config("configs/tiny.yaml", base + ["model.dsa_index_dim=48"])
  load_config("configs/tiny.yaml", base + ["model.dsa_index_dim=32"])


def test_moe_needs_equal_widths():
  with pytest.raises(ConfigError, match="homogeneous 'moe'"):
    load_config("configs/tiny.yaml", ["model.ffn=moe"])


def test_missing_file_and_bad_override():
  with pytest.raises(ConfigError, match="does not exist"):
    load_config("configs/nope.yaml")
  with pytest.raises(ConfigError, match="not of the form"):
    load_config("configs/tiny.yaml", ["model.top_k"])


@pytest.mark.parametrize("name", ["mohge_3b", "moe_3b"])
def test_paper_configs_are_the_reference_run(name):
  """The reference: 1.067T tokens = 508,686 iterations of 512 x 4096, no warm-up, the
  Group-Wise loss from iteration 254,343; aux-loss statistics per 4 x 4096 tokens; plain
  packed windows (positions 0..L-1, attention across documents)."""
  cfg = load_config(f"configs/{name}.yaml")
  t = cfg.train
  assert (t.steps, t.batch_size, t.seq_len, t.warmup_steps) == (508686, 512, 4096, 0)
  assert round(t.steps * t.batch_size * t.seq_len / 1e9) == 1067  # billion tokens
  assert cfg.group_aux_start == 254343
  assert cfg.loss.aux_tokens == 4 * 4096
  assert not cfg.model.doc_attention_mask
